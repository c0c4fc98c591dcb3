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
    precisions: Annotated[list[str], typer.Option("--precision", help="Precisions to export (repeat the option).")] = ["fp32", "fp16", "int8"],
) -> None:
    """Train -> export (fp32, fp16, int8) -> verify -> latency -> predict, on CPU in a few minutes."""
    import warnings


    from vitseg_export.artifact import pixels_from_image
    from vitseg_export.checkpoint import load_checkpoint
    from vitseg_export.cli.train import train as train_command
    from vitseg_export.data.sources import open_source
    from vitseg_export.errors import ParityError, VitsegError
    from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx
    from vitseg_export.export.precision import Int8Settings
    from vitseg_export.files import atomic_write_bytes
    from vitseg_export.modeling.registry import get_architecture
    from vitseg_export.predict import predict_images
    from vitseg_export.profiling import measure_latency
    from vitseg_export.runners import runner_for
    from vitseg_export.verify import verify_artifact, write_report

    arch = get_architecture(model)
    size = arch.config.image_size if arch.family == "vit" else image_size
    run_dir, artifacts, reports = output / "run", output / "artifacts", output / "reports"

    err_console.rule(f"1/{len(precisions) + 2} train {model} on synthetic[:{train_images}] ({epochs} epochs, {size}px)")
    train_command(output=run_dir, model=model, data=f"synthetic[:{train_images}]", epochs=epochs, image_size=size,
                  batch_size=16, init=None, lr=None, workers=1, seed=0)

    source = open_source("synthetic[:4]", "val")
    pixels = pixels_from_image(source[0].image, (size, size))[None]
    loaded = load_checkpoint(run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with runner_for(loaded, backend="torch") as torch_runner:
            eager = measure_latency(torch_runner, pixels)
    rows = [{"artifact": "PyTorch eager fp32", "path": str(run_dir / "model.safetensors"),
             "size_mb": (run_dir / "model.safetensors").stat().st_size / 1e6, "agreement": 1.0,
             "latency_p50_ms": eager["p50_ms"], "speedup": 1.0, "status": "reference", "passed": True}]
    int8 = Int8Settings(calib="synthetic", calib_images=32, heldout="synthetic", heldout_images=16)
    fp32_path = None
    for step, precision in enumerate(precisions, start=2):
        err_console.rule(f"{step}/{len(precisions) + 2} {precision}: export to ONNX, verify on {verify_images} held-out images")
        path = artifacts / f"{loaded.meta.architecture}-{precision}.onnx"
        row = {"artifact": f"ONNX {precision} (onnxruntime CPU)", "path": str(path)}
        try:
            export_onnx(loaded, path, OnnxExportSettings(precision=precision, outputs="both"),
                        progress=lambda m: err_console.print(f"  {m}"), int8=int8)
            manifest = json.loads((path.parent / (path.name + ".json")).read_text())
            result = verify_artifact(path, str(run_dir), "synthetic", verify_images, "cpu",
                                     save_diff=reports / f"diff-{precision}")
            write_report(result.report, reports / f"verify-{precision}.json")
            with runner_for(path) as ort_runner:
                latency = measure_latency(ort_runner, pixels)
            r = result.report
            note = ""
            if precision == "int8":
                note = f" ({manifest['int8']['int8_mac_share'] * 100:.0f}% of MACs int8)"
            row.update(size_mb=path.stat().st_size / 1e6, agreement=r["pixel_agreement"],
                       miou_drop=r.get("miou_drop_vs_labels"), latency_p50_ms=latency["p50_ms"],
                       speedup=eager["p50_ms"] / latency["p50_ms"], passed=result.passed,
                       status=("verified" if result.passed else "FAILED: " + "; ".join(result.failures)) + note)
            if precision == "fp32":
                fp32_path = path
        except VitsegError as e:  # one failed cell does not stop the others
            row.update(size_mb=None, agreement=None, latency_p50_ms=None, speedup=None, passed=False,
                       status=f"failed: {e.message}")
        rows.append(row)

    err_console.rule(f"{len(precisions) + 2}/{len(precisions) + 2} predict")
    samples_dir, predictions = output / "samples", output / "predictions"
    paths = []
    for sample in source:
        buf = io.BytesIO()
        sample.image.save(buf, format="PNG")
        path = samples_dir / f"{sample.name}.png"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    if fp32_path is not None:
        predict_images(str(fp32_path), paths, predictions, overlay=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = max(metrics["epochs"], key=lambda e: e["val_miou"])
    summary = {"model": loaded.meta.architecture, "image_size": size, "val_pixel_accuracy": best["val_pixel_accuracy"],
               "val_miou": best["val_miou"], "rows": rows}
    atomic_write_bytes(output / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())

    table = Table(title=f"vitseg demo: {loaded.meta.architecture} at {size}x{size} "
                        f"(val pixel accuracy {best['val_pixel_accuracy'] * 100:.2f}%, mIoU {best['val_miou'] * 100:.2f})")
    for col in ("artifact", "size", "agreement vs PyTorch", "mIoU drop vs labels", "latency p50 (batch 1)", "speedup", "status"):
        table.add_column(col, justify="left" if col in ("artifact", "status") else "right")

    def fmt(value, pattern):
        return "-" if value is None else pattern.format(value)

    def scaled(value):
        return None if value is None else value * 100

    for row in rows:
        table.add_row(row["artifact"], fmt(row["size_mb"], "{:.2f} MB"), fmt(scaled(row["agreement"]), "{:.4f}%"),
                      fmt(scaled(row.get("miou_drop")), "{:+.2f} pt"), fmt(row["latency_p50_ms"], "{:.2f} ms"),
                      fmt(row["speedup"], "{:.2f}x"), row["status"])
    console.print(table)
    console.print(f"files: checkpoint {run_dir}, artifacts {artifacts} (each with a .json manifest), verify reports and "
                  f"diff images {reports}, masks and overlays {predictions}, summary {output / 'summary.json'}", soft_wrap=True)
    failed = [r["artifact"] for r in rows if not r["passed"]]
    if failed:
        raise ParityError(f"{len(failed)} artifact(s) failed: {', '.join(failed)}", "see the status column and the reports")
