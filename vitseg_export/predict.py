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

from vitseg_export.artifact import colorize, is_artifact, load_rgb, pixels_from_image
from vitseg_export.files import atomic_write_bytes
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


def predict_images(model: str, images: list[Path], output: Path, overlay: bool = False, device: str = "cpu",
                   progress: Callable[[int, int], None] | None = None) -> list[Prediction]:
    """Write `<stem>_mask.png` (class indices at the image's own resolution) and, with overlay,
    `<stem>_overlay.png` (colours blended onto the image) for each image."""
    runner = runner_for(model, device=device, outputs=("mask",))
    results = []
    with runner:
        size = tuple(runner.input_size)
        names = runner.class_names
        for i, path in enumerate(images):
            image = load_rgb(path)
            out = runner.infer({"pixels": pixels_from_image(image, size)[None]})
            mask = mask_of(out)[0].astype(np.uint8)
            # Back to the image's own resolution; nearest keeps class indices intact.
            full = np.asarray(Image.fromarray(mask).resize(image.size, Image.NEAREST))
            mask_path = output / f"{path.stem}_mask.png"
            atomic_write_bytes(mask_path, _png_bytes(full))
            overlay_path = None
            if overlay:
                blend = (0.55 * np.asarray(image, np.float32) + 0.45 * colorize(full)).round().astype(np.uint8)
                overlay_path = output / f"{path.stem}_overlay.png"
                atomic_write_bytes(overlay_path, _png_bytes(blend))
            counts = np.bincount(full.ravel(), minlength=len(names))
            results.append(Prediction(path, mask_path, overlay_path,
                                      {names[c] if c < len(names) else str(c): int(n) for c, n in enumerate(counts)}))
            if progress:
                progress(i + 1, len(images))
    return results


__all__ = ["Prediction", "is_artifact", "predict_images"]
