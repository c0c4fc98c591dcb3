from __future__ import annotations

import json

import pytest
import torch

from vitseg_export.checkpoint import load_checkpoint
from vitseg_export.errors import VitsegError
from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx
from vitseg_export.modeling import registry
from vitseg_export.modeling.pruning import apply_2to4, check_2to4, mask_2to4, prune_model
from vitseg_export.verdict.verify import verify_artifact


@torch.no_grad()
def test_pruning_units_that_contribute_nothing_leaves_outputs_unchanged(random_model):
    """Zero the output weights of half the heads / MLP channels / decoder channels: importance 0, so
    exactly those are removed, and the pruned model must compute the same function. This checks the
    index bookkeeping of every tensor the pruning touches."""
    model, arch = random_model("segformer-b2-test")
    cfg = arch.config
    for s, depth in enumerate(cfg.depths):
        d = cfg.hidden_sizes[s] // cfg.num_heads[s]
        for j in range(depth):
            layer = model.encoder.block[s][j]
            h = cfg.num_heads[s]
            if h > 1:
                layer.attention.output.dense.weight[:, : (h // 2) * d] = 0  # the first half of the heads write nothing
            hidden = layer.mlp.dense2.weight.shape[1]
            layer.mlp.dense2.weight[:, : hidden // 2] = 0
    dd = cfg.decoder_dim
    model.decode_head.linear_fuse.weight[:, :, 0, 0].view(dd, 4, dd)[:, :, : dd // 2] = 0  # half of each stage's inputs
    model.decode_head.classifier.weight[:, : dd // 2] = 0  # half of the fuse outputs unused
    pruned, report = prune_model(model, "segformer", 0.5, "all")
    assert pruned.config.decoder_dim == dd // 2 and report["params_after"] < report["params_before"]
    x = torch.rand(2, 3, 64, 80)
    assert (pruned(x) - model(x)).abs().max().item() < 1e-5


@torch.no_grad()
def test_vit_head_and_mlp_pruning_is_exact_on_dead_units(random_model):
    model, arch = random_model("vit-seg-small-test")
    e, h = arch.config.embed_dim, arch.config.num_heads
    d = e // h
    for block in model.blocks:
        block.attn.out_proj.weight[:, : (h // 2) * d] = 0
        block.mlp.fc2.weight[:, : block.mlp.fc2.weight.shape[1] // 2] = 0
    pruned, _ = prune_model(model, "vit", 0.5, "all")
    assert pruned.config.block_widths == ((h // 2, model.blocks[0].mlp.fc1.out_features // 2),)
    x = torch.rand(2, 3, 32, 32)
    assert (pruned(x) - model(x)).abs().max().item() < 1e-5


def test_bad_prune_requests(random_model):
    model, _ = random_model("vit-seg-tiny-test")
    with pytest.raises(VitsegError, match="vit family has no channels to prune"):
        prune_model(model, "vit", 0.25, "channels")
    with pytest.raises(VitsegError, match="outside"):
        prune_model(model, "vit", 1.0, "all")


@pytest.mark.parametrize("name", ["segformer-b0-test", "vit-seg-base-test"])
def test_pruned_checkpoint_exports_verifies_and_loads_without_the_original(tmp_path, cli, name):
    r = cli("prune", name, "--ratio", "0.5", "--method", "all", "--output", str(tmp_path / "p"),
            "--finetune-epochs", "1", "--data", "synthetic[:8]", "--num-images", "4", "--batch-size", "4")
    assert r.exit_code == 0, r.stderr
    report = json.loads((tmp_path / "p" / "prune.json").read_text())
    assert report["params_after"] < report["params_before"]
    for key in ("before", "after_pruning", "after_finetuning"):
        assert 0 <= report[key]["pixel_accuracy"] <= 1
    config = json.loads((tmp_path / "p" / "config.json").read_text())["model_config"]
    assert config.get("layer_widths") or config.get("block_widths")
    loaded = load_checkpoint(tmp_path / "p")  # config alone rebuilds the pruned widths
    assert registry.count_parameters(loaded.model) == report["params_after"]
    export_onnx(loaded, tmp_path / "p.onnx", OnnxExportSettings())
    assert verify_artifact(tmp_path / "p.onnx", str(tmp_path / "p"), "synthetic[:3]", 3).passed


def test_2to4_masks_and_checker(random_model):
    w = torch.randn(8, 16)
    m = mask_2to4(w)
    assert m.shape == w.shape and (m.reshape(-1, 4).sum(1) == 2).all()
    kept = (w * m).abs().reshape(-1, 4)
    assert torch.equal(kept.topk(2, dim=1).values, w.abs().reshape(-1, 4).topk(2, dim=1).values)  # the largest survive
    conv = torch.randn(4, 8, 3, 3)
    mc = mask_2to4(conv)
    assert (mc.permute(0, 2, 3, 1).reshape(-1, 4).sum(1) == 2).all()  # groups run along input channels
    model, _ = random_model("segformer-b0-test")
    before = check_2to4(model)
    assert before["violations"] and not before["sparse_layers"]  # a dense model fails the check
    apply_2to4(model)
    after = check_2to4(model)
    assert not after["violations"] and len(after["sparse_layers"]) == before["checked"]


def test_2to4_survives_finetuning(tmp_path, cli):
    r = cli("prune", "segformer-b0-test", "--ratio", "0.25", "--method", "mlp", "--sparsity", "2:4",
            "--finetune-epochs", "1", "--data", "synthetic[:8]", "--num-images", "2", "--batch-size", "4",
            "--output", str(tmp_path / "s"))
    assert r.exit_code == 0, r.stderr
    model = load_checkpoint(tmp_path / "s").model
    assert check_2to4(model)["violations"] == []
    assert json.loads((tmp_path / "s" / "prune.json").read_text())["sparsity_check"]["sparse_layers"]
