"""The SegFormer family (Xie et al., 2021): Mix Transformer (MiT) encoder + All-MLP decoder, with the exact
numerics of Hugging Face's `SegformerForSemanticSegmentation` (the format users' checkpoints come in):
every LayerNorm eps 1e-5, erf GELU, k/v from a conv-reduced sequence, decoder stages concatenated in
reversed order. The module tree mirrors HF's on-disk key names below the `segformer.` prefix, so the
converter only strips that prefix. Any input size works; logits come out at ceil-ish H/4 (the first
stage's grid), as HF's do. Below the network: the Hugging Face converters, the exact decoder fold,
pruning, and the family object registered at the end.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from vitseg_export.modeling.ops import batchnorm_affine, head_rows, keep_count, top_indices
from vitseg_export.modeling.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Architecture,
    Boundary,
    HuggingFaceMapping,
    ModelFamily,
    TrainingRecipe,
    register_family,
)

# HF reads no layer_norm_eps anywhere in SegFormer; nn.LayerNorm's default is what runs.
LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class SegformerConfig:
    num_channels: int = 3
    num_classes: int = 150
    hidden_sizes: tuple[int, ...] = (32, 64, 160, 256)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
    strides: tuple[int, ...] = (4, 2, 2, 2)
    mlp_ratio: int = 4
    decoder_dim: int = 256
    drop_path_rate: float = 0.1
    classifier_dropout: float = 0.1
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # Structured pruning: per encoder layer (in stage order) the kept (heads, Mix-FFN hidden width);
    # None = the uniform widths above. Head width stays hidden_size / num_heads of its stage.
    layer_widths: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.layer_widths is not None:
            object.__setattr__(self, "layer_widths", tuple(tuple(w) for w in self.layer_widths))
            if len(self.layer_widths) != sum(self.depths):
                raise ValueError(f"layer_widths has {len(self.layer_widths)} entries for {sum(self.depths)} layers")
        n = len(self.hidden_sizes)
        for name in ("depths", "num_heads", "sr_ratios", "patch_sizes", "strides"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, hidden_sizes has {n}")
        for h, heads in zip(self.hidden_sizes, self.num_heads):
            if h % heads:
                raise ValueError(f"hidden size {h} is not divisible by {heads} heads")


class SegformerOverlapPatchEmbeddings(nn.Module):
    def __init__(self, patch_size: int, stride: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride, padding=patch_size // 2)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)  # N,C,h,w
        h, w = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)  # N,h*w,C
        return self.layer_norm(x), h, w


class SegformerEfficientSelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, sr_ratio: int, attention_dropout: float, head_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        inner = self.num_heads * self.head_dim  # smaller than hidden_size once heads are pruned
        self.query = nn.Linear(hidden_size, inner)
        self.key = nn.Linear(hidden_size, inner)
        self.value = nn.Linear(hidden_size, inner)
        self.dropout = nn.Dropout(attention_dropout)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(hidden_size, hidden_size, kernel_size=sr_ratio, stride=sr_ratio)
            self.layer_norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        return x.reshape(n, t, self.num_heads, self.head_dim).transpose(1, 2)  # N,heads,T,d

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        n, t, c = x.shape
        q = self._heads(self.query(x))
        if self.sr_ratio > 1:
            kv = x.transpose(1, 2).reshape(n, c, height, width)  # N,C,h,w
            kv = self.sr(kv).reshape(n, c, -1).transpose(1, 2)  # N,h*w/sr^2,C
            kv = self.layer_norm(kv)
        else:
            kv = x
        k, v = self._heads(self.key(kv)), self._heads(self.value(kv))
        scores = (q @ k.transpose(-1, -2)) / (self.head_dim**0.5)  # N,heads,T,Tkv
        probs = self.dropout(scores.softmax(dim=-1))
        return (probs @ v).transpose(1, 2).reshape(n, t, self.num_heads * self.head_dim)  # N,T,heads*d


class SegformerSelfOutput(nn.Module):
    def __init__(self, inner: int, hidden_size: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(inner, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(x))


class SegformerAttention(nn.Module):
    def __init__(self, config: SegformerConfig, hidden_size: int, num_heads: int, sr_ratio: int, head_dim: int):
        super().__init__()
        self.self = SegformerEfficientSelfAttention(hidden_size, num_heads, sr_ratio, config.attention_dropout, head_dim)
        self.output = SegformerSelfOutput(num_heads * head_dim, hidden_size, config.hidden_dropout)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.output(self.self(x, height, width))


class SegformerDWConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        n, _, c = x.shape
        x = x.transpose(1, 2).reshape(n, c, height, width)  # N,C,h,w
        return self.dwconv(x).flatten(2).transpose(1, 2)  # N,h*w,C


class SegformerMixFFN(nn.Module):
    def __init__(self, hidden_size: int, hidden_features: int, dropout: float):
        super().__init__()
        self.dense1 = nn.Linear(hidden_size, hidden_features)
        self.dwconv = SegformerDWConv(hidden_features)
        self.act = nn.GELU()  # exact (erf) GELU, as HF's "gelu"
        self.dense2 = nn.Linear(hidden_features, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = self.dropout(self.act(self.dwconv(self.dense1(x), height, width)))
        return self.dropout(self.dense2(x))


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at inference)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class SegformerLayer(nn.Module):
    def __init__(self, config: SegformerConfig, hidden_size: int, num_heads: int, sr_ratio: int, drop_path: float,
                 widths: tuple[int, int] | None = None):
        super().__init__()
        head_dim = hidden_size // num_heads
        heads, mlp_hidden = widths or (num_heads, hidden_size * config.mlp_ratio)
        self.layer_norm_1 = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.attention = SegformerAttention(config, hidden_size, heads, sr_ratio, head_dim)
        self.drop_path = DropPath(drop_path)
        self.layer_norm_2 = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = SegformerMixFFN(hidden_size, mlp_hidden, config.hidden_dropout)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + self.drop_path(self.attention(self.layer_norm_1(x), height, width))
        return x + self.drop_path(self.mlp(self.layer_norm_2(x), height, width))


class SegformerEncoder(nn.Module):
    """MiT: four stages of overlapping patch embedding, transformer layers and a closing LayerNorm."""

    def __init__(self, config: SegformerConfig):
        super().__init__()
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths)).tolist()
        in_channels = (config.num_channels,) + tuple(config.hidden_sizes[:-1])
        self.patch_embeddings = nn.ModuleList(
            SegformerOverlapPatchEmbeddings(p, s, c, h)
            for p, s, c, h in zip(config.patch_sizes, config.strides, in_channels, config.hidden_sizes)
        )
        self.block = nn.ModuleList()
        start = 0
        for i, depth in enumerate(config.depths):
            self.block.append(nn.ModuleList(
                SegformerLayer(config, config.hidden_sizes[i], config.num_heads[i], config.sr_ratios[i], rates[start + j],
                               config.layer_widths[start + j] if config.layer_widths else None)
                for j in range(depth)
            ))
            start += depth
        self.layer_norm = nn.ModuleList(nn.LayerNorm(h, eps=LAYER_NORM_EPS) for h in config.hidden_sizes)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        features = []
        x = pixels
        for embed, layers, norm in zip(self.patch_embeddings, self.block, self.layer_norm):
            tokens, h, w = embed(x)
            for layer in layers:
                tokens = layer(tokens, h, w)
            tokens = norm(tokens)
            x = tokens.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()  # N,C,h,w
            features.append(x)
        return features


class SegformerMLP(nn.Module):
    """Per-stage Linear of the decode head, applied to every position of an (N, C, h, w) map."""

    def __init__(self, input_dim: int, decoder_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, decoder_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(2).transpose(1, 2))  # N,h*w,D


class SegformerDecodeHead(nn.Module):
    def __init__(self, config: SegformerConfig):
        super().__init__()
        d = config.decoder_dim
        self.linear_c = nn.ModuleList(SegformerMLP(h, d) for h in config.hidden_sizes)
        self.linear_fuse = nn.Conv2d(d * len(config.hidden_sizes), d, kernel_size=1, bias=False)
        self.batch_norm = nn.BatchNorm2d(d)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Conv2d(d, config.num_classes, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        n = features[-1].shape[0]
        target = features[0].shape[2:]
        projected = []
        for x, mlp in zip(features, self.linear_c):
            h, w = x.shape[2], x.shape[3]
            y = mlp(x).transpose(1, 2).reshape(n, -1, h, w)  # N,D,h,w
            projected.append(F.interpolate(y, size=target, mode="bilinear", align_corners=False))
        x = self.linear_fuse(torch.cat(projected[::-1], dim=1))  # HF concatenates [c4, c3, c2, c1]
        x = self.dropout(self.activation(self.batch_norm(x)))
        return self.classifier(x)


class SegformerForSemanticSegmentation(nn.Module):
    """Input: normalized images (N, 3, H, W), any H, W. Output: logits at the first stage's grid (about H/4)."""

    def __init__(self, config: SegformerConfig):
        super().__init__()
        self.config = config
        self.encoder = SegformerEncoder(config)
        self.decode_head = SegformerDecodeHead(config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.encoder(images))


# The published variants (the MiT paper, Table 1); decoder dim 256 for B0/B1, 768 for B2..B5.
SEGFORMER_VARIANTS: dict[str, dict] = {
    "b0": dict(hidden_sizes=(32, 64, 160, 256), depths=(2, 2, 2, 2), decoder_dim=256),
    "b1": dict(hidden_sizes=(64, 128, 320, 512), depths=(2, 2, 2, 2), decoder_dim=256),
    "b2": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 4, 6, 3), decoder_dim=768),
    "b3": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 4, 18, 3), decoder_dim=768),
    "b4": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 8, 27, 3), decoder_dim=768),
    "b5": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 6, 40, 3), decoder_dim=768),
}


# ---- Hugging Face checkpoints -------------------------------------------------------------------

def segformer_config_from_hf(hf: dict, num_classes: int | None = None) -> SegformerConfig:
    """Our config from an HF `config.json` dict (model_type "segformer")."""
    labels = hf.get("id2label") or {}
    return SegformerConfig(
        num_channels=hf.get("num_channels", 3),
        num_classes=num_classes or len(labels) or hf.get("num_labels", 2),
        hidden_sizes=tuple(hf["hidden_sizes"]),
        depths=tuple(hf["depths"]),
        num_heads=tuple(hf["num_attention_heads"]),
        sr_ratios=tuple(hf["sr_ratios"]),
        patch_sizes=tuple(hf["patch_sizes"]),
        strides=tuple(hf["strides"]),
        mlp_ratio=int(hf["mlp_ratios"][0]) if isinstance(hf.get("mlp_ratios"), list) else 4,
        decoder_dim=hf.get("decoder_hidden_size", 256),
        drop_path_rate=hf.get("drop_path_rate", 0.1),
        classifier_dropout=hf.get("classifier_dropout_prob", 0.1),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.0),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.0),
    )


# transformers 5.x renames SegFormer's parameters in memory (`segformer.stages.{i}.blocks.{j}...`);
# files it writes with save_pretrained keep the on-disk names, but a torch.save(model.state_dict())
# from 5.x has the new ones. Both load.
_HF5_RENAMES = [
    (re.compile(r"^segformer\.stages\.(\d+)\.patch_embeddings\."), r"encoder.patch_embeddings.\1."),
    (re.compile(r"^segformer\.stages\.(\d+)\.layer_norm\."), r"encoder.layer_norm.\1."),
    (re.compile(r"^segformer\.stages\.(\d+)\.blocks\.(\d+)\."), r"encoder.block.\1.\2."),
    (re.compile(r"\.layernorm_before\."), ".layer_norm_1."),
    (re.compile(r"\.layernorm_after\."), ".layer_norm_2."),
    (re.compile(r"\.attention\.q_proj\."), ".attention.self.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.self.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.self.value."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.attention\.sequence_reduction\.sequence_reduction\."), ".attention.self.sr."),
    (re.compile(r"\.attention\.sequence_reduction\.layer_norm\."), ".attention.self.layer_norm."),
    (re.compile(r"\.mlp\.fc1\."), ".mlp.dense1."),
    (re.compile(r"\.mlp\.fc2\."), ".mlp.dense2."),
    (re.compile(r"^decode_head\.linear_projections\."), "decode_head.linear_c."),
]


def segformer_state_dict_from_hf(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """HF keys (on-disk names, or transformers 5.x in-memory names) -> ours. Returns (state dict,
    has_decode_head). Encoder-only MiT checkpoints (ImageNet classifiers) keep `segformer.encoder.*`
    and drop their image classifier."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("segformer.stages.") or key.startswith("decode_head.linear_projections."):
            for pattern, repl in _HF5_RENAMES:
                key = pattern.sub(repl, key)
        if key.startswith("segformer.encoder."):
            out[key[len("segformer."):]] = value
        elif key.startswith(("encoder.", "decode_head.")):
            out[key] = value
    return out, any(k.startswith("decode_head.") for k in out)


# ---- exact decoder fold -------------------------------------------------------------------------
# The All-MLP decoder is linear up to its ReLU: per-stage Linear A_i (+ b_i), bilinear upsampling U (per
# channel, weights summing to 1, so U(const) = const), concatenation, the 1x1 fuse conv W (no bias) and an
# eval-mode BatchNorm (per-channel affine g, h). With W_i the fuse conv's slice for stage i:
#     BN(sum_i W_i U(A_i x_i + b_i)) = sum_i U(g*W_i A_i x_i) + g*sum_i W_i b_i + h
# so each stage projects straight to the decoder width with the folded matrix and only the D-channel result
# is upsampled; the 4D->D conv on the H/4 grid (about half of B0's compute) disappears.

class FoldedSegformerDecodeHead(nn.Module):
    """The decode head after folding: per-stage 1x1 convolution to D (the stage's Linear, fuse conv and
    BatchNorm folded into one matrix), upsample, sum, ReLU, classifier. Same outputs as SegformerDecodeHead
    in eval mode."""

    def __init__(self, head: SegformerDecodeHead):
        super().__init__()
        d = head.linear_fuse.out_channels
        n = len(head.linear_c)
        w = head.linear_fuse.weight.detach().reshape(d, n * d)  # D x 4D, input order [c4, c3, c2, c1]
        g, h = batchnorm_affine(head.batch_norm)
        self.proj = nn.ModuleList()
        bias_total = h.detach().clone()
        for i, mlp in enumerate(head.linear_c):
            w_i = w[:, (n - 1 - i) * d:(n - i) * d]  # this stage's slice (reversed concatenation)
            a, b = mlp.proj.weight.detach(), mlp.proj.bias.detach()
            # a 1x1 convolution on the encoder's (N, C, h, w) map: the same matrix as a Linear over tokens,
            # without the two layout Transposes around it (the larger one on the D x H/4 x W/4 result)
            conv = nn.Conv2d(a.shape[1], d, kernel_size=1, bias=i == 0)
            conv.weight.data = (g[:, None] * (w_i @ a))[:, :, None, None].contiguous()
            self.proj.append(conv)
            bias_total += g * (w_i @ b)
        # every stage's bias, summed, on the first stage's conv (already at the output grid): no separate Add
        self.proj[0].bias.data = bias_total.detach()
        self.activation = nn.ReLU()
        self.classifier = copy.deepcopy(head.classifier)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        target = features[0].shape[2:]
        total = None
        for x, conv in zip(features, self.proj):
            y = conv(x)  # N,D,h,w
            if tuple(y.shape[2:]) != tuple(target):
                y = F.interpolate(y, size=target, mode="bilinear", align_corners=False)
            total = y if total is None else total + y
        x = self.activation(total)
        return self.classifier(x)


@torch.no_grad()
def fold_segformer(model: SegformerForSemanticSegmentation) -> SegformerForSemanticSegmentation:
    """A copy of `model` (eval mode) with its decode head replaced by the folded one."""
    folded = copy.deepcopy(model).eval()
    folded.decode_head = FoldedSegformerDecodeHead(model.decode_head.eval())  # type: ignore[assignment]
    return folded


# ---- pruning ------------------------------------------------------------------------------------

def _prune_attention_and_mlp(sd: dict, config: SegformerConfig, ratio: float, heads_on: bool, mlp_on: bool) -> list:
    """Remove whole heads and Mix-FFN channels (with their depthwise conv) per layer; returns the widths."""
    widths = []
    for s, depth in enumerate(config.depths):
        hidden = config.hidden_sizes[s]
        d = hidden // config.num_heads[s]
        for j in range(depth):
            a, m = f"encoder.block.{s}.{j}.attention.", f"encoder.block.{s}.{j}.mlp."
            h = sd[a + "self.query.weight"].shape[0] // d
            if heads_on and h > 1:
                w_out = sd[a + "output.dense.weight"]
                score = (w_out.abs().reshape(hidden, h, d).sum(dim=(0, 2))
                         * sd[a + "self.value.weight"].abs().reshape(h, d, hidden).sum(dim=(1, 2)))
                kept = top_indices(score, keep_count(h, ratio))
                rows = head_rows(kept, d)
                for name in ("query", "key", "value"):
                    for leaf in ("weight", "bias"):
                        sd[f"{a}self.{name}.{leaf}"] = sd[f"{a}self.{name}.{leaf}"][rows]
                sd[a + "output.dense.weight"] = w_out[:, rows]
                h = len(kept)
            if mlp_on:
                score = sd[m + "dense1.weight"].abs().sum(1) * sd[m + "dense2.weight"].abs().sum(0)
                kept = top_indices(score, keep_count(score.numel(), ratio))
                for key in ("dense1.weight", "dense1.bias", "dwconv.dwconv.weight", "dwconv.dwconv.bias"):
                    sd[m + key] = sd[m + key][kept]
                sd[m + "dense2.weight"] = sd[m + "dense2.weight"][:, kept]
            widths.append((h, sd[m + "dense1.weight"].shape[0]))
    return widths


def _prune_decoder_channels(sd: dict, config: SegformerConfig, ratio: float) -> int:
    """Remove decoder channels: per-stage projection outputs and the fuse conv / BatchNorm channels."""
    dd, n = config.decoder_dim, len(config.hidden_sizes)
    keep = keep_count(dd, ratio)
    fuse = sd["decode_head.linear_fuse.weight"][:, :, 0, 0]  # D x nD, input order [c4 .. c1]
    columns = []
    for i in range(n):
        sl = slice((n - 1 - i) * dd, (n - i) * dd)
        proj = sd[f"decode_head.linear_c.{i}.proj.weight"]
        kept = top_indices(proj.abs().sum(1) * fuse[:, sl].abs().sum(0), keep)
        sd[f"decode_head.linear_c.{i}.proj.weight"] = proj[kept]
        sd[f"decode_head.linear_c.{i}.proj.bias"] = sd[f"decode_head.linear_c.{i}.proj.bias"][kept]
        columns.append((n - 1 - i, kept + (n - 1 - i) * dd))
    in_cols = torch.cat([c for _, c in sorted(columns)])  # back in concatenation order
    g = sd["decode_head.batch_norm.weight"].abs() / torch.sqrt(sd["decode_head.batch_norm.running_var"] + 1e-5)
    out_kept = top_indices(fuse.abs().sum(1) * g * sd["decode_head.classifier.weight"][:, :, 0, 0].abs().sum(0), keep)
    sd["decode_head.linear_fuse.weight"] = sd["decode_head.linear_fuse.weight"][out_kept][:, in_cols]
    for key in ("weight", "bias", "running_mean", "running_var"):
        sd[f"decode_head.batch_norm.{key}"] = sd[f"decode_head.batch_norm.{key}"][out_kept]
    sd["decode_head.classifier.weight"] = sd["decode_head.classifier.weight"][:, out_kept]
    return keep


# ---- the family ---------------------------------------------------------------------------------

class SegformerFamily(ModelFamily):
    name = "segformer"
    display_name = "SegFormer"
    config_class = SegformerConfig
    model_class = SegformerForSemanticSegmentation
    head_prefix = "decode_head."
    # the SegFormer recipe (AdamW, warm-up, poly decay) at 10x the paper's lr: the paper's 6e-5 assumes an
    # ImageNet-pretrained encoder; from random weights 6e-4 learns within a few epochs
    recipe = TrainingRecipe("adamw", 6e-4, 0.01, "warmup-poly")
    pruning_parts = ("heads", "mlp", "channels")
    huggingface = HuggingFaceMapping("segformer", "SegformerForSemanticSegmentation", segformer_config_from_hf,
                                     segformer_state_dict_from_hf, image_size=(512, 512))

    def architectures(self) -> list[Architecture]:
        archs = []
        for v, widths in SEGFORMER_VARIANTS.items():
            # our default class count is the Pet trimap's 3; HF's ADE20k checkpoints (150) load with theirs
            cfg = SegformerConfig(num_classes=3, **widths)
            name = f"segformer-{v}"
            archs.append(Architecture(name, self.name, cfg, 512, IMAGENET_MEAN, IMAGENET_STD,
                                      f"SegFormer-{v.upper()} (MiT-{v} + All-MLP decoder)"))
            big = cfg.decoder_dim == 768  # B2..B5: deeper stages, the 768-wide decoder
            tiny = replace(cfg, hidden_sizes=(8, 16, 16, 16), depths=(1, 2, 1, 1) if big else (1, 1, 1, 1),
                           num_heads=(1, 2, 2, 2), decoder_dim=16 if big else 8)
            archs.append(Architecture(f"{name}-test", self.name, tiny, 64, IMAGENET_MEAN, IMAGENET_STD,
                                      f"tiny twin of {name}", name))
        return archs

    def locate_boundaries(self, model: nn.Module) -> list[Boundary]:
        c = model.config
        found = [Boundary("input", "normalized input")]
        for i, depth in enumerate(c.depths):
            embed, stage = f"encoder.patch_embeddings.{i}", f"encoder.layer_norm.{i}"
            found += [Boundary(f"{embed}.layer_norm", f"stage {i + 1} patch embedding",
                               reads="input" if i == 0 else f"encoder.layer_norm.{i - 1}"),
                      Boundary(f"{embed}.proj", "patch embedding convolution", 2, f"{embed}.layer_norm")]
            for j in range(depth):
                block = f"encoder.block.{i}.{j}"
                found.append(Boundary(block, f"stage {i + 1} block {j}", 1, stage))
                found += [Boundary(f"{block}.{part}", kind, 2, block) for part, kind in (
                    ("layer_norm_1", "layer norm before attention"), ("attention", "attention"),
                    ("layer_norm_2", "layer norm before the Mix-FFN"), ("mlp", "Mix-FFN"))]
            found.append(Boundary(stage, f"stage {i + 1} output", reads=f"{embed}.layer_norm"))
        head = model.decode_head
        if isinstance(head, FoldedSegformerDecodeHead):  # the exact rewrite: linear_c.i, its slice of the fuse conv
            # and the BatchNorm in one 1x1 convolution; compared with the folded PyTorch head's
            found += [Boundary(f"decode_head.proj.{i}", f"decoder projection {i + 1} (folded)", reads=f"encoder.layer_norm.{i}")
                      for i in range(len(head.proj))]
        else:
            found += [Boundary(f"decode_head.linear_c.{i}", f"decoder projection {i + 1}", reads=f"encoder.layer_norm.{i}")
                      for i in range(len(head.linear_c))]
            found += [Boundary("decode_head.linear_fuse", "fused features"),
                      Boundary("decode_head.batch_norm", "BatchNorm", reads="decode_head.linear_fuse")]
        return found + [Boundary("decode_head.activation", "fused features after ReLU"),
                        Boundary("decode_head.classifier", "classifier logits (H/4)", reads="decode_head.activation"),
                        Boundary("logits", "upsampled logits", reads="decode_head.classifier")]

    def fold(self, model: nn.Module) -> tuple[nn.Module, list[str]]:
        return fold_segformer(model), ["segformer-decoder: fuse conv + BatchNorm folded into per-stage projections"]

    def prune(self, state_dict: dict, config: SegformerConfig, ratio: float, parts: set[str]) -> SegformerConfig:
        widths = _prune_attention_and_mlp(state_dict, config, ratio, "heads" in parts, "mlp" in parts)
        config = replace(config, layer_widths=tuple(widths))
        if "channels" in parts:
            config = replace(config, decoder_dim=_prune_decoder_channels(state_dict, config, ratio))
        return config

    def reset_classifier(self, model: nn.Module, num_classes: int) -> nn.Module:
        model.config = replace(model.config, num_classes=num_classes)
        model.decode_head.classifier = nn.Conv2d(model.config.decoder_dim, num_classes, kernel_size=1)
        return model

    def name_for(self, config: SegformerConfig) -> str:
        for v, d in SEGFORMER_VARIANTS.items():
            if tuple(config.hidden_sizes) == d["hidden_sizes"] and tuple(config.depths) == d["depths"]:
                return f"segformer-{v}"
        return "segformer-custom"


SEGFORMER = register_family(SegformerFamily())
