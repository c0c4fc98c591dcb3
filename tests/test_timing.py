"""The timing rule every speed decision uses (vitseg_export/timing.py), on scripted clocks and drawn samples: no
machine timing here, so these run in milliseconds and say the same on every machine."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vitseg_export.machine import timing


def test_the_median_interval_uses_order_statistics_of_the_binomial():
    values = list(range(1, 22))  # n = 21: P(Bin(21, 1/2) <= 5) = 0.013 <= 0.025 < P(<= 6) = 0.039
    assert timing.median_interval(values, 0.95) == (6.0, 16.0)
    assert timing.median_interval([3.0, 1.0, 2.0], 0.95) == (1.0, 3.0)  # too few for 95%: their range
    assert timing.median_interval(values[::-1], 0.95) == (6.0, 16.0)  # order of arrival does not matter


def test_the_interval_covers_the_true_median_as_often_as_it_says():
    rng = np.random.default_rng(0)
    true_median = 1.0  # lognormal(0, s) has median exp(0)
    trials = 2000
    covered = sum(lo <= true_median <= hi for lo, hi in (timing.median_interval(rng.lognormal(0.0, 0.2, 21), 0.95)
                                                          for _ in range(trials)))
    assert covered / trials >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / trials)


@pytest.mark.parametrize("low,high,expected", [
    (1.11, 1.3, timing.FASTER), (0.7, 0.89, timing.SLOWER), (0.95, 1.05, timing.NO_GAIN),
    (1.05, 1.3, timing.NO_GAIN),  # faster, but not measurably beyond the margin
    (0.7, 0.95, timing.NO_GAIN), (0.5, 1.5, timing.NO_GAIN)])  # too noisy to tell: no measurable gain
def test_the_outcome_needs_the_whole_interval_past_the_margin(low, high, expected):
    assert timing.outcome(low, high, margin=0.10) == expected


class ScriptedClock:
    """A clock whose readings advance by what the timed functions "take": each call of a timed function pops its
    next duration (seconds)."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def work(self, name: str, durations):
        source = iter(durations)

        def run():
            self.calls.append(name)
            self.now += next(source)
        return run


def _steady(seconds: float):
    while True:
        yield seconds


def test_pairs_alternate_which_runs_first_after_the_warm_up():
    clock = ScriptedClock()
    result = timing.compare_speed(clock.work("a", _steady(0.010)), clock.work("b", _steady(0.005)), min_pairs=21,
                                  clock=clock)
    timed = clock.calls[2 * timing.WARMUP:]
    assert timed[:8] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert result.pairs == 21 and result.speedup == pytest.approx(2.0) and result.outcome == timing.FASTER
    assert result.baseline_ms == pytest.approx(10.0) and result.candidate_ms == pytest.approx(5.0)


def test_a_busy_core_that_slows_both_of_a_pair_does_not_change_the_outcome():
    """Another process taking a core for a while makes both runs of those pairs 3x slower: the per-pair ratios,
    and therefore the decision, stay where they were."""
    rng = np.random.default_rng(1)
    busy = rng.random(200) < 0.4

    def durations(base: float):
        for i in range(200):
            factor = 3.0 if busy[i // 2] else 1.0  # both runs of pair i // 2 (the scripted clock alternates)
            yield base * factor * rng.normal(1.0, 0.03)

    for candidate_s, expected in ((0.0100, timing.NO_GAIN), (0.0080, timing.FASTER), (0.0125, timing.SLOWER)):
        clock = ScriptedClock()
        a, b = durations(0.010), durations(candidate_s)
        pairs = [(next(a), next(b)) for _ in range(90)]
        feed_a, feed_b = iter([p[0] for p in pairs]), iter([p[1] for p in pairs])
        result = timing.compare_speed(clock.work("fp32", feed_a), clock.work("int8", feed_b), clock=clock)
        assert result.outcome == expected, result.describe()


def test_more_pairs_only_while_the_interval_straddles_an_edge_and_within_limits():
    clock = ScriptedClock()
    rng = np.random.default_rng(2)
    noisy = (0.010 * rng.lognormal(0.0, 0.3) for _ in range(10_000))  # ratio ~1 with wide spread: straddles 0.9/1.1
    result = timing.compare_speed(clock.work("a", _steady(0.010)), clock.work("b", noisy), min_pairs=21, max_pairs=61,
                                  budget_s=1e9, clock=clock)
    assert result.pairs == 61 and result.outcome == timing.NO_GAIN
    clock = ScriptedClock()
    result = timing.compare_speed(clock.work("a", _steady(0.010)), clock.work("b", _steady(0.010)), min_pairs=21,
                                  clock=clock)
    assert result.pairs == 21 and result.low == result.high == 1.0 and result.outcome == timing.NO_GAIN  # decided
    clock = ScriptedClock()
    slow_noisy = (0.5 * rng.lognormal(0.0, 0.3) for _ in range(10_000))
    result = timing.compare_speed(clock.work("a", _steady(0.5)), clock.work("b", slow_noisy), min_pairs=21,
                                  max_pairs=81, budget_s=30.0, clock=clock)
    assert 21 <= result.pairs < 81  # the time budget ends it first


def test_a_comparison_round_trips_through_json_and_describes_its_rule():
    result = timing.summarize([10.0] * 21, [12.5] * 21)
    again = timing.SpeedComparison.from_json({**result.to_json(), "stage": "before calibration"})
    assert again == result and result.outcome == timing.SLOWER
    assert result.describe() == ("int8 0.80x fp32 (95% interval 0.80-0.80 over 21 pairs; 12.50 vs 10.00 ms): slower "
                                 "(the interval lies below 0.90)")


def test_the_median_interval_at_the_edges_of_its_rule():
    """Worked by hand from Binomial(n, 1/2) probabilities (exact binary fractions, so no rounding decides):
    n = 9: P(0) = 1/512, P(<= 1) = 10/512 = 0.01953125."""
    nine = [float(v) for v in range(1, 10)]
    # a tail of exactly P(<= 1): a count that reaches the tail still counts (k = 2: the 2nd smallest and largest)
    assert timing.median_interval(nine, 1 - 2 * 10 / 512) == (2.0, 8.0)
    # a tail between P(1) alone (9/512) and P(<= 1): P(0) must be counted too (k = 1)
    assert timing.median_interval(nine, 1 - 2 * 0.019) == (1.0, 9.0)
    # confidence 0 (tail 1/2): k stops below n // 2, so the interval never collapses past the middle
    assert timing.median_interval([1.0, 2.0, 3.0, 4.0, 5.0], 0.0) == (2.0, 4.0)
    assert timing.median_interval([float(v) for v in range(1, 22)], 0.0) == (10.0, 12.0)


def test_an_interval_touching_a_margin_edge_straddles_it():
    assert timing._straddles(0.8, 1.0 - 0.1, 0.1) and timing._straddles(1.0 + 0.1, 1.3, 0.1)
    assert not timing._straddles(0.5, 0.89, 0.1) and not timing._straddles(0.91, 1.09, 0.1)


def test_a_comparison_is_recorded_to_four_decimals():
    c = timing.SpeedComparison("fp32", "int8", 5.123456, 4.0, 1.2345678, 1.1, 1.3, 0.95, 0.1, 21, timing.FASTER)
    assert c.to_json() == {"baseline": "fp32", "candidate": "int8", "baseline_ms": 5.1235, "candidate_ms": 4.0,
                           "speedup": 1.2346, "low": 1.1, "high": 1.3, "confidence": 0.95, "margin": 0.1, "pairs": 21,
                           "outcome": timing.FASTER}


def test_interleaved_medians_time_every_row_once_per_round_after_its_warm_up(monkeypatch):
    pauses: list[float] = []
    monkeypatch.setattr(timing.time, "sleep", pauses.append)
    clock, seen = ScriptedClock(), []
    warm = [0.100] * timing.WARMUP  # untimed: a slow first call must not reach the medians
    a = clock.work("a", iter(warm + [0.010, 0.030, 0.020]))
    b = clock.work("b", iter(warm + [0.005, 0.050, 0.005]))
    rows = {"a": lambda x: (seen.append(x), a()), "b": lambda x: (seen.append(x), b())}
    medians = timing.interleaved_medians(rows, 3, "pixels", clock=clock)
    assert clock.calls == ["a"] * timing.WARMUP + ["b"] * timing.WARMUP + ["a", "b"] * 3
    assert medians == {"a": pytest.approx(20.0), "b": pytest.approx(5.0)}
    assert seen == ["pixels"] * len(clock.calls)
    assert pauses == [timing.SETTLE_S] * 6 and timing.SETTLE_S == 0.05  # a pause before every timed call only
