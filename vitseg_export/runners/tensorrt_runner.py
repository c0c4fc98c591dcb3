"""TensorRT engines behind the runner interface: torch CUDA tensors as I/O buffers (no pycuda),
executed on a non-default CUDA stream with execute_async_v3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vitseg_export.artifact import read_artifact_info
from vitseg_export.errors import VitsegError
from vitseg_export.runners.base import INPUT_NAME, Runner


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
        from vitseg_export.export.tensorrt_engine import require_tensorrt

        require_tensorrt()
        import tensorrt as trt  # typed against the 10.3 and 11.4 bindings by mypy
        import torch

        self.describe(read_artifact_info(self.path))
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise VitsegError(f"{self.path.name} could not be deserialized by TensorRT {trt.__version__}",
                              "engines are tied to the TensorRT version and GPU that built them; rebuild it here")
        self.engine = engine
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.torch = torch
        self.dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                       trt.DataType.INT8: torch.int8, trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool,
                       trt.DataType.UINT8: torch.uint8, trt.DataType.INT64: torch.int64}
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.output_names = self.outputs
        self.input_dtype = self.dtypes[engine.get_tensor_dtype(INPUT_NAME)]

    def infer_impl(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.cuda.stream(self.stream):
            # fresh allocations are 256-byte aligned, as TensorRT requires
            x = torch.from_numpy(pixels).to("cuda", non_blocking=True).to(self.input_dtype).contiguous()
            self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
            self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
            buffers: dict[str, Any] = {}
            for name in self.outputs:
                dims = self.context.get_tensor_shape(name)
                shape = tuple(dims[i] for i in range(len(dims)))
                buffers[name] = torch.empty(shape, dtype=self.dtypes[self.engine.get_tensor_dtype(name)], device="cuda")
                self.context.set_tensor_address(name, buffers[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise VitsegError(f"{self.path.name}: TensorRT execution failed", "see the TensorRT log")
        self.stream.synchronize()
        return {name: t.cpu().numpy() for name, t in buffers.items()}

    def deactivate_impl(self) -> None:
        del self.context, self.engine, self.runtime
