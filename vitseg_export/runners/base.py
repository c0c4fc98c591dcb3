"""The runner interface: activate / infer(dict of arrays) -> dict of arrays / deactivate.

Subclasses override the `*_impl` methods; nothing touches a device before `activate`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from vitseg_export.errors import VitsegError

INPUT_NAME = "pixels"


class Runner(ABC):
    backend: str = ""

    def __init__(self, name: str, device: str):
        if device not in ("cpu", "cuda"):
            raise VitsegError(f"unknown device '{device}'", "use cpu or cuda")
        self.name = name
        self.device = device
        self.active = False

    # -- what a runner knows about its model (valid after activate) --
    input_size: tuple[int, int] = (0, 0)
    dynamic_batch: bool = True
    dynamic_size: bool = False
    class_names: list[str] = []
    output_names: list[str] = []
    precision: str = "fp32"

    def activate(self) -> "Runner":
        if not self.active:
            self.activate_impl()
            self.active = True
        return self

    def deactivate(self) -> None:
        if self.active:
            self.deactivate_impl()
            self.active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.active:
            raise RuntimeError(f"{self.name}: activate() before infer()")
        pixels = feed.get(INPUT_NAME)
        if pixels is None or pixels.ndim != 4 or pixels.shape[1] != 3:
            raise VitsegError(f"{self.name}: expected input '{INPUT_NAME}' of shape (N,3,H,W)",
                              f"got {None if pixels is None else pixels.shape}")
        if not self.dynamic_size and tuple(pixels.shape[2:]) != tuple(self.input_size):
            h, w = self.input_size
            raise VitsegError(f"{self.name} takes {h}x{w} images, got {pixels.shape[2]}x{pixels.shape[3]}",
                              f"resize inputs to {h}x{w} (vitseg resizes for you in predict/verify)")
        if not self.dynamic_batch and pixels.shape[0] != 1:
            raise VitsegError(f"{self.name} was exported with a static batch of 1", "export with --dynamic-batch")
        return self.infer_impl(np.ascontiguousarray(pixels, dtype=np.float32))

    @abstractmethod
    def activate_impl(self) -> None: ...

    @abstractmethod
    def infer_impl(self, pixels: np.ndarray) -> dict[str, np.ndarray]: ...

    def deactivate_impl(self) -> None:
        pass
