"""`vitseg profile` and `vitseg benchmark`: latency figures and the format x precision matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from vitseg_export.cli.common import (
    POSITIVE,
    RATIO,
    check_artifact_manifest,
    comma_items,
    console,
    emit,
    err_console,
    log,
    parse_ints,
    parse_size,
    spare_inputs,
)
from vitseg_export.cli.options import CHECKPOINT_HELP, BackendChoice, arg, opt
from vitseg_export.errors import VitsegError
from vitseg_export.files import check_output_dir, check_output_file
from vitseg_export.formats import FORMATS, get_format
from vitseg_export.measure.benchmark_report import measured_where, status_notes
from vitseg_export.measure.profiling import environment
from vitseg_export.measure.profiling import profile as run_profile
from vitseg_export.precisions import PRECISIONS, get_precision
from vitseg_export.tables import lazy_module

matrix = lazy_module("vitseg_export.measure.benchmark")
client = lazy_module("vitseg_export.serving.client")


def profile(
    models: Annotated[Optional[list[str]], arg("Artifacts (.onnx, .xml, .engine, .rtx.engine) or checkpoints (PyTorch "
                                               "eager); or --server.", "an artifact or checkpoint")] = None,
    batch_sizes: Annotated[str, opt("--batch-sizes", " to time")] = "1",
    image_size: Annotated[Optional[str], opt("--image-size", " for dynamic-size models")] = None,
    device: Annotated[str, opt("--device")] = "cpu",
    backend: Annotated[Optional[BackendChoice], opt("--backend", " that runs the artifacts")] = None,
    threads: Annotated[Optional[int], opt("--threads", min=1)] = None,
    warmup: Annotated[int, opt("--warmup", min=0, max=100000)] = 5,
    iters: Annotated[int, opt("--iters", " per batch size", min=1, max=100000)] = 20,
    autocast: Annotated[bool, opt("--autocast")] = False,
    revision: Annotated[Optional[str], opt("--revision")] = None,
    server: Annotated[Optional[str], opt("--server", "Time")] = None,
    served_model: Annotated[Optional[str], opt("--served-model")] = None,
    concurrency: Annotated[str, opt("--concurrency", ", each timed in turn")] = "1,4,16",
    duration: Annotated[float, opt("--duration", "each --server concurrency level", callback=POSITIVE)] = 10.0,
    json_output: Annotated[bool, opt("--json")] = False,
    report: Annotated[Optional[Path], opt("--report")] = None,
) -> None:
    """p50/p90/p99/mean latency, throughput, peak memory, size, parameters and GFLOPs per model and batch; with
    --server, client-side latency, throughput and errors of a served model per concurrency level."""
    if (not models) == (server is None):
        raise typer.BadParameter("pass MODELS or --server URL --served-model NAME, one of them")
    if report:
        check_output_file(report, "--report")
        spare_inputs({"--report": report}, models=models or [])
    if server is not None:
        if served_model is None:
            raise typer.BadParameter("--server needs --served-model")
        return _profile_server(server, served_model, parse_ints(concurrency, "--concurrency", maximum=256), duration,
                               json_output, report)
    batches = parse_ints(batch_sizes, "--batch-sizes")
    size = parse_size(image_size) if image_size is not None else None
    for model in models:
        check_artifact_manifest(model)
    results = []
    with err_console.status("profiling") as status:
        for model in models:
            status.update(Text(f"profiling {model}"))
            results.append(run_profile(model, batches, device, threads, warmup, iters, size,
                                       backend.value if backend is not None else None, autocast,
                                       revision=revision).to_json())
    emit(results, json_output, report)
    if not json_output:
        print_profile_tables(results, device, warmup, iters)


def _profile_server(server: str, model: str, levels: list[int], duration: float, json_output: bool,
                    report_file: Optional[Path]) -> None:
    """`vitseg profile --server`: one load test per concurrency level, a table, the JSON."""
    report = client.LoadReport(f"{server.rstrip('/')}/{model}", [], environment=environment(None))
    with err_console.status("profiling") as status:
        for level in levels:
            status.update(Text(f"{level} concurrent clients for {duration:g} s"))
            report.levels.append(client.load_test(server, model, level, duration))
    emit(report.to_json(), json_output, report_file)
    if json_output:
        return
    table = Table(title=escape(f"{report.endpoint}: client-side, single-image requests, {duration:g} s per level"),
                  title_justify="left")
    for col in ("clients", "requests", "errors", "img/s", "p50 ms", "p90 ms", "p99 ms"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in report.levels:
        table.add_row(str(row.concurrency), str(row.requests), str(row.errors), f"{row.throughput_per_s:.1f}",
                      *("-" if v is None else f"{v:.2f}" for v in (row.p50_ms, row.p90_ms, row.p99_ms)))
    console.print(table)
    errors = [row for row in report.levels if row.errors]
    if errors:
        console.print(f"first error at {errors[0].concurrency} clients: {errors[0].first_error}", markup=False, highlight=False)


def print_profile_tables(results: list[dict], device: str, warmup: int, iters: int) -> None:
    """One small table per model (its figures in the title), so a piped log at 80 columns cuts nothing."""
    def fmt(v, pattern):
        return "-" if v is None else pattern.format(v)

    for r in results:
        title = (f"{Path(r['model']).name}: {r['backend']} {r['precision']} on {device}, "
                 f"{r['image_size'][0]}x{r['image_size'][1]}, size {fmt(r['file_size_mb'], '{:.2f} MB')}, "
                 f"{fmt(None if r['params'] is None else r['params'] / 1e6, '{:.2f}M')} params, "
                 f"{fmt(r['gflops'], '{:.2f}')} GFLOPs/img ({warmup} warm-up, {iters} timed runs)")
        table = Table(title=escape(title), title_justify="left")
        for col in ("batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "img/s", "RSS MB", "CUDA MB"):
            table.add_column(col, justify="right", no_wrap=True)
        for b in r["batches"]:
            if "skipped" in b:
                table.add_row(str(b["batch"]), escape(b["skipped"]), *[""] * 6)
                continue
            table.add_row(str(b["batch"]), f"{b['p50_ms']:.2f}", f"{b['p90_ms']:.2f}", f"{b['p99_ms']:.2f}",
                          f"{b['mean_ms']:.2f}", f"{b['images_per_s']:.1f}", f"{b['peak_rss_mb']:.0f}",
                          fmt(b.get("peak_cuda_mb"), "{:.0f}"))
        console.print(table)


def benchmark(
    checkpoint: Annotated[str, arg(CHECKPOINT_HELP, "a checkpoint")],
    formats: Annotated[str, opt("--formats", f" to benchmark ({', '.join(FORMATS)})")] = "auto",
    precisions: Annotated[str, opt("--precisions", f" to benchmark ({', '.join(PRECISIONS)})")] = ",".join(PRECISIONS),
    image_size: Annotated[Optional[str], opt("--image-size", " to export and time at")] = None,
    device: Annotated[str, opt("--device")] = "cpu",
    revision: Annotated[Optional[str], opt("--revision")] = None,
    data: Annotated[str, opt("--data", " whose validation images judge every row")] = "synthetic",
    num_images: Annotated[int, opt("--num-images", " judge every row", min=1, max=100000)] = 32,
    calib: Annotated[Optional[str], opt("--calib")] = None,
    iters: Annotated[int, opt("--iters", " per row", min=1, max=100000)] = 20,
    threads: Annotated[Optional[int], opt("--threads", min=1)] = None,
    no_fold: Annotated[bool, opt("--no-fold", " in every row")] = False,
    prune: Annotated[Optional[str], opt("--prune")] = None,
    allow_float_fallback: Annotated[bool, opt("--allow-float-fallback", " (and time)")] = False,
    output: Annotated[Path, opt("--output", "benchmark.json, benchmark.md, pareto.png and overlays.png (a "
                                           "directory)")] = Path("benchmark"),
    json_output: Annotated[bool, opt("--json")] = False,
    report_file: Annotated[Optional[Path], opt("--report")] = None,
) -> None:
    """Export, verify and profile every format x precision; one table with speedups vs PyTorch eager fp32."""

    check_output_dir(output, "--output")
    if report_file:
        check_output_file(report_file, "--report")
    spare_inputs({"--output": output, "--report": report_file}, models=[checkpoint], data=[data, calib])
    format_names = matrix.available_formats() if formats == "auto" else tuple(comma_items(formats, "--formats", "onnx,openvino"))
    precision_names = tuple(comma_items(precisions, "--precisions", "fp32,int8"))
    if formats != "auto":  # formats asked for by name must be available here: one line, before any work
        for name in format_names:
            get_format(name).require()
    for name in precision_names:
        get_precision(name)
    settings = matrix.BenchmarkSettings(formats=format_names, precisions=precision_names,
                                        image_size=parse_size(image_size) if image_size is not None else None, device=device,
                                        verify_data=data, verify_images=num_images, iters=iters, threads=threads,
                                        fold=not no_fold, calib=calib or data,
                                        prune_ratios=_ratios(prune) if prune is not None else (),
                                        allow_float_fallback=allow_float_fallback, revision=revision)
    report = matrix.run_benchmark(checkpoint, output, settings, log=log)
    emit(report.to_json(), json_output, report_file)
    if not json_output:
        print_benchmark_table(report)
        console.print(f"wrote {output / 'benchmark.json'}, {output / 'benchmark.md'}, {output / 'pareto.png'}, "
                      f"{output / 'overlays.png'}", soft_wrap=True, markup=False)


def _ratios(text: str) -> tuple[float, ...]:
    """'0.25,0.5' -> (0.25, 0.5): pruning ratios in (0, 1) (VitsegError otherwise)."""
    try:
        return tuple(RATIO(float(r)) for r in comma_items(text, "--prune", "0.25,0.5"))
    except (ValueError, typer.BadParameter):
        raise VitsegError(f"--prune '{text}' is not a comma-separated list of ratios in (0, 1)", "e.g. --prune 0.25,0.5") from None


def print_benchmark_table(report, title: str | None = None) -> None:
    """The benchmark table (a BenchmarkReport) on stdout."""
    # no outer edge, one space between columns: eight columns fit a piped log's 80 columns
    table = Table(title=title or f"vitseg benchmark: {report.architecture} "
                                 f"{report.image_size[0]}x{report.image_size[1]}, batch 1, {report.device}",
                  box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0), collapse_padding=True)
    # readable in a log at 80 columns: names and figures never wrap or get cut; the status folds
    table.add_column("artifact", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for col in ("size", "int8", "agreement", "mIoU drop", "p50", "speedup"):  # int8: the share of MACs in int8
        table.add_column(col, justify="right", no_wrap=True)

    def fmt(v, pattern):
        return "-" if v is None else pattern.format(v)

    cells, notes = status_notes(report.rows)
    for r, status in zip(report.rows, cells):
        table.add_row(r.name, escape(status), fmt(r.size_mb, "{:.1f}MB"),
                      fmt(None if r.int8_mac_share is None else r.int8_mac_share * 100, "{:.0f}%"),
                      fmt(None if r.pixel_agreement is None else r.pixel_agreement * 100, "{:.2f}%"),
                      fmt(None if r.miou_drop_vs_labels is None else r.miou_drop_vs_labels * 100, "{:+.2f} pt"),
                      fmt(r.latency_p50_ms, "{:.1f}ms"), fmt(r.speedup, "{:.2f}x"))
    console.print(table)
    console.print(f"measured on {measured_where(report)}", markup=False, highlight=False, soft_wrap=True)
    for note in notes:
        console.print(note, markup=False, highlight=False, soft_wrap=True)
