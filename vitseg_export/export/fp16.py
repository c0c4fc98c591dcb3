"""fp32 ONNX -> fp16 ONNX with NVIDIA Model Optimizer's AutoCast: data-driven fp32 islands. AutoCast runs
the graph on real images and keeps in fp32 the nodes whose values exceed 512 (where fp16's 10-bit mantissa
and 65504 range start to bite: large LayerNorm statistics, exp-sums) or whose initializers do not fit
fp16; everything else becomes fp16, with as few Casts as that needs. fp32 graph inputs/outputs unless
`fp16_io`. Precision is decided in the graph itself, so every backend (ONNX Runtime, strongly typed
TensorRT) runs exactly what the graph states. The nodes kept in fp32 are listed in the manifest.

The bf16 precision's TensorRT graph comes from the same AutoCast call with bf16 (`bf16_conversion`): bf16 keeps
fp32's range, so only --keep-float modules stay fp32.

Measured on a trained SegFormer-B0 at 128 px: onnxruntime's converter with a fixed op list (LayerNorm,
Softmax, Resize...) left 90 Casts for 99.997% agreement; AutoCast 35 Casts for 99.994%."""

from __future__ import annotations

import collections
import re
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from vitseg_export.compare.inputs import load_inputs
from vitseg_export.export.graph import remove_dead_nodes
from vitseg_export.export.quiet import library_output_on_stderr
from vitseg_export.precisions import Conversion, ConversionContext
from vitseg_export.runners.base import require_module

DATA_MAX = 512.0  # AutoCast: a node whose values exceed this stays in fp32
BF16_DATA_MAX = 3.0e38  # bf16 has fp32's exponent: no value is too large for it (AutoCast's limit, never reached)


def fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the compute nodes of a mixed-precision graph that still produce float32 (Casts excluded)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    return [n.name for n in model.graph.node if n.op_type not in ("Cast", "Constant", "Shape")
            and any(types.get(o) == onnx.TensorProto.FLOAT for o in n.output)]


def onnx_fp16(model: onnx.ModelProto, pixels: np.ndarray, fp16_io: bool = False,
              keep: Callable[[str], bool] | None = None, low: str = "fp16") -> tuple[onnx.ModelProto, dict]:
    """(fp16 graph, manifest details) from vitseg's fp32 graph; `pixels` (N,3,H,W) are the images AutoCast
    measures value ranges on; nodes `keep` selects stay fp32 (--keep-float). `low="bf16"`: a bf16 graph, where only
    `keep` stays fp32 (bf16 has fp32's range: no value is too large for it). Raises BackendMissingError without
    Model Optimizer."""
    excluded = [f"^{re.escape(n.name)}$" for n in model.graph.node if keep is not None and keep(n.name)]
    # imported before the quiet block, so that the loggers AutoCast configures on import (INFO and WARNING lines
    # such as "Did not find  in value info map") exist when the block lowers their levels
    autocast = require_module("modelopt.onnx.autocast", "fp16 export needs NVIDIA Model Optimizer (AutoCast)",
                              "pip install 'vitseg-export[torch]' (it brings nvidia-modelopt)")
    with tempfile.TemporaryDirectory(prefix="vitseg-fp16-") as tmp, library_output_on_stderr():
        onnx.save(model, Path(tmp) / "fp32.onnx")
        np.savez(Path(tmp) / "calibration.npz", pixels=pixels)
        converted = autocast.convert_to_mixed_precision(
            onnx_path=str(Path(tmp) / "fp32.onnx"), low_precision_type=low, data_max=DATA_MAX if low == "fp16" else BF16_DATA_MAX,
            keep_io_types=not fp16_io, calibration_data=str(Path(tmp) / "calibration.npz"), providers=["cpu"],
            nodes_to_exclude=excluded or None)
    remove_dead_nodes(converted)
    kept = fp32_nodes(converted)
    by_op = collections.Counter(n.op_type for n in converted.graph.node if n.name in set(kept))
    converter = "modelopt.onnx.autocast (data_max 512)" if low == "fp16" else "modelopt.onnx.autocast (bf16)"
    return converted, {"converter": converter, "io_dtype": "float16" if fp16_io else "float32",
                       "fp32_nodes": kept, "fp32_ops": dict(by_op), "calibration_images": len(pixels),
                       **({"kept_float_nodes": len(excluded)} if excluded else {})}


def fp16_conversion(model: onnx.ModelProto, ctx: ConversionContext) -> Conversion:
    """The fp16 precision's converter (precisions.py): AutoCast on 8 images of the data spec's calib split."""
    ctx.progress("converting to fp16 (AutoCast: fp32 where values exceed 512)")
    images = load_inputs(ctx.data, "calib", 8, ctx.image_size).images
    keep = ctx.scopes.selector(ctx.keep_float) if ctx.keep_float else None
    converted, details = onnx_fp16(model, np.concatenate([im.pixels[None] for im in images]), ctx.fp16_io, keep)
    if ctx.keep_float:
        details["keep_float"] = list(ctx.keep_float)
    return Conversion(converted, details)


def bf16_conversion(model: onnx.ModelProto, ctx: ConversionContext) -> Conversion:
    """The bf16 precision's converter for TensorRT engines (precisions.py): AutoCast with bf16, every node bf16 but
    the --keep-float modules, float32 inputs and outputs. ONNX Runtime's CPU provider runs the result emulated
    (runners/bf16_emulation.py); TensorRT builds it strongly typed."""
    ctx.progress("converting to bf16 (AutoCast: every node bf16 but --keep-float modules)")
    images = load_inputs(ctx.data, "calib", 2, ctx.image_size).images  # AutoCast runs the graph once; bf16 keeps every range
    keep = ctx.scopes.selector(ctx.keep_float) if ctx.keep_float else None
    converted, details = onnx_fp16(model, np.concatenate([im.pixels[None] for im in images]), False, keep, low="bf16")
    if ctx.keep_float:
        details["keep_float"] = list(ctx.keep_float)
    return Conversion(converted, details)


def describe_fp16(details: dict) -> list[str]:
    """What `vitseg export` prints about an fp16 manifest section (an AutoCast graph's fp32 islands)."""
    if "fp32_nodes" not in details:  # fp16 weights of an IR: nothing converted in the graph
        return []
    ops = ", ".join(f"{op} {n}" for op, n in details["fp32_ops"].items()) or "none"
    low = "bf16" if "bf16" in details["converter"] else "fp16"
    return [f"{low} (AutoCast): {len(details['fp32_nodes'])} nodes kept in fp32 ({ops}); I/O {details['io_dtype']}"]
