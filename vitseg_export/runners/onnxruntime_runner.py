"""ONNX Runtime: CPU provider; CUDA and TensorRT providers when the installed onnxruntime has them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vitseg_export.artifact import read_artifact_info
from vitseg_export.errors import BackendMissingError
from vitseg_export.runners.base import INPUT_NAME, Runner


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, path: Path, device: str = "cpu", provider: str | None = None, threads: int | None = None):
        super().__init__(f"onnxruntime:{path.name}", device)
        self.path = path
        self.provider = provider
        self.threads = threads

    def activate_impl(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendMissingError("onnxruntime is not installed", "pip install onnxruntime (GPU: onnxruntime-gpu)") from None
        info = read_artifact_info(self.path)
        available = ort.get_available_providers()
        wanted = self.provider or ("CUDAExecutionProvider" if self.device == "cuda" else "CPUExecutionProvider")
        if wanted not in available:
            raise BackendMissingError(f"this onnxruntime has no {wanted} (it has {', '.join(available)})",
                                      "pip install onnxruntime-gpu, or use --device cpu")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        providers = [wanted] + (["CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [])
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        self.info = info
        self.input_size = info.input_size
        self.dynamic_batch = info.dynamic_batch
        self.dynamic_size = info.dynamic_size
        self.class_names = info.class_names
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.precision = info.precision
        self.input_dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32

    def infer_impl(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        results = self.session.run(None, {INPUT_NAME: pixels.astype(self.input_dtype, copy=False)})
        out = dict(zip(self.output_names, results))
        if "logits" in out:
            out["logits"] = out["logits"].astype(np.float32, copy=False)
        return out

    def deactivate_impl(self) -> None:
        del self.session
