"""fp32 ONNX -> int8 ONNX (Q/DQ), for two targets, then the one int8 fallback (export/fallback.py):
- cpu: onnxruntime's `quantize_static`, symmetric (zero point 0), per-tensor, MatMul/Gemm and dense Convs (what
  its CPU provider runs faster in integer kernels), 7-bit weights for CPUs without VNNI/AMX (reduce_range: no
  u8 x s8 pair saturates int16; --cpu-class), ranges cached so re-quantizing with other exclusions does not
  re-calibrate; first, the same graph with placeholder ranges is timed against fp32 (int8_probe): int8 that
  cannot pay on this CPU is refused before anything is calibrated;
- trt: NVIDIA Model Optimizer's ONNX PTQ, Q/DQ where TensorRT fuses them, the float part in fp16.
LayerNorm, Softmax, GELU and residual Adds stay float on both; so do attention's activation x activation
MatMuls. When held-out agreement misses the targets, the layers whose return to float helps most (logit SQNR
with that layer alone in float) go back to float, with their original fp32 weights.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from vitseg_export.compare.inputs import InputSet, load_inputs
from vitseg_export.errors import VitsegError
from vitseg_export.export.fallback import (
    Heldout,
    calibration_record,
    check_mostly_int8,
    cpu_record,
    fall_back,
    fallback_record,
    kept_units,
)
from vitseg_export.export.graph import remove_dead_nodes, to_float
from vitseg_export.export.int8_probe import announce_emulation, not_timed_here, placeholder_ranges, speed_decision
from vitseg_export.export.quiet import library_log_level, library_output_on_stderr
from vitseg_export.machine.cpu import SAFE_CLASS
from vitseg_export.machine.interrupt import UNWIND_S, run_interruptible
from vitseg_export.precisions import Conversion, ConversionContext
from vitseg_export.progress import Progress, silent
from vitseg_export.runners.base import require_module
from vitseg_export.runners.bf16_emulation import emulated, has_bf16
from vitseg_export.runners.onnxruntime_runner import OnnxRuntimeRunner, graph_runner, session_options
from vitseg_export.settings import CALIB_METHODS, INT8_TARGETS, Int8Settings

QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")
# --target cpu: what ONNX Runtime's CPU provider runs faster in int8 (QLinearConv, MatMulIntegerToFloat,
# QLinearMatMul), measured per op type (vitseg_export/export/int8_probe.py, scripts/bench_cpu.py) on a 2-core
# AMD EPYC with AVX-512 VNNI: MatMul 2.9x (7-bit weights) / 5.5x (8-bit), 1x1 Conv 2.5x, depthwise 3x3 Conv
# 0.72-0.81x. So MatMul/Gemm and every Conv but the depthwise ones. Trained SegFormer-B0 at 512 px, same
# machine: MatMul only kept 46.9% of the MACs in int8 (a mostly-float "int8"), 1.08x fp32; with the dense
# Convs 68.0% at 1.06x (7-bit) / 1.11x (8-bit), 99.71% / 99.81% agreement; depthwise Convs too: 0.99x.
CPU_QUANTIZED_OP_TYPES = ("MatMul", "Gemm", "Conv")


def depthwise_convs(model: onnx.ModelProto) -> list[str]:
    """Grouped (depthwise) Conv nodes: slower in int8 than fp32 in ONNX Runtime's CPU kernels."""
    return [n.name for n in model.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]


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

__all__ = ["Int8Result", "Int8Settings", "QUANTIZED_OP_TYPES", "int8_conversion", "node_macs", "quantize_int8",
           "quantized_layers", "restore_float_consumers"]


def quantized_layers(model: onnx.ModelProto) -> list[str]:
    """Conv/MatMul/Gemm nodes of a Q/DQ graph that read at least one dequantized (int8) input."""
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES
            and any(producers.get(i) == "DequantizeLinear" for i in n.input)]


def node_macs(model: onnx.ModelProto, pixels: np.ndarray) -> dict[str, int]:
    """Multiply-accumulates of every Conv/MatMul/Gemm at batch 1, from one ONNX Runtime run that
    exposes their inputs and outputs (works for any graph, dynamic axes included)."""
    # a bf16 graph (TensorRT's) runs on the CPU provider emulated: the same nodes and shapes
    m = emulated(model) if has_bf16(model) else copy.deepcopy(model)
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


class _OrtQuantizer:
    """--target cpu: ONNX Runtime's quantize_static over one fp32 graph (saved to a work dir: it rewrites
    ModelProtos it is handed into external-data form), with a range cache."""

    name = "onnxruntime.quantization.quantize_static"

    def __init__(self, model: onnx.ModelProto, settings: Int8Settings, work: Path):
        self.model = model
        self.fp32_path = work / "fp32.onnx"
        onnx.save(model, self.fp32_path)
        self.work = work
        self.attention = attention_matmuls(model)
        self.depthwise = depthwise_convs(model)
        self.excluded = self.attention + self.depthwise
        self.method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}[settings.method]
        # symmetric int8 (zero point 0), per-tensor activations and weights, float biases: onnxruntime's CPU
        # provider fuses per-tensor Q/DQ into integer kernels more often (measured on a 2-core AVX2 EPYC:
        # vit-seg-base 128 px int8 110 ms per-tensor vs 253 ms per-channel, fp32 74 ms; SegFormer-B0 512 px
        # 184 vs 248 ms, at the same agreement)
        self.per_channel = False
        self.extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}
        # 7-bit weights unless the target CPU has VNNI/AMX: then every class computes the same integers
        self.safe = settings.cpu_class == SAFE_CLASS
        if settings.method != "minmax":
            self.extra = {**self.extra, "CalibTensorRangeSymmetric": True}

    def __call__(self, calib: InputSet, cache: Path) -> onnx.ModelProto:
        """The graph calibrated on `calib` (ranges read from `cache` where it exists, else written there)."""
        return self._quantize(_Reader([im.pixels[None] for im in calib.images]), cache, self.method)

    def placeholder(self) -> onnx.ModelProto:
        """The same Q/DQ graph with placeholder ranges instead of calibrated ones: no inference, and the same
        kernels at the same speed (what the speed decision before calibrating times)."""
        cache = placeholder_ranges(self.model, self.work / "placeholder-ranges.json")
        return self._quantize(None, cache, CalibrationMethod.MinMax)

    def _quantize(self, reader: "_Reader | None", cache: Path, method: Any) -> onnx.ModelProto:
        with tempfile.TemporaryDirectory(dir=self.work) as tmp, library_output_on_stderr():
            out = Path(tmp) / "q.onnx"
            run_interruptible(  # Ctrl-C and SIGTERM end the command at once (machine.interrupt)
                quantize_static, self.fp32_path, out, reader, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(CPU_QUANTIZED_OP_TYPES), nodes_to_exclude=self.excluded,
                per_channel=self.per_channel, reduce_range=self.safe,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                extra_options=self.extra, calibration_cache_path=cache, unwind_s=UNWIND_S)
            quantized = onnx.load(out)
        restore_float_consumers(quantized)
        remove_dead_nodes(quantized)
        return quantized

    def record(self) -> dict:
        """How the graph was quantized (the manifest's `quantization`)."""
        return {"quantizer": self.name, "activation_type": "int8 symmetric per-tensor",
                "weight_type": ("7-bit (saturation-safe) " if self.safe else "8-bit ") + "symmetric " +
                               ("per-channel (output-channel axis)" if self.per_channel else "per-tensor"),
                "attention_matmuls": f"float ({len(self.attention)} activation x activation MatMuls excluded)",
                "depthwise_convs": f"float ({len(self.depthwise)} excluded: slower in int8 on ONNX Runtime's CPU kernels)",
                "extra_options": self.extra}


@contextlib.contextmanager
def _ort_quantization_restored() -> Iterator[None]:
    """Model Optimizer monkeypatches ONNX Runtime's quantization classes (calibrators, quantizers) for the
    whole process and never puts them back; a later --target cpu quantization then fails. Snapshot every
    class and module attribute of those modules, and restore what changed."""
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


@contextlib.contextmanager
def _temp_files_in(work: Path) -> Iterator[None]:
    """Model Optimizer's quantizer makes temp files with mkstemp and leaves them when interrupted: inside this
    block they go to the export's work directory (removed on every path); the previous setting is restored."""
    previous = tempfile.tempdir
    tempfile.tempdir = str(work)
    try:
        yield
    finally:
        tempfile.tempdir = previous


class _ModelOptQuantizer:
    """--target trt: NVIDIA Model Optimizer's ONNX PTQ (what NVIDIA documents for TensorRT): symmetric int8
    Q/DQ where TensorRT fuses them, the float part in fp16, no int32 bias, few Casts. Calibrates on the CPU
    (ONNX Runtime's CPU provider)."""

    name = "modelopt.onnx.quantization.quantize (int8, fp16 elsewhere)"

    def __init__(self, model: onnx.ModelProto, settings: Int8Settings, work: Path):
        self.fp32_path, self.out_path, self.work = work / "fp32.onnx", work / "q.onnx", work
        onnx.save(model, self.fp32_path)
        self.method = {"minmax": "max", "entropy": "entropy"}.get(settings.method)
        if self.method is None:
            raise VitsegError(f"--calib-method {settings.method} is not offered for --target trt", "use minmax or entropy")

    def __call__(self, calib: InputSet, cache: Path) -> onnx.ModelProto:
        """The graph calibrated on `calib` (`cache` unused: Model Optimizer keeps no range cache)."""
        self.pixels = np.concatenate([im.pixels[None] for im in calib.images])
        with library_output_on_stderr(), _ort_quantization_restored(), _temp_files_in(self.work):
            quantization = require_module("modelopt.onnx.quantization", "--target trt int8 needs NVIDIA Model Optimizer",
                                          "pip install 'vitseg-export[torch]' (it brings nvidia-modelopt)")
            run_interruptible(quantization.quantize, unwind_s=UNWIND_S,  # Ctrl-C ends it at once (machine.interrupt)
                              onnx_path=str(self.fp32_path), quantize_mode="int8", calibration_data={"pixels": self.pixels},
                                  calibration_method=self.method, calibration_eps=["cpu"], high_precision_dtype="fp16", dq_only=True,
                                  disable_mha_qdq=True, output_path=str(self.out_path),
                                  log_level=library_log_level())
        quantized = onnx.load(self.out_path)
        remove_dead_nodes(quantized)
        return quantized

    def record(self) -> dict:
        """How the graph was quantized (the manifest's `quantization`)."""
        return {"quantizer": self.name, "calibration_method": self.method, "high_precision_dtype": "fp16",
                "attention_matmuls": "float (disable_mha_qdq)",
                "activation_type": "int8 symmetric per-tensor", "weight_type": "int8 symmetric per-channel"}


@dataclass
class OnnxQuantized:
    """A Q/DQ graph as the fallback sees it: its quantized Conv/MatMul/Gemm layers are the units; a layer in
    float reads its original fp32 weights again (graph.to_float)."""

    model: onnx.ModelProto
    original: onnx.ModelProto | None  # the fp32 graph (None: floated layers keep the graph's own float weights)
    size: tuple[int, int]
    num_classes: int
    cpu_class: str = ""  # the CPU class its int8 is made for ("": none, 8-bit weights: the TensorRT target)

    def units(self) -> list[str]:
        """The layers that read an int8 input."""
        return quantized_layers(self.model)

    def runner(self, floated: set[str]) -> OnnxRuntimeRunner:
        """The graph with the `floated` layers in float, on ONNX Runtime CPU (its int8 exact: emulated where this
        CPU's integer kernels would saturate)."""
        return graph_runner(self.graph(floated), self.size, self.num_classes, "int8", self.cpu_class)

    def graph(self, floated: set[str]) -> onnx.ModelProto:
        """The Q/DQ graph with the `floated` layers in float."""
        return to_float(self.model, floated, self.original) if floated else self.model


@dataclass
class Int8Result:
    model: onnx.ModelProto
    details: dict = field(default_factory=dict)  # the manifest's `int8` section
    files: dict = field(default_factory=dict)  # the calibration cache to write with the artifact (Path -> bytes)


def check_int8_settings(model: onnx.ModelProto, settings: Int8Settings) -> None:
    """VitsegError for an int8 request the graph or the settings cannot honour (before any calibration)."""
    if settings.method not in CALIB_METHODS:
        raise VitsegError(f"--calib-method {settings.method} is unknown", f"use one of {', '.join(CALIB_METHODS)}")
    if settings.target not in INT8_TARGETS:
        raise VitsegError(f"--target {settings.target} is unknown", f"use one of {', '.join(INT8_TARGETS)}")
    if model.graph.output[0].name != "logits":
        raise VitsegError("int8 export needs the logits output", "export with --outputs logits or both")


def ort_layer_runner(model_bytes: bytes, quantized: bool) -> Callable[[np.ndarray], object]:
    """One of int8_probe's single-layer graphs on ONNX Runtime's CPU provider, as vitseg's runners set it up when
    runners take turns (no spinning threads between runs)."""
    session = ort.InferenceSession(model_bytes, session_options(spin=False), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})


def _settings_record(settings: Int8Settings, heldout: InputSet, quantizer: Any) -> dict:
    targets = settings.targets()
    return {"calib": settings.calib, "calib_images": settings.calib_images, "method": settings.method,
            "target": settings.target, "min_agreement": targets.min_agreement,
            "min_miou_vs_reference": targets.min_miou_vs_reference, "heldout": heldout.source,
            "heldout_images": len(heldout), **quantizer.record()}


def speed_before_calibration(model: onnx.ModelProto, size: tuple[int, int], settings: Int8Settings, work: Path,
                             progress: Progress) -> dict | str:
    """For --target cpu: the int8 graph with placeholder ranges timed against the fp32 graph, on a CPU where its
    arithmetic is exact (int8_probe.speed_decision: Int8NotWorthIt on the class it is made for when measurably
    slower). Returns the record, or why nothing was timed."""
    announce_emulation(settings.cpu_class if settings.target == "cpu" else "", progress)
    if settings.target != "cpu":
        return "not timed: int8 for TensorRT"
    reason = not_timed_here(settings)
    if reason is not None:
        return reason
    progress("int8: timing the int8 graph (placeholder ranges) against fp32 on this CPU, before calibrating")
    placeholder = _OrtQuantizer(model, settings, work).placeholder()
    return speed_decision(graph_runner(model, size, 0, "fp32"), graph_runner(placeholder, size, 0, "int8", settings.cpu_class),
                          size, settings, "before calibration")


def quantize_int8(model: onnx.ModelProto, size: tuple[int, int], settings: Int8Settings, heldout: tuple,
                  cache_dir: Path | None = None, progress: Progress = silent, keep_float: tuple[str, ...] = (),
                  scopes: Any = None) -> Int8Result:
    """Calibrated int8 Q/DQ graph of vitseg's verified fp32 `model` (its first output must be `logits`):
    ONNX Runtime's quantizer for --target cpu, Model Optimizer's for --target trt, then the one fallback until
    the targets are met on `heldout` (the export's verdict images and PyTorch's logits on them:
    ExportSession.heldout). Raises VitsegError (bad settings, no images), ParityError (targets unreachable),
    Int8NotWorthIt (slower than fp32 on the CPU class it is for: before calibrating). cpu ranges are cached in
    `cache_dir`: the result's `files`, for the exporter to write with the artifact."""
    check_int8_settings(model, settings)
    calib = load_inputs(settings.calib, "calib", settings.calib_images, size)
    image_list_hash = calibration_record(calib, settings.method)["image_list_sha256"]
    name = f"ranges-{hashlib.sha256(model.SerializeToString()).hexdigest()[:16]}-{image_list_hash}-{settings.method}.json"
    kept = Path(cache_dir) / name if cache_dir is not None and settings.target == "cpu" else None
    with tempfile.TemporaryDirectory(prefix="vitseg-int8-") as work_dir:
        work = Path(work_dir)
        before = speed_before_calibration(model, size, settings, work, progress)
        # calibrate into the work dir; the cache is kept (atomically) only once int8 succeeded, so an
        # interrupted export leaves neither a half-written cache nor an empty cache directory
        cache = kept if kept is not None and kept.is_file() else work / name
        quantizer = (_ModelOptQuantizer if settings.target == "trt" else _OrtQuantizer)(model, settings, work)
        progress(f"calibrating on {len(calib)} images ({settings.method}, {quantizer.name})")
        held = Heldout.of(heldout, settings.targets())
        quantized = quantizer(calib, cache)
        macs = node_macs(model, held.inputs.images[0].pixels[None])
        final, record = settle_graph(quantized, model, model, macs, size, settings, held, before, progress,
                                     keep_float, scopes)
        ranges = json.loads(cache.read_text()) if cache.is_file() else None
        # the cache is kept only once the export succeeds: written with the artifact, in its group
        files = {kept: cache.read_bytes()} if kept is not None and cache != kept and cache.is_file() else {}
    details = {**record, "calibration": calibration_record(calib, settings.method, cache=None if kept is None else str(kept),
                                                           ranges=ranges),
               "quantization": _settings_record(settings, held.inputs, quantizer),
               "float_part": "fp16" if settings.target == "trt" else "fp32"}
    return Int8Result(final, details, files)


def settle_graph(quantized: onnx.ModelProto, fp32: onnx.ModelProto, original: onnx.ModelProto | None,
                 macs: dict[str, int], size: tuple[int, int],
                 settings: Int8Settings, held: Heldout, before: dict | str,
                 progress: Progress, keep_float: tuple[str, ...] = (),
                 scopes: Any = None) -> tuple[onnx.ModelProto, dict]:
    """A Q/DQ graph through the one fallback and the int8 checks (mostly int8; for a CPU graph whose fallback
    returned layers to float, the speed decision again): (final graph, the manifest's int8 record without the
    quantizer's own keys). `original`: where a layer returned to float gets its weights (None: the graph's own
    float weights, those its QuantizeLinear nodes read); `macs`: node_macs of the graph's layers; `before`: the
    speed decision made before calibrating (speed_before_calibration); `keep_float`: modules whose quantized layers
    stay float from the start (found through `scopes`, export/scopes.py)."""
    made_for = settings.cpu_class if settings.target == "cpu" else ""
    graph = OnnxQuantized(quantized, original, size, held.num_classes, made_for)
    kept = kept_units(graph.units(), keep_float, scopes) if keep_float else {}
    result = fall_back(graph, held, settings.max_fallback, progress, kept=kept)
    final = graph.graph(result.units)
    int8_layers = set(quantized_layers(final))
    record = fallback_record(result, held, settings.targets(), macs, int8_layers)
    check_mostly_int8(record, settings)
    if settings.target != "cpu":
        return final, {"target": settings.target, **record, "quantized_nodes": len(int8_layers),
                       **({"keep_float": list(keep_float)} if keep_float else {})}
    after: dict | str = "not timed: the placement timed before calibration (no layer returned to float)"
    if result.units and isinstance(before, dict):  # another graph than the one timed: ask again
        progress("int8: timing the graph after the fallback against fp32")
        after = speed_decision(graph_runner(fp32, size, 0, "fp32"), graph.runner(result.units), size, settings,
                               "after the fallback")
    return final, {"target": settings.target, **record, **cpu_record(settings, before, after),
                   "quantized_nodes": len(int8_layers), **({"keep_float": list(keep_float)} if keep_float else {})}


def int8_conversion(model: onnx.ModelProto, ctx: ConversionContext) -> Conversion:
    """The int8 precision's converter (precisions.py): calibrated Q/DQ with the mask-metric fallback."""
    if ctx.heldout is None:
        raise VitsegError("int8 conversion needs the export's verdict images", "convert through the export pipeline")
    result = quantize_int8(model, ctx.image_size, ctx.int8, ctx.heldout(), cache_dir=ctx.cache_dir, progress=ctx.progress,
                           keep_float=ctx.keep_float, scopes=ctx.scopes)
    return Conversion(result.model, result.details, result.files)
