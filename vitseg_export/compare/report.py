"""comparison -> report: the verdict's JSON form (the documented report keys), as `vitseg verify`, the benchmark's
rows and `assert_mask_parity` write it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vitseg_export.compare.comparator import Comparison, ShapeVerdict
from vitseg_export.compare.judge import Verdict
from vitseg_export.compare.metrics import ParitySummary
from vitseg_export.files import write_json
from vitseg_export.precisions import Thresholds, thresholds_dict, thresholds_for


@dataclass
class VerifyReport:
    """The verdict of `vitseg verify`. JSON form: the fields below with the summary's keys spread in (the
    documented report keys)."""

    passed: bool
    failures: list[str]
    artifact: str
    reference: str
    precision: str
    backend: str
    device: str
    data: str
    summary: ParitySummary | None
    thresholds: Thresholds
    reference_seconds_per_image: float
    artifact_seconds_per_image: float
    architecture: str
    per_image: list[dict] = field(default_factory=list)
    shapes: list[ShapeVerdict] = field(default_factory=list)
    batch_consistency: dict | None = None
    failed_at: str = ""  # ' at batch 4, 64x64 (agreement 61.20%)': where the verdict first failed
    images: dict | None = None  # what the verdict rests on: VerdictImages.record() (data, split, images, noise images)
    noise: dict | None = None  # the noise images' finiteness and ranges (Verdict.to_json()["noise"])
    golden: dict | None = None  # judged against a golden file: which, and whether it was made for this very file

    def to_json(self) -> dict:
        """The report as written by `--report` and printed by `--json`: the top-level figures are the worst
        case over `shapes` (one entry per batch size and input size checked)."""
        head = {"passed": self.passed, "failures": self.failures, "artifact": self.artifact, "reference": self.reference,
                "precision": self.precision, "backend": self.backend, "device": self.device, "data": self.data}
        return {**head, **(self.summary.to_json() if self.summary else {}), "thresholds": thresholds_dict(self.thresholds),
                "shapes": [v.to_json() for v in self.shapes], "batch_consistency": self.batch_consistency,
                "reference_seconds_per_image": self.reference_seconds_per_image,
                "artifact_seconds_per_image": self.artifact_seconds_per_image, "per_image": self.per_image,
                "architecture": self.architecture, "images_judged": self.images,
                **({"noise": self.noise} if self.noise is not None else {}),
                **({"golden": self.golden} if self.golden is not None else {})}


def report_from_comparison(comparison: Comparison, artifact: Path | str, reference: str, precision: str, runner, device: str,
                           data: str, reference_seconds: float, thresholds: Thresholds | None = None,
                           architecture: str | None = None) -> VerifyReport:
    """The verify report of one comparator verdict (a Comparison) for `artifact` run by `runner`."""
    consistency = comparison.consistency.to_json() if comparison.consistency is not None else None
    return VerifyReport(comparison.passed, comparison.failures, str(artifact), reference, precision, runner.backend, device,
                        data, comparison.summary, thresholds or thresholds_for(precision), reference_seconds,
                        comparison.seconds_per_image, architecture or getattr(runner.info, "architecture", ""),
                        comparison.per_image, comparison.shapes, consistency, comparison.failed_at())


def report_from_verdict(verdict: Verdict, artifact: Path | str, precision: str, runner, device: str,
                        reference_seconds: float, thresholds: Thresholds | None = None,
                        architecture: str | None = None) -> VerifyReport:
    """The verify report of a judge's Verdict (compare/judge.py): the real images' figures, the noise images'
    failures among the failures, what the verdict rests on."""
    report = report_from_comparison(verdict.real, artifact, verdict.reference, precision, runner, device,
                                    verdict.images["data"], reference_seconds, thresholds, architecture)
    report.passed, report.failures = verdict.passed, verdict.failures
    report.failed_at = verdict.failed_at()
    report.images, report.noise = verdict.images, verdict.to_json().get("noise")
    return report


def parity_lines(parity: dict | None) -> list[str]:
    """What `vitseg export` prints about an artifact's verdict: the worst case, what it rests on, the shapes."""
    if not parity:
        return []
    line = f"self-parity vs {parity.get('reference', 'PyTorch')} on {parity['images']} images"
    if parity.get("pixels"):
        line += f" ({parity['pixels']:,} pixels)"
    line += f": agreement {parity['pixel_agreement'] * 100:.4f}%"
    if parity.get("miou_vs_reference") is not None:
        line += f", mIoU vs reference {parity['miou_vs_reference'] * 100:.2f}"
    if parity["max_abs_logit_diff"] is not None:
        line += f", max |logit diff| {parity['max_abs_logit_diff']:.2e}"
    shapes = ", ".join(f"{s['batch']}x{s['height']}x{s['width']}" for s in parity.get("shapes", []))
    consistency = parity.get("batch_consistency") or {}
    if shapes:
        line += f" (worst of shapes {shapes}"
        line += f"; batch consistency {'pass' if consistency.get('passed') else 'FAILED'})" if consistency.get("images_compared") else ")"
    return [line]


def write_report(report: VerifyReport, path: Path) -> None:
    """Write the report's JSON form atomically."""
    write_json(path, report.to_json())
