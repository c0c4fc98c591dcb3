"""`vitseg qat --format openvino`: NNCF's quantization-aware training, written as an OpenVINO int8 IR.

NNCF's QAT is its PTQ on the PyTorch model, then training: `nncf.quantize` puts FakeQuantize hooks (with
SmoothQuant, transformer preset) into the folded Segmenter at the places and ranges its PTQ chooses, with the
float op types of the IR path kept float (depthwise convolutions, attention's activation x activation
MatMuls), vitseg_export/qat.py fine-tunes it, and OpenVINO's PyTorch frontend converts it to an IR with
FakeQuantize nodes and int8 weights. From there it is an int8 IR like the PTQ one: the same fallback, the same
checks (mostly int8; not slower than fp32 on the CPU class it is for), the same self-parity against the
PyTorch fp32 model and the same manifest, plus its `qat` record.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from typing import Any

import torch

from vitseg_export.compare.inputs import load_inputs
from vitseg_export.errors import VitsegError
from vitseg_export.export.fallback import calibration_record
from vitseg_export.export.openvino_export import (
    FLOAT_OP_TYPES,
    export_openvino,
    ir_heldout,
    ir_weight_layers,
    overflow_fix,
    settle_ir,
)
from vitseg_export.export.pipeline import VerifiedGraph
from vitseg_export.export.quiet import library_output_on_stderr
from vitseg_export.machine.extensions import prepare_nncf_torch
from vitseg_export.machine.interrupt import UNWIND_S, run_interruptible
from vitseg_export.modeling.export_graph import ExportGraph, exported_module
from vitseg_export.progress import Progress
from vitseg_export.settings import ExportRequest, Int8Settings, OnnxExportSettings, QatSettings
from vitseg_export.tables import lazy_module
from vitseg_export.train.qat import calibration_batches, fine_tuned

ov = lazy_module("openvino")
nncf = lazy_module("nncf")
nncf_advanced = lazy_module("nncf.quantization.advanced_parameters")


def depthwise_patterns(module: torch.nn.Module) -> list[str]:
    """NNCF ignored-scope patterns for the module's depthwise convolutions. NNCF's PyTorch node names drop
    ModuleList indices (net.encoder.block.0.0.mlp.dwconv.dwconv is net/encoder/mlp/dwconv/dwconv/conv2d/0),
    so each pattern is the module path after its last index."""
    patterns = set()
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1:
            parts = name.split(".")
            last_index = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
            patterns.add(r"(.*/)?" + "/".join(parts[last_index + 1:]) + r"/conv2d/\d+")
    return sorted(patterns)


def _to_ir(model: torch.nn.Module, graph: VerifiedGraph) -> Any:
    """The fine-tuned model as an IR with vitseg's input and output names and the fp32 IR's shapes."""
    outputs = graph.info.outputs
    with torch.no_grad(), library_output_on_stderr():
        ir = ov.convert_model(ExportGraph(model, list(outputs)).eval(), example_input=torch.rand(1, 3, *graph.size))
    ir.inputs[0].get_tensor().set_names({"pixels"})
    for port, name in zip(ir.outputs, outputs):
        port.get_tensor().set_names({name})
    batch = -1 if graph.info.dynamic_batch else 1
    ir.reshape({ir.inputs[0]: ov.PartialShape([batch, 3, -1, -1] if graph.info.dynamic_size else [batch, 3, *graph.size])})
    return ir


def qat_ir(model: Any, graph: VerifiedGraph, settings: Int8Settings, info: Any, progress: Progress, heldout: Any, *,
           loaded: Any, qat: QatSettings, export_settings: OnnxExportSettings, on_step: Progress | None) -> tuple[Any, dict]:
    """export_openvino's quantization step for `vitseg qat`: (int8 IR, the manifest's int8 section)."""
    judged = ir_heldout(model, graph, settings, info, progress, heldout)  # speed (before calibrating), the verdict's images
    extension = prepare_nncf_torch(progress)  # built here, not inside NNCF's 60-second first-use limit
    calib = load_inputs(settings.calib, "calib", settings.calib_images, graph.size)
    teacher = loaded.segmenter().eval()
    # folded as the fp32 graph was; a copy, as the quantizers swap its modules in place and the teacher and
    # the self-parity reference are the checkpoint's own model
    student = copy.deepcopy(exported_module(loaded.model, loaded.meta.mean, loaded.meta.std, export_settings.fold)[0])
    num_classes = len(graph.info.class_names)
    overflow = overflow_fix(settings)
    progress(f"int8: NNCF PTQ of the PyTorch model on {len(calib)} images (the start of QAT)")
    with library_output_on_stderr():
        batches = calibration_batches(calib)
        quantized = run_interruptible(  # Ctrl-C and SIGTERM end the command at once (machine.interrupt)
            nncf.quantize, student, nncf.Dataset(batches), subset_size=len(batches),  # subset_size counts dataset items: batches
            model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.PERFORMANCE,
            # attention's q @ k^T and probs @ v are the only torch.matmul calls (Linear layers are "linear")
            ignored_scope=nncf.IgnoredScope(types=["matmul"], patterns=depthwise_patterns(student), validate=False),
            advanced_parameters=nncf_advanced.AdvancedQuantizationParameters(overflow_fix=overflow), unwind_s=UNWIND_S)
    record_qat = fine_tuned(quantized, teacher, qat, graph.size, judged.held.inputs, num_classes, progress, on_step)
    ir = _to_ir(quantized, graph)
    depthwise = {op.get_friendly_name() for op in ir.get_ordered_ops() if op.get_type_name() == "GroupConvolution"}
    quantized_depthwise = [name for name, q in ir_weight_layers(ir).items() if q and name in depthwise]
    if quantized_depthwise:
        raise VitsegError(f"NNCF quantized depthwise convolutions meant to stay float ({quantized_depthwise[0]})",
                          "report this with the checkpoint")
    final, record = settle_ir(ir, judged, graph.size, settings, info, progress, graph)
    return final, {
        "quantizer": "nncf.quantize (PyTorch) + quantization-aware training + vitseg mask-metric fallback", **record,
        "overflow_fix": str(overflow), "float_op_types": list(FLOAT_OP_TYPES),
        "attention": "activation x activation MatMuls (torch.matmul) kept float",
        "calibration": calibration_record(calib, "nncf min-max (transformer preset), PyTorch"),
        "qat": {**record_qat, "layers_left_float": record["float_layers"], "nncf_extension": extension["status"]}}


def qat_openvino(loaded: Any, output: Path, request: ExportRequest, qat: QatSettings, progress: Progress,
                 on_step: Progress | None = None) -> Any:
    """`vitseg qat --format openvino`: an int8 IR at `output` trained with fake quantization; ExportResult."""
    step = partial(qat_ir, loaded=loaded, qat=qat, export_settings=request.onnx, on_step=on_step)
    return export_openvino(loaded, output, request, progress, quantize=step)
