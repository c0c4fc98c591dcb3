"""nn.Module -> optimized nn.Module: exact rewrites, applied at export (on by default, `--no-fold`).

Each family owns its rewrites (`ModelFamily.fold`): SegFormer folds its decoder's fuse conv and
BatchNorm into the per-stage projections, the ViT folds its input BatchNorm into the patch embedding.
Every rewrite is proved equal by tests, and every export's parity is judged against the unfolded model.
"""

from __future__ import annotations

import torch
from torch import nn

from vitseg_export.modeling.registry import family_of


def fold(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """All exact rewrites the model's family knows (eval mode). Returns (new model, names of the rewrites);
    the input model is not modified."""
    with torch.no_grad():
        return family_of(model).fold(model)
