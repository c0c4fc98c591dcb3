"""compare/metrics.py on hand-computed masks and logits: confusion matrices, mIoU (empty classes, the ignore
index), the per-image accumulator's totals, `worst_case` over shapes and batch consistency. Numpy only."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vitseg_export.compare.metrics import (
    LOW_MARGIN,
    ConsistencyAccumulator,
    LabelScores,
    ParityAccumulator,
    ParitySummary,
    class_ious,
    confusion,
    miou,
    miou_vs_reference,
    pixel_accuracy,
    worst_case,
)
from vitseg_export.precisions import Thresholds

# -- confusion ---------------------------------------------------------------------------------------------


def test_confusion_counts_rows_by_target_and_columns_by_prediction():
    target = np.array([[0, 0, 1],
                       [1, 2, 2]])
    pred = np.array([[0, 1, 1],
                     [2, 2, 0]])
    # pairs (target, pred): (0,0) (0,1) (1,1) (1,2) (2,2) (2,0)
    expected = np.array([[1, 1, 0],
                         [0, 1, 1],
                         [1, 0, 1]])
    np.testing.assert_array_equal(confusion(pred, target, 3), expected)


def test_confusion_skips_ignored_target_pixels_only():
    target = np.array([[0, 255, 1],
                       [255, 1, 1]], dtype=np.uint8)
    pred = np.array([[1, 0, 1],
                     [1, 0, 1]], dtype=np.uint8)
    # kept (target, pred): (0,1) (1,1) (1,0) (1,1); the two 255 pixels are not counted anywhere
    expected = np.array([[0, 1],
                         [1, 2]])
    cm = confusion(pred, target, 2)
    np.testing.assert_array_equal(cm, expected)
    assert cm.sum() == 4


def test_confusion_with_another_ignore_value():
    target = np.array([0, 1, 2, 2])
    pred = np.array([0, 1, 1, 2])
    # ignore=2: only (0,0) and (1,1) are left; class 2 keeps a row of zeros
    expected = np.array([[1, 0, 0],
                         [0, 1, 0],
                         [0, 0, 0]])
    np.testing.assert_array_equal(confusion(pred, target, 3, ignore=2), expected)


def test_uint8_masks_do_not_overflow_the_flat_index():
    """target * num_classes + pred in uint8 would wrap for 20 classes (19 * 20 = 380)."""
    target = np.array([19, 19, 3], dtype=np.uint8)
    pred = np.array([19, 0, 3], dtype=np.uint8)
    cm = confusion(pred, target, 20)
    assert cm.shape == (20, 20)
    assert cm[19, 19] == 1 and cm[19, 0] == 1 and cm[3, 3] == 1 and cm.sum() == 3


# -- mIoU --------------------------------------------------------------------------------------------------


def test_miou_of_a_hand_written_matrix():
    cm = np.array([[3, 1, 0],
                   [2, 4, 0],
                   [0, 1, 5]])
    # class 0: 3 / (5 + 4 - 3) = 1/2; class 1: 4 / (6 + 6 - 4) = 1/2; class 2: 5 / (5 + 6 - 5) = 5/6
    assert miou(cm) == pytest.approx((0.5 + 0.5 + 5 / 6) / 3)


def test_a_class_absent_from_prediction_and_target_does_not_count():
    cm = np.array([[2, 0, 0, 0],
                   [1, 1, 0, 0],
                   [0, 0, 0, 0],   # classes 2 and 3: never the target (rows of zeros) ...
                   [0, 0, 0, 0]])  # ... and never predicted (columns of zeros): no union, not averaged
    # class 0: 2 / (3 + 2 - 2) = 2/3; class 1: 1 / (1 + 2 - 1) = 1/2; mean over the two present classes only
    # (counting classes 2 and 3 as IoU 0 would give 7/24)
    assert miou(cm) == pytest.approx(7 / 12)


def test_a_class_only_predicted_counts_with_iou_zero():
    cm = np.array([[1, 1],
                   [0, 0]])  # class 1 never in the target, predicted once: union 1, intersection 0
    # class 0: 1 / (1 + 2 - 1) = 1/2; class 1: 0
    assert miou(cm) == pytest.approx(0.25)


def test_miou_is_nan_when_no_class_is_present():
    assert math.isnan(miou(np.zeros((3, 3), np.int64)))
    everything_ignored = confusion(np.zeros((2, 2), np.uint8), np.full((2, 2), 255, np.uint8), 3)
    assert math.isnan(miou(everything_ignored))


def test_all_equal_masks_give_miou_one():
    mask = np.array([[0, 1, 1],
                     [3, 3, 0]])
    cm = confusion(mask, mask, 5)
    np.testing.assert_array_equal(cm, np.diag([2, 2, 0, 2, 0]))
    assert miou(cm) == 1.0


def test_ignored_pixels_do_not_lower_miou():
    target = np.array([[0, 0], [1, 255]], dtype=np.uint8)
    pred = np.array([[0, 0], [1, 0]], dtype=np.uint8)  # the one "wrong" pixel is ignored
    assert miou(confusion(pred, target, 2)) == 1.0


# -- mIoU against the reference: rare classes ---------------------------------------------------------------


def test_a_class_under_the_share_in_both_masks_is_left_out_of_miou_vs_reference():
    # 10,000 pixels: class 0 on 9,995 (all agree), class 1 on 5 reference pixels the artifact calls class 0 (0.05% <
    # MIN_CLASS_SHARE 0.1%), class 2 on 0. miou() counts class 1 at IoU 0: (9995/10000 + 0) / 2 ~ 0.50
    cm = np.zeros((3, 3), np.int64)
    cm[0, 0], cm[1, 0] = 9995, 5
    assert miou(cm) == pytest.approx((9995 / 10000) / 2)
    value, classes = miou_vs_reference(cm)
    assert classes == 1 and value == pytest.approx(9995 / 10000)


def test_a_class_at_the_share_counts_and_one_the_artifact_invents_counts_too():
    # class 1: 10 reference pixels of 10,000 (exactly 0.1%), 6 predicted right: IoU 6/10; class 2: never in the
    # reference, the artifact paints 50 pixels with it (0.5%): IoU 0, and it counts
    cm = np.zeros((3, 3), np.int64)
    cm[0, 0], cm[0, 2], cm[1, 1], cm[1, 0] = 9940, 50, 6, 4
    value, classes = miou_vs_reference(cm)
    iou0 = 9940 / (9990 + 9944 - 9940)
    assert classes == 3 and value == pytest.approx((iou0 + 6 / 10 + 0.0) / 3)


def test_the_accumulator_reports_the_classes_it_averaged():
    ref = np.zeros((3, 40, 50), np.float32)  # 2,000 pixels, class 0 everywhere ...
    ref[1, 0, 0] = 1.0  # ... but one pixel of class 1 (0.05%): missing it must not halve mIoU
    acc = ParityAccumulator(3)
    acc.add("x", ref, np.zeros((40, 50), np.int64), None)
    s = acc.summary()
    assert s.miou_classes == 1 and s.miou_vs_reference == pytest.approx(1999 / 2000) and s.flips == 1
    assert s.to_json()["min_class_share"] == 0.001


# -- ParityAccumulator -------------------------------------------------------------------------------------

# image A: 2 classes, 2x2. Reference mask [[0, 1], [1, 0]]; top-2 margins [[1, 1], [2, 0.05]]
REF_A = np.array([[[1.0, 0.0], [0.0, 0.05]],
                  [[0.0, 1.0], [2.0, 0.0]]], dtype=np.float32)
ART_MASK_A = np.array([[0, 1], [0, 1]])  # flips at (1,0) (margin 2) and (1,1) (margin 0.05 < LOW_MARGIN)
# artifact logits: +0.5 at [0,0,0], NaN where the reference says 2.0 ([1,1,0]): non-finite values are
# counted and their difference taken against 0
ART_LOGITS_A = REF_A.copy()
ART_LOGITS_A[0, 0, 0] += 0.5
ART_LOGITS_A[1, 1, 0] = np.nan
# image B: reference mask all class 1, the artifact agrees everywhere with identical logits
REF_B = np.stack([np.zeros((2, 2), np.float32), np.ones((2, 2), np.float32)])


def test_training_metrics_pixel_accuracy_and_per_class_iou():
    """What `vitseg train` reports each epoch, from the same confusion matrix as the parity verdict."""
    cm = confusion(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 255]), 3)
    assert pixel_accuracy(cm) == pytest.approx(4 / 5)
    assert class_ious(cm).tolist() == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert miou(cm) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    empty = np.zeros((3, 3), dtype=np.int64)
    assert math.isnan(pixel_accuracy(empty)) and np.isnan(class_ious(empty)).all()


def test_one_image_row_and_summary():
    acc = ParityAccumulator(2)
    row = acc.add("a", REF_A, ART_MASK_A, ART_LOGITS_A)
    assert row["name"] == "a"
    assert row["pixel_agreement"] == 0.5 and row["flips"] == 2 and row["low_margin_flips"] == 1
    assert row["nonfinite"] == 1
    assert row["max_abs_logit_diff"] == pytest.approx(2.0)
    assert row["mean_abs_logit_diff"] == pytest.approx(2.5 / 8)
    # (ref, art): (0,0) (1,1) (1,0) (0,1) -> [[1, 1], [1, 1]]: IoU 1/3 for both classes
    assert row["miou_vs_reference"] == pytest.approx(1 / 3)
    np.testing.assert_array_equal(acc.cm_vs_ref, [[1, 1], [1, 1]])
    s = acc.summary()
    assert (s.images, s.pixels, s.flips, s.low_margin_flips, s.nonfinite) == (1, 4, 2, 1, 1)
    assert s.labels is None


def test_summary_totals_over_images():
    acc = ParityAccumulator(2)
    acc.add("a", REF_A, ART_MASK_A, ART_LOGITS_A)
    row_b = acc.add("b", REF_B, np.ones((2, 2), np.int64), REF_B.copy())
    assert row_b["pixel_agreement"] == 1.0 and row_b["max_abs_logit_diff"] == 0.0 and row_b["nonfinite"] == 0
    assert row_b["miou_vs_reference"] == 1.0  # only class 1 present: 4/4
    s = acc.summary()
    assert s == ParitySummary(images=2, pixels=8, pixel_agreement=0.75, miou_vs_reference=pytest.approx(11 / 21),
                              max_abs_logit_diff=pytest.approx(2.0), mean_abs_logit_diff=pytest.approx(2.5 / 16),
                              nonfinite=1, flips=2, low_margin_flips=1, labels=None, miou_classes=2)
    # cm vs reference [[1, 1], [1, 5]]: class 0 IoU 1/3, class 1 5 / (6 + 6 - 5) = 5/7 -> (1/3 + 5/7) / 2 = 11/21
    np.testing.assert_array_equal(acc.cm_vs_ref, [[1, 1], [1, 5]])
    assert [r["name"] for r in acc.per_image] == ["a", "b"]


def test_masks_only_leave_the_logit_keys_none():
    acc = ParityAccumulator(2)
    row = acc.add("a", REF_A, ART_MASK_A, None)
    assert "max_abs_logit_diff" not in row and "nonfinite" not in row
    s = acc.summary()
    assert s.max_abs_logit_diff is None and s.mean_abs_logit_diff is None and s.nonfinite == 0


def test_all_equal_masks_give_full_agreement_and_miou_one():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 8, 8)).astype(np.float32)
    acc = ParityAccumulator(4)
    acc.add("same", ref, ref.argmax(0), ref.copy())
    s = acc.summary()
    assert s.pixel_agreement == 1.0 and s.miou_vs_reference == 1.0 and s.flips == 0
    assert s.max_abs_logit_diff == 0.0 and s.mean_abs_logit_diff == 0.0


def test_infinities_count_as_non_finite():
    ref = np.zeros((2, 1, 3), np.float32)
    ref[1] = 1.0
    art = ref.copy()
    art[0, 0, 0], art[0, 0, 1], art[1, 0, 2] = np.inf, -np.inf, np.nan
    acc = ParityAccumulator(2)
    acc.add("x", ref, ref.argmax(0), art)
    # the three non-finite values are compared as 0: differences 0, 0 and 1 (reference 1.0 at [1, 0, 2])
    assert acc.summary().nonfinite == 3
    assert acc.summary().max_abs_logit_diff == 1.0


def test_label_scores_skip_ignored_pixels_and_unlabelled_images():
    label_a = np.array([[0, 1], [255, 1]], dtype=np.uint8)
    acc = ParityAccumulator(2)
    acc.add("a", REF_A, ART_MASK_A, None, label_a)
    acc.add("b", REF_B, np.ones((2, 2), np.int64), None, None)  # no label: not in the label scores
    acc.add("c", REF_B, np.zeros((2, 2), np.int64), None, np.full((2, 2), 255, np.uint8))  # all ignored: idem
    # reference [[0,1],[1,0]] vs label (ignoring (1,0)): (0,0) (1,1) (1,0) -> [[1,0],[1,1]]: IoU 1/2 and 1/2
    # artifact [[0,1],[0,1]] vs label: (0,0) (1,1) (1,1) -> [[1,0],[0,2]]: IoU 1 and 1
    np.testing.assert_array_equal(acc.cm_ref_gt, [[1, 0], [1, 1]])
    np.testing.assert_array_equal(acc.cm_art_gt, [[1, 0], [0, 2]])
    s = acc.summary()
    assert s.labels == LabelScores(reference_miou_vs_labels=0.5, artifact_miou_vs_labels=1.0, miou_drop_vs_labels=-0.5,
                                   reference_pixel_accuracy_vs_labels=pytest.approx(2 / 3),
                                   artifact_pixel_accuracy_vs_labels=1.0)
    js = s.to_json()
    assert js["low_margin"] == LOW_MARGIN == 0.1
    assert js["miou_drop_vs_labels"] == -0.5 and "labels" not in js
    assert js["images"] == 3 and js["pixels"] == 12


def test_a_fully_ignored_label_gives_no_label_scores():
    acc = ParityAccumulator(2)
    acc.add("a", REF_A, ART_MASK_A, None, np.full((2, 2), 255, np.uint8))
    s = acc.summary()
    assert s.labels is None
    assert "reference_miou_vs_labels" not in s.to_json()


def test_an_empty_accumulator_summarizes_without_dividing_by_zero():
    s = ParityAccumulator(3).summary()
    assert (s.images, s.pixels, s.pixel_agreement, s.flips) == (0, 0, 0.0, 0)
    assert math.isnan(s.miou_vs_reference)
    assert s.max_abs_logit_diff is None


# -- worst_case ---------------------------------------------------------------------------------------------


def _summary(**changes) -> ParitySummary:
    base = dict(images=4, pixels=256, pixel_agreement=1.0, miou_vs_reference=1.0, max_abs_logit_diff=0.0,
                mean_abs_logit_diff=0.0, nonfinite=0, flips=0, low_margin_flips=0, labels=None)
    return ParitySummary(**{**base, **changes})


def _labels(drop: float) -> LabelScores:
    return LabelScores(0.8, 0.8 - drop, drop, 0.9, 0.9)


def test_worst_case_of_one_summary_is_that_summary():
    s = _summary(pixel_agreement=0.5)
    assert worst_case([s]) is s


def test_worst_case_takes_every_key_from_the_worst_shape():
    a = _summary(images=4, pixels=256, pixel_agreement=0.99, miou_vs_reference=0.97, max_abs_logit_diff=0.3,
                 mean_abs_logit_diff=None, nonfinite=0, flips=3, low_margin_flips=2, labels=_labels(0.01))
    b = _summary(images=4, pixels=1024, pixel_agreement=0.995, miou_vs_reference=0.96, max_abs_logit_diff=None,
                 mean_abs_logit_diff=0.02, nonfinite=5, flips=1, low_margin_flips=1, labels=_labels(0.05))
    c = _summary(images=2, pixels=64, pixel_agreement=0.999, miou_vs_reference=0.99, max_abs_logit_diff=0.7,
                 mean_abs_logit_diff=0.01, nonfinite=1, flips=7, low_margin_flips=0, labels=None)
    w = worst_case([a, b, c])
    assert w == ParitySummary(images=4, pixels=1024, pixel_agreement=0.99, miou_vs_reference=0.96,
                              max_abs_logit_diff=0.7, mean_abs_logit_diff=0.02, nonfinite=5, flips=7,
                              low_margin_flips=2, labels=_labels(0.05))


def test_worst_case_a_nan_miou_wins_over_every_number():
    for order in ([_summary(miou_vs_reference=0.5), _summary(miou_vs_reference=float("nan"))],
                  [_summary(miou_vs_reference=float("nan")), _summary(miou_vs_reference=0.5)]):
        assert math.isnan(worst_case(order).miou_vs_reference)


def test_worst_case_labels_a_nan_drop_is_never_the_worst():
    nan_drop = _labels(float("nan"))
    assert worst_case([_summary(labels=nan_drop), _summary(labels=_labels(-0.2))]).labels == _labels(-0.2)
    assert worst_case([_summary(labels=None), _summary(labels=None)]).labels is None


def test_worst_case_logit_differences_are_none_only_when_no_shape_has_them():
    w = worst_case([_summary(max_abs_logit_diff=None, mean_abs_logit_diff=None)] * 2)
    assert w.max_abs_logit_diff is None and w.mean_abs_logit_diff is None


def test_worst_case_a_nan_logit_difference_does_not_depend_on_the_order():
    nan, one = _summary(max_abs_logit_diff=float("nan")), _summary(max_abs_logit_diff=1.0)
    assert math.isnan(worst_case([nan, one]).max_abs_logit_diff)  # holds today
    assert math.isnan(worst_case([one, nan]).max_abs_logit_diff)  # 1.0 today: the NaN is dropped


# -- ConsistencyAccumulator ---------------------------------------------------------------------------------

FP32_CONSISTENCY = Thresholds(0.9999, 0.0, 1e-3, None)  # get_precision("fp32").consistency()
REDUCED_CONSISTENCY = Thresholds(0.99, 0.0, None, None)  # get_precision("int8").consistency()


def _masks(flipped: int, side: int = 10):
    base = np.zeros((side, side), np.int64)
    mask = base.copy()
    mask.flat[:flipped] = 1
    return base, mask


def test_consistency_with_a_logit_limit_judges_logits_not_masks():
    acc = ConsistencyAccumulator(FP32_CONSISTENCY)
    base, mask = _masks(5)  # 95% agreement: would fail an agreement rule, but the logit rule decides
    logits = np.zeros((2, 10, 10), np.float32)
    acc.add("within", 4, 1, (10, 10), base, mask, logits, logits + np.float32(5e-4))
    assert not acc.failing
    acc.add("above", 4, 1, (10, 10), base, base, logits, logits + np.float32(2e-3))
    assert [r["image"] for r in acc.failing] == ["above"]
    assert acc.compared == 2 and acc.batch_sizes == {1, 4}


def test_consistency_logit_limit_edge_in_float64():
    acc = ConsistencyAccumulator(Thresholds(0.9999, 0.0, 0.5, None))
    base, _ = _masks(0)
    zeros = np.zeros((2, 10, 10), np.float32)
    acc.add("equal_to_limit", 2, 1, (10, 10), base, base, zeros, zeros + 0.5)  # 0.5 is exact: passes (not >)
    acc.add("beyond", 2, 1, (10, 10), base, base, zeros, zeros + 0.5000001)
    assert [r["image"] for r in acc.failing] == ["beyond"]
    assert acc.failing[0]["max_abs_logit_diff"] == pytest.approx(0.5000001)


def test_consistency_nan_logits_fail_the_logit_rule():
    acc = ConsistencyAccumulator(FP32_CONSISTENCY)
    base, _ = _masks(0)
    logits = np.zeros((2, 10, 10), np.float32)
    bad = logits.copy()
    bad[0, 3, 3] = np.nan
    acc.add("nan", 2, 1, (10, 10), base, base, logits, bad)
    assert len(acc.failing) == 1 and acc.failing[0]["max_abs_logit_diff"] == math.inf


def test_consistency_without_logits_or_limit_uses_agreement():
    acc = ConsistencyAccumulator(REDUCED_CONSISTENCY)
    base, one_flip = _masks(1)  # 99/100 == 0.99: at the limit, passes
    _, two_flips = _masks(2)  # 98%: fails
    logits = np.zeros((2, 10, 10), np.float32)
    acc.add("one", 4, 1, (10, 10), base, one_flip, logits, logits + 100.0)  # no logit limit: logits ignored
    acc.add("two", 4, 1, (10, 10), base, two_flips, None, None)
    assert [r["image"] for r in acc.failing] == ["two"]
    # masks only under a logit limit: the agreement rule again
    fp32 = ConsistencyAccumulator(FP32_CONSISTENCY)
    fp32.add("masks", 4, 1, (10, 10), base, one_flip, None, None)  # 99% < 99.99%
    assert len(fp32.failing) == 1 and fp32.failing[0]["max_abs_logit_diff"] is None


def test_consistency_failures_name_the_worst_three_and_count_the_rest():
    acc = ConsistencyAccumulator(REDUCED_CONSISTENCY)
    for name, flips in (("i0", 2), ("i1", 5), ("i2", 3), ("i3", 0), ("i4", 4), ("i5", 10)):
        base, mask = _masks(flips)
        acc.add(name, 4, 1, (10, 10), base, mask, None, None)
    assert acc.compared == 6 and len(acc.failing) == 5  # i3 agrees fully
    (message,) = acc.failures()
    assert message == ("batch consistency: i5 at batch 4, 10x10 (agreement 90.00%), i1 at batch 4, 10x10 (agreement "
                       "95.00%), i4 at batch 4, 10x10 (agreement 96.00%) and 2 more differ from the same image run at "
                       "batch 1")
    assert acc.worst["image"] == "i5" and acc.worst["passed"] is False
    js = acc.to_json()
    assert js["passed"] is False and js["failing"] == 5 and js["images_compared"] == 6 and js["batch_sizes"] == [1, 4]
    assert js["thresholds"]["min_agreement"] == 0.99 and "note" not in js


def test_consistency_worst_is_the_lowest_agreement_among_passing_rows():
    acc = ConsistencyAccumulator(Thresholds(0.5, 0.0, None, None))
    for name, flips in (("a", 1), ("b", 3), ("c", 2)):
        base, mask = _masks(flips)
        acc.add(name, 2, 1, (10, 10), base, mask, None, None)
    assert acc.failures() == [] and acc.worst["image"] == "b" and acc.worst["pixel_agreement"] == 0.97


def test_consistency_with_nothing_compared_says_why():
    js = ConsistencyAccumulator(FP32_CONSISTENCY, {1}).to_json()
    assert js["passed"] is True and js["images_compared"] == 0 and js["worst_image"] is None
    assert js["batch_sizes"] == [1] and "static batch" in js["note"]
