"""`vitseg export`: checkpoint -> artifact (+ manifest) of any format in the format table, parity-checked
before it is written."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vitseg_export.cli.common import (
    FRACTION,
    POSITIVE,
    JsonFlag,
    console,
    log,
    parse_size,
    print_json,
    spare_inputs,
    status,
)
from vitseg_export.data.sources import check_labels_fit, open_source
from vitseg_export.errors import VitsegError
from vitseg_export.export.settings import EngineSettings, ExportRequest, Int8Settings, OnnxExportSettings
from vitseg_export.files import check_output_file
from vitseg_export.formats import FORMATS, get_format
from vitseg_export.precisions import PRECISIONS, get_precision
from vitseg_export.tables import lazy_module

checkpoints = lazy_module("vitseg_export.checkpoint")  # torch
trt_lint = lazy_module("vitseg_export.export.trt_lint")  # onnx, for --check-trt only


def default_artifact_path(checkpoint: str, architecture: str, precision: str, suffix: str = ".onnx") -> Path:
    """Beside a run directory (else in the working directory): `<architecture>-<precision><suffix>`."""
    src = Path(checkpoint)
    base = src if src.is_dir() else Path(".")
    return base / f"{architecture}-{precision}{suffix}"


def export(
    checkpoint: Annotated[str, typer.Argument(help="Run dir, .safetensors, Hugging Face SegFormer dir, or architecture name.")],
    format: Annotated[str, typer.Option("--format", help=f"Artifact format: {', '.join(FORMATS)}.")] = "onnx",
    precision: Annotated[str, typer.Option("--precision", help=f"Numeric precision: {', '.join(PRECISIONS)}.")] = "fp32",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Artifact path (default: beside the checkpoint).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (17: native LayerNormalization, TensorRT-portable).")] = 17,
    dynamic_batch: Annotated[Optional[bool], typer.Option("--dynamic-batch/--static-batch", help="Dynamic batch dimension (default: dynamic, static for formats that run faster static: openvino).")] = None,
    dynamic_size: Annotated[bool, typer.Option("--dynamic-size", help="Dynamic height/width (SegFormer only).")] = False,
    outputs: Annotated[str, typer.Option(help="logits, mask (in-graph argmax, uint8) or both.")] = "logits",
    image_size: Annotated[Optional[str], typer.Option("--image-size", help="HxW (or S) to export at; default: the checkpoint's.")] = None,
    simplify: Annotated[bool, typer.Option("--simplify", help="Simplify with onnxslim (verified not to change outputs).")] = False,
    no_fold: Annotated[bool, typer.Option("--no-fold", help="Skip the exact graph rewrites (decoder/BatchNorm folding).")] = False,
    fp16_io: Annotated[bool, typer.Option("--fp16-io", help="fp16: float16 graph input/output (default float32).")] = False,
    data: Annotated[str, typer.Option("--data", help="Images that judge the export (their validation split): synthetic[:N], pets:DIR or folder:DIR.")] = "synthetic",
    calib: Annotated[Optional[str], typer.Option("--calib", help="int8: calibration data spec (its calib split); default: --data.")] = None,
    heldout: Annotated[Optional[str], typer.Option("--heldout", help="int8: data spec whose validation split decides the float fallback; default: --calib's.")] = None,
    calib_images: Annotated[int, typer.Option("--calib-images", min=1, max=100000, help="int8: calibration images.")] = 32,
    calib_method: Annotated[str, typer.Option("--calib-method", help="int8: minmax, entropy or percentile.")] = "minmax",
    target: Annotated[Optional[str], typer.Option("--target", help="int8: cpu (ONNX Runtime) or trt (TensorRT: float part in fp16); default trt for --format trt, else cpu.")] = None,
    check_trt: Annotated[bool, typer.Option("--check-trt", help="Lint the ONNX against the TensorRT parser's supported ops/attributes.")] = False,
    workspace: Annotated[float, typer.Option("--workspace", callback=POSITIVE, help="trt: builder workspace in GB.")] = 4.0,
    min_shape: Annotated[Optional[str], typer.Option("--min-shape", help="trt: NxCxHxW of the optimization profile.")] = None,
    opt_shape: Annotated[Optional[str], typer.Option("--opt-shape", help="trt: NxCxHxW.")] = None,
    max_shape: Annotated[Optional[str], typer.Option("--max-shape", help="trt: NxCxHxW.")] = None,
    sparsity: Annotated[bool, typer.Option("--sparsity", help="trt: allow 2:4 sparse kernels (Ampere+).")] = False,
    timing_cache: Annotated[Optional[Path], typer.Option("--timing-cache", help="trt: timing cache file to reuse and update.")] = None,
    version_compatible: Annotated[bool, typer.Option("--version-compatible", help="trt: version-compatible engine.")] = False,
    dla_core: Annotated[Optional[int], typer.Option("--dla-core", min=0, help="trt: build for this DLA core (Jetson; fp16/int8, static shapes).")] = None,
    weakly_typed: Annotated[bool, typer.Option("--weakly-typed", help="trt: TensorRT 10.x fallback with FP16/INT8 builder flags.")] = False,
    min_agreement: Annotated[Optional[float], typer.Option("--min-agreement", callback=FRACTION, help="int8: held-out agreement to reach by falling back layers (default: the int8 preset).")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Export a checkpoint (or, for formats that build on one, an ONNX artifact); refuses to write a graph
    whose outputs differ from PyTorch. Formats and precisions: `vitseg doctor` lists what this machine has."""
    fmt = get_format(format)
    get_precision(precision)
    fmt.require()  # a missing backend says so before any other work
    request = ExportRequest(
        format, OnnxExportSettings(precision=precision, opset=opset, image_size=parse_size(image_size) if image_size else None,
                                   dynamic_batch=not fmt.static_by_default if dynamic_batch is None else dynamic_batch,
                                   dynamic_size=dynamic_size, outputs=outputs,
                                   simplify=simplify, fp16_io=fp16_io, fold=not no_fold, parity_data=data),
        _int8_settings(calib or data, calib_images, calib_method, target or fmt.int8_target, min_agreement, heldout),
        EngineSettings(workspace_gb=workspace, min_shape=_shape(min_shape), opt_shape=_shape(opt_shape),
                       max_shape=_shape(max_shape), sparsity=sparsity, timing_cache=timing_cache,
                       version_compatible=version_compatible, dla_core=dla_core, weakly_typed=weakly_typed),
        check_trt)
    path, result = _run_export(fmt, checkpoint, output, request)
    lint = _lint(result, check_trt)
    if json_output:
        print_json({"artifact": str(path), **result.manifest.to_json(), **({"trt_lint": [str(p) for p in lint]} if check_trt else {})})
        return
    for line in fmt.summary(path, result.manifest):
        console.print(line, highlight=False, soft_wrap=True)
    if check_trt:
        _print_lint(path, lint)


def _int8_settings(calib: str, images: int, method: str, target: str, min_agreement: Optional[float], heldout: Optional[str]):
    return Int8Settings(calib=calib, calib_images=images, method=method, target=target, heldout=heldout,
                        min_agreement=min_agreement)


def _run_export(fmt, checkpoint: str, output: Optional[Path], request):
    """(artifact path, ExportResult): from an ONNX artifact where the format builds on one, else from the checkpoint.
    The output path and the data specs are checked before any heavy work."""
    if output is not None:
        check_output_file(output, "--output")
        _spare_inputs(fmt, checkpoint, output, request)
    sources = _check_data(request)
    if checkpoint.endswith(".onnx"):
        if fmt.from_onnx is None:
            raise VitsegError(f"--format {fmt.name} exports checkpoints, and {checkpoint} is an ONNX artifact",
                              "pass the checkpoint it was exported from")
        path = output or Path(checkpoint).with_suffix(fmt.suffixes[0])
        _spare_inputs(fmt, checkpoint, path, request)
        with status(fmt.name) as update:
            return path, fmt.from_onnx(Path(checkpoint), path, request, update)

    loaded = checkpoints.load_checkpoint(checkpoint)
    for spec, source in sources.items():
        check_labels_fit(source, spec, loaded.meta.config.num_classes)
    path = output or default_artifact_path(checkpoint, loaded.meta.architecture, request.precision, fmt.suffixes[0])
    check_output_file(path, "output")
    _spare_inputs(fmt, checkpoint, path, request)
    with status("export") as update:
        return path, fmt.export(loaded, path, request, lambda m: (update(m), log(f"  {m}")))


def _spare_inputs(fmt, checkpoint: str, path: Path, request) -> None:
    """Every file the export writes (the artifact, its sidecars and manifest, the ONNX beside an engine) spares
    the checkpoint or artifact it reads and the data folders."""
    written = fmt.files(path) + (fmt.files(path.with_suffix(".onnx")) if fmt.onnx_beside and not checkpoint.endswith(".onnx") else [])
    spare_inputs({"--output": written}, models=[checkpoint],
                 data=[request.onnx.parity_data, request.int8.calib, request.int8.heldout])


def _check_data(request) -> dict:
    """Open every data spec the export will read (DataError, one line, for a bad one) before the export starts;
    returns {spec: its validation split}, the images whose labels the export compares with."""
    held_out = {request.onnx.parity_data: open_source(request.onnx.parity_data, "val")}
    if request.precision == "int8":
        open_source(request.int8.calib, "calib")
        spec = request.int8.heldout or request.int8.calib
        held_out[spec] = open_source(spec, "val")
    return held_out


def _lint(result, check_trt: bool) -> list:
    if not check_trt or result.model_proto is None:
        return []

    return trt_lint.lint_for_tensorrt(result.model_proto)


def _print_lint(path: Path, lint: list) -> None:
    if lint:
        for problem in lint:
            console.print(f"  TensorRT: {problem}", soft_wrap=True, highlight=False, markup=False)
        raise VitsegError(f"{path.name} has {len(lint)} TensorRT parser incompatibilities (listed above)",
                          "the ONNX artifact itself is valid for onnxruntime; fix the graph before building an engine")
    console.print("TensorRT lint: every op and attribute is supported by the TensorRT ONNX parser")


def _shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise VitsegError(f"shape '{text}' is not NxCxHxW", "e.g. 1x3x512x512") from None
