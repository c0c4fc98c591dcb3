"""Data sources behind one spec string: `synthetic[:N]`, `pets:DIR`, `folder:DIR`.

A source yields (RGB PIL image, uint8 class-index mask or None, name). This module needs only numpy
and Pillow (no torch), so calibration and the edge path can read the same data.

Class indices follow Oxford-IIIT Pet's trimap: 0 pet, 1 background, 2 border; 255 is ignored.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from vitseg_export.data.synthetic import render_synthetic_pet
from vitseg_export.errors import DataError, VitsegError
from vitseg_export.files import check_readable_file
from vitseg_export.images import image_size, load_rgb

IGNORE_INDEX = 255
PET_CLASSES = ("pet", "background", "border")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val", "calib")


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    mask: np.ndarray | None  # (H, W) uint8 class indices, IGNORE_INDEX where unlabelled
    name: str


class Source:
    class_names: tuple[str, ...] = PET_CLASSES
    description: str = ""
    max_label: int | None = len(PET_CLASSES) - 1  # the largest class value in its masks; None: no masks

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def fingerprint(self) -> str:
        """A hash of the sample list, for provenance records."""
        h = hashlib.sha256(self.description.encode())
        for i in range(len(self)):
            h.update(self.name_of(i).encode())
        return h.hexdigest()[:16]

    def name_of(self, index: int) -> str:
        return self[index].name


# ---- synthetic --------------------------------------------------------------------------------

class SyntheticPets(Source):
    """Procedural stand-in for Oxford-IIIT Pet trimaps: textured backgrounds, a pet-like foreground
    (body, head and ears of varied shape, colour and fur pattern) and a border band around it.

    Deterministic: sample i of a split is a pure function of (seed, split, i). Splits draw from
    disjoint seed streams, so train, validation and calibration images never coincide.
    """

    NATIVE_SIZE = 192
    BORDER_PX = 3  # half-width of the trimap's border band at native size

    def __init__(self, count: int, split: str, seed: int = 0):
        self.count = count
        self.split = split
        self.seed = seed
        self.description = f"synthetic[:{count}] split={split} seed={seed}"

    def __len__(self) -> int:
        return self.count

    def name_of(self, index: int) -> str:
        return f"synthetic_{self.split}_{index:05d}"

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.count:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        image, mask = render_synthetic_pet(rng, self.NATIVE_SIZE, self.BORDER_PX)
        return Sample(Image.fromarray(image), mask, self.name_of(index))


# ---- Oxford-IIIT Pet ----------------------------------------------------------------------------

class OxfordPets(Source):
    """The Oxford-IIIT Pet dataset in its official layout: images/*.jpg, annotations/trimaps/*.png,
    annotations/trainval.txt and test.txt. Trimap values 1/2/3 (pet/background/border) -> 0/1/2.
    Splits train and calib read trainval.txt, val reads test.txt (so held-out images are never calibration
    images). Never downloads."""

    def __init__(self, root: Path, split: str):
        self.root = root
        list_file = root / "annotations" / ("test.txt" if split == "val" else "trainval.txt")
        for needed in (root / "images", root / "annotations" / "trimaps", list_file):
            if not needed.exists():
                raise DataError(f"pets:{root}: {needed} is missing",
                                "point at the extracted Oxford-IIIT Pet root (images/ and annotations/)")
        self.names = [line.split()[0] for line in _text(list_file).splitlines()
                      if line.strip() and not line.startswith("#")]
        if not self.names:
            raise DataError(f"{list_file} lists no images", "the dataset copy is incomplete")
        for folder, suffix in ((root / "images", ".jpg"), (root / "annotations" / "trimaps", ".png")):
            present = {p.name for p in folder.iterdir()}
            missing = [name for name in self.names if f"{name}{suffix}" not in present]
            if missing:
                raise DataError(f"pets:{root}: {folder / (missing[0] + suffix)} is missing"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                                f"the dataset copy is incomplete; every image in {list_file.name} needs its image and trimap")
        self.description = f"pets:{root} split={split}"

    def __len__(self) -> int:
        return len(self.names)

    def name_of(self, index: int) -> str:
        return self.names[index]

    def __getitem__(self, index: int) -> Sample:
        name = self.names[index]
        image = _open_image(self.root / "images" / f"{name}.jpg")
        trimap = _read_mask(self.root / "annotations" / "trimaps" / f"{name}.png", image.size, f"{name}.jpg")
        mask = np.full(trimap.shape, IGNORE_INDEX, np.uint8)
        for value, cls in ((1, 0), (2, 1), (3, 2)):
            mask[trimap == value] = cls
        return Sample(image, mask, name)


# ---- the user's own folder ----------------------------------------------------------------------

class ImageMaskFolder(Source):
    """`DIR/images/*` + `DIR/masks/<stem>.png` (class indices; 255 ignored), optional `DIR/classes.txt`.
    Without masks/ the images are unlabelled (fine for calibration and prediction). Every 10th image
    (sorted by name) is the validation split; the others are the train and calib splits (so held-out images
    are never calibration images). Fewer than 10 images: every split is all of them.

    Images and masks are checked when the source is opened, before any work: every image readable and within
    the size limit (from its header); one mask per image, the image's size, one channel, values below the
    class count or 255; and a validation split with labelled pixels."""

    def __init__(self, root: Path, split: str):
        images = root / "images"
        if not images.is_dir():
            raise DataError(f"folder:{root}: {images} is missing", "put images in DIR/images and masks in DIR/masks")
        files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"folder:{root}: no images in {images}", f"supported: {', '.join(IMAGE_SUFFIXES)}")
        if len(files) >= 10:
            files = [f for i, f in enumerate(files) if (i % 10 == 9) == (split == "val")]
        self.files = files
        if (root / "masks").exists() and not (root / "masks").is_dir():
            raise DataError(f"folder:{root}: {root / 'masks'} is a file, not a folder of masks",
                            "put one mask per image in DIR/masks/<stem>.png, or remove it for unlabelled images")
        self.masks = root / "masks" if (root / "masks").is_dir() else None
        classes = root / "classes.txt"
        if classes.exists():  # a directory or FIFO of that name is refused (_text), not ignored
            self.class_names = tuple(c.strip() for c in _text(classes).splitlines() if c.strip())
        self.description = f"folder:{root} split={split}"
        sizes = [_image_size(path) for path in files]
        self.max_label = None
        if self.masks is not None:
            counts = [self._check_mask(path, size) for path, size in zip(files, sizes)]
            self.max_label = max((top for _, top in counts), default=-1)
            if split == "val" and sum(n for n, _ in counts) == 0:
                raise DataError(f"folder:{root}: the validation masks have no labelled pixels (all 255)",
                                "label some pixels of every 10th image, or train on other data")

    def _check_mask(self, path: Path, size: tuple[int, int]) -> tuple[int, int]:
        """Validate the mask of `path` (an image of `size` as displayed; DataError naming the mask); returns
        its number of labelled pixels and its largest class value (-1: none)."""
        assert self.masks is not None
        mpath = self.masks / f"{path.stem}.png"
        if not mpath.exists():
            raise DataError(f"{mpath} is missing for {path.name}", "every image needs a mask with the same stem")
        mask = _read_mask(mpath, size, path.name)
        bad = np.unique(mask[(mask >= len(self.class_names)) & (mask != IGNORE_INDEX)])
        if bad.size:
            raise DataError(f"{mpath} has class values {bad[:5].tolist()} but there are {len(self.class_names)} classes",
                            "values must be 0..classes-1 or 255 (ignored); fix the mask or classes.txt")
        labelled = mask[mask != IGNORE_INDEX].astype(np.int64)
        return int(labelled.size), int(labelled.max(initial=-1))

    def __len__(self) -> int:
        return len(self.files)

    def name_of(self, index: int) -> str:
        return self.files[index].stem

    def __getitem__(self, index: int) -> Sample:
        path = self.files[index]
        mask = None
        if self.masks is not None:  # validated when the source was opened
            mask = _read_mask(self.masks / f"{path.stem}.png", None, path.name).astype(np.uint8)
        return Sample(_open_image(path), mask, path.stem)


def _text(path: Path) -> str:
    """A text file of a data set (a class list, a split list), or DataError when it is not UTF-8 text."""
    check_readable_file(path, "data file", DataError)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text", "save it as UTF-8, one name per line") from None


def _as_data_error(read: Callable[[Path], Any], path: Path) -> Any:
    """`read(path)`, its VitsegError re-raised as a DataError (same message and hint)."""
    try:
        return read(path)
    except VitsegError as e:
        raise DataError(e.message, e.hint) from None


def _open_image(path: Path) -> Image.Image:
    return _as_data_error(load_rgb, path)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, from the header alone; DataError for an unreadable or oversized image."""
    return _as_data_error(image_size, path)


def _read_mask(path: Path, size: tuple[int, int] | None, image_name: str) -> np.ndarray:
    """A class-index mask (H, W) that must be single-channel and, when `size` is given, of that (W, H) size:
    masks are never stretched to fit. DataError (one line) otherwise, the size checked before decoding."""
    check_readable_file(path, "mask", DataError)
    try:
        with Image.open(path) as m:  # PIL's decompression-bomb limit applies to masks
            if size is not None and m.size != tuple(size):
                raise DataError(f"{path} is {m.width}x{m.height} but {image_name} is {size[0]}x{size[1]}",
                                "masks must have their image's size (vitseg does not stretch them)")
            mask = np.asarray(m)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path} cannot be read as a mask ({e})", "re-save it as a single-channel PNG") from None
    if mask.ndim != 2:
        raise DataError(f"{path} is not a single-channel class-index PNG", "save masks as mode 'L' or 'P'")
    return mask


def check_labels_fit(source: Source, spec: str, num_classes: int) -> None:
    """Before comparing a model's masks with `source`'s labels: DataError (one line) when the labels hold class
    values the model cannot predict (its confusion matrix has no row for them)."""
    if source.max_label is not None and source.max_label >= num_classes:
        raise DataError(f"{spec}: its masks have class values up to {source.max_label} but the model predicts "
                        f"{num_classes} classes", "pass --data labelled with the model's classes")


# ---- the spec string ----------------------------------------------------------------------------

DEFAULT_SYNTHETIC = {"train": 1000, "val": 64, "calib": 64}
MAX_SYNTHETIC = 1_000_000  # images of one split: beyond, an epoch is days long and an index overflows
_SYNTHETIC = re.compile(r"^synthetic(?:\[:(\d+)\])?$")


def data_folder(spec: str) -> Path | None:
    """The directory a `pets:DIR` or `folder:DIR` spec reads, or None (synthetic data)."""
    kind, sep, rest = spec.partition(":")
    return Path(rest).expanduser() if sep and kind in ("pets", "folder") else None


def open_source(spec: str, split: str = "train", seed: int = 0) -> Source:
    """`synthetic[:N]` (N images of that split; default 1000 train / 64 val / 64 calib), `pets:DIR`, `folder:DIR`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    m = _SYNTHETIC.match(spec)
    if m:
        n = int(m.group(1)) if m.group(1) else DEFAULT_SYNTHETIC[split]
        if not 1 <= n <= MAX_SYNTHETIC:
            raise DataError(f"'{spec}' asks for {n:,} images", f"use synthetic[:N] with N in 1..{MAX_SYNTHETIC:,}")
        return SyntheticPets(n, split, seed)
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("pets", "folder"):
        root = Path(rest).expanduser()
        if not root.is_dir():
            raise DataError(f"{kind}:{root}: directory does not exist", "check the path")
        return OxfordPets(root, split) if kind == "pets" else ImageMaskFolder(root, split)
    raise DataError(f"unknown data spec '{spec}'", "use synthetic[:N], pets:DIR or folder:DIR")
