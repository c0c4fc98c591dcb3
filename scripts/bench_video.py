"""Video predict on this CPU: where each frame's time goes, and the end-to-end frame rate.

    python scripts/bench_video.py [--seconds 30] [--size 1280x720] [--fps 30] [--image-size 512] \
        [--batch-size 1] [--output bench-video]

Makes a synthetic clip with PyAV (moving shapes on a gradient, H.264; `--seconds` long, `--size` WxH, `--fps`),
exports SegFormer-B0 at `--image-size` with `vitseg export segformer-b0` (an architecture name: random weights,
which time the same as trained ones), runs `vitseg predict MODEL clip.mp4 -o out --json` as a user would (its
own process: model loading included in the wall time, not in the frame rate), and prints the date, the CPU (model,
cores, int8 and bf16 flags), the software, the command, each stage's p50/p90 milliseconds per frame (decode,
preprocess, inference, postprocess, encode) and the end-to-end frames per second. The figures are the command's
own --json report: this script measures nothing itself. They hold for this CPU only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

STAGES = ("decode", "preprocess", "inference", "postprocess", "encode")


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WxH, e.g. 1280x720") from None
    if width < 64 or height < 64 or width % 2 or height % 2:
        raise argparse.ArgumentTypeError(f"--size {text!r}: even sides of at least 64 pixels")
    return width, height


def make_clip(path: Path, seconds: float, size: tuple[int, int], fps: int) -> dict:
    """A clip of moving shapes (rectangles and discs of several colours, bouncing) on a gradient, H.264
    (MPEG-4 Part 2 where this FFmpeg has no x264): something a segmentation model sees as a scene, and an encoder
    as motion."""
    import av

    width, height = size
    count = max(1, round(seconds * fps))
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    background = np.stack([xs / width * 180 + 40, ys / height * 160 + 50, (xs + ys) / (width + height) * 120 + 60],
                          axis=-1).astype(np.uint8)
    shapes = [{"disc": bool(i % 2), "r": int(rng.integers(height // 14, height // 5)),
               "xy": rng.uniform((0, 0), (width, height)), "v": rng.uniform(-9, 9, 2) * width / 1280,
               "colour": rng.integers(0, 256, 3).astype(np.uint8)} for i in range(8)]
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    options = {"preset": "veryfast", "crf": "23"} if codec == "libx264" else {"qscale": "4"}
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(count):
            picture = background.copy()
            for shape in shapes:
                shape["xy"] += shape["v"]
                for axis, limit in ((0, width), (1, height)):  # bounce off the edges
                    if not 0 <= shape["xy"][axis] <= limit:
                        shape["v"][axis] *= -1
                        shape["xy"][axis] = min(max(shape["xy"][axis], 0), limit)
                r, (cx, cy) = shape["r"], shape["xy"].astype(int)
                x0, x1, y0, y1 = max(cx - r, 0), min(cx + r, width), max(cy - r, 0), min(cy + r, height)
                if x0 >= x1 or y0 >= y1:
                    continue
                box = picture[y0:y1, x0:x1]
                if shape["disc"]:
                    inside = (xs[y0:y1, x0:x1] - cx) ** 2 + (ys[y0:y1, x0:x1] - cy) ** 2 <= r * r
                    box[inside] = shape["colour"]
                else:
                    box[:] = shape["colour"]
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return {"frames": count, "codec": codec, "bytes": path.stat().st_size}


def vitseg(*args: str, log: Path) -> tuple[subprocess.CompletedProcess, float]:
    """`vitseg ARGS` in its own process; stderr to `log`; (the process, its wall seconds)."""
    started = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-m", "vitseg_export", *args], stdout=subprocess.PIPE, stderr=err,
                              text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise SystemExit(f"vitseg {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    return proc, seconds


def environment() -> dict:
    import av
    import onnxruntime

    from vitseg_export.machine.cpu import cpu_info

    return {"cpu": cpu_info(), "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "pyav": av.__version__, "ffmpeg": getattr(av, "ffmpeg_version_info", "?"), "os": platform.platform()}


def report(result: dict) -> str:
    env, row, clip = result["environment"], result["row"], result["clip"]
    cpu = env["cpu"]
    flags = lambda features: ", ".join(k for k, v in features.items() if v) or "none"  # noqa: E731
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [
        f"date: {result['date']}",
        f"CPU: {cpu['model']}, {cpu['cores']} cores, class {cpu['class']}; int8 flags: {flags(cpu['int8_features'])}; "
        f"bf16 flags: {flags(cpu.get('bf16_features', {}))}",
        f"software: Python {env['python']}, onnxruntime {env['onnxruntime']}, PyAV {env['pyav']} "
        f"(FFmpeg {env['ffmpeg']}), {env['os']}",
        f"clip: {clip['size'][0]}x{clip['size'][1]}, {clip['fps']} fps, {clip['seconds']:g} s ({clip['frames']} frames), "
        f"{clip['codec']}, synthetic moving shapes",
        f"model: segformer-b0 (random weights), ONNX fp32, {result['image_size']}x{result['image_size']}, "
        f"batch {result['batch_size']}",
        f"command: {result['command']}",
        "",
        "| stage | p50 ms | p90 ms |",
        "|---|---:|---:|",
    ]
    lines += [f"| {stage} | {fmt(row['stages'][stage]['p50_ms'])} | {fmt(row['stages'][stage]['p90_ms'])} |"
              for stage in STAGES]
    p50_sum = sum(row["stages"][stage]["p50_ms"] or 0 for stage in STAGES)
    lines += ["",
              f"end to end: {row['frames']} frames in {row['seconds']:.1f} s: {row['fps']:.2f} fps "
              f"(sum of the stage p50s: {p50_sum:.1f} ms a frame, {1000 / p50_sum:.2f} fps); the command took "
              f"{result['wall_seconds']:.1f} s with the model's loading"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="clip length (default 30)")
    ap.add_argument("--size", type=parse_size, default=(1280, 720), help="clip size WxH (default 1280x720)")
    ap.add_argument("--fps", type=int, default=30, help="clip frame rate (default 30)")
    ap.add_argument("--image-size", type=int, default=512, help="the model's input size (default 512)")
    ap.add_argument("--batch-size", type=int, default=1, help="frames per inference (default 1)")
    ap.add_argument("--output", type=Path, default=Path("bench-video"), help="work folder (default bench-video)")
    args = ap.parse_args()
    if args.seconds <= 0 or args.fps < 1:
        ap.error("--seconds and --fps must be positive")
    args.output.mkdir(parents=True, exist_ok=True)
    clip_path, model = args.output / "clip.mp4", args.output / f"segformer-b0-{args.image_size}.onnx"

    started = time.perf_counter()
    clip = make_clip(clip_path, args.seconds, args.size, args.fps)
    print(f"clip: {clip_path} ({clip['frames']} frames, {clip['bytes'] / 1e6:.1f} MB) in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    if not model.is_file():
        _, seconds = vitseg("export", "segformer-b0", "--image-size", str(args.image_size), "--output", str(model),
                            log=args.output / "export.log")
        print(f"export: {model} in {seconds:.1f} s", flush=True)
    predict = ["predict", str(model), str(clip_path), "-o", str(args.output / "out"), "--json"]
    if args.batch_size != 1:
        predict += ["--batch-size", str(args.batch_size)]
    print("predict: running", flush=True)
    proc, wall = vitseg(*predict, log=args.output / "predict.log")
    [row] = json.loads(proc.stdout)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "environment": environment(), "image_size": args.image_size, "batch_size": args.batch_size,
              "clip": {**clip, "size": list(args.size), "fps": args.fps, "seconds": args.seconds},
              "command": "vitseg " + shlex.join(predict), "row": row, "wall_seconds": wall}
    (args.output / "summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = report(result)
    (args.output / "summary.md").write_text(text)
    print()
    print(text, end="")


if __name__ == "__main__":
    main()
