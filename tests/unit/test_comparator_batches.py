"""The comparator's batching (compare/comparator.py): every candidate runs each image inside batches of other
images, the last batch of a chunk filled up with images already seen, whose outputs are dropped. Tiny fake
runners (numpy, 8x8 noise) record every batch they receive; the fill-ups are poisoned so that counting them
anywhere would show."""

from __future__ import annotations

import numpy as np
import pytest

from vitseg_export.compare.comparator import RecordedOutputs, compare
from vitseg_export.compare.inputs import noise_inputs
from vitseg_export.errors import VitsegError
from vitseg_export.precisions import Thresholds
from vitseg_export.runners.base import Runner

FP32 = Thresholds(0.9999, 0.999, 1e-3, 1e-4)  # the fp32 preset
NUM_CLASSES = 3


def logits_of(pixels: np.ndarray) -> np.ndarray:
    """The 'model': the three colour channels are the three classes' logits (noise: every class wins somewhere)."""
    return pixels.copy()


class FakeRunner(Runner):
    """Logits = pixels, batch by batch; records each batch as the indices of the images in it. With `poison`,
    an image already seen at this batch size gets NaN logits (the fill-up outputs the comparator must drop)."""

    backend = "fake"

    def __init__(self, images, poison: bool = False, fail_at_batch: int | None = None):
        super().__init__("fake", "cpu")
        self.dynamic_size = True
        self.index = {im.pixels.tobytes(): i for i, im in enumerate(images)}
        self.poison, self.fail_at_batch = poison, fail_at_batch
        self.batches: list[list[int]] = []
        self.seen: dict[int, set[int]] = {}

    def activate_impl(self) -> None:
        pass

    def infer_impl(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        members = [self.index[p.tobytes()] for p in pixels]
        self.batches.append(members)
        if len(members) == self.fail_at_batch:
            raise VitsegError("fake: this batch size is not in the engine's profile", "hint")
        seen = self.seen.setdefault(len(members), set())
        logits = np.stack([logits_of(p) for p in pixels])
        for k, i in enumerate(members):
            if self.poison and i in seen:
                logits[k] = np.nan
            seen.add(i)
        return {"logits": logits}


def run(count: int, batch_sizes: tuple[int, ...], **candidate):
    inputs = noise_inputs((8, 8), count, seed=3, batch_sizes=batch_sizes)
    reference = FakeRunner(inputs.images).activate()
    fake = FakeRunner(inputs.images, **candidate).activate()
    result = compare(reference, {"fake": fake}, inputs, FP32, NUM_CLASSES, consistency=FP32)
    return reference, fake, result.comparisons["fake"]


@pytest.mark.parametrize("count,batch_sizes,expected", [
    # chunks of max(batch_sizes) images; each chunk at every batch size; short batches filled from the first images
    (5, (1, 3), [[0], [1], [2], [0, 1, 2], [3], [4], [3, 4, 0]]),
    (4, (1, 3), [[0], [1], [2], [0, 1, 2], [3], [3, 0, 1]]),
    (5, (2, 3), [[0, 1], [2, 0], [0, 1, 2], [3, 4], [3, 4, 0]]),
    (4, (1, 4), [[0], [1], [2], [3], [0, 1, 2, 3]]),  # nothing to fill
    (2, (1, 3), [[0], [1], [0, 1, 0]]),  # fewer images than the batch: the chunk's own images fill it, cyclically
])
def test_candidate_batches_are_filled_with_images_already_seen(count, batch_sizes, expected):
    reference, fake, _ = run(count, batch_sizes)
    assert fake.batches == expected
    assert reference.batches == [[i] for i in range(count)]  # the reference runs each image once, alone


@pytest.mark.parametrize("count,batch_sizes", [(5, (1, 3)), (4, (1, 3)), (5, (2, 3)), (2, (1, 3))])
def test_the_fill_up_outputs_are_not_counted(count, batch_sizes):
    """Every fill-up slot gets NaN logits: counted anywhere, they would show as non-finite values, flips, a NaN
    or large logit difference, or as extra images."""
    _, fake, verdict = run(count, batch_sizes, poison=True)
    fills = sum(len(b) for b in fake.batches) - count * len(batch_sizes)
    assert fills > 0  # the test has teeth: poisoned slots were sent
    assert verdict.passed, verdict.failures
    for shape in verdict.shapes:
        s = shape.summary
        assert (s.images, s.pixels, s.nonfinite, s.flips) == (count, count * 64, 0, 0)
        assert s.pixel_agreement == 1.0 and s.max_abs_logit_diff == 0.0
    assert [shape.shape.batch for shape in verdict.shapes] == list(batch_sizes)
    assert len(verdict.per_image) == count * len(batch_sizes)
    assert [row["batch"] for row in verdict.per_image] == [b for b in batch_sizes for _ in range(count)]
    assert verdict.consistency.compared == count * (len(batch_sizes) - 1) and verdict.consistency.failing == []


def test_outputs_are_matched_to_their_images_in_order():
    """A candidate that returns the batch's outputs in reverse order fails: the positions matter."""
    inputs = noise_inputs((8, 8), 5, seed=3, batch_sizes=(1, 3))

    class Reversed(FakeRunner):
        def infer_impl(self, pixels):
            return {"logits": super().infer_impl(pixels)["logits"][::-1].copy()}

    reference = RecordedOutputs([logits_of(im.pixels) for im in inputs.images])
    verdict = compare(reference, {"r": Reversed(inputs.images).activate()}, inputs, FP32, NUM_CLASSES).comparisons["r"]
    at_1, at_3 = verdict.shapes
    assert at_1.failures == [] and at_1.summary.pixel_agreement == 1.0
    assert at_3.failures and at_3.summary.pixel_agreement < 0.9
    # batch 3 in order: [0,1,2] -> outputs of 2,1,0 (image 1 right); [3,4,0] -> outputs of 0,4,3 (image 4 right)
    rows = {row["name"]: row["pixel_agreement"] for row in verdict.per_image if row["batch"] == 3}
    assert rows["noise_1"] == rows["noise_4"] == 1.0
    assert max(rows["noise_0"], rows["noise_2"], rows["noise_3"]) < 0.9


def test_fill_ups_stay_within_images_of_the_same_size():
    small = noise_inputs((8, 8), 3, seed=3, batch_sizes=(1, 3))
    wide = noise_inputs((8, 6), 2, seed=4, batch_sizes=(1, 3))
    inputs = small + wide  # images 0-2 at 8x8, 3-4 at 8x6
    reference, fake = FakeRunner(inputs.images).activate(), FakeRunner(inputs.images, poison=True).activate()
    verdict = compare(reference, {"fake": fake}, inputs, FP32, NUM_CLASSES).comparisons["fake"]
    assert fake.batches == [[0], [1], [2], [0, 1, 2], [3], [4], [3, 4, 3]]
    assert [(s.shape.batch, s.shape.height, s.shape.width, s.summary.images) for s in verdict.shapes] == [
        (1, 8, 8, 3), (3, 8, 8, 3), (1, 8, 6, 2), (3, 8, 6, 2)]
    assert verdict.passed, verdict.failures


def test_a_candidate_that_fails_at_a_batch_size_is_dropped_with_its_error():
    inputs = noise_inputs((8, 8), 4, seed=3, batch_sizes=(1, 3))
    reference = FakeRunner(inputs.images).activate()
    broken, good = FakeRunner(inputs.images, fail_at_batch=3).activate(), FakeRunner(inputs.images).activate()
    result = compare(reference, {"broken": broken, "good": good}, inputs, FP32, NUM_CLASSES)
    assert broken.batches == [[0], [1], [2], [0, 1, 2]]  # not run again after its error
    assert result.comparisons["broken"].error == "fake: this batch size is not in the engine's profile"
    assert result.comparisons["broken"].summary is None and not result.comparisons["broken"].passed
    assert good.batches == [[0], [1], [2], [0, 1, 2], [3], [3, 0, 1]] and result.comparisons["good"].passed
