"""The benchmark matrix: export every requested format x precision (the format and precision tables) in one
export session per checkpoint (the fp32 graph exported once, PyTorch run once per image set: export/pipeline.py),
verify all artifacts against PyTorch in ONE comparator loop on the same images and recorded reference, profile
each, and write benchmark.json, benchmark.md, pareto.png and a mask-overlay grid. A failure in one cell is
recorded in its status and does not stop the others."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from vitseg_export.checkpoint import load_checkpoint, save_checkpoint
from vitseg_export.compare.comparator import compare
from vitseg_export.compare.inputs import load_inputs
from vitseg_export.compare.judge import ReferenceOutputs
from vitseg_export.compare.report import report_from_comparison, write_report
from vitseg_export.errors import Int8NotWorthIt, VitsegError
from vitseg_export.export.pipeline import ExportSession
from vitseg_export.formats import FORMATS, Format, get_format
from vitseg_export.machine.cpu import CPU_CLASSES, SAFE_CLASS, cpu_class
from vitseg_export.machine.timing import NO_GAIN, SLOWER, compare_speed
from vitseg_export.measure.benchmark_report import BenchmarkReport, BenchmarkRow, write_report_files
from vitseg_export.measure.profiling import environment, profile
from vitseg_export.modeling.pruning import prune_model
from vitseg_export.precisions import PRECISIONS, get_precision, thresholds_for
from vitseg_export.progress import Progress, silent
from vitseg_export.runners import get_backend, runner_for
from vitseg_export.settings import export_request

OVERLAY_IMAGES = 3


@dataclass
class BenchmarkSettings:
    formats: tuple[str, ...] = ("onnx",)
    precisions: tuple[str, ...] = field(default_factory=lambda: tuple(PRECISIONS))
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
    # int8 that is mostly float, or slower than fp32 on this CPU, is a "skipped" row with the reason unless allowed
    allow_float_fallback: bool = False
    revision: str | None = None  # of a checkpoint's Hub id


@dataclass
class _Cell:
    row: BenchmarkRow
    path: Path | None = None


@dataclass
class _Variant:
    suffix: str  # "" or "-pruned0.5"
    checkpoint: str
    loaded: object
    session: ExportSession = field(init=False)

    def __post_init__(self) -> None:
        self.session = ExportSession(self.loaded)  # every cell of the variant shares its graph and reference


def _validate(settings: BenchmarkSettings) -> list[Format]:
    formats = [get_format(f) for f in settings.formats]
    directories = [f.name for f in formats if f.directory]
    if directories:
        raise VitsegError(f"--formats {directories[0]} writes a repository, not an artifact the benchmark runs",
                          "benchmark the artifact it serves (onnx, openvino, trt); time the server with `vitseg profile --server`")
    for p in settings.precisions:
        get_precision(p)
    return formats


def _variants(checkpoint: str, loaded, output: Path, settings: BenchmarkSettings) -> list[_Variant]:
    """The checkpoint, plus a structurally pruned copy per ratio (method "all", saved under output/)."""
    variants = [_Variant("", checkpoint, loaded)]
    for ratio in settings.prune_ratios:
        pruned, _ = prune_model(loaded.model, loaded.meta.family, ratio, "all")
        meta = copy.deepcopy(loaded.meta)
        meta.config = pruned.config
        meta.training = {**meta.training, "pruned_from": checkpoint, "prune": {"ratio": ratio, "method": "all"}}
        run_dir = output / f"pruned-{ratio:g}"
        save_checkpoint(pruned, meta, run_dir)
        variants.append(_Variant(f"-pruned{ratio:g}", str(run_dir), load_checkpoint(run_dir)))
    return variants


def _artifact_path(artifacts: Path, variant: _Variant, fmt: Format, precision: str) -> Path:
    stem = f"{variant.loaded.meta.architecture}-{precision}{variant.suffix}"
    return artifacts / (stem + ("" if fmt.name == "onnx" else f"-{fmt.name}") + fmt.suffixes[0])


def benchmark_cpu_class() -> str:
    """The benchmark times its rows on this machine, so its int8 is made for this machine's CPU class (judged
    here: refused as a row when it cannot pay); the safe class on a CPU vitseg has no class for."""
    here = cpu_class()
    return here if here in CPU_CLASSES else SAFE_CLASS


def _export_cell(variant: _Variant, fmt: Format, precision: str, size, settings: BenchmarkSettings, artifacts: Path,
                 log: Progress) -> _Cell:
    row = BenchmarkRow(f"{fmt.name}-{precision}{variant.suffix}", fmt.name, precision)
    cell = _Cell(row)
    availability = fmt.probe()
    if not availability.ok:
        row.status = f"failed: {availability.detail}"
        return cell
    log(f"{row.name}: export")
    request = export_request(fmt, {"precision": precision, "image_size": size, "outputs": "both", "no_fold": not settings.fold,
                                   "data": settings.verify_data, "num_images": settings.verify_images,
                                   "calib": settings.calib,
                                   "calib_images": settings.calib_images, "cpu_class": benchmark_cpu_class(),
                                   "allow_float_fallback": settings.allow_float_fallback})
    try:
        path = _artifact_path(artifacts, variant, fmt, precision)
        result = fmt.export(variant.session, path, request, lambda m, *counts, **info: log(f"  {m}", *counts))
    except Int8NotWorthIt as e:  # int8 that would be float in all but name, or slower than fp32 here: no row to time
        row.status = f"skipped: {e.message} ({e.hint})"
        return cell
    except VitsegError as e:
        row.status = f"failed: {e.message}"
        return cell
    cell.path = path
    manifest = result.manifest
    row.path, row.size_mb, row.rewrites = str(path), manifest.size_bytes / 1e6, manifest.rewrites  # every file (an IR: .xml + .bin)
    details = manifest.precision_details or {}
    if "int8_mac_share" in details:  # a quantized artifact: how much of it really is int8
        row.int8_mac_share = details["int8_mac_share"]
        row.fallback_layers = [f["node"] for f in details.get("fallback_layers", [])] + details.get("float_layers", [])
    return cell


def _verify_cells(variant: _Variant, cells: list[_Cell], settings: BenchmarkSettings, size, output: Path,
                  overlay: dict | None, log: Progress) -> float | None:
    """One comparator loop: every exported cell against the variant's PyTorch reference, recorded once for the
    session (the images the exports were judged on). Returns the reference's mIoU vs labels (where the data has
    labels)."""
    live = [c for c in cells if c.path is not None]
    inputs = load_inputs(settings.verify_data, "val", settings.verify_images, size)
    log(f"verifying {len(live)} artifacts{variant.suffix} on {len(inputs)} held-out images in one pass")
    runners = {c.row.name: runner_for(c.path, device=settings.device) for c in live}
    reference = variant.session.reference() if settings.device == "cpu" else \
        ReferenceOutputs(runner_for(variant.loaded, device=settings.device, backend="torch"), f"PyTorch fp32 on {settings.device}")
    with _all_active(runners) as active:
        for name in set(runners) - set(active):
            next(c for c in live if c.row.name == name).row.status = f"failed: {runners[name].activation_error}"
        result = compare(reference.outputs(inputs), active, inputs, {c.row.name: thresholds_for(c.row.precision) for c in live},
                         len(variant.loaded.meta.class_names), on_image=_collect(overlay) if overlay is not None else None)
    if reference is not variant.session.reference():
        reference.close()
    reference_miou = None
    for cell in live:
        comparison = result.comparisons.get(cell.row.name)
        if comparison is None:
            continue
        report = report_from_comparison(comparison, cell.path, variant.checkpoint, cell.row.precision, runners[cell.row.name],
                                        settings.device, settings.verify_data, result.reference_seconds_per_image)
        write_report(report, output / "reports" / f"verify-{cell.row.name}.json")
        _fill_parity(cell.row, report)
        if report.summary is not None and report.summary.labels is not None:
            reference_miou = report.summary.labels.reference_miou_vs_labels
    return reference_miou


class _all_active:
    """Activate every runner that can be activated; the others keep their error in `activation_error`."""

    def __init__(self, runners: dict):
        self.runners = runners
        self.active: dict = {}

    def __enter__(self) -> dict:
        for name, runner in self.runners.items():
            try:
                self.active[name] = runner.activate()
            except VitsegError as e:
                runner.activation_error = e.message
        return self.active

    def __exit__(self, *exc) -> None:
        for runner in self.active.values():
            runner.deactivate()


def _collect(overlay: dict):
    def on_image(image, ref_logits, masks) -> None:
        if len(overlay.setdefault("pytorch-eager-fp32", [])) >= OVERLAY_IMAGES:
            return
        overlay.setdefault("input", []).append(image.pixels)
        overlay["pytorch-eager-fp32"].append(ref_logits.argmax(0))
        for name, mask in masks.items():
            overlay.setdefault(name, []).append(mask)

    return on_image


def _fill_parity(row: BenchmarkRow, report) -> None:
    summary = report.summary
    row.status = "verified" if report.passed else "failed: " + "; ".join(report.failures)
    if summary is None:
        return
    row.pixel_agreement, row.miou_vs_reference = summary.pixel_agreement, summary.miou_vs_reference
    row.max_abs_logit_diff = summary.max_abs_logit_diff
    if summary.labels is not None:
        row.miou_drop_vs_labels, row.miou_vs_labels = summary.labels.miou_drop_vs_labels, summary.labels.artifact_miou_vs_labels


def _profile_cells(cells: list[_Cell], eager_ms: float, settings: BenchmarkSettings, log: Progress) -> None:
    for cell in cells:
        if cell.path is None or (cell.row.failed and cell.row.pixel_agreement is None):
            continue
        log(f"{cell.row.name}: profile")
        prof = profile(cell.path, [1], settings.device, settings.threads, settings.warmup, settings.iters)
        b1 = prof.batch(1)
        cell.row.latency_p50_ms, cell.row.latency_p90_ms = b1["p50_ms"], b1["p90_ms"]
        cell.row.speedup, cell.row.gflops, cell.row.params = eager_ms / b1["p50_ms"], prof.gflops, prof.params


def _compare_with_baseline(cells: list[_Cell], size: tuple[int, int], settings: BenchmarkSettings,
                           log: Progress) -> None:
    """Honest rows: each verified reduced precision timed against the same format's fp32 artifact by the timing
    rule (interleaved pairs at batch 1, a confidence interval, a margin: vitseg_export/timing.py), never by two
    separately measured medians. Measurably slower says "slower than fp32 here"; inside the margin "no measurable
    gain over fp32 here"."""
    baseline = {c.row.format: c for c in cells if get_precision(c.row.precision).baseline and c.path is not None
                and c.row.status == "verified"}
    feed = {"pixels": np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)}
    for cell in cells:
        base = baseline.get(cell.row.format)
        if base is None or cell is base or cell.path is None or not cell.row.status.startswith("verified"):
            continue
        log(f"{cell.row.name}: timing against {base.row.name} (interleaved)")
        with runner_for(base.path, device=settings.device).taking_turns() as fp32, \
                runner_for(cell.path, device=settings.device).taking_turns() as other:
            comparison = compare_speed(partial(fp32.infer, feed), partial(other.infer, feed),
                                       names=(base.row.precision, cell.row.precision))
        cell.row.speed_vs_baseline = comparison.to_json()
        if comparison.outcome == SLOWER:
            cell.row.status = f"verified, slower than {base.row.precision} here"
        elif comparison.outcome == NO_GAIN:
            cell.row.status = f"verified, no measurable gain over {base.row.precision} here"


def available_formats() -> tuple[str, ...]:
    """The formats this machine can make and run (their probes and their backends' probes pass): the benchmark's
    and the demo's default (TensorRT-RTX engines build anywhere, and run on an RTX GPU only)."""
    return tuple(name for name, fmt in FORMATS.items()
                 if not fmt.directory and fmt.probe().ok and get_backend(fmt.backend).probe().ok)


def _reference_row(checkpoint: str, loaded, size, settings: BenchmarkSettings, log) -> BenchmarkRow:
    log(f"profiling PyTorch eager fp32 ({loaded.meta.architecture}, {size[0]}x{size[1]})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = profile(checkpoint, [1], settings.device, settings.threads, settings.warmup, settings.iters, size)
    b1 = eager.batch(1)
    return BenchmarkRow("pytorch-eager-fp32", "pytorch", "fp32", "reference", str(loaded.source), eager.file_size_mb, 1.0,
                        1.0, 0.0, latency_p50_ms=b1["p50_ms"], latency_p90_ms=b1["p90_ms"], speedup=1.0,
                        gflops=eager.gflops, params=eager.params)


def run_benchmark(checkpoint: str, output: Path, settings: BenchmarkSettings,
                  log: Progress = silent) -> BenchmarkReport:
    """Export, verify and profile every format x precision of `checkpoint` (and its pruned copies); write
    the report files under `output`. Raises VitsegError for unknown formats/precisions or checkpoints;
    a failing cell is recorded in its row."""
    formats = _validate(settings)
    loaded = load_checkpoint(checkpoint, revision=settings.revision)
    size = tuple(settings.image_size or loaded.meta.image_size)
    rows = [_reference_row(checkpoint, loaded, size, settings, log)]
    overlay: dict = {}
    base_label_miou = None
    for variant in _variants(checkpoint, loaded, output, settings):
        cells = [_export_cell(variant, fmt, p, size, settings, output / "artifacts", log)
                 for fmt in formats for p in settings.precisions if p in fmt.precisions]
        label_miou = _verify_cells(variant, cells, settings, size, output, overlay if not variant.suffix else None, log)
        base_label_miou = label_miou if not variant.suffix else base_label_miou
        for cell in cells:  # pruning's cost included: against the unpruned reference's label mIoU
            if variant.suffix and base_label_miou is not None and cell.row.miou_vs_labels is not None:
                cell.row.miou_drop_vs_labels = base_label_miou - cell.row.miou_vs_labels
        variant.session.close()
        _profile_cells(cells, rows[0].latency_p50_ms, settings, log)
        _compare_with_baseline(cells, size, settings, log)
        rows += [c.row for c in cells]
    report = BenchmarkReport(checkpoint, loaded.meta.architecture, list(size), settings.device, 1, rows,
                             environment(settings.threads))
    write_report_files(report, output, overlay)
    return report
