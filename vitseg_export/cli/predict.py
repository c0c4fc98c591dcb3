"""`vitseg predict`: mask PNGs for images; torch-free with an ONNX artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitseg_export.cli.common import BackendOption, JsonFlag, console, print_json, progress_bar, spare_inputs
from vitseg_export.errors import Terminated, VitsegError
from vitseg_export.files import check_output_dir, check_readable_file
from vitseg_export.predict.still import predict_images


def predict(
    model: Annotated[str, typer.Argument(help="An artifact (.onnx, .xml, .engine) or a checkpoint.")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for <stem>_mask.png (and overlays).")],
    overlay: Annotated[bool, typer.Option("--overlay", help="Also write colour overlays.")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda (openvino: cpu, gpu, npu, auto).")] = "cpu",
    backend: BackendOption = None,
    allow_large_images: Annotated[bool, typer.Option("--allow-large-images", help="Read images over 64 MP (default: refused).")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Write class-index mask PNGs (and optional overlays) for images, naming each as it is written."""
    refused = []
    for path in images:  # before anything opens them: a FIFO among them would wait for a writer forever
        try:
            check_readable_file(path, "image", directory_hint="pass image files, e.g. DIR/*.jpg")
        except VitsegError as e:
            refused.append(e)
    if refused:
        raise VitsegError(refused[0].message + (f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""),
                          refused[0].hint if len(refused) == 1 else "pass image files, e.g. DIR/*.jpg")
    check_output_dir(output, "--output")
    spare_inputs({"--output": output}, models=[model], files=images)

    done: list = []

    def written(r) -> None:  # as each mask lands, so that an interrupted run says what it finished
        done.append(r)
        if not json_output:
            console.print(f"{r.image} -> {r.mask_path}" + (f", {r.overlay_path}" if r.overlay_path else ""), markup=False,
                          highlight=False, soft_wrap=True)

    with progress_bar() as bar:
        task = bar.add_task("predict", total=len(images))

        def progress(r, count: int, total: int) -> None:
            written(r)
            bar.update(task, completed=count)

        try:
            results = predict_images(model, images, output, overlay, device, progress=progress, backend=backend,
                                     max_pixels=0 if allow_large_images else None)
        except (KeyboardInterrupt, Terminated):
            if json_output:  # what it finished, as the JSON a whole run prints
                print_json(_json_rows(done))
            raise
    if json_output:
        print_json(_json_rows(results))
        return
    console.print(f"wrote {len(results)} mask{'s' if len(results) != 1 else ''}{' and overlays' if overlay else ''} "
                  f"to {output}", markup=False, highlight=False, soft_wrap=True)


def _json_rows(results: list) -> list[dict]:
    return [{"image": str(r.image), "mask": str(r.mask_path), "overlay": str(r.overlay_path) if r.overlay_path else None,
             "class_pixels": r.class_pixels} for r in results]
