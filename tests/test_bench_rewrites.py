"""scripts/bench_rewrites.py times candidate rewrites it calls exact: each must compute what the exported module does
(PyTorch, f32), or its timing says nothing about a rewrite vitseg could ship."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_rewrites():
    spec = importlib.util.spec_from_file_location("bench_rewrites", ROOT / "scripts" / "bench_rewrites.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("out_n,in_n", [(128, 16), (64, 32), (23, 10), (7, 9)])
def test_interpolation_matrix_is_pytorch_bilinear(bench_rewrites, out_n, in_n):
    x = torch.randn(2, 3, in_n, in_n)
    a = bench_rewrites.interpolation_matrix(out_n, in_n)
    expected = F.interpolate(x, size=(out_n, out_n), mode="bilinear", align_corners=False)
    assert torch.allclose(a @ x @ a.t(), expected, atol=1e-5)


def test_every_candidate_computes_the_exported_module(bench_rewrites):
    from vitseg_export.checkpoint import load_checkpoint
    from vitseg_export.modeling.export_graph import exported_module

    loaded = load_checkpoint(ROOT / "models" / "segformer-b0-test-synthetic")  # trained: real LayerNorm affines
    segmenter, _ = exported_module(loaded.model, loaded.meta.mean, loaded.meta.std)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    modules = bench_rewrites.candidates(segmenter, (64, 64))
    assert set(modules) == {"as exported", "logits-matmul", "decoder-matmul", "query-scale", "layernorm-affine",
                            "both that paid"}
    with torch.no_grad():
        reference = segmenter(images)
        for name, module in modules.items():
            assert torch.allclose(module(images), reference, atol=1e-4), name
        # the candidates changed the weights they claim to, without touching the module they started from
        bare = modules["layernorm-affine"].net.encoder.block[0][0].layer_norm_1
        assert torch.equal(bare.weight, torch.ones_like(bare.weight))
        assert not torch.equal(segmenter.net.encoder.block[0][0].layer_norm_1.weight, bare.weight)
