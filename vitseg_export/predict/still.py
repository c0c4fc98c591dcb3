"""Masks for images from an artifact or a checkpoint.

With an ONNX artifact this runs from the artifact's metadata alone and never imports torch: it is the
edge path for devices with only numpy, Pillow and onnxruntime.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from vitseg_export.files import atomic_write_group, signals_deferred
from vitseg_export.formats import is_artifact
from vitseg_export.images import colorize, image_size, load_rgb, pixels_from_image
from vitseg_export.runners import runner_for
from vitseg_export.runners.base import mask_of


@dataclass
class Prediction:
    image: Path
    mask_path: Path
    overlay_path: Path | None
    class_pixels: dict[str, int]


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def output_stems(images: list[Path]) -> list[str]:
    """One output name per input: its stem, or, where stems repeat (a/x.jpg, b/x.png), the stem with the
    parent folder's name and a counter if needed, so no input's mask overwrites another's."""
    counts: dict[str, int] = {}
    for path in images:
        counts[path.stem] = counts.get(path.stem, 0) + 1
    stems, used = [], set()
    for path in images:
        stem = path.stem if counts[path.stem] == 1 else f"{path.parent.name or 'root'}_{path.stem}"
        base, k = stem, 2
        while stem in used:
            stem, k = f"{base}-{k}", k + 1
        used.add(stem)
        stems.append(stem)
    return stems


def predict_images(model: str, images: list[Path], output: Path, overlay: bool = False, device: str = "cpu",
                   progress: Callable[["Prediction", int, int], None] | None = None, backend: str | None = None,
                   max_pixels: int | None = None) -> list[Prediction]:
    """Write `<stem>_mask.png` (class indices at the image's own resolution) and, with overlay,
    `<stem>_overlay.png` (colours blended onto the image) for each image (`output_stems` names them).
    `max_pixels` overrides the image size limit (0: none). Every image is checked (readable, an image, within
    the limit) before the model is loaded; raises VitsegError for the first that is not. `progress(prediction,
    done, total)` hears of each image once its files are written."""
    for path in images:
        image_size(path, max_pixels)
    runner = runner_for(model, device=device, backend=backend, outputs=("mask",))
    results = []
    with runner:
        size = tuple(runner.input_size)
        names = runner.class_names
        for i, (path, stem) in enumerate(zip(images, output_stems(images))):
            image = load_rgb(path, max_pixels)
            out = runner.infer({"pixels": pixels_from_image(image, size)[None]})
            mask = mask_of(out)[0].astype(np.uint8)
            # Back to the image's own resolution; nearest keeps class indices intact.
            full = np.asarray(Image.fromarray(mask).resize(image.size, Image.NEAREST))
            mask_path = output / f"{stem}_mask.png"
            files = {mask_path: _png_bytes(full)}
            overlay_path = output / f"{stem}_overlay.png" if overlay else None
            if overlay_path is not None:
                blend = (0.55 * np.asarray(image, np.float32) + 0.45 * colorize(full)).round().astype(np.uint8)
                files[overlay_path] = _png_bytes(blend)
            counts = np.bincount(full.ravel(), minlength=len(names))
            result = Prediction(path, mask_path, overlay_path,
                                {names[c] if c < len(names) else str(c): int(n) for c, n in enumerate(counts)})
            with signals_deferred():  # an image's files and its report land together: an interruption names them
                atomic_write_group(files)  # an image's mask and overlay land together
                results.append(result)
                if progress:
                    progress(result, i + 1, len(images))
    return results


__all__ = ["Prediction", "is_artifact", "predict_images"]
