"""What this machine can do: libraries, accelerators, CPU int8 features, and therefore which export
formats and precisions are available. Torch-free at import; every probe reports why it failed."""

from __future__ import annotations

import platform

from vitseg_export.errors import VitsegError
from vitseg_export.formats import FORMATS
from vitseg_export.machine.cpu import cpu_info
from vitseg_export.machine.probes import module_version
from vitseg_export.runners import BACKENDS
from vitseg_export.tables import lazy_module

torch = lazy_module("torch")
server = lazy_module("vitseg_export.serving.server")  # where tritonserver is, for `vitseg serve`

def _cuda(torch_ok: bool) -> dict:
    cuda: dict = {"available": False, "devices": []}
    if not torch_ok:
        return cuda

    cuda["available"] = torch.cuda.is_available()
    cuda["build"] = torch.version.cuda
    for i in range(torch.cuda.device_count() if cuda["available"] else 0):
        p = torch.cuda.get_device_properties(i)
        cuda["devices"].append({"name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                                "memory_gb": round(p.total_memory / 2**30, 1)})
    return cuda


def probe() -> dict:
    """What this machine has and can do: every row of the backend and format tables probed, CUDA, CPU int8
    features, and notes on what follows from them. JSON-ready."""
    report: dict = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_info()}
    torch_version, torch_error = module_version("torch")
    report["torch"] = {"version": torch_version, "error": torch_error}
    report["cuda"] = _cuda(torch_version is not None)
    backends = {}
    for name, backend in BACKENDS.items():
        a = backend.probe()
        backends[name] = {"available": a.ok, "detail": a.detail, "hint": a.hint, "devices": backend.devices() if a.ok else []}
    report["backends"] = backends
    formats = {}
    for name, fmt in FORMATS.items():
        a = fmt.probe()
        formats[name] = {"available": a.ok, "detail": a.detail, "hint": a.hint, "suffixes": list(fmt.suffixes),
                         "precisions": {p: a.ok for p in fmt.precisions}, "runs_on": backends[fmt.backend]["devices"]}
    report["formats"] = formats
    report["predict_without_torch"] = backends["onnxruntime"]["available"]
    report["serve"] = _serve()
    report["notes"] = _notes(report)
    return report


def _serve() -> dict:
    """The tritonserver `vitseg serve` would run, and the backends it has."""
    try:
        found = server.find_tritonserver()
    except VitsegError as e:
        return {"available": False, "detail": e.message, "hint": e.hint or ""}
    return {"available": True, "path": str(found.path), "backends": found.backend_names()}


def _notes(report: dict) -> list[str]:
    notes = []
    flags = report["cpu"]["int8_features"]
    if not (flags["avx512_vnni"] or flags["avx_vnni"] or flags["amx_int8"]):
        notes.append("no VNNI/AMX (CPU class avx2): int8 is saturation-safe here (7-bit weights, overflow fix) and pays "
                     "only where matmuls dominate; export refuses an int8 slower than fp32 for this class")
    if not any(report["cpu"]["bf16_features"].values()):
        notes.append("no bf16 arithmetic: OpenVINO int8 IRs compute between their int8 layers in f32 here")
    if not report["cuda"]["available"]:
        notes.append("no CUDA GPU: fp16 runs on the CPU provider but slower than fp32 (fp16 is for GPUs)")
    return notes
