"""runners -> comparator: run every runner over the same inputs in one loop, then judge each against the
reference with parity.py. In the spirit of Polygraphy's Comparator; verify, export self-parity, int8
scoring and fallback, the benchmark and the demo all call this, none keeps a copy.

The reference is either a live runner (its outputs are computed once per batch and compared with every
candidate, then dropped: memory stays flat for 150-class 512 px models) or outputs recorded once with
`record` (when candidates come one at a time, as in the int8 fallback search).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import numpy as np

from vitseg_export.errors import VitsegError
from vitseg_export.parity import ParityAccumulator, ParitySummary, Thresholds, judge
from vitseg_export.runners.base import Runner, mask_of


@dataclass
class InputImage:
    name: str
    pixels: np.ndarray  # (3, H, W) float32 in [0, 1]
    label: np.ndarray | None = None  # (H, W) class indices at the same size, 255 ignored
    image: object = None  # the source PIL image, for pictures of the comparison


@dataclass
class InputSet:
    """The inputs every runner of a comparison sees, and where they came from (for provenance)."""

    source: str
    images: list[InputImage]
    batch: int = 1

    def batches(self) -> Iterator[list[InputImage]]:
        """The images in runs of at most `batch` images of one size."""
        chunk: list[InputImage] = []
        for image in self.images:
            if chunk and (len(chunk) == self.batch or chunk[0].pixels.shape != image.pixels.shape):
                yield chunk
                chunk = []
            chunk.append(image)
        if chunk:
            yield chunk

    def __add__(self, other: "InputSet") -> "InputSet":
        return InputSet(f"{self.source} + {other.source}", self.images + other.images, max(self.batch, other.batch))

    def __len__(self) -> int:
        return len(self.images)


def load_inputs(spec: str, split: str, count: int, size: tuple[int, int], batch: int = 1) -> InputSet:
    """Up to `count` images of a data spec's split, preprocessed to `size` as every backend sees them, with
    labels (resized nearest) where the source has masks. Raises DataError for a spec without images."""
    from PIL import Image

    from vitseg_export.artifact import pixels_from_image
    from vitseg_export.data.sources import open_source
    from vitseg_export.errors import DataError

    source = open_source(spec, split)
    n = min(count, len(source))
    if n == 0:
        raise DataError(f"{spec} has no images for {split}", "pass a data spec with images")
    images = []
    for i in range(n):
        sample = source[i]
        label = None
        if sample.mask is not None:
            label = np.asarray(Image.fromarray(sample.mask).resize((size[1], size[0]), Image.NEAREST))
        images.append(InputImage(sample.name, pixels_from_image(sample.image, size), label, sample.image))
    return InputSet(source.description, images, batch)


def noise_inputs(size: tuple[int, int], batch: int, seed: int = 0) -> InputSet:
    """One batch of uniform noise: catches graph differences that real images happen not to excite."""
    pixels = np.random.default_rng(seed).random((batch, 3, *size), dtype=np.float32)
    return InputSet(f"uniform noise seed={seed}", [InputImage(f"noise_{i}", p) for i, p in enumerate(pixels)], batch)


@dataclass
class RecordedOutputs:
    """A reference's logits, one (C, H, W) array per input image, recorded once."""

    logits: list[np.ndarray]
    seconds: float = 0.0


def record(runner: Runner, inputs: InputSet) -> RecordedOutputs:
    """Run `runner` (active) over `inputs` once and keep its logits."""
    logits: list[np.ndarray] = []
    t0 = time.perf_counter()
    for chunk in inputs.batches():
        logits.extend(runner.infer({"pixels": np.stack([im.pixels for im in chunk])})["logits"])
    return RecordedOutputs(logits, time.perf_counter() - t0)


@dataclass
class Comparison:
    """One candidate's verdict against the reference."""

    name: str
    summary: ParitySummary | None
    failures: list[str]
    seconds_per_image: float
    per_image: list[dict] = field(default_factory=list)
    error: str | None = None  # the candidate could not run; summary is then None

    @property
    def passed(self) -> bool:
        """No failed check and no error."""
        return self.error is None and not self.failures


@dataclass
class CompareResult:
    comparisons: dict[str, Comparison]
    reference_seconds_per_image: float


OnImage = Callable[[InputImage, np.ndarray, dict[str, np.ndarray]], None]


def compare(reference: Runner | RecordedOutputs, candidates: Mapping[str, Runner], inputs: InputSet,
            thresholds: Thresholds | Mapping[str, Thresholds], num_classes: int, on_image: OnImage | None = None,
            mask_must_match_logits: bool = False) -> CompareResult:
    """Run the reference (unless recorded) and every candidate over the same inputs in one loop, then judge
    each candidate. Runners must be active. A candidate that raises a VitsegError is recorded with its error
    and dropped from the rest of the loop; the others go on. `on_image(image, reference logits, candidate
    masks by name)` sees every image (e.g. to draw it). With `mask_must_match_logits`, a candidate whose
    `mask` output disagrees with the argmax of its own `logits` fails (an exporter bug, not a precision loss)."""
    accumulators = {name: ParityAccumulator(num_classes) for name in candidates}
    seconds = {name: 0.0 for name in candidates}
    errors: dict[str, str] = {}
    ref_seconds, index = 0.0, 0
    for chunk in inputs.batches():
        pixels = np.stack([im.pixels for im in chunk])
        if isinstance(reference, RecordedOutputs):
            ref_logits = np.stack(reference.logits[index:index + len(chunk)])
        else:
            t0 = time.perf_counter()
            ref_logits = reference.infer({"pixels": pixels})["logits"]
            ref_seconds += time.perf_counter() - t0
        masks = _run_candidates(candidates, pixels, chunk, ref_logits, accumulators, seconds, errors, mask_must_match_logits)
        if on_image is not None:
            for i, image in enumerate(chunk):
                on_image(image, ref_logits[i], {name: m[i] for name, m in masks.items()})
        index += len(chunk)
    if isinstance(reference, RecordedOutputs):
        ref_seconds = reference.seconds
    count = max(1, len(inputs))
    return CompareResult({name: _verdict(name, accumulators[name], seconds[name] / count, errors.get(name),
                                         thresholds if isinstance(thresholds, Thresholds) else thresholds[name])
                          for name in candidates}, ref_seconds / count)


def _run_candidates(candidates, pixels, chunk, ref_logits, accumulators, seconds, errors, strict_masks) -> dict:
    masks = {}
    for name, runner in candidates.items():
        if name in errors:
            continue
        t0 = time.perf_counter()
        try:
            out = runner.infer({"pixels": pixels})
        except VitsegError as e:
            errors[name] = e.message
            continue
        seconds[name] += time.perf_counter() - t0
        logits = out.get("logits")
        masks[name] = mask_of(out)
        if strict_masks and logits is not None and "mask" in out and not np.array_equal(out["mask"], logits.argmax(1)):
            errors[name] = "its mask output disagrees with the argmax of its own logits (report this as a bug)"
            continue
        for i, image in enumerate(chunk):
            accumulators[name].add(image.name, ref_logits[i], masks[name][i], None if logits is None else logits[i],
                                   image.label)
    return masks


def _verdict(name: str, acc: ParityAccumulator, seconds: float, error: str | None, thresholds: Thresholds) -> Comparison:
    if error is not None:
        return Comparison(name, None, [error], seconds, acc.per_image, error)
    summary = acc.summary()
    return Comparison(name, summary, judge(summary, thresholds), seconds, acc.per_image)
