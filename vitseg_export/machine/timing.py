"""Is one way of running the same work faster than another on this machine? Decided so that the answer does
not flip with noise or with a busy core: interleaved, repeated measurements, a distribution-free confidence
interval of the speed ratio, and a stated margin. A leaf (numpy only): the int8 go / no-go, the benchmark's
"slower than fp32" rows and the per-op probe all decide by it.

The rule (docs/guides/int8-cpu-classes-and-qat.md, "Speed decisions"):
- the two candidates run in pairs, one right after the other, alternating which goes first (A B, B A, ...), so
  that a slow moment (another process, a clock change) lands on both of a pair;
- each pair gives a ratio (baseline time / candidate time: above 1, the candidate is faster); the estimate is
  the median ratio, and its CONFIDENCE interval comes from order statistics (no assumption about how the
  times are distributed, and one pair ruined by a burst of load moves it by one rank at most);
- outcome: "faster" when the whole interval lies above 1 + MARGIN, "slower" when it lies below 1 - MARGIN,
  otherwise "no measurable gain" (a difference inside the margin, or too noisy to tell);
- at least MIN_PAIRS pairs; while the interval straddles an edge of the margin band, more pairs (up to
  MAX_PAIRS, within BUDGET_S seconds).

MARGIN is wider than the confidence interval alone would need: the same export, run 20 times on one machine,
moved its ratio by several percent between runs (scripts/int8_decisions.py prints such a table), which no
within-run interval sees.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable

import numpy as np

MARGIN = 0.10
CONFIDENCE = 0.95
MIN_PAIRS = 21
MAX_PAIRS = 81
BUDGET_S = 30.0
WARMUP = 3
FASTER, NO_GAIN, SLOWER = "faster", "no measurable gain", "slower"


@dataclass
class SpeedComparison:
    """How `candidate` compared with `baseline`: medians, the median per-pair speed ratio (baseline / candidate
    time) with its confidence interval, and the outcome by the rule above."""

    baseline: str
    candidate: str
    baseline_ms: float  # median
    candidate_ms: float  # median
    speedup: float  # median of the per-pair ratios baseline_ms / candidate_ms
    low: float  # the ratio's confidence interval
    high: float
    confidence: float
    margin: float
    pairs: int
    outcome: str  # FASTER, NO_GAIN or SLOWER

    def describe(self) -> str:
        """'int8 1.23x fp32 (95% interval 1.18-1.27 over 31 pairs; 4.10 vs 5.04 ms): faster (the interval lies
        above 1.10)'."""
        low, high = 1.0 - self.margin, 1.0 + self.margin
        why = {FASTER: f"the interval lies above {high:.2f}", SLOWER: f"the interval lies below {low:.2f}",
               NO_GAIN: f"the interval reaches into {low:.2f}-{high:.2f}"}[self.outcome]
        return (f"{self.candidate} {self.speedup:.2f}x {self.baseline} ({self.confidence:.0%} interval {self.low:.2f}-"
                f"{self.high:.2f} over {self.pairs} pairs; {self.candidate_ms:.2f} vs {self.baseline_ms:.2f} ms): "
                f"{self.outcome} ({why})")

    def to_json(self) -> dict:
        """The comparison as a manifest or report records it."""
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> "SpeedComparison":
        """A comparison back from its JSON form (other keys of a record holding it are ignored)."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def median_interval(values: list[float] | np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A distribution-free confidence interval for the median of `values`: the k-th smallest and k-th largest,
    with the largest k such that a Binomial(n, 1/2) count falls below k with probability at most (1 -
    confidence) / 2 (the interval covers the median with at least `confidence`). Fewer than 6 values: their
    range."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = len(v)
    tail, k, cumulative = (1.0 - confidence) / 2, 0, 0.0
    while k < n // 2:
        cumulative += math.comb(n, k) / 2.0 ** n  # P(count == k)
        if cumulative > tail:
            break
        k += 1
    k = max(k, 1)
    return float(v[k - 1]), float(v[n - k])


def outcome(low: float, high: float, margin: float = MARGIN) -> str:
    """The rule: the interval above 1 + margin is FASTER, below 1 - margin SLOWER, anything else NO_GAIN."""
    if low > 1.0 + margin:
        return FASTER
    if high < 1.0 - margin:
        return SLOWER
    return NO_GAIN


def _straddles(low: float, high: float, margin: float) -> bool:
    """Whether more pairs could still change the outcome: the interval crosses an edge of the margin band."""
    return any(low <= edge <= high for edge in (1.0 - margin, 1.0 + margin))


def summarize(baseline_ms: list[float], candidate_ms: list[float], names: tuple[str, str] = ("fp32", "int8"),
              margin: float = MARGIN, confidence: float = CONFIDENCE) -> SpeedComparison:
    """The comparison of paired timings (baseline_ms[i] and candidate_ms[i] measured one right after the other)."""
    ratios = np.asarray(baseline_ms, dtype=np.float64) / np.asarray(candidate_ms, dtype=np.float64)
    low, high = median_interval(ratios, confidence)
    return SpeedComparison(names[0], names[1], float(np.median(baseline_ms)), float(np.median(candidate_ms)),
                           float(np.median(ratios)), low, high, confidence, margin, len(ratios), outcome(low, high, margin))


def compare_speed(baseline: Callable[[], object], candidate: Callable[[], object], names: tuple[str, str] = ("fp32", "int8"),
                  min_pairs: int = MIN_PAIRS, max_pairs: int = MAX_PAIRS, budget_s: float = BUDGET_S,
                  margin: float = MARGIN, clock: Callable[[], float] = time.perf_counter) -> SpeedComparison:
    """Time `baseline()` and `candidate()` (each runs the same work once) in interleaved pairs after WARMUP runs
    of each, and compare them by the rule in this module's docstring."""
    for _ in range(WARMUP):
        baseline()
        candidate()
    times: tuple[list[float], list[float]] = ([], [])
    start = clock()
    while True:
        n = len(times[0])
        order = ((0, baseline), (1, candidate)) if n % 2 == 0 else ((1, candidate), (0, baseline))
        for index, fn in order:
            t0 = clock()
            fn()
            times[index].append((clock() - t0) * 1e3)
        if n + 1 < min_pairs:
            continue
        result = summarize(times[0], times[1], names, margin)
        if n + 1 >= max_pairs or clock() - start > budget_s or not _straddles(result.low, result.high, margin):
            return result


# Each runtime's worker threads spin-wait for a while after a call (ONNX Runtime's pool, OpenMP): a row timed right
# after another runtime's shares the cores with those spinning threads (measured on 2 cores: an ONNX Runtime row right
# after another, 84.6 ms vs 56.4 ms with a pause). Every timed call of an interleaved table starts after this pause.
SETTLE_S = 0.05


def interleaved_medians(calls: dict, rounds: int, *args, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Median milliseconds of each call(*args) over `rounds` interleaved rounds (every call once per round, in
    order, each after a pause of SETTLE_S; WARMUP untimed calls of each first), for tables of many rows measured
    side by side (the benchmark scripts)."""
    for call in calls.values():
        for _ in range(WARMUP):
            call(*args)
    times: dict = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            time.sleep(SETTLE_S)
            start = clock()
            call(*args)
            times[key].append((clock() - start) * 1e3)
    return {key: float(np.median(values)) for key, values in times.items()}
