"""artifact/checkpoint -> runner: one interface for every backend, and the one table of backends.

Every runner takes {"pixels": float32 (N,3,H,W) in [0,1]} and returns {"logits": float32 (N,C,H,W)}
and/or {"mask": uint8 (N,H,W)}, as numpy arrays. Backends are imported lazily inside their own
module, so this package imports without torch. A new backend is one `register_backend(...)` row.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vitseg_export.formats import Availability, format_for_path, module_version
from vitseg_export.runners.base import Runner
from vitseg_export.tables import Table


@dataclass(frozen=True)
class Backend:
    name: str
    # (model: path or checkpoint, device, outputs, **options) -> Runner
    make: Callable[..., Runner]
    probe: Callable[[], Availability]  # can it run here, and its version
    devices: Callable[[], list[str]]  # the devices it can use here


BACKENDS: Table[Backend] = Table("unknown backend '{name}'", "use one of {names}")
# Add a row (`--backend` choices and doctor follow) / the row of a name (one-line error).
register_backend = BACKENDS.register
get_backend = BACKENDS.row


def runner_for(model: Any, device: str = "cpu", backend: str | None = None, outputs: tuple[str, ...] = ("logits",),
               **options: Any) -> Runner:
    """The runner for an artifact (its format's backend, by suffix) or a checkpoint (torch), or the named
    backend. Nothing is loaded before `activate()`."""
    if backend is None:
        fmt = format_for_path(Path(str(model))) if isinstance(model, (str, Path)) else None
        backend = fmt.backend if fmt is not None else "torch"
    return get_backend(backend).make(model, device, outputs, **options)


# ---- built-in backends ------------------------------------------------------------------------------

def lazy_runner(module: str, class_name: str) -> Callable[..., Runner]:
    """A backend's `make`: imports the runner class only when a runner is made (no torch at start-up)."""
    def make(model: Any, device: str, outputs: tuple[str, ...], **options: Any) -> Runner:
        return getattr(importlib.import_module(module), class_name)(model, device, outputs, **options)

    return make


def _version_probe(module: str, hint: str) -> Callable[[], Availability]:
    def probe() -> Availability:
        version, why = module_version(module)
        return Availability(version is not None, f"{module} {version}" if version else why or "", hint)

    return probe


def _torch_devices() -> list[str]:
    if module_version("torch")[0] is None:
        return []
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _onnxruntime_devices() -> list[str]:
    if module_version("onnxruntime")[0] is None:
        return []
    import onnxruntime

    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers() and "cuda" in _torch_devices()
    return ["cpu"] + (["cuda"] if cuda else [])


def _tensorrt_devices() -> list[str]:
    from vitseg_export.export.tensorrt_engine import tensorrt_availability

    return ["cuda"] if tensorrt_availability()[0] else []


def _tensorrt_probe() -> Availability:
    from vitseg_export.export.tensorrt_engine import tensorrt_availability

    ok, detail, hint = tensorrt_availability()
    return Availability(ok, detail, hint)


register_backend(Backend("torch", lazy_runner("vitseg_export.runners.torch_runner", "TorchRunner"),
                         _version_probe("torch", "pip install 'vitseg-export[torch]'"), _torch_devices))
register_backend(Backend("onnxruntime", lazy_runner("vitseg_export.runners.onnxruntime_runner", "OnnxRuntimeRunner"),
                         _version_probe("onnxruntime", "pip install onnxruntime (GPU: onnxruntime-gpu)"), _onnxruntime_devices))
register_backend(Backend("tensorrt", lazy_runner("vitseg_export.runners.tensorrt_runner", "TensorRTRunner"),
                         _tensorrt_probe, _tensorrt_devices))


def _openvino_devices() -> list[str]:
    if module_version("openvino")[0] is None:
        return []
    from vitseg_export.runners.openvino_runner import openvino_core

    return [d.split(".")[0].lower() for d in openvino_core().available_devices] + ["auto"]


register_backend(Backend("openvino", lazy_runner("vitseg_export.runners.openvino_runner", "OpenVINORunner"),
                         _version_probe("openvino", "pip install 'vitseg-export[openvino]'"), _openvino_devices))


__all__ = ["BACKENDS", "Backend", "Runner", "get_backend", "lazy_runner", "register_backend", "runner_for"]
