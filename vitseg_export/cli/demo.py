"""`vitseg demo`: the main job on a fresh machine, no downloads: train on the synthetic set, then the
benchmark matrix (export fp32/fp16/int8, verify each against PyTorch, profile), predict a few images,
and end with the benchmark table."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from vitseg_export.cli.common import console, err_console, log, square_size
from vitseg_export.cli.profile import print_benchmark_table
from vitseg_export.cli.train import train as train_command
from vitseg_export.data.sources import open_source
from vitseg_export.errors import ParityError
from vitseg_export.files import atomic_write_bytes, check_output_dir
from vitseg_export.precisions import get_precision
from vitseg_export.predict.still import predict_images
from vitseg_export.tables import lazy_module

benchmark = lazy_module("vitseg_export.measure.benchmark")
registry = lazy_module("vitseg_export.modeling.registry")


def demo(
    model: Annotated[str, typer.Option("--model", help="Architecture to train (see `vitseg models`).")] = "segformer-b0",
    output: Annotated[Path, typer.Option("--output", "-o", help="Where everything is written.")] = Path("vitseg-demo"),
    epochs: Annotated[int, typer.Option(min=1, max=10000)] = 2,
    image_size: Annotated[int, typer.Option("--image-size", callback=square_size, help="Training/export size (ViT: its own, 128).")] = 128,
    train_images: Annotated[int, typer.Option("--train-images", min=8, max=1000000)] = 1000,
    verify_images: Annotated[int, typer.Option("--verify-images", min=1, max=100000)] = 32,
    precisions: Annotated[str, typer.Option("--precisions", help="Comma-separated precisions to export.")] = "fp32,fp16,int8",
) -> None:
    """Train -> export (fp32, fp16, int8) -> verify -> profile -> predict, on CPU in a few minutes."""

    check_output_dir(output, "--output")
    wanted = tuple(p.strip() for p in precisions.split(","))
    for name in wanted:  # a bad precision is one line before training, not after it
        get_precision(name)
    arch = registry.get_architecture(model)
    size = registry.get_family(arch.family).fixed_input_size(arch.config) or image_size
    run_dir = output / "run"
    err_console.rule(Text(f"1/3 train {model} on synthetic[:{train_images}] ({epochs} epochs, {size}px)"))
    train_command(output=run_dir, model=model, data=f"synthetic[:{train_images}]", epochs=epochs, image_size=size,
                  batch_size=16, init=None, lr=None, workers=1, seed=0)

    err_console.rule(Text(f"2/3 export {precisions} to {', '.join(benchmark.available_formats())}, verify each against PyTorch, profile"))
    settings = benchmark.BenchmarkSettings(formats=benchmark.available_formats(), precisions=wanted,
                                 image_size=(size, size),
                                 verify_images=verify_images)
    report = benchmark.run_benchmark(str(run_dir), output, settings, log=log)

    err_console.rule("3/3 predict")
    samples, predictions = output / "samples", output / "predictions"
    paths = []
    for sample in open_source("synthetic[:4]", "val"):
        buf = io.BytesIO()
        sample.image.save(buf, format="PNG")
        atomic_write_bytes(samples / f"{sample.name}.png", buf.getvalue())
        paths.append(samples / f"{sample.name}.png")
    first_verified = next((r for r in report.rows[1:] if r.status == "verified"), None)
    if first_verified and first_verified.path:
        predict_images(first_verified.path, paths, predictions, overlay=True)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = max(metrics["epochs"], key=lambda e: e["val_miou"])
    print_benchmark_table(report, title=f"vitseg demo: {report.architecture} at {size}x{size}, batch 1, CPU "
                                        f"(val pixel accuracy {best['val_pixel_accuracy'] * 100:.2f}%, "
                                        f"mIoU {best['val_miou'] * 100:.2f})")
    console.print(f"files: checkpoint {run_dir}, artifacts {output / 'artifacts'} (each with a .json manifest), "
                  f"verify reports {output / 'reports'}, {output / 'benchmark.md'}, {output / 'pareto.png'}, "
                  f"{output / 'overlays.png'}, masks and overlays {predictions}", soft_wrap=True, markup=False)
    failed = [r.name for r in report.rows if r.failed]
    if failed:
        raise ParityError(f"{len(failed)} artifact(s) did not verify: {', '.join(failed)}", "see the status column and reports")
