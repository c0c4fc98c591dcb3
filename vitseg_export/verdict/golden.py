"""artifact + golden file -> verdict, without PyTorch or the checkpoint: `vitseg verify ARTIFACT --golden FILE` on the
device the artifact ships to (numpy, Pillow and its runtime only). The judge, the presets, the shapes, batch
consistency and the report are verify's own (compare/judge.py); the reference is the golden file's recording."""

from __future__ import annotations

from pathlib import Path

from vitseg_export.compare.golden import check_golden_belongs, read_golden
from vitseg_export.compare.judge import check_ran, verdict_of
from vitseg_export.compare.report import VerifyReport, report_from_verdict
from vitseg_export.files import sha256_file
from vitseg_export.formats import read_artifact_info
from vitseg_export.precisions import Thresholds, get_precision, thresholds_for
from vitseg_export.progress import Progress, silent
from vitseg_export.runners import runner_for


def verify_with_golden(artifact: Path, golden: Path, device: str = "cpu", thresholds: Thresholds | None = None,
                       backend: str | None = None, batch_sizes: tuple[int, ...] | None = None,
                       progress: Progress = silent) -> VerifyReport:
    """Judge `artifact` against the reference recorded in `golden` at every shape the golden file holds (or those of
    `batch_sizes` among them), by the artifact's precision's preset (`thresholds` overrides). VitsegError (exit 2)
    for a golden file that was edited or does not belong to the artifact, or shapes the artifact does not take."""
    info = read_artifact_info(artifact)
    recorded = read_golden(golden)
    thresholds = thresholds or thresholds_for(info.precision)
    check_golden_belongs(recorded, info, thresholds.max_abs_logit_diff, golden)
    shapes = recorded.shapes()
    if batch_sizes is not None:
        shapes = {size: tuple(b for b in batches if b in batch_sizes) or batches[:1] for size, batches in shapes.items()}
    info.declared_shapes(tuple(sorted({b for batches in shapes.values() for b in batches})),
                         [s for s in shapes if s != tuple(info.image_size)] or None)  # a shape it does not take: one line
    images = recorded.images()
    progress(f"judging {artifact.name} against {golden.name} on {len(images.real)} images at "
             + ", ".join(f"batch {'/'.join(map(str, b))} {s[0]}x{s[1]}" for s, b in shapes.items()))
    candidate = runner_for(artifact, device=device, backend=backend)
    with recorded.reference() as reference:
        verdict = verdict_of(reference, candidate, images, shapes, thresholds, len(info.class_names),
                             consistency=get_precision(info.precision).consistency(thresholds))
    check_ran(verdict, artifact.name)
    report = report_from_verdict(verdict, artifact, info.precision, candidate, candidate.device, 0.0, thresholds,
                                 info.architecture)
    report.golden = {"file": str(golden), "artifact_sha256_matches": recorded.header["artifact"]["sha256"] == sha256_file(artifact),
                     "made_for": recorded.header["artifact"]["name"], "vitseg_version": recorded.header["vitseg_version"]}
    return report
