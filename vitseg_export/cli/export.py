"""`vitseg export`: checkpoint -> ONNX artifact (+ manifest), parity-checked before it is written."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vitseg_export.cli.common import JsonFlag, console, err_console, parse_size, print_json, status
from vitseg_export.errors import VitsegError

FORMATS = ("onnx", "trt")
PRECISIONS = ("fp32", "fp16", "int8")


def default_artifact_path(checkpoint: str, architecture: str, precision: str, suffix: str = ".onnx") -> Path:
    src = Path(checkpoint)
    base = src if src.is_dir() else Path(".")
    return base / f"{architecture}-{precision}{suffix}"


def export(
    checkpoint: Annotated[str, typer.Argument(help="Run dir, .safetensors, Hugging Face SegFormer dir, or architecture name.")],
    format: Annotated[str, typer.Option("--format", help="Artifact format.")] = "onnx",
    precision: Annotated[str, typer.Option("--precision", help="Numeric precision of the artifact.")] = "fp32",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Artifact path (default: beside the checkpoint).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (17: native LayerNormalization, TensorRT-portable).")] = 17,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch/--static-batch", help="Dynamic batch dimension.")] = True,
    dynamic_size: Annotated[bool, typer.Option("--dynamic-size", help="Dynamic height/width (SegFormer only).")] = False,
    outputs: Annotated[str, typer.Option(help="logits, mask (in-graph argmax, uint8) or both.")] = "logits",
    image_size: Annotated[Optional[str], typer.Option("--image-size", help="HxW (or S) to export at; default: the checkpoint's.")] = None,
    simplify: Annotated[bool, typer.Option("--simplify", help="Simplify with onnxslim (verified not to change outputs).")] = False,
    no_fold: Annotated[bool, typer.Option("--no-fold", help="Skip the exact graph rewrites (decoder/BatchNorm folding).")] = False,
    fp16_io: Annotated[bool, typer.Option("--fp16-io", help="fp16: float16 graph input/output (default float32).")] = False,
    calib: Annotated[str, typer.Option("--calib", help="int8: calibration data spec (its calib split).")] = "synthetic",
    calib_images: Annotated[int, typer.Option("--calib-images", min=1, help="int8: calibration images.")] = 32,
    calib_method: Annotated[str, typer.Option("--calib-method", help="int8: minmax, entropy or percentile.")] = "minmax",
    target: Annotated[Optional[str], typer.Option("--target", help="int8: cpu (ONNX Runtime) or trt (TensorRT: float part in fp16); default trt for --format trt, else cpu.")] = None,
    check_trt: Annotated[bool, typer.Option("--check-trt", help="Lint the ONNX against the TensorRT parser's supported ops/attributes.")] = False,
    workspace: Annotated[float, typer.Option("--workspace", help="trt: builder workspace in GB.")] = 4.0,
    min_shape: Annotated[Optional[str], typer.Option("--min-shape", help="trt: NxCxHxW of the optimization profile.")] = None,
    opt_shape: Annotated[Optional[str], typer.Option("--opt-shape", help="trt: NxCxHxW.")] = None,
    max_shape: Annotated[Optional[str], typer.Option("--max-shape", help="trt: NxCxHxW.")] = None,
    sparsity: Annotated[bool, typer.Option("--sparsity", help="trt: allow 2:4 sparse kernels (Ampere+).")] = False,
    timing_cache: Annotated[Optional[Path], typer.Option("--timing-cache", help="trt: timing cache file to reuse and update.")] = None,
    version_compatible: Annotated[bool, typer.Option("--version-compatible", help="trt: version-compatible engine.")] = False,
    dla_core: Annotated[Optional[int], typer.Option("--dla-core", help="trt: build for this DLA core (Jetson; fp16/int8, static shapes).")] = None,
    weakly_typed: Annotated[bool, typer.Option("--weakly-typed", help="trt: TensorRT 10.x fallback with FP16/INT8 builder flags.")] = False,
    min_agreement: Annotated[Optional[float], typer.Option("--min-agreement", help="int8: held-out agreement to reach by falling back layers (default: the int8 preset).")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Export a checkpoint to ONNX; refuses to write a graph whose outputs differ from PyTorch."""
    if format not in FORMATS:
        raise VitsegError(f"--format {format} is unknown", f"use one of: {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise VitsegError(f"--precision {precision} is unknown", f"use one of: {', '.join(PRECISIONS)}")
    if format == "trt":  # no TensorRT or no GPU: say so before any other work
        from vitseg_export.export.tensorrt_engine import require_tensorrt

        require_tensorrt()
    if format == "trt" and checkpoint.endswith(".onnx"):
        _engine(Path(checkpoint), output, workspace, min_shape, opt_shape, max_shape, sparsity, timing_cache,
                version_compatible, dla_core, weakly_typed, json_output)
        return
    from vitseg_export.checkpoint import load_checkpoint
    from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx
    from vitseg_export.export.precision import Int8Settings
    from vitseg_export.parity import PRESETS

    size = parse_size(image_size) if image_size else None
    loaded = load_checkpoint(checkpoint)
    settings = OnnxExportSettings(precision=precision, opset=opset, image_size=size, dynamic_batch=dynamic_batch,
                                  dynamic_size=dynamic_size, outputs=outputs, simplify=simplify, fp16_io=fp16_io,
                                  fold=not no_fold)
    int8 = Int8Settings(calib=calib, calib_images=calib_images, method=calib_method,
                        target=target or ("trt" if format == "trt" else "cpu"),
                        min_agreement=min_agreement if min_agreement is not None else PRESETS["int8"].min_agreement,
                        min_miou_vs_reference=PRESETS["int8"].min_miou_vs_reference)
    path = default_artifact_path(checkpoint, loaded.meta.architecture, precision) if output is None or format == "trt" else output
    if format == "trt" and output is not None:
        path = output.with_suffix(".onnx")
    with status("export") as update:
        result = export_onnx(loaded, path, settings, progress=lambda m: (update(m), err_console.print(f"  {m}")), int8=int8)
    m = result.manifest
    lint = []
    if check_trt or format == "trt":
        from vitseg_export.export.trt_lint import lint_for_tensorrt

        lint = lint_for_tensorrt(result.model_proto)
    if format == "trt":
        if lint:
            raise VitsegError(f"{path.name} has {len(lint)} TensorRT incompatibilities; first: {lint[0]}", "fix the graph or use --format onnx")
        _engine(path, output or path.with_suffix(".engine"), workspace, min_shape, opt_shape, max_shape, sparsity,
                timing_cache, version_compatible, dla_core, weakly_typed, json_output)
        return
    if json_output:
        if check_trt:
            m = {**m, "trt_lint": [str(p) for p in lint]}
        print_json({"artifact": str(path), **m})
        return
    parity = m["self_parity"]
    if precision == "int8":
        q = m["int8"]
        share = q["int8_mac_share"]
        console.print(f"int8 ({q['target']} target): {share * 100:.1f}% of MACs run in int8, "
                      f"{len(q['fallback_layers'])} layers fell back to float"
                      + (" [bold yellow](mostly float: most compute is NOT int8)[/]" if share < 0.5 else ""))
        for row in q["fallback_layers"]:
            console.print(f"  float: {row['node']} ({row['reason']})", soft_wrap=True)
    elif precision == "fp16":
        console.print(f"fp16 with fp32 islands: {', '.join(m['fp16']['fp32_islands'])}; I/O {m['fp16']['io_dtype']}")
    if check_trt:
        if lint:
            for problem in lint:
                console.print(f"  TensorRT: {problem}", soft_wrap=True)
            raise VitsegError(f"{path.name} has {len(lint)} TensorRT parser incompatibilities (listed above)",
                              "the ONNX artifact itself is valid for onnxruntime; fix the graph before building an engine")
        console.print("TensorRT lint: every op and attribute is supported by the TensorRT ONNX parser")
    console.print(f"wrote {path} ({m['size_bytes'] / 1e6:.2f} MB, opset {m['metadata']['opset']}, "
                  f"outputs {', '.join(m['metadata']['outputs'])}) and {path.name}.json")
    line = f"self-parity vs PyTorch on {parity['images']} inputs: agreement {parity['pixel_agreement'] * 100:.4f}%"
    if parity["max_abs_logit_diff"] is not None:
        line += f", max |logit diff| {parity['max_abs_logit_diff']:.2e}"
    console.print(line)


def _shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise VitsegError(f"shape '{text}' is not NxCxHxW", "e.g. 1x3x512x512") from None


def _engine(onnx_path: Path, output: Optional[Path], workspace: float, min_shape, opt_shape, max_shape, sparsity: bool,
            timing_cache: Optional[Path], version_compatible: bool, dla_core: Optional[int], weakly_typed: bool,
            json_output: bool) -> None:
    from vitseg_export.export.tensorrt_engine import EngineSettings, engine_from_onnx

    engine_path = output or onnx_path.with_suffix(".engine")
    settings = EngineSettings(workspace_gb=workspace, min_shape=_shape(min_shape), opt_shape=_shape(opt_shape),
                              max_shape=_shape(max_shape), sparsity=sparsity, timing_cache=timing_cache,
                              version_compatible=version_compatible, dla_core=dla_core, weakly_typed=weakly_typed)
    with status("tensorrt") as update:
        manifest = engine_from_onnx(onnx_path, engine_path, settings, progress=update)
    if json_output:
        print_json({"artifact": str(engine_path), **manifest})
        return
    console.print(f"wrote {engine_path} ({manifest['size_bytes'] / 1e6:.2f} MB, TensorRT {manifest['tensorrt_version']}, "
                  f"{manifest['gpu']} sm {manifest['compute_capability']}, "
                  f"{'strongly' if manifest['strongly_typed'] else 'weakly'} typed) and {engine_path.name}.json")
