"""CUDA memory, copies and streams through cuda-python's runtime bindings (`cuda.bindings.runtime`), as
Polygraphy does: what TensorRT engines need to build and run, without PyTorch (a ~1 GB dependency on a
Jetson production image). Every call returns (cudaError_t, values...); an error becomes one VitsegError.

Type-checked with mypy against stubs generated from cuda-bindings (tests/typing/cuda-bindings)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from vitseg_export.errors import BackendMissingError, VitsegError
from vitseg_export.tables import lazy_module

if TYPE_CHECKING:  # mypy checks the calls against the cuda-bindings stubs
    from cuda.bindings import runtime as cudart
else:  # optional (the [trt] extra): imported on first use
    cudart = lazy_module("cuda.bindings.runtime")

CUDA_HINT = "pip install 'vitseg-export[trt]' (cuda-python); on Jetson it comes with JetPack"


def runtime() -> Any:
    """The cuda-python runtime module (`cuda.bindings.runtime`, cuda-bindings 12.6 and newer);
    BackendMissingError when it is not installed."""
    try:
        cudart.cudaGetDeviceCount  # the first use imports it
    except ImportError:
        raise BackendMissingError("cuda-python is not installed (TensorRT's buffers and streams need it)",
                                  CUDA_HINT) from None
    return cudart


def check(result: Any) -> Any:
    """The values of a cuda-python call, or VitsegError naming the CUDA error (e.g. no driver)."""
    cudart = runtime()
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart.cudaError_t.cudaSuccess:
        name = getattr(error, "name", str(error))
        if "Driver" in name or "NoDevice" in name:
            raise BackendMissingError(f"CUDA is not usable here ({name})",
                                      "install the NVIDIA driver, or run on a machine with an NVIDIA GPU")
        raise VitsegError(f"CUDA error {name}", "see the CUDA runtime documentation for this error")
    return values[0] if len(values) == 1 else tuple(values)


def cuda_devices() -> list[tuple[str, int, int]]:
    """(name, major, minor) of every CUDA device; [] when there is no driver or no device."""
    try:
        count = check(runtime().cudaGetDeviceCount())
    except VitsegError:
        return []
    devices = []
    for index in range(count):
        props = check(runtime().cudaGetDeviceProperties(index))
        name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        devices.append((name.rstrip("\x00"), int(props.major), int(props.minor)))
    return devices


class DeviceBuffer:
    """Device memory of `nbytes` (cudaMalloc: 256-byte aligned, as TensorRT requires); freed on `free`."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(runtime().cudaMalloc(self.nbytes)))

    def upload(self, array: np.ndarray, stream: "Stream") -> None:
        """Copy a contiguous host array to the buffer, asynchronously on `stream`."""
        kind = runtime().cudaMemcpyKind.cudaMemcpyHostToDevice
        check(runtime().cudaMemcpyAsync(self.ptr, array.ctypes.data, array.nbytes, kind, stream.handle))

    def download(self, array: np.ndarray, stream: "Stream") -> None:
        """Copy the buffer into a contiguous host array, asynchronously on `stream`."""
        kind = runtime().cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(runtime().cudaMemcpyAsync(array.ctypes.data, self.ptr, array.nbytes, kind, stream.handle))

    def free(self) -> None:
        """Release the memory (once)."""
        if self.ptr:
            check(runtime().cudaFree(self.ptr))
            self.ptr = 0


class Stream:
    """A non-default CUDA stream (cudaStreamCreate), with its handle as an int for TensorRT."""

    def __init__(self) -> None:
        self.stream = check(runtime().cudaStreamCreate())
        self.handle = int(self.stream)

    def synchronize(self) -> None:
        """Wait for everything queued on the stream."""
        check(runtime().cudaStreamSynchronize(self.stream))

    def destroy(self) -> None:
        """Release the stream."""
        check(runtime().cudaStreamDestroy(self.stream))
