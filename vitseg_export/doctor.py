"""What this machine can do: libraries, accelerators, CPU int8 features, and therefore which export
formats and precisions are available. Torch-free at import; every probe reports why it failed."""

from __future__ import annotations

import importlib
import platform
from pathlib import Path

INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def _version(module: str) -> tuple[str | None, str | None]:
    try:
        mod = importlib.import_module(module)
        return getattr(mod, "__version__", "unknown"), None
    except Exception as e:  # ImportError, or a broken native library (OSError) for tensorrt
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    import os

    return {"model": model, "cores": os.cpu_count(), "int8_features": {f: f in flags for f in INT8_CPU_FLAGS}}


def probe() -> dict:
    report: dict = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_info()}
    torch_version, torch_error = _version("torch")
    report["torch"] = {"version": torch_version, "error": torch_error}
    cuda = {"available": False, "devices": []}
    if torch_version:
        import torch

        cuda["available"] = torch.cuda.is_available()
        cuda["build"] = torch.version.cuda
        for i in range(torch.cuda.device_count() if cuda["available"] else 0):
            p = torch.cuda.get_device_properties(i)
            cuda["devices"].append({"name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                                    "memory_gb": round(p.total_memory / 2**30, 1)})
    report["cuda"] = cuda
    ort_version, ort_error = _version("onnxruntime")
    providers = []
    if ort_version:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    report["onnxruntime"] = {"version": ort_version, "error": ort_error, "providers": providers}
    trt_version, trt_error = _version("tensorrt")
    report["tensorrt"] = {"version": trt_version,
                          "error": trt_error and f"{trt_error} (install TensorRT for your CUDA: pip install tensorrt, or JetPack)"}
    onnx_version, _ = _version("onnx")
    exportable = torch_version is not None and onnx_version is not None
    has_gpu = cuda["available"]
    report["available"] = {
        "onnx": {"fp32": exportable, "fp16": exportable, "int8": exportable and ort_version is not None},
        "trt": {p: bool(trt_version and has_gpu and exportable) for p in ("fp32", "fp16", "int8")},
        "run_onnx_cpu": "CPUExecutionProvider" in providers,
        "run_onnx_cuda": "CUDAExecutionProvider" in providers and has_gpu,
        "run_onnx_tensorrt_ep": "TensorrtExecutionProvider" in providers,
        "predict_without_torch": ort_version is not None,
    }
    notes = []
    flags = report["cpu"]["int8_features"]
    if not (flags["avx512_vnni"] or flags["avx_vnni"] or flags["amx_int8"]):
        notes.append("no VNNI/AMX: int8 on this CPU gains little over fp32")
    if not has_gpu:
        notes.append("no CUDA GPU: fp16 runs on the CPU provider but slower than fp32 (fp16 is for GPUs)")
    if not trt_version:
        notes.append("TensorRT engines cannot be built here; ONNX artifacts carry the precision for a TensorRT machine")
    report["notes"] = notes
    return report
