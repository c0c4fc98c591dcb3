"""The CPU an int8 artifact runs on, by class: what decides whether its integer arithmetic is exact and whether
it pays. A leaf (it imports only vitseg's lazy-import helper): doctor, profiling, the exporters and the runners read it.

The flags come from /proc/cpuinfo where there is one (Linux), else from py-cpuinfo (CPUID on x86 under macOS and
Windows). An x86 CPU whose flags cannot be read is of no known class: int8 made for the vnni or amx class is then
treated as inexact there (emulated in float, exactly, with a one-line warning), never assumed exact.

- avx2: no VNNI. An int8 dot product is `vpmaddubsw` (u8 x s8 pairs summed into int16, saturating) plus
  `vpmaddwd`: about the cost of an fp32 FMA, and 8-bit weights can saturate the int16 sums.
- vnni: AVX512-VNNI or AVX-VNNI: `vpdpbusd` sums u8 x s8 products straight into int32, exactly, 4x the work
  per instruction of AVX2's path.
- amx: AMX-INT8 tiles (Sapphire Rapids and later), the same exact products.

Saturation-safe int8 (weights of 7 bits: no u8 x s7 pair can reach the int16 limit; onnxruntime's
`reduce_range`, NNCF's overflow fix) computes the same integers on every class, so a verdict measured on one
holds on the others; 8-bit weights are exact only on vnni and amx.
"""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path

from vitseg_export.tables import lazy_module

py_cpuinfo = lazy_module("cpuinfo")  # py-cpuinfo: the flags where there is no /proc/cpuinfo

INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
# bf16 arithmetic: OpenVINO int8 IRs compute their float part in bf16 where the CPU has these
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPU_CLASSES = ("avx2", "vnni", "amx")  # in order: each computes exactly what the previous ones do
SAFE_CLASS = "avx2"  # int8 made for it (7-bit weights) computes the same integers on every class
# int8 with full 8-bit weights and no class of its own (the graphs for TensorRT, which computes int8 exactly):
# on a CPU it is exact from this class on
FULL_RANGE_CLASS = "vnni"


UNKNOWN = "unknown"  # an x86 CPU whose flags could not be read
ARM = "arm"  # aarch64: int8 dot products accumulate in int32 (SDOT/UDOT, or widening multiply-adds): exact


def cpu_flags() -> set[str]:
    """The instruction set flags of this machine's CPU: /proc/cpuinfo's, else py-cpuinfo's (CPUID; empty where
    neither can tell)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags") and ":" in line:
                return set(line.split(":", 1)[1].split())
    return _flags_from_cpuid()


_CPUID_FLAGS: list[set[str]] = []  # py-cpuinfo spawns a process: asked once


def _flags_from_cpuid() -> set[str]:
    if not _CPUID_FLAGS:
        try:
            _CPUID_FLAGS.append(set(py_cpuinfo.get_cpu_info().get("flags", [])))
        except Exception:  # not installed, or no answer on this platform: no flags known
            _CPUID_FLAGS.append(set())
    return _CPUID_FLAGS[0]


def cpu_info() -> dict:
    """CPU model, core count, the int8- and bf16-relevant instruction set flags, and its class."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name") and ":" in line), model)
    flags = cpu_flags()
    return {"model": model, "cores": os.cpu_count(), "class": cpu_class(flags),
            "int8_features": {f: f in flags for f in INT8_CPU_FLAGS}, "bf16_features": {f: f in flags for f in BF16_CPU_FLAGS}}


def cpu_class(flags: set[str] | None = None, machine: str | None = None) -> str:
    """This machine's (or `flags`') int8 class: amx, vnni, avx2; "arm" on aarch64; "other" for an x86 CPU without
    AVX2 (not an x86 int8 target); "unknown" for an x86 CPU whose flags could not be read."""
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    if "amx_int8" in flags:
        return "amx"
    if "avx512_vnni" in flags or "avx_vnni" in flags or "avx512vnni" in flags:
        return "vnni"
    if "avx2" in flags:
        return "avx2"
    if machine in ("aarch64", "arm64") or machine.startswith("armv8"):
        return ARM
    return "other" if flags else UNKNOWN


def classes_exact_for(made_for: str) -> list[str]:
    """The classes on which int8 made for `made_for` computes exactly what it was verified with: every class
    for saturation-safe int8 (avx2), vnni and amx for 8-bit weights ("": int8 of no class, 8-bit weights)."""
    return list(CPU_CLASSES) if made_for == SAFE_CLASS else [c for c in CPU_CLASSES if c != SAFE_CLASS]


def int8_exact_here(made_for: str) -> bool:
    """Whether this CPU's integer kernels compute int8 made for `made_for` ("": full 8-bit weights) exactly. Where
    they do not (8-bit weights on a CPU without VNNI or AMX: u8 x s8 pairs saturate AVX2's int16 sums), vitseg's
    runners emulate the integer arithmetic in float: exact, and slower. Only that pairing is inexact: ARM's
    int8 dot products and VNNI/AMX accumulate in int32. A CPU of unknown class counts as the safe class (warned once)."""
    here = cpu_class()
    if here == UNKNOWN:
        _warn_unknown()
        here = SAFE_CLASS
    return not (here == SAFE_CLASS and (made_for or FULL_RANGE_CLASS) != SAFE_CLASS)


_WARNED: list[bool] = []


def _warn_unknown() -> None:
    if not _WARNED:
        _WARNED.append(True)
        warnings.warn(f"this CPU's instruction set flags could not be read (no /proc/cpuinfo, no answer from py-cpuinfo): "
                      f"vitseg treats it as the {SAFE_CLASS} class, whose int8 is exact on every x86 CPU, and emulates "
                      "8-bit int8 in float", stacklevel=3)
