"""The speed decision rule (machine/timing.py) on recorded series of paired timings, decided by the pure
`summarize` (per-pair ratios, median, order-statistic interval, margin 0.10): no clock, no timed work. The pair
ordering and the adaptive number of pairs of `compare_speed` are tested in tests/test_timing.py."""

from __future__ import annotations

import random

import pytest

from vitseg_export.machine import timing
from vitseg_export.machine.timing import FASTER, NO_GAIN, SLOWER, median_interval, summarize


def decide(pairs: list[tuple[float, float]], shuffle_seed: int = 0):
    """summarize() over (baseline_ms, candidate_ms) pairs, recorded in a shuffled order (the rule must not care)."""
    pairs = list(pairs)
    random.Random(shuffle_seed).shuffle(pairs)
    return summarize([b for b, _ in pairs], [c for _, c in pairs])


def test_the_margin_and_confidence_are_the_documented_ones():
    assert timing.MARGIN == 0.10 and timing.CONFIDENCE == 0.95 and timing.MIN_PAIRS == 21


@pytest.mark.parametrize("n,ranks", [
    (5, (0, 4)),  # fewer than 6: the range
    (8, (0, 7)),  # P(Bin(8, 1/2) <= 1) = 9/256 = 0.035 > 0.025: still the range
    (9, (1, 7)),  # P(Bin(9, 1/2) <= 1) = 10/512 = 0.0195 <= 0.025 < P(<= 2) = 46/512: 2nd smallest, 2nd largest
    (10, (1, 8)),  # P(<= 1) = 11/1024 = 0.011 <= 0.025 < P(<= 2) = 56/1024
])
def test_median_interval_ranks(n, ranks):
    values = [float(v) for v in range(100, 100 + n)][::-1]
    assert median_interval(values) == (100.0 + ranks[0], 100.0 + ranks[1])


def test_clearly_faster_with_a_busy_moment_on_both_of_a_pair():
    """Candidate 10 ms; baseline 11.5-16 ms; two pairs hit by a busy core (both runs 3x slower) keep their ratio."""
    pairs = ([(11.5, 10.0)] * 4 + [(12.0, 10.0)] + [(36.6, 30.0)]  # busy pair: ratio 1.22
             + [(12.5, 10.0)] * 8 + [(37.5, 30.0)]  # busy pair: ratio 1.25
             + [(13.0, 10.0)] + [(16.0, 10.0)] * 5)
    # sorted ratios: 1.15 x4, 1.2, 1.22, 1.25 x9, 1.3, 1.6 x5 -> interval (6th, 16th) = (1.22, 1.3), median 1.25
    r = decide(pairs)
    assert r.outcome == FASTER and r.pairs == 21
    assert (r.low, r.high, r.speedup) == (pytest.approx(1.22), pytest.approx(1.3), pytest.approx(1.25))
    assert r.baseline_ms == 12.5 and r.candidate_ms == 10.0  # medians of each side
    assert r.describe() == ("int8 1.25x fp32 (95% interval 1.22-1.30 over 21 pairs; 10.00 vs 12.50 ms): faster "
                            "(the interval lies above 1.10)")


def test_clearly_slower():
    pairs = ([(10.0, 16.0)] * 3 + [(10.0, 15.0)] * 11 + [(20.0, 30.0)]  # ratios 0.625 x3, 2/3 x12
             + [(10.0, 14.0)] * 3 + [(10.0, 12.5)] * 2 + [(10.0, 10.0)])  # 5/7 x3, 0.8 x2, 1.0
    # sorted: 0.625 x3, 2/3 x12, 5/7 x3, 0.8 x2, 1.0 -> interval (2/3, 5/7), median 2/3: below 0.9
    r = decide(pairs)
    assert r.outcome == SLOWER
    assert (r.low, r.high, r.speedup) == (pytest.approx(2 / 3), pytest.approx(5 / 7), pytest.approx(2 / 3))
    assert r.baseline_ms == 10.0 and r.candidate_ms == 15.0


def test_a_gain_inside_the_margin_is_no_measurable_gain():
    """5% faster, measured tightly: real, but inside the 10% margin."""
    pairs = [(b, 10.0) for b in [9.8] * 2 + [10.0] * 3 + [10.2] + [10.4] * 2 + [10.5] * 6 + [10.6] * 2 + [10.8] * 2
             + [11.5] * 2 + [13.0]]
    # sorted ratios: 0.98 x2, 1.0 x3, 1.02, 1.04 x2, 1.05 x6, 1.06 x2, 1.08 x2, 1.15 x2, 1.3 -> (1.02, 1.06)
    r = decide(pairs)
    assert r.outcome == NO_GAIN
    assert (r.low, r.high, r.speedup) == (pytest.approx(1.02), pytest.approx(1.06), pytest.approx(1.05))
    assert r.describe().endswith("no measurable gain (the interval reaches into 0.90-1.10)")


def test_outliers_move_the_interval_by_one_rank_at_most():
    """Bulk ratio 1.3; bursts that hit one side only give wild ratios (0.2, 5.0). With 21 pairs the interval is
    the 6th smallest to the 6th largest: five outliers on each side leave it on the bulk; a sixth slow one drags
    its low end down and the decision becomes "no measurable gain" (too noisy to tell)."""
    slow_burst, fast_burst, bulk = (10.0, 50.0), (50.0, 10.0), (13.0, 10.0)
    r = decide([slow_burst] * 5 + [fast_burst] * 5 + [bulk] * 11)
    assert r.outcome == FASTER and (r.low, r.high, r.speedup) == (pytest.approx(1.3),) * 3
    r = decide([slow_burst] * 6 + [fast_burst] * 5 + [bulk] * 10)
    assert r.outcome == NO_GAIN
    assert (r.low, r.high, r.speedup) == (pytest.approx(0.2), pytest.approx(1.3), pytest.approx(1.3))


def test_the_interval_must_lie_strictly_beyond_the_margin():
    assert decide([(11.0, 10.0)] * 21).outcome == NO_GAIN  # every ratio exactly 1.1: on the edge, not above
    assert decide([(11.1, 10.0)] * 21).outcome == FASTER
    assert decide([(9.0, 10.0)] * 21).outcome == NO_GAIN  # exactly 0.9
    assert decide([(8.9, 10.0)] * 21).outcome == SLOWER


def test_another_margin_is_honoured():
    pairs = [(10.5, 10.0)] * 21  # 5% faster everywhere
    assert summarize(*zip(*pairs), margin=0.10).outcome == NO_GAIN
    r = summarize(*zip(*pairs), names=("a", "b"), margin=0.02)
    assert r.outcome == FASTER and r.margin == 0.02 and r.baseline == "a" and r.candidate == "b"


def test_the_speedup_is_the_median_ratio_not_the_ratio_of_the_medians():
    pairs = [(10.0, 5.0)] * 5 + [(10.0, 8.0)] * 6 + [(16.0, 10.0)] * 10
    # medians of each side: 10 and 8 (ratio 1.25); per-pair ratios sorted: 1.25 x6, 1.6 x10, 2.0 x5 -> median 1.6,
    # interval (6th, 16th) = (1.25, 1.6)
    r = decide(pairs)
    assert r.baseline_ms == 10.0 and r.candidate_ms == 8.0
    assert (r.speedup, r.low, r.high, r.outcome) == (1.6, 1.25, 1.6, FASTER)


@pytest.mark.parametrize("low,high,more", [
    (1.05, 1.15, True), (0.85, 0.95, True), (0.5, 1.5, True), (1.1, 1.2, True),  # crosses or touches an edge
    (1.11, 1.2, False), (0.7, 0.89, False), (0.95, 1.05, False),  # decided: past a margin or inside the band
])
def test_more_pairs_only_while_the_interval_crosses_an_edge(low, high, more):
    assert timing._straddles(low, high, 0.10) is more


def test_a_recorded_comparison_round_trips_with_its_decision():
    r = decide([(11.5, 10.0)] * 4 + [(12.5, 10.0)] * 17)
    again = timing.SpeedComparison.from_json(r.to_json())
    assert again.outcome == FASTER and again.pairs == 21 and again.speedup == 1.25
