"""`vitseg export`: checkpoint -> ONNX artifact (+ manifest), parity-checked before it is written."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vitseg_export.cli.common import JsonFlag, console, err_console, parse_size, print_json, status
from vitseg_export.errors import VitsegError

FORMATS = ("onnx",)
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
    fp16_io: Annotated[bool, typer.Option("--fp16-io", help="fp16: float16 graph input/output (default float32).")] = False,
    calib: Annotated[str, typer.Option("--calib", help="int8: calibration data spec (its calib split).")] = "synthetic",
    calib_images: Annotated[int, typer.Option("--calib-images", min=1, help="int8: calibration images.")] = 32,
    calib_method: Annotated[str, typer.Option("--calib-method", help="int8: minmax, entropy or percentile.")] = "minmax",
    target: Annotated[str, typer.Option("--target", help="int8: cpu (ONNX Runtime) or trt (TensorRT: float part in fp16).")] = "cpu",
    min_agreement: Annotated[Optional[float], typer.Option("--min-agreement", help="int8: held-out agreement to reach by falling back layers (default: the int8 preset).")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Export a checkpoint to ONNX; refuses to write a graph whose outputs differ from PyTorch."""
    if format not in FORMATS:
        raise VitsegError(f"--format {format} is not available in this version", f"use one of: {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise VitsegError(f"--precision {precision} is not available in this version", f"use one of: {', '.join(PRECISIONS)}")
    from vitseg_export.checkpoint import load_checkpoint
    from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx
    from vitseg_export.export.precision import Int8Settings
    from vitseg_export.parity import PRESETS

    size = parse_size(image_size) if image_size else None
    loaded = load_checkpoint(checkpoint)
    settings = OnnxExportSettings(precision=precision, opset=opset, image_size=size, dynamic_batch=dynamic_batch,
                                  dynamic_size=dynamic_size, outputs=outputs, simplify=simplify, fp16_io=fp16_io)
    int8 = Int8Settings(calib=calib, calib_images=calib_images, method=calib_method, target=target,
                        min_agreement=min_agreement if min_agreement is not None else PRESETS["int8"].min_agreement,
                        min_miou_vs_reference=PRESETS["int8"].min_miou_vs_reference)
    path = output or default_artifact_path(checkpoint, loaded.meta.architecture, precision)
    with status("export") as update:
        result = export_onnx(loaded, path, settings, progress=lambda m: (update(m), err_console.print(f"  {m}")), int8=int8)
    m = result.manifest
    if json_output:
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
    console.print(f"wrote {path} ({m['size_bytes'] / 1e6:.2f} MB, opset {m['metadata']['opset']}, "
                  f"outputs {', '.join(m['metadata']['outputs'])}) and {path.name}.json")
    console.print(f"self-parity vs PyTorch on {parity['images']} inputs: agreement {parity['pixel_agreement'] * 100:.4f}%, "
                  f"max |logit diff| {parity['max_abs_logit_diff']:.2e}" if parity["max_abs_logit_diff"] is not None else
                  f"self-parity vs PyTorch on {parity['images']} inputs: agreement {parity['pixel_agreement'] * 100:.4f}%")
