"""checkpoint -> OpenVINO IR (`PATH.xml` + `PATH.bin` + `PATH.xml.json`), converted from vitseg's own
verified fp32 ONNX graph, static-shaped unless dynamic batch/size is asked for. What differs by precision is
on the precision's row (precisions.py): fp16 compresses the weights and computes in f16 where the device has
it; int8 quantizes the fp32 IR (`quantize_ir`) and computes its float part in bf16 where the CPU has it.

int8: NNCF post-training quantization (transformer preset; depthwise convolutions and attention's
activation x activation MatMuls stay float), then the one int8 fallback (export/fallback.py) whose metric is
vitseg's own mask agreement and mIoU against PyTorch on the export's verdict images: layer groups (a block, a patch
embedding, a decoder projection) return to float, most helpful first. (nncf.quantize_with_accuracy_control
does the same one operation per iteration with re-ranking: over 20 minutes for SegFormer-B0 at 128 px on 2
cores, unfinished; this takes about a minute.) The layers kept in float, the int8 share of MACs and the
calibration provenance go into the manifest. Every IR is judged against PyTorch with its precision's preset,
at every shape it declares, before anything is written.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from vitseg_export.artifact import ArtifactGroup, ArtifactInfo, ExportResult
from vitseg_export.compare.inputs import load_inputs
from vitseg_export.compare.report import parity_lines
from vitseg_export.errors import VitsegError
from vitseg_export.export.fallback import (
    Heldout,
    calibration_record,
    check_mostly_int8,
    cpu_record,
    fall_back,
    fallback_record,
)
from vitseg_export.export.int8_probe import announce_emulation, not_timed_here, speed_decision
from vitseg_export.export.pipeline import ExportPlan, ExportSession, VerifiedGraph, export_with, manifest_for
from vitseg_export.export.quiet import library_output_on_stderr
from vitseg_export.files import sha256_file
from vitseg_export.machine.cpu import SAFE_CLASS
from vitseg_export.machine.interrupt import UNWIND_S, run_interruptible
from vitseg_export.precisions import get_precision
from vitseg_export.progress import Progress
from vitseg_export.runners.openvino_runner import OpenVINORunner, inference_precision, lacks_why, openvino_core
from vitseg_export.settings import ExportRequest, Int8Settings
from vitseg_export.tables import lazy_module

# the [openvino] extra, imported when an IR is made (the module itself loads without it)
ov = lazy_module("openvino")
ov_ops = lazy_module("openvino.opset13")
nncf = lazy_module("nncf")
nncf_advanced = lazy_module("nncf.quantization.advanced_parameters")

WEIGHT_OPS = ("MatMul", "Convolution", "GroupConvolution")
# Depthwise convolutions (SegFormer's Mix-FFN) stay float: their per-channel ranges differ by orders of
# magnitude and one per-tensor activation scale flattens them (trained B0 at 512 px, NNCF transformer preset,
# 8 held-out images: 65.0% agreement with them quantized, 99.45% without; they are ~1% of the MACs)
FLOAT_OP_TYPES = ("GroupConvolution",)


TORCH_NAME = "__module."  # how OpenVINO's PyTorch frontend begins the names of a module's nodes


def _group(name: str) -> str:
    """The module a layer belongs to, two levels below the network (a transformer block, a patch
    embedding, a decoder projection): the unit the fallback returns to float together. Names of IRs read from
    ONNX look like /segmenter/net/encoder/block.0.0/...; of IRs converted from PyTorch (`vitseg qat`),
    __module.segmenter.net.encoder.block.0.0.attention.../aten::linear/MatMul: the same groups from both."""
    if name.startswith(TORCH_NAME):
        parts: list[str] = []
        for token in name[len(TORCH_NAME):].split("/")[0].split("."):
            if token.isdigit() and parts:  # a ModuleList index belongs to its list: block.0.0, as ONNX names it
                parts[-1] += "." + token
            else:
                parts.append(token)
        return "/".join(parts[:4])
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


def groups_inside(model: Any, names: tuple[str, ...], scopes: Any) -> dict[str, str]:
    """The layer groups (the IR fallback's units) with a quantized layer inside the modules `names` (--keep-float,
    found through `scopes`): group -> the name. A group is kept whole (the fallback's unit). VitsegError when a
    name holds no quantized layer."""
    kept: dict[str, str] = {}
    for name in names:
        inside = scopes.in_scope(name)
        groups = set()
        for op in model.get_ordered_ops():
            if op.get_type_name() != "FakeQuantize":
                continue
            consumers = [t.get_node() for t in op.output(0).get_target_inputs()]
            while consumers and consumers[0].get_type_name() in ("Convert", "Reshape", "Transpose"):
                consumers = [t.get_node() for t in consumers[0].output(0).get_target_inputs()]
            if consumers and inside(consumers[0].get_friendly_name()):
                groups.add(_group(consumers[0].get_friendly_name()))
        if not groups:
            raise VitsegError(f"--keep-float {name}: no quantized layer is inside it", "name a module with Conv or Linear layers")
        kept.update(dict.fromkeys(sorted(groups), name))
    return kept


def _bypass(model: Any, quantizers: set[str]) -> Any:
    """A copy of `model` with the named FakeQuantize nodes removed (their layers compute in float). OpenVINO
    folds a ReLU into the FakeQuantize after it when that clamps at 0 (an IR converted from PyTorch has no Relu
    left there): a removed FakeQuantize whose range starts at 0 leaves a Relu in its place, which is exact
    (its input is non-negative, or the FakeQuantize clamped it to 0). Measured on a QAT IR of the tiny B0 twin:
    81.5% agreement with the model without activation quantizers when dropped naively, 99.98% with the Relu."""
    copy = model.clone()
    for op in copy.get_ordered_ops():
        if op.get_type_name() == "FakeQuantize" and op.get_friendly_name() in quantizers:
            source = op.input_value(0)
            low = _source(op.input_value(1))
            if (low.get_type_name() == "Constant" and not np.any(low.get_data()) and source.get_node().get_type_name() != "Relu"):
                source = ov_ops.relu(source).output(0)
            op.output(0).replace(source)
    copy.validate_nodes_and_infer_types()
    return copy


@dataclass
class IRQuantized:
    """An NNCF-quantized IR as the fallback sees it: layer groups are the units; a group in float loses the
    FakeQuantize nodes feeding its layers (NNCF's bias correction is off, so its biases are the fp32 ones)."""

    model: Any  # ov.Model with FakeQuantize nodes
    info: ArtifactInfo  # the metadata the IR will carry, with the inference precision it runs in

    def __post_init__(self) -> None:
        self.groups = _quantizer_groups(self.model)

    def units(self) -> list[str]:
        """The layer groups that have quantizers."""
        return list(self.groups)

    def graph(self, floated: set[str]) -> Any:
        """The IR with the `floated` groups in float."""
        return _bypass(self.model, {q for g in floated for q in self.groups[g]}) if floated else self.model

    def runner(self, floated: set[str]) -> OpenVINORunner:
        """The IR with the `floated` groups in float, on the CPU in the precision the artifact will run in."""
        return OpenVINORunner("int8.xml", "cpu", model=self.graph(floated), info=self.info)


def _source(value: Any) -> Any:
    """The node a value comes from, looking through layout and type changes."""
    node = value.get_node()
    while node.get_type_name() in ("Convert", "Reshape", "Transpose") and node.inputs():
        node = node.input_value(0).get_node()
    return node


def ir_attention_matmuls(model: Any) -> list[str]:
    """MatMuls of an IR whose inputs are both activations (attention's Q.K^T and softmax.V): they stay float,
    as in the ONNX int8 path (softmax probabilities of ~1/keys fall under one per-tensor int8 step)."""
    return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"
            and not any(_source(v).get_type_name() in ("Constant", "FakeQuantize") for v in op.input_values())]


def _layer_macs(model: Any, size: tuple[int, int]) -> dict[str, int]:
    """Multiply-accumulates of every MatMul/Convolution/ScaledDotProductAttention of an IR for one (1, 3, H, W)
    image. Attention ops (Q.K^T and softmax.V) never count as int8: they are not in `ir_weight_layers`."""
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


def ir_weight_layers(model: Any) -> dict[str, bool]:
    """Every MatMul/Convolution of an IR -> whether an input comes through a FakeQuantize (runs in int8)."""
    return {op.get_friendly_name(): any(_source(v).get_type_name() == "FakeQuantize" for v in op.input_values())
            for op in model.get_ordered_ops() if op.get_type_name() in WEIGHT_OPS}


def ov_layer_runner(model_bytes: bytes, quantized: bool) -> Callable[[np.ndarray], object]:
    """One of int8_probe's single-layer graphs on OpenVINO's CPU plugin, compiled as the runner compiles an IR
    of its precision (int8: the float part in bf16 where the CPU has it)."""
    core = openvino_core()
    wanted = get_precision("int8" if quantized else "fp32").openvino_inference_precision
    compiled = core.compile_model(core.read_model(model_bytes, ov.Tensor(np.empty(0, np.uint8))), "CPU",
                                  {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": inference_precision(core, "CPU", wanted)})
    request = compiled.create_infer_request()
    return lambda x: request.infer([x])


@dataclass
class IRHeldout:
    """What an int8 IR is judged on before it is written: the held-out images with the fp32 IR's outputs, the
    fp32 IR itself (the speed comparison) and the speed decision made before calibrating (or why none was)."""

    held: Heldout
    fp32: Any  # ov.Model
    fp32_info: ArtifactInfo
    before: dict | str

    def fp32_runner(self) -> OpenVINORunner:
        """An inactive runner of the fp32 IR on the CPU."""
        return OpenVINORunner("fp32.xml", "cpu", model=self.fp32, info=self.fp32_info)


def ir_speed_before_calibration(model: Any, fp32: OpenVINORunner, size: tuple[int, int], settings: Int8Settings,
                                info: ArtifactInfo, progress: Progress) -> dict | str:
    """The IR quantized by NNCF with placeholder statistics (one synthetic image: the same FakeQuantize placement,
    the same kernels) timed against the fp32 IR, where this CPU computes it exactly (int8_probe.speed_decision:
    Int8NotWorthIt on the class it is made for when measurably slower). The record, or why nothing was timed."""
    announce_emulation(settings.cpu_class, progress)
    reason = not_timed_here(settings)
    if reason is not None:
        return reason
    progress("int8: timing the int8 IR (placeholder statistics) against fp32 on this CPU, before calibrating")
    placeholder = nncf_ptq(model, [np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)], settings)
    return speed_decision(fp32, OpenVINORunner("int8.xml", "cpu", model=placeholder, info=info), size, settings,
                          "before calibration")


def ir_heldout(model: Any, graph: VerifiedGraph, settings: Int8Settings, info: ArtifactInfo,
               progress: Progress, heldout: Callable[[], tuple]) -> IRHeldout:
    """Decide whether int8 can pay here (before calibrating: Int8NotWorthIt where it cannot), then take the export's
    verdict images and PyTorch's logits on them (`heldout`: ExportSession.heldout), which decide the fallback."""
    fp32_info = replace(info, precision="fp32", cpu_class="", extra={**info.extra, "inference_precision": '"f32"'})
    fp32 = OpenVINORunner("fp32.xml", "cpu", model=model, info=fp32_info)
    before = ir_speed_before_calibration(model, fp32, graph.size, settings, info, progress)
    return IRHeldout(Heldout.of(heldout(), settings.targets()), model, fp32_info, before)


def settle_ir(quantized: Any, judged: IRHeldout, size: tuple[int, int], settings: Int8Settings, info: ArtifactInfo,
              progress: Progress, graph: VerifiedGraph | None = None) -> tuple[Any, dict]:
    """An IR with FakeQuantize nodes through the one fallback and the int8 checks (mostly int8; where the fallback
    returned layers to float, the speed decision again): (final IR, the manifest's int8 record, without the
    quantizer's own keys). `graph`: the verified fp32 graph, whose `keep_float` modules stay float from the start."""
    ir = IRQuantized(quantized, info)
    keep = graph.keep_float if graph is not None else ()
    kept = groups_inside(quantized, keep, graph.scopes) if graph is not None and keep else {}
    result = fall_back(ir, judged.held, settings.max_fallback, progress,
                       hint="calibrate on more representative images, try `vitseg qat`, or use fp16", kept=kept)
    final = ir.graph(result.units)
    layers = ir_weight_layers(final)
    int8_layers = {name for name, quantized in layers.items() if quantized}
    record = fallback_record(result, judged.held, settings.targets(), _layer_macs(final, size), int8_layers)
    check_mostly_int8(record, settings)
    after: dict | str = "not timed: the placement timed before calibration (no layer group returned to float)"
    if result.units and isinstance(judged.before, dict):  # another graph than the one timed: ask again
        progress("int8: timing the IR after the fallback against fp32")
        after = speed_decision(judged.fp32_runner(), ir.runner(result.units), size, settings, "after the fallback")
    return final, {**record, **cpu_record(settings, judged.before, after), "fallback_groups": sorted(result.units),
                   "quantized_layers": len(int8_layers),
                   "float_layers": [name for name, quantized in layers.items() if not quantized],
                   **({"keep_float": list(keep)} if keep else {})}


def overflow_fix(settings: Int8Settings) -> Any:
    """NNCF's overflow fix for the CPU class: without VNNI/AMX (the default class, avx2) weights keep to 7 bits,
    so no u8 x s8 pair saturates AVX2's int16 sums and every CPU class computes the same integers."""
    return nncf_advanced.OverflowFix.ENABLE if settings.cpu_class == SAFE_CLASS else nncf_advanced.OverflowFix.DISABLE


def nncf_ptq(model: Any, images: list[np.ndarray], settings: Int8Settings) -> Any:
    """NNCF's post-training quantization of the fp32 IR `model` on `images` ((1, 3, H, W) arrays) as vitseg runs it:
    transformer preset (SmoothQuant, min-max), attention's activation x activation MatMuls and the float op types
    ignored, the overflow fix of the CPU class, no bias correction."""
    # No bias correction: it shifts biases to offset the quantization of a layer's input, so a layer returned
    # to float by removing its FakeQuantize would keep a wrong bias (measured: same agreement without it).
    with library_output_on_stderr():
        return run_interruptible(  # Ctrl-C and SIGTERM end the command at once (machine.interrupt)
            nncf.quantize, model, nncf.Dataset(images), subset_size=len(images), unwind_s=UNWIND_S,
                             model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.PERFORMANCE,
                             ignored_scope=nncf.IgnoredScope(names=ir_attention_matmuls(model), types=list(FLOAT_OP_TYPES),
                                                             validate=False),
                             advanced_parameters=nncf_advanced.AdvancedQuantizationParameters(
                                 disable_bias_correction=True, overflow_fix=overflow_fix(settings)))


def quantize_ir(model: Any, graph: VerifiedGraph, settings: Int8Settings, info: ArtifactInfo,
                progress: Progress, heldout: Callable[[], tuple]) -> tuple[Any, dict]:
    """The int8 precision's OpenVINO step: NNCF PTQ (transformer preset: SmoothQuant, min-max) of the fp32 IR,
    then the one fallback on the export's verdict images (`heldout`); returns (int8 model, the manifest's int8
    section)."""
    judged = ir_heldout(model, graph, settings, info, progress, heldout)
    calib = load_inputs(settings.calib, "calib", settings.calib_images, graph.size)
    progress(f"int8: NNCF calibration on {len(calib)} images")
    quantized = nncf_ptq(model, [im.pixels[None] for im in calib.images], settings)
    final, record = settle_ir(quantized, judged, graph.size, settings, info, progress, graph)
    return final, {
        "quantizer": "nncf.quantize + vitseg mask-metric fallback", **record, "overflow_fix": str(overflow_fix(settings)),
        "attention": f"{len(ir_attention_matmuls(model))} activation x activation MatMuls kept float; "
                     "ScaledDotProductAttention ops (OpenVINO's fused attention) get NNCF's Q/K quantizers and count as "
                     "float MACs",
        "float_op_types": list(FLOAT_OP_TYPES),
        "calibration": calibration_record(calib, "nncf min-max (transformer preset)")}


def _convert(model: onnx.ModelProto, work: Path) -> Any:
    onnx.save(model, work / "fp32.onnx")
    return ov.convert_model(work / "fp32.onnx")


def _save(model: Any, info: ArtifactInfo, compress_to_fp16: bool, work: Path) -> Path:
    for key, value in info.metadata_props().items():
        model.set_rt_info(value, ["vitseg", key.split(".", 1)[1]])
    model.set_rt_info(info.extra["inference_precision"], ["vitseg", "inference_precision"])
    path = work / "model.xml"
    ov.save_model(model, path, compress_to_fp16=compress_to_fp16)
    # the IR names its weights: the .bin's sha256 in its rt_info, so a .bin of another model is refused even
    # without the manifest (saving again writes the same .bin: checked)
    weights = sha256_file(path.with_suffix(".bin"))
    model.set_rt_info(weights, ["vitseg", "bin_sha256"])
    ov.save_model(model, path, compress_to_fp16=compress_to_fp16)
    if sha256_file(path.with_suffix(".bin")) != weights:
        raise VitsegError("OpenVINO wrote different weights saving the same model twice", "report this as a bug in vitseg")
    return path


def openvino_group(session: ExportSession, plan: ExportPlan, progress: Progress,
                   quantize: Callable[..., tuple[Any, dict]] | None = None) -> ArtifactGroup:
    """Steps 3-6 for an IR: the fp32 graph (static batch unless asked), converted by OpenVINO, quantized where the
    precision asks (`quantize` replaces its step: `vitseg qat`'s), saved in a temp dir, judged against PyTorch.
    Returns the group to write (.xml, .bin, manifest); nothing is written here."""
    started = time.perf_counter()
    precision = plan.precision
    graph = session.fp32_graph(plan, progress)
    wanted = precision.openvino_inference_precision
    info = replace(plan.info, extra={**plan.info.extra, "inference_precision": f'"{wanted}"'})
    details: dict = {"weights": precision.openvino_weights()}
    with tempfile.TemporaryDirectory(prefix="vitseg-openvino-") as tmp:
        model = _convert(graph.for_plan(plan), Path(tmp))
        if precision.openvino_quantize is not None:
            model, quantization = (quantize or precision.openvino_quantize)(
                model, graph, plan.int8, info, progress, lambda: session.heldout(plan))
            details.update(quantization)
        xml = _save(model, info, precision.openvino_compress_to_fp16, Path(tmp))
        computed_in = inference_precision(openvino_core(), "CPU", wanted)
        if computed_in != wanted:  # OpenVINO would fall back to f32 silently: say it, and record it
            progress(f"{precision.name}: no {wanted} arithmetic here ({lacks_why('CPU', wanted)}), so the IR is judged as it runs here, in "
                     f"{computed_in}; CPUs with {wanted} compute it in {wanted}: run `vitseg verify` on one to judge that")
        verdict = session.judge(plan, OpenVINORunner(xml, "cpu", announce=False), "IR (OpenVINO CPU)", progress)
        details["inference_precision"] = {"hint": wanted, "checked_with": computed_in,
                                          "note": f"devices without {wanted} arithmetic compute in f32"}
        output, weights = plan.output, plan.output.with_suffix(".bin")
        files = {output: xml.read_bytes(), weights: xml.with_suffix(".bin").read_bytes()}
    manifest = manifest_for(session, plan, graph, verdict, files, details, started, bin=weights.name,
                            bin_sha256=hashlib.sha256(files[weights]).hexdigest())
    manifest.export_settings = {**(manifest.export_settings or {}), "openvino_version": ov.__version__}
    if details.get("int8_mac_share", 1.0) < 0.5:
        progress("int8: most of the compute stayed in float (see float_layers in the manifest)")
    return ArtifactGroup(output, manifest, files)


def check_ir_plan(plan: ExportPlan) -> None:
    """The openvino format's planning check: --keep-float needs a precision that keeps layers in float."""
    precision = plan.precision
    if plan.request.onnx.keep_float and precision.openvino_quantize is None:
        raise VitsegError(f"--keep-float: an OpenVINO {precision.name} IR computes in one precision as a whole (OpenVINO keeps "
                          "no module in f32 from Python)", "use --format onnx --precision fp16, or --precision int8")


def export_openvino(source: Any, output: Path, request: ExportRequest, progress: Progress,
                    quantize: Callable[..., tuple[Any, dict]] | None = None) -> ExportResult:
    """Export `source` (a LoadedCheckpoint or an ExportSession) to an OpenVINO IR at `output` (.xml, with .bin and
    .xml.json beside it) in the requested precision. `quantize` replaces the precision's quantization step (same
    arguments: `vitseg qat`'s). Raises BackendMissingError without openvino/nncf, VitsegError/ParityError
    otherwise; nothing is written then."""
    return export_with(source, "openvino", request, output,
                       lambda session, plan: openvino_group(session, plan, progress, quantize))


def ir_summary(path: Path, manifest: Any) -> list[str]:
    """What `vitseg export` prints about a written IR."""
    describe = get_precision(manifest.metadata["precision"]).describe
    lines = describe(manifest.precision_details or {}) if describe is not None else []
    batch = "dynamic batch" if manifest.metadata["dynamic_batch"] else "static batch 1"
    lines.append(f"wrote {path} + {manifest.extra['bin']} ({manifest.size_bytes / 1e6:.2f} MB, {batch}, weights "
                 f"{(manifest.precision_details or {}).get('weights')}) and {path.name}.json")
    return lines + parity_lines(manifest.self_parity)


__all__ = ["IRQuantized", "export_openvino", "ir_attention_matmuls", "quantize_ir", "ir_summary"]
