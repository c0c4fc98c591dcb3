"""`vitseg prune`: structured pruning (+ optional 2:4 sparsity), fine-tuning, and a before/after report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from vitseg_export.cli.common import RATIO, console, emit, log, spare_inputs, square_size
from vitseg_export.cli.options import CHECKPOINT_HELP, arg, opt
from vitseg_export.files import check_output_dir, check_output_file
from vitseg_export.tables import lazy_module

pruning_run = lazy_module("vitseg_export.train.pruning_run")  # pruning and fine-tuning: torch


def prune(
    checkpoint: Annotated[str, arg(CHECKPOINT_HELP, "a checkpoint")],
    output: Annotated[Path, opt("--output", "the pruned run (a directory)")],
    revision: Annotated[Optional[str], opt("--revision")] = None,
    ratio: Annotated[float, opt("--ratio", callback=RATIO)] = 0.25,
    method: Annotated[str, opt("--method")] = "all",
    sparsity: Annotated[Optional[str], opt("--sparsity")] = None,
    finetune_epochs: Annotated[int, opt("--finetune-epochs", min=0, max=10000)] = 0,
    data: Annotated[str, opt("--data", " to fine-tune and measure on")] = "synthetic",
    image_size: Annotated[Optional[str], opt("--image-size", " to fine-tune at (square)")] = None,
    batch_size: Annotated[int, opt("--batch-size", "fine-tuning step", min=1, max=4096)] = 16,
    num_images: Annotated[int, opt("--num-images", " measure accuracy before and after", min=1, max=100000)] = 64,
    json_output: Annotated[bool, opt("--json")] = False,
    report_file: Annotated[Optional[Path], opt("--report")] = None,
) -> None:
    """Remove attention heads, MLP channels and decoder channels by importance; fine-tune; report accuracy."""

    size = square_size(image_size)
    check_output_dir(output, "--output")
    if report_file:
        check_output_file(report_file, "--report")
    spare_inputs({"--output": output, "--report": report_file}, models=[checkpoint], data=[data])  # never in place

    settings = pruning_run.PruneSettings(ratio, method, sparsity, finetune_epochs, data, size, batch_size, num_images)
    report = pruning_run.prune_checkpoint(checkpoint, output, settings, log=log, revision=revision)
    emit(report, json_output, report_file)
    if json_output:
        return

    def fmt(s):
        return "-" if s is None else f"pixel accuracy {s['pixel_accuracy'] * 100:.2f}%, mIoU {s['miou'] * 100:.2f}"

    console.print(f"params {report['params_before']:,} -> {report['params_after']:,} "
                  f"({(1 - report['params_after'] / report['params_before']) * 100:.1f}% fewer)")
    console.print(f"before: {fmt(report['before'])}")
    console.print(f"after pruning: {fmt(report['after_pruning'])}")
    console.print(f"after fine-tuning: {fmt(report['after_finetuning'])}")
    if sparsity:
        console.print(f"2:4 sparsity holds in {len(report['sparsity_check']['sparse_layers'])} layers "
                      "(build with `vitseg export --format trt --sparse-weights`)")
    console.print(f"wrote {output} (loads without the original: widths are in its config.json)", highlight=False, markup=False)
