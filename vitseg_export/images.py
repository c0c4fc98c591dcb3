"""Images as every backend sees them: decoding (EXIF orientation, bit depths, a size limit checked on the
header before decoding), the one preprocessing (resize + x / 255) shared by training, export, verify and
predict, and the class-colour palette. Torch-free: the edge path (`vitseg predict`) uses it as is."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from vitseg_export.errors import VitsegError
from vitseg_export.files import check_readable_file

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # refuse larger images unless allowed: decoding them takes GBs


def max_image_pixels() -> int:
    """The image size limit in pixels: VITSEG_MAX_IMAGE_PIXELS (0: none), else 64 MP. VitsegError for a value
    that is not a whole number >= 0 (never silently the default)."""
    value = os.environ.get("VITSEG_MAX_IMAGE_PIXELS")
    if value is None:
        return DEFAULT_MAX_IMAGE_PIXELS
    if not re.fullmatch(r"[0-9]+", value.strip()):
        raise VitsegError(f"VITSEG_MAX_IMAGE_PIXELS={value!r} is not a whole number of pixels >= 0",
                          "set it to e.g. 100000000 (0: no limit), or unset it for the 64 MP default")
    return int(value)


def _as_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB that keeps the image's range: 16-bit grey scales by 1/257 (not saturated, as
    convert("RGB") does), 32-bit integer grey by its bit depth, float grey from [0, 1] (or 0..255 when its
    values exceed 1). Everything else through PIL's own conversion (16-bit RGB included)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 1.0
        grey = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    return image.convert("RGB")


@contextmanager
def _opened_image(path: Path, max_pixels: int | None) -> Iterator[Image.Image]:
    """The image file opened (header read, nothing decoded) once it passed the size limit; every failure, in
    the block's decoding too, becomes a one-line VitsegError. vitseg's own limit (checked on the header,
    before any decoding) replaces PIL's decompression-bomb limit, so --allow-large-images really allows."""
    limit = max_image_pixels() if max_pixels is None else max_pixels
    check_readable_file(path, "image", directory_hint="pass image files, e.g. DIR/*.jpg")
    pil_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # process-wide in PIL: restored below
    try:
        with Image.open(path) as im:
            if limit and im.width * im.height > limit:
                raise VitsegError(f"image {path} is {im.width}x{im.height} ({im.width * im.height:,} pixels), over "
                                  f"the {limit:,}-pixel limit", "downscale it, or allow it with --allow-large-images "
                                  "(VITSEG_MAX_IMAGE_PIXELS=0)")
            yield im
    except FileNotFoundError:
        raise VitsegError(f"image {path} does not exist", "check the path") from None
    except PermissionError:
        raise VitsegError(f"image {path} cannot be read (permission denied)", "fix the file's permissions") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise VitsegError(f"{path} is not an image vitseg can read ({e})", "pass JPEG, PNG, BMP, WebP or TIFF images") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


def image_size(path: str | Path, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) of an image file as displayed (EXIF orientation applied), from its header alone: checks
    a file is a readable image within the size limit before any heavy work. Raises VitsegError (one line)."""
    with _opened_image(Path(path), max_pixels) as im:
        if im.format == "PNG" and "exif" not in im.info:  # PIL would decode the pixels to look for a late eXIf chunk
            return im.size
        orientation = im.getexif().get(0x0112, 1)
        return (im.height, im.width) if orientation in (5, 6, 7, 8) else im.size  # 5-8: rotated by 90 degrees


def load_rgb(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """An image file as 8-bit RGB, as displayed (EXIF orientation applied), its bit depth respected.
    Images over `max_pixels` (default: max_image_pixels(); 0: no limit) are refused before decoding. Raises
    VitsegError (one line) for missing, unreadable, oversized or non-image files."""
    with _opened_image(Path(path), max_pixels) as im:
        return _as_rgb(ImageOps.exif_transpose(im))


def pixels_from_image(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """RGB PIL image -> float32 (3, H, W) in [0, 1]: bilinear resize (PIL, antialiased) then x / 255.
    The training pipeline resizes PIL images with the same call, so train and deploy see the same pixels."""
    h, w = size
    if image.size != (w, h):
        image = image.resize((w, h), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0)


PALETTE = np.array([[220, 60, 60], [40, 40, 40], [250, 220, 40], [60, 140, 240], [80, 200, 120], [200, 90, 220],
                    [240, 150, 60], [60, 220, 220]], dtype=np.uint8)


def colorize(mask: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours (palette repeats after 8 classes)."""
    return PALETTE[mask.astype(np.int64) % len(PALETTE)]
