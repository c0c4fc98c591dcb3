"""The parity presets of the precision table (precisions.py) and `judge` (compare/metrics.py) on crafted
summaries right at and just beyond every limit. The preset values are written out here from the table's
docstring, so a silent change of a preset fails a test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vitseg_export.compare.metrics import ParityAccumulator, ParitySummary, judge, worst_case
from vitseg_export.precisions import Thresholds, get_precision, thresholds_for

PRESETS = {
    "fp32": Thresholds(min_agreement=0.9999, min_miou_vs_reference=0.999, max_abs_logit_diff=1e-3,
                       max_mean_abs_logit_diff=1e-4, max_nonfinite=0),
    "fp16": Thresholds(min_agreement=0.999, min_miou_vs_reference=0.995, max_abs_logit_diff=0.5,
                       max_mean_abs_logit_diff=0.05, max_nonfinite=0),
    "int8": Thresholds(min_agreement=0.99, min_miou_vs_reference=0.98, max_abs_logit_diff=None,
                       max_mean_abs_logit_diff=None, max_nonfinite=0),
    "bf16": Thresholds(min_agreement=0.995, min_miou_vs_reference=0.99, max_abs_logit_diff=1.0,
                       max_mean_abs_logit_diff=0.1, max_nonfinite=0),
}
NAMES = sorted(PRESETS)


def below(x: float) -> float:
    """The next float below x: 'just beyond' a lower limit."""
    return float(np.nextafter(x, -math.inf))


def above(x: float) -> float:
    """The next float above x: 'just beyond' an upper limit."""
    return float(np.nextafter(x, math.inf))


def summary(**changes) -> ParitySummary:
    """A perfect summary with `changes`."""
    base = dict(images=8, pixels=80_000, pixel_agreement=1.0, miou_vs_reference=1.0, max_abs_logit_diff=0.0,
                mean_abs_logit_diff=0.0, nonfinite=0, flips=0, low_margin_flips=0)
    return ParitySummary(**{**base, **changes})


@pytest.mark.parametrize("name", NAMES)
def test_the_presets_are_the_documented_ones(name):
    assert get_precision(name).thresholds == PRESETS[name]


@pytest.mark.parametrize("name", NAMES)
def test_a_perfect_summary_passes_every_preset(name):
    assert judge(summary(), PRESETS[name]) == []


@pytest.mark.parametrize("name", NAMES)
def test_agreement_at_the_limit_passes_and_just_below_fails(name):
    t = get_precision(name).thresholds
    assert judge(summary(pixel_agreement=t.min_agreement), t) == []
    (failure,) = judge(summary(pixel_agreement=below(t.min_agreement), flips=9, low_margin_flips=4), t)
    assert failure.startswith("pixel agreement ") and "(9 pixels flipped, 4 of them near-ties)" in failure


@pytest.mark.parametrize("name", NAMES)
def test_miou_at_the_limit_passes_and_just_below_fails(name):
    t = get_precision(name).thresholds
    assert judge(summary(miou_vs_reference=t.min_miou_vs_reference), t) == []
    (failure,) = judge(summary(miou_vs_reference=below(t.min_miou_vs_reference)), t)
    assert failure.startswith("mIoU vs reference ")


@pytest.mark.parametrize("name", NAMES)
def test_a_nan_miou_fails_every_preset(name):
    (failure,) = judge(summary(miou_vs_reference=float("nan")), get_precision(name).thresholds)
    assert failure == f"mIoU vs reference nan < {PRESETS[name].min_miou_vs_reference * 100:.2f}"


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_allows_no_non_finite_value(name):
    t = get_precision(name).thresholds
    assert judge(summary(nonfinite=1), t) == ["1 non-finite logits (NaN/Inf) > 0"]


def test_a_non_finite_allowance_is_inclusive():
    t = thresholds_for("int8")
    loose = Thresholds(t.min_agreement, t.min_miou_vs_reference, None, None, max_nonfinite=2)
    assert judge(summary(nonfinite=2), loose) == []
    assert judge(summary(nonfinite=3), loose) == ["3 non-finite logits (NaN/Inf) > 2"]


@pytest.mark.parametrize("name", ["fp32", "fp16"])
def test_logit_limits_at_the_limit_pass_and_just_above_fail(name):
    t = get_precision(name).thresholds
    assert judge(summary(max_abs_logit_diff=t.max_abs_logit_diff, mean_abs_logit_diff=t.max_mean_abs_logit_diff), t) == []
    (failure,) = judge(summary(max_abs_logit_diff=above(t.max_abs_logit_diff)), t)
    assert failure.startswith("max |logit diff| ")
    (failure,) = judge(summary(mean_abs_logit_diff=above(t.max_mean_abs_logit_diff)), t)
    assert failure.startswith("mean |logit diff| ")


def test_int8_has_no_logit_limit():
    assert judge(summary(max_abs_logit_diff=1e6, mean_abs_logit_diff=1e3), PRESETS["int8"]) == []


@pytest.mark.parametrize("name", NAMES)
def test_masks_only_summaries_skip_the_logit_checks(name):
    assert judge(summary(max_abs_logit_diff=None, mean_abs_logit_diff=None), PRESETS[name]) == []


def test_the_same_summary_passes_looser_presets_only():
    """99.95% agreement, mIoU 99.6, max diff 0.1, mean 0.01: fp32 fails on all four, fp16 and int8 pass."""
    s = summary(pixel_agreement=0.9995, miou_vs_reference=0.996, max_abs_logit_diff=0.1, mean_abs_logit_diff=0.01,
                flips=40)
    assert len(judge(s, PRESETS["fp32"])) == 4
    assert judge(s, PRESETS["fp16"]) == [] and judge(s, PRESETS["int8"]) == []
    s = summary(pixel_agreement=0.995, miou_vs_reference=0.985, max_abs_logit_diff=2.0, mean_abs_logit_diff=0.2)
    assert len(judge(s, PRESETS["fp16"])) == 4 and judge(s, PRESETS["int8"]) == []


def test_every_failure_is_listed_with_its_numbers():
    s = summary(pixel_agreement=0.5, miou_vs_reference=0.25, max_abs_logit_diff=2.0, mean_abs_logit_diff=0.5,
                nonfinite=7, flips=40_000, low_margin_flips=12)
    assert judge(s, PRESETS["fp16"]) == [
        "pixel agreement 50.0000% < 99.90% (40000 pixels flipped, 12 of them near-ties)",
        "mIoU vs reference 25.000 < 99.50",
        "7 non-finite logits (NaN/Inf) > 0",
        "max |logit diff| 2 > 0.5",
        "mean |logit diff| 0.5 > 0.05",
    ]


@pytest.mark.parametrize("name,side,flips", [("fp32", 100, 1), ("int8", 10, 1)])
def test_agreement_from_real_counts_at_the_limit(name, side, flips):
    """9999 of 10000 pixels (fp32) and 99 of 100 (int8) agreeing are exactly the preset's agreement and pass; one
    more flip fails. Logits identical, so only the agreement and mIoU checks can speak."""
    t = PRESETS[name]
    for extra, passes in ((0, True), (1, False)):
        ref = np.zeros((2, side, side), np.float32)
        ref[1] = 1.0  # reference: class 1 everywhere, margin 1
        art_mask = np.ones((side, side), np.int64)
        art_mask.flat[:flips + extra] = 0
        acc = ParityAccumulator(2)
        acc.add("x", ref, art_mask, None)
        s = acc.summary()
        assert s.pixel_agreement == (side * side - flips - extra) / (side * side)
        agreement_failures = [f for f in judge(s, t) if f.startswith("pixel agreement")]
        assert (agreement_failures == []) is passes


def test_worst_case_over_shapes_fails_where_one_shape_fails():
    good = summary(pixel_agreement=0.9999)
    bad = summary(pixel_agreement=0.9990, flips=80)
    t = PRESETS["fp32"]
    assert judge(good, t) == [] and len(judge(bad, t)) == 1
    assert judge(worst_case([good, bad]), t) == judge(worst_case([bad, good]), t) == judge(bad, t)
    nan_shape = summary(miou_vs_reference=float("nan"))
    assert len(judge(worst_case([good, nan_shape, good]), t)) == 1


def test_a_nan_logit_difference_fails_a_preset_with_logit_limits():
    assert judge(summary(max_abs_logit_diff=float("nan")), PRESETS["fp32"]) != []
    assert judge(summary(mean_abs_logit_diff=float("nan")), PRESETS["fp32"]) != []


# -- the table's derived thresholds ------------------------------------------------------------------------


def test_batch_consistency_holds_fp32_logits_and_reduced_precisions_masks():
    assert get_precision("fp32").consistency() == Thresholds(0.9999, 0.0, 1e-3, None)
    assert get_precision("fp16").consistency() == Thresholds(0.999, 0.0, None, None)  # fp16 has a logit limit, unused
    assert get_precision("int8").consistency() == Thresholds(0.99, 0.0, None, None)
    custom = Thresholds(0.95, 0.9, 0.25, 0.1)
    assert get_precision("fp32").consistency(custom) == Thresholds(0.95, 0.0, 0.25, None)


def test_calibrated_precisions_take_the_users_targets():
    targets = Thresholds(0.995, 0.99, None, None)
    assert get_precision("int8").export_thresholds(targets) == Thresholds(0.995, 0.99, None, None, 0)
    assert get_precision("int8").export_thresholds() == PRESETS["int8"]
    assert get_precision("fp16").export_thresholds(targets) == PRESETS["fp16"]  # not calibrated: the preset


def test_every_precision_of_the_table_has_its_preset_written_here():
    from vitseg_export.precisions import PRECISIONS

    assert set(PRECISIONS) == set(PRESETS)


@pytest.mark.parametrize("name, weights, computes_in, allowance", [
    ("fp32", "fp32", "f32", 60.0), ("fp16", "fp16 (compressed)", "f16", 40.0), ("int8", "int8", "bf16", 20.0),
    ("bf16", "fp32", "bf16", 30.0)])  # bf16: OpenVINO rounds the fp32 weights when it compiles the IR
def test_what_an_ir_of_each_precision_stores_and_computes_in(name, weights, computes_in, allowance):
    row = get_precision(name)
    assert row.openvino_weights() == weights and row.openvino_inference_precision == computes_in
    assert row.locate_sqnr_db == allowance


def test_bf16_is_offered_where_vitseg_can_judge_it_and_refused_elsewhere_in_one_line():
    from vitseg_export.errors import VitsegError
    from vitseg_export.formats import FORMATS, get_format

    assert {name for name, fmt in FORMATS.items() if "bf16" in fmt.precisions} == {"openvino", "triton", "trt", "trt-rtx"}
    assert all({"fp32", "fp16", "int8"} <= set(fmt.precisions) for fmt in FORMATS.values())
    get_format("openvino").check_precision("bf16")
    get_format("trt-rtx").check_precision("bf16")
    with pytest.raises(VitsegError) as refused:
        get_format("onnx").check_precision("bf16")
    assert refused.value.message.startswith("--precision bf16 is not offered for --format onnx: bf16 is made as an "
                                            "OpenVINO IR (CPUs with AVX512_BF16 or AMX) or a TensorRT engine")
    assert refused.value.hint == "use --format openvino, trt or trt-rtx with --precision bf16, or --precision fp16 for ONNX"


def test_thresholds_for_overrides_single_limits():
    assert thresholds_for("fp16", min_agreement=0.98, max_abs_logit_diff=None) == Thresholds(0.98, 0.995, 0.5, 0.05)
    assert thresholds_for("int8") == PRESETS["int8"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_noise_images_are_judged_on_finiteness_and_ranges_never_on_masks(name):
    """masks=False (noise images): a 0% agreement and a NaN mIoU pass; a non-finite value and a logit beyond the
    preset's limit still fail."""
    t = PRESETS[name]
    assert judge(summary(pixel_agreement=0.0, miou_vs_reference=float("nan"), flips=4096), t, masks=False) == []
    assert judge(summary(nonfinite=1), t, masks=False) == ["1 non-finite logits (NaN/Inf) > 0"]
    if t.max_abs_logit_diff is not None:
        (failure,) = judge(summary(pixel_agreement=0.0, max_abs_logit_diff=above(t.max_abs_logit_diff)), t, masks=False)
        assert failure.startswith("max |logit diff|")
