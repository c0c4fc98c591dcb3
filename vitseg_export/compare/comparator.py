"""runners -> comparator: run every runner over the same inputs in one loop, then judge each against the
reference with compare/metrics.py. In the spirit of Polygraphy's Comparator; verify, export self-parity, int8
scoring and fallback, the benchmark and the demo all call this, none keeps a copy.

Inputs say the shapes they are run at: for each input size, the batch sizes every candidate runs the images
at (a dynamic-batch artifact at 1 and 4, a TensorRT engine at its profile's batches). The reference runs each
image once, alone (batching is a property of the candidate); each candidate runs every image at every batch
size, inside batches of other images (the last batch filled up with images already seen, whose outputs are
dropped), and is judged per shape. Outputs of one image at different batch sizes are also compared with each
other (batch consistency: no reference needed).

The reference is either a live runner (its outputs are computed once per chunk of images and compared with
every candidate, then dropped: memory stays flat for 150-class 512 px models) or outputs recorded once with
`record` (when candidates come one at a time, as in the int8 fallback search).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from vitseg_export.compare.inputs import InputImage, InputSet, Shape
from vitseg_export.compare.metrics import ConsistencyAccumulator, ParityAccumulator, ParitySummary, judge, worst_case
from vitseg_export.errors import VitsegError
from vitseg_export.precisions import Thresholds
from vitseg_export.runners.base import Runner, mask_of


@dataclass
class RecordedOutputs:
    """A reference's logits, one (C, H, W) array per input image, recorded once; `masks` (one (H, W) array per image)
    where they were recorded beside logits kept in a compact dtype (a golden file): the reference's own argmax."""

    logits: list[np.ndarray]
    seconds: float = 0.0
    masks: list[np.ndarray] | None = None


def record(runner: Runner, inputs: InputSet) -> RecordedOutputs:
    """Run `runner` (active) over `inputs` once, each image alone, and keep its logits."""
    t0 = time.perf_counter()
    logits = [runner.infer({"pixels": im.pixels[None]})["logits"][0] for im in inputs.images]
    return RecordedOutputs(logits, time.perf_counter() - t0)


@dataclass
class ShapeVerdict:
    """A candidate judged at one shape."""

    shape: Shape
    summary: ParitySummary
    failures: list[str]
    seconds_per_image: float

    def to_json(self) -> dict:
        """One entry of a report's `shapes`."""
        s = self.summary
        return {**self.shape.to_json(), "passed": not self.failures, "images": s.images,
                "pixel_agreement": s.pixel_agreement, "miou_vs_reference": s.miou_vs_reference,
                "max_abs_logit_diff": s.max_abs_logit_diff, "failures": self.failures,
                "seconds_per_image": self.seconds_per_image}


@dataclass
class Comparison:
    """One candidate's verdict against the reference: per shape, the worst case over shapes (`summary`), and
    batch consistency where it ran at more than one batch size."""

    name: str
    summary: ParitySummary | None
    failures: list[str]
    seconds_per_image: float  # at the first shape
    per_image: list[dict] = field(default_factory=list)
    error: str | None = None  # the candidate could not run; summary is then None
    shapes: list[ShapeVerdict] = field(default_factory=list)
    consistency: ConsistencyAccumulator | None = None

    @property
    def passed(self) -> bool:
        """No failed check and no error."""
        return self.error is None and not self.failures

    def failed_shape(self) -> ShapeVerdict | None:
        """The first shape that failed, if any."""
        return next((v for v in self.shapes if v.failures), None)

    def failed_at(self) -> str:
        """' at batch 4, 64x64 (agreement 61.20%)' for the first shape that failed, ' in batch consistency' when
        only that failed, '' when nothing did."""
        shape = self.failed_shape()
        if shape is not None:
            return f" at {shape.shape} (agreement {shape.summary.pixel_agreement * 100:.2f}%)"
        return " in batch consistency" if self.failures and self.error is None else ""

    def to_json(self) -> dict:
        """The summary's keys (worst case over shapes), `shapes` and `batch_consistency`."""
        out = self.summary.to_json() if self.summary is not None else {}
        out["shapes"] = [v.to_json() for v in self.shapes]
        out["batch_consistency"] = self.consistency.to_json() if self.consistency is not None else None
        return out


@dataclass
class CompareResult:
    comparisons: dict[str, Comparison]
    reference_seconds_per_image: float


OnImage = Callable[[InputImage, np.ndarray, dict[str, np.ndarray]], None]
Outputs = list[tuple[np.ndarray, "np.ndarray | None"]]  # per image: (mask (H,W), logits (C,H,W) or None)


def compare(reference: Runner | RecordedOutputs, candidates: Mapping[str, Runner], inputs: InputSet,
            thresholds: Thresholds | Mapping[str, Thresholds], num_classes: int, on_image: OnImage | None = None,
            mask_must_match_logits: bool = False,
            consistency: Thresholds | Mapping[str, Thresholds] | None = None, masks_judged: bool = True) -> CompareResult:
    """Run the reference (unless recorded; each image once, alone) and every candidate (at every shape of
    `inputs`) over the same images in one loop, then judge each candidate per shape. Runners must be active. A
    candidate that raises a VitsegError is recorded with its error and dropped from the rest of the loop; the
    others go on. `on_image(image, reference logits, candidate masks by name)` sees every image once per size
    (masks at the smallest batch). With `mask_must_match_logits`, a candidate whose `mask` output disagrees with
    the argmax of its own `logits` fails (an exporter bug, not a precision loss). With `consistency`
    thresholds, each image's outputs at every larger batch size are judged against its outputs at the smallest
    (see parity.ConsistencyAccumulator). `masks_judged=False` (noise images): agreement and mIoU are reported,
    not judged (compare/metrics.judge)."""
    loop = _Loop(candidates, inputs, num_classes, mask_must_match_logits, _per_candidate(consistency, candidates))
    ref_seconds = 0.0
    for size in inputs.sizes():
        indices = [i for i, im in enumerate(inputs.images) if im.size == size]
        batch_sizes = inputs.batch_sizes_at(size)
        for start in range(0, len(indices), max(batch_sizes)):
            chunk = indices[start:start + max(batch_sizes)]
            t0 = time.perf_counter()
            ref_masks: list = [None] * len(chunk)
            if isinstance(reference, RecordedOutputs):
                ref_logits = [reference.logits[i] for i in chunk]
                ref_masks = [reference.masks[i] for i in chunk] if reference.masks is not None else ref_masks
            else:
                ref_logits = [reference.infer({"pixels": inputs.images[i].pixels[None]})["logits"][0] for i in chunk]
            ref_seconds += time.perf_counter() - t0
            masks = loop.run_chunk(chunk, indices, batch_sizes, ref_logits, ref_masks)
            if on_image is not None:
                for k, i in enumerate(chunk):
                    on_image(inputs.images[i], ref_logits[k], {name: m[k] for name, m in masks.items()})
    if isinstance(reference, RecordedOutputs):
        ref_seconds = reference.seconds
    judged = {name: loop.verdict(name, thresholds if isinstance(thresholds, Thresholds) else thresholds[name], masks_judged)
              for name in candidates}
    return CompareResult(judged, ref_seconds / max(1, len(inputs)))


def _per_candidate(value, candidates) -> dict:
    if value is None or isinstance(value, Thresholds):
        return {name: value for name in candidates}
    return dict(value)


class _Loop:
    """The candidates' side of one comparison: runs each candidate over a chunk of images at every batch size,
    and keeps one parity accumulator per (candidate, shape) and one consistency accumulator per candidate."""

    def __init__(self, candidates: Mapping[str, Runner], inputs: InputSet, num_classes: int, strict_masks: bool,
                 consistency: dict):
        self.candidates, self.inputs, self.strict_masks = candidates, inputs, strict_masks
        self.shapes = inputs.shapes()
        self.parity = {(name, shape): ParityAccumulator(num_classes) for name in candidates for shape in self.shapes}
        self.seconds = {key: 0.0 for key in self.parity}
        tried = {b for size in inputs.sizes() for b in inputs.batch_sizes_at(size)}
        self.consistency = {name: ConsistencyAccumulator(t, set(tried)) if t is not None else None
                            for name, t in consistency.items()}
        self.errors: dict[str, str] = {}

    def run_chunk(self, chunk: list[int], pool: list[int], batch_sizes: tuple[int, ...],
                  ref_logits: list[np.ndarray], ref_masks: list) -> dict[str, np.ndarray]:
        """Every candidate over the images `chunk` (indices into the inputs) at each batch size; returns each
        candidate's masks at the smallest batch size. `pool`: the images of this size, to fill short batches."""
        masks = {}
        for name, runner in self.candidates.items():
            base: Outputs | None = None
            for batch in batch_sizes:
                if name in self.errors:
                    break
                outputs = self._infer(name, runner, chunk, pool, batch)
                if outputs is None:
                    break
                self._judge(name, chunk, batch, outputs, ref_logits, ref_masks, base)
                if base is None:
                    base, masks[name] = outputs, np.stack([m for m, _ in outputs])
        return masks

    def _infer(self, name: str, runner: Runner, chunk: list[int], pool: list[int], batch: int) -> Outputs | None:
        """`runner`'s outputs for each image of `chunk`, run in batches of exactly `batch` images (a short last
        batch is filled with other images of the same size, their outputs dropped); None after an error."""
        images = self.inputs.images
        shape = Shape(batch, *images[chunk[0]].size)
        outputs: Outputs = []
        for start in range(0, len(chunk), batch):
            members = chunk[start:start + batch]
            fill = [i for i in pool if i not in members] or members
            batch_indices = members + [fill[k % len(fill)] for k in range(batch - len(members))]
            t0 = time.perf_counter()
            try:
                out = runner.infer({"pixels": np.stack([images[i].pixels for i in batch_indices])})
            except VitsegError as e:
                self.errors[name] = e.message
                return None
            self.seconds[(name, shape)] += (time.perf_counter() - t0) * len(members) / batch
            logits, mask = out.get("logits"), mask_of(out)
            if self.strict_masks and logits is not None and "mask" in out and not np.array_equal(out["mask"], logits.argmax(1)):
                self.errors[name] = "its mask output disagrees with the argmax of its own logits (report this as a bug)"
                return None
            outputs += [(mask[k], None if logits is None else logits[k]) for k in range(len(members))]
        return outputs

    def _judge(self, name: str, chunk: list[int], batch: int, outputs: Outputs, ref_logits: list[np.ndarray],
               ref_masks: list, base: Outputs | None) -> None:
        images = self.inputs.images
        size = images[chunk[0]].size
        accumulator = self.parity[(name, Shape(batch, *size))]
        consistency = self.consistency.get(name)
        base_batch = self.inputs.batch_sizes_at(size)[0]
        for k, i in enumerate(chunk):
            mask, logits = outputs[k]
            row = accumulator.add(images[i].name, ref_logits[k], mask, logits, images[i].label, ref_masks[k])
            row.update(batch=batch, height=size[0], width=size[1])
            if base is not None and consistency is not None:
                consistency.add(images[i].name, batch, base_batch, size, base[k][0], mask, base[k][1], logits)

    def verdict(self, name: str, thresholds: Thresholds, masks: bool = True) -> Comparison:
        """The candidate's verdict: per shape, worst case over shapes, batch consistency."""
        per_image = [row for shape in self.shapes for row in self.parity[(name, shape)].per_image]
        first = self.seconds[(name, self.shapes[0])] / max(1, self.parity[(name, self.shapes[0])].images) \
            if self.shapes else 0.0
        if name in self.errors:
            return Comparison(name, None, [self.errors[name]], first, per_image, self.errors[name])
        verdicts = []
        for shape in self.shapes:
            summary = self.parity[(name, shape)].summary()
            failures = judge(summary, thresholds, masks)
            if len(self.shapes) > 1:
                failures = [f"at {shape}: {f}" for f in failures]
            verdicts.append(ShapeVerdict(shape, summary, failures, self.seconds[(name, shape)] / max(1, summary.images)))
        consistency = self.consistency.get(name)
        failures = [f for v in verdicts for f in v.failures] + (consistency.failures() if consistency else [])
        return Comparison(name, worst_case([v.summary for v in verdicts]), failures, first, per_image, None, verdicts,
                          consistency)
