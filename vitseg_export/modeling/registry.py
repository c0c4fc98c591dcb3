"""Every architecture by name, its tiny test twin, and the one way to build a model from a name or
from a (family, config) pair. Weight instances (sources, hashes, classes) are data in `models/`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace  # noqa: F401  (replace re-exported)
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitseg_export.errors import VitsegError
from vitseg_export.modeling.segformer import SEGFORMER_VARIANTS, SegformerConfig, SegformerForSemanticSegmentation
from vitseg_export.modeling.vit import ViTSegConfig, VisionTransformerForSegmentation

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The seed ViT normalizes raw [0,1] pixels with its own input BatchNorm.
IDENTITY_MEAN = (0.0, 0.0, 0.0)
IDENTITY_STD = (1.0, 1.0, 1.0)

PET_CLASSES = ("pet", "background", "border")

FAMILIES = {"vit": (ViTSegConfig, VisionTransformerForSegmentation),
            "segformer": (SegformerConfig, SegformerForSemanticSegmentation)}


@dataclass(frozen=True)
class Architecture:
    name: str
    family: str
    config: Any  # ViTSegConfig | SegformerConfig
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str
    tiny_twin_of: str | None = None

    @property
    def num_classes(self) -> int:
        return self.config.num_classes


def _vit(name: str, embed: int, depth: int, heads: int, desc: str, twin: str | None = None, **kw) -> Architecture:
    cfg = ViTSegConfig(embed_dim=embed, depth=depth, num_heads=heads, **kw)
    return Architecture(name, "vit", cfg, cfg.image_size, IDENTITY_MEAN, IDENTITY_STD, desc, twin)


def _segformer(name: str, variant: dict, desc: str, twin: str | None = None, image_size: int = 512, **kw) -> Architecture:
    # Our default class count is the Pet trimap's 3; HF's ADE20k checkpoints (150) load with theirs.
    cfg = SegformerConfig(num_classes=3, **{**variant, **kw})
    return Architecture(name, "segformer", cfg, image_size, IMAGENET_MEAN, IMAGENET_STD, desc, twin)


def _build_registry() -> dict[str, Architecture]:
    archs = [
        _vit("vit-seg-base", 768, 12, 8, "Seed article's ViT for segmentation (VisionTransformerArgs)"),
        _vit("vit-seg-small", 384, 12, 6, "ViT-S width (384), seed layout"),
        _vit("vit-seg-tiny", 192, 12, 3, "ViT-Ti width (192), seed layout"),
    ]
    archs += [_segformer(f"segformer-{v}", SEGFORMER_VARIANTS[v], f"SegFormer-{v.upper()} (MiT-{v} + All-MLP decoder)")
              for v in SEGFORMER_VARIANTS]
    # Tiny twins: the same code paths at widths 8-16 and depth 1, for fast tests.
    twins = []
    for a in archs:
        if a.family == "vit":
            cfg = replace(a.config, image_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
            twins.append(Architecture(f"{a.name}-test", "vit", cfg, 32, a.mean, a.std, f"tiny twin of {a.name}", a.name))
        else:
            big = a.config.decoder_dim == 768  # B2..B5: deeper stages, the 768-wide decoder
            cfg = replace(a.config, hidden_sizes=(8, 16, 16, 16), depths=(1, 2, 1, 1) if big else (1, 1, 1, 1),
                          num_heads=(1, 2, 2, 2), decoder_dim=16 if big else 8)
            twins.append(Architecture(f"{a.name}-test", "segformer", cfg, 64, a.mean, a.std, f"tiny twin of {a.name}", a.name))
    return {a.name: a for a in archs + twins}


ARCHITECTURES: dict[str, Architecture] = _build_registry()


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(a for a in ARCHITECTURES if not a.endswith("-test"))
        raise VitsegError(f"unknown architecture '{name}'", f"use one of: {known} (see `vitseg models`)") from None


def _jsonable(v: Any) -> Any:
    return [_jsonable(x) for x in v] if isinstance(v, (tuple, list)) else v


def _tupled(v: Any) -> Any:
    return tuple(_tupled(x) for x in v) if isinstance(v, list) else v


def config_to_dict(config: Any) -> dict:
    return {k: _jsonable(v) for k, v in asdict(config).items()}


def config_from_dict(family: str, data: dict) -> Any:
    if family not in FAMILIES:
        raise VitsegError(f"unknown model family '{family}'", f"expected one of {sorted(FAMILIES)}")
    cls = FAMILIES[family][0]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise VitsegError(f"unknown {family} config fields {unknown}", "the checkpoint was written by a newer vitseg")
    return cls(**{k: _tupled(v) for k, v in data.items()})


def build_model(family: str, config: Any) -> nn.Module:
    return FAMILIES[family][1](config)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Segmenter(nn.Module):
    """What every backend runs: pixels in [0,1] (N,3,H,W) -> logits (N,classes,H,W) at input resolution.

    Normalization lives here (so exported graphs take plain x/255 input), and SegFormer's H/4 logits are
    upsampled bilinearly (align_corners=False), as HF does in its loss and post-processing.
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.identity_norm = tuple(mean) == IDENTITY_MEAN and tuple(std) == IDENTITY_STD

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels if self.identity_norm else (pixels - self.mean) / self.std
        logits = self.net(x)
        if logits.shape[-2:] != pixels.shape[-2:]:
            logits = F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        return logits


def reset_classifier(model: nn.Module, family: str, num_classes: int) -> nn.Module:
    """Replace the per-class output layer (for fine-tuning on another label set); config follows."""
    cfg = replace(model.config, num_classes=num_classes)
    model.config = cfg
    if family == "vit":
        p = cfg.patch_size
        model.head = nn.Linear(cfg.embed_dim, p * p * num_classes)
    else:
        model.decode_head.classifier = nn.Conv2d(cfg.decoder_dim, num_classes, kernel_size=1)
    return model
