"""The int8 fallback's search (export/fallback.py `fall_back`) on synthetic score tables: no quantizer, no graph,
no comparator. The seam is the one `fall_back` already has: a `QuantizedGraph` (units, and a runner with some
units in float) and a `Heldout` (score, sqnr_db, meets, targets). Here the "runner" is the frozenset of floated
units, and a Heldout subclass scores it from a table (floated units -> (agreement, mIoU)) and counts the calls;
`meets` and the decision targets are the real ones."""

from __future__ import annotations

import math

import pytest

from vitseg_export.errors import ParityError
from vitseg_export.export.fallback import Heldout, decision_targets, fall_back
from vitseg_export.precisions import Thresholds

INT8_TARGETS = Thresholds(0.99, 0.98, None, None)  # the int8 preset's agreement and mIoU
MEETS, MISSES = (0.999, 0.999), (0.95, 0.90)


class FakeGraph:
    """A quantized graph of named units; its runner is just the set of units in float."""

    def __init__(self, units: list[str]):
        self._units = units
        self.runners: list[frozenset] = []

    def units(self) -> list[str]:
        return list(self._units)

    def runner(self, floated: set[str]) -> frozenset:
        self.runners.append(frozenset(floated))
        return frozenset(floated)


class TableHeldout(Heldout):
    """Held-out scores from a table: `scores(floated)` -> (agreement, mIoU); `sqnr[unit]` the logit SQNR with that
    unit alone in float. Records every scored set in order."""

    def __init__(self, scores, sqnr: dict[str, float], targets: Thresholds = INT8_TARGETS):
        super().__init__(inputs=None, reference=None, num_classes=2, targets=decision_targets(targets))
        self.scores, self.sqnr = scores, sqnr
        self.scored: list[frozenset] = []
        self.probed: list[frozenset] = []

    def score(self, runner):
        self.scored.append(runner)
        return self.scores(runner)

    def sqnr_db(self, runner):
        self.probed.append(runner)
        (unit,) = runner - self.kept
        return self.sqnr[unit]

    kept: frozenset = frozenset()


def _table(rows: dict[frozenset, tuple[float, float]]):
    """A score function that knows only the sets written out (any other set is a KeyError: the search asked
    for something it should not have)."""
    return lambda floated: rows[floated]


# eight units; SQNR with each alone in float ranks them u3 u5 u0 u7 u1 u2 u6 u4
SQNR = {"u0": 25.0, "u1": 15.0, "u2": 12.0, "u3": 30.0, "u4": 5.0, "u5": 28.0, "u6": 10.0, "u7": 20.0}
UNITS = [f"u{i}" for i in range(8)]
RANKED = ["u3", "u5", "u0", "u7", "u1", "u2", "u6", "u4"]


def prefix(count: int, kept: frozenset = frozenset()) -> frozenset:
    return frozenset(RANKED[:count]) | kept


def test_the_decision_targets_sit_a_tenth_of_the_error_budget_inside():
    assert decision_targets(INT8_TARGETS) == Thresholds(0.991, 0.982, None, None)


def test_a_graph_that_meets_the_targets_floats_nothing_and_ranks_nothing():
    held = TableHeldout(_table({frozenset(): (0.991, 0.982)}), SQNR)  # exactly at the decision targets: meets
    result = fall_back(FakeGraph(UNITS), held, max_units=8, progress=lambda m: None)
    assert result.floated == [] and result.score == result.initial == (0.991, 0.982)
    assert held.scored == [frozenset()] and held.probed == []


def test_doubling_then_bisection_finds_the_fewest_units():
    rows = {prefix(0): (0.95, 0.90),
            prefix(1): (0.97, 0.95),
            prefix(2): (0.995, 0.981),  # agreement met, mIoU inside the user's target but short of the guard (0.982)
            prefix(3): (0.992, 0.985),  # the first count that meets both
            prefix(4): (0.995, 0.99)}
    held, messages = TableHeldout(_table(rows), SQNR), []
    result = fall_back(FakeGraph(UNITS), held, max_units=8, progress=messages.append)
    # initial, then 1, 2, 4 (meets), then bisection between 2 and 4: 3 (meets)
    assert held.scored == [prefix(0), prefix(1), prefix(2), prefix(4), prefix(3)]
    assert [row["node"] for row in result.floated] == ["u3", "u5", "u0"]
    assert result.units == {"u3", "u5", "u0"}
    assert result.score == (0.992, 0.985) and result.initial == (0.95, 0.90)
    assert [row["sqnr_db_when_float"] for row in result.floated] == [30.0, 28.0, 25.0]
    assert "after" not in result.floated[0] and result.floated[-1]["after"] == "agreement 99.200%, mIoU vs reference 98.50"
    assert sorted(held.probed) == sorted(frozenset({u}) for u in UNITS)  # each unit ranked once, alone
    assert messages[-1] == "int8: 3 units in float: agreement 99.200%, mIoU vs reference 98.50"


def _prefix_scores(ranked: list[str], needed: int, kept: frozenset = frozenset()):
    """Scores that meet the targets from `needed` of the ranked units on (and fail before), for floated sets that
    are kept units plus a prefix of `ranked`; anything else is an error of the search."""
    def scores(floated: frozenset):
        assert kept <= floated, "a kept unit went back to int8"
        count = len(floated - kept)
        assert floated - kept == frozenset(ranked[:count]), f"not a prefix of the ranking: {sorted(floated)}"
        return MEETS if count >= needed else MISSES
    return scores


def _bound(needed: int) -> int:
    """Score calls the search may make when `needed` units are the fewest: the initial score, doubling up to
    2^j >= needed (j + 1 probes, j = ceil(log2 needed)), then bisection of an interval of at most 2^(j-1)
    (j - 1 probes)."""
    j = math.ceil(math.log2(needed))
    return 1 + (j + 1) + max(j - 1, 0)


@pytest.mark.parametrize("n_units", range(1, 21))
def test_the_fewest_units_within_the_bisection_bound_for_every_answer(n_units):
    units = [f"n{i:02d}" for i in range(n_units)]
    sqnr = {u: float(100 - i) for i, u in enumerate(units)}  # ranked in list order
    for needed in range(1, n_units + 1):
        held = TableHeldout(_prefix_scores(units, needed), sqnr)
        result = fall_back(FakeGraph(units), held, max_units=n_units, progress=lambda m: None)
        assert [row["node"] for row in result.floated] == units[:needed]
        assert len(held.scored) <= _bound(needed), (needed, held.scored)
        assert len(set(held.scored)) == len(held.scored)  # no count is scored twice
        assert len(held.probed) == n_units


@pytest.mark.parametrize("n_units,needed,counts", [
    (16, 5, [0, 1, 2, 4, 8, 6, 5]),
    (10, 9, [0, 1, 2, 4, 8, 10, 9]),  # doubling stops at the number of units (10), not 16
    (8, 8, [0, 1, 2, 4, 8, 6, 7]),
    (8, 1, [0, 1]),
    (1, 1, [0, 1]),
])
def test_the_counts_tried_in_order(n_units, needed, counts):
    units = [f"n{i:02d}" for i in range(n_units)]
    held = TableHeldout(_prefix_scores(units, needed), {u: float(-i) for i, u in enumerate(units)})
    fall_back(FakeGraph(units), held, max_units=n_units, progress=lambda m: None)
    assert [len(s) for s in held.scored] == counts


def test_max_units_caps_the_ranking_and_an_unreachable_target_raises():
    held = TableHeldout(_prefix_scores(RANKED, needed=6), SQNR)
    with pytest.raises(ParityError) as e:  # a verdict that failed: exit 3, not a bad input
        fall_back(FakeGraph(UNITS), held, max_units=5, progress=lambda m: None)
    assert e.value.exit_code == 3
    # only the 5 best units are ever floated: 1, 2, 4, then 5 (the cap) misses
    assert [len(s) for s in held.scored] == [0, 1, 2, 4, 5]
    assert "with 5 of 8 units in float" in e.value.message
    assert len(held.probed) == 8  # every unit is ranked before the cap applies


def test_units_kept_in_float_stay_in_every_candidate_and_are_not_ranked():
    kept = frozenset({"u3"})
    held = TableHeldout(_prefix_scores(RANKED[1:], needed=2, kept=kept), SQNR)
    held.kept = kept
    result = fall_back(FakeGraph(UNITS), held, max_units=8, progress=lambda m: None, kept={"u3": "decode_head"})
    assert held.scored[0] == kept  # the initial score already has the kept unit in float
    assert sorted(held.probed) == sorted(kept | {u} for u in UNITS if u != "u3")
    assert [row["node"] for row in result.floated] == ["u3", "u5", "u0"]
    assert result.floated[0] == {"node": "u3", "sqnr_db_when_float": None, "reason": "kept in float (--keep-float decode_head)"}


def test_a_user_target_met_but_the_guard_missed_still_falls_back():
    """99.0% agreement meets the int8 preset but not the decision target of 99.1%: the search goes on."""
    rows = {prefix(0): (0.990, 0.99), prefix(1): (0.9909, 0.99), prefix(2): (0.991, 0.99)}
    held = TableHeldout(_table(rows), SQNR)
    result = fall_back(FakeGraph(UNITS), held, max_units=8, progress=lambda m: None)
    assert [row["node"] for row in result.floated] == ["u3", "u5"] and result.score == (0.991, 0.99)


def test_nothing_left_to_float_says_so_and_scores_the_graph_once():
    """Every unit kept in float by --keep-float, and the graph still misses: the error names why, without scoring
    the same graph again or claiming a unit was floated."""
    kept = frozenset(UNITS)
    held = TableHeldout(_table({kept: MISSES}), SQNR)
    with pytest.raises(ParityError) as refused:
        fall_back(FakeGraph(UNITS), held, max_units=8, progress=lambda m: None, kept=dict.fromkeys(UNITS, "encoder"))
    assert refused.value.exit_code == 3
    assert "no unit left to return to float: 8 kept by --keep-float, 0 others" in refused.value.message
    assert held.scored == [kept]


def test_the_search_says_what_it_does_in_its_progress_and_records_why_each_unit_floated():
    rows = {prefix(0): (0.95, 0.90), prefix(1): (0.97, 0.95), prefix(2): (0.995, 0.981), prefix(3): (0.992, 0.985),
            prefix(4): (0.995, 0.99)}
    messages: list[str] = []
    result = fall_back(FakeGraph(UNITS), TableHeldout(_table(rows), SQNR), max_units=8, progress=messages.append)
    assert messages == [
        "int8 held-out agreement 95.000%, mIoU vs reference 90.00 (aiming at 99.10% / 98.20)",
        "int8: ranking 8 units by the logits with each alone in float",
        "int8: 1 units in float: agreement 97.000%, mIoU vs reference 95.00",
        "int8: 2 units in float: agreement 99.500%, mIoU vs reference 98.10",
        "int8: 4 units in float: agreement 99.500%, mIoU vs reference 99.00",
        "int8: 3 units in float: agreement 99.200%, mIoU vs reference 98.50"]
    assert result.floated == [
        {"node": "u3", "sqnr_db_when_float": 30.0, "reason": "most helpful remaining unit (logit SQNR 30.0 dB with it alone in float)"},
        {"node": "u5", "sqnr_db_when_float": 28.0, "reason": "most helpful remaining unit (logit SQNR 28.0 dB with it alone in float)"},
        {"node": "u0", "sqnr_db_when_float": 25.0, "reason": "most helpful remaining unit (logit SQNR 25.0 dB with it alone in float)",
         "after": "agreement 99.200%, mIoU vs reference 98.50"}]
    assert result.score == (0.992, 0.985) and result.initial == (0.95, 0.90)


def test_kept_units_are_announced_and_an_unreachable_target_names_its_fix():
    kept = frozenset({"u3"})
    held = TableHeldout(_prefix_scores(RANKED[1:], needed=99, kept=kept), SQNR)
    held.kept = kept
    messages: list[str] = []
    with pytest.raises(ParityError) as e:
        fall_back(FakeGraph(UNITS), held, max_units=8, progress=messages.append, kept={"u3": "decode_head"}, hint="the fix")
    assert messages[0].endswith(", 1 units kept in float") and e.value.hint == "the fix"
    with pytest.raises(ParityError) as default_hint:
        fall_back(FakeGraph(UNITS), TableHeldout(_prefix_scores(RANKED, needed=99), SQNR), max_units=8, progress=lambda m: None)
    assert default_hint.value.hint == "calibrate on more representative images, try --calib-method entropy, or use fp16"
    with pytest.raises(ParityError) as nothing_left:
        fall_back(FakeGraph(["u3"]), held, max_units=8, progress=lambda m: None, kept={"u3": "decode_head"}, hint="h2")
    assert nothing_left.value.hint == "h2"
