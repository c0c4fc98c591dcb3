"""TensorRT engines behind the runner interface: I/O buffers and a non-default stream through cuda-python
(no PyTorch, no pycuda), executed with execute_async_v3."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vitseg_export.artifact import check_manifest_matches
from vitseg_export.errors import BackendMissingError, VitsegError
from vitseg_export.formats import read_artifact_info
from vitseg_export.probes import Availability
from vitseg_export.runners.base import INPUT_NAME, Runner
from vitseg_export.runners.cuda import CUDA_HINT, DeviceBuffer, Stream, cuda_devices, runtime
from vitseg_export.tables import lazy_module

if TYPE_CHECKING:  # mypy checks every call against the TensorRT 10.3 and 11.4 bindings (tests/test_trt_typing.py)
    import tensorrt as trt
else:  # optional, and never on the CI machines: imported on first use
    trt = lazy_module("tensorrt")


def tensorrt_availability() -> tuple[bool, str, str]:
    """(usable, TensorRT version or why not, how to fix) for building and running engines here."""
    try:
        version = trt.__version__  # the first use imports it
    except Exception as e:  # ImportError, or OSError from a bindings wheel without its libraries
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return False, f"TensorRT is not available here ({why})", \
            "install TensorRT (pip install tensorrt, or JetPack on Jetson), or use --format onnx"
    try:
        runtime()
    except VitsegError:
        return False, "the TensorRT path needs cuda-python for its buffers and streams", CUDA_HINT
    if not cuda_devices():
        return False, "TensorRT needs a CUDA GPU and the CUDA runtime sees none", "run on a machine with an NVIDIA GPU and driver"
    return True, f"TensorRT {version}", ""


def require_tensorrt() -> None:
    """TensorRT and a CUDA GPU, or one clear error (BackendMissingError, exit 2) before any other work."""
    ok, detail, hint = tensorrt_availability()
    if not ok:
        raise BackendMissingError(detail, hint)


def probe_tensorrt() -> Availability:
    """The trt format's and tensorrt backend's probe."""
    ok, detail, hint = tensorrt_availability()
    return Availability(ok, detail, hint)


def tensorrt_devices() -> list[str]:
    """The devices the tensorrt backend can use here."""
    return ["cuda"] if tensorrt_availability()[0] else []


class TensorRTRunner(Runner):
    """A TensorRT engine with its sidecar manifest; GPU only."""

    backend = "tensorrt"

    def __init__(self, path: Path | str, device: str = "cuda", outputs: tuple[str, ...] | None = None,
                 threads: int | None = None):
        """`outputs` and `threads` are accepted for the uniform interface: the engine decides its outputs and
        runs on the GPU."""
        path = Path(path)
        super().__init__(f"tensorrt:{path.name}", device)
        if device != "cuda":
            raise VitsegError("TensorRT engines run on the GPU only", "use --device cuda")
        self.path = path

    def activate_impl(self) -> None:
        require_tensorrt()
        check_manifest_matches(self.path)
        self.describe(read_artifact_info(self.path))
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise VitsegError(f"{self.path.name} could not be deserialized by TensorRT {trt.__version__}",
                              "engines are tied to the TensorRT version and GPU that built them; rebuild it here")
        self.engine = engine
        self.context = engine.create_execution_context()
        self.stream = Stream()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.output_names = self.outputs
        numpy_types = {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16, trt.DataType.INT8: np.int8,
                       trt.DataType.INT32: np.int32, trt.DataType.BOOL: np.bool_, trt.DataType.UINT8: np.uint8,
                       trt.DataType.INT64: np.int64}
        self.dtypes = {n: np.dtype(numpy_types[engine.get_tensor_dtype(n)]) for n in names}
        self.buffers: dict[str, DeviceBuffer] = {}

    def _buffer(self, name: str, nbytes: int) -> DeviceBuffer:
        """The device buffer of a tensor, grown when a larger shape needs more room."""
        buffer = self.buffers.get(name)
        if buffer is None or buffer.nbytes < nbytes:
            if buffer is not None:
                buffer.free()
            buffer = self.buffers[name] = DeviceBuffer(nbytes)
        return buffer

    def infer_impl(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        host_in = np.ascontiguousarray(pixels, dtype=self.dtypes[INPUT_NAME])
        self.context.set_input_shape(INPUT_NAME, tuple(host_in.shape))
        device_in = self._buffer(INPUT_NAME, host_in.nbytes)
        device_in.upload(host_in, self.stream)
        self.context.set_tensor_address(INPUT_NAME, device_in.ptr)
        host_out: dict[str, np.ndarray] = {}
        for name in self.outputs:
            dims = self.context.get_tensor_shape(name)
            host_out[name] = np.empty(tuple(dims[i] for i in range(len(dims))), dtype=self.dtypes[name])
            self.context.set_tensor_address(name, self._buffer(name, host_out[name].nbytes).ptr)
        if not self.context.execute_async_v3(self.stream.handle):
            raise VitsegError(f"{self.path.name}: TensorRT execution failed", "see the TensorRT log")
        for name, array in host_out.items():
            self.buffers[name].download(array, self.stream)
        self.stream.synchronize()
        return host_out

    def deactivate_impl(self) -> None:
        for buffer in self.buffers.values():
            buffer.free()
        self.stream.destroy()
        del self.context, self.engine, self.runtime
