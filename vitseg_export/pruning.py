"""nn.Module -> smaller dense nn.Module: structured pruning that physically removes attention heads,
MLP hidden channels (ViT MLP, SegFormer Mix-FFN incl. its depthwise conv) and SegFormer decoder
channels, by an L1 importance score; plus magnitude 2:4 sparsity for TensorRT's sparse kernels.
Each family prunes its own layers (`ModelFamily.prune`, with the helpers below); this module is the
one entry point and the family-independent 2:4 sparsity.

Written here rather than with Torch-Pruning because the result must be described by the config
(per-layer widths), so a pruned checkpoint loads without the original: the pruned state dict is
loaded strictly into a model built from the new config, which proves the dependency bookkeeping.
Head width is never changed (heads are removed whole), so attention scaling stays exact.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from vitseg_export.errors import VitsegError
from vitseg_export.modeling import registry


def keep_count(count: int, ratio: float) -> int:
    """How many of `count` units survive pruning `ratio` of them (at least one)."""
    return max(1, int(round(count * (1.0 - ratio))))


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in ascending index order (so kept units keep their order)."""
    return torch.sort(torch.topk(scores, k).indices).values


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of the given attention heads in a (heads*head_dim, ...) projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


@torch.no_grad()
def prune_model(model: nn.Module, family: str, ratio: float, method: str) -> tuple[nn.Module, dict]:
    """Structured pruning of `model` (of `family`) by `ratio` of the units `method` names: one of the
    family's pruning parts, or "all". Returns (pruned model, report); the input model is not modified.
    Raises VitsegError for a method the family lacks or a ratio outside (0, 1)."""
    fam = registry.get_family(family)
    if not fam.pruning_parts:
        raise VitsegError(f"the {family} family has no units vitseg can prune", "export it unpruned")
    methods = fam.pruning_parts + ("all",)
    if method not in methods:
        raise VitsegError(f"--method {method}: the {family} family has no {method} to prune",
                          f"use one of {', '.join(methods)}")
    if not 0.0 < ratio < 1.0:
        raise VitsegError(f"--ratio {ratio} is outside (0, 1)", "e.g. --ratio 0.25 removes a quarter of the units")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    parts = set(fam.pruning_parts) if method == "all" else {method}
    new_config = fam.prune(sd, model.config, ratio, parts)
    pruned = fam.build(new_config)
    pruned.load_state_dict(sd, strict=True)  # the config alone must describe the pruned widths
    report = {"method": method, "ratio": ratio, "params_before": registry.count_parameters(model),
              "params_after": registry.count_parameters(pruned)}
    return pruned.eval(), report


# ---- 2:4 sparsity -------------------------------------------------------------------------------

def sparsifiable(module: nn.Module) -> bool:
    """Layers TensorRT's sparse kernels take: Linear (groups along in_features) and dense Conv2d
    (groups along input channels), with the grouped dimension a multiple of 4."""
    if isinstance(module, nn.Linear):
        return module.in_features % 4 == 0
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.in_channels % 4 == 0
    return False


def _grouped(weight: torch.Tensor) -> torch.Tensor:
    """View with the input-channel dimension last, in groups of 4: (..., 4)."""
    w = weight.permute(0, 2, 3, 1) if weight.ndim == 4 else weight  # Conv K,C,R,S -> K,R,S,C
    return w.reshape(-1, 4)


def mask_2to4(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest-magnitude weights in every group of 4 consecutive input channels."""
    g = _grouped(weight)
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(1, g.abs().topk(2, dim=1).indices, True)
    if weight.ndim == 4:
        k, c, r, s = weight.shape
        return keep.reshape(k, r, s, c).permute(0, 3, 1, 2).contiguous()
    return keep.reshape(weight.shape)


def apply_2to4(model: nn.Module) -> dict[str, torch.Tensor]:
    """Zero weights to the 2:4 pattern in place; returns the masks (name -> bool mask) to keep applying."""
    masks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if sparsifiable(module):
                mask = mask_2to4(module.weight)
                module.weight.mul_(mask)
                masks[name] = mask
    return masks


def reapply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Re-zero the weights outside their 2:4 masks (after an optimizer step)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            w = modules[name].weight
            w.mul_(mask.to(w.device))


def check_2to4(model: nn.Module) -> dict:
    """Which sparsifiable layers hold the 2:4 pattern (at least 2 zeros in every group of 4)."""
    ok, violations = [], []
    for name, module in model.named_modules():
        if sparsifiable(module):
            zeros = (_grouped(module.weight.detach()) == 0).sum(1)
            (ok if bool((zeros >= 2).all()) else violations).append(name)
    return {"sparse_layers": ok, "violations": violations, "checked": len(ok) + len(violations)}


# ---- prune a checkpoint, fine-tune, report ----------------------------------------------------------

@dataclass
class PruneSettings:
    ratio: float = 0.25
    method: str = "all"
    sparsity: str | None = None  # "2:4"
    finetune_epochs: int = 0
    data: str = "synthetic"
    image_size: int | None = None
    batch_size: int = 16
    eval_images: int = 64


def _scorer(loaded, settings: PruneSettings) -> Callable[[nn.Module], dict]:
    """Validation pixel accuracy and mIoU of a network (same normalization as the checkpoint)."""
    from vitseg_export.data.sources import open_source
    from vitseg_export.data.transforms import SegmentationDataset
    from vitseg_export.modeling.registry import Segmenter
    from vitseg_export.training import evaluate

    size = settings.image_size or loaded.meta.image_size[0]
    val = open_source(settings.data, "val")
    subset = torch.utils.data.Subset(SegmentationDataset(val, (size, size), train=False),
                                     range(min(settings.eval_images, len(val))))
    loader = torch.utils.data.DataLoader(subset, batch_size=settings.batch_size)

    def score(net: nn.Module) -> dict:
        acc, miou, _ = evaluate(Segmenter(net, loaded.meta.mean, loaded.meta.std), loader,
                                loaded.meta.config.num_classes, torch.device("cpu"))
        return {"pixel_accuracy": acc, "miou": miou}

    return score


def _finetune(pruned: nn.Module, meta, checkpoint: str, output: Path, settings: PruneSettings, masks: dict) -> nn.Module:
    from vitseg_export.checkpoint import LoadedCheckpoint, load_checkpoint
    from vitseg_export.training import TrainSettings, train

    start = LoadedCheckpoint(pruned.train(), meta, checkpoint, None, "pruned")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(start, TrainSettings(data=settings.data, epochs=settings.finetune_epochs, image_size=settings.image_size,
                                   batch_size=settings.batch_size, num_workers=1), output,
              after_step=(lambda net: reapply_masks(net, masks)) if masks else None)
    return load_checkpoint(output).model


def prune_checkpoint(checkpoint: str, output: Path, settings: PruneSettings,
                     log: Callable[[str], None] = lambda m: None) -> dict:
    """Prune a checkpoint, optionally sparsify (2:4) and fine-tune, and write the pruned run directory with
    `prune.json` (accuracy before, after pruning and after fine-tuning). Returns that report; raises
    VitsegError for bad settings or a lost 2:4 pattern."""
    from vitseg_export.checkpoint import load_checkpoint, save_checkpoint
    from vitseg_export.files import write_json

    if settings.sparsity not in (None, "2:4"):
        raise VitsegError(f"--sparsity {settings.sparsity} is not supported", "use --sparsity 2:4")
    loaded = load_checkpoint(checkpoint)
    score = _scorer(loaded, settings)
    report: dict = {"source": checkpoint, "before": score(loaded.model)}
    pruned, prune_report = prune_model(loaded.model, loaded.meta.family, settings.ratio, settings.method)
    report.update(prune_report)
    masks = apply_2to4(pruned) if settings.sparsity else {}
    report["after_pruning"] = score(pruned)
    meta = copy.deepcopy(loaded.meta)
    meta.config = pruned.config
    meta.training = {**meta.training, "pruned_from": checkpoint,
                     "prune": {"ratio": settings.ratio, "method": settings.method, "sparsity": settings.sparsity}}
    if settings.finetune_epochs:
        log(f"fine-tuning for {settings.finetune_epochs} epochs on {settings.data}")
        pruned = _finetune(pruned, meta, checkpoint, output, settings, masks)
    else:
        save_checkpoint(pruned, meta, output)
    report["after_finetuning"] = score(pruned) if settings.finetune_epochs else None
    if settings.sparsity:
        report["sparsity_check"] = check_2to4(pruned)
        if report["sparsity_check"]["violations"]:
            raise VitsegError(f"2:4 pattern lost in {report['sparsity_check']['violations'][:3]}", "report this as a bug")
    write_json(output / "prune.json", report)
    return report
