"""nn.Module -> optimized nn.Module: exact rewrites, applied at export (on by default, `--no-fold`).

SegFormer's All-MLP decoder is linear up to its ReLU: per-stage Linear A_i (+ b_i), bilinear upsampling
U (per channel, weights summing to 1, so U(const) = const), concatenation, the 1x1 fuse conv W (no
bias) and an eval-mode BatchNorm (per-channel affine g, h). With W_i the fuse conv's slice for stage i:

    BN(sum_i W_i U(A_i x_i + b_i)) = sum_i U(g*W_i A_i x_i) + g*sum_i W_i b_i + h

so each stage projects straight to the decoder width with the folded matrix and only the D-channel
result is upsampled; the 4D->D conv on the H/4 grid (about half of B0's compute) disappears.

ViT: the input BatchNorm (eval) is a per-channel affine map, folded into the patch embedding.
Every rewrite is proved equal by tests on every SegFormer size and the ViT.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from vitseg_export.modeling.segformer import SegformerDecodeHead, SegformerForSemanticSegmentation
from vitseg_export.modeling.vit import VisionTransformerForSegmentation


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = g*x + h."""
    g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return g, bn.bias - g * bn.running_mean


class FoldedSegformerDecodeHead(nn.Module):
    """The decode head after folding: per-stage Linear to D (fuse conv and BatchNorm folded in),
    upsample, sum, ReLU, classifier. Same outputs as SegformerDecodeHead in eval mode."""

    def __init__(self, head: SegformerDecodeHead):
        super().__init__()
        d = head.linear_fuse.out_channels
        n = len(head.linear_c)
        w = head.linear_fuse.weight.detach().reshape(d, n * d)  # D x 4D, input order [c4, c3, c2, c1]
        g, h = _bn_affine(head.batch_norm)
        self.proj = nn.ModuleList()
        bias_total = h.detach().clone()
        for i, mlp in enumerate(head.linear_c):
            w_i = w[:, (n - 1 - i) * d:(n - i) * d]  # this stage's slice (reversed concatenation)
            a, b = mlp.proj.weight.detach(), mlp.proj.bias.detach()
            lin = nn.Linear(a.shape[1], d, bias=False)
            lin.weight.data = (g[:, None] * (w_i @ a)).contiguous()
            self.proj.append(lin)
            bias_total += g * (w_i @ b)
        self.bias = nn.Parameter(bias_total.detach())
        self.activation = nn.ReLU()
        self.classifier = copy.deepcopy(head.classifier)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        n = features[-1].shape[0]
        target = features[0].shape[2:]
        total = None
        for x, lin in zip(features, self.proj):
            h, w = x.shape[2], x.shape[3]
            y = lin(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(n, -1, h, w)  # N,D,h,w
            if (h, w) != tuple(target):
                y = F.interpolate(y, size=target, mode="bilinear", align_corners=False)
            total = y if total is None else total + y
        x = self.activation(total + self.bias.reshape(1, -1, 1, 1))
        return self.classifier(x)


@torch.no_grad()
def fold_segformer(model: SegformerForSemanticSegmentation) -> SegformerForSemanticSegmentation:
    folded = copy.deepcopy(model).eval()
    folded.decode_head = FoldedSegformerDecodeHead(model.decode_head.eval())  # type: ignore[assignment]
    return folded


@torch.no_grad()
def fold_vit_input_norm(model: VisionTransformerForSegmentation) -> VisionTransformerForSegmentation:
    folded = copy.deepcopy(model).eval()
    if not isinstance(folded.input_norm, nn.BatchNorm2d):
        return folded
    g, h = _bn_affine(folded.input_norm)
    p2 = folded.config.patch_size**2
    scale = g.repeat_interleave(p2)  # patch vectors are flattened in (channel, row, col) order
    shift = h.repeat_interleave(p2)
    pe = folded.patch_embed
    pe.bias.data = pe.bias + pe.weight @ shift
    pe.weight.data = pe.weight * scale[None, :]
    folded.input_norm = nn.Identity()
    return folded


def fold(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """All exact rewrites that apply to `model` (eval mode). Returns (new model, names of the rewrites)."""
    if isinstance(model, SegformerForSemanticSegmentation):
        return fold_segformer(model), ["segformer-decoder: fuse conv + BatchNorm folded into per-stage projections"]
    if isinstance(model, VisionTransformerForSegmentation):
        if isinstance(model.input_norm, nn.BatchNorm2d):
            return fold_vit_input_norm(model), ["vit: input BatchNorm folded into the patch embedding"]
        return copy.deepcopy(model).eval(), []
    return model, []
