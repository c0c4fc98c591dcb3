"""Faults, bad input and interruption: one line, the documented exit code, nothing half-written, files with
the umask's mode. Several run the real CLI in a subprocess, as a user would."""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitseg_export.artifact import load_rgb
from vitseg_export.errors import CheckpointError
from vitseg_export.files import atomic_write_group, json_bytes

NO_CLICK = r"""
import sys, importlib.abc
class NoClick(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "click" or name.startswith("click."):
            raise ImportError("click is not installed in the environment a user gets from pip install -e .[torch]")
sys.meta_path.insert(0, NoClick())
sys.argv = ["vitseg"] + sys.argv[1:]
from vitseg_export.cli import main
main()
"""


def _vitseg(tmp_path, *args, env=None, **kw):
    script = tmp_path / "vitseg_no_click.py"
    script.write_text(NO_CLICK)
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, **kw)


def _one_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("warning:", "W1122"))]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    return lines[0]


def test_usage_errors_are_one_line_without_click(tmp_path):
    proc = _vitseg(tmp_path, "export", "--bogus")
    assert proc.returncode == 2 and "No such option: --bogus" in _one_line(proc)
    proc = _vitseg(tmp_path, "nosuchcommand")
    assert proc.returncode == 2 and "nosuchcommand" in _one_line(proc)
    proc = _vitseg(tmp_path, "verify", "x.onnx")  # a required option missing
    assert proc.returncode == 2 and "--reference" in _one_line(proc)


def test_user_text_is_never_read_as_markup(tmp_path, cli):
    r = cli("export", "segformer-b0-test", "--data", "synthetic[abc]", "-o", str(tmp_path / "m.onnx"))
    assert r.exit_code == 2 and "'synthetic[abc]'" in r.stderr
    r = cli("export", str(tmp_path / "[/x]" / "run"), "-o", str(tmp_path / "m.onnx"))
    assert r.exit_code == 2 and "[/x]" in r.stderr


def _interrupt(tmp_path, sig, args, wait_for: str):
    """Start `vitseg ARGS` with a private TMPDIR, send `sig` once stderr shows `wait_for`; return the process."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    script = tmp_path / "vitseg_no_click.py"
    script.write_text(NO_CLICK)
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmpdir)})
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if wait_for in line:
            proc.send_signal(sig)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    return proc, "".join(seen) + rest, tmpdir


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_interrupting_an_int8_export_leaves_nothing_behind(tmp_path, sig, code, word):
    out = tmp_path / "out"
    proc, stderr, tmpdir = _interrupt(tmp_path, sig, ["export", "segformer-b0", "--image-size", "128", "--precision",
                                                      "int8", "-o", out / "m.onnx"], "calibrating on")
    assert proc.returncode == code, stderr
    assert f"error: {word}" in stderr and "Traceback" not in stderr
    assert not out.exists() or not list(out.iterdir())  # no artifact, manifest, temp file or calibration cache
    # the int8 work dir is gone too (.ses is ONNX Runtime's own session-id file, not a temp file)
    assert [p.name for p in tmpdir.iterdir() if p.name != ".ses"] == []


def test_outputs_get_the_umasks_mode_and_overwriting_keeps_it(tmp_path, exported):
    old = os.umask(0o022)
    try:
        target = tmp_path / "a.bin"
        target.write_bytes(b"old")
        os.chmod(target, 0o644)
        atomic_write_group({target: b"new", tmp_path / "a.bin.json": b"{}"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~0o022 == 0o644
    assert stat.S_IMODE((tmp_path / "a.bin.json").stat().st_mode) == 0o644
    artifact = exported("vit-seg-tiny-test")
    assert stat.S_IMODE(artifact.stat().st_mode) & 0o044  # readable by group and others


def test_a_failing_group_write_leaves_existing_files_and_no_temp_files(tmp_path):
    artifact, manifest = tmp_path / "m.onnx", tmp_path / "m.onnx.json"
    artifact.write_bytes(b"previous artifact")
    manifest.mkdir()  # the manifest cannot replace a directory: the group must fail as a whole
    with pytest.raises(OSError):
        atomic_write_group({artifact: b"new artifact", manifest: b"{}"})
    assert artifact.read_bytes() == b"previous artifact"  # put back: all or nothing
    assert not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "new.onnx.json").mkdir()
    with pytest.raises(OSError):
        atomic_write_group({tmp_path / "new.onnx": b"x", tmp_path / "new.onnx.json": b"{}"})
    assert not (tmp_path / "new.onnx").exists()  # a new artifact without its manifest is removed


def test_strict_json_has_no_nan():
    data = json.loads(json_bytes({"miou": float("nan"), "rows": [1.0, math.inf], "ok": 0.5}))
    assert data == {"miou": None, "rows": [1.0, None], "ok": 0.5}


def test_images_keep_their_range_and_orientation(tmp_path):
    grey16 = np.full((20, 30), 32768, np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert abs(int(np.asarray(load_rgb(tmp_path / "g16.png")).mean()) - 128) <= 1  # not saturated to 255
    Image.fromarray(np.full((20, 30), 0.25, np.float32)).save(tmp_path / "f.tiff")
    assert abs(int(np.asarray(load_rgb(tmp_path / "f.tiff")).mean()) - 64) <= 1
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    Image.new("RGB", (40, 20), "red").save(tmp_path / "o.jpg", exif=exif)
    assert load_rgb(tmp_path / "o.jpg").size == (20, 40)  # as displayed


def test_oversized_images_are_refused_in_one_line_unless_allowed(tmp_path, exported):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    env = {"VITSEG_MAX_IMAGE_PIXELS": "1000"}
    proc = _vitseg(tmp_path, "predict", exported("segformer-b0-test"), tmp_path / "big.png", "-o", tmp_path / "out", env=env)
    assert proc.returncode == 2 and "over the 1,000-pixel limit" in _one_line(proc) and "--allow-large-images" in proc.stderr
    proc = _vitseg(tmp_path, "predict", exported("segformer-b0-test"), tmp_path / "big.png", "-o", tmp_path / "out",
                   "--allow-large-images", env=env)
    assert proc.returncode == 0, proc.stderr


def test_same_stem_inputs_get_distinct_masks_and_directories_are_refused(tmp_path, cli, exported):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (32, 32), "blue").save(tmp_path / folder / "x.png")
    r = cli("predict", str(exported("segformer-b0-test")), str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"),
            "-o", str(tmp_path / "out"))
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_x_mask.png", "b_x_mask.png"]
    r = cli("predict", str(exported("segformer-b0-test")), str(tmp_path / "a"), "-o", str(tmp_path / "out2"))
    assert r.exit_code == 2 and "is a directory, not an image" in r.stderr and not (tmp_path / "out2").exists()


def _folder(root: Path, count: int = 12, value: int = 1, mask_size: int = 32, skip_mask: int | None = None):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        Image.new("RGB", (32, 32), (i * 10, 50, 90)).save(root / "images" / f"im{i:02d}.png")
        if i != skip_mask:
            Image.fromarray(np.full((mask_size, mask_size), value, np.uint8)).save(root / "masks" / f"im{i:02d}.png")
    return f"folder:{root}"


@pytest.mark.parametrize("kind,message", [("value", "has class values [7]"), ("size", "is 16x16 but"),
                                          ("missing", "is missing for im03.png"), ("ignored", "no labelled pixels")])
def test_bad_datasets_are_refused_up_front_in_one_line(tmp_path, cli, kind, message):
    spec = _folder(tmp_path / "data", value={"value": 7, "ignored": 255}.get(kind, 1),
                   mask_size=16 if kind == "size" else 32, skip_mask=3 if kind == "missing" else None)
    r = cli("train", "--model", "segformer-b0-test", "--data", spec, "--epochs", "1", "--output", str(tmp_path / "run"))
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "run").exists()


def test_outputs_and_data_are_checked_before_the_heavy_work(tmp_path, cli):
    (tmp_path / "file").write_text("x")
    t0 = time.perf_counter()
    r = cli("export", "segformer-b0", "-o", str(tmp_path / "file" / "m.onnx"))
    assert r.exit_code == 2 and "is a file, not a directory" in r.stderr
    r = cli("export", "segformer-b0", "--precision", "int8", "--calib", f"folder:{tmp_path / 'none'}", "-o",
            str(tmp_path / "m.onnx"))
    assert r.exit_code == 2 and "directory does not exist" in r.stderr and not (tmp_path / "m.onnx").exists()
    assert time.perf_counter() - t0 < 20  # refused before exporting a full-size model twice


def test_a_config_naming_the_wrong_number_of_classes_is_refused(tmp_path, twin):
    from vitseg_export.checkpoint import load_checkpoint, save_checkpoint

    loaded = twin("segformer-b0-test")
    save_checkpoint(loaded.model, loaded.meta, tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["class_names"] = ["a", "b", "c", "d", "e"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="names 5 classes but its model predicts 3"):
        load_checkpoint(tmp_path / "run")


def test_unreadable_files_are_not_blamed_on_truncation(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: every file is readable, so permission errors cannot be produced here")
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"x")
    path.chmod(0)
    from vitseg_export.checkpoint import read_state_dict

    with pytest.raises(CheckpointError, match="permission denied"):
        read_state_dict(path)
