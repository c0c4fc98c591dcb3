"""`vitseg demo`: the main job on a fresh machine, no downloads: train on the synthetic set, then the
benchmark matrix (export fp32/fp16/int8, verify each against PyTorch, profile), predict a few images,
and end with the benchmark table."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Annotated, Optional

from rich.text import Text

from vitseg_export.cli.common import comma_items, console, emit, err_console, log, square_size
from vitseg_export.cli.options import opt
from vitseg_export.cli.profile import print_benchmark_table
from vitseg_export.cli.train import train as train_command
from vitseg_export.data.sources import open_source
from vitseg_export.errors import ParityError
from vitseg_export.files import atomic_write_bytes, check_output_dir, check_output_file
from vitseg_export.precisions import get_precision
from vitseg_export.predict.still import predict_images
from vitseg_export.tables import lazy_module

benchmark = lazy_module("vitseg_export.measure.benchmark")
registry = lazy_module("vitseg_export.modeling.registry")


def demo(
    model: Annotated[str, opt("--model", " to train")] = "segformer-b0",
    output: Annotated[Path, opt("--output", "everything (a directory)")] = Path("vitseg-demo"),
    epochs: Annotated[int, opt("--epochs", "", min=1, max=10000)] = 2,
    image_size: Annotated[str, opt("--image-size", " to train and export at (square; ViT: its own, 128)")] = "128",
    train_images: Annotated[int, opt("--train-images", min=8, max=1000000)] = 1000,
    num_images: Annotated[int, opt("--num-images", " judge each artifact", min=1, max=100000)] = 32,
    precisions: Annotated[str, opt("--precisions", " to export (each where its format carries it)")] = "fp32,fp16,bf16,int8",
    json_output: Annotated[bool, opt("--json")] = False,
    report_file: Annotated[Optional[Path], opt("--report")] = None,
) -> None:
    """Train -> export (fp32, fp16, bf16, int8) -> verify -> profile -> predict, on the CPU (about 6 minutes on 2 cores)."""

    side = square_size(image_size)
    check_output_dir(output, "--output")
    if report_file:
        check_output_file(report_file, "--report")
    wanted = tuple(comma_items(precisions, "--precisions", "fp32,int8"))
    for name in wanted:  # a bad precision is one line before training, not after it
        get_precision(name)
    arch = registry.get_architecture(model)
    size = (registry.get_family(arch.family).fixed_input_size(arch.config) or (side, side))[0]
    run_dir = output / "run"
    err_console.rule(Text(f"1/3 train {model} on synthetic[:{train_images}] ({epochs} epochs, {size}px)"))
    train_command(output=run_dir, model=model, data=f"synthetic[:{train_images}]", epochs=epochs, image_size=str(size),
                  batch_size=16, init=None, revision=None, lr=None, workers=1, seed=0, json_output=False, report=None)

    err_console.rule(Text(f"2/3 export {precisions} to {', '.join(benchmark.available_formats())}, verify each against PyTorch, profile"))
    settings = benchmark.BenchmarkSettings(formats=benchmark.available_formats(), precisions=wanted,
                                 image_size=(size, size),
                                 verify_images=num_images)
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

    emit(report.to_json(), json_output, report_file)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = max(metrics["epochs"], key=lambda e: e["val_miou"])
    if not json_output:
        _print_summary(report, size, best, run_dir, output, predictions)
    failed = [r.name for r in report.rows if r.failed]
    if failed:
        raise ParityError(f"{len(failed)} artifact(s) did not verify: {', '.join(failed)}", "see the status column and reports")


def _print_summary(report, size: int, best: dict, run_dir: Path, output: Path, predictions: Path) -> None:
    print_benchmark_table(report, title=f"vitseg demo: {report.architecture} at {size}x{size}, batch 1, CPU "
                                        f"(val pixel accuracy {best['val_pixel_accuracy'] * 100:.2f}%, "
                                        f"mIoU {best['val_miou'] * 100:.2f})")
    console.print(f"files: checkpoint {run_dir}, artifacts {output / 'artifacts'} (each with a .json manifest), "
                  f"verify reports {output / 'reports'}, {output / 'benchmark.md'}, {output / 'pareto.png'}, "
                  f"{output / 'overlays.png'}, masks and overlays {predictions}", soft_wrap=True, markup=False)
