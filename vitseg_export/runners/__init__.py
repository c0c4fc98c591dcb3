"""artifact/checkpoint -> runner: one interface for every backend (torch, onnxruntime, tensorrt).

Every runner takes {"pixels": float32 (N,3,H,W) in [0,1]} and returns {"logits": float32
(N,C,H,W)} and/or {"mask": uint8 (N,H,W)}, as numpy arrays. Backends are imported lazily inside
their own module, so this package imports without torch.
"""

from __future__ import annotations

from pathlib import Path

from vitseg_export.artifact import ENGINE_SUFFIXES, ONNX_SUFFIXES
from vitseg_export.errors import VitsegError
from vitseg_export.runners.base import Runner

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def runner_for(model: str | Path, device: str = "cpu", backend: str | None = None, outputs: tuple[str, ...] = ("logits",)) -> Runner:
    """The runner for an artifact (by suffix) or a checkpoint (torch)."""
    suffix = Path(str(model)).suffix.lower()
    backend = backend or ("onnxruntime" if suffix in ONNX_SUFFIXES else "tensorrt" if suffix in ENGINE_SUFFIXES else "torch")
    if backend == "onnxruntime":
        from vitseg_export.runners.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(Path(model), device)
    if backend == "tensorrt":
        from vitseg_export.runners.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(Path(model), device)
    if backend == "torch":
        from vitseg_export.runners.torch_runner import TorchRunner

        return TorchRunner(model, device, outputs)
    raise VitsegError(f"unknown backend '{backend}'", f"use one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Runner", "runner_for"]
