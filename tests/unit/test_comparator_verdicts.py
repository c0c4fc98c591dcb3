"""The comparator's verdicts and their JSON, by hand (issue 37: the mutation run found its report text and
verdict assembly reached by no fast test). Tiny numpy runners: logits = pixels, or pixels plus an offset on one
class where a candidate should fail."""

from __future__ import annotations

import numpy as np
import pytest

from vitseg_export.compare.comparator import RecordedOutputs, compare, record
from vitseg_export.compare.inputs import noise_inputs

from .test_comparator_batches import FP32, NUM_CLASSES, FakeRunner, logits_of


class Shifted(FakeRunner):
    """Class 0's logit raised by `shift` everywhere: the argmax moves to class 0 wherever it was within `shift`."""

    def __init__(self, images, shift: float, mask: str = "none"):
        super().__init__(images)
        self.shift, self.mask = shift, mask

    def infer_impl(self, pixels):
        logits = super().infer_impl(pixels)["logits"]
        logits[:, 0] += self.shift
        out = {"logits": logits}
        if self.mask == "own":
            out["mask"] = logits.argmax(1)
        elif self.mask == "wrong":
            out["mask"] = (logits.argmax(1) + 1) % NUM_CLASSES
        return out


def _compare(candidate_factory, batch_sizes=(1,), count=4, **kwargs):
    inputs = noise_inputs((8, 8), count, seed=3, batch_sizes=batch_sizes)
    reference = RecordedOutputs([logits_of(im.pixels) for im in inputs.images])
    candidate = candidate_factory(inputs.images).activate()
    return compare(reference, {"c": candidate}, inputs, FP32, NUM_CLASSES, **kwargs).comparisons["c"]


def test_an_identical_candidate_passes_with_its_json_by_hand():
    verdict = _compare(lambda images: FakeRunner(images), batch_sizes=(1, 2), consistency=FP32)
    assert verdict.passed and verdict.failures == [] and verdict.error is None and verdict.failed_at() == ""
    assert verdict.failed_shape() is None
    shapes = [s.to_json() for s in verdict.shapes]
    for s, batch in zip(shapes, (1, 2)):
        seconds = s.pop("seconds_per_image")
        assert seconds >= 0
        assert s == {"batch": batch, "height": 8, "width": 8, "passed": True, "images": 4, "pixel_agreement": 1.0,
                     "miou_vs_reference": 1.0, "max_abs_logit_diff": 0.0, "failures": []}
    out = verdict.to_json()
    assert out["shapes"] == verdict.to_json()["shapes"] and len(out["shapes"]) == 2
    assert out["pixel_agreement"] == 1.0 and out["images"] == 4
    assert out["batch_consistency"]["passed"] and out["batch_consistency"]["images_compared"] == 4


def test_a_shifted_candidate_fails_with_each_limit_named_by_shape():
    verdict = _compare(lambda images: Shifted(images, 0.5), batch_sizes=(1, 2))
    assert not verdict.passed and verdict.error is None
    first = verdict.failed_shape()
    assert first is verdict.shapes[0] and str(first.shape) == "batch 1, 8x8"
    agreement = first.summary.pixel_agreement
    assert 0 < agreement < 0.9999
    assert verdict.failed_at() == f" at batch 1, 8x8 (agreement {agreement * 100:.2f}%)"
    # more than one shape: every failure says where; the logit limit names the shift (exactly 0.5)
    assert all(f.startswith(("at batch 1, 8x8: ", "at batch 2, 8x8: ")) for f in verdict.failures)
    assert "at batch 1, 8x8: max |logit diff| 0.5 > 0.001" in verdict.failures
    assert "at batch 2, 8x8: mean |logit diff| 0.167 > 0.0001" in verdict.failures  # one class of three moved by 0.5
    assert verdict.shapes[0].to_json()["passed"] is False and verdict.shapes[0].to_json()["failures"] == first.failures


def test_one_shape_only_keeps_the_failures_unprefixed():
    verdict = _compare(lambda images: Shifted(images, 0.5))
    assert verdict.failures and not any(f.startswith("at ") for f in verdict.failures)
    assert "max |logit diff| 0.5 > 0.001" in verdict.failures


def test_only_batch_consistency_failing_says_so():
    class Drifting(FakeRunner):  # exact alone, off by 0.01 inside a batch of two
        def infer_impl(self, pixels):
            logits = super().infer_impl(pixels)["logits"]
            return {"logits": logits + (0.01 if len(pixels) > 1 else 0.0)}

    loose = FP32.__class__(0.9, 0.9, 1.0, 1.0)
    inputs = noise_inputs((8, 8), 4, seed=3, batch_sizes=(1, 2))
    reference = RecordedOutputs([logits_of(im.pixels) for im in inputs.images])
    verdict = compare(reference, {"c": Drifting(inputs.images).activate()}, inputs, loose, NUM_CLASSES,
                      consistency=FP32).comparisons["c"]
    assert all(not s.failures for s in verdict.shapes) and verdict.failures
    assert verdict.failed_shape() is None and verdict.failed_at() == " in batch consistency"


@pytest.mark.parametrize("mask, passed", [("own", True), ("wrong", False)])
def test_a_mask_output_must_be_the_argmax_of_its_own_logits(mask, passed):
    verdict = _compare(lambda images: Shifted(images, 0.0, mask), mask_must_match_logits=True)
    assert verdict.passed is passed
    if not passed:
        assert verdict.error == "its mask output disagrees with the argmax of its own logits (report this as a bug)"
        assert verdict.failures == [verdict.error] and verdict.summary is None and verdict.failed_at() == ""
        assert verdict.to_json() == {"shapes": [], "batch_consistency": None}


@pytest.mark.parametrize("masks_judged", [True, False])
def test_noise_images_are_judged_for_logits_only(masks_judged):
    """Flips within the logit limits: a failure on real images, reported only on noise."""
    exact_masks = FP32.__class__(1.0, 1.0, 1.0, 1.0)
    inputs = noise_inputs((8, 8), 4, seed=3, batch_sizes=(1,))
    reference = RecordedOutputs([logits_of(im.pixels) for im in inputs.images])
    verdict = compare(reference, {"c": Shifted(inputs.images, 0.3).activate()}, inputs, exact_masks, NUM_CLASSES,
                      masks_judged=masks_judged).comparisons["c"]
    assert verdict.summary.pixel_agreement < 1.0
    assert verdict.passed is not masks_judged
    assert any(f.startswith("pixel agreement ") for f in verdict.failures) is masks_judged


def test_record_keeps_each_images_logits_alone():
    inputs = noise_inputs((8, 8), 3, seed=3, batch_sizes=(1,))
    runner = FakeRunner(inputs.images).activate()
    recorded = record(runner, inputs)
    assert runner.batches == [[0], [1], [2]] and recorded.seconds >= 0 and recorded.masks is None
    assert all(np.array_equal(got, logits_of(im.pixels)) for got, im in zip(recorded.logits, inputs.images))
