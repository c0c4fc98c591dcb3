"""`vitseg predict`: mask PNGs for images; torch-free with an ONNX artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitseg_export.cli.common import JsonFlag, console, err_console, print_json


def predict(
    model: Annotated[str, typer.Argument(help="An ONNX artifact or a checkpoint.")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for <stem>_mask.png (and overlays).")],
    overlay: Annotated[bool, typer.Option("--overlay", help="Also write colour overlays.")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    json_output: JsonFlag = False,
) -> None:
    """Write class-index mask PNGs (and optional overlays) for images."""
    from rich.progress import Progress

    from vitseg_export.errors import VitsegError
    from vitseg_export.predict import predict_images

    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise VitsegError(f"image {missing[0]} does not exist" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                          "check the paths")
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("predict", total=len(images))
        results = predict_images(model, images, output, overlay, device,
                                 progress=lambda done, total: bar.update(task, completed=done))
    if json_output:
        print_json([{"image": str(r.image), "mask": str(r.mask_path), "overlay": str(r.overlay_path) if r.overlay_path else None,
                     "class_pixels": r.class_pixels} for r in results])
        return
    for r in results:
        console.print(f"{r.image} -> {r.mask_path}" + (f", {r.overlay_path}" if r.overlay_path else ""))
