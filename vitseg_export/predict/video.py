"""Masks for video files, cameras and live streams, torch-free (numpy, Pillow, PyAV, the runners).

A video file runs its frames in order (every one, or every Nth), in batches where the artifact has a dynamic
batch, and writes videos of the same size and frame rate, audio dropped: the colour overlay (H.264 in .mp4) and/or
the class-index mask as lossless video (FFV1 grey in .mkv, whose pixel values are the class indices). A live source
(camera, stream) is decoded on its own thread into a one-frame slot (sources.LiveReader): the model always runs the
newest frame and the frames it had no time for are dropped and counted, so the output never falls behind the
source; its videos are stamped with the time each frame arrived, so they play at the source's pace.

Every run times each frame in every stage (decode, preprocess, inference, postprocess, encode) and reports p50 and
p90 per stage, the end-to-end frame rate and, for live sources, each frame's latency from decoded to written.

Outputs are written under temp names beside their targets (registered with vitseg_export.files, so every exit path
removes them) and renamed over the targets when finished: a file run that fails or is interrupted leaves nothing
behind; a live run that ends (--duration, --max-frames, Ctrl-C, SIGTERM, or the source ending or stalling)
finishes its videos properly (the MP4 index written) and keeps them.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from vitseg_export.errors import Terminated, VitsegError
from vitseg_export.files import _commit, _discard, _missing_directories, _new_temp_name, signals_deferred
from vitseg_export.images import pixels_from_image
from vitseg_export.predict.sources import (
    LIVE_KINDS,
    DecodedFrame,
    LiveReader,
    VideoSource,
    check_video_source,
    describe_source,
    source_kind,
)
from vitseg_export.predict.still import blend_overlay, full_size_mask
from vitseg_export.progress import Progress
from vitseg_export.runners import runner_for
from vitseg_export.runners.base import Runner, mask_of
from vitseg_export.tables import lazy_module

av = lazy_module("av")  # the `video` extra

STAGES = ("decode", "preprocess", "inference", "postprocess", "encode")
DEFAULT_TIMEOUT = 10.0
EXIT_ENDED_EARLY = 4
ENDED_EARLY = frozenset({"source ended", "source failed"})  # a live source's own end: the run did not choose it
LIVE_TIME_BASE = Fraction(1, 1000)  # live videos are stamped in milliseconds of arrival
OUTPUT_NAMES = {"overlay": "{stem}_overlay.mp4", "mask": "{stem}_mask.mkv"}
_POLL = 0.1  # seconds between checks for Ctrl-C and deadlines while a live run waits for a frame


class StreamEndedEarly(VitsegError):
    """A live source ended or failed before --duration, --max-frames or Ctrl-C ended the run; what it sent is in
    the output, finished and playable. Exit code 4."""

    exit_code = EXIT_ENDED_EARLY


def percentiles_ms(values: list[float]) -> dict[str, float | None]:
    """{"p50_ms", "p90_ms"} of millisecond samples (None without samples)."""
    if not values:
        return {"p50_ms": None, "p90_ms": None}
    p50, p90 = np.percentile(np.asarray(values, dtype=np.float64), [50, 90])
    return {"p50_ms": round(float(p50), 3), "p90_ms": round(float(p90), 3)}


class StageClock:
    """Milliseconds per frame in each stage of a run. A batch's inference counts for each of its frames as its
    share (the batch's time over its size), so the stages of a frame add up to what the frame cost."""

    def __init__(self) -> None:
        self.ms: dict[str, list[float]] = {stage: [] for stage in STAGES}

    def add(self, stage: str, ms: float) -> None:
        self.ms[stage].append(ms)

    def table(self) -> dict[str, dict[str, float | None]]:
        return {stage: percentiles_ms(values) for stage, values in self.ms.items()}


def video_outputs(output: Path, stem: str, masks: bool = False, overlay: bool = False) -> dict[str, Path]:
    """The files a video source writes into `output`: the overlay video by default, the lossless mask video
    with `masks`, both with `masks` and `overlay`."""
    kinds = (["overlay"] if overlay or not masks else []) + (["mask"] if masks else [])
    return {kind: Path(output) / OUTPUT_NAMES[kind].format(stem=stem) for kind in kinds}


def _open_encoder(path: Path, kind: str, size: tuple[int, int], rate: Fraction, time_base: Fraction,
                  live: bool) -> tuple[Any, Any]:
    width, height = size
    if kind == "mask":  # lossless, and grey: decoding gives the class indices back exactly
        container = av.open(str(path), "w", format="matroska")
        stream = container.add_stream("ffv1", rate=rate)
        stream.pix_fmt = "gray"
    else:
        container = av.open(str(path), "w", format="mp4")
        if "libx264" in av.codecs_available:
            # live: no look-ahead, no frame threads' delay; files: a better picture for the same time
            options = {"preset": "ultrafast", "tune": "zerolatency"} if live else {"preset": "veryfast", "crf": "20"}
            stream = container.add_stream("libx264", rate=rate, options=options)
            # 4:2:0 needs even sides; 4:4:4 keeps an odd-sized picture's size exact
            stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        else:  # an FFmpeg build without x264: MPEG-4 Part 2 plays everywhere too
            stream = container.add_stream("mpeg4", rate=rate, options={"qscale": "3"})
            stream.pix_fmt = "yuv420p"
    stream.width, stream.height = width, height
    stream.codec_context.time_base = time_base
    return container, stream


class VideoWriter:
    """The output videos of one source, encoded under temp names beside their targets; `finish` closes them and
    renames them over the targets together, `abort` removes them. Pictures of another size than the first
    (a stream that changes resolution) are scaled to it: nearest for masks, so class indices stay exact."""

    def __init__(self, targets: dict[str, Path], size: tuple[int, int], rate: Fraction, time_base: Fraction,
                 live: bool):
        self.targets, self.size, self.time_base = targets, size, time_base
        self.frames = 0
        self._temps: dict[str, Path] = {}
        self._encoders: dict[str, tuple[Any, Any]] = {}
        # the directories this writer makes: `abort` removes them again where they are left empty (a failed source
        # leaves no empty output directory behind)
        self._created = _missing_directories(dict.fromkeys(targets.values(), b""))
        try:
            for kind, target in targets.items():
                target.parent.mkdir(parents=True, exist_ok=True)
                self._temps[kind] = _new_temp_name(target)
                self._encoders[kind] = _open_encoder(self._temps[kind], kind, size, rate, time_base, live)
        except BaseException:
            self.abort()
            raise

    def write(self, pts: int, pictures: dict[str, np.ndarray]) -> None:
        """Encode one frame's pictures ({"overlay": (H, W, 3) uint8, "mask": (H, W) uint8}) at `pts`."""
        for kind, (container, stream) in self._encoders.items():
            picture = pictures[kind]
            if kind == "mask":
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(full_size_mask(picture, self.size)), format="gray")
            else:
                frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = pts, self.time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        self.frames += 1

    def finish(self) -> dict[str, Path]:
        """Flush the encoders, close the files (an MP4's index is written here) and rename them over the targets
        together; returns the targets."""
        for container, stream in self._encoders.values():
            for packet in stream.encode(None):
                container.mux(packet)
            container.close()
        self._encoders = {}
        with signals_deferred():
            _commit({self.targets[kind]: temp for kind, temp in self._temps.items()})
            for temp in self._temps.values():
                _discard(temp)  # renamed: only the registry's entry is left
            self._temps = {}
        return dict(self.targets)

    def abort(self) -> None:
        """Close and remove the temp files; the targets are untouched."""
        for container, _ in self._encoders.values():
            try:
                container.close()
            except Exception:  # an encoder in a failed state: the file is discarded anyway
                pass
        self._encoders = {}
        with signals_deferred():
            for temp in self._temps.values():
                _discard(temp)
            self._temps = {}
            for directory in self._created:  # deepest first; only where nothing else was put
                try:
                    directory.rmdir()
                except OSError:
                    pass
            self._created = []


@dataclass
class VideoPrediction:
    """What a video run did: its outputs, frames, drops, stage times and how it ended."""

    source: str
    kind: str  # video, camera or stream
    outputs: dict[str, Path]
    size: tuple[int, int]  # (W, H)
    rate: float  # the source's nominal frames per second
    frames: int  # frames run and written
    decoded: int  # frames the decoder produced
    dropped: int  # live: frames a newer one replaced before the model was free
    seconds: float  # wall time from the first frame asked for to the outputs finished
    stages: dict[str, dict[str, float | None]]
    latency_ms: dict[str, float | None] | None  # live: decoded -> written, per frame
    ended: str  # end, max-frames, duration, interrupted, terminated, source ended, source failed
    reason: str | None = None  # why a live source ended early
    batch_size: int = 1
    every: int = 1
    codec: str = ""

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def ended_early(self) -> bool:
        return self.ended in ENDED_EARLY

    def to_json(self) -> dict:
        return {"source": self.source, "kind": self.kind, "outputs": {k: str(v) for k, v in self.outputs.items()},
                "size": list(self.size), "rate": round(self.rate, 3), "codec": self.codec, "frames": self.frames,
                "decoded": self.decoded, "dropped": self.dropped, "seconds": round(self.seconds, 3),
                "fps": round(self.fps, 3), "stages": self.stages, "latency": self.latency_ms, "ended": self.ended,
                "ended_early": self.ended_early, "reason": self.reason, "batch_size": self.batch_size,
                "every": self.every}


@dataclass
class _FrameLoop:
    """Runs frames through the model and into the writer, timing every stage."""

    runner: Runner
    writer: VideoWriter
    live: bool
    step: int  # a file's pts step for one frame interval (frames without timestamps)
    on_frame: Callable[[DecodedFrame, float], None] | None = None
    clock: StageClock = field(default_factory=StageClock)
    latencies: list[float] = field(default_factory=list)
    _first: float | None = None  # the first frame's pts (files) or arrival time (live)
    _last_pts: int = -1

    def _pts(self, frame: DecodedFrame) -> int:
        """Output timestamps start at 0 and always increase: a file keeps its own (the same rate, and --every's
        gaps), a live source is stamped with each frame's arrival in milliseconds (the source's pace)."""
        if self.live:
            self._first = frame.captured_at if self._first is None else self._first
            pts = round((frame.captured_at - self._first) / LIVE_TIME_BASE)
        elif frame.pts is None:
            pts = self._last_pts + self.step
        else:
            self._first = frame.pts if self._first is None else self._first
            pts = frame.pts - self._first
        pts = max(pts, self._last_pts + 1)
        self._last_pts = pts
        return pts

    def run(self, frames: list[DecodedFrame]) -> None:
        size = tuple(self.runner.image_size)
        prepared = []
        for frame in frames:
            started = time.perf_counter()
            rgb = frame.rgb()
            converted = time.perf_counter()
            pixels = pixels_from_image(Image.fromarray(rgb), size)  # the one preprocessing, as for still images
            self.clock.add("decode", frame.decode_ms + (converted - started) * 1000)
            self.clock.add("preprocess", (time.perf_counter() - converted) * 1000)
            prepared.append((frame, rgb, pixels))
        started = time.perf_counter()
        masks = mask_of(self.runner.infer({"pixels": np.stack([pixels for _, _, pixels in prepared])})).astype(np.uint8)
        share = (time.perf_counter() - started) * 1000 / len(prepared)
        for (frame, rgb, _), mask in zip(prepared, masks):
            self.clock.add("inference", share)
            started = time.perf_counter()
            full = full_size_mask(mask, (rgb.shape[1], rgb.shape[0]))
            pictures = {kind: blend_overlay(rgb, full) if kind == "overlay" else full for kind in self.writer.targets}
            encoding = time.perf_counter()
            self.writer.write(self._pts(frame), pictures)
            done = time.perf_counter()
            self.clock.add("postprocess", (encoding - started) * 1000)
            self.clock.add("encode", (done - encoding) * 1000)
            if self.live:
                self.latencies.append((done - frame.captured_at) * 1000)
            if self.on_frame is not None:
                self.on_frame(frame, done)


@contextmanager
def _first_ctrl_c_stops(stop: threading.Event) -> Iterator[None]:
    """The first Ctrl-C asks a live run to stop: it finishes the frame in hand and its videos. A second Ctrl-C
    interrupts as usual (and then nothing is kept). Python runs signal handlers in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def request_stop(signum: int, frame: Any) -> None:
        stop.set()
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)

    signal.signal(signal.SIGINT, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _checked_source_kind(source: str, batch_size: int, every: int) -> str:
    """The kind of a video `source` (a file, camera or stream), refused in one line before anything opens it."""
    kind = source_kind(source)
    if kind not in ("video", *LIVE_KINDS):
        raise VitsegError(f"{source} is not a video file, camera or stream", "still images run with predict_images")
    check_video_source(source, kind)
    if kind in LIVE_KINDS and (batch_size != 1 or every != 1):
        option = "--batch-size" if batch_size != 1 else "--every"
        raise VitsegError(f"{option} applies to video files; a live source ({source}) runs its newest frame each "
                          "time the model is free", f"drop {option} for cameras and streams")
    if batch_size < 1 or every < 1:
        raise VitsegError(f"batch_size {batch_size} and every {every} must be at least 1")
    return kind


def _pts_step(video: VideoSource, time_base: Fraction | None) -> int:
    """Timestamp units between a file's frames (a frame without its own pts gets the last one plus this)."""
    return max(1, round(1 / (video.rate * time_base))) if video.rate and time_base else 1


def _latency(latencies: list[float]) -> dict:
    """A live run's latency from each frame's arrival to its pictures written: p50 / p90 / max ms."""
    return {**percentiles_ms(latencies), "max_ms": round(max(latencies), 3) if latencies else None}


def predict_video(model: str | Runner, source: str, output: Path, stem: str | None = None, masks: bool = False,
                  overlay: bool = False, device: str = "cpu", backend: str | None = None, batch_size: int = 1,
                  every: int = 1, max_frames: int | None = None, duration: float | None = None,
                  timeout: float = DEFAULT_TIMEOUT, progress: Progress | None = None,
                  on_frame: Callable[[DecodedFrame, float], None] | None = None) -> VideoPrediction:
    """Run a video file, camera or stream (`source`) through `model` (an artifact or checkpoint, or a Runner)
    and write its videos into `output` as `<stem>_overlay.mp4` and/or `<stem>_mask.mkv` (`video_outputs`).

    Files: every `every`-th frame, `batch_size` frames per inference (an artifact with a dynamic batch), until
    the end, `max_frames` frames or `duration` seconds. Live sources: the newest frame each time the model is
    free, until `duration` seconds, `max_frames` frames, Ctrl-C or SIGTERM, or the source ending, failing or
    sending nothing for `timeout` seconds (`ended_early`: the output so far is kept). `timeout` also bounds
    opening a live source. `progress("video", frames, total or None, dropped=N, fps=F)` hears of each frame written,
    `on_frame(frame, done_at)` of each frame with the perf_counter time its pictures were written.
    Raises VitsegError (one line) for a source that cannot be read and for a file that fails mid-way (nothing is
    written then)."""
    kind = _checked_source_kind(source, batch_size, every)
    live = kind in LIVE_KINDS
    targets = video_outputs(output, stem or Path(source).stem, masks, overlay)
    video = VideoSource(source, kind, timeout)  # a file that cannot be read fails before the model loads
    # a live source is read from the moment it opens: the frames that arrive while the model loads replace one
    # another in the slot (dropped) instead of piling up in the socket for the run to start a backlog behind
    reader = LiveReader(video).start() if live else None
    try:
        runner = model if isinstance(model, Runner) else runner_for(model, device=device, backend=backend,
                                                                     outputs=("mask",))
        with runner if runner is not model else nullcontext(runner.activate()):
            if batch_size > 1 and not runner.dynamic_batch:
                raise VitsegError(f"--batch-size {batch_size}: {runner.name} was exported with a static batch of 1",
                                  "export it with --dynamic-batch, or drop --batch-size")
            writer = VideoWriter(targets, video.size, video.rate, LIVE_TIME_BASE if live else video.time_base, live)
            loop = _FrameLoop(runner, writer, live, _pts_step(video, writer.time_base), on_frame)
            try:
                if reader is not None:
                    ended, reason, decoded, dropped, started = _run_live(loop, reader, video, max_frames, duration,
                                                                         timeout, progress)
                else:
                    ended, decoded, started = _run_file(loop, video, batch_size, every, max_frames, duration, progress)
                    reason, dropped = None, 0
                if writer.frames == 0:
                    raise VitsegError(f"{describe_source(source, kind)} gave no frame to run"
                                      + (f" ({reason})" if reason else ""), "check the source")
                outputs = writer.finish()
            except Terminated as stopped:
                if live and writer.frames:  # a service manager stopping a live run: keep what it recorded, and say so
                    stopped.kept += list(writer.finish().values())
                raise
            finally:
                writer.abort()  # no-op once finished
            seconds = time.perf_counter() - started
    finally:
        if reader is not None:
            reader.close()
        else:
            video.close()
    latency = _latency(loop.latencies) if live else None
    return VideoPrediction(source, kind, outputs, video.size, float(video.rate), writer.frames, decoded, dropped,
                           seconds, loop.clock.table(), latency, ended, reason, batch_size, every, video.codec)


def _run_file(loop: _FrameLoop, video: VideoSource, batch_size: int, every: int, max_frames: int | None,
              duration: float | None, progress: Progress | None) -> tuple[str, int, float]:
    """(how it ended, frames decoded, start time)."""
    total = math.ceil(video.declared_frames / every) if video.declared_frames else None
    if total is not None and max_frames is not None:
        total = min(total, max_frames)
    started = time.perf_counter()
    frames = video.frames(every)
    batch: list[DecodedFrame] = []
    queued, decoded, ended = 0, 0, "end"
    while True:
        if max_frames is not None and queued >= max_frames:
            ended = "max-frames"
            break
        if duration is not None and time.perf_counter() - started >= duration:
            ended = "duration"
            break
        frame = next(frames, None)
        if frame is None:
            break
        decoded = frame.index + 1
        batch.append(frame)
        queued += 1
        if len(batch) == batch_size:
            loop.run(batch)
            batch = []
            if progress:
                progress("video", loop.writer.frames, total, dropped=0, fps=loop.writer.frames / (time.perf_counter() - started))
    frames.close()
    if batch:
        loop.run(batch)
        if progress:
            progress("video", loop.writer.frames, total, dropped=0, fps=loop.writer.frames / (time.perf_counter() - started))
    return ended, decoded, started


def _run_live(loop: _FrameLoop, reader: LiveReader, video: VideoSource, max_frames: int | None,
              duration: float | None, timeout: float,
              progress: Progress | None) -> tuple[str, str | None, int, int, float]:
    """(how it ended, why the source ended early, frames decoded, dropped, start time)."""
    slot, stop = reader.slot, threading.Event()
    started = last_frame = time.perf_counter()
    ended, reason = "", None
    with _first_ctrl_c_stops(stop):
        while not ended:
            now = time.perf_counter()
            if stop.is_set():
                ended = "interrupted"
            elif max_frames is not None and loop.writer.frames >= max_frames:
                ended = "max-frames"
            elif duration is not None and now - started >= duration:
                ended = "duration"
            elif (frame := slot.take(min(_POLL, duration - (now - started)) if duration else _POLL)) is not None:
                loop.run([frame])
                last_frame = time.perf_counter()
                if progress:
                    progress("video", loop.writer.frames, None, dropped=slot.dropped, fps=loop.writer.frames / (last_frame - started))
            elif slot.ended:
                ended = "source ended" if slot.error is None else "source failed"
                error = slot.error
                reason = (f"{video.what} ended after {slot.decoded} frames" if error is None else
                          error.message if isinstance(error, VitsegError) else f"{type(error).__name__}: {error}")
            elif now - last_frame > timeout:  # frames stopped coming while packets still do (all undecodable)
                ended, reason = "source failed", f"{video.what} gave no frame for {timeout:g} s"
    return ended, reason, slot.decoded, slot.dropped, started


__all__ = ["STAGES", "StageClock", "StreamEndedEarly", "VideoPrediction", "VideoWriter", "predict_video",
           "video_outputs"]
