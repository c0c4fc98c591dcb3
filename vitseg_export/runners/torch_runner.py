"""The PyTorch reference (eager fp32) behind the same interface as every other backend."""

from __future__ import annotations

import copy
import importlib

import numpy as np

from vitseg_export.errors import BackendMissingError, VitsegError
from vitseg_export.machine.probes import module_version
from vitseg_export.runners.base import Runner, require_module
from vitseg_export.tables import lazy_module

# torch and the model code are imported when a runner activates: this module (its device list) loads without torch.
checkpoints = lazy_module("vitseg_export.checkpoint")
registry = lazy_module("vitseg_export.modeling.registry")


class TorchRunner(Runner):
    """PyTorch eager fp32: the reference every comparison is made against."""

    backend = "torch"

    def __init__(self, checkpoint, device: str = "cpu", outputs: tuple[str, ...] = ("logits",), threads: int | None = None,
                 autocast: bool = False, revision: str | None = None):
        """`checkpoint`: anything `load_checkpoint` takes (`revision`: of a Hub id), or a LoadedCheckpoint. `threads` sets torch's
        intra-op threads while the runner is active (restored on deactivate). `autocast`: run under CUDA
        autocast fp16 (eager fp16, what a PyTorch deployment would do on a GPU; CUDA only)."""
        super().__init__(f"torch:{getattr(checkpoint, 'source', checkpoint)}", device)
        self.checkpoint = checkpoint
        self.output_names = list(outputs)
        self.threads = threads
        self.autocast = autocast
        self.revision = revision
        if autocast:
            self.precision = "fp16-autocast"

    def activate_impl(self) -> None:
        torch = require_module("torch", "the torch backend needs PyTorch", "pip install 'vitseg-export[torch]'")

        if self.device == "cuda" and not torch.cuda.is_available():
            raise BackendMissingError("--device cuda: torch sees no CUDA GPU here", "use --device cpu, or a CUDA build of torch")
        if self.autocast and self.device != "cuda":
            raise VitsegError("--autocast is PyTorch's CUDA fp16 autocast", "add --device cuda, or drop --autocast")
        loaded = self.checkpoint if isinstance(self.checkpoint, checkpoints.LoadedCheckpoint) else checkpoints.load_checkpoint(
            self.checkpoint, revision=self.revision)
        self.loaded = loaded
        segmenter = loaded.segmenter()
        if self.device != "cpu":  # a copy: moving the caller's module would pull it off the CPU under other runners
            segmenter = copy.deepcopy(segmenter)
        self.segmenter = segmenter.eval().to(self.device)
        self.class_names = list(loaded.meta.class_names)
        self.image_size = tuple(loaded.meta.image_size)
        self.dynamic_size = registry.get_family(loaded.meta.family).fixed_input_size(loaded.meta.config) is None
        self.torch = torch
        self.saved_threads = torch.get_num_threads()
        # the reference is exact fp32: no TF32 rounding in cuBLAS/cuDNN (cuDNN allows it by default),
        # restored on deactivate
        self.saved_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        if self.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        if self.threads:
            torch.set_num_threads(self.threads)

    def infer_impl(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.autocast):
            logits = self.segmenter(torch.from_numpy(pixels).to(self.device))
            out = {}
            if "logits" in self.output_names:
                out["logits"] = logits.float().cpu().numpy()
            if "mask" in self.output_names:
                out["mask"] = logits.argmax(1).to(torch.uint8).cpu().numpy()
        return out

    def deactivate_impl(self) -> None:
        del self.segmenter
        self.torch.set_num_threads(self.saved_threads)
        self.torch.backends.cuda.matmul.allow_tf32, self.torch.backends.cudnn.allow_tf32 = self.saved_tf32
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


def torch_devices() -> list[str]:
    """The devices the torch backend can use here (none without torch)."""
    if module_version("torch")[0] is None:
        return []
    torch = importlib.import_module("torch")
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
