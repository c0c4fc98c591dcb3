"""`vitseg train`: train or fine-tune a model; runs unchanged under torchrun."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Optional

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from vitseg_export.cli.common import POSITIVE, console, emit, progress_bar, spare_inputs, square_size
from vitseg_export.cli.options import opt
from vitseg_export.files import check_output_dir, check_output_file
from vitseg_export.tables import lazy_module

training = lazy_module("vitseg_export.train.training")


def train(
    output: Annotated[Path, opt("--output", "the run (a directory: checkpoints, metrics.json)")],
    model: Annotated[Optional[str], opt("--model", " to train from random weights")] = None,
    init: Annotated[Optional[str], opt("--init")] = None,
    revision: Annotated[Optional[str], opt("--revision")] = None,
    data: Annotated[str, opt("--data", " to train and validate on (its train and val splits)")] = "synthetic",
    image_size: Annotated[Optional[str], opt("--image-size", " to train at (square)")] = None,
    epochs: Annotated[int, opt("--epochs", "", min=1, max=10000)] = 3,
    batch_size: Annotated[int, opt("--batch-size", "training step", min=1, max=4096)] = 16,
    lr: Annotated[Optional[float], opt("--lr", " (default: Adam 4e-4 for vit, AdamW 6e-4 for segformer)",
                                       callback=POSITIVE)] = None,
    workers: Annotated[int, opt("--workers", min=0, max=256)] = 1,
    seed: Annotated[int, opt("--seed", min=0, max=2**32 - 1)] = 0,
    json_output: Annotated[bool, opt("--json")] = False,
    report: Annotated[Optional[Path], opt("--report")] = None,
) -> None:
    """Train a segmentation model; writes the best and last checkpoints atomically and metrics.json."""

    size = square_size(image_size)
    if report:
        check_output_file(report, "--report")
    check_output_dir(output, "--output")
    spare_inputs({"--output": output, "--report": report}, models=[init] if init else [], data=[data])
    start = training.training_start(model, init, data, seed, revision=revision)
    settings = training.TrainSettings(data=data, epochs=epochs, image_size=size, batch_size=batch_size, lr=lr,
                             num_workers=workers, seed=seed)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with progress_bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), transient=False, disable=not rank0) as bar:
        task = bar.add_task(f"train {start.meta.architecture}", total=None, info="")

        def progress(message: str, done: int | None = None, total: int | None = None, **info) -> None:
            if message == "train":
                bar.update(task, completed=done, total=total,
                           description=f"epoch {info['epoch']}/{epochs}", info=f"loss {info['loss']:.4f}")
            else:
                bar.console.print(f"epoch {done}/{total}: loss {info['train_loss']:.4f}  val pixel acc "
                                  f"{_percent(info['val_pixel_accuracy'])}%  val mIoU {_percent(info['val_miou'])}  "
                                  f"({info['seconds']:.0f}s)", markup=False)

        history = training.train(start, settings, output, progress)
    if rank0:
        best = max(history, key=training.score_of)
        emit({"run": str(output), "best_epoch": best.epoch, "epochs": [vars(h) for h in history]}, json_output, report)
        if json_output:
            return
        console.print(f"best epoch {best.epoch}: val pixel accuracy {_percent(best.val_pixel_accuracy)}%, "
                      f"mIoU {_percent(best.val_miou)}; checkpoint {output} (last: {output / 'last'})", highlight=False,
                      markup=False, soft_wrap=True)


def _percent(value: float) -> str:
    """A score in percent, or 'undefined' where the validation split had no labelled pixels (NaN)."""
    return f"{value * 100:.2f}" if math.isfinite(value) else "undefined (no labelled validation pixels)"
