"""nn.Module -> smaller dense nn.Module: structured pruning that physically removes attention heads,
MLP hidden channels (ViT MLP, SegFormer Mix-FFN incl. its depthwise conv) and SegFormer decoder
channels, by an L1 importance score; plus magnitude 2:4 sparsity for TensorRT's sparse kernels.
Each family prunes its own layers (`ModelFamily.prune`, with the index helpers in modeling/ops.py); this
module is the one entry point and the family-independent 2:4 sparsity. Pruning a checkpoint into a run
directory, with fine-tuning and a report, is vitseg_export/pruning_run.py.

Written here rather than with Torch-Pruning because the result must be described by the config
(per-layer widths), so a pruned checkpoint loads without the original: the pruned state dict is
loaded strictly into a model built from the new config, which proves the dependency bookkeeping.
Head width is never changed (heads are removed whole), so attention scaling stays exact.
"""

from __future__ import annotations

import torch
from torch import nn

from vitseg_export.errors import VitsegError
from vitseg_export.modeling import registry

__all__ = ["apply_2to4", "check_2to4", "mask_2to4", "prune_model", "reapply_masks", "sparsifiable"]


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
