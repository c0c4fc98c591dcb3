"""`vitseg demo`: the main job on a fresh machine, no downloads: train on the synthetic set, export,
verify, predict a few images, measure latency, print a summary."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vitseg_export.cli.common import console, err_console


def demo(
    model: Annotated[str, typer.Option("--model", help="Architecture to train (see `vitseg models`).")] = "segformer-b0",
    output: Annotated[Path, typer.Option("--output", "-o", help="Where everything is written.")] = Path("vitseg-demo"),
    epochs: Annotated[int, typer.Option(min=1)] = 2,
    image_size: Annotated[int, typer.Option("--image-size", help="Training/export size (ViT: its own, 128).")] = 128,
    train_images: Annotated[int, typer.Option("--train-images", min=8)] = 1000,
    verify_images: Annotated[int, typer.Option("--verify-images", min=1)] = 32,
) -> None:
    """Train -> export -> verify -> predict -> latency, on CPU in a few minutes."""
    import warnings

    import numpy as np

    from vitseg_export.artifact import pixels_from_image
    from vitseg_export.checkpoint import load_checkpoint
    from vitseg_export.cli.train import train as train_command
    from vitseg_export.data.sources import open_source
    from vitseg_export.errors import ParityError
    from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx
    from vitseg_export.files import atomic_write_bytes
    from vitseg_export.modeling.registry import get_architecture
    from vitseg_export.predict import predict_images
    from vitseg_export.profiling import measure_latency
    from vitseg_export.runners import runner_for
    from vitseg_export.verify import verify_artifact, write_report

    arch = get_architecture(model)
    size = arch.config.image_size if arch.family == "vit" else image_size
    run_dir, artifacts, reports = output / "run", output / "artifacts", output / "reports"

    err_console.rule(f"1/5 train {model} on synthetic[:{train_images}] ({epochs} epochs, {size}px)")
    train_command(output=run_dir, model=model, data=f"synthetic[:{train_images}]", epochs=epochs, image_size=size,
                  batch_size=16, init=None, lr=None, workers=1, seed=0)

    err_console.rule("2/5 export to ONNX (fp32, opset 17, logits + mask)")
    loaded = load_checkpoint(run_dir)
    onnx_path = artifacts / f"{loaded.meta.architecture}-fp32.onnx"
    export_onnx(loaded, onnx_path, OnnxExportSettings(outputs="both"), progress=lambda m: err_console.print(f"  {m}"))

    err_console.rule(f"3/5 verify against PyTorch on {verify_images} held-out images")
    result = verify_artifact(onnx_path, str(run_dir), "synthetic", verify_images, "cpu", save_diff=reports / "diff")
    write_report(result.report, reports / "verify-fp32.json")

    err_console.rule("4/5 predict")
    samples_dir, predictions = output / "samples", output / "predictions"
    source = open_source("synthetic[:4]", "val")
    paths = []
    for sample in source:
        buf = io.BytesIO()
        sample.image.save(buf, format="PNG")
        path = samples_dir / f"{sample.name}.png"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    predict_images(str(onnx_path), paths, predictions, overlay=True)

    err_console.rule("5/5 latency (batch 1, CPU)")
    pixels = pixels_from_image(source[0].image, (size, size))[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with runner_for(loaded, backend="torch") as torch_runner:
            eager = measure_latency(torch_runner, pixels)
        with runner_for(onnx_path) as ort_runner:
            ort = measure_latency(ort_runner, pixels)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = max(metrics["epochs"], key=lambda e: e["val_miou"])
    r = result.report
    summary = {
        "model": loaded.meta.architecture, "image_size": size,
        "val_pixel_accuracy": best["val_pixel_accuracy"], "val_miou": best["val_miou"],
        "rows": [
            {"artifact": "PyTorch eager fp32", "path": str(run_dir / "model.safetensors"),
             "size_mb": (run_dir / "model.safetensors").stat().st_size / 1e6, "agreement": 1.0,
             "latency_p50_ms": eager["p50_ms"], "speedup": 1.0, "status": "reference"},
            {"artifact": "ONNX fp32 (onnxruntime CPU)", "path": str(onnx_path), "size_mb": onnx_path.stat().st_size / 1e6,
             "agreement": r["pixel_agreement"], "latency_p50_ms": ort["p50_ms"], "speedup": eager["p50_ms"] / ort["p50_ms"],
             "status": "verified" if result.passed else "FAILED: " + "; ".join(result.failures)},
        ],
    }
    atomic_write_bytes(output / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())

    table = Table(title=f"vitseg demo: {loaded.meta.architecture} at {size}x{size} "
                        f"(val pixel accuracy {best['val_pixel_accuracy'] * 100:.2f}%, mIoU {best['val_miou'] * 100:.2f})")
    for col in ("artifact", "size", "agreement vs PyTorch", "latency p50 (batch 1)", "speedup", "status"):
        table.add_column(col, justify="left" if col in ("artifact", "status") else "right")
    for row in summary["rows"]:
        table.add_row(row["artifact"], f"{row['size_mb']:.2f} MB", f"{row['agreement'] * 100:.4f}%",
                      f"{row['latency_p50_ms']:.2f} ms", f"{row['speedup']:.2f}x", row["status"])
    console.print(table)
    console.print(f"files: checkpoint {run_dir}, artifact {onnx_path} (+ .json manifest), verify report "
                  f"{reports / 'verify-fp32.json'}, diffs {reports / 'diff'}, masks and overlays {predictions}, "
                  f"summary {output / 'summary.json'}", soft_wrap=True)
    if not result.passed:
        raise ParityError("the exported artifact failed verification: " + "; ".join(result.failures))
