"""Can this machine do X: whether a module imports (and its version), as an Availability with a hint. A leaf:
the tables' probes are built from these, and nothing here imports what it probes until asked."""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Availability:
    ok: bool
    detail: str  # version string when ok, the reason otherwise
    hint: str = ""  # how to make it available


def module_version(module: str) -> tuple[str | None, str | None]:
    """(version, None) when `module` imports, else (None, why not)."""
    try:
        imported = importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken native library (OSError) for tensorrt
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    try:  # packages without __version__ (tritonclient): their distribution's
        return getattr(imported, "__version__", None) or importlib.metadata.version(module.split(".")[0]), None
    except importlib.metadata.PackageNotFoundError:
        return "unknown", None


def modules_available(modules: tuple[str, ...], hint: str) -> Availability:
    """All of `modules` import (their versions), or which do not and `hint`."""
    versions = {m: module_version(m) for m in modules}
    missing = [f"{m} ({why})" for m, (v, why) in versions.items() if v is None]
    if missing:
        return Availability(False, "missing " + ", ".join(missing), hint)
    return Availability(True, ", ".join(f"{m} {v}" for m, (v, _) in versions.items()))


def version_probe(module: str, hint: str) -> Callable[[], Availability]:
    """A probe: `module` imports (its version), or why not and `hint`."""
    def probe() -> Availability:
        version, why = module_version(module)
        return Availability(version is not None, f"{module} {version}" if version else why or "", hint)

    return probe


def probe_onnx_export() -> Availability:
    """What ONNX export needs: torch, onnx and onnxruntime."""
    return modules_available(("torch", "onnx", "onnxruntime"), "pip install 'vitseg-export[torch]'")


def probe_triton_repository() -> Availability:
    """What writing a Triton repository needs: tritonclient (Triton's config schema), and ONNX export."""
    serve = modules_available(("tritonclient.grpc.model_config_pb2",), "pip install 'vitseg-export[serve]'")
    return serve if not serve.ok else probe_onnx_export()


def probe_openvino_export() -> Availability:
    """What OpenVINO IR export needs: OpenVINO, NNCF (int8), and what ONNX export needs."""
    return modules_available(("openvino", "nncf", "torch", "onnx"), "pip install 'vitseg-export[torch,openvino]'")
