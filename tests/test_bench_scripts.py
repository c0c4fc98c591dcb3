"""The benchmark scripts' own logic: scripts/bench_rewrites.py times candidate rewrites it calls exact (each must
compute what the exported module does, PyTorch f32, or its timing says nothing about a rewrite vitseg could ship);
scripts/bench_cpu.py's report prints the tables it has rows for."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_rewrites():
    return _script("bench_rewrites")


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


def test_bench_cpu_report_has_the_probe_table_only_with_probe_rows():
    bench_cpu = _script("bench_cpu")
    cpu = {"model": "Test CPU", "cores": 2, "int8_features": {"avx2": True, "avx512_vnni": False},
           "bf16_features": {"avx512_bf16": False}}
    row = {"row": "vitseg openvino fp32 IR", "latency_ms": 30.0, "speedup": 2.0, "computes_in": "f32",
           "pixel_agreement": 1.0, "miou_vs_reference": 1.0, "passed": True}
    result = {"environment": {"cpu": cpu}, "threads": 2, "matmul_peak_gflops": 100.0,
              "matmul_gflops_by_library": {"torch": 100.0}, "segformer": {"model": "segformer", "size": [512, 512],
              "rows": [row]}, "vit": None, "probe": [], "targets": ["a target line"]}
    text = bench_cpu.markdown(result)
    assert "| vitseg openvino fp32 IR | f32 | 30.0 ms | 2.00x | 100.00% | 100.00 | verified |" in text
    assert "per op type" not in text and text.endswith("a target line\n")
    probe = {"runtime": "openvino", "made_for": "vnni", "op": "MatMul", "shape": [64, 64], "baseline_ms": 1.0,
             "candidate_ms": 0.5, "speedup": 2.0, "low": 1.8, "high": 2.2, "outcome": "int8"}
    text = bench_cpu.markdown({**result, "probe": [probe]})
    assert "### int8 vs fp32 per op type" in text
    assert "| openvino | vnni | MatMul | 64x64 | 1.000 ms | 0.500 ms | 2.00x (1.80-2.20) | int8 |" in text
