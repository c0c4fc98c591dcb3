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
from pathlib import Path

import numpy as np
import pytest
from clitools import NO_CLICK, one_line, run_no_click
from conftest import make_image_folder
from PIL import Image

from vitseg_export.errors import CheckpointError, Terminated, VitsegError
from vitseg_export.files import atomic_write_group, json_bytes
from vitseg_export.images import load_rgb


def test_usage_errors_are_one_line_without_click(tmp_path):
    proc = run_no_click(tmp_path, "export", "--bogus")
    assert proc.returncode == 2 and "No such option: --bogus" in one_line(proc)
    proc = run_no_click(tmp_path, "nosuchcommand")
    assert proc.returncode == 2 and "nosuchcommand" in one_line(proc)
    proc = run_no_click(tmp_path, "prune", "x")  # a required option missing
    assert proc.returncode == 2 and "Missing option '--output'" in one_line(proc)


def test_no_arguments_shows_the_help_without_an_empty_error_line(tmp_path):
    proc = run_no_click(tmp_path)
    assert proc.returncode == 2 and "Commands" in proc.stdout + proc.stderr
    assert "error:" not in proc.stderr and "Traceback" not in proc.stderr


INDEX_ERROR = """
import vitseg_export.modeling.registry as registry
def broken(*args, **kwargs):
    raise IndexError("list index out of range")
registry.count_parameters = broken  # a bug injected where `vitseg models` calls it
"""


def test_unexpected_errors_are_one_line_without_click(tmp_path):
    """A bug (IndexError) exits 1, a full disk (a real ENOSPC: stdout is /dev/full) exits 2; one line each."""
    proc = run_no_click(tmp_path, "models", prelude=INDEX_ERROR)
    line = one_line(proc)
    assert proc.returncode == 1 and "IndexError: list index out of range" in line and "VITSEG_DEBUG=1" in line
    proc = run_no_click(tmp_path, "models", prelude=INDEX_ERROR, env={"VITSEG_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr  # debugging shows it
    if Path("/dev/full").exists():
        with open("/dev/full", "w") as full:
            proc = run_no_click(tmp_path, "models", "--json", stdout=full, stderr=subprocess.PIPE)
        assert proc.returncode == 2 and "No space left on device" in one_line(proc)


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
    script.write_text(NO_CLICK.replace("{prelude}", ""))
    # a shell running the suite in the background starts it with SIGINT ignored, which children inherit
    # (and Python then keeps): give the child the default disposition, as a terminal would
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmpdir)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
                                                      "int8", "--allow-float-fallback", "-o", out / "m.onnx"],
                                       "calibrating on")
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
    proc = run_no_click(tmp_path, "predict", exported("segformer-b0-test"), tmp_path / "big.png", "-o", tmp_path / "out", env=env)
    assert proc.returncode == 2 and "over the 1,000-pixel limit" in one_line(proc) and "--allow-large-images" in proc.stderr
    proc = run_no_click(tmp_path, "predict", exported("segformer-b0-test"), tmp_path / "big.png", "-o", tmp_path / "out",
                   "--allow-large-images", env=env)
    assert proc.returncode == 0, proc.stderr


def test_same_stem_inputs_get_distinct_masks_and_a_folder_is_its_images(tmp_path, cli, exported):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (32, 32), "blue").save(tmp_path / folder / "x.png")
    r = cli("predict", str(exported("segformer-b0-test")), str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"),
            "-o", str(tmp_path / "out"))
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_x_mask.png", "b_x_mask.png"]
    r = cli("predict", str(exported("segformer-b0-test")), str(tmp_path / "a"), "-o", str(tmp_path / "out2"))
    assert r.exit_code == 0, r.stderr  # a folder SOURCE: its images, in name order
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["x_mask.png"]


@pytest.mark.parametrize("kind,message", [("value", "has class values [7]"), ("size", "is 16x16 but"),
                                          ("missing", "is missing for im03.png"), ("ignored", "no labelled pixels"),
                                          ("huge", "im04.png cannot be read as a mask"),
                                          ("image", "im02.png is not an image vitseg can read")])
def test_bad_datasets_are_refused_up_front_inone_line(tmp_path, cli, kind, message):
    spec = make_image_folder(tmp_path / "data", value={"value": 7, "ignored": 255}.get(kind, 1),
                   mask_size=16 if kind == "size" else 32, skip_mask=3 if kind == "missing" else None)
    if kind == "huge":  # over PIL's decompression-bomb limit: refused, not a DecompressionBombError traceback
        _png_header(tmp_path / "data" / "masks" / "im04.png", 14000, 13000)
    if kind == "image":
        (tmp_path / "data" / "images" / "im02.png").write_bytes(b"not a PNG at all")
    r = cli("train", "--model", "segformer-b0-test", "--data", spec, "--epochs", "1", "--output", str(tmp_path / "run"))
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "run").exists()


def test_outputs_and_data_are_checked_before_the_heavy_work(tmp_path, cli, heavy_work):
    (tmp_path / "file").write_text("x")
    r = cli("export", "segformer-b0", "-o", str(tmp_path / "file" / "m.onnx"))
    assert r.exit_code == 2 and "is a file, not a directory" in r.stderr
    r = cli("export", "segformer-b0", "--precision", "int8", "--calib", f"folder:{tmp_path / 'none'}", "-o",
            str(tmp_path / "m.onnx"))
    assert r.exit_code == 2 and "directory does not exist" in r.stderr and not (tmp_path / "m.onnx").exists()
    assert heavy_work == {"checkpoints loaded": 0, "graphs exported": 0}  # refused before any of it


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


def test_output_modes_follow_the_current_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_group({tmp_path / "a.bin": b"x", tmp_path / "a.bin.json": b"{}"})
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o640}


def _sigterm_handler_installed():
    from vitseg_export.cli import _on_sigterm

    return signal.signal(signal.SIGTERM, _on_sigterm)


def test_sigterm_while_writing_a_group_leaves_the_old_files_and_no_temp_files(tmp_path, monkeypatch):
    artifact, manifest = tmp_path / "m.onnx", tmp_path / "m.onnx.json"
    artifact.write_bytes(b"old artifact")
    manifest.write_bytes(b"old manifest")
    real_fsync, synced = os.fsync, []

    def fsync_then_sigterm(fd):  # a kill arrives once both temp files are written, before any rename
        real_fsync(fd)
        synced.append(fd)
        if len(synced) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(os, "fsync", fsync_then_sigterm)
    previous = _sigterm_handler_installed()
    try:
        with pytest.raises(Terminated):
            atomic_write_group({artifact: b"new artifact", manifest: b"new manifest"})
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert artifact.read_bytes() == b"old artifact" and manifest.read_bytes() == b"old manifest"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]  # no .tmp left behind


def test_sigterm_during_the_renames_waits_until_the_group_is_complete(tmp_path, monkeypatch):
    artifact, manifest = tmp_path / "m.onnx", tmp_path / "m.onnx.json"
    artifact.write_bytes(b"old artifact")
    manifest.write_bytes(b"old manifest")
    real_replace, killed = os.replace, []

    def replace_then_sigterm(src, dst):  # a kill arrives between the artifact's rename and the manifest's
        real_replace(src, dst)
        if not killed:
            killed.append(dst)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(os, "replace", replace_then_sigterm)
    previous = _sigterm_handler_installed()
    try:
        with pytest.raises(Terminated):  # delivered, but only once the group is whole
            atomic_write_group({artifact: b"new artifact", manifest: b"new manifest"})
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert artifact.read_bytes() == b"new artifact" and manifest.read_bytes() == b"new manifest"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]


def test_a_checkpoint_lands_whole_or_not_at_all(tmp_path, twin):
    import torch

    from vitseg_export.checkpoint import save_checkpoint

    loaded, run = twin("vit-seg-tiny-test"), tmp_path / "run"
    save_checkpoint(loaded.model, loaded.meta, run)
    weights = (run / "model.safetensors").read_bytes()
    (run / "config.json").unlink()
    (run / "config.json").mkdir()  # the config cannot be replaced: the weights must not be either
    with torch.no_grad():
        next(loaded.model.parameters()).add_(1.0)
    with pytest.raises(OSError):
        save_checkpoint(loaded.model, loaded.meta, run)
    assert (run / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "model.safetensors"]


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height (its header is all that is read before vitseg refuses it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_a_14000x13000_image_is_refused_in_one_line_before_the_model_loads(tmp_path, exported):
    _png_header(tmp_path / "huge.png", 14000, 13000)
    proc = run_no_click(tmp_path, "predict", exported("segformer-b0-test"), tmp_path / "huge.png", "-o", tmp_path / "out")
    line = one_line(proc)
    assert proc.returncode == 2 and "14000x13000 (182,000,000 pixels), over the 64,000,000-pixel limit" in line
    assert not (tmp_path / "out").exists()


def test_allowing_large_images_lifts_pils_own_limit_too(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL itself now refuses images over 2,000 pixels
    with pytest.raises(VitsegError, match="over the 1,000-pixel limit"):
        load_rgb(tmp_path / "a.png", max_pixels=1000)
    assert load_rgb(tmp_path / "a.png", max_pixels=0).size == (64, 64)  # allowed means allowed
    assert Image.MAX_IMAGE_PIXELS == 1000  # PIL's setting is left as it was


def test_labels_the_model_cannot_predict_are_refused_before_verifying(tmp_path, cli, exported):
    spec = make_image_folder(tmp_path / "data", value=4)
    (tmp_path / "data" / "classes.txt").write_text("a\nb\nc\nd\ne\n")
    r = cli("verify", str(exported("segformer-b0-test")), "--reference", "segformer-b0-test", "--data", spec)
    assert r.exit_code == 2 and "class values up to 4 but the model predicts 3 classes" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_an_image_that_fails_to_decode_in_a_worker_isone_line(tmp_path, cli):
    """The header is fine (it passes the up-front checks), the pixels are not: the error comes from a DataLoader
    worker process, whose traceback torch puts into the exception's message."""
    spec = make_image_folder(tmp_path / "data")
    png = (tmp_path / "data" / "images" / "im05.png").read_bytes()
    (tmp_path / "data" / "images" / "im05.png").write_bytes(png[:len(png) // 2])  # header fine, pixels cut off
    r = cli("train", "--model", "segformer-b0-test", "--data", spec, "--epochs", "1", "--image-size", "32",
            "--batch-size", "4", "--workers", "1", "--output", str(tmp_path / "run"))
    assert r.exit_code == 2 and "im05.png is not an image vitseg can read" in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]  # besides the progress bar
    assert len(errors) == 1 and "Traceback" not in r.stderr and "DataLoader worker" not in r.stderr, r.stderr


def test_training_needs_masks(tmp_path, cli):
    (tmp_path / "data" / "images").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32)).save(tmp_path / "data" / "images" / f"im{i}.png")
    r = cli("train", "--model", "segformer-b0-test", "--data", f"folder:{tmp_path / 'data'}", "--output",
            str(tmp_path / "run"))
    assert r.exit_code == 2 and "has no masks" in r.stderr and not (tmp_path / "run").exists()


def _strict_json(path: Path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path} is not strict JSON: {c}"))


def test_unlabelled_validation_gives_null_metrics_and_still_a_best_checkpoint(tmp_path, twin):
    from vitseg_export.checkpoint import load_checkpoint
    from vitseg_export.train.training import TrainSettings, train

    (tmp_path / "val" / "images").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 60, 20, 20)).save(tmp_path / "val" / "images" / f"v{i}.png")
    settings = TrainSettings(data="synthetic[:4]", val_data=f"folder:{tmp_path / 'val'}", epochs=2, image_size=32,
                             batch_size=2, num_workers=0)
    history = train(twin("segformer-b0-test"), settings, tmp_path / "run")
    assert all(math.isnan(h.val_miou) for h in history)
    metrics = _strict_json(tmp_path / "run" / "metrics.json")
    assert metrics["best_val_miou"] is None and [e["val_miou"] for e in metrics["epochs"]] == [None, None]
    assert _strict_json(tmp_path / "run" / "config.json")["training"]["val_miou"] is None
    assert load_checkpoint(tmp_path / "run").meta.training["checkpoint"] == "best"  # weights are there


def test_user_text_on_success_paths_is_printed_as_is(tmp_path, cli, twin, exported):
    from vitseg_export.checkpoint import save_checkpoint

    run = tmp_path / "[b]" / "[/x]run"
    r = cli("train", "--model", "segformer-b0-test", "--data", "synthetic[:4]", "--epochs", "1", "--image-size", "32",
            "--batch-size", "2", "--workers", "0", "--output", str(run))
    assert r.exit_code == 0 and f"checkpoint {run} " in r.stdout, r.stdout + r.stderr
    loaded = twin("segformer-b0-test")
    save_checkpoint(loaded.model, loaded.meta, tmp_path / "[red]" / "[/x]ref")
    r = cli("verify", str(exported("segformer-b0-test")), "--reference", str(tmp_path / "[red]" / "[/x]ref"),
            "--data", "synthetic[:2]", "--num-images", "2")
    assert r.exit_code == 0 and f"matches {tmp_path / '[red]' / '[/x]ref'} " in r.stdout, r.stdout + r.stderr


def test_outputs_of_every_command_are_checked_before_the_work(tmp_path, cli, heavy_work):
    (tmp_path / "file").write_text("x")
    for args in (["benchmark", "segformer-b0-test", "--output", tmp_path / "file" / "bench"],
                 ["prune", "segformer-b0-test", "--output", tmp_path / "file" / "pruned"],
                 ["profile", "segformer-b0-test", "--report", tmp_path / "file" / "p.json"],
                 ["demo", "--model", "segformer-b0-test", "--output", tmp_path / "file" / "demo"]):
        r = cli(*map(str, args))
        assert r.exit_code == 2 and "is a file, not a directory" in r.stderr, (args, r.stderr)
        assert heavy_work == {"checkpoints loaded": 0, "graphs exported": 0}, args


def _deny_reads_of(path: Path, module, monkeypatch) -> None:
    """Make `path` unreadable: really (mode 0) when not root; as root (who reads everything) by having `open`
    in `module` raise the PermissionError the OS gives everyone else."""
    path.chmod(0)
    if os.geteuid() == 0:
        import builtins

        def denied(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(13, "Permission denied", str(file))
            return builtins.open(file, *args, **kwargs)

        monkeypatch.setattr(module, "open", denied, raising=False)


def test_an_unreadable_artifact_is_not_called_damaged(tmp_path, exported, monkeypatch):
    import vitseg_export.artifact as artifact

    path = exported("vit-seg-tiny-test", copy=True)
    _deny_reads_of(path, artifact, monkeypatch)
    with pytest.raises(VitsegError, match="cannot be read") as e:
        artifact.read_onnx_metadata(path)
    assert "truncated" not in str(e.value) and "damaged" not in str(e.value)


@pytest.fixture
def heavy_work(monkeypatch) -> dict:
    """Counts the heavy steps a command takes (loading a checkpoint, exporting a graph): a refusal that needs no work
    must come before any (counted, not timed: a busy second core cannot break it)."""
    from vitseg_export.export import pipeline
    from vitseg_export.modeling import registry

    counts = {"checkpoints loaded": 0, "graphs exported": 0}
    build, export = registry.build_model, pipeline.module_to_onnx

    def counted_build(*args, **kwargs):  # every checkpoint load (and training) builds its network here
        counts["checkpoints loaded"] += 1
        return build(*args, **kwargs)

    def counted_export(*args, **kwargs):
        counts["graphs exported"] += 1
        return export(*args, **kwargs)

    monkeypatch.setattr(registry, "build_model", counted_build)
    monkeypatch.setattr(pipeline, "module_to_onnx", counted_export)
    return counts
