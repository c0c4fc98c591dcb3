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
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from vitseg_export import __version__
from vitseg_export.artifact import manifest_path, read_artifact_info
from vitseg_export.errors import BackendMissingError, VitsegError
from vitseg_export.files import atomic_write_bytes, sha256_file


@dataclass
class EngineSettings:
    workspace_gb: float = 4.0
    min_shape: tuple[int, ...] | None = None  # (N, 3, H, W); default from the artifact
    opt_shape: tuple[int, ...] | None = None
    max_shape: tuple[int, ...] | None = None
    sparsity: bool = False
    timing_cache: Path | None = None
    version_compatible: bool = False
    dla_core: int | None = None
    weakly_typed: bool = False


def require_tensorrt() -> None:
    """TensorRT and a CUDA GPU, or one clear error (exit 2) before any other work."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError from a bindings wheel without its libraries
        raise BackendMissingError(f"TensorRT is not available here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                                  "install TensorRT (pip install tensorrt, or JetPack on Jetson), or use --format onnx") from None
    try:
        import torch
    except ImportError:
        raise BackendMissingError("the TensorRT path needs PyTorch with CUDA for its buffers",
                                  "pip install 'vitseg-export[torch]'") from None
    if not torch.cuda.is_available():
        raise BackendMissingError("TensorRT needs a CUDA GPU and torch sees none", "run on a machine with an NVIDIA GPU")
    del trt


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


def engine_from_onnx(onnx_path: Path, engine_path: Path, settings: EngineSettings, progress=lambda m: None) -> dict:
    require_tensorrt()
    import tensorrt as trt  # typed: mypy checks every call below against the 10.3 and 11.4 bindings
    import torch

    info = read_artifact_info(onnx_path)
    logger = collecting_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    strongly = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") and not settings.weakly_typed
    if strongly:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    progress(f"parsing {onnx_path.name}")
    if not parser.parse(onnx_path.read_bytes(), path=str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0] if errors else None
        where = f" at node '{first.node_name()}' ({first.node_operator()})" if first is not None else ""
        raise VitsegError(f"TensorRT could not parse {onnx_path.name}{where}: {first.desc() if first is not None else 'unknown error'}",
                          "run `vitseg export --check-trt` on the checkpoint to lint the graph")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gb * (1 << 30)))
    mn, opt, mx = _profile_shapes(info, settings)
    if info.dynamic_batch or info.dynamic_size:
        profile = builder.create_optimization_profile()
        profile.set_shape("pixels", trt.Dims(list(mn)), trt.Dims(list(opt)), trt.Dims(list(mx)))  # 10.3 takes a list
        config.add_optimization_profile(profile)
    if not strongly and info.precision in ("fp16", "int8"):
        # TensorRT 10.x weakly typed fallback; these flags no longer exist in 11.x
        for flag_name in ("FP16", "INT8") if info.precision == "int8" else ("FP16",):
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
    cache_bytes = settings.timing_cache.read_bytes() if settings.timing_cache and settings.timing_cache.is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, False)
    progress("building the engine (minutes for large models)")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        reason = logger.errors[-1] if logger.errors else "no reason logged"
        raise VitsegError(f"TensorRT failed to build the engine: {reason}", "see the builder log with VITSEG_DEBUG=1")
    build_seconds = time.perf_counter() - t0
    # IHostMemory implements the buffer protocol (the generated stubs do not declare it)
    engine_bytes = bytes(cast(Any, serialized))
    if settings.timing_cache:
        atomic_write_bytes(settings.timing_cache, bytes(cast(Any, config.get_timing_cache().serialize())))
    props = torch.cuda.get_device_properties(0)
    metadata = {k: json.loads(v) for k, v in info.extra.items()}  # the ONNX artifact's vitseg metadata
    manifest = {
        "artifact": engine_path.name,
        "format": "trt",
        "sha256": hashlib.sha256(engine_bytes).hexdigest(),
        "size_bytes": len(engine_bytes),
        "metadata": metadata,
        "source_onnx": str(onnx_path),
        "source_onnx_sha256": sha256_file(onnx_path),
        "tensorrt_version": trt.__version__,
        "strongly_typed": strongly,
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "profile": {"min": list(mn), "opt": list(opt), "max": list(mx)},
        "engine_settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "sparse_layers_log": logger.sparse_layers,
        "build_seconds": round(build_seconds, 1),
        "vitseg_version": __version__,
    }
    atomic_write_bytes(engine_path, engine_bytes)
    atomic_write_bytes(manifest_path(engine_path), (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest
