"""runner outputs -> comparator -> report: does an artifact's mask match the PyTorch fp32 reference?

Both sides see the same real inputs (dataset images; default the synthetic validation split),
preprocessed once by `pixels_from_image`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from vitseg_export.artifact import colorize, pixels_from_image, read_artifact_info
from vitseg_export.files import atomic_write_bytes
from vitseg_export.errors import VitsegError
from vitseg_export.parity import ParityAccumulator, Thresholds, judge, thresholds_dict, thresholds_for
from vitseg_export.runners import runner_for


@dataclass
class VerifyResult:
    passed: bool
    failures: list[str]
    report: dict


def verify_artifact(
    artifact: Path,
    reference: str,
    data: str = "synthetic",
    num_images: int = 16,
    device: str = "cpu",
    thresholds: Thresholds | None = None,
    save_diff: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyResult:
    from vitseg_export.checkpoint import load_checkpoint
    from vitseg_export.data.sources import open_source

    info = read_artifact_info(artifact)
    loaded = load_checkpoint(reference)
    if loaded.sha256 and info.source_sha256 and loaded.sha256 != info.source_sha256:
        raise VitsegError(f"{artifact.name} was exported from another checkpoint (sha256 {info.source_sha256[:12]}…, "
                          f"reference {loaded.sha256[:12]}…)", "pass the checkpoint the artifact was exported from")
    if len(loaded.meta.class_names) != len(info.class_names):
        raise VitsegError(f"the artifact predicts {len(info.class_names)} classes, the reference {len(loaded.meta.class_names)}",
                          "pass the checkpoint the artifact was exported from")
    thresholds = thresholds or thresholds_for(info.precision)
    source = open_source(data, "val")
    count = min(num_images, len(source))
    if count == 0:
        raise VitsegError(f"{data} has no images to verify on", "pass --data with images")
    size = tuple(info.input_size)
    acc = ParityAccumulator(len(info.class_names))
    reference_runner = runner_for(loaded, device=device, backend="torch")
    artifact_runner = runner_for(artifact, device=device)
    if save_diff:
        save_diff.mkdir(parents=True, exist_ok=True)
    ref_seconds = art_seconds = 0.0
    with reference_runner, artifact_runner:
        for i in range(count):
            sample = source[i]
            pixels = pixels_from_image(sample.image, size)[None]
            t0 = time.perf_counter()
            ref_logits = reference_runner.infer({"pixels": pixels})["logits"][0]
            t1 = time.perf_counter()
            out = artifact_runner.infer({"pixels": pixels})
            art_seconds += time.perf_counter() - t1
            ref_seconds += t1 - t0
            art_logits = out["logits"][0] if "logits" in out else None
            art_mask = out["mask"][0] if "mask" in out else art_logits.argmax(0)
            label = None
            if sample.mask is not None:
                label = np.asarray(Image.fromarray(sample.mask).resize((size[1], size[0]), Image.NEAREST))
            acc.add(sample.name, ref_logits, art_mask, art_logits, label)
            if save_diff:
                _save_diff_png(save_diff / f"{i:03d}_{sample.name}.png", pixels[0], ref_logits.argmax(0), art_mask)
            if progress:
                progress(i + 1, count)
    summary = acc.summary()
    failures = judge(summary, thresholds)
    report = {
        "passed": not failures,
        "failures": failures,
        "artifact": str(artifact),
        "reference": reference,
        "precision": info.precision,
        "backend": artifact_runner.backend,
        "device": device,
        "data": data,
        **summary,
        "thresholds": thresholds_dict(thresholds),
        "reference_seconds_per_image": ref_seconds / count,
        "artifact_seconds_per_image": art_seconds / count,
        "per_image": acc.per_image,
        "architecture": info.architecture,
    }
    return VerifyResult(not failures, failures, report)


def _save_diff_png(path: Path, pixels: np.ndarray, ref_mask: np.ndarray, art_mask: np.ndarray) -> None:
    """input | reference mask | artifact mask | disagreement (white)."""
    image = (pixels.transpose(1, 2, 0) * 255).round().astype(np.uint8)
    disagree = np.repeat(((ref_mask != art_mask) * 255).astype(np.uint8)[..., None], 3, axis=2)
    panel = np.concatenate([image, colorize(ref_mask), colorize(art_mask), disagree], axis=1)
    import io

    buf = io.BytesIO()
    Image.fromarray(panel).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_report(report: dict, path: Path) -> None:
    atomic_write_bytes(path, (json.dumps(report, indent=2) + "\n").encode())
