"""The runner interface: activate / infer(dict of arrays) -> dict of arrays / deactivate.

Subclasses override the `*_impl` methods; nothing touches a device before `activate`.
"""

from __future__ import annotations

import importlib
import warnings
from abc import ABC, abstractmethod

import numpy as np

from vitseg_export.errors import BackendMissingError, VitsegError
from vitseg_export.machine.cpu import SAFE_CLASS, cpu_class, int8_exact_here
from vitseg_export.precisions import get_precision

INPUT_NAME = "pixels"


def require_module(name: str, why: str, hint: str):
    """Import `name` for a backend, or raise BackendMissingError(`why`, `hint`) (one line, exit 2)."""

    try:
        return importlib.import_module(name)
    except ImportError:
        raise BackendMissingError(why, hint) from None


def mask_of(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The class-index masks (N,H,W) of a runner's outputs: its `mask` output, else argmax of `logits`."""
    return outputs["mask"] if "mask" in outputs else outputs["logits"].argmax(1)


class Runner(ABC):
    """Base of every backend. Subclasses override the `*_impl` methods; `infer` validates the input."""

    backend: str = ""
    devices: tuple[str, ...] = ("cpu", "cuda")  # the device names this backend understands

    def __init__(self, name: str, device: str):
        if device not in self.devices:
            raise VitsegError(f"unknown device '{device}' for the {self.backend} backend", f"use {' or '.join(self.devices)}")
        self.name = name
        self.device = device
        self.active = False

    # -- what a runner knows about its model (valid after activate) --
    image_size: tuple[int, int] = (0, 0)
    dynamic_batch: bool = True
    dynamic_size: bool = False
    class_names: list[str] = []
    output_names: list[str] = []
    precision: str = "fp32"
    # the model's int8 arithmetic runs emulated in float (exact, slower): this CPU's integer kernels would saturate
    int8_emulated: bool = False
    # one of several runners that take turns in this process (timed against each other): see taking_turns()
    turns: bool = False

    def describe(self, info, warn: bool = True) -> None:
        """Take what the runner knows about its model from the artifact's metadata (an ArtifactInfo); VitsegError
        for metadata that names a precision vitseg does not know. Decides `int8_emulated`: an int8 model on a CPU
        whose integer kernels are not exact for it (vitseg_export.machine.cpu.int8_exact_here) computes what it was
        verified to compute, in float; an artifact file made for a CPU class other than this one says so in a
        warning (`warn`; the in-memory graphs of an export say it once in its progress instead)."""
        precision = get_precision(info.precision)  # damaged metadata: one line naming the known precisions
        self.int8_emulated = precision.integer_kernels and self.device in ("cpu", "auto") and not int8_exact_here(info.cpu_class)
        if self.int8_emulated and info.cpu_class and warn:
            warnings.warn(f"{info.path.name}'s int8 was made for {info.cpu_class} CPUs (8-bit weights, exact with VNNI or "
                          f"AMX); this CPU is {cpu_class()}, where its integer products would saturate, so vitseg runs its "
                          f"int8 arithmetic emulated in float (exact, slower): export with --cpu-class {SAFE_CLASS} for int8 "
                          "that is exact and fast on every CPU", stacklevel=2)
        self.info = info
        self.image_size = tuple(info.image_size)
        self.dynamic_batch = info.dynamic_batch
        self.dynamic_size = info.dynamic_size
        self.class_names = list(info.class_names)
        self.precision = info.precision

    def taking_turns(self) -> "Runner":
        """Mark the (inactive) runner as one of several that take turns in this process, as a timing comparison
        runs them: a backend whose worker threads keep spinning after a run (ONNX Runtime's default) stops them
        between runs, or the idle runner's threads slow the running one. Measured (SegFormer-B0, 128 px, 2 cores):
        fp32 8.3 ms alone, 12.1 ms taking turns with an int8 session, 8.8 ms taking turns without spinning.
        Returns the runner."""
        self.turns = True
        return self

    def activate(self) -> "Runner":
        """Load the model onto its device (once); returns the runner."""
        if not self.active:
            self.activate_impl()
            self.active = True
        return self

    def deactivate(self) -> None:
        """Release the model and its device memory."""
        if self.active:
            self.deactivate_impl()
            self.active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{"pixels": (N,3,H,W) float32 in [0,1]} -> {"logits": float32 (N,C,H,W)} and/or {"mask": uint8 (N,H,W)}.
        Raises VitsegError for a wrong input name, shape or size, RuntimeError before `activate()`."""
        if not self.active:
            raise RuntimeError(f"{self.name}: activate() before infer()")
        pixels = feed.get(INPUT_NAME)
        if pixels is None or pixels.ndim != 4 or pixels.shape[1] != 3:
            raise VitsegError(f"{self.name}: expected input '{INPUT_NAME}' of shape (N,3,H,W)",
                              f"got {None if pixels is None else pixels.shape}")
        if not self.dynamic_size and tuple(pixels.shape[2:]) != tuple(self.image_size):
            h, w = self.image_size
            raise VitsegError(f"{self.name} takes {h}x{w} images, got {pixels.shape[2]}x{pixels.shape[3]}",
                              f"resize inputs to {h}x{w} (vitseg resizes for you in predict/verify)")
        if not self.dynamic_batch and pixels.shape[0] != 1:
            raise VitsegError(f"{self.name} was exported with a static batch of 1", "export with --dynamic-batch")
        out = self.infer_impl(np.ascontiguousarray(pixels, dtype=np.float32))
        if "logits" in out:  # fp16 graphs and engines may return float16 logits
            out["logits"] = out["logits"].astype(np.float32, copy=False)
            if self.class_names and out["logits"].shape[1] != len(self.class_names):
                raise VitsegError(f"{self.name}: its metadata says {len(self.class_names)} classes, and it predicts "
                                  f"{out['logits'].shape[1]}", "the metadata was changed after export; re-export it")
        return out

    @abstractmethod
    def activate_impl(self) -> None:
        """Load the model (called once by `activate`)."""

    @abstractmethod
    def infer_impl(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Run validated float32 pixels; return the output dict."""

    def deactivate_impl(self) -> None:
        """Release what `activate_impl` loaded."""
