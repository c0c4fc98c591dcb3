"""The ONNX format's materializer: the pipeline's graph (export/pipeline.py), converted to the requested precision,
with vitseg's metadata embedded, judged at every planned shape, written with its manifest as one group.

The graph takes `pixels` (N,3,H,W) float in [0,1] (normalization inside), and returns `logits` (N,C,H,W) at the
input resolution and/or an in-graph argmax `mask` (N,H,W) uint8. Opset 17 by default: native LayerNormalization,
attention decomposed into MatMul/Softmax (TensorRT-portable).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import onnx

from vitseg_export import __version__
from vitseg_export.artifact import ArtifactGroup, ArtifactInfo, ExportManifest, ExportResult
from vitseg_export.compare.report import parity_lines
from vitseg_export.export.graph import graph_stats
from vitseg_export.export.pipeline import ExportPlan, ExportSession, convert_graph, export_with, manifest_for
from vitseg_export.precisions import Conversion, ConversionContext, get_precision
from vitseg_export.progress import Progress, silent
from vitseg_export.settings import ExportRequest, Int8Settings, OnnxExportSettings

Converter = Callable[[onnx.ModelProto, ConversionContext], Conversion]

__all__ = ["ExportResult", "OnnxExportSettings", "export_artifact", "export_onnx", "onnx_group", "onnx_summary"]


def embed_metadata(graph: onnx.ModelProto, info: ArtifactInfo) -> tuple[onnx.ModelProto, bytes]:
    """A copy of the graph with vitseg's metadata (`vitseg.*` metadata_props), checked by onnx's full checker, and
    its bytes (the graph itself is left as it is: a session's fp32 graph serves several artifacts)."""
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    del model.metadata_props[:]
    for key, value in info.metadata_props().items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "vitseg-export"
    model.producer_version = __version__
    onnx.checker.check_model(model, full_check=True)
    return model, model.SerializeToString()


def onnx_group(session: ExportSession, plan: ExportPlan, progress: Progress = silent,
               convert: Converter | None = None) -> ArtifactGroup:
    """Steps 3-6 for an ONNX artifact: the fp32 graph, converted (`convert` replaces the precision's converter),
    embedded, judged. Returns the group to write (nothing is written here); ParityError when it differs."""
    started = time.perf_counter()
    graph = session.fp32_graph(plan, progress)
    conversion = convert_graph(session, plan, graph, progress, convert)
    embedded, data = embed_metadata(conversion.model, plan.info)
    verdict = session.judged_graph(plan, graph, conversion.model, data, "graph", progress)
    manifest = manifest_for(session, plan, graph, verdict, {plan.output: data}, conversion.details, started,
                            graph=graph_stats(conversion.model))
    return ArtifactGroup(plan.output, manifest, {plan.output: data, **conversion.files}, embedded)


def export_onnx(source, output: Path, settings: OnnxExportSettings, progress: Progress = silent,
                int8: Int8Settings | None = None, convert: Converter | None = None, golden: bool = False) -> ExportResult:
    """Export `source` (a LoadedCheckpoint, or an ExportSession that shares its graph and reference) to an ONNX
    artifact at `output` (+ `<output>.json` manifest) in the requested precision. Raises VitsegError for requests
    the model cannot honour and ParityError when the artifact differs from PyTorch beyond its preset; nothing is
    written then. `convert` replaces the precision's converter (`vitseg qat` brings its own int8 graph); `golden`:
    NAME.golden beside it, in its group."""
    request = ExportRequest("onnx", onnx=settings, int8=int8 or Int8Settings(), golden=golden)
    return export_with(source, "onnx", request, output, lambda session, plan: onnx_group(session, plan, progress, convert))


def export_artifact(source, output: Path, request: ExportRequest, progress: Progress = silent) -> ExportResult:
    """The onnx format's exporter (formats.py): `export_onnx` with the request's ONNX and int8 settings."""
    return export_onnx(source, output, request.onnx, progress=progress, int8=request.int8, golden=request.golden)


def onnx_summary(path: Path, manifest: ExportManifest) -> list[str]:
    """What `vitseg export` prints about a written ONNX artifact."""
    describe = get_precision(manifest.metadata["precision"]).describe
    meta = manifest.metadata
    lines = describe(manifest.precision_details or {}) if describe is not None else []
    lines.append(f"wrote {path} ({manifest.size_bytes / 1e6:.2f} MB, opset {meta['opset']}, outputs "
                 f"{', '.join(meta['outputs'])}) and {path.name}.json")
    return lines + parity_lines(manifest.self_parity)
