"""Third-party code that compiles itself the first time it is used, built ahead of that use (`vitseg doctor
--prepare`, `vitseg qat --format openvino` before it trains, the test suite's session fixture) instead of inside
the library's own time limit.

- NNCF's PyTorch CPU extension (`quantized_functions_cpu`: the FakeQuantize kernels `vitseg qat --format openvino`
  trains with) is a C++ build with the machine's compiler, the first time a process uses it, under a 60-second
  limit (NNCF_EXTENSION_LOAD_TIMEOUT): on a 2-core machine with a busy core it ran out and failed the whole QAT.
  `prepare_nncf_torch` builds it with no limit (torch.utils.cpp_extension.load, what NNCF calls), into torch's
  extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); NNCF then only loads it. Without a
  C++ compiler NNCF falls back to PyTorch operations (slower training): said, not hidden.
- NVIDIA Model Optimizer compiles its int4 packing (cppimport) and CUDA extensions on first use; no path vitseg
  uses on a CPU reaches them, so there is nothing to build.
"""

from __future__ import annotations

import time
from pathlib import Path

from vitseg_export.machine.probes import module_version
from vitseg_export.progress import Progress, silent
from vitseg_export.tables import lazy_module

nncf_quantization_extensions = lazy_module("nncf.torch.quantization.extensions")
nncf_reference = lazy_module("nncf.torch.quantization.reference")


def prepare_nncf_torch(progress: Progress = silent) -> dict:
    """Build (first use only) and load NNCF's PyTorch CPU extension: {"extension", "status", "seconds",
    "build_dir"}; status "built", "already built", "not compiled: ..." (NNCF will use PyTorch operations) or
    "unavailable: ..." (NNCF or torch is not installed)."""
    for name in ("torch", "nncf"):
        version, error = module_version(name)
        if version is None:
            return {"extension": "nncf quantized_functions_cpu", "status": f"unavailable: {name} ({error})", "seconds": 0.0,
                    "build_dir": None}
    loader = nncf_quantization_extensions.QuantizedFunctionsCPULoader
    build_dir = Path(loader.get_build_dir())
    built_before = any(build_dir.glob(f"{loader.name()}*.so"))
    if not built_before:
        progress("compiling NNCF's PyTorch CPU extension (first use on this machine only; about 30 s on 2 cores)")
    t0 = time.perf_counter()
    module = loader.load()
    seconds = round(time.perf_counter() - t0, 1)
    if module is nncf_reference.ReferenceQuantizedFunctions:
        status = "not compiled: NNCF falls back to PyTorch operations (slower QAT); install a C++ compiler (g++)"
    else:
        status = "already built" if built_before else "built"
    return {"extension": "nncf quantized_functions_cpu", "status": status, "seconds": seconds, "build_dir": str(build_dir)}
