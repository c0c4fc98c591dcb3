"""What candidate exact rewrites of SegFormer's exported graph would buy on the CPU (ONNX Runtime f32, OpenVINO at
each --precisions), measured side by side in ONE interleaved run (issue 36: "exact rewrites of the graph ... and what each change bought, measured").

    python scripts/bench_rewrites.py RUN_DIR [--size 512] [--precisions f32,bf16] [--iters 30] [--threads 2]

Each candidate starts from the module vitseg exports today (`exported_module`: the folded decoder) and changes one
thing that is equal in real arithmetic:

- logits-matmul: the final bilinear upsampling of the logits (H/4 -> H) as two matrix products with its 1-D
  interpolation matrices, A @ L @ B^T, instead of one Interpolate (OpenVINO's planar Interpolate is slow for a few
  classes; the products cost C*H*(h*w + W*w) MACs, so this only pays for small class counts)
- decoder-matmul: the decoder's three upsamplings, each as A_i @ Y_i @ B_i^T, summed
- query-scale: attention's 1/sqrt(d) folded into the query projection (no Divide on the scores)
- layernorm-affine: LayerNorm's scale and shift folded into the layers that read it (query, key, value, the
  reduction conv, the MLP's first Linear), leaving a bare normalization
- both that paid: logits-matmul and layernorm-affine together

Every candidate's largest logit difference from the unchanged module (PyTorch, f32) is printed, as is its pixel
agreement with PyTorch as each runtime runs it; the latencies are medians of interleaved rounds with a pause before
every call, and their ratios against the unchanged module in the same runtime and precision are what to read. None
of these is in vitseg's exports: docs/benchmarks.md says what each bought and why none was adopted.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from vitseg_export.checkpoint import load_checkpoint
from vitseg_export.export.graph import module_to_onnx
from vitseg_export.machine.cpu import cpu_info
from vitseg_export.machine.timing import interleaved_medians
from vitseg_export.modeling.export_graph import ExportGraph, exported_module
from vitseg_export.modeling.registry import Segmenter
from vitseg_export.modeling.segformer import FoldedSegformerDecodeHead, SegformerEfficientSelfAttention, SegformerLayer
from vitseg_export.runners.onnxruntime_runner import session_options
from vitseg_export.runners.openvino_runner import openvino_core
from vitseg_export.settings import OnnxExportSettings


def interpolation_matrix(out_n: int, in_n: int) -> torch.Tensor:
    """PyTorch's 1-D bilinear weights (align_corners=False, input index clamped at both ends) as out_n x in_n."""
    m = torch.zeros(out_n, in_n, dtype=torch.float64)
    for o in range(out_n):
        src = max((o + 0.5) * in_n / out_n - 0.5, 0.0)
        i0 = min(int(math.floor(src)), in_n - 1)
        m[o, i0] += 1 - (src - i0)
        m[o, min(i0 + 1, in_n - 1)] += src - i0
    return m.float()


class MatmulLogits(nn.Module):
    """A Segmenter whose final upsampling is A @ logits @ B^T."""

    def __init__(self, segmenter: Segmenter, size: tuple[int, int], grid: tuple[int, int]):
        super().__init__()
        self.segmenter = segmenter
        self.register_buffer("rows", interpolation_matrix(size[0], grid[0]))
        self.register_buffer("cols_t", interpolation_matrix(size[1], grid[1]).t().contiguous())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.segmenter
        x = pixels if s.identity_norm else (pixels - s.mean) / s.std
        return (self.rows @ s.net(x)) @ self.cols_t


class MatmulDecoder(nn.Module):
    """The folded decode head with each stage's upsampling as A_i @ Y_i @ B_i^T."""

    def __init__(self, head: FoldedSegformerDecodeHead, grids: list[tuple[int, int]]):
        super().__init__()
        self.proj, self.activation, self.classifier = head.proj, head.activation, head.classifier
        (height, width), self.stages = grids[0], len(grids)
        for i, (h, w) in enumerate(grids[1:], 1):
            self.register_buffer(f"rows{i}", interpolation_matrix(height, h))
            self.register_buffer(f"cols_t{i}", interpolation_matrix(width, w).t().contiguous())

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        total = self.proj[0](features[0])
        for i in range(1, self.stages):
            total = total + (getattr(self, f"rows{i}") @ self.proj[i](features[i])) @ getattr(self, f"cols_t{i}")
        return self.classifier(self.activation(total))


def _unscaled_attention(self: SegformerEfficientSelfAttention, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """SegformerEfficientSelfAttention.forward without the 1/sqrt(d) (folded into the query projection)."""
    n, t, c = x.shape
    q = self._heads(self.query(x))
    kv = x
    if self.sr_ratio > 1:
        kv = self.layer_norm(self.sr(x.transpose(1, 2).reshape(n, c, height, width)).reshape(n, c, -1).transpose(1, 2))
    k, v = self._heads(self.key(kv)), self._heads(self.value(kv))
    probs = (q @ k.transpose(-1, -2)).softmax(dim=-1)
    return (probs @ v).transpose(1, 2).reshape(n, t, self.num_heads * self.head_dim)


def query_scale(segmenter: Segmenter) -> Segmenter:
    out = copy.deepcopy(segmenter)
    for m in out.modules():
        if isinstance(m, SegformerEfficientSelfAttention):
            m.query.weight.mul_(m.head_dim ** -0.5)
            m.query.bias.mul_(m.head_dim ** -0.5)
            m.forward = types.MethodType(_unscaled_attention, m)
    return out


def _fold_affine_into(layer: nn.Linear | nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """layer(scale * x + shift) == layer'(x): exact for a Linear, and for a convolution without padding."""
    w = layer.weight if layer.weight.dim() == 4 else layer.weight[:, :, None, None]
    layer.bias.add_((w * shift[None, :, None, None]).sum(dim=(1, 2, 3)))
    layer.weight.mul_(scale.reshape(1, -1, *([1] * (layer.weight.dim() - 2))))


def _bare(norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    scale, shift = norm.weight.clone(), norm.bias.clone()
    norm.weight.fill_(1.0)
    norm.bias.zero_()
    return scale, shift


def layernorm_affine(segmenter: Segmenter) -> Segmenter:
    out = copy.deepcopy(segmenter)
    for layer in out.modules():
        if not isinstance(layer, SegformerLayer):
            continue
        attention = layer.attention.self
        scale, shift = _bare(layer.layer_norm_1)
        readers = [attention.query] + ([attention.sr] if attention.sr_ratio > 1 else [attention.key, attention.value])
        for reader in readers:  # the reduction conv has kernel == stride and no padding: exact
            _fold_affine_into(reader, scale, shift)
        if attention.sr_ratio > 1:
            scale, shift = _bare(attention.layer_norm)
            for reader in (attention.key, attention.value):
                _fold_affine_into(reader, scale, shift)
        _fold_affine_into(layer.mlp.dense1, *_bare(layer.layer_norm_2))
    return out


@torch.no_grad()
def candidates(segmenter: Segmenter, size: tuple[int, int]) -> dict[str, nn.Module]:
    grids = [tuple(f.shape[2:]) for f in segmenter.net.encoder(torch.zeros(1, 3, *size))]
    decoder = copy.deepcopy(segmenter)
    decoder.net.decode_head = MatmulDecoder(decoder.net.decode_head, grids)
    return {"as exported": segmenter, "logits-matmul": MatmulLogits(segmenter, size, grids[0]),
            "decoder-matmul": decoder, "query-scale": query_scale(segmenter),
            "layernorm-affine": layernorm_affine(segmenter),
            "both that paid": MatmulLogits(layernorm_affine(segmenter), size, grids[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a SegFormer run directory, Hugging Face directory or architecture name")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--precisions", default="f32,bf16", help="OpenVINO inference precisions to compile each in")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=2, help="random images the agreement is measured on")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = (args.size, args.size)
    loaded = load_checkpoint(args.checkpoint)
    if loaded.meta.family != "segformer":
        raise SystemExit(f"{args.checkpoint} is a {loaded.meta.family}; these rewrites are SegFormer's")
    segmenter, _ = exported_module(loaded.model, loaded.meta.mean, loaded.meta.std)
    info = cpu_info()
    flags = [f for f, present in {**info["int8_features"], **info["bf16_features"]}.items() if present]
    print(f"CPU: {info['model']} ({info['cores']} cores, class {info['class']}); flags: {', '.join(flags)}; "
          f"threads {args.threads}; {args.size}x{args.size}, batch 1")
    images = torch.rand(args.images, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = segmenter(images)
    with tempfile.TemporaryDirectory(prefix="vitseg-rewrites-") as work:
        calls = compiled(candidates(segmenter, size), images, reference, args, Path(work))
    timed(calls, images[:1].numpy(), args.iters)


def compiled(modules: dict[str, nn.Module], images: torch.Tensor, reference: torch.Tensor, args, work: Path) -> dict:
    """Each candidate exported (static ONNX), in ONNX Runtime (f32) and compiled by OpenVINO at each precision;
    prints its drift and agreement. Returns a call per (candidate, runtime)."""
    core, calls = openvino_core(), {}
    settings = OnnxExportSettings(dynamic_batch=False)
    size = tuple(images.shape[2:])
    for name, module in modules.items():
        with torch.no_grad():
            drift = float((module(images) - reference).abs().max())
        path = work / f"{name}.onnx"
        onnx.save(module_to_onnx(ExportGraph(module, ["logits"]).eval(), size, settings), str(path))
        session = ort.InferenceSession(str(path), session_options(threads=args.threads, spin=False),
                                       providers=["CPUExecutionProvider"])
        run = (lambda sess: (lambda x: sess.run(None, {"pixels": x})))(session)
        calls[(name, "onnxruntime f32")] = run
        report(name, "onnxruntime f32", drift, run, images, reference)
        for precision in args.precisions.split(","):
            model = core.compile_model(str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": args.threads,
                                                          "INFERENCE_PRECISION_HINT": precision})
            # what OpenVINO computes in (a CPU without bf16 arithmetic runs f32 when asked for bf16)
            runtime = "openvino " + model.get_property("INFERENCE_PRECISION_HINT").to_string()
            run = (lambda request: (lambda x: request.infer({0: x})))(model.create_infer_request())
            calls[(name, runtime)] = run
            report(name, runtime, drift, run, images, reference)
    return calls


def report(name: str, runtime: str, drift: float, run, images: torch.Tensor, reference: torch.Tensor) -> None:
    logits = np.concatenate([run(images[i:i + 1].numpy())[0] for i in range(images.shape[0])])
    agreement = float((logits.argmax(1) == reference.numpy().argmax(1)).mean())
    print(f"{name:18s} {runtime:16s} max |logit - unchanged| {drift:.1e} (PyTorch f32); "
          f"agreement with PyTorch {100 * agreement:.3f}%", flush=True)


def timed(calls: dict, pixels: np.ndarray, iters: int) -> None:
    """Interleaved rounds (every candidate once per round, a pause before each call); prints the medians as a table."""
    medians = interleaved_medians(calls, iters, pixels)
    print("\n| candidate | runtime | p50 | vs as exported |\n|---|---|---|---|")
    for (name, runtime), ms in medians.items():
        base = medians[("as exported", runtime)]  # the unchanged module, same runtime and precision
        print(f"| {name} | {runtime} | {ms:.2f} ms | {base / ms:.3f}x |")


if __name__ == "__main__":
    main()
