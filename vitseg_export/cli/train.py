"""`vitseg train`: train or fine-tune a model; runs unchanged under torchrun."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from vitseg_export.cli.common import POSITIVE, DataSpec, console, progress_bar, spare_inputs, square_size
from vitseg_export.files import check_output_dir
from vitseg_export.tables import lazy_module

training = lazy_module("vitseg_export.train.training")


def train(
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory to write (checkpoints, metrics.json).")],
    model: Annotated[Optional[str], typer.Option("--model", help="Architecture name (see `vitseg models`).")] = None,
    data: DataSpec = "synthetic",
    epochs: Annotated[int, typer.Option(min=1, max=10000)] = 3,
    image_size: Annotated[Optional[int], typer.Option("--image-size", callback=square_size, help="Square training size (default: the model's).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=4096)] = 16,
    init: Annotated[Optional[str], typer.Option("--init", help="Start from a vitseg run, a Hugging Face SegFormer dir, "
                                                "or timm/seed-article ViT weights (.safetensors/.bin/.pth).")] = None,
    lr: Annotated[Optional[float], typer.Option(callback=POSITIVE, help="Learning rate (default: Adam 4e-4 for vit, AdamW 6e-4 for segformer).")] = None,
    workers: Annotated[int, typer.Option(min=0, max=256, help="Data-loading worker processes (0: in the main process).")] = 1,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Random seed.")] = 0,
) -> None:
    """Train a segmentation model; writes the best and last checkpoints atomically and metrics.json."""

    check_output_dir(output, "--output")
    spare_inputs({"--output": output}, models=[init] if init else [], data=[data])
    start = training.training_start(model, init, data, seed)
    settings = training.TrainSettings(data=data, epochs=epochs, image_size=image_size, batch_size=batch_size, lr=lr,
                             num_workers=workers, seed=seed)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with progress_bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), transient=False, disable=not rank0) as bar:
        task = bar.add_task(f"train {start.meta.architecture}", total=None, info="")

        def progress(kind: str, done: int, total: int, info: dict) -> None:
            if kind == "train":
                bar.update(task, completed=done, total=total,
                           description=f"epoch {info['epoch']}/{epochs}", info=f"loss {info['loss']:.4f}")
            else:
                bar.console.print(f"epoch {done}/{total}: loss {info['train_loss']:.4f}  val pixel acc "
                                  f"{_percent(info['val_pixel_accuracy'])}%  val mIoU {_percent(info['val_miou'])}  "
                                  f"({info['seconds']:.0f}s)", markup=False)

        history = training.train(start, settings, output, progress)
    if rank0:
        best = max(history, key=training.score_of)
        console.print(f"best epoch {best.epoch}: val pixel accuracy {_percent(best.val_pixel_accuracy)}%, "
                      f"mIoU {_percent(best.val_miou)}; checkpoint {output} (last: {output / 'last'})", highlight=False,
                      markup=False, soft_wrap=True)


def _percent(value: float) -> str:
    """A score in percent, or 'undefined' where the validation split had no labelled pixels (NaN)."""
    return f"{value * 100:.2f}" if math.isfinite(value) else "undefined (no labelled validation pixels)"
