"""fp32 ONNX -> fp16 or int8 ONNX. Precision is decided in the graph itself, so every backend
(ONNX Runtime, strongly typed TensorRT) runs exactly what the graph states.

fp16: onnxruntime's `convert_float_to_float16`, with fp32 islands where fp16 is unsafe (below),
fp32 graph inputs/outputs unless `fp16_io`.

int8: onnxruntime's `quantize_static` in QDQ form, symmetric (zero point 0), per-channel weights on
the output-channel axis, per-tensor activations, only Conv/MatMul/Gemm inputs quantized (LayerNorm,
Softmax, GELU, residual Adds stay float). Ranges are cached, so re-quantizing with other exclusions
does not re-calibrate. When held-out agreement misses the target, the most sensitive layers
(logit SQNR with only that layer quantized) fall back to float until it is met.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

# fp32 islands in fp16 graphs. LayerNormalization: the mean/variance of 768-wide ViT tokens overflow
# fp16's 65504 when squared (the well-known TensorRT ViT failure); ReduceMean/Pow/Sqrt cover decomposed
# norms. Softmax: exp-sum accumulation over long sequences (SegFormer stage 1 has H/4*W/4 queries).
# Resize stays fp32: it produces the full-resolution logits the argmax reads.
FP16_ISLANDS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Resize")

QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")
CALIB_METHODS = ("minmax", "entropy", "percentile")
TARGETS = ("cpu", "trt")


def onnx_fp16(model: onnx.ModelProto, fp16_io: bool = False, islands: tuple[str, ...] = FP16_ISLANDS) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = convert_float_to_float16(copy.deepcopy(model), keep_io_types=not fp16_io, op_block_list=list(islands))
    _dedupe_casts(converted)
    wrapped = OnnxModel(converted)
    wrapped.topological_sort()  # the converter appends its Casts at the end; ONNX requires sorted nodes
    return wrapped.model


def _dedupe_casts(model: onnx.ModelProto) -> None:
    """The converter inserts one Cast per blocked consumer of a tensor, all with the same node and output
    name; identical ones are one Cast (kept once), so the graph stays valid SSA."""
    seen: dict[str, onnx.NodeProto] = {}
    keep = []
    for node in model.graph.node:
        if node.name in seen:
            first = seen[node.name]
            if (node.op_type, list(node.input), list(node.output)) == (first.op_type, list(first.input), list(first.output)):
                continue
            node.name = f"{node.name}_{len(keep)}"
        seen[node.name] = node
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


# ---- int8 ---------------------------------------------------------------------------------------

@dataclass
class Int8Settings:
    calib: str = "synthetic"
    calib_images: int = 32
    method: str = "minmax"
    target: str = "cpu"
    min_agreement: float = 0.99
    min_miou_vs_reference: float = 0.98
    heldout: str = "synthetic"
    heldout_images: int = 16
    max_fallback: int = 64


@dataclass
class Int8Result:
    model: onnx.ModelProto
    fallback: list[dict] = field(default_factory=list)
    quantized_nodes: list[str] = field(default_factory=list)
    int8_mac_share: float = 0.0
    heldout_agreement: float = 0.0
    heldout_miou_vs_reference: float = 0.0
    calibration: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)


def _quant_options(target: str):
    """(activation type, weight type, per_channel, extra options) per target; both symmetric int8 (zero
    point 0), per-tensor activations.

    trt: per-channel weights on the output-channel axis, no int32 bias (the TensorRT parser's
    DequantizeLinear takes int8), dedicated Q/DQ pairs. cpu: per-tensor weights and int32 biases, which
    onnxruntime's CPU provider fuses into integer kernels more often: measured on a 2-core AVX2 EPYC,
    vit-seg-base 128px int8 ran 110 ms per-tensor vs 253 ms per-channel (fp32: 74 ms), SegFormer-B0
    512px 184 vs 248 ms, at the same agreement.
    """
    from onnxruntime.quantization import QuantType

    common = {"ActivationSymmetric": True, "WeightSymmetric": True}
    if target == "trt":
        return QuantType.QInt8, QuantType.QInt8, True, {**common, "QuantizeBias": False, "DedicatedQDQPair": True}
    return QuantType.QInt8, QuantType.QInt8, False, {**common, "QuantizeBias": True}


class _Reader:
    """onnxruntime CalibrationDataReader over preprocessed images (same preprocessing as inference)."""

    def __init__(self, batches: list[np.ndarray]):
        self.batches = batches
        self.index = 0

    def get_next(self):
        if self.index >= len(self.batches):
            return None
        self.index += 1
        return {"pixels": self.batches[self.index - 1]}

    def rewind(self):
        self.index = 0

    def __len__(self):
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int):
        self.batches = self.batches[start_index:end_index]


def load_images(spec: str, split: str, count: int, size: tuple[int, int]) -> tuple[np.ndarray, list[str], list, object]:
    from vitseg_export.artifact import pixels_from_image
    from vitseg_export.data.sources import open_source
    from vitseg_export.errors import DataError

    source = open_source(spec, split)
    n = min(count, len(source))
    if n == 0:
        raise DataError(f"{spec} has no images for {split}", "pass a data spec with images")
    samples = [source[i] for i in range(n)]
    pixels = np.stack([pixels_from_image(s.image, size) for s in samples])
    return pixels, [s.name for s in samples], samples, source


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES]


def node_macs(model: onnx.ModelProto, pixels: np.ndarray) -> dict[str, int]:
    """Multiply-accumulates of every Conv/MatMul/Gemm at batch 1, from one ONNX Runtime run that
    exposes their inputs and outputs (works for any graph, dynamic axes included)."""
    import onnxruntime as ort

    m = copy.deepcopy(model)
    targets = [n for n in m.graph.node if n.op_type in QUANTIZED_OP_TYPES]
    existing = {o.name for o in m.graph.output}
    inits = {i.name: tuple(i.dims) for i in m.graph.initializer}
    wanted = []
    for n in targets:
        for name in list(n.input[:2]) + [n.output[0]]:
            if name and name not in inits and name not in existing and name not in wanted and name != "pixels":
                wanted.append(name)
    for name in wanted:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(None, {"pixels": pixels[:1]})))
    shape = lambda name: inits[name] if name in inits else (pixels.shape if name == "pixels" else values[name].shape)  # noqa: E731
    macs = {}
    for n in targets:
        out = shape(n.output[0])
        if n.op_type == "Conv":
            w = shape(n.input[1])
            macs[n.name] = int(np.prod(out)) * int(np.prod(w[1:]))
        else:  # MatMul / Gemm: every output element takes K multiply-adds
            a = shape(n.input[0])
            trans_a = any(at.name == "transA" and at.i for at in n.attribute)
            k = a[-2] if trans_a else a[-1]
            macs[n.name] = int(np.prod(out)) * int(k)
    return macs


def restore_float_consumers(model: onnx.ModelProto) -> int:
    """Give every non-quantized consumer of an activation back its float input.

    onnxruntime's QDQ quantizer, when a tensor has one quantized consumer, rewires ALL consumers to the
    dequantized value, so Reshape/Transpose/Add/Resize/Div would read int8-rounded data although only
    Conv/MatMul/Gemm inputs are meant to be quantized. Returns the number of inputs restored.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    initializers = {i.name for i in model.graph.initializer}
    float_source = {}
    for dq in model.graph.node:
        if dq.op_type != "DequantizeLinear":
            continue
        q = producers.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in initializers:
            float_source[dq.output[0]] = q.input[0]
    restored = 0
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OP_TYPES or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if name in float_source:
                node.input[i] = float_source[name]
                restored += 1
    return restored


def _sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.mean((ref.astype(np.float64) - got) ** 2))
    signal = float(np.mean(ref.astype(np.float64) ** 2))
    return 10 * math.log10(signal / noise) if noise > 0 else float("inf")


def _run(model: onnx.ModelProto, batches: list[np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_outputs()[0].name
    assert name == "logits"
    return np.concatenate([sess.run(["logits"], {"pixels": b})[0].astype(np.float32) for b in batches])


def quantize_int8(model: onnx.ModelProto, size: tuple[int, int], settings: Int8Settings, cache_dir: Path | None = None,
                  progress: Callable[[str], None] = lambda m: None) -> Int8Result:
    """`model` must output `logits` first (vitseg's fp32 export)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    from vitseg_export.errors import VitsegError
    from vitseg_export.parity import _confusion, miou

    if settings.method not in CALIB_METHODS:
        raise VitsegError(f"--calib-method {settings.method} is unknown", f"use one of {', '.join(CALIB_METHODS)}")
    if settings.target not in TARGETS:
        raise VitsegError(f"--target {settings.target} is unknown", f"use one of {', '.join(TARGETS)}")
    if model.graph.output[0].name != "logits":
        raise VitsegError("int8 export needs the logits output", "export with --outputs logits or both")
    calib, calib_names, _, calib_source = load_images(settings.calib, "calib", settings.calib_images, size)
    heldout, _, _, _ = load_images(settings.heldout, "val", settings.heldout_images, size)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[settings.method]
    act_type, weight_type, per_channel, extra = _quant_options(settings.target)
    image_list_hash = hashlib.sha256("\n".join(calib_names).encode()).hexdigest()[:16]
    model_hash = hashlib.sha256(model.SerializeToString()).hexdigest()[:16]
    own_cache = cache_dir is None
    cache_dir = Path(tempfile.mkdtemp(prefix="vitseg-calib-")) if own_cache else cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir / f"ranges-{model_hash}-{image_list_hash}-{settings.method}.json"
    calib_batches = [calib[i:i + 1] for i in range(len(calib))]
    if settings.method != "minmax":
        extra = {**extra, "CalibTensorRangeSymmetric": True}

    # quantize_static rewrites a ModelProto it is given into external-data form: hand it a file instead.
    work = Path(tempfile.mkdtemp(prefix="vitseg-int8-"))
    fp32_path = work / "fp32.onnx"
    onnx.save(model, fp32_path)

    def quantize(exclude: list[str], include: list[str] | None = None) -> onnx.ModelProto:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            out = Path(tmp) / "q.onnx"
            quantize_static(
                fp32_path, out, _Reader(calib_batches), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OP_TYPES), per_channel=per_channel, reduce_range=False,
                activation_type=act_type, weight_type=weight_type, nodes_to_exclude=exclude,
                nodes_to_quantize=include, calibrate_method=method, extra_options=extra, calibration_cache_path=cache)
            quantized_model = onnx.load(out)
        restore_float_consumers(quantized_model)
        return quantized_model

    import logging

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static warns about pre-processing on every call
    progress(f"calibrating on {len(calib)} images ({settings.method})")
    heldout_batches = [heldout[i:i + 1] for i in range(len(heldout))]
    reference = _run(model, heldout_batches)
    ref_mask = reference.argmax(1)
    candidates = quantizable_nodes(model)
    macs = node_macs(model, heldout[:1])

    num_classes = reference.shape[1]

    def score(q: onnx.ModelProto) -> tuple[float, float]:
        """(pixel agreement, mIoU vs reference) on the held-out images."""
        mask = _run(q, heldout_batches).argmax(1)
        return float((mask == ref_mask).mean()), miou(_confusion(mask, ref_mask, num_classes))

    def meets(s: tuple[float, float]) -> bool:
        return s[0] >= settings.min_agreement and s[1] >= settings.min_miou_vs_reference

    def describe(s: tuple[float, float]) -> str:
        return f"agreement {s[0] * 100:.3f}%, mIoU vs fp32 {s[1] * 100:.2f}"

    excluded: list[str] = []
    quantized = quantize(excluded)
    current = score(quantized)
    progress(f"int8 held-out {describe(current)} (targets {settings.min_agreement * 100:.2f}% / "
             f"{settings.min_miou_vs_reference * 100:.2f})")
    fallback: list[dict] = []
    if not meets(current):
        progress(f"measuring the sensitivity of {len(candidates)} layers")
        probe = heldout_batches[:4]
        probe_ref = reference[: len(probe)]
        sensitivity = []
        for name in candidates:
            single = quantize([], include=[name])
            sensitivity.append((_sqnr_db(probe_ref, _run(single, probe)), name))
        sensitivity.sort()
        step = 1
        while not meets(current) and len(excluded) < min(settings.max_fallback, len(sensitivity)):
            for sqnr, name in sensitivity[len(excluded):len(excluded) + step]:
                excluded.append(name)
                fallback.append({"node": name, "sqnr_db_alone": round(sqnr, 2), "macs": macs.get(name, 0),
                                 "reason": f"most sensitive remaining layer (logit SQNR {sqnr:.1f} dB when quantized alone)"})
            quantized = quantize(excluded)
            current = score(quantized)
            progress(f"{len(excluded)} layers in float: {describe(current)}")
            step *= 2
        if not meets(current):
            raise VitsegError(f"int8 could not reach the int8 targets on held-out images ({describe(current)} "
                              f"with {len(excluded)} layers in float)",
                              "calibrate on more representative images, try --calib-method entropy, or use fp16")
        fallback[-1]["after"] = describe(current)
    shutil.rmtree(work, ignore_errors=True)
    total = sum(macs.values())
    int8_macs = sum(v for k, v in macs.items() if k not in excluded)
    if settings.target == "trt":
        # The float part in fp16 (strongly typed TensorRT runs what the graph states); Q/DQ stay fp32
        # (opset-17 DequantizeLinear has fp32 scales), joined to the fp16 part by Casts.
        quantized = onnx_fp16(quantized, islands=FP16_ISLANDS + ("QuantizeLinear", "DequantizeLinear"))
        current = score(quantized)
    return Int8Result(
        model=quantized,
        fallback=fallback,
        quantized_nodes=[c for c in candidates if c not in excluded],
        int8_mac_share=int8_macs / total if total else 0.0,
        heldout_agreement=current[0],
        heldout_miou_vs_reference=current[1],
        calibration={"source": calib_source.description, "images": len(calib), "image_list_sha256": image_list_hash,
                     "method": settings.method, "cache": None if own_cache else str(cache),
                     "ranges": json.loads(cache.read_text()) if cache.is_file() else None},
        settings={"calib": settings.calib, "calib_images": settings.calib_images, "method": settings.method,
                  "target": settings.target, "min_agreement": settings.min_agreement,
                  "min_miou_vs_reference": settings.min_miou_vs_reference, "heldout": settings.heldout,
                  "heldout_images": len(heldout), "activation_type": "int8 symmetric per-tensor",
                  "weight_type": "int8 symmetric " + ("per-channel (output-channel axis)" if per_channel else "per-tensor"),
                  "extra_options": extra},
    )
