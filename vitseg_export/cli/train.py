"""`vitseg train`: train or fine-tune a model; runs unchanged under torchrun."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from vitseg_export.cli.common import DataSpec, console, err_console
from vitseg_export.errors import VitsegError


def train(
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory to write (checkpoints, metrics.json).")],
    model: Annotated[Optional[str], typer.Option("--model", help="Architecture name (see `vitseg models`).")] = None,
    data: DataSpec = "synthetic",
    epochs: Annotated[int, typer.Option(min=1)] = 3,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Square training size (default: the model's).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    init: Annotated[Optional[str], typer.Option("--init", help="Start from a vitseg run, a Hugging Face SegFormer dir, "
                                                "or timm/seed-article ViT weights (.safetensors/.bin/.pth).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default: Adam 4e-4 for vit, AdamW 6e-4 for segformer).")] = None,
    workers: Annotated[int, typer.Option(help="Data-loading worker processes.")] = 1,
    seed: int = 0,
) -> None:
    """Train a segmentation model; writes the best and last checkpoints atomically and metrics.json."""
    from vitseg_export.checkpoint import CheckpointMeta, LoadedCheckpoint, init_from_foreign, load_checkpoint
    from vitseg_export.data.sources import open_source
    from vitseg_export.modeling import registry
    from vitseg_export.training import TrainSettings
    from vitseg_export.training import train as run_training

    if model is None and init is None:
        raise VitsegError("nothing to train", "pass --model ARCH (see `vitseg models`) or --init CHECKPOINT")
    num_classes = len(open_source(data, "train", seed).class_names)
    if init is None:
        arch = registry.get_architecture(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights are the point of training from scratch
            start = load_checkpoint(model)
        if num_classes != start.meta.config.num_classes:
            start = LoadedCheckpoint(registry.build_model(arch.family, registry.replace(arch.config, num_classes=num_classes)),
                                     CheckpointMeta.for_architecture(arch, num_classes), model, None, "random")
    else:
        init_path = Path(init)
        foreign = init_path.is_file() and not (init_path.parent / "config.json").is_file()
        if foreign:
            if model is None:
                raise VitsegError(f"{init} holds bare weights", "also pass --model ARCH to say what to build")
            start = init_from_foreign(registry.get_architecture(model), init_path, num_classes)
        else:
            start = load_checkpoint(init)
            if model is not None and registry.get_architecture(model).family != start.meta.family:
                raise VitsegError(f"--init is a {start.meta.family} checkpoint but --model {model} is not",
                                  "drop --model or pick a matching architecture")
            if start.meta.config.num_classes != num_classes:
                err_console.print(f"[yellow]warning:[/] {init} predicts {start.meta.config.num_classes} classes, "
                                  f"{data} has {num_classes}: the classifier is re-initialized")
                registry.reset_classifier(start.model, start.meta.family, num_classes)
                start.meta.config = start.model.config
        start.meta.training = {**start.meta.training, "init": init}

    settings = TrainSettings(data=data, epochs=epochs, image_size=image_size, batch_size=batch_size, lr=lr,
                             num_workers=workers, seed=seed)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=err_console, disable=not rank0) as bar:
        task = bar.add_task(f"train {start.meta.architecture}", total=None, info="")

        def progress(kind: str, done: int, total: int, info: dict) -> None:
            if kind == "train":
                bar.update(task, completed=done, total=total,
                           description=f"epoch {info['epoch']}/{epochs}", info=f"loss {info['loss']:.4f}")
            else:
                bar.console.print(f"epoch {done}/{total}: loss {info['train_loss']:.4f}  val pixel acc "
                                  f"{info['val_pixel_accuracy'] * 100:.2f}%  val mIoU {info['val_miou'] * 100:.2f}  "
                                  f"({info['seconds']:.0f}s)")

        history = run_training(start, settings, output, progress)
    if rank0:
        best = max(history, key=lambda m: m.val_miou)
        console.print(f"best epoch {best.epoch}: val pixel accuracy {best.val_pixel_accuracy * 100:.2f}%, "
                      f"mIoU {best.val_miou * 100:.2f}; checkpoint {output} (last: {output / 'last'})")
