"""runner -> latency figures. Torch-free; CUDA runners synchronize inside infer (outputs come back as numpy)."""

from __future__ import annotations

import time

import numpy as np

from vitseg_export.runners.base import Runner


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
