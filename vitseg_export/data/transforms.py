"""Joint image/mask transforms (torchvision.transforms.v2) and the torch Dataset over a Source.

Images stay PIL through the resize, so training resizes exactly as deployment does
(`vitseg_export.artifact.pixels_from_image`: PIL bilinear, then x / 255 -> float32 in [0, 1]).
Normalization is inside the model (`Segmenter`) and the exported graphs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from vitseg_export.data.sources import IGNORE_INDEX, Source


def segmentation_transform(size: tuple[int, int], train: bool) -> v2.Compose:
    """Joint image/mask transform: resize (masks nearest), and for training flips and colour jitter."""
    steps: list = [v2.Resize(size, antialias=True)]  # masks are resized nearest by tv_tensors.Mask
    if train:  # as in the seed article: horizontal flips and colour jitter
        steps += [v2.RandomHorizontalFlip(0.5), v2.ColorJitter(brightness=0.2, contrast=0.3, saturation=0.2, hue=0.02)]
    steps += [v2.ToImage(),
              v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True)]
    return v2.Compose(steps)


class SegmentationDataset(Dataset):
    """(image float32 (3,H,W) in [0,1], mask int64 (H,W) with IGNORE_INDEX where unlabelled)."""

    def __init__(self, source: Source, size: tuple[int, int], train: bool):
        self.source = source
        self.transform = segmentation_transform(size, train)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.source[index]
        w, h = sample.image.size
        raw = sample.mask if sample.mask is not None else np.full((h, w), IGNORE_INDEX, np.uint8)
        mask = tv_tensors.Mask(torch.from_numpy(raw.copy()).unsqueeze(0))
        image, mask = self.transform(sample.image, mask)
        return image.as_subclass(torch.Tensor), mask[0].as_subclass(torch.Tensor)
