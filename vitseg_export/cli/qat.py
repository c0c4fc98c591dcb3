"""`vitseg qat`: quantization-aware training, written as an int8 artifact (OpenVINO IR with NNCF; Q/DQ ONNX for
TensorRT or ONNX Runtime with NVIDIA Model Optimizer) through the same checks as `vitseg export`; runs
unchanged under torchrun (rank 0 exports)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from vitseg_export.cli.common import FRACTION, POSITIVE, emit, given_options, log, progress_bar
from vitseg_export.cli.common import console as out_console
from vitseg_export.cli.export import (
    check_export_data,
    check_export_options,
    default_artifact_path,
    export_options,
    spare_export_inputs,
)
from vitseg_export.cli.options import CHECKPOINT_HELP, INT8, CpuClassChoice, FormatChoice, TargetChoice, arg, opt
from vitseg_export.data.sources import check_labels_fit, open_source
from vitseg_export.errors import VitsegError
from vitseg_export.files import check_output_file
from vitseg_export.formats import FORMATS, format_for_path, get_format
from vitseg_export.machine.cpu import SAFE_CLASS
from vitseg_export.settings import ExportRequest, QatSettings, default_of, export_request
from vitseg_export.tables import lazy_module

checkpoints = lazy_module("vitseg_export.checkpoint")  # torch
qat_training = lazy_module("vitseg_export.train.qat")  # torch

QAT_FORMATS = tuple(name for name, row in FORMATS.items() if row.qat is not None)


def qat(
    ctx: typer.Context,
    checkpoint: Annotated[str, arg(CHECKPOINT_HELP + " The fp32 model it learns from.", "a checkpoint")],
    format: Annotated[FormatChoice, opt("--format", f" to write ({', '.join(QAT_FORMATS)})")] = FormatChoice("onnx"),
    output: Annotated[Optional[Path], opt("--output", "the artifact (default: beside the checkpoint)")] = None,
    revision: Annotated[Optional[str], opt("--revision")] = None,
    image_size: Annotated[Optional[str], opt("--image-size", " to train and export at")] = None,
    dynamic_batch: Annotated[Optional[bool], opt("--dynamic-batch")] = None,
    data: Annotated[str, opt("--data", " to fine-tune on (its train split; labels not needed)")] = "synthetic",
    epochs: Annotated[int, opt("--epochs", " with fake quantization", min=1, max=1000)] = QatSettings.epochs,
    lr: Annotated[float, opt("--lr", " (Adam; small: the model starts where PTQ left it)", callback=POSITIVE)] = QatSettings.lr,
    batch_size: Annotated[int, opt("--batch-size", "training step", min=1, max=4096)] = QatSettings.batch_size,
    workers: Annotated[int, opt("--workers", min=0, max=256)] = QatSettings.num_workers,
    seed: Annotated[int, opt("--seed", min=0, max=2**32 - 1)] = QatSettings.seed,
    calib: Annotated[Optional[str], opt("--calib", " for the PTQ that QAT starts from")] = None,
    calib_images: Annotated[int, opt("--calib-images", min=1, max=100000)] = default_of("calib_images"),
    heldout: Annotated[Optional[str], opt("--heldout")] = None,
    target: Annotated[Optional[TargetChoice], opt("--target")] = None,
    cpu_class: Annotated[CpuClassChoice, opt("--cpu-class")] = CpuClassChoice(SAFE_CLASS),
    min_agreement: Annotated[Optional[float], opt("--min-agreement", " on held-out images, reached by keeping layers "
                                                                     "float", panel=INT8, callback=FRACTION)] = None,
    allow_float_fallback: Annotated[bool, opt("--allow-float-fallback")] = default_of("allow_float_fallback"),
    keep_float: Annotated[Optional[str], opt("--keep-float")] = None,
    json_output: Annotated[bool, opt("--json")] = False,
    report: Annotated[Optional[Path], opt("--report")] = None,
) -> None:
    """Fine-tune with fake quantization (learning from the fp32 model), then export an int8 artifact verified
    against the fp32 PyTorch model like `vitseg export --precision int8`."""
    fmt = get_format(format)
    if fmt.qat is None:
        raise VitsegError(f"--format {fmt.name} has no quantization-aware training", f"use --format {' or '.join(QAT_FORMATS)}")
    qat_only = {"epochs", "lr", "batch_size", "workers", "seed"}
    options = export_options({k: v for k, v in ctx.params.items() if k not in qat_only} | {"precision": "int8"})
    given = given_options(ctx) - qat_only
    if "target" in given and fmt.name != "onnx":  # NNCF's IR has one int8 flavour (OpenVINO's CPU kernels)
        raise VitsegError(f"--target applies to --format onnx only, not --format {fmt.name}", "drop --target")
    check_export_options(given, fmt, options)
    open_source(data, "train")
    request = export_request(fmt, options)
    settings = QatSettings(data=data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, num_workers=workers)
    fmt.require()
    if report:
        check_output_file(report, "--report")
    path = _checked_output(fmt, checkpoint, output, request)
    loaded = checkpoints.load_checkpoint(checkpoint, revision=revision)
    for spec, source in check_export_data(request).items():
        check_labels_fit(source, spec, loaded.meta.config.num_classes)
    path = path or default_artifact_path(checkpoint, loaded.meta.architecture, "int8-qat", fmt)
    check_output_file(path, "output")
    spare_export_inputs(fmt, checkpoint, path, request, report)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # torchrun: rank 0 shows progress and writes
    try:
        result = _train_and_export(fmt, loaded, path, request, settings, rank0)
    except qat_training.WorkerDone:
        return
    emit({"artifact": str(path), **result.manifest.to_json()}, json_output, report)
    if not json_output:
        _print_result(fmt, path, result, settings)


def _print_result(fmt, path: Path, result, settings: QatSettings) -> None:
    """The human summary: held-out agreement before and after training, then the format's own lines."""
    details = result.manifest.precision_details or {}
    record = details.get("qat", {})
    ptq, after = record.get("ptq_before_training", {}), record.get("qat_before_fallback", {})
    out_console.print(f"QAT: {record.get('steps')} steps on {settings.data}; held-out agreement with fp32 (PyTorch, before "
                      f"any fallback) PTQ {ptq.get('pixel_agreement', 0) * 100:.2f}% -> QAT "
                      f"{after.get('pixel_agreement', 0) * 100:.2f}%", highlight=False, soft_wrap=True, markup=False)
    for line in fmt.summary(path, result.manifest):
        out_console.print(line, highlight=False, soft_wrap=True, markup=False)


def _checked_output(fmt, checkpoint: str, output: Optional[Path], request: ExportRequest) -> Optional[Path]:
    """--output checked (writable, the format's suffix, sparing the inputs) and the checkpoint not an artifact."""
    if format_for_path(Path(checkpoint)) is not None:
        raise VitsegError(f"{checkpoint} is an artifact; quantization-aware training starts from a checkpoint",
                          "pass the checkpoint it was exported from")
    if output is not None:
        check_output_file(output, "--output")
        if format_for_path(output) is not fmt:
            raise VitsegError(f"--output {output}: --format {fmt.name} writes {' or '.join(fmt.suffixes)} files",
                              f"e.g. -o {output.with_suffix(fmt.suffixes[0])}")
        spare_export_inputs(fmt, checkpoint, output, request)
    return output


def _train_and_export(fmt, loaded, path: Path, request: ExportRequest, settings: QatSettings, rank0: bool):
    """The format's QAT exporter with a progress bar of training steps and the export's steps on stderr."""
    with progress_bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), transient=False, disable=not rank0) as bar:
        task = bar.add_task(f"qat {loaded.meta.architecture}", total=None, info="")

        def on_step(message: str, done: int | None = None, total: int | None = None, **info) -> None:
            bar.update(task, completed=done, total=total, description=f"epoch {info['epoch']}/{settings.epochs}",
                       info=f"distillation loss {info['loss']:.3g}")

        def progress(message: str, done: int | None = None, total: int | None = None, **info) -> None:
            if rank0:
                log(f"  {message}")

        return fmt.qat(loaded, path, request, settings, progress, on_step)
