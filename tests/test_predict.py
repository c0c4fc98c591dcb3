from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from vitseg_export.checkpoint import load_checkpoint
from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx

BLOCK_TORCH = r"""
import sys, importlib.abc
class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith(("torch.", "torchvision", "safetensors", "onnxscript")):
            raise ImportError(f"blocked import of {name}: the edge path must not need it")
sys.meta_path.insert(0, BlockTorch())
sys.argv = ["vitseg"] + sys.argv[1:]
from vitseg_export.cli import main
main()
"""


def _images(tmp_path, sizes):
    paths = []
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        p = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_predict_from_onnx_never_imports_torch(tmp_path, exported):
    model = exported("segformer-b0-test", outputs="mask")
    images = _images(tmp_path, [(90, 70), (64, 64)])
    script = tmp_path / "edge.py"
    script.write_text(BLOCK_TORCH)
    proc = subprocess.run([sys.executable, str(script), "predict", str(model), *map(str, images),
                           "--output", str(tmp_path / "out"), "--overlay", "--json"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 2
    mask = np.asarray(Image.open(tmp_path / "out" / "img0_mask.png"))
    assert mask.shape == (70, 90) and mask.max() <= 2  # the image's own resolution, class indices
    assert Image.open(tmp_path / "out" / "img0_overlay.png").size == (90, 70)
    assert sum(rows[0]["class_pixels"].values()) == 70 * 90
    # the blocker is real: the same script fails on a command that needs torch
    bad = subprocess.run([sys.executable, str(script), "export", "vit-seg-tiny-test", "-o", str(tmp_path / "x.onnx")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "blocked import of torch" in bad.stderr


def test_predict_from_checkpoint_matches_onnx(tmp_path, cli, twin):
    loaded = twin("vit-seg-tiny-test")
    from vitseg_export.checkpoint import save_checkpoint

    save_checkpoint(loaded.model, loaded.meta, tmp_path / "run")
    export_onnx(load_checkpoint(tmp_path / "run"), tmp_path / "m.onnx", OnnxExportSettings())
    images = _images(tmp_path, [(50, 40)])
    a = cli("predict", str(tmp_path / "run"), str(images[0]), "--output", str(tmp_path / "a"))
    b = cli("predict", str(tmp_path / "m.onnx"), str(images[0]), "--output", str(tmp_path / "b"))
    assert a.exit_code == 0 and b.exit_code == 0, a.stderr + b.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "img0_mask.png")),
                          np.asarray(Image.open(tmp_path / "b" / "img0_mask.png")))
    missing = cli("predict", str(tmp_path / "m.onnx"), str(tmp_path / "nope.jpg"), "--output", str(tmp_path / "c"))
    assert missing.exit_code == 2 and "does not exist" in missing.stderr and not (tmp_path / "c").exists()


def test_a_folder_with_one_cut_frame_writes_nothing(tmp_path, cli, exported):
    """A folder is one source: a frame whose header is whole and whose pixels are cut short (the header check
    passes it) fails the whole folder before the first mask is written, and leaves no output directory."""
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, path in enumerate(_images(tmp_path, [(64, 64)] * 4)):
        path.rename(frames / f"f{i}.jpg")
    cut = frames / "f2.jpg"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    r = cli("predict", str(exported("segformer-b0-test")), str(frames), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "f2.jpg" in r.stderr and "truncated" in r.stderr
    assert not (tmp_path / "out").exists()
