"""nn.Module -> smaller dense nn.Module: structured pruning that physically removes attention heads,
MLP hidden channels (ViT MLP, SegFormer Mix-FFN incl. its depthwise conv) and SegFormer decoder
channels, by an L1 importance score; plus magnitude 2:4 sparsity for TensorRT's sparse kernels.

Written here rather than with Torch-Pruning because the result must be described by the config
(per-layer widths), so a pruned checkpoint loads without the original: the pruned state dict is
loaded strictly into a model built from the new config, which proves the dependency bookkeeping.
Head width is never changed (heads are removed whole), so attention scaling stays exact.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from vitseg_export.errors import VitsegError
from vitseg_export.modeling import registry

METHODS = ("heads", "mlp", "channels", "all")


def _keep(count: int, ratio: float) -> int:
    return max(1, int(round(count * (1.0 - ratio))))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, k).indices).values


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


@torch.no_grad()
def prune_model(model: nn.Module, family: str, ratio: float, method: str) -> tuple[nn.Module, dict]:
    """Returns (pruned model, report). The input model is not modified."""
    if method not in METHODS:
        raise VitsegError(f"--method {method} is unknown", f"use one of {', '.join(METHODS)}")
    if not 0.0 < ratio < 1.0:
        raise VitsegError(f"--ratio {ratio} is outside (0, 1)", "e.g. --ratio 0.25 removes a quarter of the units")
    if method == "channels" and family == "vit":
        raise VitsegError("--method channels prunes SegFormer decoder channels; the ViT has none",
                          "use heads, mlp or all for the ViT")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config
    heads_on = method in ("heads", "all")
    mlp_on = method in ("mlp", "all")
    if family == "vit":
        new_config = _prune_vit(sd, config, ratio, heads_on, mlp_on)
    else:
        new_config = _prune_segformer(sd, config, ratio, heads_on, mlp_on, method in ("channels", "all"))
    pruned = registry.build_model(family, new_config)
    pruned.load_state_dict(sd, strict=True)  # the config alone must describe the pruned widths
    report = {"method": method, "ratio": ratio, "params_before": registry.count_parameters(model),
              "params_after": registry.count_parameters(pruned)}
    return pruned.eval(), report


def _prune_vit(sd: dict, config, ratio: float, heads_on: bool, mlp_on: bool):
    e = config.embed_dim
    d = e // config.num_heads
    widths = []
    for i in range(config.depth):
        p = f"blocks.{i}."
        w_in, b_in, w_out = sd[p + "attn.in_proj.weight"], sd[p + "attn.in_proj.bias"], sd[p + "attn.out_proj.weight"]
        h = w_out.shape[1] // d
        if heads_on and h > 1:
            # importance: how much each head writes to the residual stream, times its value weights
            score = w_out.abs().reshape(e, h, d).sum(dim=(0, 2)) * w_in[2 * h * d:].abs().reshape(h, d, e).sum(dim=(1, 2))
            kept = _top(score, _keep(h, ratio))
            rows = _head_rows(kept, d)
            qkv = torch.cat([rows + j * h * d for j in range(3)])
            sd[p + "attn.in_proj.weight"], sd[p + "attn.in_proj.bias"] = w_in[qkv], b_in[qkv]
            sd[p + "attn.out_proj.weight"] = w_out[:, rows]
            h = len(kept)
        fc1_w, fc1_b, fc2_w = sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"], sd[p + "mlp.fc2.weight"]
        if mlp_on:
            score = fc1_w.abs().sum(1) * fc2_w.abs().sum(0)
            kept = _top(score, _keep(fc1_w.shape[0], ratio))
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = fc1_w[kept], fc1_b[kept]
            sd[p + "mlp.fc2.weight"] = fc2_w[:, kept]
        widths.append((h, sd[p + "mlp.fc1.weight"].shape[0]))
    return replace(config, block_widths=tuple(widths))


def _prune_segformer(sd: dict, config, ratio: float, heads_on: bool, mlp_on: bool, channels_on: bool):
    widths = []
    for s, depth in enumerate(config.depths):
        hidden = config.hidden_sizes[s]
        d = hidden // config.num_heads[s]
        for j in range(depth):
            p = f"encoder.block.{s}.{j}."
            a = p + "attention."
            h = sd[a + "self.query.weight"].shape[0] // d
            if heads_on and h > 1:
                w_out = sd[a + "output.dense.weight"]
                score = (w_out.abs().reshape(hidden, h, d).sum(dim=(0, 2))
                         * sd[a + "self.value.weight"].abs().reshape(h, d, hidden).sum(dim=(1, 2)))
                kept = _top(score, _keep(h, ratio))
                rows = _head_rows(kept, d)
                for name in ("query", "key", "value"):
                    sd[f"{a}self.{name}.weight"] = sd[f"{a}self.{name}.weight"][rows]
                    sd[f"{a}self.{name}.bias"] = sd[f"{a}self.{name}.bias"][rows]
                sd[a + "output.dense.weight"] = w_out[:, rows]
                h = len(kept)
            m = p + "mlp."
            if mlp_on:
                score = sd[m + "dense1.weight"].abs().sum(1) * sd[m + "dense2.weight"].abs().sum(0)
                kept = _top(score, _keep(score.numel(), ratio))
                for key in ("dense1.weight", "dense1.bias", "dwconv.dwconv.weight", "dwconv.dwconv.bias"):
                    sd[m + key] = sd[m + key][kept]
                sd[m + "dense2.weight"] = sd[m + "dense2.weight"][:, kept]
            widths.append((h, sd[m + "dense1.weight"].shape[0]))
    new_config = replace(config, layer_widths=tuple(widths))
    if channels_on:
        dd = config.decoder_dim
        keep = _keep(dd, ratio)
        n = len(config.hidden_sizes)
        fuse = sd["decode_head.linear_fuse.weight"][:, :, 0, 0]  # D x nD, input order [c4 .. c1]
        columns = []
        for i in range(n):
            sl = slice((n - 1 - i) * dd, (n - i) * dd)
            proj = sd[f"decode_head.linear_c.{i}.proj.weight"]
            score = proj.abs().sum(1) * fuse[:, sl].abs().sum(0)
            kept = _top(score, keep)
            sd[f"decode_head.linear_c.{i}.proj.weight"] = proj[kept]
            sd[f"decode_head.linear_c.{i}.proj.bias"] = sd[f"decode_head.linear_c.{i}.proj.bias"][kept]
            columns.append((n - 1 - i, kept + (n - 1 - i) * dd))
        in_cols = torch.cat([c for _, c in sorted(columns)])  # back in concatenation order
        g = sd["decode_head.batch_norm.weight"].abs() / torch.sqrt(sd["decode_head.batch_norm.running_var"] + 1e-5)
        out_score = fuse.abs().sum(1) * g * sd["decode_head.classifier.weight"][:, :, 0, 0].abs().sum(0)
        out_kept = _top(out_score, keep)
        sd["decode_head.linear_fuse.weight"] = sd["decode_head.linear_fuse.weight"][out_kept][:, in_cols]
        for key in ("weight", "bias", "running_mean", "running_var"):
            sd[f"decode_head.batch_norm.{key}"] = sd[f"decode_head.batch_norm.{key}"][out_kept]
        sd["decode_head.classifier.weight"] = sd["decode_head.classifier.weight"][:, out_kept]
        new_config = replace(new_config, decoder_dim=keep)
    return new_config


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
