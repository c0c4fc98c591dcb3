"""checkpoint -> OpenVINO IR (`PATH.xml` + `PATH.bin` + `PATH.xml.json`), converted from vitseg's own
verified fp32 ONNX graph, static-shaped unless dynamic batch/size is asked for.

- fp32: the graph as is, compiled with inference precision f32.
- fp16: weights compressed to fp16 in the IR; inference precision f16 where the device computes in
  fp16 (Intel GPUs, NPUs, CPUs with AVX512-FP16/AMX-FP16), else f32 (recorded in the manifest).
- int8: NNCF post-training quantization (transformer preset; depthwise convolutions and attention's
  activation x activation MatMuls stay float; the float part computes in bf16 where the CPU has it), then an
  accuracy-control loop whose metric is vitseg's own mask agreement and mIoU against the fp32 IR on
  held-out images: layer groups (a block, a patch embedding, a decoder projection) return to float, most
  helpful first, 1, 2, 4... at a time, until both int8 targets hold. (nncf.quantize_with_accuracy_control does the same one operation per
  iteration with re-ranking: over 20 minutes for SegFormer-B0 at 128 px on 2 cores, unfinished; this loop
  takes about a minute.) The layers kept in float, the int8 share of MACs and the calibration provenance
  go into the manifest.
Every IR is judged against PyTorch with its precision's preset before anything is written.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vitseg_export.artifact import ExportManifest, write_artifact
from vitseg_export.comparator import InputSet, load_inputs
from vitseg_export.errors import VitsegError
from vitseg_export.export.onnx_export import (
    ExportResult,
    VerifiedGraph,
    export_settings_record,
    parity_record,
    reduced_parity_inputs,
    self_parity,
    verified_fp32_graph,
)
from vitseg_export.export.quiet import library_output_on_stderr
from vitseg_export.export.settings import ExportRequest, Int8Settings
from vitseg_export.parity import ParityAccumulator
from vitseg_export.precisions import get_precision
from vitseg_export.runners.openvino_runner import OpenVINORunner, inference_precision, openvino_core

WEIGHT_OPS = ("MatMul", "Convolution", "GroupConvolution")
# Depthwise convolutions (SegFormer's Mix-FFN) stay float: their per-channel ranges differ by orders of
# magnitude and one per-tensor activation scale flattens them (trained B0 at 512 px, NNCF transformer preset,
# 8 held-out images: 65.0% agreement with them quantized, 99.45% without; they are ~1% of the MACs)
FLOAT_OP_TYPES = ("GroupConvolution",)
# What the float part of each precision computes in (the IR's rt_info; the runner asks the device for it and
# uses f32 where the device lacks it). int8: bf16 between the int8 layers where the CPU has bf16 arithmetic, as
# TensorRT's int8 graphs are fp16 there (trained B0 at 512 px, 2-core AVX512-BF16 CPU: 17.1 ms vs 20.9 ms in
# f32, same held-out agreement); the fallback and the self-parity check judge it with exactly that setting.
INFERENCE_PRECISION = {"fp32": "f32", "fp16": "f16", "int8": "bf16"}


@dataclass
class _Heldout:
    """Held-out images with the fp32 IR's logits on them, and the int8 targets."""

    images: list[np.ndarray]
    reference: list[np.ndarray]
    targets: tuple[float, float]

    def score(self, model: Any, count: int | None = None) -> tuple[float, float]:
        """(pixel agreement, mIoU vs the fp32 IR) of `model` on the first `count` images (all by default)."""
        core = openvino_core()
        hint = inference_precision(core, "CPU", INFERENCE_PRECISION["int8"])  # as the artifact will run here
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        acc = ParityAccumulator(self.reference[0].shape[1])
        for pixels, ref in list(zip(self.images, self.reference))[:count]:
            acc.add("", ref[0], np.asarray(compiled(pixels)[0])[0].argmax(0), None)
        summary = acc.summary()
        return summary.pixel_agreement, summary.miou_vs_reference

    def margin(self, score: tuple[float, float]) -> float:
        """How far a score is above the targets (>= 0: met)."""
        return min(score[0] - self.targets[0], score[1] - self.targets[1])


def _group(name: str) -> str:
    """The module a layer belongs to, two levels below the network (a transformer block, a patch
    embedding, a decoder projection): the unit the fallback returns to float together."""
    return "/".join(name.strip("/").split("/")[:4])


def _quantizer_groups(model: Any) -> dict[str, list[str]]:
    """group -> friendly names of the FakeQuantize nodes feeding that group's layers."""
    groups: dict[str, list[str]] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize":
            continue
        consumers = [t.get_node() for t in op.output(0).get_target_inputs()]
        while consumers and consumers[0].get_type_name() in ("Convert", "Reshape", "Transpose"):
            consumers = [t.get_node() for t in consumers[0].output(0).get_target_inputs()]
        if consumers:
            groups.setdefault(_group(consumers[0].get_friendly_name()), []).append(op.get_friendly_name())
    return groups


def _bypass(model: Any, quantizers: set[str]) -> Any:
    """A copy of `model` with the named FakeQuantize nodes removed (their layers compute in float)."""
    copy = model.clone()
    for op in copy.get_ordered_ops():
        if op.get_type_name() == "FakeQuantize" and op.get_friendly_name() in quantizers:
            op.output(0).replace(op.input_value(0))
    return copy


def _fall_back(quantized: Any, held: _Heldout, progress) -> tuple[Any, list[str], tuple[float, float]]:
    """Rank the layer groups by how much returning each alone to float helps on 4 held-out images, then return
    the most helpful ones to float (1, 2, 4... at a time) until the targets hold on all held-out images."""
    groups = _quantizer_groups(quantized)
    progress(f"int8: ranking {len(groups)} layer groups by their effect on the masks")
    gains = sorted(((held.margin(held.score(_bypass(quantized, set(q)), 4)), g) for g, q in groups.items()), reverse=True)
    reverted: list[str] = []
    step, model, current = 1, quantized, held.score(quantized)
    while held.margin(current) < 0 and len(reverted) < len(gains):
        reverted += [g for _, g in gains[len(reverted):len(reverted) + step]]
        model = _bypass(quantized, {q for g in reverted for q in groups[g]})
        current = held.score(model)
        progress(f"int8: {len(reverted)} groups in float: agreement {current[0] * 100:.3f}%, mIoU vs fp32 {current[1] * 100:.2f}")
        step *= 2
    if held.margin(current) < 0:
        raise VitsegError(f"int8 could not reach the int8 targets on held-out images (agreement {current[0] * 100:.3f}%, "
                          f"mIoU vs fp32 {current[1] * 100:.2f} with every layer group in float)",
                          "calibrate on more representative images, or use fp16")
    return model, reverted, current


def _quantize(model: Any, graph: VerifiedGraph, settings: Int8Settings, progress) -> tuple[Any, dict]:
    """NNCF PTQ (transformer preset: SmoothQuant, min-max) on the fp32 IR, then vitseg's mask-metric fallback;
    returns (int8 model, fallback and provenance record)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    calib = load_inputs(settings.calib, "calib", settings.calib_images, graph.size)
    heldout = load_inputs(settings.heldout or settings.calib, "val", settings.heldout_images, graph.size)
    fp32 = openvino_core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    images = [im.pixels[None] for im in heldout.images]
    from vitseg_export.export.int8 import decision_targets

    aim = decision_targets(settings)  # the same guard band as the ONNX fallback
    held = _Heldout(images, [np.asarray(fp32(x)[0]) for x in images], (aim.min_agreement, aim.min_miou_vs_reference))
    progress(f"int8: NNCF calibration on {len(calib)} images")
    # No bias correction: it shifts biases to offset the quantization of a layer's input, so a layer returned
    # to float by removing its FakeQuantize would keep a wrong bias (measured: same agreement without it).
    attention = attention_matmuls(model)
    with library_output_on_stderr():
        quantized = nncf.quantize(model, nncf.Dataset([im.pixels[None] for im in calib.images]), subset_size=len(calib),
                                  model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.PERFORMANCE,
                                  ignored_scope=nncf.IgnoredScope(names=attention, types=list(FLOAT_OP_TYPES), validate=False),
                                  advanced_parameters=AdvancedQuantizationParameters(disable_bias_correction=True))
    quantized, reverted, score = _fall_back(quantized, held, progress)
    names = "\n".join(im.name for im in calib.images)
    return quantized, {
        "fallback_groups": reverted, "heldout_agreement": score[0], "heldout_miou_vs_reference": score[1],
        "attention": f"{len(attention)} activation x activation MatMuls kept float; ScaledDotProductAttention ops "
                     "(OpenVINO's fused attention) get NNCF's Q/K quantizers and count as float MACs",
        "float_op_types": list(FLOAT_OP_TYPES),
        "calibration": {"source": calib.source, "images": len(calib), "method": "nncf min-max (transformer preset)",
                        "image_list_sha256": hashlib.sha256(names.encode()).hexdigest()[:16]},
        "heldout": {"source": heldout.source, "images": len(heldout)}}


def _source(value: Any) -> Any:
    """The node a value comes from, looking through layout and type changes."""
    node = value.get_node()
    while node.get_type_name() in ("Convert", "Reshape", "Transpose") and node.inputs():
        node = node.input_value(0).get_node()
    return node


def attention_matmuls(model: Any) -> list[str]:
    """MatMuls of an IR whose inputs are both activations (attention's Q.K^T and softmax.V): they stay float,
    as in the ONNX int8 path (softmax probabilities of ~1/keys fall under one per-tensor int8 step)."""
    return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"
            and not any(_source(v).get_type_name() in ("Constant", "FakeQuantize") for v in op.input_values())]


def _layer_macs(model: Any, size: tuple[int, int]) -> dict[str, int]:
    """Multiply-accumulates of every MatMul/Convolution/ScaledDotProductAttention of an IR for one (1, 3, H, W)
    image. Attention ops (Q.K^T and softmax.V) never count as int8: they are not in `_weight_layers`."""
    static = model.clone()
    static.reshape({static.inputs[0]: [1, 3, *size]})
    macs = {}
    for op in static.get_ordered_ops():
        if op.get_type_name() == "ScaledDotProductAttention":  # q: (..., T, d), k: (..., S, d)
            macs[op.get_friendly_name()] = 2 * int(np.prod(list(op.get_input_shape(0))) * op.get_input_shape(1)[-2])
        elif op.get_type_name() in WEIGHT_OPS:
            out = int(np.prod(list(op.get_output_shape(0))))
            shape = list(op.get_input_shape(1))
            if op.get_type_name() == "MatMul":
                a = list(op.get_input_shape(0))
                reduced = a[-2] if op.get_attributes().get("transpose_a") else a[-1]
            else:  # Convolution: (Cout, Cin, kh, kw); GroupConvolution: (G, Cout/G, Cin/G, kh, kw)
                reduced = int(np.prod(shape[2:] if op.get_type_name() == "GroupConvolution" else shape[1:]))
            macs[op.get_friendly_name()] = out * reduced
    return macs


def _weight_layers(model: Any) -> dict[str, bool]:
    """Every MatMul/Convolution of an IR -> whether an input comes through a FakeQuantize (runs in int8)."""
    return {op.get_friendly_name(): any(_source(v).get_type_name() == "FakeQuantize" for v in op.input_values())
            for op in model.get_ordered_ops() if op.get_type_name() in WEIGHT_OPS}


def _int8_details(model: Any, graph: VerifiedGraph, provenance: dict, settings: Int8Settings) -> dict:
    from vitseg_export.export.int8 import decision_targets

    aim = decision_targets(settings)
    layers = _weight_layers(model)
    macs = _layer_macs(model, graph.size)
    total = sum(macs.values()) or 1
    float_layers = [name for name, q in layers.items() if not q]
    int8_macs = sum(m for name, m in macs.items() if layers.get(name))
    return {"quantizer": "nncf.quantize + vitseg mask-metric fallback", "int8_mac_share": int8_macs / total,
            "quantized_layers": sum(layers.values()), "float_layers": float_layers,
            "targets": {"min_agreement": settings.min_agreement, "min_miou_vs_reference": settings.min_miou_vs_reference},
            "decision_targets": {"min_agreement": aim.min_agreement, "min_miou_vs_reference": aim.min_miou_vs_reference},
            **provenance}


def _convert(graph: VerifiedGraph, work: Path) -> Any:
    import onnx
    import openvino as ov

    onnx.save(graph.model, work / "fp32.onnx")
    return ov.convert_model(work / "fp32.onnx")


def _save(model: Any, graph: VerifiedGraph, precision: str, work: Path) -> Path:
    import openvino as ov

    for key, value in graph.info.metadata_props().items():
        model.set_rt_info(value, ["vitseg", key.split(".", 1)[1]])
    model.set_rt_info(f'"{INFERENCE_PRECISION[precision]}"', ["vitseg", "inference_precision"])
    path = work / "model.xml"
    ov.save_model(model, path, compress_to_fp16=precision == "fp16")
    return path


def export_openvino(loaded: Any, output: Path, request: ExportRequest, progress: Callable[[str], None]) -> ExportResult:
    """Export `loaded` to an OpenVINO IR at `output` (.xml, with .bin and .xml.json beside it) in the requested
    precision. Raises BackendMissingError without openvino/nncf, VitsegError/ParityError otherwise; nothing
    is written then."""
    t0 = time.perf_counter()
    settings = request.onnx
    precision = get_precision(settings.precision)
    graph = verified_fp32_graph(loaded, settings, output, progress, fmt="openvino")
    details: dict = {"weights": "fp16 (compressed)" if precision.name == "fp16" else precision.name}
    with tempfile.TemporaryDirectory(prefix="vitseg-openvino-") as tmp:
        model = _convert(graph, Path(tmp))
        if precision.name == "int8":
            model, provenance = _quantize(model, graph, request.int8, progress)
            details.update(_int8_details(model, graph, provenance, request.int8))
        xml = _save(model, graph, precision.name, Path(tmp))
        progress(f"checking the {precision.name} IR against PyTorch (OpenVINO CPU)")
        inputs: InputSet = graph.inputs if precision.name == "fp32" else reduced_parity_inputs(settings, graph.info, False)
        parity = self_parity(loaded, OpenVINORunner(xml, "cpu"), inputs, precision.name, request.int8)
        wanted = INFERENCE_PRECISION[precision.name]
        details["inference_precision"] = {"hint": wanted, "checked_with": inference_precision(openvino_core(), "CPU", wanted),
                                          "note": f"devices without {wanted} arithmetic compute in f32"}
        files = {output: xml.read_bytes(), output.with_suffix(".bin"): xml.with_suffix(".bin").read_bytes()}
    import openvino as ov

    manifest = ExportManifest(
        artifact=output.name, format="openvino", sha256=hashlib.sha256(files[output]).hexdigest(),
        size_bytes=sum(len(b) for b in files.values()), metadata=graph.info.metadata_json(),
        export_settings={**export_settings_record(settings, graph.size), "openvino_version": ov.__version__},
        self_parity=parity_record(parity, inputs), rewrites=graph.rewrites,
        fp32_graph_parity=graph.parity.to_json(), precision_details=details,
        export_seconds=round(time.perf_counter() - t0, 2), random_weights=loaded.kind == "random",
        extra={"bin": output.with_suffix(".bin").name, "bin_sha256": hashlib.sha256(files[output.with_suffix(".bin")]).hexdigest()})
    write_artifact(output, files, manifest)
    if precision.name == "int8" and details["int8_mac_share"] < 0.5:
        progress("int8: most of the compute stayed in float (see float_layers in the manifest)")
    return ExportResult(output, manifest)


def require_openvino() -> None:
    """BackendMissingError (one line, exit 2) unless openvino and nncf import."""
    from vitseg_export.runners.base import require_module
    from vitseg_export.runners.openvino_runner import OPENVINO_HINT

    require_module("openvino", "--format openvino needs OpenVINO, which is not installed", OPENVINO_HINT)
    require_module("nncf", "--format openvino needs NNCF (int8), which is not installed", OPENVINO_HINT)


__all__ = ["export_openvino", "require_openvino"]
