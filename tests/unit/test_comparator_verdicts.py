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


class Clock:
    """time.perf_counter as the comparator reads it, advanced only by the runners' scripted durations."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Timed(FakeRunner):
    """A FakeRunner whose every call takes `seconds` on the clock."""

    def __init__(self, images, clock, seconds, **kw):
        super().__init__(images, **kw)
        self.clock, self.per_call = clock, seconds

    def infer_impl(self, pixels):
        self.clock.now += self.per_call
        return super().infer_impl(pixels)


def test_times_per_image_callbacks_labels_and_per_image_rows_by_hand(monkeypatch):
    from vitseg_export.compare import comparator
    from vitseg_export.compare.inputs import InputImage, InputSet

    clock = Clock()
    monkeypatch.setattr(comparator.time, "perf_counter", clock)
    base = noise_inputs((8, 6), 4, seed=3)
    labels = [im.pixels.argmax(0).astype(np.uint8) for im in base.images]  # the reference's own masks as labels
    inputs = InputSet(base.source, [InputImage(im.name, im.pixels, lab) for im, lab in zip(base.images, labels)], (1, 2))
    reference = Timed(inputs.images, clock, 0.001).activate()  # 1 ms an image
    candidate = Timed(inputs.images, clock, 0.004).activate()  # 4 ms a call, whatever the batch
    seen = []
    result = compare(reference, {"c": candidate}, inputs, FP32, NUM_CLASSES, consistency=FP32,
                     on_image=lambda image, ref, masks: seen.append((image.name, ref.shape, sorted(masks), masks["c"].shape)))
    assert result.reference_seconds_per_image == pytest.approx(0.001)
    verdict = result.comparisons["c"]
    # batch 1: 4 ms per image; batch 2: 4 ms per call of two images = 2 ms per image
    assert [s.seconds_per_image for s in verdict.shapes] == [pytest.approx(0.004), pytest.approx(0.002)]
    assert verdict.seconds_per_image == pytest.approx(0.004)  # the first shape's
    assert seen == [(f"noise_{i}", (3, 8, 6), ["c"], (8, 6)) for i in range(4)]  # every image once, its mask at batch 1
    rows = verdict.per_image
    assert [(r["batch"], r["height"], r["width"]) for r in rows] == [(1, 8, 6)] * 4 + [(2, 8, 6)] * 4
    labels_scores = verdict.summary.labels  # the labels are the reference's own masks: it scores 100% against them
    assert labels_scores.reference_pixel_accuracy_vs_labels == 1.0 and labels_scores.reference_miou_vs_labels == 1.0
    assert verdict.consistency.compared == 4 and verdict.consistency.batch_sizes == {1, 2}


def test_recorded_masks_and_per_candidate_thresholds():
    inputs = noise_inputs((8, 8), 3, seed=3)
    logits = [logits_of(im.pixels) for im in inputs.images]
    # recorded masks (a golden file's) are the reference's word, not the argmax of its compact logits: a reference
    # whose masks all say class 2 makes an exact candidate disagree wherever the argmax is not 2
    shifted = [np.full((8, 8), 2, np.int64) for _ in logits]
    verdict = compare(RecordedOutputs(logits, 0.5, shifted), {"c": FakeRunner(inputs.images).activate()}, inputs, FP32,
                      NUM_CLASSES).comparisons["c"]
    share_two = np.mean([(lg.argmax(0) == 2).mean() for lg in logits])
    assert verdict.summary.pixel_agreement == pytest.approx(share_two)
    strict, loose = FP32, FP32.__class__(0.0, 0.0, 1.0, 1.0)
    result = compare(RecordedOutputs(logits, 0.5), {"a": Shifted(inputs.images, 0.5).activate(),
                                                    "b": Shifted(inputs.images, 0.5).activate()},
                     inputs, {"a": strict, "b": loose}, NUM_CLASSES)
    assert not result.comparisons["a"].passed and result.comparisons["b"].passed
    assert result.reference_seconds_per_image == 0.5 / 3  # a recorded reference's own time, per image


def test_by_default_a_mask_output_is_taken_as_given_and_masks_are_judged():
    verdict = _compare(lambda images: Shifted(images, 0.0, "wrong"))
    assert verdict.error is None and not verdict.passed  # judged: the wrong masks disagree
    assert any(f.startswith("pixel agreement ") for f in verdict.failures)
