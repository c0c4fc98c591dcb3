"""A third model family, defined in this one file: it registers itself and goes through checkpoint ->
train -> export -> verify -> profile through the public API. Nothing else in vitseg names it, which
proves a new family touches no other file."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn

from vitseg_export.checkpoint import load_checkpoint, save_checkpoint
from vitseg_export.errors import VitsegError
from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx
from vitseg_export.measure.profiling import profile
from vitseg_export.modeling import registry
from vitseg_export.modeling.registry import IMAGENET_MEAN, IMAGENET_STD, Architecture, ModelFamily, TrainingRecipe
from vitseg_export.verdict.verify import verify_artifact


@dataclass(frozen=True)
class ToySegConfig:
    num_classes: int = 3
    width: int = 8


class ToySegNet(nn.Module):
    """Conv (stride 2) -> BatchNorm -> ReLU -> 1x1 classifier: logits at H/2, upsampled by the Segmenter."""

    def __init__(self, config: ToySegConfig):
        super().__init__()
        self.config = config
        self.stem = nn.Conv2d(3, config.width, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(config.width)
        self.classifier = nn.Conv2d(config.width, config.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.norm(self.stem(x))))


class ToySegFamily(ModelFamily):
    name = "toyseg"
    display_name = "ToySeg"
    config_class = ToySegConfig
    model_class = ToySegNet
    head_prefix = "classifier."
    recipe = TrainingRecipe("adamw", 3e-3, 0.0, "warmup-poly")

    def architectures(self) -> list[Architecture]:
        return [Architecture("toyseg-test", self.name, ToySegConfig(), 48, IMAGENET_MEAN, IMAGENET_STD, "toy family")]

    def fold(self, model: nn.Module) -> tuple[nn.Module, list[str]]:
        """Exact: the eval-mode BatchNorm folds into the stem convolution."""
        from vitseg_export.modeling.ops import batchnorm_affine

        folded = copy.deepcopy(model).eval()
        g, h = batchnorm_affine(folded.norm)
        folded.stem.weight.data = folded.stem.weight * g[:, None, None, None]
        folded.stem.bias.data = folded.stem.bias * g + h
        folded.norm = nn.Identity()
        return folded, ["toyseg: BatchNorm folded into the stem"]

    def reset_classifier(self, model: nn.Module, num_classes: int) -> nn.Module:
        model.config = replace(model.config, num_classes=num_classes)
        model.classifier = nn.Conv2d(model.config.width, num_classes, 1)
        return model


@pytest.fixture
def toy_family():
    """The family registered for one test; the registries are put back afterwards."""
    family = ToySegFamily()
    with registry.FAMILIES.scoped(family), registry.ARCHITECTURES.scoped(*family.architectures()):
        yield family


def test_a_family_defined_in_one_file_trains_exports_verifies_and_profiles(tmp_path, cli, toy_family):
    listed = json.loads(cli("models", "--json").stdout)
    assert any(r["name"] == "toyseg-test" and r["family"] == "toyseg" for r in listed)
    r = cli("train", "--model", "toyseg-test", "--data", "synthetic[:8]", "--epochs", "1", "--batch-size", "4",
            "--workers", "0", "--image-size", "48", "--output", str(tmp_path / "run"))
    assert r.exit_code == 0, r.stderr
    loaded = load_checkpoint(tmp_path / "run")  # its config.json names the family; the registry rebuilds it
    assert loaded.meta.family == "toyseg" and isinstance(loaded.model, ToySegNet)
    for m in loaded.model.modules():  # non-trivial statistics, so the fold is really tested
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
    save_checkpoint(loaded.model, loaded.meta, tmp_path / "run")
    loaded = load_checkpoint(tmp_path / "run")
    result = export_onnx(loaded, tmp_path / "toy.onnx", OnnxExportSettings(outputs="both", dynamic_size=True))
    assert result.manifest.rewrites == ["toyseg: BatchNorm folded into the stem"]
    assert "BatchNormalization" not in {n.op_type for n in result.model_proto.graph.node}
    assert result.manifest.self_parity["max_abs_logit_diff"] < 1e-4  # judged against the unfolded network
    verdict = verify_artifact(tmp_path / "toy.onnx", str(tmp_path / "run"), "synthetic[:3]", 3)
    assert verdict.passed, verdict.failures
    figures = profile(tmp_path / "toy.onnx", [1], iters=2, warmup=1)
    assert figures.batch(1)["p50_ms"] > 0 and figures.gflops > 0
    r = cli("prune", str(tmp_path / "run"), "--output", str(tmp_path / "p"), "--num-images", "2", "--data", "synthetic[:4]")
    assert r.exit_code == 2 and "toyseg family has no" in r.stderr  # it declares no pruning: a clear refusal


def test_an_unknown_family_is_a_clear_error_never_a_default(tmp_path, cli):
    with pytest.raises(VitsegError, match="unknown model family 'toyseg'"):
        registry.config_from_dict("toyseg", {"num_classes": 3})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({
        "format": "vitseg", "format_version": 1, "architecture": "toyseg-test", "family": "toyseg",
        "model_config": {"num_classes": 3}, "class_names": ["a", "b", "c"], "image_size": [48, 48],
        "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]}}))
    r = cli("export", str(tmp_path / "run"), "-o", str(tmp_path / "x.onnx"))
    assert r.exit_code == 2 and "unknown model family 'toyseg'" in r.stderr and not (tmp_path / "x.onnx").exists()
