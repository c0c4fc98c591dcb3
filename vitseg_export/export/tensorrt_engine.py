"""ONNX artifact -> TensorRT engine (a plain serialized plan) + sidecar manifest.

The engine is built from the ONNX the precision step produced; the graph carries the precision (fp16
tensors and Casts, Q/DQ pairs for int8). Networks are built strongly typed where TensorRT has the flag
(10.x with STRONGLY_TYPED, 11.x always); `weakly_typed=True` is the fallback for 10.x builds that need
the FP16/INT8 builder flags instead (looked up with getattr: TensorRT 11 removed them).

Every call here exists in TensorRT 10.3 and 11.4 (checked by mypy against stubs generated from both
versions' Python bindings, see scripts/trt_stubs.sh).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

from vitseg_export import __version__
from vitseg_export.artifact import ArtifactInfo, ExportManifest, ExportResult, write_artifact
from vitseg_export.comparator import compare, load_inputs
from vitseg_export.errors import ParityError, VitsegError
from vitseg_export.export.settings import EngineSettings, ExportRequest
from vitseg_export.export.trt_lint import lint_for_tensorrt
from vitseg_export.files import check_readable_file, sha256_file
from vitseg_export.formats import read_artifact_info
from vitseg_export.precisions import get_precision
from vitseg_export.runners.cuda import cuda_devices
from vitseg_export.runners.onnxruntime_runner import OnnxRuntimeRunner
from vitseg_export.runners.tensorrt_runner import TensorRTRunner, require_tensorrt
from vitseg_export.tables import lazy_module

if TYPE_CHECKING:  # mypy checks every call against the TensorRT 10.3 and 11.4 bindings (tests/test_trt_typing.py)
    import tensorrt as trt
else:  # optional, and never on the CI machines: imported on first use
    trt = lazy_module("tensorrt")
# the checkpoint path (torch) only: building an engine from an ONNX artifact needs no torch
onnx_export = lazy_module("vitseg_export.export.onnx_export")

__all__ = ["EngineSettings", "check_against_onnx", "check_against_pytorch", "engine_from_artifact", "engine_from_onnx",
           "export_engine", "engine_summary"]


def collecting_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps errors (so a failed build can say why) and sparse-kernel notes."""

    class CollectingLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.sparse_layers: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.Severity.INFO and "sparse" in msg.lower():
                self.sparse_layers.append(msg)

    return CollectingLogger()


def _profile_shapes(info, settings: EngineSettings) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    h, w = info.input_size
    opt = settings.opt_shape or (1, 3, h, w)
    mn = settings.min_shape or ((1, 3, h, w) if not info.dynamic_size else (1, 3, 32, 32))
    mx = settings.max_shape or ((8 if info.dynamic_batch else 1), 3, h, w)
    if info.dynamic_size and not settings.max_shape:
        mx = (mx[0], 3, max(h, 1024), max(w, 1024))
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


def _parse(trt: Any, onnx_path: Path, logger: Any, weakly_typed: bool) -> tuple[Any, Any, Any, bool]:
    """(builder, network, parser, strongly typed) with the ONNX parsed; VitsegError naming the failing node."""
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
        raise VitsegError(f"TensorRT could not parse {onnx_path.name}{where}: {first.desc() if first is not None else 'unknown error'}",
                          "run `vitseg export --check-trt` on the checkpoint to lint the graph")
    return builder, network, parser, strongly


def _configure(trt: Any, builder: Any, info: ArtifactInfo, settings: EngineSettings, strongly: bool, shapes) -> Any:
    """The builder config: workspace, optimization profile, precision flags (weakly typed only), sparsity,
    version compatibility, DLA, timing cache."""
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
                raise VitsegError(f"this TensorRT ({trt.__version__}) has no BuilderFlag.{flag_name}",
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
    cache = settings.timing_cache
    if cache is not None and cache.exists():
        check_readable_file(cache, "--timing-cache")  # a FIFO or device is refused, not read
    cache_bytes = cache.read_bytes() if cache is not None and cache.exists() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    return config


# Judges a built engine before it is written: called with the engine in a temp file (its manifest beside it,
# so runners read its profile), returns the manifest's `self_parity`, raises ParityError to refuse it.
EngineCheck = Callable[[Path], dict]


def engine_from_onnx(onnx_path: Path, engine_path: Path, settings: EngineSettings,
                     progress: Callable[[str], None] = lambda m: None, check: EngineCheck | None = None) -> ExportManifest:
    """Build a TensorRT engine from a vitseg ONNX artifact, judge it with `check` (default: against that ONNX
    on ONNX Runtime CPU, `check_against_onnx`) at every shape of its optimization profile, and only then write
    it with its manifest. Raises BackendMissingError without TensorRT/GPU, VitsegError when parsing or building
    fails, ParityError when the engine differs (nothing is written then)."""
    require_tensorrt()

    info = read_artifact_info(onnx_path)
    logger = collecting_logger(trt)
    progress(f"parsing {onnx_path.name}")
    builder, network, _parser, strongly = _parse(trt, onnx_path, logger, settings.weakly_typed)
    shapes = _profile_shapes(info, settings)
    config = _configure(trt, builder, info, settings, strongly, shapes)
    progress("building the engine (minutes for large models)")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        reason = logger.errors[-1] if logger.errors else "no reason logged"
        raise VitsegError(f"TensorRT failed to build the engine: {reason}", "see the builder log with VITSEG_DEBUG=1")
    build_seconds = time.perf_counter() - t0
    # IHostMemory implements the buffer protocol (the generated stubs do not declare it)
    engine_bytes = bytes(cast(Any, serialized))
    files = {engine_path: engine_bytes}
    if settings.timing_cache:
        files[settings.timing_cache] = bytes(cast(Any, config.get_timing_cache().serialize()))
    gpu, major, minor = cuda_devices()[0]
    mn, opt, mx = shapes
    manifest = ExportManifest(
        artifact=engine_path.name, format="trt", sha256=hashlib.sha256(engine_bytes).hexdigest(),
        size_bytes=len(engine_bytes), metadata=info.metadata_json(),
        extra={"source_onnx": str(onnx_path), "source_onnx_sha256": sha256_file(onnx_path),
               "tensorrt_version": trt.__version__, "strongly_typed": strongly, "gpu": gpu,
               "compute_capability": f"{major}.{minor}",
               "profile": {"min": list(mn), "opt": list(opt), "max": list(mx)},
               "engine_settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
               "sparse_layers_log": logger.sparse_layers, "build_seconds": round(build_seconds, 1),
               "vitseg_version": __version__})
    with tempfile.TemporaryDirectory(prefix="vitseg-engine-") as tmp:
        candidate = Path(tmp) / engine_path.name
        write_artifact(candidate, {candidate: engine_bytes}, manifest)
        progress(f"checking the engine at its profile's shapes (min {mn}, opt {opt}, max {mx})")
        manifest.self_parity = (check or (lambda path: check_against_onnx(path, onnx_path)))(candidate)
    write_artifact(engine_path, files, manifest)
    return manifest


def check_against_onnx(engine: Path, onnx_path: Path, data: str = "synthetic", num_images: int = 8) -> dict:
    """The engine against the vitseg ONNX it was built from (itself verified against PyTorch when it was
    exported), run by ONNX Runtime on the CPU: every shape of the engine's profile, batch consistency, the
    precision's preset. Returns the `self_parity` record; ParityError when it fails. Torch-free."""
    info = read_artifact_info(engine)
    precision = get_precision(info.precision)
    inputs = load_inputs(data, "val", num_images, tuple(info.input_size)).at_shapes(info.declared_shapes())  # type: ignore[arg-type]
    with OnnxRuntimeRunner(onnx_path, "cpu") as reference, TensorRTRunner(engine) as candidate:
        result = compare(reference, {"engine": candidate}, inputs, precision.thresholds, len(info.class_names),
                         consistency=precision.consistency())
    verdict = result.comparisons["engine"]
    if not verdict.passed:
        raise ParityError(f"the {info.precision} engine differs from {onnx_path.name}{verdict.failed_at()}: "
                          f"{'; '.join(verdict.failures)}; nothing was written",
                          "rebuild with another TensorRT version or --weakly-typed, or report it to NVIDIA with the ONNX")
    return {**verdict.to_json(), "source": inputs.source, "reference": f"{onnx_path.name} on ONNX Runtime CPU"}


def export_engine(loaded: Any, output: Path, request: ExportRequest, progress: Callable[[str], None]) -> Any:
    """checkpoint -> verified ONNX (int8 for TensorRT: no int32 bias, fp16 float part) -> lint -> engine at
    `output`. The ONNX artifact is kept beside it (`<output>.onnx`)."""
    require_tensorrt()
    onnx_path = output.with_suffix(".onnx")
    result = onnx_export.export_onnx(loaded, onnx_path, request.onnx, progress=progress, int8=request.int8)
    lint = lint_for_tensorrt(result.model_proto)
    if lint:
        raise VitsegError(f"{onnx_path.name} has {len(lint)} TensorRT incompatibilities; first: {lint[0]}",
                          "fix the graph or use --format onnx")
    manifest = engine_from_onnx(onnx_path, output, request.engine, progress,
                                check=lambda engine: check_against_pytorch(engine, loaded, request))
    return ExportResult(output, manifest, result.model_proto)


def check_against_pytorch(engine: Path, loaded: Any, request: ExportRequest) -> dict:
    """The engine against PyTorch (the checkpoint it comes from) at every shape of its profile, batch
    consistency included, as every vitseg export is judged: the `self_parity` record; ParityError when it fails."""
    info = read_artifact_info(engine)
    precision = get_precision(info.precision)
    inputs = onnx_export.precision_parity_inputs(precision, request.onnx, info)
    return onnx_export.parity_record(onnx_export.self_parity(loaded, TensorRTRunner(engine), inputs, precision.name, request.int8), inputs)


def engine_from_artifact(onnx_path: Any, output: Path, request: ExportRequest, progress: Callable[[str], None]) -> Any:
    """The trt format's exporter from an existing vitseg ONNX artifact (formats.py): the engine, judged against
    that ONNX on ONNX Runtime CPU at every shape of its profile."""
    def check(engine: Path) -> dict:
        return check_against_onnx(engine, Path(onnx_path), request.onnx.parity_data)

    return ExportResult(output, engine_from_onnx(Path(onnx_path), output, request.engine, progress, check))


def engine_summary(path: Path, manifest: ExportManifest) -> list[str]:
    """What `vitseg export` prints about a written engine."""
    x = manifest.extra
    lines = [f"wrote {path} ({manifest.size_bytes / 1e6:.2f} MB, TensorRT {x['tensorrt_version']}, {x['gpu']} sm "
             f"{x['compute_capability']}, {'strongly' if x['strongly_typed'] else 'weakly'} typed) and {path.name}.json"]
    return lines + onnx_export.parity_lines(manifest.self_parity)
