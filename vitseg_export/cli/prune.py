"""`vitseg prune`: structured pruning (+ optional 2:4 sparsity), fine-tuning, and a before/after report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vitseg_export.cli.common import RATIO, DataSpec, console, log, spare_inputs, square_size
from vitseg_export.files import check_output_dir
from vitseg_export.tables import lazy_module

pruning_run = lazy_module("vitseg_export.train.pruning_run")  # pruning and fine-tuning: torch


def prune(
    checkpoint: Annotated[str, typer.Argument(help="Run dir, Hugging Face SegFormer dir, or architecture name.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory for the pruned checkpoint.")],
    ratio: Annotated[float, typer.Option("--ratio", callback=RATIO, help="Share of heads/channels to remove, in (0, 1).")] = 0.25,
    method: Annotated[str, typer.Option("--method", help="heads, mlp, channels (SegFormer decoder) or all.")] = "all",
    sparsity: Annotated[Optional[str], typer.Option("--sparsity", help="2:4 magnitude sparsity for TensorRT sparse kernels.")] = None,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", min=0, max=10000)] = 0,
    data: DataSpec = "synthetic",
    image_size: Annotated[Optional[int], typer.Option("--image-size", callback=square_size)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=4096)] = 16,
    eval_images: Annotated[int, typer.Option("--eval-images", min=1, max=100000, help="Validation images for the before/after figures.")] = 64,
) -> None:
    """Remove attention heads, MLP channels and decoder channels by importance; fine-tune; report accuracy."""

    check_output_dir(output, "--output")
    spare_inputs({"--output": output}, models=[checkpoint], data=[data])  # never prune a run in place

    settings = pruning_run.PruneSettings(ratio, method, sparsity, finetune_epochs, data, image_size, batch_size, eval_images)
    report = pruning_run.prune_checkpoint(checkpoint, output, settings, log=log)

    def fmt(s):
        return "-" if s is None else f"pixel accuracy {s['pixel_accuracy'] * 100:.2f}%, mIoU {s['miou'] * 100:.2f}"

    console.print(f"params {report['params_before']:,} -> {report['params_after']:,} "
                  f"({(1 - report['params_after'] / report['params_before']) * 100:.1f}% fewer)")
    console.print(f"before: {fmt(report['before'])}")
    console.print(f"after pruning: {fmt(report['after_pruning'])}")
    console.print(f"after fine-tuning: {fmt(report['after_finetuning'])}")
    if sparsity:
        console.print(f"2:4 sparsity holds in {len(report['sparsity_check']['sparse_layers'])} layers "
                      "(build with `vitseg export --format trt --sparsity`)")
    console.print(f"wrote {output} (loads without the original: widths are in its config.json)", highlight=False, markup=False)
