"""The ViT family: the plain Vision Transformer for segmentation from "Efficient Image Segmentation
Using PyTorch, Part 4" (VisionTransformerForSegmentation), its converters for timm ViT weights and the
seed article's own state dicts, its exact fold, pruning, and the family object registered at the end.

Layout of the seed article, kept exactly (its parameter count, 86,284,806 for the base
configuration, is checked by a test): BatchNorm2d on the raw image, image -> non-overlapping
patches, one Linear embedding shared by all patches, a learnable position embedding, pre-norm
encoder blocks, one Linear per patch to patch*patch*classes values, patches -> image.

Patchify/unpatchify use reshape/permute rather than nn.Unfold/nn.Fold: they are exactly equal,
and nn.Fold exports as Col2Im, which needs ONNX opset 18.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from vitseg_export.errors import VitsegError
from vitseg_export.modeling.ops import batchnorm_affine, head_rows, keep_count, top_indices
from vitseg_export.modeling.registry import (
    IDENTITY_MEAN,
    IDENTITY_STD,
    Architecture,
    Boundary,
    ForeignFormat,
    ModelFamily,
    TrainingRecipe,
    register_family,
)


@dataclass(frozen=True)
class ViTSegConfig:
    image_size: int = 128
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.2
    # The seed uses torch's LayerNorm default 1e-5; timm ViTs use 1e-6.
    layer_norm_eps: float = 1e-5
    # The seed normalizes the raw image with a BatchNorm; timm backbones expect mean/std input.
    input_batchnorm: bool = True
    # timm ViTs carry a class token (its position-embedding row is kept) and a final LayerNorm.
    class_token: bool = False
    final_norm: bool = False
    # Structured pruning: per block the kept (heads, MLP hidden width); None = uniform. Head width
    # stays embed_dim / num_heads.
    block_widths: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.block_widths is not None:
            object.__setattr__(self, "block_widths", tuple(tuple(w) for w in self.block_widths))
            if len(self.block_widths) != self.depth:
                raise ValueError(f"block_widths has {len(self.block_widths)} entries for depth {self.depth}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/p * W/p, C*p*p), each patch flattened in (c, row, col) order like nn.Unfold."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // patch_size, patch_size, w // patch_size, patch_size)  # N,C,gh,p,gw,p
    x = x.permute(0, 2, 4, 1, 3, 5)  # N,gh,gw,C,p,p
    return x.reshape(n, (h // patch_size) * (w // patch_size), c * patch_size * patch_size)


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """(N, gh*gw, C*p*p) -> (N, C, H, W); the inverse of `patchify` (what nn.Fold does)."""
    n, _, cpp = patches.shape
    c = cpp // (patch_size * patch_size)
    gh, gw = height // patch_size, width // patch_size
    x = patches.reshape(n, gh, gw, c, patch_size, patch_size)  # N,gh,gw,C,p,p
    x = x.permute(0, 3, 1, 4, 2, 5)  # N,C,gh,p,gw,p
    return x.reshape(n, c, height, width)


class MultiHeadSelfAttention(nn.Module):
    """nn.MultiheadAttention's parameters (in_proj q|k|v stacked, out_proj) with an explicit forward.

    Written out so that it exports as plain MatMul/Softmax at opset 17 on every exporter path.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.in_proj = nn.Linear(embed_dim, 3 * inner)
        self.out_proj = nn.Linear(inner, embed_dim)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        qkv = self.in_proj(x).reshape(n, t, 3, self.num_heads, self.head_dim)  # N,T,3,h,d
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each N,h,T,d
        attn = (q * (self.head_dim**-0.5)) @ k.transpose(-2, -1)  # N,h,T,T
        attn = attn.softmax(dim=-1)
        attn = F.dropout(attn, self.attn_dropout, self.training)
        out = (attn @ v).transpose(1, 2).reshape(n, t, self.num_heads * self.head_dim)  # N,T,h*d
        return self.out_proj(out)


class MLP(nn.Module):
    def __init__(self, embed_dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class EncoderBlock(nn.Module):
    def __init__(self, config: ViTSegConfig, index: int = 0):
        super().__init__()
        e = config.embed_dim
        heads, hidden = config.block_widths[index] if config.block_widths else (config.num_heads, int(e * config.mlp_ratio))
        self.norm1 = nn.LayerNorm(e, eps=config.layer_norm_eps)
        self.attn = MultiHeadSelfAttention(e, heads, e // config.num_heads, config.dropout)
        self.norm2 = nn.LayerNorm(e, eps=config.layer_norm_eps)
        self.mlp = MLP(e, hidden, config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformerForSegmentation(nn.Module):
    """Input: normalized images (N, 3, S, S) with S = config.image_size. Output: logits (N, classes, S, S)."""

    def __init__(self, config: ViTSegConfig):
        super().__init__()
        self.config = config
        c, p, e = config.in_channels, config.patch_size, config.embed_dim
        num_tokens = config.grid_size**2 + int(config.class_token)
        self.input_norm = nn.BatchNorm2d(c) if config.input_batchnorm else nn.Identity()
        self.patch_embed = nn.Linear(c * p * p, e)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, e)) if config.class_token else None
        self.pos_embed = nn.Parameter(torch.randn(num_tokens, e))
        self.blocks = nn.Sequential(*(EncoderBlock(config, i) for i in range(config.depth)))
        self.norm = nn.LayerNorm(e, eps=config.layer_norm_eps) if config.final_norm else nn.Identity()
        self.head = nn.Linear(e, p * p * config.num_classes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) -> patch tokens (N, grid*grid, E), class token dropped."""
        s = self.config.image_size
        if images.shape[-2:] != (s, s):
            raise ValueError(f"expected {s}x{s} input, got {tuple(images.shape[-2:])}")
        x = patchify(self.input_norm(images), self.config.patch_size)
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(x + self.pos_embed)
        x = self.norm(x)
        return x[:, 1:] if self.cls_token is not None else x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_features(images)
        s = self.config.image_size
        return unpatchify(self.head(tokens), self.config.patch_size, s, s)


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix: int) -> torch.Tensor:
    """Bicubic resampling of a (prefix + g*g, E) position embedding to (prefix + new_grid^2, E), as timm does."""
    prefix, grid = pos_embed[:num_prefix], pos_embed[num_prefix:]
    old_grid = math.isqrt(grid.shape[0])
    if old_grid * old_grid != grid.shape[0]:
        raise ValueError(f"position embedding has {grid.shape[0]} patch rows, not a square grid")
    if old_grid == new_grid:
        return pos_embed
    g = grid.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2).float()  # 1,E,g,g
    g = F.interpolate(g, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=True)
    g = g.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(pos_embed.dtype)
    return torch.cat([prefix, g], dim=0)


def is_timm_vit_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether the weights have timm VisionTransformer key names."""
    return "patch_embed.proj.weight" in state_dict and "blocks.0.attn.qkv.weight" in state_dict


def vit_config_from_timm(state_dict: dict[str, torch.Tensor], base: ViTSegConfig) -> ViTSegConfig:
    """The ViTSegConfig a faithful load of timm weights needs: widths and depth from the weights,
    LayerNorm eps 1e-6, class token and final norm as present, no input BatchNorm (timm backbones
    expect mean/std-normalized input). Heads: timm's standard ViTs all use 64-wide heads."""
    e, _, p, _ = state_dict["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    return replace(
        base,
        patch_size=p,
        embed_dim=e,
        depth=depth,
        num_heads=max(1, e // 64),
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / e,
        layer_norm_eps=1e-6,
        input_batchnorm=False,
        class_token="cls_token" in state_dict,
        final_norm="norm.weight" in state_dict,
    )


def vit_state_dict_from_timm(state_dict: dict[str, torch.Tensor], config: ViTSegConfig) -> dict[str, torch.Tensor]:
    """Map timm VisionTransformer keys onto ours. The segmentation head stays untouched (not in timm)."""
    out: dict[str, torch.Tensor] = {}
    w = state_dict["patch_embed.proj.weight"]  # E,C,p,p: flatten in (c, row, col) order = patchify order
    out["patch_embed.weight"] = w.reshape(w.shape[0], -1)
    out["patch_embed.bias"] = state_dict["patch_embed.proj.bias"]
    if config.class_token:
        out["cls_token"] = state_dict["cls_token"]
    pos = state_dict["pos_embed"][0]  # (prefix + g*g, E)
    out["pos_embed"] = resample_pos_embed(pos, config.grid_size, int(config.class_token))
    renames = {
        "norm1": "norm1", "norm2": "norm2", "attn.qkv": "attn.in_proj",
        "attn.proj": "attn.out_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    }
    for i in range(config.depth):
        for src, dst in renames.items():
            for leaf in ("weight", "bias"):
                out[f"blocks.{i}.{dst}.{leaf}"] = state_dict[f"blocks.{i}.{src}.{leaf}"]
    if config.final_norm:
        out["norm.weight"] = state_dict["norm.weight"]
        out["norm.bias"] = state_dict["norm.bias"]
    return out


def is_seed_article_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether the weights were saved from the seed article's own code."""
    return "layers.1.pe.embed_layer.weight" in state_dict


def vit_state_dict_from_seed_article(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a state dict saved from the article's own code (nn.Sequential `layers`, nn.MultiheadAttention)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        k = key
        k = k.replace("layers.0.", "input_norm.", 1) if k.startswith("layers.0.") else k
        k = k.replace("layers.1.pe.embed_layer.", "patch_embed.")
        k = k.replace("layers.1.position_embed", "pos_embed")
        k = k.replace("layers.3.projection.", "head.")
        if k.startswith("layers.2."):
            k = "blocks." + k[len("layers.2."):]
            k = (k.replace(".ln1.", ".norm1.").replace(".ln2.", ".norm2.")
                 .replace(".mha.in_proj_weight", ".attn.in_proj.weight")
                 .replace(".mha.in_proj_bias", ".attn.in_proj.bias")
                 .replace(".mha.out_proj.", ".attn.out_proj.")
                 .replace(".mlp.layers.0.", ".mlp.fc1.").replace(".mlp.layers.2.", ".mlp.fc2."))
        out[k] = value
    return out


# ---- exact fold, pruning ------------------------------------------------------------------------

@torch.no_grad()
def fold_vit_input_norm(model: VisionTransformerForSegmentation) -> VisionTransformerForSegmentation:
    """The eval-mode input BatchNorm is a per-channel affine map: fold it into the patch embedding."""
    folded = copy.deepcopy(model).eval()
    if not isinstance(folded.input_norm, nn.BatchNorm2d):
        return folded
    g, h = batchnorm_affine(folded.input_norm)
    p2 = folded.config.patch_size**2
    scale = g.repeat_interleave(p2)  # patch vectors are flattened in (channel, row, col) order
    shift = h.repeat_interleave(p2)
    pe = folded.patch_embed
    pe.bias.data = pe.bias + pe.weight @ shift
    pe.weight.data = pe.weight * scale[None, :]
    folded.input_norm = nn.Identity()
    return folded


def prune_vit(sd: dict, config: ViTSegConfig, ratio: float, heads_on: bool, mlp_on: bool) -> ViTSegConfig:
    """Remove whole attention heads and MLP hidden channels by L1 importance, in `sd` (in place)."""
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
            kept = top_indices(score, keep_count(h, ratio))
            rows = head_rows(kept, d)
            qkv = torch.cat([rows + j * h * d for j in range(3)])
            sd[p + "attn.in_proj.weight"], sd[p + "attn.in_proj.bias"] = w_in[qkv], b_in[qkv]
            sd[p + "attn.out_proj.weight"] = w_out[:, rows]
            h = len(kept)
        fc1_w, fc1_b, fc2_w = sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"], sd[p + "mlp.fc2.weight"]
        if mlp_on:
            score = fc1_w.abs().sum(1) * fc2_w.abs().sum(0)
            kept = top_indices(score, keep_count(fc1_w.shape[0], ratio))
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = fc1_w[kept], fc1_b[kept]
            sd[p + "mlp.fc2.weight"] = fc2_w[:, kept]
        widths.append((h, sd[p + "mlp.fc1.weight"].shape[0]))
    return replace(config, block_widths=tuple(widths))


# ---- the family ---------------------------------------------------------------------------------

def _from_timm(state_dict: dict, config: ViTSegConfig):
    converted = vit_config_from_timm(state_dict, config)
    # timm's augreg ViTs are trained on mean/std 0.5 input; the segmentation head is new
    half = (0.5, 0.5, 0.5)
    return converted, vit_state_dict_from_timm(state_dict, converted), ("head.",), half, half


def _from_seed_article(state_dict: dict, config: ViTSegConfig):
    return config, vit_state_dict_from_seed_article(state_dict), (), None, None


class VitFamily(ModelFamily):
    name = "vit"
    display_name = "ViT"
    config_class = ViTSegConfig
    model_class = VisionTransformerForSegmentation
    head_prefix = "head."
    # the seed article's recipe: Adam lr 4e-4, StepLR x0.8 every 12 epochs
    recipe = TrainingRecipe("adam", 4e-4, 0.0, "step", step_epochs=12, step_gamma=0.8)
    pruning_parts = ("heads", "mlp")
    foreign_formats = (ForeignFormat("timm", is_timm_vit_state_dict, _from_timm),
                       ForeignFormat("seed-article", is_seed_article_state_dict, _from_seed_article))

    def architectures(self) -> list[Architecture]:
        sizes = [("vit-seg-base", 768, 12, 8, "Seed article's ViT for segmentation (VisionTransformerArgs)"),
                 ("vit-seg-small", 384, 12, 6, "ViT-S width (384), seed layout"),
                 ("vit-seg-tiny", 192, 12, 3, "ViT-Ti width (192), seed layout")]
        archs = []
        for name, embed, depth, heads, desc in sizes:
            cfg = ViTSegConfig(embed_dim=embed, depth=depth, num_heads=heads)
            archs.append(Architecture(name, self.name, cfg, cfg.image_size, IDENTITY_MEAN, IDENTITY_STD, desc))
            # the tiny twin: the same code paths at width 16, depth 1, 32 px, for fast tests
            tiny = replace(cfg, image_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
            archs.append(Architecture(f"{name}-test", self.name, tiny, 32, IDENTITY_MEAN, IDENTITY_STD,
                                      f"tiny twin of {name}", name))
        return archs

    def fixed_input_size(self, config: ViTSegConfig) -> int:
        return config.image_size

    def check_export_size(self, architecture: str, config: ViTSegConfig, size: tuple[int, int], dynamic_size: bool) -> None:
        s, p, g = config.image_size, config.patch_size, config.grid_size
        if dynamic_size:
            raise VitsegError(f"{architecture} cannot export with a dynamic size",
                              f"the ViT's position embedding fixes a {g}x{g} grid ({s}x{s} px); drop --dynamic-size")
        if size[0] % p or size[1] % p:
            raise VitsegError(f"image size {size[0]}x{size[1]} is not divisible by the patch size {p}", f"use {s}x{s}")
        if tuple(size) != (s, s):
            raise VitsegError(f"{architecture} is built for {s}x{s} input, not {size[0]}x{size[1]}",
                              "the position embedding fixes the grid; retrain (or --init with resampling) at that size")

    def locate_boundaries(self, model: nn.Module) -> list[Boundary]:
        found = [Boundary("input", "input image")]
        if isinstance(model.input_norm, nn.BatchNorm2d):  # folded into the patch embedding by the exact rewrite
            found.append(Boundary("input_norm", "input BatchNorm", reads="input"))
        found.append(Boundary("patch_embed", "patch embedding", reads=found[-1].name))
        for i in range(len(model.blocks)):
            block = f"blocks.{i}"
            found.append(Boundary(block, f"block {i}", reads="patch_embed" if i == 0 else f"blocks.{i - 1}"))
            found += [Boundary(f"{block}.{part}", kind, 2, block) for part, kind in (
                ("norm1", "layer norm before attention"), ("attn", "attention"), ("norm2", "layer norm before the MLP"),
                ("mlp", "MLP"))]
        last = f"blocks.{len(model.blocks) - 1}"
        if isinstance(model.norm, nn.LayerNorm):
            found.append(Boundary("norm", "final LayerNorm", reads=last))
            last = "norm"
        return found + [Boundary("head", "patch classifier", reads=last), Boundary("logits", "logits", reads="head")]

    def fold(self, model: nn.Module) -> tuple[nn.Module, list[str]]:
        if isinstance(model.input_norm, nn.BatchNorm2d):
            return fold_vit_input_norm(model), ["vit: input BatchNorm folded into the patch embedding"]
        return copy.deepcopy(model).eval(), []

    def prune(self, state_dict: dict, config: ViTSegConfig, ratio: float, parts: set[str]) -> ViTSegConfig:
        return prune_vit(state_dict, config, ratio, "heads" in parts, "mlp" in parts)

    def reset_classifier(self, model: nn.Module, num_classes: int) -> nn.Module:
        model.config = replace(model.config, num_classes=num_classes)
        p = model.config.patch_size
        model.head = nn.Linear(model.config.embed_dim, p * p * num_classes)
        return model


VIT = register_family(VitFamily())
