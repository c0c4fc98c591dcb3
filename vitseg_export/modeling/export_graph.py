"""The graph that is exported: a Segmenter (normalization inside) with the requested outputs, as the exported graph
computes them, and the module every export starts from (the family's exact rewrites applied unless asked not to).
Both the ONNX exporter and `vitseg verify --locate` (which names the exported graph's boundaries by module path)
build it here."""

from __future__ import annotations

import torch
from torch import nn

from vitseg_export.modeling.optimize import fold
from vitseg_export.modeling.registry import Segmenter


class ExportGraph(nn.Module):
    """Segmenter + the requested outputs: `logits` (N,C,H,W) and/or the in-graph argmax `mask` (N,H,W) uint8."""

    def __init__(self, segmenter: Segmenter, outputs: list[str]):
        super().__init__()
        self.segmenter = segmenter
        self.outputs = outputs

    def forward(self, pixels: torch.Tensor):
        logits = self.segmenter(pixels)
        result = []
        if "logits" in self.outputs:
            result.append(logits)
        if "mask" in self.outputs:
            result.append(logits.argmax(1).to(torch.uint8))
        return tuple(result) if len(result) > 1 else result[0]


def exported_module(model: nn.Module, mean, std, folded: bool = True) -> tuple[Segmenter, list[str]]:
    """The module every export starts from: the network with its normalization, folded (the family's exact
    rewrites) unless `folded` is off, in eval mode. Returns (module, names of the rewrites applied); `model` is
    not modified."""
    if not folded:
        return Segmenter(model, mean, std).eval(), []
    folded_net, rewrites = fold(model.eval())
    return Segmenter(folded_net, mean, std).eval(), rewrites
