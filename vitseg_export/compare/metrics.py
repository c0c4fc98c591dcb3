"""outputs -> comparator: mask-level parity between an artifact's outputs and the PyTorch reference's.

Numpy only. `ParityAccumulator` takes one image at a time and gives a typed `ParitySummary`; `judge`
checks a summary against `Thresholds` (the per-precision presets and their reasons live in the
precision table, vitseg_export/precisions.py). The loop that runs the runners is
compare/comparator.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from vitseg_export.precisions import Thresholds, thresholds_dict

LOW_MARGIN = 0.1  # a reference top-2 logit margin below this makes a flip a near-tie, not an error
# mIoU against the reference averages the classes that cover at least this share of the judged pixels in the
# reference's masks or the artifact's: a class on a few dozen pixels of a handful of images would otherwise swing
# the mean by tens of points (a 1-epoch B0 int8 at 64 px read 66.4 where its agreement was 99.88%). Its flips still
# count, in pixel agreement. (docs/guides/verify-and-parity-presets.md, "Rare classes")
MIN_CLASS_SHARE = 0.001


def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int = 255) -> np.ndarray:
    """(num_classes, num_classes) counts, rows = target, columns = prediction; `ignore` pixels skipped."""
    valid = target != ignore
    idx = target[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def class_ious(cm: np.ndarray) -> np.ndarray:
    """Each class's IoU from a confusion matrix; NaN for a class in neither target nor prediction."""
    inter = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def miou(cm: np.ndarray) -> float:
    """Mean IoU over the classes present in target or prediction (NaN when none is)."""
    ious = class_ious(cm)
    present = ious[~np.isnan(ious)]
    return float(present.mean()) if present.size else float("nan")


def miou_vs_reference(cm: np.ndarray) -> tuple[float, int]:
    """(mIoU, classes averaged) of an artifact's masks against the reference's (`cm`: rows = reference): the mean
    IoU over the classes that cover at least MIN_CLASS_SHARE of the pixels in either mask (NaN when none does)."""
    ious = class_ious(cm)
    cover = np.maximum(cm.sum(0), cm.sum(1))
    counted = ~np.isnan(ious) & (cover >= MIN_CLASS_SHARE * cm.sum())
    return (float(ious[counted].mean()) if counted.any() else float("nan")), int(counted.sum())


def pixel_accuracy(cm: np.ndarray) -> float:
    """The share of (not ignored) pixels whose prediction is their target; NaN when there are none."""
    total = cm.sum()
    return float(np.diag(cm).sum() / total) if total else float("nan")


@dataclass(frozen=True)
class LabelScores:
    """Each side's agreement with dataset labels, where the inputs have them."""

    reference_miou_vs_labels: float
    artifact_miou_vs_labels: float
    miou_drop_vs_labels: float
    reference_pixel_accuracy_vs_labels: float
    artifact_pixel_accuracy_vs_labels: float


@dataclass(frozen=True)
class ParitySummary:
    """Totals of a comparison. JSON form: the field names, `low_margin`, and the label scores spread in
    (only where the inputs had labels)."""

    images: int
    pixels: int
    pixel_agreement: float
    miou_vs_reference: float
    max_abs_logit_diff: float | None
    mean_abs_logit_diff: float | None
    nonfinite: int
    flips: int
    low_margin_flips: int
    labels: LabelScores | None = None
    miou_classes: int | None = None  # classes averaged by miou_vs_reference (rare ones left out: MIN_CLASS_SHARE)

    def to_json(self) -> dict:
        """The documented JSON keys (`self_parity` in manifests, the head of a verify report)."""
        out = {k: v for k, v in asdict(self).items() if k != "labels"}
        out["low_margin"] = LOW_MARGIN
        out["min_class_share"] = MIN_CLASS_SHARE
        if self.labels is not None:
            out.update(asdict(self.labels))
        return out

    def basis(self) -> str:
        """What the figures rest on: '32 images, 131,072 pixels (3 classes in mIoU)'."""
        classes = f" ({self.miou_classes} classes in mIoU)" if self.miou_classes is not None else ""
        return f"{self.images} images, {self.pixels:,} pixels{classes}"


@dataclass
class ParityAccumulator:
    """Accumulates per-image comparisons; `summary()` gives the totals."""

    num_classes: int
    images: int = 0
    pixels: int = 0
    agree: int = 0
    flips: int = 0
    low_margin_flips: int = 0
    nonfinite: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    logit_values: int = 0
    cm_vs_ref: np.ndarray = field(default=None)  # type: ignore[assignment]
    cm_ref_gt: np.ndarray = field(default=None)  # type: ignore[assignment]
    cm_art_gt: np.ndarray = field(default=None)  # type: ignore[assignment]
    per_image: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        k = self.num_classes
        self.cm_vs_ref = np.zeros((k, k), np.int64)
        self.cm_ref_gt = np.zeros((k, k), np.int64)
        self.cm_art_gt = np.zeros((k, k), np.int64)
        self.has_labels = False

    def add(self, name: str, ref_logits: np.ndarray, art_mask: np.ndarray, art_logits: np.ndarray | None,
            label: np.ndarray | None = None, ref_mask: np.ndarray | None = None) -> dict:
        """One image: ref_logits (C,H,W), art_mask (H,W), art_logits (C,H,W) or None, label (H,W) or None; ref_mask
        (H,W): the reference's own mask where its logits were kept in a compact dtype (default: their argmax)."""
        ref_mask = ref_logits.argmax(0) if ref_mask is None else ref_mask
        agree = int((ref_mask == art_mask).sum())
        n = ref_mask.size
        top2 = np.partition(ref_logits, -2, axis=0)[-2:]
        margin = top2[1] - top2[0]
        flipped = ref_mask != art_mask
        low = int((flipped & (margin < LOW_MARGIN)).sum())
        row = {"name": name, "pixel_agreement": agree / n, "flips": n - agree, "low_margin_flips": low}
        self.cm_vs_ref += confusion(art_mask, ref_mask, self.num_classes)
        if art_logits is not None:
            finite = np.isfinite(art_logits)
            nonfinite = int((~finite).sum())
            diff = np.abs(np.where(finite, art_logits, 0).astype(np.float64) - ref_logits.astype(np.float64))
            row.update(max_abs_logit_diff=float(diff.max()), mean_abs_logit_diff=float(diff.mean()), nonfinite=nonfinite)
            self.nonfinite += nonfinite
            # NaN (a NaN in the reference's logits) must survive: max(0.0, nan) would drop it
            self.max_abs = _highest([self.max_abs, float(diff.max())])
            self.sum_abs += float(diff.sum())
            self.logit_values += diff.size
        if label is not None and (label != 255).any():
            self.has_labels = True
            self.cm_ref_gt += confusion(ref_mask, label, self.num_classes)
            self.cm_art_gt += confusion(art_mask, label, self.num_classes)
        row["miou_vs_reference"] = miou_vs_reference(confusion(art_mask, ref_mask, self.num_classes))[0]
        self.images += 1
        self.pixels += n
        self.agree += agree
        self.flips += n - agree
        self.low_margin_flips += low
        self.per_image.append(row)
        return row

    def summary(self) -> ParitySummary:
        """The totals over every image added so far."""
        labels = None
        if self.has_labels:
            ref, art = miou(self.cm_ref_gt), miou(self.cm_art_gt)
            labels = LabelScores(reference_miou_vs_labels=ref, artifact_miou_vs_labels=art, miou_drop_vs_labels=ref - art,
                                 reference_pixel_accuracy_vs_labels=float(np.trace(self.cm_ref_gt) / max(1, self.cm_ref_gt.sum())),
                                 artifact_pixel_accuracy_vs_labels=float(np.trace(self.cm_art_gt) / max(1, self.cm_art_gt.sum())))
        miou_ref, classes = miou_vs_reference(self.cm_vs_ref)
        return ParitySummary(
            images=self.images, pixels=self.pixels, pixel_agreement=self.agree / max(1, self.pixels),
            miou_vs_reference=miou_ref, miou_classes=classes,
            max_abs_logit_diff=self.max_abs if self.logit_values else None,
            mean_abs_logit_diff=self.sum_abs / self.logit_values if self.logit_values else None,
            nonfinite=self.nonfinite, flips=self.flips, low_margin_flips=self.low_margin_flips, labels=labels)


def judge(summary: ParitySummary, thresholds: Thresholds, masks: bool = True) -> list[str]:
    """The failed checks, each saying what and by how much; empty means pass. `masks=False` (noise images, which
    test finiteness and logit ranges only): agreement and mIoU are not judged."""
    failures = []
    agreement = summary.pixel_agreement
    if not masks:
        pass
    elif agreement < thresholds.min_agreement:
        failures.append(f"pixel agreement {agreement * 100:.4f}% < {thresholds.min_agreement * 100:.2f}% "
                        f"({summary.flips} pixels flipped, {summary.low_margin_flips} of them near-ties)")
    m = summary.miou_vs_reference
    if masks and (math.isnan(m) or m < thresholds.min_miou_vs_reference):
        failures.append(f"mIoU vs reference {m * 100:.3f} < {thresholds.min_miou_vs_reference * 100:.2f}")
    if summary.nonfinite > thresholds.max_nonfinite:
        failures.append(f"{summary.nonfinite} non-finite logits (NaN/Inf) > {thresholds.max_nonfinite}")
    mx, mean = summary.max_abs_logit_diff, summary.mean_abs_logit_diff
    # NaN (undefined) fails a limit, as a NaN mIoU does: `nan > limit` is False
    if thresholds.max_abs_logit_diff is not None and mx is not None and not mx <= thresholds.max_abs_logit_diff:
        failures.append(f"max |logit diff| {mx:.3g} > {thresholds.max_abs_logit_diff:.3g}")
    if thresholds.max_mean_abs_logit_diff is not None and mean is not None and not mean <= thresholds.max_mean_abs_logit_diff:
        failures.append(f"mean |logit diff| {mean:.3g} > {thresholds.max_mean_abs_logit_diff:.3g}")
    return failures


def _lowest(values: list[float]) -> float:
    """The smallest value, NaN (undefined: judged a failure) below every number."""
    return next((v for v in values if math.isnan(v)), min(values))


def _highest(values: list[float | None]) -> float | None:
    """The largest value, NaN (undefined: judged a failure) above every number, whatever the order; None if none."""
    present = [v for v in values if v is not None]
    return next((v for v in present if math.isnan(v)), max(present)) if present else None


def worst_case(summaries: list[ParitySummary]) -> ParitySummary:
    """One summary whose every key is the worst over `summaries` (the same images judged at several shapes):
    the lowest agreement and mIoU, the largest logit differences, non-finite counts and flips, the label scores
    of the shape that lost most against the labels. `images` and `pixels` are those of one shape."""
    if len(summaries) == 1:
        return summaries[0]
    labelled = [s.labels for s in summaries if s.labels is not None]
    labels = max(labelled, key=lambda scores: -math.inf if math.isnan(scores.miou_drop_vs_labels)
                 else scores.miou_drop_vs_labels) if labelled else None
    return ParitySummary(
        images=max(s.images for s in summaries), pixels=max(s.pixels for s in summaries),
        pixel_agreement=min(s.pixel_agreement for s in summaries),
        miou_vs_reference=_lowest([s.miou_vs_reference for s in summaries]),
        max_abs_logit_diff=_highest([s.max_abs_logit_diff for s in summaries]),
        mean_abs_logit_diff=_highest([s.mean_abs_logit_diff for s in summaries]),
        nonfinite=max(s.nonfinite for s in summaries), flips=max(s.flips for s in summaries),
        low_margin_flips=max(s.low_margin_flips for s in summaries), labels=labels,
        miou_classes=min((s.miou_classes for s in summaries if s.miou_classes is not None), default=None))


@dataclass
class ConsistencyAccumulator:
    """Batch consistency, no reference needed: an image's outputs inside a batch of other images against its
    outputs alone (or at the smallest batch tried). `thresholds.max_abs_logit_diff` set (fp32: the same math
    whatever the batch): logits must stay within it; otherwise (reduced precisions) each image's mask must agree
    with itself to `thresholds.min_agreement`. Masks only (no logits output): the agreement rule."""

    thresholds: Thresholds
    batch_sizes: set = field(default_factory=set)
    compared: int = 0
    failing: list[dict] = field(default_factory=list)
    worst: dict | None = None

    def add(self, name: str, batch: int, base_batch: int, size: tuple[int, int], base_mask: np.ndarray,
            mask: np.ndarray, base_logits: np.ndarray | None, logits: np.ndarray | None) -> None:
        """One image at `batch` against the same image at `base_batch` (both (H,W) masks, (C,H,W) logits or None)."""
        self.batch_sizes |= {batch, base_batch}
        agreement = float((base_mask == mask).mean())
        diff = None
        if base_logits is not None and logits is not None:
            diff = float(np.nan_to_num(np.abs(logits.astype(np.float64) - base_logits), nan=np.inf).max())
        row = {"image": name, "batch": batch, "against_batch": base_batch, "height": size[0], "width": size[1],
               "pixel_agreement": agreement, "max_abs_logit_diff": diff}
        limit = self.thresholds.max_abs_logit_diff
        failed = diff > limit if limit is not None and diff is not None else agreement < self.thresholds.min_agreement
        row["passed"] = not failed
        self.compared += 1
        if failed:
            self.failing.append(row)
        if self.worst is None or _worse(row, self.worst):
            self.worst = row

    def failures(self) -> list[str]:
        """One message naming the batch size and the images that differ (the first three), empty when none."""
        if not self.failing:
            return []
        rows = sorted(self.failing, key=lambda r: (r["pixel_agreement"], -(r["max_abs_logit_diff"] or 0.0)))
        named = ", ".join(f"{r['image']} at batch {r['batch']}, {r['height']}x{r['width']} (agreement "
                          f"{r['pixel_agreement'] * 100:.2f}%" + (f", max |logit diff| {r['max_abs_logit_diff']:.3g}"
                                                                   if r["max_abs_logit_diff"] is not None else "") + ")"
                          for r in rows[:3])
        more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
        return [f"batch consistency: {named}{more} differ from the same image run at batch {rows[0]['against_batch']}"]

    def to_json(self) -> dict:
        """The report's `batch_consistency`."""
        out = {"passed": not self.failing, "batch_sizes": sorted(self.batch_sizes), "images_compared": self.compared,
               "failing": len(self.failing), "worst_image": self.worst, "thresholds": thresholds_dict(self.thresholds)}
        if not self.compared:
            out["note"] = "one batch size only (a static batch): every image ran alone, nothing to compare"
        return out


def _worse(a: dict, b: dict) -> bool:
    """Whether consistency row `a` is worse than `b`: failing first, then lower agreement, then larger logit diff."""
    return (a["passed"], a["pixel_agreement"], -(a["max_abs_logit_diff"] or 0.0)) < \
        (b["passed"], b["pixel_agreement"], -(b["max_abs_logit_diff"] or 0.0))
