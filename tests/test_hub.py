"""Hugging Face Hub ids wherever a CHECKPOINT is accepted, offline, from a cache laid out as huggingface_hub
writes it (`models--org--name/{refs,snapshots,blobs}`), built here from a tiny SegFormer. Nothing may touch the
network: HF_HUB_OFFLINE is on, and every socket connection fails the test."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) writes the Hub checkpoint")
huggingface_hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub comes with the torch extra")

REPO_ID = "tiny-org/segformer-tiny-hub"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.2, 0.3]


def _fill_cache(cache: Path, repo_id: str = REPO_ID, commit: str = COMMIT, ref: str = "main") -> Path:
    """A Hugging Face cache holding `repo_id` at `commit` (branch `ref`), as `huggingface_hub` lays it out:
    blobs named by their sha256, snapshot files as relative symlinks into blobs, refs/<branch> naming the commit."""
    torch.manual_seed(0)
    config = transformers.SegformerConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                          num_attention_heads=[1, 2, 3, 4], decoder_hidden_size=16, num_labels=3,
                                          id2label={0: "pet", 1: "background", 2: "border"},
                                          label2id={"pet": 0, "background": 1, "border": 2})
    staging = cache.parent / "staging"
    transformers.SegformerForSemanticSegmentation(config).eval().save_pretrained(staging)
    (staging / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": MEAN, "image_std": STD, "size": {"height": 64, "width": 64}}))
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in staging.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    (repo / "refs" / ref).write_text(commit)
    shutil.rmtree(staging)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding REPO_ID, with the network closed for the test's duration."""
    cache = tmp_path / "hf-cache"
    snapshot = _fill_cache(cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import; the env is for children
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    opened = []

    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guarded(original):
        def connect_checked(self, address, *args, **kwargs):
            if self.family in (socket.AF_INET, socket.AF_INET6):  # local (AF_UNIX) ones: multiprocessing's own
                opened.append(address)
                raise OSError(f"test: a network connection to {address} was attempted")
            return original(self, address, *args, **kwargs)
        return connect_checked

    monkeypatch.setattr(socket.socket, "connect", guarded(connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(connect_ex))
    yield cache, snapshot
    assert not opened, f"the network was touched: {opened}"


def test_a_hub_id_loads_from_the_cache_as_its_snapshot_directory(hub_cache):
    from vitseg_export.checkpoint import load_checkpoint

    _, snapshot = hub_cache
    by_id, by_dir = load_checkpoint(REPO_ID), load_checkpoint(snapshot)
    assert by_id.source == REPO_ID and by_id.kind == "huggingface"
    record = by_id.hub
    assert record["id"] == REPO_ID and record["commit"] == COMMIT and record["revision"] == "main"
    assert record["files"]["model.safetensors"] == hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()
    assert set(record["files"]) == {"config.json", "preprocessor_config.json", "model.safetensors"}
    # the preprocessor's normalization and size come from the snapshot, as from a local directory
    assert list(by_id.meta.mean) == MEAN and list(by_id.meta.std) == STD and by_id.meta.image_size == (64, 64)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(by_id.model(x), by_dir.model(x))
    assert load_checkpoint(REPO_ID, revision=COMMIT).hub["commit"] == COMMIT  # a commit hash as the revision
    assert load_checkpoint(REPO_ID, revision="main").hub["commit"] == COMMIT


def test_export_and_verify_take_a_hub_id_offline_and_the_manifest_names_it(hub_cache, cli, tmp_path, image_folder):
    out = tmp_path / "model.onnx"
    exported = cli("export", REPO_ID, "--output", str(out))
    assert exported.exit_code == 0, exported.stderr
    manifest = json.loads((tmp_path / "model.onnx.json").read_text())
    assert manifest["metadata"]["source_checkpoint"] == REPO_ID
    source = manifest["source"]
    assert source["checkpoint"] == REPO_ID and source["hub"]["id"] == REPO_ID and source["hub"]["commit"] == COMMIT
    assert set(source["hub"]["files"]) >= {"config.json", "model.safetensors"}
    data = image_folder(tmp_path / "images", count=4, size=64)
    verified = cli("verify", str(out), "-r", REPO_ID, "--data", data, "--num-images", "4", "--json")
    assert verified.exit_code == 0, verified.stderr
    assert json.loads(verified.stdout)["passed"] is True
    # no -r: the manifest's source, at the commit it was exported from, said on stderr
    recorded = cli("verify", str(out), "--data", data, "--num-images", "4")
    assert recorded.exit_code == 0, recorded.stderr
    assert f"reference: {REPO_ID} at commit {COMMIT}" in recorded.stderr


def test_train_init_takes_a_hub_id_offline(hub_cache, cli, tmp_path):
    out = tmp_path / "run"
    result = cli("train", "--init", REPO_ID, "--data", "synthetic[:4]", "--epochs", "1", "--image-size", "64",
                 "--output", str(out))
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["init"] == REPO_ID and config["training"]["commit"] == COMMIT


@pytest.mark.parametrize("args,message", [
    (["org-none/missing-model"], "'org-none/missing-model' is neither a path that exists nor a Hub model"),
    ([REPO_ID, "--revision", "v9"], f"'{REPO_ID}@v9' is neither a path that exists nor a Hub model"),
])
def test_a_missing_id_or_revision_is_one_line_exit_2_naming_the_cache(hub_cache, cli, tmp_path, args, message):
    cache, _ = hub_cache
    result = cli("export", *args, "--output", str(tmp_path / "m.onnx"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert message in lines[0] and str(cache) in lines[0] and "hf download" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert not list(tmp_path.glob("m.onnx*"))


def test_revision_with_a_local_checkpoint_is_refused(hub_cache, cli, tmp_path):
    _, snapshot = hub_cache
    result = cli("export", str(snapshot), "--revision", "main", "--output", str(tmp_path / "m.onnx"))
    assert result.exit_code == 2 and "--revision applies to Hub ids" in result.stderr


def test_the_user_environment_honours_hf_hub_offline(tmp_path):
    """A fresh process as a user runs it: HF_HUB_OFFLINE=1 from the environment, an empty cache: one line, exit 2,
    and no attempt at the network (which would hang or fail differently here)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    proc = subprocess.run([sys.executable, "-m", "vitseg_export", "export", "nvidia/segformer-b0-finetuned-ade-512-512",
                           "--output", str(tmp_path / "m.onnx")], capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "nvidia/segformer-b0-finetuned-ade-512-512" in lines[0] and str(tmp_path / "empty-cache") in lines[0]
