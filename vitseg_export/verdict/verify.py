"""runner outputs -> comparator -> report: does an artifact's mask match the PyTorch fp32 reference?

Both sides see the same real inputs (dataset images; default the synthetic validation split),
preprocessed once by `pixels_from_image`, through the one comparator loop.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from vitseg_export.artifact import ArtifactInfo
from vitseg_export.checkpoint import load_checkpoint
from vitseg_export.compare.golden import golden_header, logits_dtype, record_golden, write_golden
from vitseg_export.compare.judge import ReferenceOutputs, VerdictImages, check_ran, verdict_of
from vitseg_export.compare.report import VerifyReport, report_from_verdict
from vitseg_export.errors import VitsegError
from vitseg_export.files import atomic_write_bytes, sha256_file
from vitseg_export.formats import read_artifact_info
from vitseg_export.images import colorize
from vitseg_export.precisions import Thresholds, get_precision, thresholds_for
from vitseg_export.progress import Progress, silent
from vitseg_export.runners import runner_for


def check_reference(info: ArtifactInfo, loaded) -> None:
    """Refuse a reference checkpoint the artifact was not exported from (VitsegError)."""
    if loaded.sha256 and info.source_sha256 and loaded.sha256 != info.source_sha256:
        raise VitsegError(f"{info.path.name} was exported from another checkpoint (sha256 {info.source_sha256[:12]}…, "
                          f"reference {loaded.sha256[:12]}…)", "pass the checkpoint the artifact was exported from")
    if len(loaded.meta.class_names) != len(info.class_names):
        raise VitsegError(f"the artifact predicts {len(info.class_names)} classes, the reference {len(loaded.meta.class_names)}",
                          "pass the checkpoint the artifact was exported from")


def verify_artifact(
    artifact: Path,
    reference: str,
    data: str = "synthetic",
    num_images: int = 16,
    device: str = "cpu",
    thresholds: Thresholds | None = None,
    save_diff: Path | None = None,
    progress: Progress = silent,
    backend: str | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    sizes: list[tuple[int, int]] | None = None,
    revision: str | None = None,
    save_golden: Path | None = None,
) -> VerifyReport:
    """Compare `artifact` (run by its format's backend, or `backend`) with the PyTorch reference checkpoint
    on `num_images` images of `data`, at every shape the artifact declares (ArtifactInfo.declared_shapes:
    `batch_sizes` and `sizes` choose them for dynamic artifacts), with batch consistency. Returns the report
    (passed or not); raises VitsegError for a mismatched reference, a data spec without images, a shape the
    artifact does not accept or a backend that cannot run here. `save_golden`: also write a golden file of the
    images (8-bit) and the reference's outputs at those shapes (compare/golden.py), verified anywhere without torch."""
    info = read_artifact_info(artifact)
    shapes = info.declared_shapes(batch_sizes, sizes)
    candidate = runner_for(artifact, device=device, backend=backend)
    return judge_candidate(info, candidate, artifact, shapes, reference, data, num_images, device, thresholds, save_diff,
                           progress, revision, save_golden)


def verify_server(url: str, model: str, reference: str, data: str = "synthetic", num_images: int = 16,
                  concurrency: tuple[int, ...] = (8,), device: str = "cpu", overrides: dict | None = None,
                  save_diff: Path | None = None, progress: Progress = silent,
                  revision: str | None = None) -> VerifyReport:
    """The verdict on what clients of a served model receive: every image sent alone, and among each level of
    `concurrency` concurrent requests (which the server's dynamic batcher batches), against the PyTorch reference on `device`,
    with batch consistency, judged by the served precision's preset (`overrides`: single limits, as
    thresholds_for takes them). The report's `shapes` are the batches the server was sent. Raises VitsegError
    when the endpoint cannot be reached or was not written by vitseg."""
    candidate = runner_for(url, device="server", backend="triton", model_name=model, concurrency=max(concurrency)).activate()
    try:
        info = candidate.info
        shapes = {tuple(info.image_size): tuple(sorted({1, *concurrency}))}
        thresholds = thresholds_for(info.precision, **(overrides or {}))
        return judge_candidate(info, candidate, str(candidate.endpoint), shapes, reference, data, num_images, device,
                               thresholds, save_diff, progress, revision)
    finally:
        candidate.deactivate()


def judge_candidate(info: ArtifactInfo, candidate, artifact: Path | str, shapes: dict, reference: str, data: str,
                    num_images: int, device: str, thresholds: Thresholds | None, save_diff: Path | None,
                    progress: Progress, revision: str | None = None, save_golden: Path | None = None) -> VerifyReport:
    """One candidate (an artifact's runner, or a served model's) against the PyTorch reference at `shapes`, through
    the one judge (compare/judge.py): what both verify commands and assert_mask_parity share."""
    loaded = load_checkpoint(reference, revision=revision)
    check_reference(info, loaded)
    thresholds = thresholds or thresholds_for(info.precision)
    images = VerdictImages.load(data, num_images, tuple(info.image_size), eight_bit=save_golden is not None)
    total = sum(len(batches) and len(images.real) for batches in shapes.values())
    seen = [0]

    def on_image(image, ref_logits, masks) -> None:
        if save_diff and "candidate" in masks:
            _save_diff_png(save_diff / f"{seen[0]:03d}_{image.name}.png", image.pixels, ref_logits.argmax(0), masks["candidate"])
        seen[0] += 1
        if progress:
            progress("verify", seen[0], total)

    with ReferenceOutputs(runner_for(loaded, device=device, backend="torch"), str(reference)) as reference_runner:
        verdict = verdict_of(reference_runner, candidate, images, shapes, thresholds, len(info.class_names),
                             consistency=get_precision(info.precision).consistency(thresholds), on_image=on_image)
        check_ran(verdict, artifact.name if isinstance(artifact, Path) else artifact)
        if save_golden is not None:
            header = golden_header(info, Path(artifact).name, sha256_file(artifact), loaded.source, loaded.sha256,
                                   thresholds)
            write_golden(save_golden, *record_golden(images, reference_runner, shapes, header,
                                                     logits_dtype(thresholds.max_abs_logit_diff)))
    return report_from_verdict(verdict, artifact, info.precision, candidate, candidate.device,
                               reference_runner.seconds_per_image(), thresholds, info.architecture)


def _save_diff_png(path: Path, pixels: np.ndarray, ref_mask: np.ndarray, art_mask: np.ndarray) -> None:
    """input | reference mask | artifact mask | disagreement (white)."""
    image = (pixels.transpose(1, 2, 0) * 255).round().astype(np.uint8)
    disagree = np.repeat(((ref_mask != art_mask) * 255).astype(np.uint8)[..., None], 3, axis=2)
    panel = np.concatenate([image, colorize(ref_mask), colorize(art_mask), disagree], axis=1)
    buf = io.BytesIO()
    Image.fromarray(panel).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
