"""ONNX artifact -> TensorRT engine (a plain serialized plan) + sidecar manifest, for both TensorRT editions
(runners/tensorrt_editions.py: TensorRT for Jetson and data-center GPUs, TensorRT-RTX for RTX GPUs) on one
code path: parse, configure, build, census, judge, write.

The engine is built from the ONNX the precision step produced; the graph carries the precision (fp16
tensors and Casts, Q/DQ pairs for int8). Networks are built strongly typed where the edition has the flag
(TensorRT 10.x with STRONGLY_TYPED, 11.x and TensorRT-RTX always); `weakly_typed=True` is TensorRT 10.x's
fallback with the FP16/INT8 builder flags (looked up with getattr: TensorRT 11 removed them).

TensorRT builds on the GPU the engine is for; TensorRT-RTX builds ahead of time on any machine, for a list of
compute capabilities. An engine is judged (against PyTorch, or the ONNX it was built from) before it is written
wherever it can run here; an ahead-of-time engine built where no GPU of its compute capabilities is has a
pending verdict, which its manifest and `vitseg export` say, naming the command that verifies it on the target.

Every shared call here exists in TensorRT 10.3 and 11.4 (checked by mypy against stubs generated from both
versions' Python bindings, see scripts/trt_stubs.sh) and runs for real with TensorRT-RTX in the tests.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

import numpy as np

from vitseg_export import __version__
from vitseg_export.artifact import (
    ArtifactGroup,
    ArtifactInfo,
    ExportManifest,
    ExportResult,
    manifest_path,
    read_manifest,
    write_artifact,
    write_groups,
)
from vitseg_export.compare.judge import ReferenceOutputs, VerdictImages, passed_or_refused, verdict_of
from vitseg_export.compare.report import parity_lines
from vitseg_export.errors import VitsegError
from vitseg_export.export.tensorrt_census import describe_census, network_census
from vitseg_export.export.trt_lint import lint_for_tensorrt
from vitseg_export.files import check_readable_file, sha256_file
from vitseg_export.formats import get_format, read_artifact_info
from vitseg_export.machine.interrupt import run_interruptible
from vitseg_export.precisions import get_precision
from vitseg_export.progress import Progress, silent
from vitseg_export.runners import runner_for
from vitseg_export.runners.cuda import cuda_devices
from vitseg_export.runners.onnxruntime_runner import OnnxRuntimeRunner
from vitseg_export.runners.tensorrt_editions import (
    TENSORRT,
    TENSORRT_RTX,
    Edition,
    edition_for_format,
    set_targets,
    using,
)
from vitseg_export.runners.tensorrt_runner import require_tensorrt, tensorrt_availability
from vitseg_export.settings import EngineSettings, ExportRequest
from vitseg_export.tables import lazy_module

if TYPE_CHECKING:  # mypy checks every call against the TensorRT 10.3 and 11.4 bindings (tests/test_trt_typing.py)
    import tensorrt as trt
else:  # the module of the edition chosen with `using(edition)`: optional, imported on first use
    from vitseg_export.runners.tensorrt_editions import trt
# the checkpoint path (torch) only: building an engine from an ONNX artifact needs no torch
onnx_export = lazy_module("vitseg_export.export.onnx_export")
pipeline = lazy_module("vitseg_export.export.pipeline")
onnx = lazy_module("onnx")  # MACs per layer for the census (the [torch] extra; without it the census counts layers)
int8 = lazy_module("vitseg_export.export.int8")  # node_macs

__all__ = ["EngineSettings", "check_against_onnx", "check_build", "check_engine_plan", "engine_from_artifact",
           "engine_from_onnx", "engine_group", "plan_engine", "export_engine", "export_rtx_engine", "engine_summary", "rtx_engine_from_artifact"]


def collecting_logger() -> Any:
    """A logger of the chosen edition that keeps errors (so a failed build can say why) and sparse-kernel notes.
    The severities are read when it is made: TensorRT may call `log` from its own threads."""
    errors_at = (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR)
    info_at = trt.ILogger.Severity.INFO

    class CollectingLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.sparse_layers: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in errors_at:
                self.errors.append(msg)
            elif severity == info_at and "sparse" in msg.lower():
                self.sparse_layers.append(msg)

    return CollectingLogger()


def _profile_shapes(info, settings: EngineSettings) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    h, w = info.image_size
    opt = settings.opt_shape or (1, 3, h, w)
    mn = settings.min_shape or ((1, 3, h, w) if not info.dynamic_size else (1, 3, 32, 32))
    mx = settings.max_shape or (info.largest_batch, 3, h, w)
    if info.dynamic_size and not settings.max_shape:  # up to twice the export size per side (1024 for a 512 export)
        mx = (mx[0], 3, 2 * h, 2 * w)
    for shape, name in ((mn, "min"), (opt, "opt"), (mx, "max")):
        if len(shape) != 4 or shape[1] != 3:
            raise VitsegError(f"--{name}-shape {shape} is not (N,3,H,W)", "e.g. --opt-shape 1x3x512x512")
        if not info.dynamic_batch and shape[0] != 1:
            raise VitsegError(f"--{name}-shape asks batch {shape[0]} of a static-batch artifact", "export with --dynamic-batch")
        if not info.dynamic_size and tuple(shape[2:]) != (h, w):
            raise VitsegError(f"--{name}-shape asks {shape[2]}x{shape[3]} of a {h}x{w} artifact", "export with --dynamic-size (SegFormer)")
    if not all(a <= b <= c for a, b, c in zip(mn, opt, mx)):
        raise VitsegError(f"profile shapes must satisfy min <= opt <= max, got {mn}, {opt}, {mx}")
    return mn, opt, mx


def parse_onnx(onnx_path: Path, logger: Any, weakly_typed: bool, edition: Edition) -> tuple[Any, Any, Any, bool]:
    """(builder, network, parser, strongly typed) with the ONNX parsed by the chosen edition's parser; VitsegError
    naming the failing node and the parser's message."""
    builder = trt.Builder(logger)
    flags = 0
    strongly = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") and not weakly_typed
    if strongly:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), path=str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0] if errors else None
        where = f" at node '{first.node_name()}' ({first.node_operator()})" if first is not None else ""
        said = first.desc().strip() if first is not None else ""
        # the parser's own words can be as bare as "false" (an op it has no importer for): vitseg's lint of the same
        # graph names the op and why, against onnx-tensorrt's operator list
        try:
            problems = [str(p) for p in lint_for_tensorrt(onnx.load(str(onnx_path)))]
        except ImportError:  # no onnx in this install: the parser's words alone
            problems = []
        reason = said if said and said.lower() != "false" else "no importer for this op"
        lint = f"; vitseg's lint: {problems[0]}" if problems else ""
        raise VitsegError(f"{edition.display}'s ONNX parser rejected {onnx_path.name}{where}: {reason}{lint}",
                          "replace or remove that op in the graph (TensorRT imports the ops of onnx-tensorrt's "
                          "operators list), or use --format onnx or openvino for it")
    return builder, network, parser, strongly


def _configure(builder: Any, info: ArtifactInfo, settings: EngineSettings, strongly: bool, shapes, edition: Edition) -> Any:
    """The builder config: workspace, optimization profile, precision flags (weakly typed only), sparsity,
    version compatibility, DLA, compute capabilities (ahead-of-time editions), timing cache."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gb * (1 << 30)))
    mn, opt, mx = shapes
    if info.dynamic_batch or info.dynamic_size:
        profile = builder.create_optimization_profile()
        profile.set_shape("pixels", trt.Dims(list(mn)), trt.Dims(list(opt)), trt.Dims(list(mx)))  # 10.3 takes a list
        config.add_optimization_profile(profile)
    if not strongly:  # TensorRT 10.x weakly typed fallback; these flags no longer exist in 11.x
        for flag_name in get_precision(info.precision).trt_weak_flags:
            flag = getattr(trt.BuilderFlag, flag_name, None)
            if flag is None:
                raise VitsegError(f"this {edition.display} ({trt.__version__}) has no BuilderFlag.{flag_name}",
                                  "build strongly typed (drop --weakly-typed)")
            config.set_flag(flag)
    if settings.sparsity:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if settings.dla_core is not None:
        if info.dynamic_batch or info.dynamic_size:
            raise VitsegError("DLA needs static shapes", "export with --static-batch and without --dynamic-size")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = settings.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if edition.targets:
        set_targets(config, edition, target_capabilities(settings, edition))
    if edition.timing_cache:
        cache = settings.timing_cache
        if cache is not None and cache.exists():
            check_readable_file(cache, "--timing-cache")  # a FIFO or device is refused, not read
        cache_bytes = cache.read_bytes() if cache is not None and cache.exists() else b""
        config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    return config


def target_capabilities(settings: EngineSettings, edition: Edition) -> tuple[str, ...]:
    """The compute capabilities an engine of `edition` is built for: those asked (checked), else its default;
    () for an edition that builds for the GPU it runs on."""
    if not edition.targets:
        if settings.compute_capabilities:
            edition.check_targets(settings.compute_capabilities)  # one line: not for this edition
        return ()
    return edition.check_targets(settings.compute_capabilities or edition.default_targets)


def check_engine_settings(settings: EngineSettings, edition: Edition) -> None:
    """VitsegError (one line) for engine settings the edition does not have, before any work."""
    target_capabilities(settings, edition)
    if settings.dla_core is not None and not edition.dla:
        raise VitsegError(f"--dla-core: {edition.display} builds for GPUs only (no DLA)", "drop --dla-core, or use --format trt")
    if settings.weakly_typed and not edition.weakly_typed:
        raise VitsegError(f"--weakly-typed: {edition.display} builds strongly typed networks only (precision comes from "
                          "the graph)", "drop --weakly-typed")
    if settings.timing_cache is not None and not edition.timing_cache:
        raise VitsegError(f"--timing-cache: {edition.display} keeps no timing cache", "drop --timing-cache")


@dataclass
class BuiltEngine:
    """What a build made: the serialized engine, how, and the census of the network it came from."""

    engine: bytes
    seconds: float
    strongly_typed: bool
    shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    capabilities: tuple[str, ...]
    census: dict
    timing_cache: bytes | None
    sparse_layers_log: list[str]


def onnx_layer_macs(onnx_path: Path, shape: tuple[int, ...]) -> dict[str, int] | None:
    """MACs of every Conv/MatMul/Gemm node of the ONNX at batch 1 of `shape` (the census's MACs); None where
    onnx is not installed (an engine built from an artifact on a machine with TensorRT only)."""
    try:
        model = onnx.load(str(onnx_path))
    except ImportError:
        return None
    input_type = model.graph.input[0].type.tensor_type.elem_type
    pixels = np.zeros((1, *shape[1:]), np.float16 if input_type == onnx.TensorProto.FLOAT16 else np.float32)
    return int8.node_macs(model, pixels)


def build_engine(onnx_path: Path, settings: EngineSettings, edition: Edition,
                 progress: Progress = silent) -> BuiltEngine:
    """Parse a vitseg ONNX artifact with the edition's parser, take the network's census and build the engine
    (ahead of time for TensorRT-RTX; on this GPU for TensorRT). VitsegError when parsing or building fails."""
    check_engine_settings(settings, edition)
    info = read_artifact_info(onnx_path)
    with using(edition):
        logger = collecting_logger()
        progress(f"parsing {onnx_path.name} ({edition.display} {trt.__version__})")
        builder, network, _parser, strongly = parse_onnx(onnx_path, logger, settings.weakly_typed, edition)
        shapes = _profile_shapes(info, settings)
        census = network_census(network, onnx_layer_macs(onnx_path, shapes[1]))
        config = _configure(builder, info, settings, strongly, shapes, edition)
        capabilities = target_capabilities(settings, edition)
        progress("building the engine" + (f" for compute capability {', '.join(capabilities)}" if capabilities else "")
                 + " (minutes for large models)")
        t0 = time.perf_counter()
        serialized = run_interruptible(builder.build_serialized_network, network, config)  # Ctrl-C never lands in the logger
        if serialized is None:
            reason = logger.errors[-1] if logger.errors else "no reason logged"
            raise VitsegError(f"{edition.display} failed to build the engine: {reason}", "see the builder log with VITSEG_DEBUG=1")
        seconds = time.perf_counter() - t0
        cache = bytes(cast(Any, config.get_timing_cache().serialize())) if settings.timing_cache and edition.timing_cache else None
    # IHostMemory implements the buffer protocol (the generated stubs do not declare it)
    return BuiltEngine(bytes(cast(Any, serialized)), seconds, strongly, shapes, capabilities, census, cache,
                       logger.sparse_layers)


# Judges a built engine before it is written: called with the engine in a temp file (its manifest beside it,
# so runners read its profile), returns the manifest's `self_parity`, raises ParityError to refuse it.
EngineCheck = Callable[[Path], dict]


def pending_verdict(engine_path: Path, edition: Edition, capabilities: tuple[str, ...], checkpoint: str | None) -> dict | None:
    """The `self_parity` of an engine that cannot be judged here (None: it can): why, and the command that
    verifies it on a GPU it runs on. Nothing claims it was verified."""
    why = edition.why_not_run_here(list(capabilities) or None)
    if why is None:
        ok, detail, _ = tensorrt_availability(edition)
        why = None if ok else detail
    if why is None:
        return None
    command = f"vitseg verify {engine_path.name} --reference {checkpoint or 'CHECKPOINT'} --device cuda"
    return {"verdict": "pending", "reason": why, "verify_on_target": command}


def check_engine_plan(settings: EngineSettings, edition: Edition, info: ArtifactInfo, precision: Any) -> tuple:
    """Every refusal an engine build can make before any work (VitsegError, one line): settings the edition does not
    have, profile shapes the artifact cannot take, compute capabilities that cannot compute the precision.
    Returns the profile shapes (min, opt, max)."""
    check_engine_settings(settings, edition)
    fp32_gemm = [c for c in target_capabilities(settings, edition) if c in edition.no_fp32_gemm] \
        if precision.trt_fp32_gemm else []
    if fp32_gemm:
        raise VitsegError(f"--compute-capability {fp32_gemm[0]}: {edition.display} has no fp32 matrix multiplies for "
                          f"compute capability {fp32_gemm[0]} (Turing), and a {precision.name} engine needs them",
                          f"export --precision fp16 or int8 for {fp32_gemm[0]}, or leave {fp32_gemm[0]} out")
    no_bf16 = [c for c in target_capabilities(settings, edition) if c in edition.no_bf16] if precision.trt_bf16 else []
    if no_bf16:
        raise VitsegError(f"--compute-capability {no_bf16[0]}: compute capability {no_bf16[0]} (Turing) has no bf16 "
                          f"arithmetic, and a {precision.name} engine computes in it",
                          f"export --precision fp16 for {no_bf16[0]}, or leave {no_bf16[0]} out")
    return _profile_shapes(info, settings)


def plan_engine(plan: Any) -> None:
    """The engine formats' planning check (formats.py `plan`): check_engine_plan before the ONNX is exported."""
    check_engine_plan(plan.request.engine, edition_for_format(plan.fmt.name), plan.info, plan.precision)


def engine_group(onnx_path: Path, engine_path: Path, settings: EngineSettings, progress: Progress = silent,
                 check: EngineCheck | None = None, edition: Edition = TENSORRT, checkpoint: str | None = None,
                 recorded_onnx: Path | None = None) -> ArtifactGroup:
    """Build an engine of `edition` from a vitseg ONNX artifact, judge it with `check` (default: against that ONNX
    on ONNX Runtime CPU, `check_against_onnx`) at every shape of its optimization profile where it can run here
    (else its verdict is pending: recorded, and said). Returns the group to write (the engine, a --timing-cache,
    the manifest; `recorded_onnx`: where the ONNX will live, when it is still in a temp dir); nothing is written
    here. Raises BackendMissingError without the edition (or, for TensorRT, a GPU), VitsegError when parsing or
    building fails, ParityError when the engine differs."""
    require_tensorrt(edition, "build")
    info = read_artifact_info(onnx_path)
    check_engine_plan(settings, edition, info, get_precision(info.precision))
    built = build_engine(onnx_path, settings, edition, progress)
    files = {engine_path: built.engine}
    if built.timing_cache is not None and settings.timing_cache is not None:
        files[settings.timing_cache] = built.timing_cache
    devices = cuda_devices()
    gpu = f"{devices[0][0]} (compute capability {devices[0][1]}.{devices[0][2]})" if devices else None
    capabilities = built.capabilities or ((f"{devices[0][1]}.{devices[0][2]}",) if devices else ())
    mn, opt, mx = built.shapes
    manifest = ExportManifest(
        artifact=engine_path.name, format=edition.format, sha256=hashlib.sha256(built.engine).hexdigest(),
        size_bytes=len(built.engine), metadata=info.metadata_json(),
        extra={"source_onnx": str(recorded_onnx or onnx_path), "source_onnx_sha256": sha256_file(onnx_path),
               "tensorrt_edition": edition.display, "tensorrt_version": edition.load().__version__,
               "strongly_typed": built.strongly_typed, "built_on_gpu": gpu,
               "compute_capabilities": list(capabilities), "runs_on": edition.runs_on,
               "profile": {"min": list(mn), "opt": list(opt), "max": list(mx)},
               "engine_settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
               "census": built.census, "sparse_layers_log": built.sparse_layers_log,
               "build_seconds": round(built.seconds, 1), "vitseg_version": __version__})
    manifest.source = read_manifest(onnx_path).source if manifest_path(onnx_path).exists() else None
    pending = pending_verdict(engine_path, edition, built.capabilities, checkpoint)
    if pending is not None:
        progress("the engine cannot run here: its verdict is pending")
        manifest.self_parity = pending
    else:
        with tempfile.TemporaryDirectory(prefix="vitseg-engine-") as tmp:
            candidate = Path(tmp) / engine_path.name
            write_artifact(candidate, {candidate: built.engine}, manifest)
            progress(f"checking the engine at its profile's shapes (min {mn}, opt {opt}, max {mx})")
            manifest.self_parity = (check or (lambda path: check_against_onnx(path, onnx_path)))(candidate)
    return ArtifactGroup(engine_path, manifest, files)


def engine_from_onnx(onnx_path: Path, engine_path: Path, settings: EngineSettings,
                     progress: Progress = silent, check: EngineCheck | None = None,
                     edition: Edition = TENSORRT, checkpoint: str | None = None) -> ExportManifest:
    """`engine_group`, written: the engine and its manifest at `engine_path` (all or nothing)."""
    group = engine_group(onnx_path, engine_path, settings, progress, check, edition, checkpoint)
    write_groups(group)
    return group.manifest


def check_against_onnx(engine: Path, onnx_path: Path, data: str = "synthetic", num_images: int = 8) -> dict:
    """The engine against the vitseg ONNX it was built from (itself verified against PyTorch when it was
    exported), run by ONNX Runtime on the CPU, through the one judge: every shape of the engine's profile, batch
    consistency, the precision's preset. Returns the `self_parity` record; ParityError when it fails. Torch-free."""
    info = read_artifact_info(engine)
    precision = get_precision(info.precision)
    images = VerdictImages.load(data, num_images, tuple(info.image_size))  # type: ignore[arg-type]
    with ReferenceOutputs(OnnxRuntimeRunner(onnx_path, "cpu"), f"{onnx_path.name} on ONNX Runtime CPU") as reference:
        verdict = verdict_of(reference, runner_for(engine, device="cuda"), images, info.declared_shapes(), precision.thresholds,
                        len(info.class_names), consistency=precision.consistency())
    return passed_or_refused(verdict, engine.name, f"the {info.precision} engine differs from {onnx_path.name}",
                             "rebuild with another TensorRT version or --weakly-typed, or report it to NVIDIA with the "
                             "ONNX").to_json()


def export_engine(source: Any, output: Path, request: ExportRequest, progress: Progress,
                  edition: Edition = TENSORRT) -> Any:
    """checkpoint -> verified ONNX (int8 for TensorRT: no int32 bias, fp16 float part) -> lint -> engine of
    `edition` at `output`, judged against PyTorch at every shape of its profile (or pending where it cannot run
    here). The ONNX artifact is kept beside it (`<output>.onnx`); both groups are written together after the
    verdict, or nothing is (a failed build, a full disk, an interruption leave no file, and an earlier file of
    the same name untouched)."""
    require_tensorrt(edition, "build")
    onnx_path = output.with_suffix(".onnx")
    with pipeline.session_for(source) as session:
        plan = pipeline.plan_export(edition.format, session.loaded, request, output)  # the engine's checks too
        onnx_plan = replace(plan, fmt=get_format("onnx"), output=onnx_path,
                            info=replace(plan.info, path=onnx_path, format="onnx"))
        onnx_artifact = onnx_export.onnx_group(session, onnx_plan, progress)
        lint = lint_for_tensorrt(onnx_artifact.model_proto)
        if lint:
            raise VitsegError(f"{onnx_path.name} has {len(lint)} TensorRT incompatibilities; first: {lint[0]}",
                              "fix the graph or use --format onnx")

        def check(engine: Path) -> dict:
            engine_plan = replace(plan, info=read_artifact_info(engine))
            engine_plan.shapes = engine_plan.info.declared_shapes()
            return session.judge(engine_plan, runner_for(engine, device="cuda"), "engine", progress).to_json()

        with tempfile.TemporaryDirectory(prefix="vitseg-engine-") as tmp:  # the parser reads a file
            staged = Path(tmp) / onnx_path.name
            write_artifact(staged, {staged: onnx_artifact.files[onnx_path]}, onnx_artifact.manifest)
            engine = engine_group(staged, output, request.engine, progress, check, edition, str(session.loaded.source),
                                  recorded_onnx=onnx_path)
        engine_info = replace(plan.info, path=output, format=edition.format, profile=engine.manifest.extra["profile"])
        session.add_golden(replace(plan, info=engine_info), engine, engine_info.declared_shapes())
        parity = engine.manifest.self_parity or {}
        if request.golden and parity.get("verdict") == "pending":  # where it runs, no checkpoint or PyTorch is needed
            parity["verify_on_target"] = (f"vitseg verify {output.name} --golden {output.name}.golden --device cuda "
                                          f"(or: {parity['verify_on_target']})")
    write_groups(onnx_artifact, engine)
    return ExportResult(output, engine.manifest, onnx_artifact.model_proto)


def export_rtx_engine(source: Any, output: Path, request: ExportRequest, progress: Progress) -> Any:
    """The trt-rtx format's exporter: export_engine with TensorRT-RTX (built ahead of time, on any machine)."""
    return export_engine(source, output, request, progress, TENSORRT_RTX)


def engine_from_artifact(onnx_path: Any, output: Path, request: ExportRequest, progress: Progress,
                         edition: Edition = TENSORRT) -> Any:
    """The engine formats' exporter from an existing vitseg ONNX artifact (formats.py): the engine of `edition`,
    judged against that ONNX on ONNX Runtime CPU at every shape of its profile (where it can run here)."""
    def check(engine: Path) -> dict:
        images = request.onnx.verdict_images or get_precision(read_artifact_info(engine).precision).verdict_images
        return check_against_onnx(engine, Path(onnx_path), request.onnx.parity_data, images)

    return ExportResult(output, engine_from_onnx(Path(onnx_path), output, request.engine, progress, check, edition,
                                                 read_artifact_info(Path(onnx_path)).source_checkpoint or None))


def rtx_engine_from_artifact(onnx_path: Any, output: Path, request: ExportRequest, progress: Progress) -> Any:
    """The trt-rtx format's exporter from an ONNX artifact."""
    return engine_from_artifact(onnx_path, output, request, progress, TENSORRT_RTX)


def check_build(onnx_path: Path, settings: EngineSettings | None = None) -> dict:
    """`--check-trt`'s real build: the ONNX parsed and built ahead of time by TensorRT-RTX (NVIDIA's ONNX parser
    and builder, on any machine): {"tensorrt_edition", "tensorrt_version", "build_seconds", "engine_bytes",
    "census"}. VitsegError naming the parser's node and message, or the builder's error."""
    built = build_engine(onnx_path, settings or EngineSettings(), TENSORRT_RTX)
    return {"tensorrt_edition": TENSORRT_RTX.display, "tensorrt_version": TENSORRT_RTX.load().__version__,
            "build_seconds": round(built.seconds, 1), "engine_bytes": len(built.engine),
            "compute_capabilities": list(built.capabilities), "census": built.census}


def engine_summary(path: Path, manifest: ExportManifest) -> list[str]:
    """What `vitseg export` prints about a written engine: the file and how it was built, the census, the verdict
    (or why it is pending, and the command that gives it on the target)."""
    x = manifest.extra
    built = f"on {x['built_on_gpu']}" if x.get("built_on_gpu") else "ahead of time (no GPU)"
    lines = [f"wrote {path} ({manifest.size_bytes / 1e6:.2f} MB, {x['tensorrt_edition']} {x['tensorrt_version']}, built "
             f"{built} in {x['build_seconds']:.1f} s, compute capability {', '.join(x['compute_capabilities']) or '?'}, "
             f"{'strongly' if x['strongly_typed'] else 'weakly'} typed) and {path.name}.json",
             describe_census(x["census"])]
    parity = manifest.self_parity or {}
    if parity.get("verdict") == "pending":
        return lines + [f"verdict pending, not judged here: {parity['reason']}; verify it on its target: "
                        f"{parity['verify_on_target']}"]
    return lines + parity_lines(manifest.self_parity)
