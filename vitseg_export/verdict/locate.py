"""artifact + reference checkpoint -> where the artifact first leaves PyTorch: `vitseg verify --locate`.

The artifact's intermediate tensors are compared with the PyTorch reference's at the boundaries the model family
declares (modeling/registry.py `Boundary`: the normalized input, each patch embedding, block, stage output and
decoder projection, the classifier, the logits), each named by its module path. The artifact's tensor for a
boundary is found by the names the exporters keep: ONNX node names carry the module path as TorchScript scopes
(`/segmenter/net/encoder/block.2.0/...`), OpenVINO friendly names carry them as the ONNX names or as PyTorch's
(`__module.segmenter.net.encoder.block.2.0/...`), and a TensorRT engine is rebuilt from its ONNX with the
boundary tensors marked as outputs. The reference is the module that was exported (the exact rewrites applied
where the artifact has them: a folded decoder's projections are compared with the folded PyTorch head's, and
say so).

Bounded work, never every tensor at once: the level-0 boundaries first (stages, decoder), then the blocks of the
first one that diverges, then that block's layers; a few images (4). Per boundary: cosine similarity, SQNR (dB),
max and mean |diff| relative to the reference's range, non-finite values; the first boundary past the
precision's allowance (its row's `locate_sqnr_db`) is the first divergence, and for Q/DQ graphs the quantized
layers inside it are ranked by how much returning each alone to float restores that boundary.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vitseg_export.artifact import ArtifactInfo, ExportManifest, manifest_path, read_manifest, write_artifact
from vitseg_export.checkpoint import load_checkpoint
from vitseg_export.compare.inputs import load_inputs
from vitseg_export.errors import VitsegError
from vitseg_export.export.graph import to_float
from vitseg_export.export.int8 import quantized_layers
from vitseg_export.formats import read_artifact_info
from vitseg_export.machine.memory import peak_rss_mb
from vitseg_export.modeling.export_graph import ExportGraph, exported_module
from vitseg_export.modeling.registry import Boundary, Segmenter, get_family
from vitseg_export.modeling.scopes import NET, ROOT, ModuleScopes
from vitseg_export.precisions import get_precision
from vitseg_export.progress import Progress, silent
from vitseg_export.runners import runner_for
from vitseg_export.runners.onnxruntime_runner import OnnxRuntimeRunner
from vitseg_export.runners.openvino_runner import OpenVINORunner, openvino_core
from vitseg_export.settings import EngineSettings
from vitseg_export.tables import lazy_module
from vitseg_export.verdict.verify import check_reference

onnx = lazy_module("onnx")
tensorrt_engine = lazy_module("vitseg_export.export.tensorrt_engine")  # rebuilds an engine with boundary outputs
tensorrt_editions = lazy_module("vitseg_export.runners.tensorrt_editions")

LOCATE_IMAGES = 4
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "FakeQuantize", "Convert")


@dataclass
class BoundaryFigures:
    """How the artifact compares with PyTorch at one boundary."""

    name: str
    kind: str
    level: int
    tensor: str | None  # the artifact's tensor compared (None: none found)
    shape: list[int] | None = None
    cosine: float | None = None
    sqnr_db: float | None = None
    max_rel_diff: float | None = None  # max |diff| / the reference's range
    mean_rel_diff: float | None = None
    nonfinite: int | None = None
    within: bool | None = None  # within the precision's allowance (None: not compared)
    note: str = ""


@dataclass
class LocateReport:
    """`vitseg verify --locate`'s answer. JSON form: the fields, `boundaries` as a list of their figures."""

    artifact: str
    precision: str
    allowance_sqnr_db: float
    images: int
    boundaries: list[BoundaryFigures]
    first_divergence: str | None  # the deepest boundary on the path of first divergences
    path: list[str]  # the first divergence at each level, coarse to fine
    quantized_layers: list[dict] = field(default_factory=list)  # inside it, ranked: {"layer", "module", "sqnr_db_when_float"}
    keep_float: list[str] = field(default_factory=list)  # module paths a re-export should keep in float
    keep_float_command: str | None = None
    verdict: str = ""
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    reference_note: str = ""

    def to_json(self) -> dict:
        """The `locate` object of the verify report."""
        return {**asdict(self), "boundaries": [asdict(b) for b in self.boundaries]}


@dataclass
class Reference:
    """The PyTorch side: each boundary's tensor on the images, and where each module's nodes are (ModuleScopes)."""

    tensors: dict[str, np.ndarray]
    scopes: ModuleScopes

    def in_scope(self, module: str) -> Callable[[str], bool]:
        return self.scopes.in_scope(module)

    def module_of(self, name: str) -> str | None:
        return self.scopes.module_of(name)


def reference_tensors(segmenter: Segmenter, boundaries: list[Boundary], pixels: np.ndarray) -> Reference:
    """Run the exported module (wrapped as the exporter wraps it) once on `pixels` with hooks: every boundary's
    output, the network's input, the logits, and every module's call chain."""
    root = ExportGraph(segmenter, ["logits"]).eval()
    wanted = {f"{NET}.{b.name}": b.name for b in boundaries if b.name not in ("input", "logits")}
    tensors: dict[str, np.ndarray] = {}

    def on_call(name: str, module, args, output) -> None:
        if name == NET:
            tensors["input"] = args[0].detach().float().numpy()
        if name == ROOT:  # the Segmenter: logits at the input's size, as the graph outputs them
            tensors["logits"] = output.detach().float().numpy()
        if name in wanted:
            value = output[0] if isinstance(output, (tuple, list)) else output
            tensors[wanted[name]] = value.detach().float().numpy()

    scopes = ModuleScopes.record(root, torch.from_numpy(pixels), on_call)
    return Reference(tensors, scopes)


def figures(boundary: Boundary, tensor: str | None, ref: np.ndarray | None, got: np.ndarray | None,
            allowance: float, note: str = "") -> BoundaryFigures:
    """The comparison of one boundary's tensors (float64), judged by the allowance (SQNR in dB)."""
    row = BoundaryFigures(boundary.name, boundary.kind, boundary.level, tensor, note=note)
    if ref is None or got is None:
        return row
    r, a = ref.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(a)
    row.shape, row.nonfinite = list(r.shape), int((~finite).sum())
    a = np.where(finite, a, 0.0)
    diff = np.abs(r - a)
    span = float(r.max() - r.min()) or 1.0
    signal, noise = float((r * r).sum()), float((diff * diff).sum())
    row.sqnr_db = round(10 * math.log10(signal / noise), 2) if noise > 0 and signal > 0 else (math.inf if noise == 0 else 0.0)
    norm = math.sqrt(signal * float((a * a).sum()))
    row.cosine = round(float((r * a).sum()) / norm, 6) if norm > 0 else (1.0 if noise == 0 else 0.0)
    row.max_rel_diff, row.mean_rel_diff = float(diff.max()) / span, float(diff.mean()) / span
    row.within = row.nonfinite == 0 and row.sqnr_db >= allowance
    return row


# ---- the artifact side: one run with the boundary tensors as extra outputs ----------------------------

class OnnxProbe:
    """An ONNX artifact (or graph) with extra outputs, run as vitseg's runner runs it (int8 emulated where it must be)."""

    def __init__(self, model: Any, info: ArtifactInfo):
        self.model, self.info = model, info
        self.producers = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.constants = {i.name for i in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                                        for o in n.output}
        self.outputs = {o.name for o in model.graph.output}

    def names(self) -> list[str]:
        return [n.name for n in self.model.graph.node]

    def candidates(self, in_scope: Callable[[str], bool], entering: bool = False) -> list[str]:
        """Tensors leaving the scope (read outside it, or graph outputs): a module's outputs; with `entering`, the
        non-constant tensors entering it. Those not made by Q/DQ nodes first."""
        inside = [n for n in self.model.graph.node if in_scope(n.name)]
        names = {n.name for n in inside}
        found: list[str] = []
        for n in inside:
            for t in (n.input if entering else n.output):
                if not t or t in found or t in self.constants:
                    continue
                producer = self.producers.get(t)
                if entering and (producer is None or producer.name not in names):
                    found.append(self.float_source(t))
                elif not entering and (t in self.outputs or any(c.name not in names for c in self.consumers.get(t, []))):
                    found.append(self.float_source(t))
        # a module's output is made last: the latest made first, those of Q/DQ nodes after the others
        found = list(dict.fromkeys(found if entering else reversed(found)))
        return sorted(found, key=lambda t: self.producers[t].op_type in QDQ_OPS if t in self.producers else False)

    def float_source(self, tensor: str) -> str:
        """The float tensor a Q -> DQ pair re-creates (`tensor` itself where no pair makes it)."""
        dq = self.producers.get(tensor)
        q = self.producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else tensor

    def run(self, tensors: list[str], pixels: np.ndarray, model: Any = None) -> dict[str, np.ndarray]:
        m = onnx.ModelProto()
        m.CopyFrom(model if model is not None else self.model)
        present = {o.name for o in m.graph.output}
        for t in tensors:
            if t not in present:
                m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
        info = replace(self.info, outputs=[o.name for o in m.graph.output])  # the runner checks the graph's outputs
        return run_all(OnnxRuntimeRunner(self.info.path, "cpu", model_bytes=m.SerializeToString(), info=info), pixels)


class IRProbe:
    """An OpenVINO IR with extra outputs, compiled as vitseg's runner compiles it."""

    def __init__(self, path: Path, info: ArtifactInfo):
        self.path, self.info = path, info
        self.ops = openvino_core().read_model(str(path)).get_ordered_ops()

    def names(self) -> list[str]:
        return [op.get_friendly_name() for op in self.ops]

    def candidates(self, in_scope: Callable[[str], bool], entering: bool = False) -> list[str]:
        found = []
        for op in self.ops:
            if not in_scope(op.get_friendly_name()) or op.get_type_name() in ("Constant", "Parameter", "Result"):
                continue
            if entering:
                for value in op.input_values():
                    source = value.get_node()
                    if source.get_type_name() == "FakeQuantize":  # the float tensor it quantizes
                        value = source.input_value(0)
                        source = value.get_node()
                    if not in_scope(source.get_friendly_name()) and source.get_type_name() not in ("Constant", "Convert"):
                        found.append(f"{source.get_friendly_name()}:{value.get_index()}")
                continue
            for port in op.outputs():
                readers = [t.get_node() for t in port.get_target_inputs()]
                if any(r.get_type_name() == "Result" or not in_scope(r.get_friendly_name()) for r in readers):
                    source = op.input_value(0) if op.get_type_name() == "FakeQuantize" else port  # its float input
                    found.append(f"{source.get_node().get_friendly_name()}:{source.get_index()}")
        qdq = {f"{op.get_friendly_name()}:{i}" for op in self.ops if op.get_type_name() in QDQ_OPS for i in range(op.get_output_size())}
        return sorted(dict.fromkeys(found if entering else reversed(found)), key=lambda t: t in qdq)  # as for ONNX

    def run(self, tensors: list[str], pixels: np.ndarray) -> dict[str, np.ndarray]:
        model = openvino_core().read_model(str(self.path))
        by_name = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
        for t in tensors:
            if ":" not in t:  # a graph output ("logits")
                continue
            op_name, port = t.rsplit(":", 1)
            output = by_name[op_name].output(int(port))
            if "logits" not in output.get_tensor().get_names():  # the only name it answers to in the results
                output.get_tensor().set_names({t})
            model.add_outputs([output])
        results = run_all(OpenVINORunner(self.path, "cpu", model=model, info=self.info), pixels)
        return {t: results[t] for t in tensors if t in results} | {k: v for k, v in results.items() if k in ("logits", "mask")}


def run_all(runner, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """All outputs of `runner` on `pixels`, one image at a time where its batch is static, concatenated."""
    with runner:
        batches = [pixels] if runner.dynamic_batch else [pixels[i:i + 1] for i in range(len(pixels))]
        runs = [runner.infer({"pixels": b}) for b in batches]
    return {k: np.concatenate([r[k] for r in runs]) for k in runs[0]}


class EngineProbe:
    """`vitseg verify --locate` inside a TensorRT engine: the engine rebuilt from the ONNX it was built from (its
    manifest's `source_onnx`) with the boundary tensors marked as outputs (the ONNX parser makes every graph output a
    network output), by the same edition with the same settings and profile, then run on its GPU. Runs where the
    engine can run; elsewhere the runner says why in one line."""

    def __init__(self, path: Path, info: ArtifactInfo):
        self.path, self.info = path, info
        self.manifest = read_manifest(path)
        source = Path(str(self.manifest.extra.get("source_onnx", "")))
        if not source.is_file():
            raise VitsegError(f"{path.name}'s manifest names no ONNX file here ({source}): --locate rebuilds the engine from it",
                              "keep the ONNX the engine was built from beside it (vitseg writes NAME.onnx)")
        self.source = source
        self.graph = OnnxProbe(onnx.load(str(source)), read_artifact_info(source))
        self.edition = tensorrt_editions.edition_for_format(info.format)

    def names(self) -> list[str]:
        return self.graph.names()

    def candidates(self, in_scope: Callable[[str], bool], entering: bool = False) -> list[str]:
        return self.graph.candidates(in_scope, entering)

    def run(self, tensors: list[str], pixels: np.ndarray) -> dict[str, np.ndarray]:
        model = onnx.ModelProto()
        model.CopyFrom(self.graph.model)
        present = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors if t not in present)
        saved = self.manifest.extra.get("engine_settings", {})
        settings = EngineSettings(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()
                                     if k in EngineSettings.__dataclass_fields__ and k != "timing_cache"})
        with tempfile.TemporaryDirectory(prefix="vitseg-locate-engine-") as tmp:
            graph = Path(tmp) / "graph.onnx"
            onnx.save(model, graph)
            built = tensorrt_engine.build_engine(graph, settings, self.edition)
            engine = Path(tmp) / self.path.name
            record = ExportManifest.from_json({**self.manifest.to_json(), "artifact": engine.name,
                                               "sha256": hashlib.sha256(built.engine).hexdigest(), "size_bytes": len(built.engine)})
            write_artifact(engine, {engine: built.engine}, record)
            return run_all(runner_for(engine, device="cuda"), pixels)


def artifact_probe(path: Path, info: ArtifactInfo):
    """The probe of an artifact of any format vitseg locates in (VitsegError for one it cannot)."""
    if info.format == "onnx":
        return OnnxProbe(onnx.load(str(path)), info)
    if info.format == "openvino":
        return IRProbe(path, info)
    if info.format in ("trt", "trt-rtx"):
        return EngineProbe(path, info)
    raise VitsegError(f"--locate does not look inside {info.format} artifacts", "locate the ONNX or IR it was made from")


# ---- the search ----------------------------------------------------------------------------------------

def reference_module(loaded: Any, path: Path) -> tuple[Segmenter, str]:
    """The module the artifact was exported from, with the exact rewrites where the artifact has them (as its
    manifest records; without a manifest, vitseg's default: folded)."""
    settings = (read_manifest(path).export_settings or {}) if manifest_path(path).is_file() else {}
    fold = settings.get("fold", True) if isinstance(settings.get("fold", True), bool) else True
    module, rewrites = exported_module(loaded.model, loaded.meta.mean, loaded.meta.std, fold)
    note = ("against the exported module with its exact rewrites (" + "; ".join(rewrites) + "): a rewritten module's "
            "tensors are compared with the rewritten PyTorch module's") if rewrites else "against the checkpoint's module"
    return module, note


def locate_artifact(artifact: Path, reference: str, data: str = "synthetic", num_images: int = LOCATE_IMAGES,
                    progress: Progress = silent, revision: str | None = None) -> LocateReport:
    """Where `artifact` first leaves its PyTorch reference (`revision`: of a Hub id) (module docstring). Raises VitsegError for an artifact
    without vitseg metadata, of another checkpoint, or whose names carry no module paths."""
    t0 = time.perf_counter()
    path = Path(artifact)
    info = read_artifact_info(path)
    loaded = load_checkpoint(reference, revision=revision)
    check_reference(info, loaded)
    precision = get_precision(info.precision)
    allowance = precision.locate_sqnr_db
    probe = artifact_probe(path, info)
    segmenter, reference_note = reference_module(loaded, path)
    family = get_family(loaded.meta.family)
    boundaries = family.locate_boundaries(segmenter.net)
    inputs = load_inputs(data, "val", num_images, tuple(info.image_size))
    pixels = np.stack([im.pixels for im in inputs.images]).astype(np.float32)
    progress(f"running the PyTorch reference on {len(pixels)} images with hooks at {len(boundaries)} boundaries")
    ref = reference_tensors(segmenter, boundaries, pixels)
    if not any(ref.in_scope("")(name) for name in probe.names()):
        raise VitsegError(f"{path.name}'s names carry no module paths (none starts with the network's scope)",
                          "export it again with `vitseg export` (the TorchScript exporter keeps them)")

    def measure(group: list[Boundary]) -> list[BoundaryFigures]:
        picks = {b.name: _candidates(probe, ref, b) for b in group}
        tensors = sorted({t for ts in picks.values() for t in ts})
        progress(f"comparing {len(group)} boundaries ({', '.join(b.name for b in group[:3])}{', ...' if len(group) > 3 else ''})")
        got = probe.run(tensors, pixels)
        return [_judge(b, picks[b.name], ref, got, allowance) for b in group]

    rows = measure([b for b in boundaries if b.level == 0 and b.parent is None])
    path_found: list[str] = []
    first = first_divergence(rows, boundaries)
    by_name = {b.name: b for b in boundaries}
    reads = by_name[first.name].reads if first is not None else None
    upstream = next((r for r in rows if r.name == reads), None)
    if upstream is not None and upstream.within is None and any(b.parent == reads for b in boundaries):
        # what it reads could not be compared (no tensor of its shape here): look inside that first
        inner = measure([b for b in boundaries if b.parent == reads])
        rows += inner
        first_inner = first_divergence(inner, boundaries)
        if first_inner is not None:
            path_found.append(reads)
            first = first_inner
    while first is not None:
        path_found.append(first.name)
        children = [b for b in boundaries if b.parent == first.name]
        if not children:
            break
        child_rows = measure(children)
        rows += child_rows
        first = first_divergence(child_rows, boundaries)
    report = LocateReport(str(path), info.precision, allowance, len(pixels), _ordered(rows, boundaries),
                          path_found[-1] if path_found else None, path_found, reference_note=reference_note)
    if path_found and isinstance(probe, OnnxProbe) and precision.integer_kernels:
        report.quantized_layers = rank_quantized(probe, ref, boundaries, path_found, pixels, allowance, progress)
    report.keep_float, report.keep_float_command = keep_float_advice(report, info, reference, precision, ref)
    report.verdict = verdict_line(report)
    report.seconds, report.peak_rss_mb = round(time.perf_counter() - t0, 1), round(peak_rss_mb(), 1)
    return report


def first_divergence(rows: list[BoundaryFigures], boundaries: list[Boundary]) -> BoundaryFigures | None:
    """The first row past the allowance whose divergence carries on: a row past it whose readers (the boundaries
    computed from it, `Boundary.reads`) are all within it is a tensor the artifact holds in another form (OpenVINO
    folds the input normalization into the first convolution: the tensor entering the network is then (x - mean),
    not (x - mean) / std), noted, not the answer. A real divergence reaches its readers."""
    by_name = {r.name: r for r in rows}
    for row in rows:
        if row.within is not False:
            continue
        readers = [by_name[b.name] for b in boundaries if b.reads == row.name and b.name in by_name]
        readers = [r for r in readers if r.within is not None]
        if readers and all(r.within for r in readers) and not row.nonfinite:
            row.within = None
            row.note = (f"differs here (SQNR {row.sqnr_db:.1f} dB) and {', '.join(r.name for r in readers)}, computed "
                        "from it, matches: the artifact holds this tensor in another form (a rewrite), not compared")
            continue
        return row
    return None


def _candidates(probe, ref: Reference, boundary: Boundary) -> list[str]:
    """The artifact's tensors that may hold the boundary's: its module's outputs; where the artifact kept no names
    for the module's own nodes (OpenVINO can drop them when it decomposes a LayerNorm), the tensors entering the
    modules the forward pass called next, which read it."""
    if boundary.name == "logits":
        return ["logits"] if "logits" in ref.tensors else []
    if boundary.name == "input":
        return probe.candidates(ref.in_scope(""), entering=True)
    own = probe.candidates(ref.in_scope(boundary.name))
    if own:
        return own
    return [t for module in ref.scopes.called_after(boundary.name) for t in probe.candidates(ref.in_scope(module), entering=True)]


def _judge(boundary: Boundary, candidates: list[str], ref: Reference, got: dict, allowance: float) -> BoundaryFigures:
    """The boundary's figures from the first candidate of the reference's shape (no candidate: not compared)."""
    expected = ref.tensors.get(boundary.name)
    if expected is None:
        return BoundaryFigures(boundary.name, boundary.kind, boundary.level, None, note="not computed by the reference")
    for t in candidates:
        value = got.get(t)
        if value is not None and tuple(value.shape) == tuple(expected.shape) and np.issubdtype(value.dtype, np.floating):
            return figures(boundary, t, expected, value, allowance)
    note = "no tensor of the reference's shape in the artifact" if candidates else "the artifact has no nodes of this module"
    return BoundaryFigures(boundary.name, boundary.kind, boundary.level, None, note=note)


def _ordered(rows: list[BoundaryFigures], boundaries: list[Boundary]) -> list[BoundaryFigures]:
    order = {b.name: i for i, b in enumerate(boundaries)}
    return sorted(rows, key=lambda r: order.get(r.name, 0))


def rank_quantized(probe: OnnxProbe, ref: Reference, boundaries: list[Boundary], path: list[str], pixels: np.ndarray,
                   allowance: float, progress: Progress) -> list[dict]:
    """The quantized layers inside the first divergence's block, each returned alone to float, ranked by the SQNR
    this gives the block's output (the deepest boundary on the path that has quantized layers inside)."""
    by_name = {b.name: b for b in boundaries}
    for name in reversed(path):
        layers = [n for n in quantized_layers(probe.model) if ref.in_scope(name)(n)]
        if layers:
            break
    else:
        return []
    boundary = by_name[name]
    candidates = _candidates(probe, ref, boundary)
    progress(f"ranking the {len(layers)} quantized layers inside {name}")
    ranked = []
    for layer in layers:
        got = probe.run(candidates, pixels, model=to_float(probe.model, {layer}))
        row = _judge(boundary, candidates, ref, got, allowance)
        ranked.append({"layer": layer, "module": ref.module_of(layer), "sqnr_db_when_float": row.sqnr_db})
    return sorted(ranked, key=lambda r: -(r["sqnr_db_when_float"] or -math.inf))


def keep_float_advice(report: LocateReport, info: ArtifactInfo, reference: str, precision: Any,
                      ref: Reference) -> tuple[list[str], str | None]:
    """The module paths a re-export should keep in float, and the command (reduced precisions only): the most
    helpful quantized layers' modules, else the first divergence itself."""
    if report.first_divergence is None or precision.baseline:
        return [], None
    names = [r["module"] for r in report.quantized_layers[:2] if r.get("module")] or [report.first_divergence]
    names = list(dict.fromkeys(names))
    fmt = "openvino" if info.format == "openvino" else "onnx"
    command = (f"vitseg export {reference} --format {fmt} --precision {info.precision} --keep-float {','.join(names)} "
               "(with the other options it was exported with)")
    return names, command


def verdict_line(report: LocateReport) -> str:
    """The verdict, first line of the human output: `first divergence: encoder.block.2.0 (attention: ...):
    SQNR 11.2 dB, cosine 0.962; everything before it within fp16's allowance (SQNR >= 30 dB)`."""
    rows = {r.name: r for r in report.boundaries}
    allowance = f"{report.precision}'s allowance (SQNR >= {report.allowance_sqnr_db:g} dB)"
    if report.first_divergence is None:
        compared = sum(r.within is not None for r in report.boundaries)
        return f"no divergence: all {compared} boundaries compared are within {allowance}"
    head = [name for name in report.path if rows[name].level <= 1][-1]  # the block (or the stage-level boundary)
    deepest = rows[report.first_divergence]
    inner = deepest.kind if deepest.name == head else f"{deepest.kind}: {deepest.name}"
    sqnr = f"{deepest.nonfinite} non-finite values" if deepest.nonfinite else \
        f"SQNR {deepest.sqnr_db:.1f} dB, cosine {deepest.cosine:.6f}"
    return f"first divergence: {head} ({inner}): {sqnr}; everything before it within {allowance}"
