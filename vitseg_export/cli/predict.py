"""`vitseg predict`: mask PNGs for images and folders, mask and overlay videos for video files, cameras and live
streams; torch-free with an ONNX artifact (video needs PyAV, the `video` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from rich import box
from rich.markup import escape
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from vitseg_export.cli.common import (
    MAX_BATCH,
    POSITIVE,
    check_artifact_manifest,
    console,
    emit,
    progress_bar,
    spare_inputs,
)
from vitseg_export.cli.options import BackendChoice, arg, opt
from vitseg_export.errors import BackendMissingError, Terminated, VitsegError
from vitseg_export.files import check_output_dir, check_output_file, check_outputs_spare_inputs, check_readable_file
from vitseg_export.predict.sources import LIVE_KINDS, check_video_source, source_kind, source_stem
from vitseg_export.predict.still import IMAGE_SUFFIXES, folder_images, output_stems, predict_images
from vitseg_export.predict.video import DEFAULT_TIMEOUT, EXIT_ENDED_EARLY, STAGES, StreamEndedEarly, predict_video

SOURCES_HELP = ("Images; folders of images (each image, in name order); video files (.mp4, .mkv, .avi, .webm, ...); "
                "cameras (camera:N, /dev/videoN); live streams (rtsp://, rtmp://, http(s):// MJPEG or HLS, tcp://, "
                "udp://, srt://).")


def predict(
    model: Annotated[str, arg("An artifact (.onnx, .xml, .engine) or a checkpoint.", "an artifact or checkpoint")],
    sources: Annotated[list[str], arg(SOURCES_HELP, "an image, folder or video source", metavar="SOURCE...")],
    output: Annotated[Path, opt("--output", "the masks, overlays and videos (a directory)")],
    overlay: Annotated[bool, opt("--overlay")] = False,
    masks: Annotated[bool, opt("--masks")] = False,
    every: Annotated[int, opt("--every", min=1)] = 1,
    max_frames: Annotated[Optional[int], opt("--max-frames", min=1)] = None,
    duration: Annotated[Optional[float], opt("--duration", "each video source", callback=POSITIVE)] = None,
    timeout: Annotated[float, opt("--timeout", callback=POSITIVE)] = DEFAULT_TIMEOUT,
    batch_size: Annotated[int, opt("--batch-size", "inference, for video files (an artifact with a dynamic batch)",
                                   min=1, max=MAX_BATCH)] = 1,
    device: Annotated[str, opt("--device")] = "cpu",
    backend: Annotated[Optional[BackendChoice], opt("--backend", " that runs the model")] = None,
    allow_large_images: Annotated[bool, opt("--allow-large-images")] = False,
    json_output: Annotated[bool, opt("--json")] = False,
    report: Annotated[Optional[Path], opt("--report")] = None,
) -> None:
    """Class-index mask PNGs (and overlays) for images, naming each as it is written; for a video file, camera or
    live stream, a video of its overlays (<stem>_overlay.mp4) or masks (--masks), then the frames per second and
    each stage's p50/p90 milliseconds (decode, preprocess, inference, postprocess, encode). A live source always runs
    its newest frame (frames the model has no time for are dropped and counted) until --duration, --max-frames or
    Ctrl-C, and its video is finished and kept either way.

    Exit codes: 0 done; 2 an error (nothing is written for the source that failed);
    4 a live source ended or went silent before --duration, --max-frames or Ctrl-C (its video so far is kept)."""
    backend_name = backend.value if backend is not None else None
    images, videos, folders = _sources(sources, every, max_frames)
    _check_live_options(videos, every, batch_size)
    check_output_dir(output, "--output")
    if report is not None:
        check_output_file(report, "--report")
    stems = output_stems([Path(text) if kind == "video" else Path(source_stem(text, kind)) for text, kind in videos])
    outputs = {"--output": output, "--report": report}
    spare_inputs(outputs, models=[model], files=images + [Path(text) for text, kind in videos if kind == "video"])
    check_outputs_spare_inputs({k: v for k, v in outputs.items() if v is not None}, folders=folders)
    check_artifact_manifest(model)

    rows: list[dict] = []  # the JSON result, a row as each image or video lands
    finished = []
    try:
        if images:
            _predict_images(model, images, output, overlay, device, backend_name, allow_large_images, json_output, rows)
        for (text, kind), stem in zip(videos, stems):
            result = _predict_video(model, text, output, stem, masks, overlay, device, backend_name, batch_size,
                                    every, max_frames, duration, timeout)
            finished.append(result)
            rows.append(result.to_json())
            if not json_output:
                _print_video(result)
    except (KeyboardInterrupt, Terminated):
        if json_output or report is not None:  # what it finished, as the JSON a whole run prints
            emit(rows, json_output, report)
        raise
    emit(rows, json_output, report)
    _raise_if_ended_early(finished)


def _check_live_options(videos: list[tuple[str, str]], every: int, batch_size: int) -> None:
    if any(kind in LIVE_KINDS for _, kind in videos) and (every != 1 or batch_size != 1):
        option = "--every" if every != 1 else "--batch-size"
        raise VitsegError(f"{option} applies to video files and folders; a live source runs its newest frame each time "
                          "the model is free", f"drop {option}, or run the live sources in a command of their own")


def _raise_if_ended_early(finished: list) -> None:
    """Exit 4 (after every source ran and the results were printed) where a live source ended before it was asked."""
    early = [r for r in finished if r.ended_early]
    if early:
        r = early[0]
        where = ", ".join(str(p) for p in r.outputs.values())
        # frames decoded and frames run differ by those dropped while the model was busy: say both, not one of each
        dropped = f" ({r.dropped} dropped while the model was busy)" if r.dropped else ""
        raise StreamEndedEarly(f"{r.source} ended the run early: {r.reason}; the {r.frames} frames run of the {r.decoded} "
                               f"it sent{dropped} are in {where}",
                               f"exit code {EXIT_ENDED_EARLY}: the video so far is finished and playable")


def _sources(sources: list[str], every: int, max_frames: int | None) -> tuple[list[Path], list[tuple[str, str]], list[Path]]:
    """(image files, video sources as (text, kind), image folders), every source checked before anything opens it
    (a FIFO among them would wait for a writer forever) and before the model loads; one line for what is wrong."""
    images: list[Path] = []
    videos: list[tuple[str, str]] = []
    folders: list[Path] = []
    refused: list[VitsegError] = []
    for text in sources:
        kind = source_kind(text)
        try:
            if kind == "image":
                check_readable_file(Path(text), "image", directory_hint="pass image files, e.g. DIR/*.jpg")
                images.append(Path(text))
            elif kind == "folder":
                images += _folder_frames(Path(text), every, max_frames)
                folders.append(Path(text))
            else:
                check_video_source(text, kind)
                videos.append((text, kind))
        except BackendMissingError:  # PyAV missing: one line naming the extra, not one per video
            raise
        except VitsegError as e:
            refused.append(e)
    if refused:
        raise VitsegError(refused[0].message + (f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""),
                          refused[0].hint if len(refused) == 1 else "check the sources")
    return images, videos, folders


def _folder_frames(folder: Path, every: int, max_frames: int | None) -> list[Path]:
    try:
        frames = folder_images(folder)
    except VitsegError:  # said as for any directory given where an image was expected, and what a folder needs
        raise VitsegError(f"image {folder} is a directory, not a file, and holds no images",
                          f"pass image files, e.g. DIR/*.jpg, or a folder of {'/'.join(sorted(IMAGE_SUFFIXES))} "
                          "images") from None
    return frames[::every][:max_frames]


def _predict_images(model: str, images: list[Path], output: Path, overlay: bool, device: str, backend: str | None,
                    allow_large_images: bool, json_output: bool, rows: list[dict]) -> None:
    def written(r, count: int, total: int) -> None:  # as each mask lands, so that an interrupted run says what it finished
        rows.append(_image_row(r))
        bar.update(task, completed=count)
        if not json_output:
            console.print(f"{r.image} -> {r.mask_path}" + (f", {r.overlay_path}" if r.overlay_path else ""), markup=False,
                          highlight=False, soft_wrap=True)

    with progress_bar() as bar:
        task = bar.add_task("predict", total=len(images))
        results = predict_images(model, images, output, overlay, device, on_written=written, backend=backend,
                                 max_pixels=0 if allow_large_images else None)
    if not json_output:
        console.print(f"wrote {len(results)} mask{'s' if len(results) != 1 else ''}{' and overlays' if overlay else ''} "
                      f"to {output}", markup=False, highlight=False, soft_wrap=True)


def _image_row(r) -> dict:
    return {"image": str(r.image), "mask": str(r.mask_path), "overlay": str(r.overlay_path) if r.overlay_path else None,
            "class_pixels": r.class_pixels}


def _predict_video(model: str, source: str, output: Path, stem: str, masks: bool, overlay: bool, device: str,
                   backend: str | None, batch_size: int, every: int, max_frames: int | None, duration: float | None,
                   timeout: float):
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed} frames"),
               TextColumn("{task.fields[fps]:.1f} fps"), TextColumn("{task.fields[dropped]} dropped"), TimeElapsedColumn())
    with progress_bar(*columns) as bar:
        task = bar.add_task(escape(source), total=None, fps=0.0, dropped=0)

        def progress(message: str, done: int | None = None, total: int | None = None, **info) -> None:
            bar.update(task, completed=done, total=total, fps=info["fps"], dropped=info["dropped"])

        return predict_video(model, source, output, stem, masks=masks, overlay=overlay, device=device, backend=backend,
                             batch_size=batch_size, every=every, max_frames=max_frames, duration=duration,
                             timeout=timeout, progress=progress)


def _print_video(r) -> None:
    """What a video run wrote, how fast, and where its time went (a table of the stages, narrow enough for a piped
    log at 80 columns)."""
    console.print(f"{r.source} -> {', '.join(str(p) for p in r.outputs.values())}", markup=False, highlight=False,
                  soft_wrap=True)
    dropped = f", {r.dropped} dropped" if r.kind in LIVE_KINDS else ""
    console.print(f"{r.frames} frames of {r.size[0]}x{r.size[1]} in {r.seconds:.1f} s: {r.fps:.2f} fps end to end"
                  f"{dropped} (ended: {r.ended})", markup=False, highlight=False, soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD)
    for col in ("stage", "p50 ms", "p90 ms"):
        table.add_column(col, justify="right" if col != "stage" else "left", no_wrap=True)
    for stage in STAGES:
        figures = r.stages[stage]
        table.add_row(stage, *("-" if v is None else f"{v:.2f}" for v in (figures["p50_ms"], figures["p90_ms"])))
    if r.latency_ms is not None:
        table.add_row("latency", *("-" if r.latency_ms[k] is None else f"{r.latency_ms[k]:.2f}" for k in ("p50_ms", "p90_ms")))
    console.print(table)
