"""checkpoint -> artifact group: the one export pipeline every format and precision goes through, each step here
once (docs/design.md, "The export pipeline"):

  1. plan         `plan_export`: every refusal that needs no work (the request, the options, the image size, the
                  format's own checks: engine profile shapes, compute capability against precision, Triton
                  batches), the metadata the artifact will carry and the shapes it will be judged at
  2. reference    `ExportSession.reference`: PyTorch (the unfolded checkpoint) on the verdict's images, run once
                  per image and size for the whole session (an export, or a benchmark's every artifact)
  3. fp32 graph   `ExportSession.fp32_graph`: exported once per session and graph settings (opset, size, outputs,
                  fold, simplify, dynamic size), with a dynamic batch, judged against the reference; a static-batch
                  artifact fixes its batch (export/graph.py `with_static_batch`)
  4. convert      `convert_graph`: the precision row's converter (fp16, int8), the int8 fallback deciding on the
                  verdict's images against the same reference (export/fallback.py `Heldout`)
  5. materialize  the format's exporter: ONNX bytes (onnx_export), an IR (openvino_export), an engine
                  (tensorrt_engine), a Triton model (serving/repository)
  6. judge        `ExportSession.judge`: the artifact at every planned shape (compare/judge.py)
  7. write        the whole group at once (files.atomic_write_group / atomic_write_directory), manifest last

A session is made per export, or once per run by the benchmark and the demo, which reuse its fp32 graphs and its
recorded reference across formats and precisions.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import onnx
import torch

from vitseg_export import __version__
from vitseg_export.artifact import (
    ArtifactGroup,
    ArtifactInfo,
    ExportManifest,
    ExportResult,
    judged_batches,
    write_groups,
)
from vitseg_export.checkpoint import LoadedCheckpoint
from vitseg_export.compare.golden import golden_bytes, golden_header, golden_path, logits_dtype, record_golden
from vitseg_export.compare.judge import (
    NOISE_IMAGES,
    ReferenceOutputs,
    Verdict,
    VerdictImages,
    passed_or_refused,
    verdict_of,
)
from vitseg_export.compare.report import parity_lines
from vitseg_export.errors import VitsegError
from vitseg_export.export.graph import module_to_onnx, remove_dead_nodes, with_static_batch
from vitseg_export.formats import Format, get_format
from vitseg_export.modeling.export_graph import ExportGraph, exported_module
from vitseg_export.modeling.registry import get_family
from vitseg_export.modeling.scopes import ModuleScopes
from vitseg_export.precisions import Conversion, ConversionContext, Precision, Thresholds, get_precision
from vitseg_export.progress import Progress, silent
from vitseg_export.runners.base import Runner
from vitseg_export.runners.onnxruntime_runner import OnnxRuntimeRunner
from vitseg_export.runners.torch_runner import TorchRunner
from vitseg_export.settings import OUTPUT_CHOICES, ExportRequest, Int8Settings, OnnxExportSettings
from vitseg_export.tables import lazy_module

onnxslim = lazy_module("onnxslim")  # --simplify only

SUPPORTED_OPSETS = range(14, 22)


# ---- 1. plan ---------------------------------------------------------------------------------------------

@dataclass
class ExportPlan:
    """What an export will make and how it will be judged, decided before any work."""

    fmt: Format
    request: ExportRequest
    output: Path
    size: tuple[int, int]
    info: ArtifactInfo  # the metadata the artifact will carry
    shapes: dict[tuple[int, int], tuple[int, ...]]  # {(H, W): batch sizes} it is judged at
    images: tuple[str, int, int]  # the verdict's images: (data spec, real images, noise images)

    @property
    def precision(self) -> Precision:
        """The requested precision's row."""
        return get_precision(self.request.precision)

    @property
    def int8(self) -> Int8Settings:
        """The int8 settings (read by calibrated precisions only)."""
        return self.request.int8

    def thresholds(self) -> Thresholds:
        """The preset the artifact is held to: the precision's, with a calibrated precision's targets as set."""
        row = self.precision
        return row.export_thresholds(self.int8.targets() if row.calibrated else None)

    def shapes_text(self) -> str:
        """'batch 1/4/8 64x64, batch 1/4/8 49x51'."""
        return ", ".join(f"batch {'/'.join(map(str, b))} {s[0]}x{s[1]}" for s, b in self.shapes.items())


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
    if settings.max_batch < 1:
        raise VitsegError(f"--max-batch {settings.max_batch} is not a batch size", "use 1 or more")
    if not settings.dynamic_batch and settings.max_batch != OnnxExportSettings.max_batch:  # asked for, not the default
        raise VitsegError(f"--max-batch {settings.max_batch} needs a dynamic batch", "drop --max-batch, or add --dynamic-batch")
    if settings.verdict_images is not None and settings.verdict_images < 1:
        raise VitsegError(f"{settings.verdict_images} verdict images", "judge on at least one image")
    size = tuple(settings.image_size or meta.image_size)
    get_family(meta.family).check_export_size(meta.architecture, meta.config, size, settings.dynamic_size)
    if min(size) < 32:
        raise VitsegError(f"image size {size[0]}x{size[1]} is too small", "use at least 32x32")
    return size  # type: ignore[return-value]


def artifact_info(loaded: LoadedCheckpoint, request: ExportRequest, size: tuple[int, int], path: Path,
                  fmt: str = "onnx") -> ArtifactInfo:
    """The metadata the artifact will carry."""
    meta, settings = loaded.meta, request.onnx
    precision = get_precision(settings.precision)
    cpu_class = request.int8.cpu_class if precision.calibrated and request.int8.target == "cpu" else ""
    return ArtifactInfo(path, fmt, meta.architecture, list(meta.class_names), size, tuple(meta.mean), tuple(meta.std),
                        settings.precision, settings.opset, settings.output_names, settings.dynamic_batch,
                        settings.dynamic_size, loaded.sha256, __version__, family=meta.family,
                        source_checkpoint=loaded.source, cpu_class=cpu_class,
                        max_batch=settings.max_batch if settings.dynamic_batch else 0)


def verdict_spec(request: ExportRequest) -> tuple[str, int, int]:
    """(data spec, real images, noise images) of an export's verdict: `--data`'s validation split (a calibrated
    precision: `--heldout`'s, default `--calib`'s, itself `--data` unless given), noise only where the precision is
    judged on noise."""
    precision = get_precision(request.precision)
    spec = (request.int8.heldout or request.int8.calib) if precision.calibrated else request.onnx.parity_data
    return spec, request.onnx.verdict_images or precision.verdict_images, NOISE_IMAGES if precision.parity_on_noise else 0


def plan_export(fmt: Format | str, loaded: LoadedCheckpoint, request: ExportRequest, output: Path) -> ExportPlan:
    """Step 1: check the request (VitsegError, one line, before any work) and decide what the artifact carries and
    where it is judged: its own shape; a dynamic batch at 1, a middle batch and its largest (`max_batch`, and
    `judge_batches`); a dynamic size at its own and a smaller odd size. The format's `plan` check runs last."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    fmt.check_precision(request.precision)
    size = check_export_request(loaded, request.onnx)
    info = artifact_info(loaded, request, size, output, fmt.name)
    extra = request.onnx.judge_batches
    if extra and not request.onnx.dynamic_batch:
        raise VitsegError(f"batches {', '.join(map(str, extra))} need a dynamic batch", "export with --dynamic-batch")
    batches = judged_batches(info.largest_batch, extra) if info.dynamic_batch else None
    plan = ExportPlan(fmt, request, output, size, info, info.declared_shapes(batches), verdict_spec(request))
    if fmt.plan is not None:
        fmt.plan(plan)
    return plan


# ---- 2-3. the session: the reference and the fp32 graph, once ------------------------------------------------

@dataclass
class VerifiedGraph:
    """The fp32 ONNX graph of a checkpoint (dynamic batch), proved equal to PyTorch: what every format starts from."""

    model: onnx.ModelProto
    size: tuple[int, int]
    rewrites: list[str]
    verdict: Verdict
    shapes: dict  # the shapes it was judged at (dynamic batch)
    scopes: ModuleScopes  # which of its nodes belong to which module (--keep-float, --locate)
    keep_float: tuple[str, ...] = ()  # modules a reduced precision keeps in float, checked against `scopes`
    info: ArtifactInfo | None = None  # the plan's metadata (set per plan by `ExportSession.fp32_graph`)

    def for_plan(self, plan: ExportPlan) -> onnx.ModelProto:
        """The graph as the plan's artifact takes input: the dynamic-batch graph, or a static-batch copy."""
        return self.model if plan.info.dynamic_batch else with_static_batch(self.model)


def _graph_key(settings: OnnxExportSettings, size: tuple[int, int]) -> tuple:
    """What the exported fp32 graph depends on (the batch is always dynamic: static artifacts fix it)."""
    return settings.opset, size, settings.dynamic_size, settings.outputs, settings.simplify, settings.fold


class ExportSession:
    """One export run over one checkpoint: the PyTorch reference (each image run once, kept) and the verified
    fp32 graphs (exported once per graph settings). `vitseg export` makes one per command; the benchmark and the
    demo one per checkpoint, shared by every format and precision. Close it (or use `with`) to release PyTorch."""

    def __init__(self, loaded: LoadedCheckpoint):
        self.loaded = loaded
        self._reference: ReferenceOutputs | None = None
        self._modules: dict[tuple, tuple] = {}  # the folded module, its rewrites and scopes by (fold, size)
        self._models: dict[tuple, onnx.ModelProto] = {}  # fp32 graphs by graph settings
        self._graph_verdicts: dict[tuple, Verdict] = {}  # their verdicts by graph settings and shapes
        self._images: dict[tuple, VerdictImages] = {}
        self.graph_exports = 0  # how many fp32 graphs torch.onnx exported (what "once per run" is measured by)

    @property
    def meta(self):
        """The checkpoint's metadata (as LoadedCheckpoint.meta: exporters take either)."""
        return self.loaded.meta

    @classmethod
    def of(cls, source: "ExportSession | LoadedCheckpoint") -> "ExportSession":
        """`source` if it is a session, else a new session over the loaded checkpoint."""
        return source if isinstance(source, ExportSession) else cls(source)

    def __enter__(self) -> "ExportSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the reference's PyTorch module (recorded outputs are kept)."""
        if self._reference is not None:
            self._reference.close()

    def reference(self) -> ReferenceOutputs:
        """PyTorch fp32, the unfolded checkpoint: the reference of every verdict in this session."""
        if self._reference is None:
            self._reference = ReferenceOutputs(TorchRunner(self.loaded), f"PyTorch fp32 ({self.loaded.source})")
        return self._reference

    def verdict_images(self, plan: ExportPlan) -> VerdictImages:
        """The plan's verdict images (loaded once per spec, count and size)."""
        key = (*plan.images, plan.size, plan.request.golden)
        if key not in self._images:
            spec, count, noise = plan.images
            self._images[key] = VerdictImages.load(spec, count, plan.size, noise, eight_bit=plan.request.golden)
        return self._images[key]

    def fp32_graph(self, plan: ExportPlan, progress: Progress = silent) -> VerifiedGraph:
        """Step 3: the checkpoint's fp32 ONNX graph for the plan: exported once per graph settings (with a dynamic
        batch), judged against the reference once per set of shapes a plan needs (a static-batch plan at batch 1:
        a graph that is wrong only inside batches of other images still makes a right static artifact; a
        conversion's start at batch 1: the converted artifact is judged at every shape), with the
        plan's --keep-float modules checked against its module scopes (one line naming the nearest)."""
        settings = plan.request.onnx
        exported, rewrites, scopes = self._module(settings.fold, plan.size)
        keep_float = scopes.check(settings.keep_float)  # before the export's work
        key = _graph_key(settings, plan.size)
        if key not in self._models:
            progress(f"exporting {self.loaded.meta.architecture} to ONNX opset {settings.opset}")
            model = module_to_onnx(ExportGraph(exported, settings.output_names).eval(), plan.size,
                                   replace(settings, dynamic_batch=True))
            self.graph_exports += 1
            if settings.simplify:
                progress("simplifying with onnxslim")
                model = onnxslim.slim(model)  # judged below like every graph: a changed output is refused there
            remove_dead_nodes(model)
            self._models[key] = model
        model = self._models[key]
        # where the graph is the artifact (fp32), at every planned shape; as the start of a conversion, alone at each
        # size: the converted artifact is judged at every shape itself, and inherits any batch fault it has
        shapes = plan.shapes if plan.precision.convert is None else {size: b[:1] for size, b in plan.shapes.items()}
        judged = (key, tuple(shapes.items()), plan.images[:2])  # noise: always, for the fp32 graph
        if judged not in self._graph_verdicts:
            info = replace(plan.info, precision="fp32", cpu_class="")
            graph_plan = replace(plan, request=replace(plan.request, onnx=replace(settings, precision="fp32")), info=info,
                                 shapes=dict(shapes), images=(plan.images[0], plan.images[1], NOISE_IMAGES))
            self._graph_verdicts[judged] = self.judge(graph_plan, graph_candidate(model, info), "exported graph", progress)
        return VerifiedGraph(model, plan.size, rewrites, self._graph_verdicts[judged], dict(shapes), scopes,
                             keep_float, plan.info)

    def _module(self, folded: bool, size: tuple[int, int]) -> tuple:
        """(the module exported, the rewrites applied, its module scopes at `size`), made once per session."""
        key = (folded, size)
        if key not in self._modules:
            exported, rewrites = exported_module(self.loaded.model, self.loaded.meta.mean, self.loaded.meta.std, folded)
            scopes = ModuleScopes.record(ExportGraph(exported, ["logits"]).eval(), torch.zeros(1, 3, *size))
            self._modules[key] = (exported, rewrites, scopes)
        return self._modules[key]

    def judged_graph(self, plan: ExportPlan, graph: VerifiedGraph, model: onnx.ModelProto, data: bytes, what: str,
                     progress: Progress = silent) -> Verdict:
        """The verdict on an ONNX artifact (`data`: `model` with its metadata): the fp32 graph's own, where the
        artifact is that very graph judged at the same shapes on the same images, else a new judgement."""
        if model is graph.model and graph.shapes == plan.shapes and plan.images[2] == graph.verdict.images["noise_images"]:
            # the very graph, judged at these shapes on these images (fp32 with a dynamic batch)
            return graph.verdict
        candidate = OnnxRuntimeRunner(f"{plan.precision.name}.onnx", "cpu", model_bytes=data, info=plan.info)
        return self.judge(plan, candidate, what, progress)

    def add_golden(self, plan: ExportPlan, group: ArtifactGroup, shapes: dict | None = None) -> None:
        """Where the request asks (`--save-golden`): put NAME.golden into the artifact's group, the verdict's 8-bit
        images and PyTorch's outputs on them at every shape the artifact is judged at (`shapes`, default the plan's),
        and name it in the manifest (compare/golden.py: verified where the artifact runs, without PyTorch)."""
        if not plan.request.golden:
            return
        thresholds = plan.thresholds()
        header = golden_header(plan.info, plan.output.name, hashlib.sha256(group.files[plan.output]).hexdigest(),
                               self.loaded.source, self.loaded.sha256, thresholds)
        data = golden_bytes(*record_golden(self.verdict_images(plan), self.reference(), shapes or plan.shapes, header,
                                           logits_dtype(thresholds.max_abs_logit_diff)))
        group.files[golden_path(plan.output)] = data
        group.manifest.extra["golden"] = {"file": golden_path(plan.output).name, "size_bytes": len(data),
                                          "sha256": hashlib.sha256(data).hexdigest()}

    def heldout(self, plan: ExportPlan):
        """(the verdict's real images at the artifact's size, the reference's recorded logits on them): what the
        int8 fallback decides on, so that its figures are the final verdict's at batch 1."""
        images = self.verdict_images(plan).real
        return images, self.reference().outputs(images)

    def judge(self, plan: ExportPlan, candidate: Runner, what: str, progress: Progress = silent) -> Verdict:
        """Step 6: `candidate` (inactive) against the reference on the plan's images at every planned shape, by the
        plan's preset. Returns the passing verdict; ParityError (nothing written) when it fails, VitsegError when
        the candidate cannot run."""
        precision = plan.precision
        images = self.verdict_images(plan)
        progress(f"judging the {precision.name} {what} against PyTorch on {len(images.real)} images at {plan.shapes_text()}")
        thresholds = plan.thresholds()
        verdict = verdict_of(self.reference(), candidate, images, plan.shapes, thresholds, len(self.loaded.meta.class_names),
                        consistency=precision.consistency(thresholds), mask_must_match_logits=precision.masks_match_logits)
        return passed_or_refused(verdict, f"the exported {precision.name} {what}",
                                 f"the exported {precision.name} {what} differs from PyTorch", precision.parity_hint,
                                 f" (judged on {verdict.basis()}); nothing was written")


@contextmanager
def session_for(source: "ExportSession | LoadedCheckpoint") -> Iterator[ExportSession]:
    """The session to export `source` in: itself if it is one (its owner closes it), else a new one, closed here."""
    if isinstance(source, ExportSession):
        yield source
        return
    with ExportSession(source) as session:
        yield session


def graph_candidate(model: onnx.ModelProto, info: ArtifactInfo) -> OnnxRuntimeRunner:
    """An ONNX Runtime runner (CPU) of an in-memory graph that will carry `info`."""
    return OnnxRuntimeRunner(f"{info.precision}.onnx", "cpu", model_bytes=model.SerializeToString(), info=info)


# ---- 4. convert ------------------------------------------------------------------------------------------

def convert_graph(session: ExportSession, plan: ExportPlan, graph: VerifiedGraph, progress: Progress = silent,
                  convert: Callable[[onnx.ModelProto, ConversionContext], Conversion] | None = None) -> Conversion:
    """Step 4: the plan's graph in the requested precision (`convert` replaces the precision's converter: `vitseg
    qat`'s). fp32: the graph as it is."""
    model = graph.for_plan(plan)
    convert = convert or plan.precision.convert
    if convert is None:
        return Conversion(model, {})
    context = ConversionContext(plan.size, plan.int8, plan.request.onnx.fp16_io,
                                plan.output.parent / ".vitseg-calibration-cache", progress, plan.request.onnx.parity_data,
                                graph.keep_float, graph.scopes, heldout=lambda: session.heldout(plan))
    return convert(model, context)


# ---- 6-7. the verdict's record, the manifest, the group ----------------------------------------------------

def export_settings_record(settings: OnnxExportSettings, size: tuple[int, int]) -> dict:
    """The manifest's `export_settings`: what was asked, at which size, by which exporter versions."""
    return {**asdict(settings), "image_size": list(size), "exporter": "torch.onnx (TorchScript)",
            "torch_version": torch.__version__, "onnx_version": onnx.__version__}


def export_with(source: "ExportSession | LoadedCheckpoint", fmt: str, request: ExportRequest, output: Path,
                materialize: Callable[[ExportSession, ExportPlan], ArtifactGroup]) -> ExportResult:
    """The pipeline for a format whose exporter is `materialize` (steps 3-6: the fp32 graph, conversion, the format's
    bytes, the verdict): plan, materialize, the golden file where asked, then write the whole group."""
    with session_for(source) as session:
        plan = plan_export(fmt, session.loaded, request, output)
        group = materialize(session, plan)
        session.add_golden(plan, group)
    write_groups(group)
    return group.result()


def manifest_for(session: ExportSession, plan: ExportPlan, fp32: VerifiedGraph, verdict: Verdict, data: dict[Path, bytes],
                 details: dict | None, started: float, **extra: Any) -> ExportManifest:
    """The manifest of an artifact made from the fp32 graph `fp32` and judged by `verdict`: what it is, how it was
    made, on which images and at which shapes it was judged (`extra`: the format's own keys)."""
    main = data[plan.output]
    return ExportManifest(
        artifact=plan.output.name, format=plan.fmt.name, sha256=hashlib.sha256(main).hexdigest(),
        size_bytes=sum(len(b) for b in data.values()), metadata=plan.info.metadata_json(),
        export_settings=export_settings_record(plan.request.onnx, plan.size), self_parity=verdict.to_json(),
        rewrites=fp32.rewrites, fp32_graph_parity=fp32.verdict.to_json(), precision_details=details or {},
        export_seconds=round(time.perf_counter() - started, 2), random_weights=session.loaded.kind == "random",
        source=session.loaded.source_record(), extra=extra)


__all__ = ["ArtifactGroup", "ExportPlan", "ExportSession", "VerifiedGraph", "check_export_request", "convert_graph",
           "export_with", "graph_candidate", "manifest_for", "parity_lines", "plan_export", "session_for", "write_groups", "ExportResult",
           "SUPPORTED_OPSETS", "Int8Settings"]
