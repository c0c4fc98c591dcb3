"""runner -> latency, throughput, memory and compute figures. Torch-free unless profiling a checkpoint.

CUDA runners synchronize inside `infer` (outputs come back as numpy), so wall-clock timing around
`infer` is end to end; the torch CUDA path additionally times with CUDA events.
"""

from __future__ import annotations

import datetime
import importlib
import json
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vitseg_export.errors import VitsegError
from vitseg_export.formats import format_for_path
from vitseg_export.machine.cpu import cpu_info
from vitseg_export.machine.memory import peak_rss_mb
from vitseg_export.machine.probes import module_version
from vitseg_export.runners import runner_for
from vitseg_export.runners.base import Runner
from vitseg_export.runners.onnxruntime_runner import session_options
from vitseg_export.runners.openvino_runner import inference_precision, openvino_core, read_openvino_info
from vitseg_export.tables import lazy_module

# Heavy or optional, imported when first used: profiling an artifact needs neither torch nor onnx.
torch = lazy_module("torch")
onnx = lazy_module("onnx")
ort = lazy_module("onnxruntime")
int8 = lazy_module("vitseg_export.export.int8")  # node_macs (needs onnx)
registry = lazy_module("vitseg_export.modeling.registry")  # count_parameters (needs torch)
flop_counter = lazy_module("torch.utils.flop_counter")


def measure_latency(runner: Runner, pixels: np.ndarray, warmup: int = 5, iters: int = 20) -> dict:
    """Wall-clock latency of `runner.infer` on one fixed input, in milliseconds."""
    feed = {"pixels": pixels}
    for _ in range(warmup):
        runner.infer(feed)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        runner.infer(feed)
        times.append((time.perf_counter() - t0) * 1e3)
    t = np.asarray(times)
    return {"p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)),
            "p99_ms": float(np.percentile(t, 99)), "mean_ms": float(t.mean()), "iters": iters, "warmup": warmup,
            "batch": int(pixels.shape[0]), "images_per_s": float(pixels.shape[0] * 1e3 / t.mean())}


def environment(threads: int | None = None) -> dict:
    """Where figures were measured: CPU (with int8 flags), threads, library versions, GPU and Jetson power mode."""
    env = {"cpu": cpu_info(), "threads": threads, "python": platform.python_version(), "platform": platform.platform(),
           "date": datetime.date.today().isoformat()}
    for lib in ("numpy", "onnxruntime", "onnx", "torch", "tensorrt"):
        try:
            env[f"{lib}_version"] = importlib.import_module(lib).__version__
        except Exception:
            env[f"{lib}_version"] = None
    if env["torch_version"] is not None and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "compute_capability": f"{p.major}.{p.minor}"}
    jetson = Path("/etc/nv_tegra_release")
    if jetson.is_file():
        env["jetson"] = {"release": jetson.read_text().strip()[:200], **_jetson_power()}
    return env


def _jetson_power() -> dict:
    """Power mode (nvpmodel -q) and clocks (jetson_clocks --show) when readable: latency depends on them."""
    out = {}
    for key, cmd in (("power_mode", ["nvpmodel", "-q"]), ("clocks", ["jetson_clocks", "--show"])):
        if shutil.which(cmd[0]):
            try:
                out[key] = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()[:2000]
            except (OSError, subprocess.SubprocessError) as e:
                out[key] = f"unreadable: {e}"
    return out


def onnx_op_breakdown(path: Path, pixels: np.ndarray, runs: int = 5, threads: int | None = None) -> list[dict]:
    """Where an ONNX artifact spends its time: onnxruntime's own profiler, summed per op type over
    `runs` inferences, sorted by share (its trace file goes to a temp dir that is removed)."""
    opts = session_options(threads)
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="vitseg-ort-profile-") as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {"pixels": pixels.astype(np.float16) if sess.get_inputs()[0].type == "tensor(float16)" else pixels}
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + event.get("dur", 0) / 1e3
    total = sum(totals.values()) or 1.0
    return [{"op": op, "ms_per_run": ms / runs, "share": ms / total}
            for op, ms in sorted(totals.items(), key=lambda kv: -kv[1])]


def openvino_op_breakdown(path: Path, pixels: np.ndarray, runs: int = 5, threads: int | None = None) -> list[dict]:
    """Where OpenVINO spends its time on an IR or ONNX file (CPU): its per-layer performance counters,
    summed per layer type and kernel (e.g. "MatMul/brgemm_avx2_I8"), sorted by share. An IR is compiled with
    the inference precision it runs in (its rt_info, as the runner does); an ONNX file in f32."""
    core = openvino_core()
    wanted = "f32"
    if Path(path).suffix == ".xml":
        wanted = read_openvino_info(Path(path)).extra.get("inference_precision", '"f32"').strip('"')
    config = {"PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": inference_precision(core, "CPU", wanted)}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    request = core.compile_model(str(path), "CPU", config).create_infer_request()
    totals: dict[str, float] = {}
    for _ in range(runs):
        request.infer({"pixels": pixels})
        for info in request.profiling_info:
            key = f"{info.node_type}/{info.exec_type}"
            totals[key] = totals.get(key, 0.0) + info.real_time.total_seconds() * 1e3
    total = sum(totals.values()) or 1.0
    return [{"op": op, "ms_per_run": ms / runs, "share": ms / total}
            for op, ms in sorted(totals.items(), key=lambda kv: -kv[1])]


def onnx_compute(path: Path, size: tuple[int, int]) -> dict:
    """Parameters and executed GFLOPs (2 x MACs of Conv/MatMul/Gemm) per image of an ONNX artifact."""
    if module_version("onnx")[0] is None:  # the edge install: latency without the compute figures
        return {"params": None, "gflops": None}
    model = onnx.load(str(path))
    params = sum(int(np.prod(i.dims)) for i in model.graph.initializer
                 if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8))
    pixels = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
    if model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
        pixels = pixels.astype(np.float16)
    return {"params": params, "gflops": 2 * sum(int8.node_macs(model, pixels).values()) / 1e9}


def torch_compute(runner: Runner, size: tuple[int, int]) -> dict:
    """Parameters and GFLOPs per image of a torch runner's model (torch's FlopCounterMode)."""
    segmenter = runner.segmenter  # type: ignore[attr-defined]
    with torch.inference_mode(), flop_counter.FlopCounterMode(display=False) as counter:
        segmenter(torch.rand(1, 3, *size, device=runner.device))
    return {"params": registry.count_parameters(segmenter), "gflops": counter.get_total_flops() / 1e9}


@dataclass
class ProfileResult:
    """`vitseg profile` figures for one model. JSON form: the field names."""

    model: str
    backend: str
    device: str
    precision: str
    image_size: list[int]
    file_size_mb: float | None
    params: int | None
    gflops: float | None
    batches: list[dict]
    environment: dict

    def to_json(self) -> dict:
        """The JSON written by `vitseg profile --json`."""
        return asdict(self)

    def batch(self, n: int) -> dict:
        """The figures of batch size `n`."""
        return next(b for b in self.batches if b["batch"] == n)


def _file_size_mb(path: Path) -> float | None:
    file_path = path if path.suffix else (path / "model.safetensors" if path.is_dir() else None)
    return file_path.stat().st_size / 1e6 if file_path and file_path.exists() else None


def _profile_batch(runner: Runner, batch: int, size: tuple[int, int], warmup: int, iters: int, gflops: float | None) -> dict:
    if batch > 1 and not runner.dynamic_batch:
        return {"batch": batch, "skipped": "static batch of 1 (export with --dynamic-batch)"}
    pixels = np.random.default_rng(0).random((batch, 3, *size), dtype=np.float32)
    torch_cuda = runner.device == "cuda" and runner.backend == "torch"
    if torch_cuda:
        torch.cuda.reset_peak_memory_stats()
    row = measure_latency(runner, pixels, warmup, iters)
    cuda_peak = None
    if torch_cuda:
        cuda_peak = torch.cuda.max_memory_allocated() / 2**20
    row.update(peak_rss_mb=peak_rss_mb(), peak_cuda_mb=cuda_peak)
    if gflops:
        row["achieved_gflop_per_s"] = gflops * batch / (row["mean_ms"] / 1e3)
    return row


def profile(model: str | Path, batches: list[int], device: str = "cpu", threads: int | None = None,
            warmup: int = 5, iters: int = 20, size: tuple[int, int] | None = None, backend: str | None = None,
            autocast: bool = False, revision: str | None = None) -> ProfileResult:
    """Per batch size: p50/p90/p99/mean latency, throughput and memory; plus file size, params, GFLOPs.
    `model` is an artifact (its format's backend, or `backend`) or a checkpoint (PyTorch eager); `threads`
    applies while profiling only; `autocast` runs checkpoints under CUDA fp16 autocast (artifacts run at the
    precision they were exported in); `revision`: of a checkpoint's Hub id. Raises VitsegError/BackendMissingError when it cannot run here."""
    path = Path(str(model))
    options: dict = {"threads": threads} if threads else {}
    if revision is not None:
        options["revision"] = revision
    if autocast and (backend or ("torch" if format_for_path(path) is None else None)) == "torch":
        options["autocast"] = True
    runner = runner_for(model, device=device, backend=backend, **options)
    with runner:
        if size is not None and not runner.dynamic_size and tuple(size) != tuple(runner.image_size):
            h, w = runner.image_size
            raise VitsegError(f"{path.name} takes {h}x{w} input only (a static size), not {size[0]}x{size[1]}",
                              "drop --image-size, or export with --dynamic-size (SegFormer)")
        size = size or tuple(runner.image_size)
        if runner.backend == "torch":
            compute = torch_compute(runner, size)
        elif path.suffix == ".onnx":
            compute = onnx_compute(path, size)
        else:
            compute = {"params": None, "gflops": None}
        rows = [_profile_batch(runner, b, size, warmup, iters, compute["gflops"]) for b in batches]
        backend_name, precision = runner.backend, runner.precision
    return ProfileResult(str(model), backend_name, device, precision, list(size), _file_size_mb(path), compute["params"],
                         compute["gflops"], rows, environment(threads))
