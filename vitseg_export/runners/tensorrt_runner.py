"""TensorRT engines behind the runner interface, for both TensorRT editions (runners/tensorrt_editions.py): I/O
buffers and a non-default stream through cuda-python (no PyTorch, no pycuda), executed with execute_async_v3."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vitseg_export.artifact import check_manifest_matches, read_manifest
from vitseg_export.errors import BackendMissingError, VitsegError
from vitseg_export.formats import read_artifact_info
from vitseg_export.machine.probes import Availability
from vitseg_export.runners.base import INPUT_NAME, Runner
from vitseg_export.runners.cuda import CUDA_HINT, DeviceBuffer, Stream, cuda_devices, runtime
from vitseg_export.runners.tensorrt_editions import TENSORRT, TENSORRT_RTX, Edition, using

if TYPE_CHECKING:  # mypy checks every call against the TensorRT 10.3 and 11.4 bindings (tests/test_trt_typing.py)
    import tensorrt as trt
else:  # the module of the edition chosen with `using(edition)`: optional, imported on first use
    from vitseg_export.runners.tensorrt_editions import trt


def tensorrt_availability(edition: Edition = TENSORRT, to: str = "run") -> tuple[bool, str, str]:
    """(usable, the edition's version or why not, how to fix) for running engines here (`to`="run": the edition,
    cuda-python and a CUDA GPU) or building them (`to`="build": an ahead-of-time edition needs only itself)."""
    try:
        version = edition.load().__version__
    except BackendMissingError as e:
        return False, e.message, e.hint or ""
    if to == "build" and edition.builds_without_gpu:
        return True, f"{edition.display} {version} (builds here, ahead of time; runs on {edition.runs_on})", ""
    try:
        runtime()
    except VitsegError:
        return False, f"the {edition.display} path needs cuda-python for its buffers and streams", CUDA_HINT
    if not cuda_devices():
        return False, f"{edition.display} needs a CUDA GPU to {to} engines and the CUDA runtime sees none", \
            "run on a machine with an NVIDIA GPU and driver" + (f" (engines build anywhere: vitseg export --format {edition.format})"
                                                               if edition.builds_without_gpu else "")
    return True, f"{edition.display} {version}", ""


def require_tensorrt(edition: Edition = TENSORRT, to: str = "run") -> None:
    """The edition (and, where it needs one, a CUDA GPU), or one clear error (BackendMissingError, exit 2)
    before any other work."""
    ok, detail, hint = tensorrt_availability(edition, to)
    if not ok:
        raise BackendMissingError(detail, hint)


def probe_tensorrt() -> Availability:
    """The trt format's and tensorrt backend's probe: TensorRT builds and runs on a CUDA GPU."""
    return Availability(*tensorrt_availability(TENSORRT))


def probe_rtx_build() -> Availability:
    """The trt-rtx format's probe: TensorRT-RTX builds engines on any machine."""
    return Availability(*tensorrt_availability(TENSORRT_RTX, "build"))


def probe_rtx_run() -> Availability:
    """The tensorrt-rtx backend's probe: TensorRT-RTX runs engines on an RTX-class CUDA GPU."""
    return Availability(*tensorrt_availability(TENSORRT_RTX))


def tensorrt_devices() -> list[str]:
    """The devices the tensorrt backend can use here."""
    return ["cuda"] if tensorrt_availability(TENSORRT)[0] else []


def rtx_devices() -> list[str]:
    """The devices the tensorrt-rtx backend can use here."""
    return ["cuda"] if tensorrt_availability(TENSORRT_RTX)[0] else []


class TensorRTRunner(Runner):
    """A TensorRT engine with its sidecar manifest; GPU only. One class for both editions: `edition` says whose."""

    backend = "tensorrt"
    edition: Edition = TENSORRT

    def __init__(self, path: Path | str, device: str = "cuda", outputs: tuple[str, ...] | None = None,
                 threads: int | None = None):
        """`outputs` and `threads` are accepted for the uniform interface: the engine decides its outputs and
        runs on the GPU."""
        path = Path(path)
        super().__init__(f"{self.backend}:{path.name}", device)
        self.path = path
        if device != "cuda":
            # a damaged, truncated or foreign file says so first: --device cuda would not help it
            check_manifest_matches(path)
            read_artifact_info(path)
            raise VitsegError(f"{self.edition.display} engines run on the GPU only", "use --device cuda")

    def activate_impl(self) -> None:
        self._check_engine()  # the file alone says whose engine it is and which GPUs it is for
        with using(self.edition):
            require_tensorrt(self.edition)
            self.logger = trt.Logger(trt.Logger.WARNING)
            self.runtime = trt.Runtime(self.logger)
            engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
            if engine is None:
                raise VitsegError(f"{self.path.name} could not be deserialized by {self.edition.display} {trt.__version__}",
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

    def _check_engine(self) -> None:
        """Before anything is loaded: the file is an engine of this runner's edition, with its manifest, for a
        compute capability this GPU has. VitsegError / BackendMissingError (one line) otherwise."""
        check_manifest_matches(self.path)
        info = read_artifact_info(self.path)
        if info.format != self.edition.format:
            other = next((e for e in (TENSORRT, TENSORRT_RTX) if e.format == info.format), None)
            raise VitsegError(f"{self.path.name} is {'a ' + other.display if other else 'an ' + info.format} engine, and the "
                              f"{self.backend} backend runs {self.edition.display} engines",
                              f"run it with --backend {other.name}" if other else "export it again")
        self.describe(info)
        capabilities = read_manifest(self.path).extra.get("compute_capabilities")
        why = self.edition.why_not_run_here(capabilities if isinstance(capabilities, list) else None)
        if why is not None:
            raise BackendMissingError(f"{self.path.name} cannot run here: {why}",
                                      f"verify it on its target: vitseg verify {self.path.name} --reference CHECKPOINT --device cuda")

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


class TensorRTRTXRunner(TensorRTRunner):
    """A TensorRT-RTX engine: built ahead of time for a list of compute capabilities, finished just in time on
    the GPU it runs on."""

    backend = "tensorrt-rtx"
    edition = TENSORRT_RTX
