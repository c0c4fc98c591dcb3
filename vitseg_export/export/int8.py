"""fp32 ONNX -> int8 ONNX: onnxruntime's `quantize_static` in QDQ form, symmetric (zero point 0),
per-tensor activations, only Conv/MatMul/Gemm inputs quantized (LayerNorm, Softmax, GELU, residual Adds
stay float). Ranges are cached, so re-quantizing with other exclusions does not re-calibrate. When
held-out agreement misses the target, the most sensitive layers (logit SQNR with only that layer
quantized) fall back to float until it is met. Scoring runs through the one comparator.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from vitseg_export.comparator import InputSet, RecordedOutputs, compare, load_inputs, record
from vitseg_export.errors import VitsegError
from vitseg_export.export.graph import remove_dead_nodes, to_float
from vitseg_export.export.quiet import library_output_on_stderr
from vitseg_export.files import atomic_write_bytes
from vitseg_export.export.settings import CALIB_METHODS, INT8_TARGETS, Int8Settings
from vitseg_export.parity import Thresholds
from vitseg_export.runners.onnxruntime_runner import graph_runner, session_options

QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")
# --target cpu: ONNX Runtime's CPU provider runs int8 MatMul/Gemm in integer kernels (MatMulIntegerToFloat,
# QLinearMatMul), but left SegFormer's convolutions (patch embeddings, sequence reduction, depthwise) as
# DequantizeLinear + float Conv: measured at 512 px, quantized Convs took 31 ms + 17 ms of dequantization
# against 12 ms in fp32. So only MatMul/Gemm are quantized for the CPU.
CPU_QUANTIZED_OP_TYPES = ("MatMul", "Gemm")
# Both targets keep attention's activation x activation MatMuls (Q.K^T, softmax.V) in float: per-tensor
# int8 has one step of max/127, and softmax probabilities of ~1/keys fall under it at long sequences.
# Measured on a trained SegFormer-B0 at 512 px (256 keys in stage 1), Model Optimizer int8: 83.9% mask
# agreement with them quantized (64 layers returned to float by the fallback still gave 92.5%), 99.77%
# without; they hold a small share of the MACs.


def attention_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose inputs are both activations (no initializer or Constant among them)."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not constants & set(n.input)]

__all__ = ["Int8Result", "Int8Settings", "QUANTIZED_OP_TYPES", "node_macs", "quantize_int8", "restore_float_consumers"]


@dataclass
class Int8Result:
    model: onnx.ModelProto
    fallback: list[dict] = field(default_factory=list)
    quantized_nodes: list[str] = field(default_factory=list)
    int8_mac_share: float = 0.0
    heldout_agreement: float = 0.0
    heldout_miou_vs_reference: float = 0.0
    heldout: dict = field(default_factory=dict)  # where the held-out images that decided the fallback came from
    calibration: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def details(self) -> dict:
        """The manifest's `int8` section."""
        return {"target": self.settings["target"], "int8_mac_share": self.int8_mac_share,
                "quantized_nodes": len(self.quantized_nodes), "fallback_layers": self.fallback,
                "heldout": self.heldout, "heldout_agreement": self.heldout_agreement,
                "heldout_miou_vs_reference": self.heldout_miou_vs_reference,
                "calibration": self.calibration, "quantization": self.settings,
                "float_part": "fp16" if self.settings["target"] == "trt" else "fp32"}


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
    return QuantType.QInt8, QuantType.QInt8, False, {**common, "QuantizeBias": False}


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


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes int8 quantizes (Conv/MatMul/Gemm)."""
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES]


def node_macs(model: onnx.ModelProto, pixels: np.ndarray) -> dict[str, int]:
    """Multiply-accumulates of every Conv/MatMul/Gemm at batch 1, from one ONNX Runtime run that
    exposes their inputs and outputs (works for any graph, dynamic axes included)."""
    import onnxruntime as ort

    m = copy.deepcopy(model)
    targets = [n for n in m.graph.node if n.op_type in QUANTIZED_OP_TYPES]
    existing = {o.name for o in m.graph.output}
    inits = {i.name: tuple(i.dims) for i in m.graph.initializer}
    wanted: list[str] = []
    for n in targets:
        for name in list(n.input[:2]) + [n.output[0]]:
            if name and name not in inits and name not in existing and name not in wanted and name != "pixels":
                wanted.append(name)
    for name in wanted:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = ort.InferenceSession(m.SerializeToString(), session_options(optimize=False), providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"pixels": pixels[:1]})))
    shape = lambda name: inits[name] if name in inits else (pixels.shape if name == "pixels" else values[name].shape)  # noqa: E731
    macs = {}
    for n in targets:
        out = shape(n.output[0])
        if n.op_type == "Conv":
            macs[n.name] = int(np.prod(out)) * int(np.prod(shape(n.input[1])[1:]))
        else:  # MatMul / Gemm: every output element takes K multiply-adds
            a = shape(n.input[0])
            trans_a = any(at.name == "transA" and at.i for at in n.attribute)
            macs[n.name] = int(np.prod(out)) * int(a[-2] if trans_a else a[-1])
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


class _OrtQuantizer:
    """--target cpu: ONNX Runtime's quantize_static over one fp32 graph (saved to a work dir: it rewrites
    ModelProtos it is handed into external-data form), with a range cache."""

    name = "onnxruntime.quantization.quantize_static"

    def __init__(self, model: onnx.ModelProto, calib: InputSet, settings: Int8Settings, work: Path, cache: Path):
        from onnxruntime.quantization import CalibrationMethod

        self.fp32_path = work / "fp32.onnx"
        onnx.save(model, self.fp32_path)
        self.work, self.cache = work, cache
        self.excluded = attention_matmuls(model)
        self.batches = [im.pixels[None] for im in calib.images]
        self.method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}[settings.method]
        self.act_type, self.weight_type, self.per_channel, self.extra = _quant_options(settings.target)
        if settings.method != "minmax":
            self.extra = {**self.extra, "CalibTensorRangeSymmetric": True}

    def __call__(self) -> onnx.ModelProto:
        from onnxruntime.quantization import QuantFormat, quantize_static

        with tempfile.TemporaryDirectory(dir=self.work) as tmp, library_output_on_stderr():
            out = Path(tmp) / "q.onnx"
            quantize_static(
                self.fp32_path, out, _Reader(self.batches), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(CPU_QUANTIZED_OP_TYPES), nodes_to_exclude=self.excluded,
                per_channel=self.per_channel, reduce_range=True,
                activation_type=self.act_type, weight_type=self.weight_type, calibrate_method=self.method,
                extra_options=self.extra, calibration_cache_path=self.cache)
            quantized = onnx.load(out)
        restore_float_consumers(quantized)
        return quantized

    def record(self) -> dict:
        """How the graph was quantized (the manifest's `quantization`)."""
        return {"quantizer": self.name, "activation_type": "int8 symmetric per-tensor",
                "weight_type": "int8 symmetric " + ("per-channel (output-channel axis)" if self.per_channel else "per-tensor"),
                "attention_matmuls": f"float ({len(self.excluded)} activation x activation MatMuls excluded)",
                "extra_options": self.extra}


@contextlib.contextmanager
def _ort_quantization_restored() -> Iterator[None]:
    """Model Optimizer monkeypatches ONNX Runtime's quantization classes (calibrators, quantizers) for the
    whole process and never puts them back; a later --target cpu quantization then fails. Snapshot every
    class and module attribute of those modules, and restore what changed."""
    import importlib

    saved: list[tuple[Any, dict]] = []
    for name in ("calibrate", "base_quantizer", "qdq_quantizer", "onnx_quantizer", "quantize"):
        module = importlib.import_module(f"onnxruntime.quantization.{name}")
        saved.append((module, dict(vars(module))))
        saved += [(cls, dict(vars(cls))) for cls in vars(module).values()
                  if isinstance(cls, type) and cls.__module__ == module.__name__]
    try:
        yield
    finally:
        for owner, attrs in saved:
            for key, value in attrs.items():
                if vars(owner).get(key) is not value and not key.startswith("__"):
                    setattr(owner, key, value)
            if isinstance(owner, type) and vars(owner).get("__init__") is not attrs.get("__init__", vars(owner).get("__init__")):
                setattr(owner, "__init__", attrs["__init__"])


class _ModelOptQuantizer:
    """--target trt: NVIDIA Model Optimizer's ONNX PTQ (what NVIDIA documents for TensorRT): symmetric int8
    Q/DQ where TensorRT fuses them, the float part in fp16, no int32 bias, few Casts. Calibrates on the CPU
    (ONNX Runtime's CPU provider)."""

    name = "modelopt.onnx.quantization.quantize (int8, fp16 elsewhere)"

    def __init__(self, model: onnx.ModelProto, calib: InputSet, settings: Int8Settings, work: Path, cache: Path):
        self.fp32_path, self.out_path = work / "fp32.onnx", work / "q.onnx"
        onnx.save(model, self.fp32_path)
        self.pixels = np.concatenate([im.pixels[None] for im in calib.images])
        self.method = {"minmax": "max", "entropy": "entropy"}.get(settings.method)
        if self.method is None:
            raise VitsegError(f"--calib-method {settings.method} is not offered for --target trt", "use minmax or entropy")

    def __call__(self) -> onnx.ModelProto:
        from vitseg_export.runners.base import require_module

        with library_output_on_stderr(), _ort_quantization_restored():
            quantization = require_module("modelopt.onnx.quantization", "--target trt int8 needs NVIDIA Model Optimizer",
                                          "pip install 'vitseg-export[torch]' (it brings nvidia-modelopt)")
            quantization.quantize(onnx_path=str(self.fp32_path), quantize_mode="int8", calibration_data={"pixels": self.pixels},
                                  calibration_method=self.method, calibration_eps=["cpu"], high_precision_dtype="fp16", dq_only=True,
                                  disable_mha_qdq=True, output_path=str(self.out_path),
                                  log_level="ERROR")
        return onnx.load(self.out_path)

    def record(self) -> dict:
        """How the graph was quantized (the manifest's `quantization`)."""
        return {"quantizer": self.name, "calibration_method": self.method, "high_precision_dtype": "fp16",
                "attention_matmuls": "float (disable_mha_qdq)",
                "activation_type": "int8 symmetric per-tensor", "weight_type": "int8 symmetric per-channel"}


@dataclass
class _Heldout:
    """The held-out images that decide the fallback, and the fp32 graph's logits on them."""

    inputs: InputSet
    reference: RecordedOutputs
    num_classes: int
    size: tuple[int, int]
    targets: Thresholds
    original: onnx.ModelProto  # the fp32 graph: layers returned to float get their original weights back

    def score(self, model: onnx.ModelProto, precision: str = "int8") -> tuple[float, float]:
        """(pixel agreement, mIoU vs reference) of `model` on the held-out images."""
        with graph_runner(model, self.size, self.num_classes, precision) as runner:
            result = compare(self.reference, {"int8": runner}, self.inputs, self.targets, self.num_classes)
        summary = result.comparisons["int8"].summary
        assert summary is not None
        return summary.pixel_agreement, summary.miou_vs_reference

    def meets(self, score: tuple[float, float]) -> bool:
        """Whether a score reaches the targets."""
        return score[0] >= self.targets.min_agreement and score[1] >= self.targets.min_miou_vs_reference


# The fallback aims this share of each error budget inside the targets, so that a fresh sample of the
# same distribution (`vitseg verify` on other images) passes too: on vit-seg-base a graph accepted at
# exactly the targets (mIoU 98.01 on its 64 self-parity images) read 97.89 on verify's 32 other images.
DECISION_GUARD = 0.1


def decision_targets(settings: Int8Settings) -> Thresholds:
    """The held-out thresholds the fallback decides by: the int8 targets moved DECISION_GUARD of their
    error budget inwards (99% agreement -> 99.1%, 98 mIoU -> 98.2)."""
    def inward(target: float) -> float:
        return target + DECISION_GUARD * (1.0 - target)

    return Thresholds(inward(settings.min_agreement), inward(settings.min_miou_vs_reference), None, None)


def _describe(score: tuple[float, float]) -> str:
    return f"agreement {score[0] * 100:.3f}%, mIoU vs fp32 {score[1] * 100:.2f}"


def _sensitivity(quantized: onnx.ModelProto, heldout: _Heldout, candidates: list[str], progress) -> list[tuple[float, str]]:
    """(logit SQNR in dB of the quantized graph with only that layer returned to float, layer) for every
    candidate, the most helpful (highest SQNR) first. One quantized graph serves every probe: no re-calibration."""
    progress(f"measuring the sensitivity of {len(candidates)} layers")
    probe = InputSet(heldout.inputs.source, heldout.inputs.images[:4])
    probe_ref = np.stack(heldout.reference.logits[:len(probe)])
    rows = []
    for name in candidates:
        with graph_runner(to_float(quantized, {name}, heldout.original), heldout.size, heldout.num_classes, "int8") as runner:
            rows.append((_sqnr_db(probe_ref, np.stack(record(runner, probe).logits)), name))
    return sorted(rows, reverse=True)


def _fall_back(quantized: onnx.ModelProto, heldout: _Heldout, candidates: list[str], macs: dict, settings: Int8Settings,
               progress) -> tuple[onnx.ModelProto, list[dict], tuple[float, float]]:
    """Return the fewest of the most helpful layers to float that meet the targets: 1, 2, 4... layers until
    they are met, then bisection between the last count that missed and the first that met."""
    ranked = _sensitivity(quantized, heldout, candidates, progress)[:settings.max_fallback]
    tried: dict[int, tuple[onnx.ModelProto, tuple[float, float]]] = {}

    def attempt(count: int) -> bool:
        model = to_float(quantized, {name for _, name in ranked[:count]}, heldout.original)
        tried[count] = (model, heldout.score(model))
        progress(f"{count} layers in float: {_describe(tried[count][1])}")
        return heldout.meets(tried[count][1])

    low, high = 0, 1
    while high < len(ranked) and not attempt(high):
        low, high = high, min(2 * high, len(ranked))
    if high not in tried and not attempt(high) or not heldout.meets(tried[high][1]):
        raise VitsegError(f"int8 could not reach the int8 targets on held-out images ({_describe(tried[high][1])} "
                          f"with {high} layers in float)",
                          "calibrate on more representative images, try --calib-method entropy, or use fp16")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if attempt(middle) else (middle, high)
    model, current = tried[high]
    fallback = [{"node": name, "sqnr_db_when_float": round(sqnr, 2), "macs": macs.get(name, 0),
                 "reason": f"most helpful remaining layer (logit SQNR {sqnr:.1f} dB with it alone in float)"}
                for sqnr, name in ranked[:high]]
    fallback[-1]["after"] = _describe(current)
    return model, fallback, current


def _check(model: onnx.ModelProto, settings: Int8Settings) -> None:
    if settings.method not in CALIB_METHODS:
        raise VitsegError(f"--calib-method {settings.method} is unknown", f"use one of {', '.join(CALIB_METHODS)}")
    if settings.target not in INT8_TARGETS:
        raise VitsegError(f"--target {settings.target} is unknown", f"use one of {', '.join(INT8_TARGETS)}")
    if model.graph.output[0].name != "logits":
        raise VitsegError("int8 export needs the logits output", "export with --outputs logits or both")


def _settings_record(settings: Int8Settings, heldout_images: int, quantize) -> dict:
    return {"calib": settings.calib, "calib_images": settings.calib_images, "method": settings.method,
            "target": settings.target, "min_agreement": settings.min_agreement,
            "min_miou_vs_reference": settings.min_miou_vs_reference, "heldout": settings.heldout or settings.calib,
            "decision_targets": {"min_agreement": decision_targets(settings).min_agreement,
                                 "min_miou_vs_reference": decision_targets(settings).min_miou_vs_reference},
            "heldout_images": heldout_images, **quantize.record()}


def quantized_layers(model: onnx.ModelProto) -> list[str]:
    """Conv/MatMul/Gemm nodes of a Q/DQ graph that read at least one dequantized (int8) input."""
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES
            and any(producers.get(i) == "DequantizeLinear" for i in n.input)]


def quantize_int8(model: onnx.ModelProto, size: tuple[int, int], settings: Int8Settings, cache_dir: Path | None = None,
                  progress: Callable[[str], None] = lambda m: None) -> Int8Result:
    """Calibrated int8 Q/DQ graph of vitseg's verified fp32 `model` (its first output must be `logits`):
    ONNX Runtime's quantizer for --target cpu, Model Optimizer's for --target trt, then layers returned to
    float until the held-out targets are met. Raises VitsegError (bad settings, no images, targets
    unreachable). cpu ranges are cached in `cache_dir` (only once int8 succeeded)."""
    _check(model, settings)
    calib = load_inputs(settings.calib, "calib", settings.calib_images, size)
    held = load_inputs(settings.heldout or settings.calib, "val", settings.heldout_images, size)
    image_list_hash = hashlib.sha256("\n".join(im.name for im in calib.images).encode()).hexdigest()[:16]
    name = f"ranges-{hashlib.sha256(model.SerializeToString()).hexdigest()[:16]}-{image_list_hash}-{settings.method}.json"
    kept = Path(cache_dir) / name if cache_dir is not None and settings.target == "cpu" else None
    with tempfile.TemporaryDirectory(prefix="vitseg-int8-") as work_dir:
        # calibrate into the work dir; the cache is kept (atomically) only once int8 succeeded, so an
        # interrupted export leaves neither a half-written cache nor an empty cache directory
        cache = kept if kept is not None and kept.is_file() else Path(work_dir) / name
        quantizer = (_ModelOptQuantizer if settings.target == "trt" else _OrtQuantizer)(model, calib, settings, Path(work_dir), cache)
        progress(f"calibrating on {len(calib)} images ({settings.method}, {quantizer.name})")
        with graph_runner(model, size, 0, "fp32") as fp32:
            reference = record(fp32, held)
        heldout = _Heldout(held, reference, reference.logits[0].shape[0], size, decision_targets(settings), model)
        quantized = quantizer()
        remove_dead_nodes(quantized)
        current = heldout.score(quantized)
        progress(f"int8 held-out {_describe(current)} (aiming at {heldout.targets.min_agreement * 100:.2f}% / "
                 f"{heldout.targets.min_miou_vs_reference * 100:.2f}, inside the targets "
                 f"{settings.min_agreement * 100:.2f}% / {settings.min_miou_vs_reference * 100:.2f})")
        fallback: list[dict] = []
        macs = node_macs(model, held.images[0].pixels[None])
        if not heldout.meets(current):
            quantized, fallback, current = _fall_back(quantized, heldout, quantized_layers(quantized), macs, settings, progress)
        ranges = json.loads(cache.read_text()) if cache.is_file() else None
        if kept is not None and cache != kept and cache.is_file():
            atomic_write_bytes(kept, cache.read_bytes())
    int8_layers = quantized_layers(quantized)
    total = sum(macs.values())
    return Int8Result(
        model=quantized, fallback=fallback, quantized_nodes=int8_layers,
        int8_mac_share=sum(macs.get(k, 0) for k in int8_layers) / total if total else 0.0,
        heldout_agreement=current[0], heldout_miou_vs_reference=current[1],
        heldout={"source": held.source, "images": len(held)},
        calibration={"source": calib.source, "images": len(calib), "image_list_sha256": image_list_hash,
                     "method": settings.method, "cache": None if kept is None else str(kept), "ranges": ranges},
        settings=_settings_record(settings, len(held), quantizer))
