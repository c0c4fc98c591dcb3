"""nn.Module -> ONNX artifact.

The graph takes `pixels` (N,3,H,W) float in [0,1] (normalization inside), and returns `logits`
(N,C,H,W) at the input resolution and/or an in-graph argmax `mask` (N,H,W) uint8. Opset 17 by
default: native LayerNormalization, attention decomposed into MatMul/Softmax (TensorRT-portable).

We export with torch's TorchScript-based exporter (`dynamo=False`): it writes the requested opset
directly (the dynamo exporter exports at 18 and silently keeps 18 when down-conversion fails) and takes
about 2 s for B0 instead of 22 s. Either way the opset actually written is checked.

Before anything is written, the exported graph is run in ONNX Runtime against PyTorch (the unfolded
model) through the comparator and refused if it differs beyond the fp32 preset; the precision step
(vitseg_export/precisions.py) then converts it and the result is judged again by its own preset.
"""

from __future__ import annotations

import hashlib
import io
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import onnx
import torch
from torch import nn

from vitseg_export import __version__
from vitseg_export.artifact import ArtifactInfo, ExportManifest, ExportResult, write_artifact
from vitseg_export.checkpoint import LoadedCheckpoint
from vitseg_export.compare.comparator import Comparison, compare
from vitseg_export.compare.inputs import InputSet, load_inputs, noise_inputs
from vitseg_export.errors import ParityError, VitsegError
from vitseg_export.export.graph import graph_stats, remove_dead_nodes
from vitseg_export.modeling.optimize import fold
from vitseg_export.modeling.registry import Segmenter, get_family
from vitseg_export.modeling.scopes import ModuleScopes
from vitseg_export.precisions import Conversion, ConversionContext, Precision, get_precision
from vitseg_export.progress import Progress, silent
from vitseg_export.runners.base import Runner
from vitseg_export.runners.onnxruntime_runner import OnnxRuntimeRunner
from vitseg_export.runners.torch_runner import TorchRunner
from vitseg_export.settings import OUTPUT_CHOICES, ExportRequest, Int8Settings, OnnxExportSettings
from vitseg_export.tables import lazy_module

onnxslim = lazy_module("onnxslim")  # --simplify only

SUPPORTED_OPSETS = range(14, 22)

__all__ = ["ExportGraph", "ExportResult", "OnnxExportSettings", "check_export_request", "export_onnx", "onnx_from_module",
           "export_artifact", "parity_inputs", "parity_lines", "parity_record", "precision_parity_inputs", "self_parity",
           "onnx_summary"]


class ExportGraph(nn.Module):
    """Segmenter + the requested outputs, as the exported graph computes them."""

    def __init__(self, segmenter: Segmenter, outputs: list[str]):
        super().__init__()
        self.segmenter = segmenter
        self.outputs = outputs

    def forward(self, pixels: torch.Tensor):
        logits = self.segmenter(pixels)
        result = []
        if "logits" in self.outputs:
            result.append(logits)
        if "mask" in self.outputs:
            result.append(logits.argmax(1).to(torch.uint8))
        return tuple(result) if len(result) > 1 else result[0]


def check_export_request(loaded: LoadedCheckpoint, settings: OnnxExportSettings) -> tuple[int, int]:
    """Refuse what the model cannot honour; never change it silently. Returns the (H, W) to export at;
    raises VitsegError naming the problem."""
    meta = loaded.meta
    precision = get_precision(settings.precision)
    if settings.outputs not in OUTPUT_CHOICES:
        raise VitsegError(f"--outputs {settings.outputs} is not one of {', '.join(OUTPUT_CHOICES)}")
    if precision.needs_logits and settings.outputs == "mask":
        raise VitsegError(f"{precision.name} export needs the logits output (calibration and fallback compare logits)",
                          "use --outputs logits or both")
    if settings.keep_float and precision.convert is None:
        raise VitsegError(f"--keep-float applies to the reduced precisions (fp16, int8), not {precision.name}",
                          "drop --keep-float, or export with --precision fp16 or int8")
    if settings.opset not in SUPPORTED_OPSETS:
        raise VitsegError(f"opset {settings.opset} is not supported",
                          f"use {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} (17 recommended)")
    size = tuple(settings.image_size or meta.image_size)
    get_family(meta.family).check_export_size(meta.architecture, meta.config, size, settings.dynamic_size)
    if min(size) < 32:
        raise VitsegError(f"image size {size[0]}x{size[1]} is too small", "use at least 32x32")
    return size  # type: ignore[return-value]


def _dynamic_axes(settings: OnnxExportSettings) -> dict[str, dict[int, str]] | None:
    if not (settings.dynamic_batch or settings.dynamic_size):
        return None
    axes_in = {0: "batch"} if settings.dynamic_batch else {}
    if settings.dynamic_size:
        axes_in.update({2: "height", 3: "width"})
    axes = {"pixels": axes_in}
    for name in settings.output_names:
        dims = {0: "batch"} if settings.dynamic_batch else {}
        if settings.dynamic_size:
            dims.update({1: "height", 2: "width"} if name == "mask" else {2: "height", 3: "width"})
        axes[name] = dims
    return axes


def module_to_onnx(graph: nn.Module, size: tuple[int, int], settings: OnnxExportSettings) -> onnx.ModelProto:
    """An ExportGraph through torch.onnx (TorchScript) at the requested opset (checked), with vitseg's input and
    output names and dynamic axes. Also exports fake-quantized modules (`vitseg qat`) as Q/DQ graphs."""
    # Dynamic batch needs a batch-2 example, or the batch dimension may specialize to 1.
    example = torch.rand(2 if settings.dynamic_batch else 1, 3, *size, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about shape arithmetic and the exporter deprecation note
        torch.onnx.export(graph, (example,), buffer, input_names=["pixels"], output_names=settings.output_names,
                          opset_version=settings.opset, dynamic_axes=_dynamic_axes(settings), do_constant_folding=True,
                          dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != settings.opset:
        raise VitsegError(f"the exporter wrote opset {written}, not the requested {settings.opset}",
                          f"use --opset {written} or report the model; vitseg does not ship a silently changed opset")
    return model


def exported_module(loaded: LoadedCheckpoint, settings: OnnxExportSettings) -> tuple[Segmenter, list[str]]:
    """The module every export starts from: the checkpoint's Segmenter, folded unless `settings.fold` is off
    (eval mode). Returns (module, names of the rewrites applied)."""
    if not settings.fold:
        return loaded.segmenter().eval(), []
    folded_net, rewrites = fold(loaded.model.eval())
    return Segmenter(folded_net, loaded.meta.mean, loaded.meta.std).eval(), rewrites


def onnx_from_module(loaded: LoadedCheckpoint, settings: OnnxExportSettings, size: tuple[int, int],
                     progress: Progress = silent) -> tuple[onnx.ModelProto, list[str]]:
    """The fp32 ONNX graph of the checkpoint (folded unless `settings.fold` is off), at the requested
    opset (checked), simplified when asked. Returns (graph, names of the rewrites applied)."""
    exported, rewrites = exported_module(loaded, settings)
    progress(f"exporting {loaded.meta.architecture} to ONNX opset {settings.opset}")
    model = module_to_onnx(ExportGraph(exported, settings.output_names).eval(), size, settings)
    if settings.simplify:
        model = _simplify(model, progress)
    remove_dead_nodes(model)
    return model, rewrites


def parity_inputs(info: ArtifactInfo, count: int, noise: bool = True, spec: str = "synthetic") -> InputSet:
    """The first `count` images of `spec`'s validation split plus, when `noise`, a few uniform-noise images, at
    every shape the artifact declares (ArtifactInfo.declared_shapes: every batch size, every size)."""
    shapes = info.declared_shapes()
    size = tuple(info.image_size)
    inputs = load_inputs(spec, "val", max(1, count), size)  # type: ignore[arg-type]
    if noise:
        inputs = inputs + noise_inputs(size, NOISE_IMAGES)  # type: ignore[arg-type]
    return inputs.at_shapes(shapes)


NOISE_IMAGES = 4


def self_parity(loaded: LoadedCheckpoint, candidate: Runner, inputs: InputSet, precision: str = "fp32",
                int8: Int8Settings | None = None) -> Comparison:
    """Run `candidate` (an artifact not yet written) against PyTorch (the unfolded model) through the
    comparator, at every shape of `inputs`, batch consistency included; raise ParityError beyond the precision's
    preset (a calibrated precision: the targets the user set, default the preset), naming the shape — nothing
    has been written then. Returns the passing comparison."""
    row = get_precision(precision)
    thresholds = row.export_thresholds(int8.targets() if int8 is not None else None)
    with TorchRunner(loaded) as reference, candidate:
        result = compare(reference, {"graph": candidate}, inputs, thresholds, len(loaded.meta.class_names),
                         mask_must_match_logits=row.masks_match_logits, consistency=row.consistency(thresholds))
    verdict = result.comparisons["graph"]
    if verdict.failures:
        raise ParityError(f"the exported {precision} graph differs from PyTorch{verdict.failed_at()}: "
                          f"{'; '.join(verdict.failures)}; nothing was written", row.parity_hint)
    assert verdict.summary is not None
    return verdict


def parity_record(verdict: Comparison, inputs: InputSet) -> dict:
    """The manifest's `self_parity`: the worst case over shapes, each shape, batch consistency, the source."""
    return {**verdict.to_json(), "source": inputs.source}


def graph_candidate(model: onnx.ModelProto, info: ArtifactInfo) -> OnnxRuntimeRunner:
    """An ONNX Runtime runner for an in-memory graph that will carry `info`."""
    return OnnxRuntimeRunner(f"{info.precision}.onnx", "cpu", model_bytes=model.SerializeToString(), info=info)


def precision_parity_inputs(precision: Precision, settings: OnnxExportSettings, info: ArtifactInfo) -> InputSet:
    """The inputs an artifact of `precision` is judged on before it is written: --parity images (at least the
    precision's minimum) and, where the precision asks, noise, at every shape the artifact declares."""
    count = max(settings.parity_inputs, precision.min_parity_images)
    return parity_inputs(info, count, precision.parity_on_noise, settings.parity_data)


@dataclass
class VerifiedGraph:
    """The fp32 ONNX graph of a checkpoint, proved equal to PyTorch: what every format starts from."""

    model: onnx.ModelProto
    size: tuple[int, int]
    info: ArtifactInfo  # the metadata the artifact will carry
    rewrites: list[str]
    parity: Comparison
    inputs: InputSet
    scopes: ModuleScopes  # which of its nodes belong to which module (--keep-float, --locate)
    keep_float: tuple[str, ...] = ()  # modules the reduced precision keeps in float, checked against `scopes`


def verified_fp32_graph(loaded: LoadedCheckpoint, settings: OnnxExportSettings, output: Path,
                        progress: Progress = silent, fmt: str = "onnx") -> VerifiedGraph:
    """Check the request, export the fp32 graph and judge it against PyTorch (fp32 preset) on real images
    and noise (and a second size when dynamic). Raises VitsegError/ParityError; writes nothing."""
    size = check_export_request(loaded, settings)
    info = artifact_info(loaded, settings, size, output, fmt)
    scopes = ModuleScopes.record(ExportGraph(exported_module(loaded, settings)[0], ["logits"]).eval(), torch.zeros(1, 3, *size))
    keep_float = scopes.check(settings.keep_float)  # an unknown module: one line naming the nearest, before any work
    model, rewrites = onnx_from_module(loaded, settings, size, progress)
    inputs = parity_inputs(info, settings.parity_inputs, spec=settings.parity_data)
    progress(f"checking parity against PyTorch (ONNX Runtime CPU) at {_shapes_text(inputs)}")
    parity = self_parity(loaded, graph_candidate(model, replace(info, precision="fp32")), inputs)
    return VerifiedGraph(model, size, info, rewrites, parity, inputs, scopes, keep_float)


def _shapes_text(inputs: InputSet) -> str:
    return ", ".join(f"batch {'/'.join(map(str, inputs.batch_sizes_at(size)))} {size[0]}x{size[1]}" for size in inputs.sizes())


def export_settings_record(settings: OnnxExportSettings, size: tuple[int, int]) -> dict:
    """The manifest's `export_settings`: what was asked, at which size, by which exporter versions."""
    return {**asdict(settings), "image_size": list(size), "exporter": "torch.onnx (TorchScript)",
            "torch_version": torch.__version__, "onnx_version": onnx.__version__}


def artifact_info(loaded: LoadedCheckpoint, settings: OnnxExportSettings, size: tuple[int, int], path: Path,
                  fmt: str = "onnx") -> ArtifactInfo:
    """The metadata the artifact will carry."""
    meta = loaded.meta
    return ArtifactInfo(path, fmt, meta.architecture, list(meta.class_names), size, tuple(meta.mean), tuple(meta.std),
                        settings.precision, settings.opset, settings.output_names, settings.dynamic_batch,
                        settings.dynamic_size, loaded.sha256, __version__, family=meta.family,
                        source_checkpoint=loaded.source)


def _embed(model: onnx.ModelProto, info: ArtifactInfo) -> bytes:
    del model.metadata_props[:]
    for key, value in info.metadata_props().items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "vitseg-export"
    model.producer_version = __version__
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def export_onnx(loaded: LoadedCheckpoint, output: Path, settings: OnnxExportSettings,
                progress: Progress = silent, int8: Int8Settings | None = None,
                convert: Callable[[onnx.ModelProto, ConversionContext], Conversion] | None = None) -> ExportResult:
    """Export `loaded` to an ONNX artifact at `output` (+ `<output>.json` manifest) in the requested
    precision. Raises VitsegError for requests the model cannot honour and ParityError when a graph
    differs from PyTorch beyond its preset; nothing is written then. `convert` replaces the precision's
    converter (`vitseg qat` brings its own int8 graph through the same checks and manifest)."""
    t0 = time.perf_counter()
    graph = verified_fp32_graph(loaded, settings, output, progress)
    precision = get_precision(settings.precision)
    model, details, parity, inputs, files = graph.model, None, graph.parity, graph.inputs, {}
    info = graph.info
    if precision.calibrated and (int8 or Int8Settings()).target == "cpu":  # int8 for CPUs: the class it is made for
        info = replace(info, cpu_class=(int8 or Int8Settings()).cpu_class)
    convert = convert or precision.convert
    if convert is not None:
        context = ConversionContext(graph.size, int8 or Int8Settings(), settings.fp16_io,
                                    output.parent / ".vitseg-calibration-cache", progress, settings.parity_data,
                                    graph.keep_float, graph.scopes)
        conversion = convert(model, context)
        model, details, files = conversion.model, conversion.details, conversion.files
        inputs = precision_parity_inputs(precision, settings, graph.info)
        progress(f"checking {precision.name} parity against PyTorch at {_shapes_text(inputs)}")
        parity = self_parity(loaded, graph_candidate(model, info), inputs, precision.name, int8)
    data = _embed(model, info)
    manifest = ExportManifest(
        artifact=output.name, format="onnx", sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data),
        metadata=info.metadata_json(), export_settings=export_settings_record(settings, graph.size),
        self_parity=parity_record(parity, inputs), rewrites=graph.rewrites,
        fp32_graph_parity=graph.parity.to_json(), precision_details=details or {},
        export_seconds=round(time.perf_counter() - t0, 2), random_weights=loaded.kind == "random", source=loaded.source_record(),
        extra={"graph": graph_stats(model)})
    write_artifact(output, {output: data, **files}, manifest)
    return ExportResult(output, manifest, model)


def _simplify(model: onnx.ModelProto, progress) -> onnx.ModelProto:
    """onnxslim's simplification. The result is what the fp32 self-parity then judges against PyTorch,
    like every graph: a simplification that changes outputs beyond the fp32 preset is refused there."""
    progress("simplifying with onnxslim")
    return onnxslim.slim(model)


def export_artifact(loaded: LoadedCheckpoint, output: Path, request: ExportRequest,
                    progress: Progress = silent) -> ExportResult:
    """The onnx format's exporter (formats.py): `export_onnx` with the request's ONNX and int8 settings."""
    return export_onnx(loaded, output, request.onnx, progress=progress, int8=request.int8)


def parity_lines(parity: dict | None) -> list[str]:
    """What `vitseg export` prints about the self-parity check: the worst case, and the shapes it covered."""
    if not parity:
        return []
    line = f"self-parity vs {parity.get('reference', 'PyTorch')} on {parity['images']} inputs: agreement " \
           f"{parity['pixel_agreement'] * 100:.4f}%"
    if parity["max_abs_logit_diff"] is not None:
        line += f", max |logit diff| {parity['max_abs_logit_diff']:.2e}"
    shapes = ", ".join(f"{s['batch']}x{s['height']}x{s['width']}" for s in parity.get("shapes", []))
    consistency = parity.get("batch_consistency") or {}
    if shapes:
        line += f" (worst of shapes {shapes}"
        line += f"; batch consistency {'pass' if consistency.get('passed') else 'FAILED'})" if consistency.get("images_compared") else ")"
    return [line]


def onnx_summary(path: Path, manifest: ExportManifest) -> list[str]:
    """What `vitseg export` prints about a written ONNX artifact."""
    describe = get_precision(manifest.metadata["precision"]).describe
    meta = manifest.metadata
    lines = describe(manifest.precision_details or {}) if describe is not None else []
    lines.append(f"wrote {path} ({manifest.size_bytes / 1e6:.2f} MB, opset {meta['opset']}, outputs "
                 f"{', '.join(meta['outputs'])}) and {path.name}.json")
    return lines + parity_lines(manifest.self_parity)
