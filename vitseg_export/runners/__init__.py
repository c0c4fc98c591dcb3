"""artifact/checkpoint -> runner: one interface for every backend, and the one table of backends.

Every runner takes {"pixels": float32 (N,3,H,W) in [0,1]} and returns {"logits": float32 (N,C,H,W)}
and/or {"mask": uint8 (N,H,W)}, as numpy arrays. Rows name their runner class, probe and device lister as
"module:attr" strings (tables.lazy), imported when first used, so this package imports without torch. A new
backend is one `register_backend(...)` row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vitseg_export.formats import format_for_path
from vitseg_export.machine.probes import Availability, version_probe
from vitseg_export.runners.base import Runner
from vitseg_export.tables import Table, lazy


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
    fmt = format_for_path(Path(str(model))) if isinstance(model, (str, Path)) else None
    if backend is None:
        backend = fmt.backend if fmt is not None else "torch"
    elif fmt is not None and backend != "triton":
        fmt.check_backend(backend, Path(str(model)))
    return get_backend(backend).make(model, device, outputs, **options)


register_backend(Backend("torch", lazy("vitseg_export.runners.torch_runner:TorchRunner"),
                         version_probe("torch", "pip install 'vitseg-export[torch]'"),
                         lazy("vitseg_export.runners.torch_runner:torch_devices")))
register_backend(Backend("onnxruntime", lazy("vitseg_export.runners.onnxruntime_runner:OnnxRuntimeRunner"),
                         version_probe("onnxruntime", "pip install onnxruntime (GPU: onnxruntime-gpu)"),
                         lazy("vitseg_export.runners.onnxruntime_runner:onnxruntime_devices")))
register_backend(Backend("tensorrt", lazy("vitseg_export.runners.tensorrt_runner:TensorRTRunner"),
                         lazy("vitseg_export.runners.tensorrt_runner:probe_tensorrt"),
                         lazy("vitseg_export.runners.tensorrt_runner:tensorrt_devices")))
register_backend(Backend("tensorrt-rtx", lazy("vitseg_export.runners.tensorrt_runner:TensorRTRTXRunner"),
                         lazy("vitseg_export.runners.tensorrt_runner:probe_rtx_run"),
                         lazy("vitseg_export.runners.tensorrt_runner:rtx_devices")))
register_backend(Backend("openvino", lazy("vitseg_export.runners.openvino_runner:OpenVINORunner"),
                         version_probe("openvino", "pip install 'vitseg-export[openvino]'"),
                         lazy("vitseg_export.runners.openvino_runner:openvino_devices")))
# a model served by Triton (`vitseg verify/profile --server URL --model NAME`): the client side of the endpoint
register_backend(Backend("triton", lazy("vitseg_export.serving.client:TritonClientRunner"),
                         version_probe("tritonclient", "pip install 'vitseg-export[serve]'"),
                         lazy("vitseg_export.serving.client:served_devices")))


__all__ = ["BACKENDS", "Backend", "Runner", "get_backend", "register_backend", "runner_for"]
