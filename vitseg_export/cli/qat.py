"""`vitseg qat`: quantization-aware training, written as an int8 artifact (OpenVINO IR with NNCF; Q/DQ ONNX for
TensorRT or ONNX Runtime with NVIDIA Model Optimizer) through the same checks as `vitseg export`; runs
unchanged under torchrun (rank 0 exports)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from vitseg_export.cli.common import (
    FRACTION,
    POSITIVE,
    JsonFlag,
    KeepFloatOption,
    keep_float_names,
    log,
    parse_size,
    print_json,
    progress_bar,
)
from vitseg_export.cli.common import console as out_console
from vitseg_export.cli.export import check_export_data, default_artifact_path, spare_export_inputs
from vitseg_export.data.sources import check_labels_fit, open_source
from vitseg_export.errors import VitsegError
from vitseg_export.files import check_output_file
from vitseg_export.formats import FORMATS, format_for_path, get_format
from vitseg_export.machine.cpu import CPU_CLASSES, SAFE_CLASS
from vitseg_export.settings import INT8_TARGETS, ExportRequest, Int8Settings, OnnxExportSettings, QatSettings
from vitseg_export.tables import lazy_module

checkpoints = lazy_module("vitseg_export.checkpoint")  # torch
qat_training = lazy_module("vitseg_export.train.qat")  # torch

QAT_FORMATS = tuple(name for name, row in FORMATS.items() if row.qat is not None)


def qat(
    checkpoint: Annotated[str, typer.Argument(help="Run dir, .safetensors or Hugging Face SegFormer dir (the fp32 model it learns from).")],
    format: Annotated[str, typer.Option("--format", help=f"Artifact format: {', '.join(QAT_FORMATS)}.")] = "onnx",
    target: Annotated[Optional[str], typer.Option("--target", help="onnx: cpu (ONNX Runtime, default) or trt (TensorRT).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Artifact path (default: beside the checkpoint).")] = None,
    data: Annotated[str, typer.Option("--data", help="Training images (their train split; labels not needed): synthetic[:N], pets:DIR or folder:DIR.")] = "synthetic",
    epochs: Annotated[int, typer.Option(min=1, max=1000, help="Passes over --data with fake quantization.")] = 1,
    lr: Annotated[float, typer.Option(callback=POSITIVE, help="Adam learning rate (small: the model starts where PTQ left it).")] = 1e-6,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=4096)] = 8,
    workers: Annotated[int, typer.Option(min=0, max=256, help="Data-loading worker processes (0: in the main process).")] = 1,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1)] = 0,
    image_size: Annotated[Optional[str], typer.Option("--image-size", help="HxW (or S) to train and export at; default: the checkpoint's.")] = None,
    dynamic_batch: Annotated[Optional[bool], typer.Option("--dynamic-batch/--static-batch", help="Dynamic batch dimension (default: dynamic, static for openvino).")] = None,
    calib: Annotated[Optional[str], typer.Option("--calib", help="Calibration data (its calib split) for the PTQ QAT starts from; default: --data.")] = None,
    calib_images: Annotated[int, typer.Option("--calib-images", min=1, max=100000)] = 32,
    heldout: Annotated[Optional[str], typer.Option("--heldout", help="Data whose validation split judges the result and decides the float fallback; default: --calib's.")] = None,
    cpu_class: Annotated[Optional[str], typer.Option("--cpu-class", help=f"For CPUs: the class of the CPU it will run on: {SAFE_CLASS} (default: saturation-safe), vnni or amx.")] = None,
    min_agreement: Annotated[Optional[float], typer.Option("--min-agreement", callback=FRACTION, help="Held-out agreement to reach by falling back layers (default: the int8 preset).")] = None,
    allow_float_fallback: Annotated[bool, typer.Option("--allow-float-fallback", help="Accept an artifact that is mostly float after the fallback, or slower than fp32 on the CPU class it is for.")] = False,
    keep_float: KeepFloatOption = None,
    json_output: JsonFlag = False,
) -> None:
    """Fine-tune with fake quantization (learning from the fp32 model), then export an int8 artifact verified
    against the fp32 PyTorch model like `vitseg export --precision int8`."""
    fmt = get_format(format)
    request = _request(fmt, target, image_size, dynamic_batch, data, calib, calib_images, heldout, cpu_class,
                       min_agreement, allow_float_fallback, keep_float_names(keep_float))
    settings = QatSettings(data=data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, num_workers=workers)
    fmt.require()
    path = _checked_output(fmt, checkpoint, output, request)
    loaded = checkpoints.load_checkpoint(checkpoint)
    for spec, source in check_export_data(request).items():
        check_labels_fit(source, spec, loaded.meta.config.num_classes)
    path = path or default_artifact_path(checkpoint, loaded.meta.architecture, "int8-qat", fmt.suffixes[0])
    check_output_file(path, "output")
    spare_export_inputs(fmt, checkpoint, path, request)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # torchrun: rank 0 shows progress and writes
    try:
        result = _train_and_export(fmt, loaded, path, request, settings, rank0)
    except qat_training.WorkerDone:
        return
    if json_output:
        print_json({"artifact": str(path), **result.manifest.to_json()})
        return
    details = result.manifest.precision_details or {}
    record = details.get("qat", {})
    ptq, after = record.get("ptq_before_training", {}), record.get("qat_before_fallback", {})
    out_console.print(f"QAT: {record.get('steps')} steps on {settings.data}; held-out agreement with fp32 (PyTorch, before "
                      f"any fallback) PTQ {ptq.get('pixel_agreement', 0) * 100:.2f}% -> QAT "
                      f"{after.get('pixel_agreement', 0) * 100:.2f}%", highlight=False, soft_wrap=True, markup=False)
    for line in fmt.summary(path, result.manifest):
        out_console.print(line, highlight=False, soft_wrap=True, markup=False)


def _request(fmt, target, image_size, dynamic_batch, data, calib, calib_images, heldout, cpu_class, min_agreement,
             allow_float_fallback, keep_float: tuple[str, ...] = ()) -> ExportRequest:
    """The export request `vitseg qat` hands its format's QAT exporter; choices checked before any work."""
    if fmt.qat is None:
        raise VitsegError(f"--format {fmt.name} has no quantization-aware training", f"use --format {' or '.join(QAT_FORMATS)}")
    if target is not None and fmt.name != "onnx":
        raise VitsegError(f"--target applies to --format onnx only, not --format {fmt.name}", "drop --target")
    target = target or fmt.int8_target
    for option, value, choices in (("--target", target, INT8_TARGETS), ("--cpu-class", cpu_class, CPU_CLASSES)):
        if value is not None and value not in choices:
            raise VitsegError(f"{option} {value} is unknown", f"use one of: {', '.join(choices)}")
    if cpu_class is not None and target != "cpu":
        raise VitsegError(f"--cpu-class applies to int8 for CPUs only, not --target {target}", "drop --cpu-class")
    open_source(data, "train")
    return ExportRequest(
        fmt.name, OnnxExportSettings(precision="int8", image_size=parse_size(image_size) if image_size is not None else None,
                                     dynamic_batch=not fmt.static_by_default if dynamic_batch is None else dynamic_batch,
                                     parity_data=data, keep_float=keep_float),
        Int8Settings(calib=calib or data, calib_images=calib_images, target=target, heldout=heldout,
                     min_agreement=min_agreement, cpu_class=cpu_class or SAFE_CLASS,
                     allow_float_fallback=allow_float_fallback))


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

        def on_step(epoch: int, step: int, steps: int, loss: float) -> None:
            bar.update(task, completed=step, total=steps, description=f"epoch {epoch}/{settings.epochs}",
                       info=f"distillation loss {loss:.3g}")

        def progress(message: str) -> None:
            if rank0:
                log(f"  {message}")

        return fmt.qat(loaded, path, request, settings, progress, on_step)
