"""`vitseg qat --format onnx`: NVIDIA Model Optimizer's quantization-aware training, written as a Q/DQ ONNX graph
for TensorRT (--target trt) or ONNX Runtime's CPU provider (--target cpu).

ModelOpt's QAT is its PTQ on the PyTorch model, then training: `mtq.quantize` puts fake quantizers on the
folded Segmenter's Linear and Conv layers (symmetric int8, max calibration) and vitseg_export/qat.py fine-tunes
it. LayerNorm inputs stay float on both targets (our PTQ keeps them float too), and so do attention's
activation x activation MatMuls (plain torch.matmul, which ModelOpt leaves alone). For --target cpu the
quantizers follow what ONNX Runtime's CPU kernels run faster (export/int8.py): per-tensor weights, depthwise
convolutions float, 7-bit weights unless the target CPU has VNNI/AMX. The TorchScript exporter writes the fake
quantizers as QuantizeLinear/DequantizeLinear pairs; the weights become int8 initializers, as every quantizer
writes them. From there it is an int8 graph like the PTQ one: the same fallback (a layer returned to float
computes with the weights it was trained with: their dequantized int8 values), the same checks, the same
self-parity against the PyTorch fp32 model and the same manifest, plus its `qat` record.
"""

from __future__ import annotations

import copy
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import onnx
import torch

from vitseg_export.compare.inputs import InputSet, load_inputs
from vitseg_export.errors import VitsegError
from vitseg_export.export.fallback import Heldout, calibration_record
from vitseg_export.export.graph import (
    module_to_onnx,
    quantize_constant_weights,
    remove_dead_nodes,
    remove_identity_casts,
)
from vitseg_export.export.int8 import check_int8_settings, node_macs, settle_graph, speed_before_calibration
from vitseg_export.export.onnx_export import export_onnx
from vitseg_export.export.quiet import library_output_on_stderr
from vitseg_export.machine.cpu import SAFE_CLASS
from vitseg_export.machine.interrupt import UNWIND_S, run_interruptible
from vitseg_export.modeling.export_graph import ExportGraph, exported_module
from vitseg_export.precisions import Conversion, ConversionContext
from vitseg_export.progress import Progress
from vitseg_export.runners.base import require_module
from vitseg_export.settings import ExportRequest, Int8Settings, OnnxExportSettings, QatSettings
from vitseg_export.train.qat import calibration_batches, fine_tuned

WEIGHT_BITS_SAFE = 7  # --target cpu for CPUs without VNNI/AMX: no u8 x s8 pair saturates int16


def _mtq() -> Any:
    return require_module("modelopt.torch.quantization", "`vitseg qat --format onnx` needs NVIDIA Model Optimizer",
                          "pip install 'vitseg-export[torch]' (it brings nvidia-modelopt)")


def depthwise_modules(module: torch.nn.Module) -> list[str]:
    """Names of the module's depthwise (grouped) convolutions."""
    return [name for name, m in module.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]


def quant_config(student: torch.nn.Module, settings: Int8Settings) -> dict:
    """ModelOpt's int8 configuration for the target: its INT8_DEFAULT_CFG (per-channel weights, per-tensor
    activations, Linear and Conv), LayerNorm float, and for --target cpu what ONNX Runtime runs in int8."""
    config = copy.deepcopy(_mtq().INT8_DEFAULT_CFG)
    entries = config["quant_cfg"]
    entries.append({"quantizer_name": "*", "parent_class": "nn.LayerNorm", "enable": False})
    if settings.target == "cpu":
        entries.append({"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": None}})
        entries += [{"quantizer_name": f"{name}.*", "enable": False} for name in depthwise_modules(student)]
    return config


def _saturation_safe_weights(model: torch.nn.Module) -> int:
    """Widen every enabled weight quantizer's range by 127/63, so its int8 values stay within +-63 (7 bits):
    the remedy onnxruntime's reduce_range applies, here before training so QAT learns with it."""
    widened = 0
    for name, quantizer in model.named_modules():
        if name.endswith("weight_quantizer") and getattr(quantizer, "is_enabled", False) and quantizer.amax is not None:
            quantizer.amax = quantizer.amax * (127 / (2 ** (WEIGHT_BITS_SAFE - 1) - 1))
            widened += 1
    return widened


def fake_quantized(student: torch.nn.Module, calib: InputSet, settings: Int8Settings) -> torch.nn.Module:
    """The folded Segmenter with ModelOpt's fake quantizers, calibrated (max) on `calib`: ModelOpt's PTQ."""
    batches = calibration_batches(calib)

    def forward_loop(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for batch in batches:
                model(batch)

    with library_output_on_stderr():
        quantized = run_interruptible(_mtq().quantize, student, quant_config(student, settings), forward_loop=forward_loop,
                                      unwind_s=UNWIND_S)  # Ctrl-C and SIGTERM end it at once (machine.interrupt)
    if settings.target == "cpu" and settings.cpu_class == SAFE_CLASS:
        _saturation_safe_weights(quantized)
    return quantized.eval()


def qdq_graph(model: torch.nn.Module, size: tuple[int, int], export_settings: OnnxExportSettings) -> onnx.ModelProto:
    """The fake-quantized module as a Q/DQ graph: int8 weight initializers, no float -> float Casts."""
    graph = module_to_onnx(ExportGraph(model, export_settings.output_names).eval(), size, export_settings)
    if not quantize_constant_weights(graph):
        raise VitsegError("the QAT export has no quantized weights", "report this with the checkpoint")
    remove_identity_casts(graph)
    remove_dead_nodes(graph)
    return graph


def qat_conversion(model: onnx.ModelProto, ctx: ConversionContext, *, loaded: Any, qat: QatSettings,
                   export_settings: OnnxExportSettings, on_step: Progress | None) -> Conversion:
    """export_onnx's int8 step for `vitseg qat`: the verified fp32 `model` is the baseline of the speed check, the
    export's verdict images and PyTorch's logits on them decide the fallback; the Q/DQ graph comes from the
    fine-tuned fake-quantized PyTorch model."""
    settings, size, progress = ctx.int8, ctx.image_size, ctx.progress
    check_int8_settings(model, settings)
    with tempfile.TemporaryDirectory(prefix="vitseg-qat-") as work:  # the speed decision, before any training
        before = speed_before_calibration(model, size, settings, Path(work), progress)
    calib = load_inputs(settings.calib, "calib", settings.calib_images, size)
    if ctx.heldout is None:
        raise VitsegError("QAT needs the export's verdict images", "convert through the export pipeline")
    held = Heldout.of(ctx.heldout(), settings.targets())
    held_inputs = held.inputs
    teacher = loaded.segmenter().eval()
    # folded as the fp32 graph was; a copy, as the quantizers swap its modules in place and the teacher and
    # the self-parity reference are the checkpoint's own model
    student = copy.deepcopy(exported_module(loaded.model, loaded.meta.mean, loaded.meta.std, export_settings.fold)[0])
    progress(f"int8: ModelOpt PTQ of the PyTorch model on {len(calib)} images (the start of QAT)")
    quantized = fake_quantized(student, calib, settings)
    record_qat = fine_tuned(quantized, teacher, qat, size, held_inputs, held.num_classes, progress, on_step)
    qdq = qdq_graph(quantized, size, export_settings)
    macs = node_macs(qdq, held_inputs.images[0].pixels[None])
    final, record = settle_graph(qdq, model, None, macs, size, settings, held, before, progress, ctx.keep_float, ctx.scopes)
    safe = settings.target == "cpu" and settings.cpu_class == SAFE_CLASS
    details = {
        "quantizer": "modelopt.torch.quantization (mtq.quantize) + quantization-aware training + vitseg mask-metric "
                     "fallback", **record,
        "calibration": calibration_record(calib, "max (ModelOpt, PyTorch)"),
        "quantization": {"activation_type": "int8 symmetric per-tensor",
                         "weight_type": ("7-bit (saturation-safe) " if safe else "8-bit ") + "symmetric " +
                                        ("per-tensor" if settings.target == "cpu" else "per-channel (output-channel axis)"),
                         "layernorm": "float", "attention_matmuls": "float (activation x activation torch.matmul)",
                         "depthwise_convs": "float" if settings.target == "cpu" else "int8",
                         "min_agreement": settings.targets().min_agreement,
                         "min_miou_vs_reference": settings.targets().min_miou_vs_reference,
                         "heldout": held_inputs.source, "heldout_images": len(held_inputs)},
        # the graph's float part is fp32; for TensorRT the engine build chooses (--precision of the engine)
        "float_part": "fp32",
        "qat": {**record_qat, "layers_left_float": [row["node"] for row in record["fallback_layers"]]}}
    return Conversion(final, details, {})


def qat_onnx(loaded: Any, output: Path, request: ExportRequest, qat: QatSettings, progress: Progress,
             on_step: Progress | None = None) -> Any:
    """`vitseg qat --format onnx`: a Q/DQ int8 ONNX graph at `output` trained with fake quantization; ExportResult."""
    convert = partial(qat_conversion, loaded=loaded, qat=qat, export_settings=request.onnx, on_step=on_step)
    return export_onnx(loaded, output, request.onnx, progress=progress, int8=request.int8, convert=convert)
