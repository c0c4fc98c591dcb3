from __future__ import annotations

import pytest
import torch

from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx
from vitseg_export.modeling import registry
from vitseg_export.modeling.optimize import fold
from vitseg_export.modeling.segformer import FoldedSegformerDecodeHead

SEGFORMERS = [f"segformer-b{i}" for i in range(6)]


def _randomize_batchnorms(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("name", SEGFORMERS)
def test_segformer_decoder_fold_is_exact_on_every_size(random_model, name):
    model, _ = random_model(name)
    _randomize_batchnorms(model)
    folded, rewrites = fold(model)
    assert isinstance(folded.decode_head, FoldedSegformerDecodeHead) and rewrites
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.decode_head.modules())
    x = torch.rand(1, 3, 75, 99)  # not a multiple of 32: every stage is resampled
    with torch.no_grad():
        ref, out = model(x), folded(x)
    scale = ref.abs().max().item()
    assert (ref - out).abs().max().item() <= 1e-5 * max(1.0, scale)
    assert registry.count_parameters(folded) < registry.count_parameters(model)


def test_vit_input_batchnorm_fold_is_exact(random_model):
    model, _ = random_model("vit-seg-small-test")
    _randomize_batchnorms(model)
    folded, rewrites = fold(model)
    assert rewrites == ["vit: input BatchNorm folded into the patch embedding"]
    assert isinstance(folded.input_norm, torch.nn.Identity)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - folded(x)).abs().max().item() <= 1e-5


def test_fold_does_not_touch_the_original(twin):
    loaded = twin("segformer-b0-test")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    fold(loaded.model)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())


def test_export_folds_by_default_and_the_graph_is_smaller(tmp_path, twin):
    loaded = twin("segformer-b2-test")
    _randomize_batchnorms(loaded.model)
    folded = export_onnx(loaded, tmp_path / "f.onnx", OnnxExportSettings())
    plain = export_onnx(loaded, tmp_path / "p.onnx", OnnxExportSettings(fold=False))
    assert folded.manifest.rewrites and plain.manifest.rewrites == []
    assert folded.manifest.self_parity["max_abs_logit_diff"] < 1e-4  # judged against the unfolded model
    ops = lambda m: [n.op_type for n in m.graph.node]  # noqa: E731
    assert "BatchNormalization" not in ops(folded.model_proto)
    assert folded.manifest.size_bytes < plain.manifest.size_bytes
