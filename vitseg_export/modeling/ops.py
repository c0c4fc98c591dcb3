"""Small exact operations that model families use in their folds and pruning: an eval-mode BatchNorm as an
affine map, and the index bookkeeping of structured pruning. A leaf: families import it, it imports no family."""

from __future__ import annotations

import torch
from torch import nn


def batchnorm_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as y = g*x + h: returns (g, h) per channel."""
    g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return g, bn.bias - g * bn.running_mean


def keep_count(count: int, ratio: float) -> int:
    """How many of `count` units survive pruning `ratio` of them (at least one)."""
    return max(1, int(round(count * (1.0 - ratio))))


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in ascending index order (so kept units keep their order)."""
    return torch.sort(torch.topk(scores, k).indices).values


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of the given attention heads in a (heads*head_dim, ...) projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
