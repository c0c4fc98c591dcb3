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

    @property
    def short_status(self) -> str:
        """The status word for a table cell (verified, skipped, failed, ...); the rest is `reason`."""
        return self.status.split(":", 1)[0].split(",", 1)[0]

    @property
    def reason(self) -> str:
        """Why a row has its status (and the fix, where there is one), printed below the table; "" for none."""
        head, colon, rest = self.status.partition(":")
        if colon:
            return rest.strip()
        return head.split(",", 1)[1].strip() if "," in head else ""


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


def status_notes(rows: list[BenchmarkRow]) -> tuple[list[str], list[str]]:
    """(each row's status cell, the notes below the table): a short status, with a numbered note for its reason, so
    a table stays readable at 80 columns however long a reason is."""
    cells, notes = [], []
    for r in rows:
        if r.reason:
            notes.append(f"[{len(notes) + 1}] {r.name}: {r.reason}")
            cells.append(f"{r.short_status} [{len(notes)}]")
        else:
            cells.append(r.short_status)
    return cells, notes


def measured_where(report: BenchmarkReport) -> str:
    """The machine and date the figures come from, as every table and picture states them."""
    env = report.environment
    cpu = env.get("cpu", {})
    gpu = f", {env['gpu']['name']}" if env.get("gpu") and report.device == "cuda" else ""
    return f"{cpu.get('model', '?')}, {cpu.get('cores', '?')} cores, int8 class {cpu.get('class', '?')}{gpu}; {env.get('date', '')}"


def markdown_table(report: BenchmarkReport) -> str:
    """benchmark.md: one row per artifact, with the machine and date it was measured on; reasons as notes below."""
    cells, notes = status_notes(report.rows)
    lines = [f"# {report.architecture} at {report.image_size[0]}x{report.image_size[1]}, batch 1, {report.device}", "",
             f"Measured on {measured_where(report)}.", "",
             "| artifact | status | size | agreement | mIoU vs ref | mIoU drop vs labels | p50 latency | speedup | GFLOPs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r, cell in zip(report.rows, cells):
        lines.append(
            f"| {r.name} | {cell} | {_fmt(r.size_mb, '{:.2f} MB')} "
            f"| {_fmt(None if r.pixel_agreement is None else r.pixel_agreement * 100, '{:.3f}%')} "
            f"| {_fmt(None if r.miou_vs_reference is None else r.miou_vs_reference * 100, '{:.2f}')} "
            f"| {_fmt(None if r.miou_drop_vs_labels is None else r.miou_drop_vs_labels * 100, '{:+.2f} pt')} "
            f"| {_fmt(r.latency_p50_ms, '{:.2f} ms')} | {_fmt(r.speedup, '{:.2f}x')} | {_fmt(r.gflops, '{:.2f}')} |")
    if notes:
        lines += [""] + [f"{n}  " for n in notes]
    return "\n".join(lines) + "\n"


# disagreement is drawn on a log axis: an exact row (0) sits at this floor, one pixel in a million, and says so
EXACT_FLOOR_PERCENT = 1e-4
MARKERS = "osD^vP*Xph<>"


def _pareto_plot(report: BenchmarkReport, path: Path) -> None:
    """Latency against disagreement with PyTorch (100% - agreement, log scale: 99.99% and 99.9% are a decade
    apart, not an offset's last digits), one marker per row named in a legend outside the axes: no label can
    overlap another, however close the points."""
    fig = matplotlib_figure.Figure(figsize=(8.5, 4.8))
    ax = fig.subplots()
    colors = [f"C{i}" for i in range(10)]
    plotted = 0
    for r in report.rows:
        if r.latency_p50_ms is None or r.pixel_agreement is None:
            continue
        disagreement = (1 - r.pixel_agreement) * 100
        exact = disagreement <= EXACT_FLOOR_PERCENT
        label = f"{r.name}: {r.latency_p50_ms:.2f} ms, " + ("exact" if disagreement == 0 else f"{disagreement:.2g}% differ")
        ax.scatter(r.latency_p50_ms, max(disagreement, EXACT_FLOOR_PERCENT), s=60, marker=MARKERS[plotted % len(MARKERS)],
                   color=colors[plotted % len(colors)], label=label, alpha=0.85,
                   edgecolors="black" if exact else "none", linewidths=0.6)
        plotted += 1
    ax.set_yscale("log")
    ax.set_xlabel("p50 latency, batch 1 (ms)")
    ax.set_ylabel(f"pixels that differ from PyTorch fp32 (%)\n(log; exact rows drawn at {EXACT_FLOOR_PERCENT:g}%)")
    ax.set_title(f"{report.architecture} {report.image_size[0]}x{report.image_size[1]} on {report.device}\n"
                 f"{measured_where(report)}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if plotted:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
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
