from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vitseg_export.checkpoint import load_checkpoint
from vitseg_export.train.training import TrainSettings, train


@pytest.mark.parametrize("arch", ["segformer-b0-test", "vit-seg-tiny-test"])
def test_train_writes_best_last_and_metrics(tmp_path, twin, arch):
    start = twin(arch)
    settings = TrainSettings(data="synthetic[:8]", epochs=2, batch_size=4, num_workers=0,
                             image_size=None)
    history = train(start, settings, tmp_path / "run")
    assert len(history) == 2 and all(0 <= m.val_pixel_accuracy <= 1 for m in history)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["best_val_miou"] == max(e["val_miou"] for e in metrics["epochs"])
    best, last = load_checkpoint(tmp_path / "run"), load_checkpoint(tmp_path / "run" / "last")
    assert best.meta.training["checkpoint"] == "best" and last.meta.training["epoch"] == 2
    assert best.meta.class_names == ["pet", "background", "border"]
    assert not list((tmp_path / "run").glob(".*.tmp"))  # atomic writes leave no temp files


def test_train_cli_learns_on_synthetic(tmp_path, cli):
    """Loss must fall on a tiny model in a few steps: training is wired to real gradients."""
    result = cli("train", "--model", "segformer-b0-test", "--data", "synthetic[:32]", "--epochs", "3",
                 "--batch-size", "8", "--workers", "0", "--output", str(tmp_path / "run"))
    assert result.exit_code == 0, result.stderr
    epochs = json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert "best epoch" in result.stdout


def test_train_cli_refuses_wrong_vit_size(tmp_path, cli):
    result = cli("train", "--model", "vit-seg-tiny-test", "--image-size", "48", "--data", "synthetic[:4]",
                 "--output", str(tmp_path / "run"))
    assert result.exit_code == 2 and "built for 32px input" in result.stderr
    assert not (tmp_path / "run").exists()


def test_train_init_from_huggingface_with_new_classifier(tmp_path, cli):
    transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
    cfg = transformers.SegformerConfig(hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                       num_attention_heads=[1, 2, 2, 2], decoder_hidden_size=8, num_labels=7)
    transformers.SegformerForSemanticSegmentation(cfg).save_pretrained(tmp_path / "hf")
    result = cli("train", "--init", str(tmp_path / "hf"), "--data", "synthetic[:4]", "--epochs", "1",
                 "--batch-size", "2", "--workers", "0", "--image-size", "64", "--output", str(tmp_path / "run"))
    assert result.exit_code == 0, result.stderr
    assert "classifier is re-initialized" in result.stderr
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.meta.config.num_classes == 3 and loaded.meta.training["init"] == str(tmp_path / "hf")


def test_torchrun_two_processes_gloo(tmp_path):
    """DDP on CPU: 2 processes, gloo, distributed sampler; only rank 0 writes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "vitseg_export", "train", "--model", "segformer-b0-test", "--data", "synthetic[:8]", "--epochs", "1",
           "--batch-size", "2", "--workers", "0", "--output", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = load_checkpoint(tmp_path / "run").meta
    assert meta.training["world_size"] == 2
    assert proc.stdout.count("best epoch") == 1  # rank 0 alone reports and writes
