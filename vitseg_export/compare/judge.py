"""The one judge: a candidate against its reference at every planned shape, on one set of images per verdict.

Every verdict vitseg gives goes through `verdict_of`: export (the fp32 graph, the converted graph, an engine, the
artifact a Triton repository serves), `vitseg verify`, `assert_mask_parity`; the int8 fallback decides on the
same images through the same comparator and metric (export/fallback.py, `Heldout`).

- `VerdictImages`: the real held-out images of a data spec's validation split decide agreement, mIoU and the
  logit limits; noise images (where the precision asks for them) test finiteness and logit ranges only, never
  agreement or mIoU (noise has no "right" mask, and its rare argmax classes would swing mIoU).
- `ReferenceOutputs`: the reference runner's logits, computed once per image and size and kept (within
  REFERENCE_CACHE_BYTES), so an export's fp32 check, int8 decision and final verdict, or a benchmark's dozen
  artifacts, run PyTorch once per image set.
- The verdict states what it rests on (images, pixels, classes in mIoU) and where the images came from.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from vitseg_export.compare.comparator import Comparison, OnImage, RecordedOutputs, compare
from vitseg_export.compare.inputs import InputImage, InputSet, Size, load_inputs, noise_inputs
from vitseg_export.errors import ParityError, VitsegError
from vitseg_export.precisions import Thresholds
from vitseg_export.runners.base import Runner

NOISE_IMAGES = 4  # uniform-noise images beside the real ones, for precisions judged on noise (finiteness, ranges)
# The most reference logits kept in memory (float32 bytes): past it the reference runs again for each candidate
# (a 150-class model at 512x512 holds 157 MB of logits per image).
REFERENCE_CACHE_BYTES = 2 << 30

Shapes = Mapping[Size, tuple[int, ...]]


@dataclass
class VerdictImages:
    """The images one verdict rests on: real held-out images (at the artifact's own size, each run alone by the
    reference) and, optionally, noise images (finiteness and ranges only). `eight_bit`: every pixel rounded to a
    multiple of 1/255 at every size, so a golden file stores exactly what was judged (compare/golden.py)."""

    spec: str
    real: InputSet
    noise: InputSet | None = None
    eight_bit: bool = False

    @classmethod
    def load(cls, spec: str, count: int, size: Size, noise: int = 0, eight_bit: bool = False) -> "VerdictImages":
        """The first `count` images of `spec`'s validation split at `size`, and `noise` noise images. DataError
        for a spec without images."""
        real = load_inputs(spec, "val", max(1, count), size)
        images = cls(spec, real, noise_inputs(size, noise) if noise else None, eight_bit)
        return images

    def real_at(self, shapes: Shapes) -> InputSet:
        """The real images at every shape of `shapes`."""
        return self._rounded(self.real.at_shapes(shapes))

    def noise_at(self, shapes: Shapes) -> InputSet | None:
        """The noise images at every size of `shapes`, alone (batch 1)."""
        if self.noise is None:
            return None
        return self._rounded(self.noise.at_shapes({size: batches[:1] for size, batches in shapes.items()}))

    def _rounded(self, inputs: InputSet) -> InputSet:
        if not self.eight_bit:
            return inputs
        images = [InputImage(im.name, np.rint(im.pixels * 255.0).clip(0, 255).astype(np.float32) / 255.0, im.label,
                             im.image) for im in inputs.images]
        return InputSet(f"{inputs.source} (8-bit)", images, inputs.batch_sizes, inputs.size_batches)

    def record(self) -> dict:
        """The manifest's and report's `images`: the data spec, split, how many, and a hash of the image names."""
        names = "\n".join(im.name for im in self.real.images)
        return {"data": self.spec, "split": "val", "source": self.real.source, "images": len(self.real),
                "noise_images": len(self.noise) if self.noise is not None else 0,
                "image_list_sha256": hashlib.sha256(names.encode()).hexdigest()[:16]}


class ReferenceOutputs:
    """A reference runner (PyTorch, or an ONNX graph for an engine built from it) whose logits are computed once
    per image and size and kept while they fit REFERENCE_CACHE_BYTES. Activates its runner on first use; `close`
    (or the with-block) releases it."""

    def __init__(self, runner: Runner, name: str):
        self.runner, self.name = runner, name
        self._logits: dict[tuple[str, str, Size], np.ndarray] = {}
        self._bytes = 0
        self.seconds = 0.0
        self.runs = 0  # images the reference actually ran (what "once per image set" is measured by)

    def __enter__(self) -> "ReferenceOutputs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the runner (the kept logits stay)."""
        if self.runner.active:
            self.runner.deactivate()

    def outputs(self, inputs: InputSet) -> RecordedOutputs | Runner:
        """The reference's logits for every image of `inputs` (recorded, computed where missing), or, where they
        would not fit the cache, the active runner itself (the comparator then runs it image by image)."""
        if not self.runner.active:
            self.runner.activate()
        missing = [im for im in inputs.images if (inputs.source, im.name, im.size) not in self._logits]
        if missing and not self._logits:  # the first image tells how large each image's logits are
            self._keep(inputs.source, missing.pop(0))
        if missing and self._bytes + self._estimate(missing) > REFERENCE_CACHE_BYTES:
            self.runs += len(inputs)
            return self.runner
        for im in missing:
            self._keep(inputs.source, im)
        return RecordedOutputs([self._logits[(inputs.source, im.name, im.size)] for im in inputs.images])

    def _keep(self, source: str, image) -> None:
        started = time.perf_counter()
        out = self.runner.infer({"pixels": image.pixels[None]})["logits"][0]
        self.seconds += time.perf_counter() - started
        self._logits[(source, image.name, image.size)] = out
        self._bytes += out.nbytes
        self.runs += 1

    def seconds_per_image(self) -> float:
        """The reference's time per image it ran (0.0 when it ran none: every output came recorded)."""
        return self.seconds / self.runs if self.runs else 0.0

    def _estimate(self, images) -> int:
        kept = next(iter(self._logits.values()))
        per_pixel = kept.nbytes / (kept.shape[-1] * kept.shape[-2])
        return int(sum(per_pixel * im.size[0] * im.size[1] for im in images))


@dataclass
class Verdict:
    """A candidate judged on one VerdictImages at every planned shape: the real images' comparison (agreement,
    mIoU, logits, batch consistency) and the noise images' (finiteness and ranges)."""

    real: Comparison
    noise: Comparison | None
    images: dict  # VerdictImages.record()
    reference: str

    @property
    def passed(self) -> bool:
        """Every check on real and noise images passed, and the candidate ran."""
        return self.real.passed and (self.noise is None or self.noise.passed)

    @property
    def error(self) -> str | None:
        """Why the candidate could not run, if it could not."""
        return self.real.error or (self.noise.error if self.noise is not None else None)

    @property
    def failures(self) -> list[str]:
        """The failed checks, noise ones marked as such."""
        noise = [f"on noise images: {f}" for f in self.noise.failures] if self.noise is not None else []
        return self.real.failures + noise

    def failed_at(self) -> str:
        """Where it first failed (' at batch 8, 64x64 (agreement 61.20%)'), or ''."""
        return self.real.failed_at() or (self.noise.failed_at() if self.noise is not None else "")

    def to_json(self) -> dict:
        """The manifest's `self_parity` and the head of a report: the real images' figures (worst case over
        shapes), `shapes`, `batch_consistency`, `images`, `reference`, and `noise` (finiteness and ranges)."""
        out = {**self.real.to_json(), "images_judged": self.images, "reference": self.reference, "source": self.images["source"]}
        if self.noise is not None and self.noise.summary is not None:
            s = self.noise.summary
            out["noise"] = {"images": s.images, "passed": self.noise.passed, "nonfinite": s.nonfinite,
                            "max_abs_logit_diff": s.max_abs_logit_diff, "mean_abs_logit_diff": s.mean_abs_logit_diff,
                            "failures": self.noise.failures}
        return out

    def basis(self) -> str:
        """'32 images, 131,072 pixels (3 classes in mIoU) of synthetic val, at batch 1/4/8 64x64'."""
        summary = self.real.summary
        shapes = ", ".join(f"batch {'/'.join(str(v.shape.batch) for v in self.real.shapes if (v.shape.height, v.shape.width) == hw)}"
                           f" {hw[0]}x{hw[1]}" for hw in dict.fromkeys((v.shape.height, v.shape.width) for v in self.real.shapes))
        noise = f" + {self.images['noise_images']} noise images (finiteness, ranges)" if self.images["noise_images"] else ""
        return f"{summary.basis() if summary else '0 images'} of {self.images['data']} val{noise}, at {shapes}"


def ranges_only(thresholds: Thresholds) -> Thresholds:
    """What noise images are held to: finiteness and the logit limits, no agreement or mIoU."""
    return replace(thresholds, min_agreement=0.0, min_miou_vs_reference=0.0)


def verdict_of(reference: ReferenceOutputs, candidate: Runner, images: VerdictImages, shapes: Shapes,
               thresholds: Thresholds, num_classes: int, consistency: Thresholds | None = None,
               mask_must_match_logits: bool = False, on_image: OnImage | None = None) -> Verdict:
    """`candidate` (inactive; activated and released here) against `reference` (ReferenceOutputs, or a golden
    file's recorded outputs) on `images` at every shape of `shapes` ({(H, W): batch sizes}), batch consistency with
    `consistency` limits, noise images for finiteness and ranges. VitsegError when the candidate cannot activate."""
    real = images.real_at(shapes)
    with candidate:
        result = compare(reference.outputs(real), {"candidate": candidate}, real, thresholds, num_classes, on_image,
                         mask_must_match_logits=mask_must_match_logits, consistency=consistency)
        noise = None
        noisy = images.noise_at(shapes)
        if noisy is not None and result.comparisons["candidate"].error is None:
            noise = compare(reference.outputs(noisy), {"candidate": candidate}, noisy, ranges_only(thresholds),
                            num_classes, mask_must_match_logits=mask_must_match_logits,
                            masks_judged=False).comparisons["candidate"]
    return Verdict(result.comparisons["candidate"], noise, images.record(), reference.name)


def check_ran(verdict: Verdict, name: str) -> None:
    """VitsegError when the candidate could not run at all (a damaged artifact, a shape it refuses)."""
    if verdict.error is not None:
        raise VitsegError(f"{name} could not be run: {verdict.error}", "see the message; re-export if needed")


def passed_or_refused(verdict: Verdict, name: str, differs: str, hint: str, after: str = "; nothing was written") -> Verdict:
    """The verdict if it passed; VitsegError (exit 2) when `name` could not run, ParityError (exit 3) naming where it
    first failed and why when it did not pass: `differs` + ' at batch 8, 64x64 (...)' + ': the failures' + `after`."""
    check_ran(verdict, name)
    if not verdict.passed:
        raise ParityError(f"{differs}{verdict.failed_at()}: {'; '.join(verdict.failures)}{after}", hint)
    return verdict
