"""The images a comparison runs: loaded from a data spec or drawn as noise, preprocessed once as every backend
sees them (`pixels_from_image`), at every shape (batch size x input size) a candidate is judged at."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from PIL import Image

from vitseg_export.data.sources import open_source
from vitseg_export.errors import DataError
from vitseg_export.images import pixels_from_image

Size = tuple[int, int]


@dataclass(frozen=True)
class Shape:
    """One input shape a candidate is judged at."""

    batch: int
    height: int
    width: int

    def to_json(self) -> dict:
        """`batch`, `height`, `width`."""
        return {"batch": self.batch, "height": self.height, "width": self.width}

    def __str__(self) -> str:
        return f"batch {self.batch}, {self.height}x{self.width}"


@dataclass
class InputImage:
    name: str
    pixels: np.ndarray  # (3, H, W) float32 in [0, 1]
    label: np.ndarray | None = None  # (H, W) class indices at the same size, 255 ignored
    image: object = None  # the source PIL image, for pictures of the comparison (and other sizes)

    @property
    def size(self) -> Size:
        """(H, W) of the pixels."""
        return (int(self.pixels.shape[1]), int(self.pixels.shape[2]))

    def at_size(self, size: Size) -> "InputImage":
        """The same image preprocessed to another size, as every backend would see it there."""
        if size == self.size:
            return self
        if isinstance(self.image, Image.Image):
            pixels = pixels_from_image(self.image, size)
        else:  # noise and other arrays without a source image: bilinear per channel
            pixels = np.stack([np.asarray(Image.fromarray(c).resize((size[1], size[0]), Image.BILINEAR))
                               for c in self.pixels]).astype(np.float32)
        label = None
        if self.label is not None:
            label = np.asarray(Image.fromarray(self.label).resize((size[1], size[0]), Image.NEAREST))
        return InputImage(self.name, pixels, label, self.image)


@dataclass
class InputSet:
    """The inputs every runner of a comparison sees, where they came from (for provenance), and the batch
    sizes candidates run them at: `batch_sizes` for every input size, unless `size_batches` names that size."""

    source: str
    images: list[InputImage]
    batch_sizes: tuple[int, ...] = (1,)
    size_batches: dict[Size, tuple[int, ...]] = field(default_factory=dict)

    def sizes(self) -> list[Size]:
        """The input sizes present, in order of first appearance."""
        return list(dict.fromkeys(im.size for im in self.images))

    def batch_sizes_at(self, size: Size) -> tuple[int, ...]:
        """The batch sizes (ascending) candidates run the images of `size` at."""
        return tuple(sorted(set(self.size_batches.get(size, self.batch_sizes))))

    def shapes(self) -> list[Shape]:
        """Every shape the candidates are judged at."""
        return [Shape(b, *size) for size in self.sizes() for b in self.batch_sizes_at(size)]

    def at_shapes(self, shapes: Mapping[Size, tuple[int, ...]]) -> "InputSet":
        """These images at every size of `shapes` (the first size first), each size run at its batch sizes."""
        images = [im.at_size(size) for size in shapes for im in self.images]
        return InputSet(self.source, images, next(iter(shapes.values())), dict(shapes))

    def __add__(self, other: "InputSet") -> "InputSet":
        batches: dict[Size, tuple[int, ...]] = {}
        for part in (self, other):
            for size in part.sizes():
                batches[size] = tuple(sorted(set(batches.get(size, ())) | set(part.batch_sizes_at(size))))
        return InputSet(f"{self.source} + {other.source}", self.images + other.images,
                        tuple(sorted(set(self.batch_sizes) | set(other.batch_sizes))), batches)

    def __len__(self) -> int:
        return len(self.images)


def load_inputs(spec: str, split: str, count: int, size: Size, batch_sizes: tuple[int, ...] = (1,)) -> InputSet:
    """Up to `count` images of a data spec's split, preprocessed to `size` as every backend sees them, with
    labels (resized nearest) where the source has masks. Raises DataError for a spec without images."""
    source = open_source(spec, split)
    n = min(count, len(source))
    if n == 0:
        raise DataError(f"{spec} has no images for {split}", "pass a data spec with images")
    images = []
    for i in range(n):
        sample = source[i]
        label = None
        if sample.mask is not None:
            label = np.asarray(Image.fromarray(sample.mask).resize((size[1], size[0]), Image.NEAREST))
        images.append(InputImage(sample.name, pixels_from_image(sample.image, size), label, sample.image))
    return InputSet(source.description, images, batch_sizes)


def noise_inputs(size: Size, count: int, seed: int = 0, batch_sizes: tuple[int, ...] = (1,)) -> InputSet:
    """`count` images of uniform noise: catches graph differences that real images happen not to excite."""
    pixels = np.random.default_rng(seed).random((count, 3, *size), dtype=np.float32)
    return InputSet(f"uniform noise seed={seed}", [InputImage(f"noise_{i}", p) for i, p in enumerate(pixels)], batch_sizes)
