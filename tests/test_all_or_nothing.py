"""An export writes its whole group (engine + the ONNX beside it + manifests; an IR's .xml + .bin + manifest) after
the verdict, or nothing: a full disk (a real one: a 4 MB tmpfs), a failed verdict or build leave no file of the group
and an earlier file of the same name byte-identical; refusals that need no work come before any (the plan)."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
from graph_faults import mix_batch

from vitseg_export.export import pipeline

B0 = "segformer-b0-test"
needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                               reason="needs TensorRT-RTX (pip install tensorrt-rtx; the test extra brings it)")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (root only; skipped, saying why, where mounting is not allowed): room for the ONNX graph of the
    tiny model, not for a TensorRT-RTX engine (about 8 MB)."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill ({made.stderr.strip() or 'mount failed'}): needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@needs_rtx
def test_a_full_disk_during_a_trt_rtx_export_leaves_nothing_and_earlier_files_untouched(small_disk, cli):
    earlier = small_disk / "model.rtx.onnx"
    earlier.write_bytes(b"an earlier export's graph, kept as it is")
    before = _digest(earlier)
    result = cli("export", B0, "--format", "trt-rtx", "--image-size", "64", "--data", "synthetic[:4]",
                 "-o", str(small_disk / "model.rtx.engine"))
    assert result.exit_code == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in result.stderr
    assert result.stderr.rstrip().endswith(errors[0])  # the error line is the last
    assert sorted(p.name for p in small_disk.iterdir()) == ["model.rtx.onnx"]  # no engine, manifest or temp file
    assert _digest(earlier) == before


def test_a_failed_verdict_next_to_an_existing_onnx_leaves_it_byte_identical(tmp_path, monkeypatch, twin):
    """The export fails its verdict (a graph wrong inside batches): NAME.onnx and NAME.onnx.json from an earlier run
    stay byte-identical, nothing else is written."""
    from vitseg_export.errors import ParityError
    from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx

    good = export_onnx(twin(B0), tmp_path / "model.onnx", OnnxExportSettings(verdict_images=4))
    before = {p.name: _digest(p) for p in tmp_path.iterdir()}
    original = pipeline.module_to_onnx
    monkeypatch.setattr(pipeline, "module_to_onnx", lambda *a, **k: mix_batch(original(*a, **k)))
    with pytest.raises(ParityError, match="at batch 4"):
        export_onnx(twin(B0), good.path, OnnxExportSettings(verdict_images=4))
    assert {p.name: _digest(p) for p in tmp_path.iterdir()} == before


@needs_rtx
def test_a_failed_build_leaves_no_file_of_the_group(tmp_path, cli, monkeypatch):
    """The builder fails after the ONNX graph was exported and judged: neither the engine nor the ONNX beside it
    nor a manifest is written (earlier versions wrote NAME.rtx.onnx and its manifest before building)."""
    from vitseg_export.export import tensorrt_engine

    def failing_build(*args, **kwargs):
        raise tensorrt_engine.VitsegError("TensorRT-RTX failed to build the engine: out of workspace", "see the log")

    monkeypatch.setattr(tensorrt_engine, "build_engine", failing_build)
    result = cli("export", B0, "--format", "trt-rtx", "--image-size", "64", "--data", "synthetic[:4]",
                 "-o", str(tmp_path / "out" / "model.rtx.engine"))
    assert result.exit_code == 2 and "failed to build" in result.stderr
    assert not (tmp_path / "out").exists()


@needs_rtx
@pytest.mark.parametrize("args, says", [
    (["--min-shape", "1x3x64x64", "--opt-shape", "8x3x64x64", "--max-shape", "4x3x64x64"], "min <= opt <= max"),
    (["--compute-capability", "7.5"], "no fp32 matrix multiplies for compute capability 7.5"),
    (["--compute-capability", "7.5,8.6", "--precision", "fp32"], "(Turing)"),
])
def test_engine_refusals_come_before_any_export_work(tmp_path, cli, args, says):
    result = cli("--verbose", "export", B0, "--format", "trt-rtx", "--image-size", "64", "-o",
                 str(tmp_path / "m.rtx.engine"), *args)
    assert result.exit_code == 2, result.stderr
    assert says in result.stderr and "exporting" not in result.stderr  # refused before the ONNX export
    assert not list(tmp_path.iterdir())


@needs_rtx
def test_fp16_for_turing_is_planned_and_built(tmp_path, cli):
    """Turing is refused for fp32 only: fp16 engines build for it."""
    result = cli("export", B0, "--format", "trt-rtx", "--precision", "fp16", "--image-size", "64", "--data",
                 "synthetic[:4]", "--compute-capability", "7.5", "-o", str(tmp_path / "m.rtx.engine"))
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.rtx.engine", "m.rtx.engine.json", "m.rtx.onnx",
                                                          "m.rtx.onnx.json"]


def test_a_full_disk_during_a_video_leaves_no_file_and_no_directory(small_disk, cli, exported, tmp_path):
    """A video's overlay fills the 4 MB disk halfway: one error line, and neither a temp file nor the output
    directory the run made is left (issue 37: an empty directory was)."""
    import av
    import numpy as np

    clip = tmp_path / "noise.mkv"
    with av.open(str(clip), "w") as container:  # noise compresses badly: the overlay outgrows 4 MB
        stream = container.add_stream("ffv1", rate=30)
        stream.width, stream.height, stream.pix_fmt = 256, 256, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(120):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 256 * 1024))  # 256 KB left: a few frames' worth
    out = small_disk / "out"
    result = cli("predict", str(exported(B0)), str(clip), "-o", str(out), "--overlay", "--masks")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "No space left on device" in errors[0], result.stderr
    assert [p.name for p in small_disk.iterdir()] == ["filler"]
