"""Where video frames come from, torch-free: video files, cameras and live streams opened with PyAV (FFmpeg's
libraries, the `video` extra), and, for live sources, the reader thread that keeps only the newest frame.

A SOURCE of `vitseg predict` is one of five kinds (`source_kind`): an image file, a folder of images (both run
as still images, predict/still.py), a video file, a camera (`camera:N`, `/dev/videoN`) or a live stream (a URL:
rtsp://, rtmp://, http(s):// MJPEG or HLS, tcp://, udp://, srt://). Everything a source can get wrong is a
one-line VitsegError: a damaged or truncated file, a codec FFmpeg cannot decode, a camera that does not exist, a
stream that does not answer within the timeout.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import numpy as np

from vitseg_export.errors import VitsegError
from vitseg_export.files import check_readable_file
from vitseg_export.runners.base import require_module
from vitseg_export.tables import lazy_module

av = lazy_module("av")  # the `video` extra: only video files, cameras and streams need it

VIDEO_EXTRA = "pip install 'vitseg-export[video]'"
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".m2ts",
                            ".mts", ".flv", ".wmv", ".ogv", ".3gp", ".y4m"})
STREAM_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "tcp", "udp", "srt", "rtp"})
LIVE_KINDS = frozenset({"camera", "stream"})
DEFAULT_RATE = Fraction(30)  # the nominal rate of a source that declares none (it only guides the encoder)
_CAMERA_INDEX = re.compile(r"camera:(\d+)")
_V4L2_DEVICE = re.compile(r"/dev/video(\d+)")


def source_kind(text: str) -> str:
    """What a SOURCE names: "stream" (a URL), "camera" (camera:N or /dev/videoN), "folder" (a directory),
    "video" (a file with a video suffix) or "image" (anything else: still predict reads and checks it)."""
    if "://" in text and urlsplit(text).scheme.lower() in STREAM_SCHEMES:
        return "stream"
    if _CAMERA_INDEX.fullmatch(text) or _V4L2_DEVICE.fullmatch(text):
        return "camera"
    path = Path(text)
    if path.is_dir():
        return "folder"
    return "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"


def describe_source(text: str, kind: str) -> str:
    """'video clip.mp4', 'camera /dev/video0', 'stream rtsp://...': how messages name a source."""
    return f"{kind} {text}"


def source_stem(text: str, kind: str) -> str:
    """The file-name stem of a source's outputs: a file's stem, camera<N>, or a stream's host and path without
    credentials (rtsp://user:pw@cam:554/live/1 -> cam_554_live_1)."""
    if kind == "camera":
        return "camera" + (_CAMERA_INDEX.fullmatch(text) or _V4L2_DEVICE.fullmatch(text)).group(1)  # type: ignore[union-attr]
    if kind == "stream":
        parts = urlsplit(text)
        where = parts.netloc.rsplit("@", 1)[-1] + parts.path
        return re.sub(r"[^A-Za-z0-9_-]+", "_", where).strip("_")[:80] or "stream"
    return Path(text).stem


def require_pyav() -> None:
    """BackendMissingError (one line, exit 2) naming the extra when PyAV is not installed."""
    require_module("av", "PyAV is not installed, and video files, cameras and streams need it", VIDEO_EXTRA)


def _camera_device(text: str) -> tuple[str, str, dict[str, str]]:
    """(what av.open opens, its input format, options) for camera:N or /dev/videoN on this OS."""
    index = (_CAMERA_INDEX.fullmatch(text) or _V4L2_DEVICE.fullmatch(text)).group(1)  # type: ignore[union-attr]
    if sys.platform.startswith("linux"):
        return f"/dev/video{index}", "v4l2", {}
    if sys.platform == "darwin" and text.startswith("camera:"):
        return index, "avfoundation", {"framerate": "30"}  # AVFoundation refuses to open without a rate
    raise VitsegError(f"camera {text} is not supported on {sys.platform}",
                      "cameras work on Linux (camera:N, /dev/videoN) and macOS (camera:N); elsewhere pass the "
                      "camera's stream URL (rtsp://...)")


def _linux_cameras() -> list[str]:
    return sorted(str(p) for p in Path("/dev").glob("video*") if _V4L2_DEVICE.fullmatch(str(p)))


def check_video_source(text: str, kind: str) -> None:
    """Before the model loads: PyAV is installed, a video file is a readable regular file, a camera exists, a
    stream URL names a host. VitsegError (one line) otherwise; what only opening can tell (a damaged file, a
    stream that does not answer) is `VideoSource`'s to say."""
    require_pyav()
    if kind == "video":
        check_readable_file(text, "video", directory_hint="pass a video file, or the folder itself for its images")
    elif kind == "camera":
        device, _, _ = _camera_device(text)
        if device.startswith("/dev/"):
            try:
                mode = os.stat(device).st_mode
            except OSError:
                cameras = _linux_cameras()
                raise VitsegError(f"camera {text}{f' ({device})' if device != text else ''} does not exist",
                                  f"cameras on this machine: {', '.join(cameras)}" if cameras else
                                  "this machine has no /dev/video* device") from None
            if not stat.S_ISCHR(mode):
                raise VitsegError(f"camera {text}: {device} is not a video device", "pass camera:N or /dev/videoN")
    elif kind == "stream" and not urlsplit(text).netloc:
        raise VitsegError(f"stream {text} names no host", "e.g. rtsp://HOST:554/PATH or http://HOST:8080/video")


def _container_options(text: str, kind: str) -> dict[str, str]:
    if kind != "stream":
        return {}
    # nobuffer: packets read while probing the stream are not queued ahead of the live ones (a live run
    # starts at the live edge); RTSP over TCP: no lost packets (smeared frames) behind NATs and firewalls
    options = {"fflags": "nobuffer"}
    if urlsplit(text).scheme.lower() in ("rtsp", "rtsps"):
        options["rtsp_transport"] = "tcp"
    return options


def _open_container(text: str, kind: str, timeout: float) -> Any:
    """av.open for a source, each failure a one-line VitsegError naming the source."""
    what = describe_source(text, kind)
    try:
        if kind == "video":
            return av.open(text, "r", metadata_errors="replace")
        if kind == "camera":
            device, input_format, options = _camera_device(text)
            return av.open(device, "r", format=input_format, container_options=options, timeout=(timeout, timeout),
                           metadata_errors="replace")
        return av.open(text, "r", container_options=_container_options(text, kind), timeout=(timeout, timeout),
                       metadata_errors="replace")
    except (av.error.ExitError, av.error.TimeoutError):  # ExitError: PyAV's timeout interrupted FFmpeg
        raise VitsegError(f"{what} did not answer within {timeout:g} s",
                          "check that the source is running and reachable, or raise --timeout") from None
    except av.error.ConnectionRefusedError:
        raise VitsegError(f"{what} refused the connection", "check the host, the port and that the source is running") from None
    except av.error.FileNotFoundError:
        raise VitsegError(f"{what} does not exist", "check the path" if kind != "stream" else "check the URL") from None
    except av.error.PermissionError:
        raise VitsegError(f"{what} cannot be read (permission denied)",
                          "add yourself to the video group" if kind == "camera" else "check its permissions") from None
    except av.error.InvalidDataError as e:
        if kind == "video":
            raise VitsegError(f"{what} is damaged, truncated or not a video ({e.strerror})",
                              "check it plays (ffprobe FILE); copy or download it again") from None
        raise VitsegError(f"{what} sends nothing FFmpeg reads as video ({e.strerror})", "check the URL") from None
    except av.error.FFmpegError as e:
        raise VitsegError(f"{what} cannot be opened ({e.strerror})",
                          "check the URL and that the source is running" if kind == "stream" else "check the source") from None


@dataclass
class DecodedFrame:
    """One frame as its source's decoder gave it: converted to RGB only when a run uses it (`rgb`), so the frames
    a live run drops cost their decoding and nothing more."""

    index: int  # its position among the source's frames (0: the first decoded)
    pts: int | None  # presentation time in `time_base` units, as the source stamped it
    time_base: Fraction | None
    captured_at: float  # time.perf_counter() when the decoder handed it over
    decode_ms: float  # the decoder's time for it (with the frames skipped since the last one kept)
    video_frame: Any  # the av.VideoFrame

    def rgb(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""
        return self.video_frame.to_ndarray(format="rgb24")


TS_PACKET_BYTES, M2TS_PACKET_BYTES = 188, 192  # MPEG-TS; Blu-ray's .m2ts adds a 4-byte timecode to each


class VideoSource:
    """An open video file, camera or stream: its picture size, nominal rate and time base, and its frames in
    order (`frames`). Opening raises VitsegError (one line) for anything FFmpeg cannot read."""

    def __init__(self, text: str, kind: str, timeout: float = 10.0):
        self.text, self.kind, self.timeout = text, kind, timeout
        self.live = kind in LIVE_KINDS
        self.what = describe_source(text, kind)
        self.container = _open_container(text, kind, timeout)
        try:
            self._describe()
        except BaseException:
            self.close()
            raise

    def _describe(self) -> None:
        streams = self.container.streams.video
        if not streams:
            raise VitsegError(f"{self.what} has no video stream", "pass a file or stream with video in it")
        self.stream = streams[0]
        context = self.stream.codec_context
        if context is None:  # FFmpeg knows the container, not the codec: no decoder to hand it to
            raise VitsegError(f"{self.what} uses a video codec this FFmpeg cannot decode",
                              "re-encode it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4")
        if not context.width or not context.height:
            raise VitsegError(f"{self.what}: its video stream ({context.name}) declares no picture size",
                              "re-encode it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4")
        if not self.live:  # whole files: frame and slice threads decode faster; live ones keep the low delay
            context.thread_type = "AUTO"
        self.codec = context.name
        self.size = (context.width, context.height)
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.rate = Fraction(rate) if rate else DEFAULT_RATE
        self.time_base = self.stream.time_base or Fraction(1, 90000)
        self.declared_frames = int(self.stream.frames or 0)  # 0: the container does not say
        self._check_whole_packets()

    def _check_whole_packets(self) -> None:
        """An MPEG transport stream file is a whole number of fixed-size packets (188 bytes; 192 in .m2ts). It declares
        no frame count, and FFmpeg reads a cut one to its last whole packet without a word (a .ts cut at 60% played
        as 28 of its 50 frames): a file that ends inside a packet was cut, and is refused before any frame is
        decoded. A cut exactly at a packet boundary cannot be told from a short video."""
        if self.live or "mpegts" not in (self.container.format.name or "").split(","):
            return
        path = Path(self.text)
        size = path.stat().st_size if path.is_file() else 0
        if size and size % TS_PACKET_BYTES and size % M2TS_PACKET_BYTES:
            raise VitsegError(f"{self.what} is truncated: its {size:,} bytes end inside a transport packet (an MPEG-TS "
                              f"file is whole {TS_PACKET_BYTES}-byte packets)", "copy or download it again")

    def frames(self, every: int = 1, stop: threading.Event | None = None) -> Iterator[DecodedFrame]:
        """Every `every`-th frame in presentation order, until the source ends or `stop` is set. A file that fails
        to decode raises VitsegError naming the frame (a damaged or truncated file is an error, never a short
        video); a live source skips packets it cannot decode (the next keyframe heals the picture) and raises
        VitsegError when it sends nothing for `timeout` seconds."""
        index, decode_ms = 0, 0.0
        packets = self.container.demux(self.stream)
        while stop is None or not stop.is_set():
            try:
                packet = next(packets)
            except StopIteration:
                self._check_complete(index)
                return
            except (av.error.ExitError, av.error.TimeoutError):
                raise VitsegError(f"{self.what} sent nothing for {self.timeout:g} s after {index} frames",
                                  "the source stalled; raise --timeout for a slow one") from None
            except av.error.FFmpegError as e:
                raise self._damaged(index, e) from None
            if packet.is_corrupt and not self.live:  # a file's last packet cut short: the decoder may hide it
                raise self._damaged(index, "a packet is cut short or corrupt")
            started = time.perf_counter()
            try:
                decoded = packet.decode()
            except av.error.FFmpegError as e:
                if not self.live:
                    raise self._damaged(index, e) from None
                decoded = []  # a live stream's corrupt packet: skip it
            now = time.perf_counter()
            decode_ms += (now - started) * 1000
            for frame in decoded:
                if index % every == 0:
                    yield DecodedFrame(index, frame.pts, frame.time_base, now, decode_ms, frame)
                    decode_ms = 0.0
                index += 1

    def _check_complete(self, decoded: int) -> None:
        """A file whose demuxer ended before the frames its container declares is truncated (cut at a packet
        boundary, or with video packets after an audio packet that was cut). A shortfall of a couple of frames
        is allowed: edit lists may hide frames the container counts."""
        if self.live or not self.declared_frames:
            return
        if self.declared_frames - decoded > max(2, self.declared_frames // 100):
            raise VitsegError(f"{self.what} is truncated: it ends after {decoded} of the {self.declared_frames} frames "
                              "it declares", "copy or download it again")

    def _damaged(self, index: int, error: Exception | str) -> VitsegError:
        reason = error if isinstance(error, str) else getattr(error, "strerror", None) or str(error)
        if self.live:
            return VitsegError(f"{self.what} failed after {index} frames ({reason})", "check the source")
        return VitsegError(f"{self.what} is damaged or truncated: decoding fails after {index} frames ({reason})",
                           "check it plays (ffprobe FILE); copy or download it again")

    def close(self) -> None:
        try:
            self.container.close()
        except Exception:  # closing what failed to read: nothing more to save
            pass


class LatestFrame:
    """A slot for one frame between a reader thread and the run: the reader puts each new frame in, replacing one
    not yet taken (counted as dropped), and the run takes the newest. Nothing queues, so the frame the run starts
    on is never older than one frame interval plus the decoder's time, whatever the model's speed."""

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._frame: DecodedFrame | None = None
        self.decoded = self.taken = self.dropped = 0
        self.ended = False
        self.error: BaseException | None = None  # why the reader stopped (None: the source ended)

    def put(self, frame: DecodedFrame) -> None:
        with self._ready:
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self.decoded += 1
            self._ready.notify()

    def end(self, error: BaseException | None = None) -> None:
        with self._ready:
            self.ended, self.error = True, error
            self._ready.notify()

    def take(self, wait: float) -> DecodedFrame | None:
        """The newest frame not yet taken, waiting up to `wait` seconds for one; None if none came (or the reader
        ended: see `ended`). Short waits keep the caller responsive to Ctrl-C and its own deadlines."""
        with self._ready:
            if self._frame is None and not self.ended:
                self._ready.wait(wait)
            frame, self._frame = self._frame, None
            if frame is not None:
                self.taken += 1
            return frame


class LiveReader:
    """Decodes a live source on its own thread into a LatestFrame slot, so decoding never waits for the model and
    the model never runs a stale frame. The thread owns the container from `start` on and closes it when it ends
    (the source ends or fails, or `close` asks it to stop)."""

    def __init__(self, source: VideoSource):
        self.source = source
        self.slot = LatestFrame()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"vitseg-reader:{source.text}", daemon=True)

    def start(self) -> "LiveReader":
        self._thread.start()
        return self

    def _read(self) -> None:
        try:
            for frame in self.source.frames(stop=self._stop):
                self.slot.put(frame)
            self.slot.end(None)
        except BaseException as e:  # handed to the run, which reports it
            self.slot.end(e)
        finally:
            self.source.close()

    def close(self) -> None:
        """Ask the thread to stop and wait for it: at most one read, which the source's timeout bounds."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.source.timeout + 1.0)
