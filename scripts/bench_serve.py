"""Served vs in-process, measured side by side in one run (never by timed assertions in tests).

    python scripts/bench_serve.py --checkpoint runs/b0 [--image-size 128] [--duration 10] \
        [--queue-delay-us 0,100,1000] [--perf-analyzer PATH] --output bench-serve

For a checkpoint: the ONNX artifact (dynamic batch, verified at export), then for each queue delay a
Python-backend Triton repository served by `vitseg serve` (a real tritonserver on this machine), and:
- checks: config.pbtxt parsed by Triton's schema; 8 concurrent clients x 10 requests get exactly the in-process
  masks; `verify --server` passes; SIGTERM stops the server within 20 s with no process left;
- figures, in --rounds interleaved rounds with the server up (medians): the in-process runner's batch-1 p50 and
  throughput, the served p50 at concurrency 1 and throughput at concurrency 8 (client-side, single-image requests
  asking for the mask), their ratios (targets: p50 within 1.15x, throughput >= 1.2x), the in-process batch-8
  throughput (the most dynamic batching can give this runtime here), and, with --perf-analyzer, Triton's own
  perf_analyzer at concurrency 1 beside vitseg's figure.
Prints the CPU and its int8/bf16 flags first: figures say nothing about another CPU class.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vitseg_export.checkpoint import load_checkpoint
from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx
from vitseg_export.machine.cpu import cpu_info
from vitseg_export.measure.profiling import measure_latency
from vitseg_export.runners import runner_for
from vitseg_export.serving.client import load_test
from vitseg_export.serving.repository import repository_from_artifact, validate_config
from vitseg_export.settings import ExportRequest, TritonSettings
from vitseg_export.verdict.verify import verify_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_process(artifact: Path, size: tuple[int, int], batch: int = 1, iters: int = 100) -> dict:
    """Latency of the artifact's own runner at `batch`, as a deployment without a server would run it."""
    pixels = np.random.default_rng(0).random((batch, 3, *size), dtype=np.float32)
    with runner_for(artifact) as runner:
        row = measure_latency(runner, pixels, warmup=10, iters=max(5, iters // batch))
    return {"p50_ms": row["p50_ms"], "images_per_s": row["images_per_s"]}


def start(repository: Path, log: Path) -> tuple[subprocess.Popen, dict]:
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    proc = subprocess.Popen([sys.executable, "-m", "vitseg_export", "serve", str(repository), *[
        a for kind, port in ports.items() for a in (f"--{kind}-port", str(port))]], stdout=subprocess.PIPE,
        stderr=open(log, "w"), text=True)
    for line in proc.stdout:
        if line.startswith("serving"):
            return proc, ports
    raise SystemExit(f"vitseg serve failed: {log.read_text()[-2000:]}")


def clients_equal_in_process(artifact: Path, url: str, name: str, size: tuple[int, int]) -> bool:
    """8 concurrent clients x 10 requests each: every mask equal to the in-process runner's."""
    import tritonclient.http as httpclient

    images = np.random.default_rng(1).random((10, 1, 3, *size), dtype=np.float32)
    with runner_for(artifact) as local:
        expected = [local.infer({"pixels": im})["mask"] if "mask" in local.output_names else
                    local.infer({"pixels": im})["logits"].argmax(1) for im in images]

    def client(seed: int) -> bool:
        c = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
        ok = True
        for k in range(10):
            tensor = httpclient.InferInput("pixels", [1, 3, *size], "FP32")
            tensor.set_data_from_numpy(images[(k + seed) % 10])
            result = c.infer(name, [tensor])
            mask = result.as_numpy("mask") if "mask" in {o["name"] for o in result.get_response()["outputs"]} \
                else result.as_numpy("logits").argmax(1)
            ok &= bool(np.array_equal(mask, expected[(k + seed) % 10]))
        return ok

    with ThreadPoolExecutor(8) as pool:
        return all(pool.map(client, range(8)))


def perf_analyzer(binary: str, name: str, port: int, seconds: float) -> dict:
    """Triton's perf_analyzer at concurrency 1 over HTTP (zero inputs), its throughput and p50."""
    proc = subprocess.run([binary, "-m", name, "-u", f"localhost:{port}", "--concurrency-range", "1:1",
                           "--input-data", "zero", "--measurement-interval", str(int(seconds * 1000)), "-b", "1"],
                          capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    throughput = re.search(r"Throughput: ([\d.]+) infer/sec", text)
    p50 = re.search(r"p50 latency: (\d+) usec", text)
    return {"returncode": proc.returncode, "images_per_s": float(throughput.group(1)) if throughput else None,
            "p50_ms": int(p50.group(1)) / 1000 if p50 else None, "tail": text.strip().splitlines()[-12:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load level and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queue-delay-us", default="0,100,1000")
    parser.add_argument("--perf-analyzer", default=None, help="a perf_analyzer binary (the tritonclient 2.51 wheel ships one)")
    parser.add_argument("--output", type=Path, default=Path("bench-serve"))
    args = parser.parse_args()
    cpu = cpu_info()
    flags = [f for f, on in {**cpu["int8_features"], **cpu["bf16_features"]}.items() if on]
    print(f"CPU: {cpu['model']} ({cpu['cores']} cores); flags: {', '.join(flags) or 'none of the int8/bf16 ones'}")
    args.output.mkdir(parents=True, exist_ok=True)
    loaded = load_checkpoint(args.checkpoint)
    size = (args.image_size,) * 2 if args.image_size else tuple(loaded.meta.image_size)
    artifact = args.output / "model.onnx"
    export_onnx(loaded, artifact, OnnxExportSettings(image_size=size, outputs="both"))
    rows = []
    for delay in [int(d) for d in args.queue_delay_us.split(",")]:
        name = f"seg-delay{delay}"
        result = repository_from_artifact(artifact, args.output / "repo", ExportRequest(triton=TritonSettings(
            name=name, backend="python", max_queue_delay_us=delay)))
        validate_config((result.path / "config.pbtxt").read_text())
        proc, ports = start(args.output / "repo", args.output / f"serve-{delay}.log")
        url = f"http://localhost:{ports['http']}"
        try:
            equal = clients_equal_in_process(artifact, url, name, size)
            verdict = verify_server(url, name, args.checkpoint, num_images=16, concurrency=8)
            rounds = []
            for _ in range(args.rounds):  # interleaved with the server up (idle while in-process runs): one run, one machine
                local = in_process(artifact, size)
                time.sleep(0.5)
                one = load_test(url, name, 1, args.duration)
                time.sleep(0.5)
                eight = load_test(url, name, 8, args.duration)
                time.sleep(0.5)
                rounds.append((local, one, eight))
            batched = in_process(artifact, size, batch=8)  # what batching can give this runtime here at best
            pa = perf_analyzer(args.perf_analyzer, name, ports["http"], args.duration) if args.perf_analyzer else None
        finally:
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            stop_s = time.perf_counter() - t0
        left = [line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
                if str(args.output / "repo") in line or "triton_python_backend_stub" in line]
        p50_ratios = [one.p50_ms / local["p50_ms"] for local, one, _ in rounds if one.p50_ms]
        throughput_ratios = [eight.throughput_per_s / local["images_per_s"] for local, _, eight in rounds]
        row = {"queue_delay_us": delay, "rounds": [{"in_process": local, "served_c1": vars(one), "served_c8": vars(eight)}
                                                    for local, one, eight in rounds],
               "in_process_batch8_images_per_s": batched["images_per_s"],
               "batch8_vs_batch1": batched["images_per_s"] / float(np.median([r[0]["images_per_s"] for r in rounds])),
               "p50_ratio_c1": float(np.median(p50_ratios)), "throughput_ratio_c8": float(np.median(throughput_ratios)),
               "errors": sum(one.errors + eight.errors for _, one, eight in rounds),
               "eight_clients_equal_in_process": equal, "verify_server_passed": verdict.passed,
               "verify_agreement": verdict.summary.pixel_agreement if verdict.summary else None,
               "sigterm_seconds": round(stop_s, 2), "processes_left": left, "perf_analyzer": pa}
        rows.append(row)
        local_p50 = float(np.median([r[0]["p50_ms"] for r in rounds]))
        served_p50 = float(np.median([r[1].p50_ms for r in rounds]))
        print(f"delay {delay:>5} us ({args.rounds} interleaved rounds, medians): in-process p50 {local_p50:.2f} ms | served c1 "
              f"p50 {served_p50:.2f} ms: {row['p50_ratio_c1']:.2f}x (target <= 1.15x) | served c8 vs in-process batch 1: "
              f"{row['throughput_ratio_c8']:.2f}x (target >= 1.2x; in-process batch 8 gives {row['batch8_vs_batch1']:.2f}x) | "
              f"clients equal {equal}, verify {verdict.passed}, SIGTERM {stop_s:.1f} s, left {len(left)}"
              + (f" | perf_analyzer c1 {pa['images_per_s']} img/s, p50 {pa['p50_ms']} ms" if pa else ""))
    report = {"cpu": cpu, "checkpoint": args.checkpoint, "image_size": list(size), "duration_s": args.duration, "rows": rows}
    (args.output / "bench_serve.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output / 'bench_serve.json'}")


if __name__ == "__main__":
    main()
