"""The benchmark's report (one row per artifact, typed, with its JSON form) and the files drawn from it:
benchmark.json, benchmark.md (with the machine it was measured on), pareto.png (latency vs agreement) and
overlays.png (input, reference, each artifact's mask). Running the matrix is measure/benchmark.py."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vitseg_export.files import atomic_write_bytes, write_json
from vitseg_export.images import colorize
from vitseg_export.tables import lazy_module

# matplotlib's Figure, no pyplot: no global backend or figure state is touched; imported for pareto.png only
matplotlib_figure = lazy_module("matplotlib.figure")


@dataclass
class BenchmarkRow:
    """One cell of the matrix (or the PyTorch reference). JSON form: the field names."""

    name: str
    format: str
    precision: str
    status: str = "pending"
    path: str | None = None
    size_mb: float | None = None
    pixel_agreement: float | None = None
    miou_vs_reference: float | None = None
    miou_drop_vs_labels: float | None = None
    miou_vs_labels: float | None = None
    max_abs_logit_diff: float | None = None
    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    speedup: float | None = None
    gflops: float | None = None
    params: int | None = None
    rewrites: list[str] | None = None
    int8_mac_share: float | None = None
    fallback_layers: list[str] | None = None
    # against the same format's fp32 artifact, by the timing rule (vitseg_export/timing.py): SpeedComparison JSON
    speed_vs_baseline: dict | None = None

    def to_json(self) -> dict:
        """The row as in benchmark.json."""
        return asdict(self)

    @property
    def failed(self) -> bool:
        """The cell has a failure status."""
        return self.status.startswith("failed")


@dataclass
class BenchmarkReport:
    checkpoint: str
    architecture: str
    image_size: list[int]
    device: str
    batch: int
    rows: list[BenchmarkRow]
    environment: dict

    def to_json(self) -> dict:
        """benchmark.json."""
        return {**{k: v for k, v in asdict(self).items() if k != "rows"}, "rows": [r.to_json() for r in self.rows]}

    def row(self, name: str) -> BenchmarkRow:
        """The row called `name`."""
        return next(r for r in self.rows if r.name == name)


def write_report_files(report: BenchmarkReport, output: Path, overlay: dict) -> None:
    """benchmark.json, benchmark.md, pareto.png and (when masks were collected) overlays.png under `output`."""
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "benchmark.json", report.to_json())
    atomic_write_bytes(output / "benchmark.md", markdown_table(report).encode())
    _pareto_plot(report, output / "pareto.png")
    if overlay:
        _overlay_grid(overlay, output / "overlays.png")


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def markdown_table(report: BenchmarkReport) -> str:
    """benchmark.md: one row per artifact, with the machine it was measured on."""
    env = report.environment
    lines = [f"# {report.architecture} at {report.image_size[0]}x{report.image_size[1]}, batch 1, "
             f"{report.device} ({env['cpu']['model']}, {env['cpu']['cores']} cores)", "",
             "| artifact | status | size | agreement | mIoU vs ref | mIoU drop vs labels | p50 latency | speedup | GFLOPs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report.rows:
        lines.append(
            f"| {r.name} | {r.status} | {_fmt(r.size_mb, '{:.2f} MB')} "
            f"| {_fmt(None if r.pixel_agreement is None else r.pixel_agreement * 100, '{:.3f}%')} "
            f"| {_fmt(None if r.miou_vs_reference is None else r.miou_vs_reference * 100, '{:.2f}')} "
            f"| {_fmt(None if r.miou_drop_vs_labels is None else r.miou_drop_vs_labels * 100, '{:+.2f} pt')} "
            f"| {_fmt(r.latency_p50_ms, '{:.2f} ms')} | {_fmt(r.speedup, '{:.2f}x')} | {_fmt(r.gflops, '{:.2f}')} |")
    return "\n".join(lines) + "\n"


def _pareto_plot(report: BenchmarkReport, path: Path) -> None:

    fig = matplotlib_figure.Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for r in report.rows:
        if r.latency_p50_ms is None or r.pixel_agreement is None:
            continue
        ax.scatter(r.latency_p50_ms, r.pixel_agreement * 100, s=40)
        ax.annotate(r.name, (r.latency_p50_ms, r.pixel_agreement * 100), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("p50 latency, batch 1 (ms)")
    ax.set_ylabel("pixel agreement with PyTorch fp32 (%)")
    ax.set_title(f"{report.architecture} {report.image_size[0]}x{report.image_size[1]} on {report.device}")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def _overlay_grid(overlay: dict, path: Path) -> None:
    """One row per image: input, reference mask, then each artifact's mask (collected in the verify loop)."""
    images = overlay.pop("input")
    titles = ["input"] + [name for name, masks in overlay.items() if len(masks) == len(images)]
    columns = [np.stack([(p.transpose(1, 2, 0) * 255).round().astype(np.uint8) for p in images])]
    columns += [colorize(np.stack(masks)) for masks in overlay.values() if len(masks) == len(images)]
    grid = np.concatenate([np.concatenate(list(col), axis=0) for col in columns], axis=1)
    width = max(grid.shape[1] // len(titles), 1)
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + 28), "white")
    canvas.paste(Image.fromarray(grid), (0, 28))
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate(titles):  # column titles, two lines so long names fit narrow columns
        half = len(title) // 2 if len(title) * 6 > width else len(title)
        draw.text((i * width + 2, 2), title[:half], fill="black")
        draw.text((i * width + 2, 14), title[half:], fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
