"""The procedural Pet-like images behind the `synthetic` data spec: a textured background, a pet-like
foreground (body, head, ears, sometimes a tail, a ragged fur edge) and its trimap (pet, background, border),
as a pure function of a random generator. Numpy and Pillow only."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random grid upsampled bicubically."""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(0, 3)
    if kind == 0:  # stripes
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(4, 20)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 6.3))
    elif kind == 1:  # blotches
        t = _smooth_noise(rng, size, int(rng.integers(4, 16)))
    else:  # checker-like tiles
        f = rng.uniform(3, 10)
        t = 0.5 + 0.25 * (np.sign(np.sin(2 * np.pi * f * xx)) * np.sign(np.sin(2 * np.pi * f * yy)) + 1) * 0.5
    return t.astype(np.float32)


def render_synthetic_pet(rng: np.random.Generator, size: int, border: int) -> tuple[np.ndarray, np.ndarray]:
    """One procedural pet: (RGB uint8 (size, size, 3), trimap uint8 (size, size): 0 pet, 1 background, 2 border)."""
    # Background: two colours mixed by a texture, plus shading and sensor noise.
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = _texture(rng, size)[..., None]
    shade = 0.7 + 0.6 * _smooth_noise(rng, size, 3)[..., None]
    background = (c1 * (1 - t) + c2 * t) * shade

    # Foreground: a body ellipse, a head, two ears; sizes and pose vary.
    fg = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(fg)
    cx, cy = rng.uniform(0.35, 0.65) * size, rng.uniform(0.45, 0.65) * size
    bw, bh = rng.uniform(0.2, 0.36) * size, rng.uniform(0.16, 0.3) * size
    draw.ellipse([cx - bw, cy - bh, cx + bw, cy + bh], fill=255)
    hr = rng.uniform(0.35, 0.6) * bh
    hx = cx + rng.choice([-1, 1]) * bw * rng.uniform(0.5, 0.9)
    hy = cy - bh * rng.uniform(0.6, 1.1)
    draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=255)
    for side in (-1, 1):
        ex = hx + side * hr * 0.6
        draw.polygon([(ex - hr * 0.4, hy - hr * 0.5), (ex + hr * 0.4, hy - hr * 0.5),
                      (ex + side * hr * 0.2, hy - hr * rng.uniform(1.3, 1.9))], fill=255)
    if rng.random() < 0.6:  # a tail
        tx = cx - np.sign(hx - cx) * bw
        draw.line([(tx, cy), (tx - np.sign(hx - cx) * bw * 0.6, cy - bh * rng.uniform(0.5, 1.5))],
                  fill=255, width=int(max(3, hr * 0.35)))
    # Ragged fur edge: perturb the outline, so the border is not a clean geometric curve.
    fg = fg.filter(ImageFilter.GaussianBlur(2.5))
    jitter = _smooth_noise(rng, size, 24) * 120 - 60
    fg_mask = (np.asarray(fg, dtype=np.float32) + jitter) > 128

    # Pet colours: a coat colour and a pattern colour, textured, with its own shading.
    coat, pattern = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pt = _texture(rng, size)[..., None] ** rng.uniform(1, 3)
    pet = (coat * (1 - pt) + pattern * pt) * (0.8 + 0.4 * _smooth_noise(rng, size, 5)[..., None])

    image = np.where(fg_mask[..., None], pet, background)
    image = image + rng.normal(0, rng.uniform(2, 10), image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)

    # Trimap: border band = dilation minus erosion of the foreground, as in Pet's annotations.
    m = Image.fromarray(fg_mask.astype(np.uint8) * 255)
    k = 2 * border + 1
    dilated = np.asarray(m.filter(ImageFilter.MaxFilter(k))) > 0
    eroded = np.asarray(m.filter(ImageFilter.MinFilter(k))) > 0
    mask = np.full((size, size), 1, np.uint8)  # background
    mask[eroded] = 0  # pet
    mask[dilated & ~eroded] = 2  # border
    return image, mask
