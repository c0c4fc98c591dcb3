"""`vitseg predict` on video files, cameras and live streams: the masks of every frame equal still-image predict
on the same decoded frames, batching and --every keep them equal, damaged inputs and dead sources are one line
each with nothing written, and a live stream served here at 60 fps into a model at ~10 fps drops frames instead
of queueing them, with its latency bounded by the model's time. The tests make their own media with PyAV."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clitools import NO_CLICK, error_lines

av = pytest.importorskip("av", reason="PyAV is the optional `video` extra (pip install -e '.[video]')")

from vitseg_export.predict.sources import LatestFrame  # noqa: E402  (after the skip: it needs no PyAV, its tests do)
from vitseg_export.predict.video import STAGES, predict_video  # noqa: E402
from vitseg_export.runners import runner_for  # noqa: E402

SIZE = (96, 72)  # (W, H): not the tiny model's 64x64, so resizing both ways is part of every comparison


def _frames(count: int, size=SIZE, seed: int = 0) -> list[np.ndarray]:
    """Pictures the tiny model gives varied masks for: noise with a moving block of one colour."""
    rng = np.random.default_rng(seed)
    w, h = size
    frames = []
    for i in range(count):
        picture = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        x, y = (7 * i) % (w - 32), (5 * i) % (h - 24)
        picture[y:y + 24, x:x + 32] = rng.integers(0, 255, 3, dtype=np.uint8)
        frames.append(picture)
    return frames


def _write_video(path: Path, frames: list[np.ndarray], fps: int = 30, codec: str = "libx264", fmt: str | None = None,
                 container_options: dict | None = None) -> Path:
    out = av.open(str(path), "w", format=fmt, container_options=container_options or {})
    stream = out.add_stream(codec, rate=fps)
    stream.height, stream.width = frames[0].shape[:2]
    stream.pix_fmt = "yuv420p"
    for picture in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)
    out.close()
    return path


def _decode(path: Path, fmt: str = "rgb24") -> tuple[list[np.ndarray], dict]:
    """Every frame of a video (a PyAV of its own, not vitseg's reading) and what its stream says."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format=fmt) for f in container.decode(stream)]
        return frames, {"rate": stream.average_rate, "codec": stream.codec_context.name,
                        "size": (stream.codec_context.width, stream.codec_context.height)}


def _still_masks(cli, model: Path, frames: list[np.ndarray], where: Path) -> list[np.ndarray]:
    """Still-image predict on `frames` saved losslessly (PNG): the reference every video mask must equal."""
    where.mkdir()
    paths = []
    for i, picture in enumerate(frames):
        paths.append(where / f"f{i:03d}.png")
        Image.fromarray(picture).save(paths[-1])
    r = cli("predict", str(model), *map(str, paths), "-o", str(where / "masks"))
    assert r.exit_code == 0, r.stderr
    return [np.asarray(Image.open(where / "masks" / f"{p.stem}_mask.png")) for p in paths]


def _no_temp_files(folder: Path) -> bool:
    return not folder.exists() or not [p for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture
def model(exported):
    return exported("segformer-b0-test", outputs="mask")


def test_video_masks_equal_still_predict_on_the_same_frames(tmp_path, cli, model):
    clip = _write_video(tmp_path / "clip.mp4", _frames(12))
    r = cli("predict", str(model), str(clip), "-o", str(tmp_path / "out"), "--masks", "--overlay", "--json")
    assert r.exit_code == 0, r.stderr
    [row] = json.loads(r.stdout)
    decoded, _ = _decode(clip)
    expected = _still_masks(cli, model, decoded, tmp_path / "still")
    masks, mask_stream = _decode(tmp_path / "out" / "clip_mask.mkv", fmt="gray")
    assert mask_stream["codec"] == "ffv1" and len(masks) == len(expected) == 12
    for i, (got, want) in enumerate(zip(masks, expected)):
        assert np.array_equal(got, want), f"frame {i}: {np.mean(got != want):.1%} of pixels differ"
    assert len(np.unique(np.concatenate([m.ravel() for m in expected]))) >= 2  # masks that can differ
    overlays, overlay_stream = _decode(tmp_path / "out" / "clip_overlay.mp4")  # playable: every frame decodes
    assert len(overlays) == 12 and overlay_stream["size"] == SIZE and overlay_stream["rate"] == 30
    assert row["frames"] == 12 and row["ended"] == "end" and row["fps"] > 0 and row["dropped"] == 0
    assert set(row["stages"]) == set(STAGES)
    assert all(v["p50_ms"] is not None and v["p90_ms"] >= v["p50_ms"] >= 0 for v in row["stages"].values())
    assert _no_temp_files(tmp_path / "out")
    # the human form: where it wrote, the frame rate, one row per stage
    text = cli("predict", str(model), str(clip), "-o", str(tmp_path / "out2"))
    assert text.exit_code == 0, text.stderr
    assert f"-> {tmp_path / 'out2' / 'clip_overlay.mp4'}" in text.stdout and "fps end to end" in text.stdout
    assert all(stage in text.stdout for stage in STAGES)
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["clip_overlay.mp4"]


def test_every_nth_frame_in_batches_keeps_the_masks_and_the_timing(tmp_path, cli, model):
    clip = _write_video(tmp_path / "clip.mp4", _frames(12, seed=1))
    r = cli("predict", str(model), str(clip), "-o", str(tmp_path / "out"), "--masks", "--every", "2",
            "--max-frames", "5", "--batch-size", "2", "--json", "--report", str(tmp_path / "report.json"))
    assert r.exit_code == 0, r.stderr
    [row] = json.loads(r.stdout)
    assert json.loads((tmp_path / "report.json").read_text()) == [row]
    assert row["frames"] == 5 and row["batch_size"] == 2 and row["ended"] == "max-frames"
    decoded, _ = _decode(clip)
    expected = _still_masks(cli, model, decoded[0:10:2], tmp_path / "still")
    with av.open(str(tmp_path / "out" / "clip_mask.mkv")) as container:
        got = [(f.to_ndarray(format="gray"), float(f.time)) for f in container.decode(video=0)]
    assert [round(t, 3) for _, t in got] == [round(i / 30, 3) for i in (0, 2, 4, 6, 8)]  # the source's own times
    for (mask, _), want in zip(got, expected):
        assert np.array_equal(mask, want)


def test_a_folder_runs_its_images_in_name_order(tmp_path, cli, model):
    (tmp_path / "frames").mkdir()
    for i, picture in enumerate(_frames(11)):
        Image.fromarray(picture).save(tmp_path / "frames" / f"frame{i}.png")  # frame10 sorts after frame9
    r = cli("predict", str(model), str(tmp_path / "frames"), "-o", str(tmp_path / "out"), "--every", "5", "--json")
    assert r.exit_code == 0, r.stderr
    assert [Path(row["image"]).name for row in json.loads(r.stdout)] == ["frame0.png", "frame5.png", "frame10.png"]
    (tmp_path / "empty").mkdir()
    r = cli("predict", str(model), str(tmp_path / "empty"), "-o", str(tmp_path / "out2"))
    assert r.exit_code == 2 and "is a directory, not a file, and holds no images" in r.stderr
    assert not (tmp_path / "out2").exists()


def _damaged_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what its one error line says)."""
    frames = _frames(30)
    whole = _write_video(tmp_path / "whole.mp4", frames).read_bytes()  # its index (moov) is at the end
    (tmp_path / "cut.mp4").write_bytes(whole[:len(whole) // 2])
    front = _write_video(tmp_path / "front.mp4", frames, container_options={"movflags": "+faststart"}).read_bytes()
    (tmp_path / "cut-front.mp4").write_bytes(front[:len(front) * 2 // 3])  # index first, pictures cut
    avi = _write_video(tmp_path / "mpeg4.avi", frames, codec="mpeg4").read_bytes()
    assert avi.count(b"FMP4") == 2
    (tmp_path / "unknown-codec.avi").write_bytes(avi.replace(b"FMP4", b"ZZZ9"))  # a fourcc no decoder claims
    (tmp_path / "garbage.mkv").write_bytes(np.random.default_rng(0).integers(0, 255, 5000, dtype=np.uint8).tobytes())
    sound = av.open(str(tmp_path / "sound.mkv"), "w")
    stream = sound.add_stream("pcm_s16le", rate=8000)
    for packet in stream.encode(av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")):
        sound.mux(packet)
    sound.close()
    return {"cut": (tmp_path / "cut.mp4", "is damaged, truncated or not a video"),
            "cut-front": (tmp_path / "cut-front.mp4", "is damaged or truncated: decoding fails after"),
            "codec": (tmp_path / "unknown-codec.avi", "uses a video codec this FFmpeg cannot decode"),
            "garbage": (tmp_path / "garbage.mkv", "is damaged, truncated or not a video"),
            "sound": (tmp_path / "sound.mkv", "has no video stream")}


def test_damaged_files_are_one_line_each_and_leave_nothing(tmp_path, cli, model):
    for name, (path, message) in _damaged_inputs(tmp_path).items():
        out = tmp_path / f"out-{name}"
        r = cli("predict", str(model), str(path), "-o", str(out))
        lines = error_lines(r.stderr)
        assert r.exit_code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, (name, r.stderr)
        assert not out.exists() or not list(out.iterdir()), (name, list(out.iterdir()))


class StreamServer:
    """A live MPEG-TS stream over TCP on 127.0.0.1, paced at `fps` from frames encoded beforehand (so serving
    costs the test no CPU): `seconds` of it, then the connection closes (`then="close"`) or stays open and silent
    (`then="silent"`). `then="mute"`: accepts and never sends a byte. `sent_at[i]`: when frame i went out."""

    def __init__(self, seconds: float, fps: int = 60, size=(64, 48), then: str = "close"):
        self.fps, self.then = fps, then
        self.chunks, self.pts_index = self._encode(int(seconds * fps), size)
        self.sent_at: list[float] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _encode(self, count: int, size) -> tuple[list[bytes], dict[int, int]]:
        buffer = io.BytesIO()
        out = av.open(buffer, "w", format="mpegts", container_options={"flush_packets": "1"})
        stream = out.add_stream("mpeg2video", rate=self.fps, options={"g": "15", "bf": "0"})  # no B-frames: no reordering delay
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        ends = []
        for i, picture in enumerate(_frames(count, size)):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, self.fps)
            for packet in stream.encode(frame):
                out.mux(packet)
            ends.append(buffer.tell())
        for packet in stream.encode(None):
            out.mux(packet)
        out.close()
        data = buffer.getvalue()
        ends[-1] = len(data)
        chunks = [data[a:b] for a, b in zip([0] + ends[:-1], ends)]
        buffer.seek(0)
        with av.open(buffer) as decoded:  # which pts each frame got in the stream, to tell frames apart
            pts_index = {f.pts: i for i, f in enumerate(decoded.decode(video=0))}
        return chunks, pts_index

    def _serve(self) -> None:
        connection, _ = self.server.accept()
        try:
            if self.then != "mute":
                start = time.perf_counter()
                for i, chunk in enumerate(self.chunks):
                    delay = start + i / self.fps - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    connection.sendall(chunk)
                    self.sent_at.append(time.perf_counter())
            if self.then != "close":
                time.sleep(30)
        except OSError:  # the reader hung up: the test is over
            pass
        finally:
            connection.close()
            self.done.set()

    def close(self) -> None:
        self.server.close()


def test_the_latest_frame_slot_keeps_one_frame_and_counts_the_rest():
    slot = LatestFrame()
    for i in range(5):
        slot.put(i)  # type: ignore[arg-type]
    assert slot.take(0.01) == 4 and slot.dropped == 4 and slot.take(0.01) is None
    slot.put(5)  # type: ignore[arg-type]
    slot.end()
    assert slot.take(0.01) == 5 and slot.ended and slot.take(0.01) is None
    assert slot.taken + slot.dropped == slot.decoded == 6


def test_a_live_stream_faster_than_the_model_drops_frames_and_never_lags(tmp_path, model):
    """60 fps into a model slowed to ~10 fps: the model runs the newest frame each time, the others are dropped
    (none queue), and every frame's latency, from sent by the server to written, stays under two inference times
    (a queue would grow it by ~0.08 s with every frame)."""
    server = StreamServer(seconds=8)
    runner = runner_for(str(model), outputs=("mask",))
    fast = runner.infer_impl

    def slow(pixels):
        time.sleep(0.1)
        return fast(pixels)

    runner.infer_impl = slow  # type: ignore[method-assign]
    done_at: dict[int, float] = {}
    try:
        result = predict_video(runner, server.url, tmp_path / "out", masks=True, duration=3.0, timeout=5.0,
                               on_frame=lambda frame, done: done_at.__setitem__(server.pts_index[frame.pts], done))
    finally:
        runner.deactivate()
        server.close()
    assert result.ended == "duration" and not result.ended_early
    assert 10 <= result.frames <= 32, result.frames  # ~10 per second of the 3
    assert result.dropped > 2 * result.frames  # most of the 60 per second
    assert result.decoded - result.frames - result.dropped in (0, 1)  # each frame run or dropped; at most one waiting
    inference = result.stages["inference"]["p50_ms"]
    latencies = [(done - server.sent_at[i]) * 1000 for i, done in done_at.items()]
    assert max(latencies) < 2 * inference, (latencies, inference)
    assert result.latency_ms["p90_ms"] < 2 * inference
    indices = sorted(done_at)
    assert indices[-1] > 120  # still running frames sent in the run's last second, not the backlog of the first
    masks, _ = _decode(tmp_path / "out" / result.outputs["mask"].name, fmt="gray")
    assert len(masks) == result.frames  # finished and playable


@pytest.mark.parametrize("then", ["close", "silent"])
def test_a_stream_that_stops_keeps_its_video_and_exits_4(tmp_path, cli, model, then):
    server = StreamServer(seconds=1.0, then=then)
    started = time.perf_counter()
    try:
        r = cli("predict", str(model), server.url, "-o", str(tmp_path / "out"), "--timeout", "1", "--duration", "20",
                "--json")
    finally:
        server.close()
    assert time.perf_counter() - started < 10  # no hang: a silent stream ends at --timeout
    lines = error_lines(r.stderr)
    assert r.exit_code == 4 and len(lines) == 1 and "ended the run early" in lines[0], r.stderr
    [row] = json.loads(r.stdout)
    assert row["ended_early"] and row["ended"] == ("source ended" if then == "close" else "source failed")
    overlays, _ = _decode(Path(row["outputs"]["overlay"]))
    assert len(overlays) == row["frames"] > 10 and _no_temp_files(tmp_path / "out")


def test_dead_sources_are_one_line_each_without_hanging(tmp_path, cli, model):
    mute = StreamServer(seconds=0.1, then="mute")
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    cases = [(mute.url, "did not answer within 1 s"), (f"tcp://127.0.0.1:{port}", "refused the connection"),
             ("camera:97", "camera camera:97 (/dev/video97) does not exist"),
             ("/dev/video97", "camera /dev/video97 does not exist"), ("rtsp:///live", "names no host")]
    try:
        for source, message in cases:
            started = time.perf_counter()
            r = cli("predict", str(model), source, "-o", str(tmp_path / "out"), "--timeout", "1")
            lines = error_lines(r.stderr)
            assert r.exit_code == 2 and len(lines) == 1 and message in lines[0], (source, r.stderr)
            assert time.perf_counter() - started < 8, source
            assert not (tmp_path / "out").exists()
    finally:
        mute.close()
    r = cli("predict", str(model), "tcp://127.0.0.1:9", "-o", str(tmp_path / "out"), "--batch-size", "2")
    assert r.exit_code == 2 and "--batch-size applies to video files" in r.stderr


def _popen(tmp_path: Path, *args, prelude: str = "") -> subprocess.Popen:
    script = tmp_path / "vitseg_no_click.py"
    script.write_text(NO_CLICK.replace("{prelude}", prelude))
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_ends_a_live_run_with_its_video_finished(tmp_path, model):
    server = StreamServer(seconds=20)
    out = tmp_path / "out"
    proc = _popen(tmp_path, "predict", model, server.url, "-o", out, "--json")
    try:
        deadline = time.time() + 60
        while not (out.exists() and any(p.name.startswith(".") for p in out.iterdir())) and time.time() < deadline:
            time.sleep(0.1)  # the video is being written under its temp name
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        server.close()
    assert proc.returncode == 0, stderr
    [row] = json.loads(stdout)
    assert row["ended"] == "interrupted" and row["frames"] > 5
    overlays, _ = _decode(out / "127_0_0_1_{}_overlay.mp4".format(server.url.rsplit(":", 1)[1]))
    assert len(overlays) == row["frames"] and _no_temp_files(out)


BLOCK = r"""
import importlib.abc, os
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ("torch", "torchvision") or (top == "av" and os.environ.get("BLOCK_AV")):
            raise ImportError(f"blocked import of {name}")
sys.meta_path.insert(0, Block())
"""


def test_video_predict_needs_no_torch_and_names_the_extra_without_pyav(tmp_path, model):
    clip = _write_video(tmp_path / "clip.mp4", _frames(4))
    proc = _popen(tmp_path, "predict", model, clip, "-o", tmp_path / "out", prelude=BLOCK)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and (tmp_path / "out" / "clip_overlay.mp4").is_file(), stderr
    env = {**os.environ, "BLOCK_AV": "1"}
    script = tmp_path / "vitseg_no_click.py"
    blocked = subprocess.run([sys.executable, str(script), "predict", str(model), str(clip), "-o", str(tmp_path / "o2")],
                             capture_output=True, text=True, timeout=120, env=env)
    lines = error_lines(blocked.stderr)
    assert blocked.returncode == 2 and len(lines) == 1 and "pip install 'vitseg-export[video]'" in lines[0], blocked.stderr
    assert not (tmp_path / "o2").exists()
