"""The benchmark matrix: export every requested format x precision, verify each against PyTorch,
profile each, and write benchmark.json, benchmark.md, pareto.png and a mask-overlay grid.
A failure in one cell is recorded in its status and does not stop the others."""

from __future__ import annotations

import copy
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from vitseg_export.artifact import colorize, pixels_from_image
from vitseg_export.errors import VitsegError
from vitseg_export.files import atomic_write_bytes

FORMATS = ("onnx", "trt")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class BenchmarkSettings:
    formats: tuple[str, ...] = ("onnx",)
    precisions: tuple[str, ...] = PRECISIONS
    image_size: tuple[int, int] | None = None
    device: str = "cpu"
    verify_data: str = "synthetic"
    verify_images: int = 32
    warmup: int = 5
    iters: int = 20
    threads: int | None = None
    fold: bool = True
    calib: str = "synthetic"
    calib_images: int = 32
    prune_ratios: tuple[float, ...] = ()  # also benchmark structurally pruned copies (method "all", no fine-tuning)


def run_benchmark(checkpoint: str, output: Path, settings: BenchmarkSettings,
                  log: Callable[[str], None] = lambda m: None) -> dict:
    from vitseg_export.checkpoint import load_checkpoint
    from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx
    from vitseg_export.export.precision import Int8Settings
    from vitseg_export.parity import PRESETS
    from vitseg_export.profiling import environment, profile
    from vitseg_export.runners import runner_for
    from vitseg_export.verify import verify_artifact, write_report

    for f in settings.formats:
        if f not in FORMATS:
            raise VitsegError(f"format '{f}' is unknown", f"use {', '.join(FORMATS)}")
    for p in settings.precisions:
        if p not in PRECISIONS:
            raise VitsegError(f"precision '{p}' is unknown", f"use {', '.join(PRECISIONS)}")
    loaded = load_checkpoint(checkpoint)
    size = tuple(settings.image_size or loaded.meta.image_size)
    artifacts = output / "artifacts"
    log(f"profiling PyTorch eager fp32 ({loaded.meta.architecture}, {size[0]}x{size[1]})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = profile(checkpoint, [1], settings.device, settings.threads, settings.warmup, settings.iters, size)
    eager_ms = eager["batches"][0]["p50_ms"]
    rows = [{"name": "pytorch-eager-fp32", "format": "pytorch", "precision": "fp32", "status": "reference",
             "path": str(loaded.source), "size_mb": eager["file_size_mb"], "pixel_agreement": 1.0,
             "miou_vs_reference": 1.0, "miou_drop_vs_labels": 0.0, "latency_p50_ms": eager_ms,
             "latency_p90_ms": eager["batches"][0]["p90_ms"], "speedup": 1.0, "gflops": eager["gflops"],
             "params": eager["params"]}]
    variants = [("", checkpoint, loaded)]
    for ratio in settings.prune_ratios:
        from vitseg_export.checkpoint import save_checkpoint
        from vitseg_export.pruning import prune_model

        pruned, _ = prune_model(loaded.model, loaded.meta.family, ratio, "all")
        meta = copy.deepcopy(loaded.meta)
        meta.config = pruned.config
        meta.training = {**meta.training, "pruned_from": checkpoint, "prune": {"ratio": ratio, "method": "all"}}
        run_dir = output / f"pruned-{ratio:g}"
        save_checkpoint(pruned, meta, run_dir)
        variants.append((f"-pruned{ratio:g}", str(run_dir), load_checkpoint(run_dir)))
    base_label_miou = None
    for suffix, variant_ckpt, variant in variants:
        for fmt in settings.formats:
            for precision in settings.precisions:
                name = f"{fmt}-{precision}{suffix}"
                log(f"{name}: export, verify on {settings.verify_images} held-out images, profile")
                row: dict = {"name": name, "format": fmt, "precision": precision}
                try:
                    onnx_path = artifacts / f"{variant.meta.architecture}-{precision}{suffix}.onnx"
                    int8 = Int8Settings(calib=settings.calib, calib_images=settings.calib_images,
                                        target="trt" if fmt == "trt" else "cpu",
                                        min_agreement=PRESETS["int8"].min_agreement)
                    if fmt == "trt":
                        from vitseg_export.export.tensorrt_engine import require_tensorrt

                        require_tensorrt()
                        onnx_path = artifacts / f"{variant.meta.architecture}-{precision}{suffix}-trt.onnx"
                    result = export_onnx(variant, onnx_path, OnnxExportSettings(precision=precision, image_size=size,
                                         outputs="both", fold=settings.fold), progress=lambda m: log(f"  {m}"), int8=int8)
                    path = onnx_path
                    if fmt == "trt":
                        from vitseg_export.export.tensorrt_engine import EngineSettings, engine_from_onnx

                        path = onnx_path.with_suffix(".engine")
                        engine_from_onnx(onnx_path, path, EngineSettings(), progress=lambda m: log(f"  {m}"))
                    # parity against the checkpoint this artifact came from; the label mIoU shows what pruning cost
                    verdict = verify_artifact(path, variant_ckpt, settings.verify_data, settings.verify_images, settings.device)
                    write_report(verdict.report, output / "reports" / f"verify-{name}.json")
                    prof = profile(path, [1], settings.device, settings.threads, settings.warmup, settings.iters)
                    r = verdict.report
                    b1 = prof["batches"][0]
                    if not suffix and base_label_miou is None:
                        base_label_miou = r.get("reference_miou_vs_labels")
                    label_drop = r.get("miou_drop_vs_labels")
                    if suffix and base_label_miou is not None and r.get("artifact_miou_vs_labels") is not None:
                        label_drop = base_label_miou - r["artifact_miou_vs_labels"]  # pruning's cost included
                    row.update(
                        status="verified" if verdict.passed else "failed: " + "; ".join(verdict.failures),
                        path=str(path), size_mb=path.stat().st_size / 1e6, pixel_agreement=r["pixel_agreement"],
                        miou_vs_reference=r["miou_vs_reference"], miou_drop_vs_labels=label_drop,
                        miou_vs_labels=r.get("artifact_miou_vs_labels"),
                        max_abs_logit_diff=r["max_abs_logit_diff"], latency_p50_ms=b1["p50_ms"], latency_p90_ms=b1["p90_ms"],
                        speedup=eager_ms / b1["p50_ms"], gflops=prof["gflops"], params=prof["params"],
                        rewrites=result.manifest.get("rewrites"),
                    )
                    if precision == "int8":
                        row["int8_mac_share"] = result.manifest["int8"]["int8_mac_share"]
                        row["fallback_layers"] = [f["node"] for f in result.manifest["int8"]["fallback_layers"]]
                except VitsegError as e:
                    row.update(status=f"failed: {e.message}")
                rows.append(row)
    report = {"checkpoint": checkpoint, "architecture": loaded.meta.architecture, "image_size": list(size),
              "device": settings.device, "batch": 1, "rows": rows, "environment": environment(settings.threads)}
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output / "benchmark.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(output / "benchmark.md", markdown_table(report).encode())
    _pareto_plot(report, output / "pareto.png")
    _overlay_grid(loaded, rows, size, settings, output / "overlays.png", runner_for)
    return report


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def markdown_table(report: dict) -> str:
    env = report["environment"]
    lines = [f"# {report['architecture']} at {report['image_size'][0]}x{report['image_size'][1]}, batch 1, "
             f"{report['device']} ({env['cpu']['model']}, {env['cpu']['cores']} cores)", "",
             "| artifact | status | size | agreement | mIoU vs ref | mIoU drop vs labels | p50 latency | speedup | GFLOPs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {r['status']} | {_fmt(r.get('size_mb'), '{:.2f} MB')} "
            f"| {_fmt(r.get('pixel_agreement') and r['pixel_agreement'] * 100, '{:.3f}%')} "
            f"| {_fmt(r.get('miou_vs_reference') and r['miou_vs_reference'] * 100, '{:.2f}')} "
            f"| {_fmt(None if r.get('miou_drop_vs_labels') is None else r['miou_drop_vs_labels'] * 100, '{:+.2f} pt')} "
            f"| {_fmt(r.get('latency_p50_ms'), '{:.2f} ms')} | {_fmt(r.get('speedup'), '{:.2f}x')} "
            f"| {_fmt(r.get('gflops'), '{:.2f}')} |")
    return "\n".join(lines) + "\n"


def _pareto_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["rows"]:
        if r.get("latency_p50_ms") is None or r.get("pixel_agreement") is None:
            continue
        ax.scatter(r["latency_p50_ms"], r["pixel_agreement"] * 100, s=40)
        ax.annotate(r["name"], (r["latency_p50_ms"], r["pixel_agreement"] * 100), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set_xlabel("p50 latency, batch 1 (ms)")
    ax.set_ylabel("pixel agreement with PyTorch fp32 (%)")
    ax.set_title(f"{report['architecture']} {report['image_size'][0]}x{report['image_size'][1]} on {report['device']}")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _overlay_grid(loaded, rows: list[dict], size, settings: BenchmarkSettings, path: Path, runner_for) -> None:
    """One row per image: input, reference mask, then each artifact's mask."""
    from vitseg_export.data.sources import open_source

    source = open_source(settings.verify_data, "val")
    images = [source[i].image for i in range(min(3, len(source)))]
    pixels = np.stack([pixels_from_image(im, size) for im in images])
    columns = [(pixels.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in rows:
            model = loaded if r["format"] == "pytorch" else r.get("path")
            if model is None or r["status"].startswith("failed: export") or not (r["format"] == "pytorch" or Path(model).exists()):
                continue
            try:
                with runner_for(model, device=settings.device, backend="torch" if r["format"] == "pytorch" else None,
                                outputs=("mask",)) as runner:
                    masks = np.concatenate([runner.infer({"pixels": pixels[i:i + 1]})["mask"] if "mask" in runner.output_names
                                            else runner.infer({"pixels": pixels[i:i + 1]})["logits"].argmax(1)
                                            for i in range(len(pixels))])
                columns.append(colorize(masks))
            except VitsegError:
                continue
    grid = np.concatenate([np.concatenate(list(col), axis=0) for col in columns], axis=1)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
