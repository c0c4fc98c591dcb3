"""The two TensorRT editions vitseg builds and runs engines with, and everything that differs between them, in
one place; the builder (export/tensorrt_engine.py) and the runner (runners/tensorrt_runner.py) are one code path.

- TensorRT (`tensorrt`, 10.x / 11.x): Jetson (JetPack) and data-center GPUs. An engine is built on the GPU it
  will run on (its compute capability), needs that GPU to build, and may target a DLA core (Jetson); 10.x also
  builds weakly typed networks with FP16/INT8 builder flags.
- TensorRT for RTX (`tensorrt_rtx`, 1.x): RTX-class GPUs. An engine is built ahead of time without any GPU for
  a list of compute capabilities and finished just in time on the target GPU; strongly typed only, no DLA.

Both share TensorRT's API for everything else (Builder, OnnxParser, optimization profiles, timing caches,
Runtime, execution contexts). The shared code calls `trt.X` on `trt` below: the module of the edition chosen
with `using(edition)`, type-checked against TensorRT's own stubs (tests/test_trt_typing.py).
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterator

from vitseg_export.errors import BackendMissingError, VitsegError
from vitseg_export.runners.cuda import cuda_devices
from vitseg_export.tables import Table


@dataclass(frozen=True)
class Edition:
    """One TensorRT edition: what vitseg needs to know to build and run its engines."""

    name: str  # the runner backend's name (vitseg_export.runners.BACKENDS)
    display: str
    module: str  # the Python module
    format: str  # the artifact format whose engines it builds (vitseg_export.formats)
    install: str  # how to get it
    builds_without_gpu: bool  # ahead-of-time builds on any machine (else: on the target GPU)
    # compute capabilities it builds for ("8.6" -> its ComputeCapability member); empty: the GPU it builds on
    targets: dict[str, str]
    default_targets: tuple[str, ...]  # what an engine targets unless --compute-capability says otherwise
    dla: bool  # can build for a DLA core
    weakly_typed: bool  # has the FP16/INT8 builder flags of a weakly typed build (TensorRT 10.x)
    timing_cache: bool  # reuses kernel timings across builds (TensorRT-RTX: a no-op since 1.2, deprecated)
    runs_on: str  # in words, for doctor and the TensorRT guide
    # compute capabilities it has no fp32 matrix multiplies for (TensorRT-RTX on Turing: "FP32 GEMM is not
    # supported", after the parse): an fp32 engine for them is refused before any work
    no_fp32_gemm: tuple[str, ...] = ()
    no_bf16: tuple[str, ...] = ()  # compute capabilities without bf16 tensor cores (Turing)

    def load(self) -> ModuleType:
        """The edition's module; BackendMissingError (one line) when it is not installed or cannot load."""
        try:
            return importlib.import_module(self.module)
        except Exception as e:  # ImportError, or OSError from a bindings wheel without its libraries
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise BackendMissingError(f"{self.display} is not available here ({why})", self.install) from None

    def check_targets(self, capabilities: tuple[str, ...]) -> tuple[str, ...]:
        """`capabilities` ("8.6", ...) as this edition can build for them, sorted; VitsegError (one line) naming
        the ones it does not know, or when the edition builds for the GPU it runs on only."""
        if not self.targets:
            raise VitsegError(f"--compute-capability applies to engines built ahead of time ({', '.join(e.format for e in EDITIONS.values() if e.targets)}), "
                              f"not {self.display}, which builds for the GPU it runs on", "drop --compute-capability")
        unknown = [c for c in capabilities if c not in self.targets]
        if unknown or not capabilities:
            raise VitsegError(f"--compute-capability {','.join(unknown) or '(none)'}: {self.display} builds for "
                              f"{', '.join(self.targets)} only", "e.g. --compute-capability 8.6,8.9,12.0")
        return tuple(sorted(set(capabilities), key=lambda c: tuple(int(p) for p in c.split("."))))

    def why_not_run_here(self, capabilities: list[str] | None) -> str | None:
        """Why an engine for `capabilities` (None: the GPU it was built on) cannot run on this machine's GPU
        (None: it can, as far as the compute capability goes)."""
        devices = cuda_devices()
        if not devices:
            where = f"a GPU of compute capability {', '.join(capabilities)}" if capabilities else "the GPU it was built for"
            return f"its {self.display} engine runs on {where}, and this machine has no CUDA GPU"
        name, major, minor = devices[0]
        here = f"{major}.{minor}"
        if capabilities and here not in capabilities:
            return (f"it was built for compute capability {', '.join(capabilities)}, and this GPU ({name}) is {here}"
                    + ("" if here in self.targets else f" ({self.display} has no {here} target)"))
        return None


EDITIONS: Table[Edition] = Table("TensorRT edition '{name}' is unknown", "use one of: {names}")
TENSORRT = EDITIONS.register(Edition(
    "tensorrt", "TensorRT", "tensorrt", "trt",
    "install TensorRT (pip install tensorrt, or JetPack on Jetson), or use --format onnx",
    builds_without_gpu=False, targets={}, default_targets=(), dla=True, weakly_typed=True, timing_cache=True,
    runs_on="the NVIDIA GPU it was built on (Jetson, data-center and desktop GPUs)"))
TENSORRT_RTX = EDITIONS.register(Edition(
    "tensorrt-rtx", "TensorRT-RTX", "tensorrt_rtx", "trt-rtx", "pip install tensorrt-rtx (NVIDIA TensorRT for RTX)",
    builds_without_gpu=True,
    targets={"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121"},
    # every target but Turing, which TensorRT-RTX builds only when asked (it costs the others speed)
    default_targets=("8.0", "8.6", "8.9", "12.0", "12.1"), dla=False, weakly_typed=False, timing_cache=False,
    runs_on="RTX-class GPUs of the compute capabilities it was built for (Ampere, Ada, Blackwell; Turing when asked)",
    no_fp32_gemm=("7.5",), no_bf16=("7.5",)))


def edition_for_format(fmt: str) -> Edition:
    """The edition that builds and runs engines of artifact format `fmt` ("trt", "trt-rtx")."""
    for edition in EDITIONS.values():
        if edition.format == fmt:
            return edition
    raise VitsegError(f"format {fmt} is not a TensorRT engine format", f"use {' or '.join(e.format for e in EDITIONS.values())}")


_ACTIVE: ContextVar[Edition | None] = ContextVar("vitseg_tensorrt_edition", default=None)


class _ActiveTensorRT:
    """`trt`: the module of the edition chosen by `using(edition)` in this context, attribute by attribute."""

    def __getattr__(self, name: str) -> Any:
        edition = _ACTIVE.get()
        if edition is None:
            raise RuntimeError("no TensorRT edition chosen: wrap the call in `with using(edition):`")
        return getattr(edition.load(), name)


trt: Any = _ActiveTensorRT()


@contextmanager
def using(edition: Edition) -> Iterator[ModuleType]:
    """Make `trt` the module of `edition` for the block (BackendMissingError when it is not installed)."""
    module = edition.load()
    token = _ACTIVE.set(edition)
    try:
        yield module
    finally:
        _ACTIVE.reset(token)


def set_targets(config: Any, edition: Edition, capabilities: tuple[str, ...]) -> None:
    """Ask the builder config of an ahead-of-time edition for these compute capabilities (TensorRT-RTX's
    IBuilderConfig.num_compute_capabilities / set_compute_capability; TensorRT has neither)."""
    module = edition.load()
    config.num_compute_capabilities = len(capabilities)
    for index, capability in enumerate(capabilities):
        config.set_compute_capability(getattr(module.ComputeCapability, edition.targets[capability]), index)


__all__ = ["EDITIONS", "Edition", "TENSORRT", "TENSORRT_RTX", "edition_for_format", "set_targets", "trt", "using"]
