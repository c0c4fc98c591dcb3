"""The model-family interface and the one registry of families and architectures.

A family (ViT, SegFormer, or your own) is ONE module that subclasses `ModelFamily` and calls
`register_family(...)`: it owns its config and network, its tiny test twins, its checkpoint key
mappings, exact folds, pruning, training recipe and export constraints. Everything else in vitseg asks
the family object; nothing outside a family module compares family names. Weight instances (sources,
hashes, classes) are data in `models/`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitseg_export.data.sources import PET_CLASSES
from vitseg_export.errors import VitsegError
from vitseg_export.fields import matches
from vitseg_export.tables import Table

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A network that normalizes raw [0,1] pixels itself (the seed ViT's input BatchNorm) takes these.
IDENTITY_MEAN = (0.0, 0.0, 0.0)
IDENTITY_STD = (1.0, 1.0, 1.0)

__all__ = ["PET_CLASSES", "Architecture", "ForeignFormat", "HuggingFaceMapping", "ModelFamily", "Segmenter",
           "TrainingRecipe", "ARCHITECTURES", "FAMILIES", "register_family", "get_family", "family_of", "get_architecture",
           "build_model", "config_to_dict", "config_from_dict", "count_parameters", "replace_classes"]


@dataclass(frozen=True)
class Architecture:
    """A named configuration of a family (e.g. segformer-b0), or a tiny twin of one for fast tests."""

    name: str
    family: str
    config: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str
    tiny_twin_of: str | None = None

    @property
    def num_classes(self) -> int:
        """The class count of the architecture's config."""
        return self.config.num_classes


@dataclass(frozen=True)
class TrainingRecipe:
    """Optimizer and schedule a family trains with by default (see vitseg_export.train.training)."""

    optimizer: str  # "adam" | "adamw"
    lr: float
    weight_decay: float
    schedule: str  # "step": x gamma every `step_epochs` epochs; "warmup-poly": linear warm-up then linear decay
    step_epochs: int = 12
    step_gamma: float = 0.8


@dataclass(frozen=True)
class ForeignFormat:
    """A foreign weight layout a family can start from (`vitseg train --init FILE --model ARCH`).

    `detect(state_dict)` says whether the weights are in this layout; `convert(state_dict, config)` returns
    (config to build, state dict in our names, key prefixes that may stay untrained, mean, std) where mean
    and std are None to keep the architecture's."""

    kind: str
    detect: Callable[[dict], bool]
    convert: Callable[[dict, Any], tuple[Any, dict, tuple[str, ...], tuple | None, tuple | None]]


@dataclass(frozen=True)
class HuggingFaceMapping:
    """How a family reads Hugging Face checkpoint directories of `model_type`."""

    model_type: str
    semantic_class: str  # the `architectures` entry of a checkpoint with a segmentation head
    config_from_hf: Callable[[dict, int | None], Any]  # (config.json dict, num_classes or None) -> config
    state_dict_from_hf: Callable[[dict], tuple[dict, bool]]  # -> (state dict in our names, has segmentation head)
    image_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class Boundary:
    """A named place in a network where `vitseg verify --locate` compares an artifact's tensor with PyTorch's: a
    module's output, by its path in the network (`encoder.block.2.0`: the name a user finds in the model code),
    or "input" (the normalized input the network reads) and "logits" (the graph's upsampled logits)."""

    name: str
    kind: str  # in words: "stage 3 block 0", "attention", "decoder projection 2 (folded: ...)"
    level: int = 0  # 0: looked at first; deeper levels only inside the first boundary of the level above that diverges
    parent: str | None = None  # the boundary whose divergence opens this one
    reads: str | None = None  # the boundary whose tensor this one's module computes from (its data path)


class ModelFamily:
    """Everything vitseg needs to know about one family of networks. Subclasses set the class attributes
    and override what differs; the defaults suit a plain fully convolutional segmenter."""

    name: str = ""
    display_name: str = ""  # how messages name the family ("SegFormer")
    config_class: type = object
    model_class: type = nn.Module
    head_prefix: str = "head."  # state-dict prefix of the per-class output layer (new on encoder-only loads)
    recipe = TrainingRecipe("adamw", 1e-3, 0.01, "warmup-poly")
    pruning_parts: tuple[str, ...] = ()  # what `vitseg prune --method` can remove ("heads", "mlp", "channels")
    foreign_formats: tuple[ForeignFormat, ...] = ()
    huggingface: HuggingFaceMapping | None = None

    def architectures(self) -> list[Architecture]:
        """The named architectures of this family, tiny test twins included."""
        return []

    def build(self, config: Any) -> nn.Module:
        """A network with random weights for `config`."""
        return self.model_class(config)

    def fixed_input_size(self, config: Any) -> int | None:
        """The one square input size the network takes, or None when any size works."""
        return None

    def check_export_size(self, architecture: str, config: Any, size: tuple[int, int], dynamic_size: bool) -> None:
        """Raise VitsegError when the network cannot be exported at `size` (or with dynamic H/W)."""
        fixed = self.fixed_input_size(config)
        if fixed is not None and dynamic_size:
            raise VitsegError(f"{architecture} cannot export with a dynamic size",
                              f"it takes {fixed}x{fixed} input only; drop --dynamic-size")
        if fixed is not None and tuple(size) != (fixed, fixed):
            raise VitsegError(f"{architecture} is built for {fixed}x{fixed} input, not {size[0]}x{size[1]}",
                              f"use --image-size {fixed}")

    def fold(self, model: nn.Module) -> tuple[nn.Module, list[str]]:
        """Exact rewrites for inference: (rewritten copy in eval mode, names of the rewrites applied)."""
        return copy.deepcopy(model).eval(), []

    def prune(self, state_dict: dict, config: Any, ratio: float, parts: set[str]) -> Any:
        """Remove `ratio` of the units in `parts` from `state_dict` (in place); return the config that
        describes the new widths. Only called with parts from `pruning_parts`."""
        raise VitsegError(f"the {self.name} family cannot be pruned", "export it unpruned")

    def reset_classifier(self, model: nn.Module, num_classes: int) -> nn.Module:
        """Replace the per-class output layer in place for another label set; model.config follows."""
        raise VitsegError(f"the {self.name} family cannot change its class count", "train with the model's classes")

    def locate_boundaries(self, model: nn.Module) -> list[Boundary]:
        """The boundaries of `model` (the network as exported: folded where it was), in data-flow order: the input,
        then each module whose output `vitseg verify --locate` compares, coarse ones at level 0 and the finer ones
        inside each (`parent`), then the logits."""
        return [Boundary("input", "normalized input"), Boundary("logits", "logits")]

    def name_for(self, config: Any) -> str:
        """The architecture name of a config loaded from elsewhere (e.g. a Hugging Face directory)."""
        for arch in self.architectures():
            if arch.tiny_twin_of is None and _same_widths(arch.config, config):
                return arch.name
        return f"{self.name}-custom"


def _same_widths(a: Any, b: Any) -> bool:
    keep = {"num_classes", "layer_widths", "block_widths"}
    da = {k: v for k, v in asdict(a).items() if k not in keep}
    db = {k: v for k, v in asdict(b).items() if k not in keep}
    return da == db


FAMILIES: Table[ModelFamily] = Table("unknown model family '{name}'", "known families: {names}")
ARCHITECTURES: Table[Architecture] = Table("unknown architecture '{name}'", "use one of: {names} (see `vitseg models`)",
                                           lambda t: [n for n, a in t.items() if a.tiny_twin_of is None])


def register_family(family: ModelFamily) -> ModelFamily:
    """Make a family and its architectures known to every vitseg command. Returns the family."""
    if not family.name:
        raise ValueError("a model family needs a name")
    for arch in family.architectures():
        ARCHITECTURES.register(arch)
    return FAMILIES.register(family)


def get_family(name: str) -> ModelFamily:
    """The registered family called `name`; VitsegError for an unknown one (never a silent default)."""
    return FAMILIES.row(name)


def family_of(model: nn.Module) -> ModelFamily:
    """The registered family whose network class `model` is; VitsegError for a network of none."""
    for family in FAMILIES.values():
        if isinstance(model, family.model_class):
            return family
    raise VitsegError(f"{type(model).__name__} belongs to no registered model family",
                      "register its family with vitseg_export.modeling.registry.register_family")


def get_architecture(name: str) -> Architecture:
    """The architecture called `name`; VitsegError listing the known ones otherwise."""
    return ARCHITECTURES.row(name)


def _jsonable(v: Any) -> Any:
    return [_jsonable(x) for x in v] if isinstance(v, (tuple, list)) else v


def _tupled(v: Any) -> Any:
    return tuple(_tupled(x) for x in v) if isinstance(v, list) else v


def config_to_dict(config: Any) -> dict:
    """A family config as JSON-ready data (tuples become lists)."""
    return {k: _jsonable(v) for k, v in asdict(config).items()}


def _in_range(name: str, value: Any) -> bool:
    """Counts and sizes are >= 1, rates (dropout, drop path) in [0, 1), other numbers > 0 (eps, ratios)."""
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_in_range(name, v) for v in value)
    if isinstance(value, int):
        return value >= 1
    if isinstance(value, float):
        return 0.0 <= value < 1.0 if ("dropout" in name or "drop_path" in name) else value > 0
    return True


def config_from_dict(family: str, data: dict) -> Any:
    """The config of `family` from `config_to_dict` output; VitsegError for unknown families or fields, and for a
    field of the wrong type or out of its range (a damaged config.json: never coerced)."""
    cls = get_family(family).config_class
    if not isinstance(data, dict):
        raise VitsegError(f"model_config is {json.dumps(data)[:60]}, not an object", "re-save the checkpoint with vitseg")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise VitsegError(f"unknown {family} config fields {unknown}", "the checkpoint was written by a newer vitseg")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if not matches(value, hints[name]) or not _in_range(name, value):
            raise VitsegError(f"model_config.{name} is {json.dumps(value)[:60]}, not a valid {hints[name]}"
                              " (counts >= 1, rates in [0, 1))", "the config.json is damaged; re-save the checkpoint with vitseg")
    try:
        return cls(**{k: _tupled(v) for k, v in data.items()})
    except ValueError as e:  # the family's own consistency checks (__post_init__)
        raise VitsegError(f"model_config is inconsistent ({e})", "the config.json is damaged; re-save the checkpoint") from None


def build_model(family: str, config: Any) -> nn.Module:
    """A network of `family` with random weights for `config`."""
    return get_family(family).build(config)


def replace_classes(config: Any, num_classes: int) -> Any:
    """`config` with another class count (every family config has `num_classes`)."""
    return dataclasses.replace(config, num_classes=num_classes)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (buffers excluded)."""
    return sum(p.numel() for p in module.parameters())


class Segmenter(nn.Module):
    """What every backend runs: pixels in [0,1] (N,3,H,W) -> logits (N,classes,H,W) at input resolution.

    Normalization lives here (so exported graphs take plain x/255 input), and logits below the input
    resolution (SegFormer's H/4) are upsampled bilinearly (align_corners=False), as HF does in its loss
    and post-processing.
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
