"""`vitseg verify`: the artifact's masks against the PyTorch reference, with a verdict and numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.markup import escape
from rich.table import Table

from vitseg_export import hub
from vitseg_export.artifact import manifest_path, read_manifest
from vitseg_export.cli.common import (
    FRACTION,
    NON_NEGATIVE,
    bar_progress,
    check_artifact_manifest,
    comma_items,
    console,
    emit,
    given_options,
    log,
    parse_ints,
    parse_size,
    progress_bar,
    spare_inputs,
    status,
)
from vitseg_export.cli.options import BackendChoice, arg, opt
from vitseg_export.compare.golden import golden_path
from vitseg_export.data.sources import check_labels_fit, open_source
from vitseg_export.errors import ParityError, VitsegError
from vitseg_export.files import check_output_dir, check_output_file
from vitseg_export.formats import read_artifact_info
from vitseg_export.precisions import thresholds_for
from vitseg_export.tables import lazy_module

verification = lazy_module("vitseg_export.verdict.verify")
goldens = lazy_module("vitseg_export.verdict.golden")  # --golden: torch-free
locating = lazy_module("vitseg_export.verdict.locate")  # --locate
registry = lazy_module("vitseg_export.modeling.registry")  # architecture names (torch, as the reference needs)
client = lazy_module("vitseg_export.serving.client")  # a served model's metadata (--server)


def verify(
    ctx: typer.Context,
    artifact: Annotated[Optional[Path], arg("The exported artifact (.onnx, .xml, .engine, .rtx.engine); or --server.",
                                            "an artifact", path=True)] = None,
    reference: Annotated[Optional[str], opt("--reference", "; default: the source checkpoint the artifact's manifest "
                                                           "records, where it exists")] = None,
    revision: Annotated[Optional[str], opt("--revision")] = None,
    data: Annotated[str, opt("--data", " whose validation images both sides run")] = "synthetic",
    num_images: Annotated[int, opt("--num-images", " judge the artifact", min=1, max=100000)] = 16,
    device: Annotated[str, opt("--device", " (the reference and the artifact; the reference runs on cpu or cuda)")] = "cpu",
    backend: Annotated[Optional[BackendChoice], opt("--backend", " that runs the artifact")] = None,
    batch_sizes: Annotated[Optional[str], opt("--batch-sizes", " to judge a dynamic-batch artifact at (default: 1, a middle "
                                                               "batch and its largest, 1,4,8; an engine: its profile's)")] = None,
    sizes: Annotated[Optional[str], opt("--sizes")] = None,
    min_agreement: Annotated[Optional[float], opt("--min-agreement", callback=FRACTION)] = None,
    min_miou: Annotated[Optional[float], opt("--min-miou", callback=FRACTION)] = None,
    max_abs_diff: Annotated[Optional[float], opt("--max-abs-diff", callback=NON_NEGATIVE)] = None,
    locate: Annotated[bool, opt("--locate")] = False,
    server: Annotated[Optional[str], opt("--server", "Judge")] = None,
    served_model: Annotated[Optional[str], opt("--served-model")] = None,
    concurrency: Annotated[str, opt("--concurrency", ", each judged beside every image alone")] = "8",
    save_diff: Annotated[Optional[Path], opt("--save-diff")] = None,
    golden: Annotated[Optional[Path], opt("--golden")] = None,
    save_golden: Annotated[bool, opt("--save-golden")] = False,
    json_output: Annotated[bool, opt("--json")] = False,
    report: Annotated[Optional[Path], opt("--report")] = None,
) -> None:
    """Compare an artifact (or what a served model returns) with its PyTorch reference (or a golden file's recording
    of it) on real images, at every shape it will run at, each image alone and inside a batch; exit 0 pass, 3 fail."""
    if golden is not None:
        return _verify_with_golden(ctx, artifact, golden, device, backend, batch_sizes, report, json_output,
                                   {"min_agreement": min_agreement, "min_miou_vs_reference": min_miou,
                                    "max_abs_logit_diff": max_abs_diff})
    if (artifact is None) == (server is None):
        raise typer.BadParameter("pass an ARTIFACT or --server URL --served-model NAME, one of them")
    if server is not None and (served_model is None or reference is None or batch_sizes or sizes or backend or locate
                               or save_golden):
        raise typer.BadParameter("--server needs --served-model and --reference, and takes --concurrency instead of "
                                 "--batch-sizes, --sizes, --backend, --locate, --save-golden (those: of the artifact "
                                 "the server serves)")
    backend_name = backend.value if backend is not None else None
    golden_out = golden_path(artifact) if save_golden and artifact is not None else None
    for path, option, check in ((report, "--report", check_output_file), (save_diff, "--save-diff", check_output_dir),
                                (golden_out, "--save-golden", check_output_file)):
        if path:
            check(path, option)
    reference, revision = _reference(artifact, server, served_model, reference, revision)
    spare_inputs({"--report": report, "--save-diff": save_diff, "--save-golden": golden_out},
                 models=[artifact, reference] if artifact else [reference], data=[data])
    overrides = {"min_agreement": min_agreement, "min_miou_vs_reference": min_miou, "max_abs_logit_diff": max_abs_diff}
    if server is not None:
        levels = tuple(parse_ints(concurrency, "--concurrency", 256))
        with progress_bar() as bar:
            result = verification.verify_server(server, served_model, reference, data, num_images, levels, device,
                                                overrides=overrides, save_diff=save_diff, revision=revision,
                                                progress=bar_progress(bar, bar.add_task("verify", total=num_images)))
        return _emit_verdict(result, f"{server.rstrip('/')}/{served_model}", reference, report, json_output)
    _verify_artifact(artifact, reference, revision, data, num_images, device, backend_name, batch_sizes, sizes,
                     overrides, locate, save_diff, report, json_output, golden_out)


def _reference(artifact: Path | None, server: str | None, served_model: str | None, reference: str | None,
               revision: str | None) -> tuple[str, str | None]:
    """(reference, revision) to verify against: as given (an architecture name refused where the artifact or served
    model records another source), else the checkpoint the artifact's manifest records, said on stderr."""
    if artifact is not None:
        check_artifact_manifest(artifact)  # an edited manifest: one line, before it names the default reference
        if reference is None:
            return manifest_reference(artifact, revision)
        refuse_architecture_reference(reference, lambda: read_artifact_info(artifact), artifact.name)
    else:
        refuse_architecture_reference(reference, lambda: served_model_info(server, served_model),
                                      f"{server.rstrip('/')}/{served_model}")
    return reference, revision


GOLDEN_BRINGS = ("reference", "revision", "data", "num_images", "sizes", "server", "served_model", "concurrency",
                 "save_diff", "save_golden")


def _verify_with_golden(ctx: typer.Context, artifact: Path | None, golden: Path, device: str, backend: Any,
                        batch_sizes: str | None, report: Path | None, json_output: bool, overrides: dict) -> None:
    """verify against a golden file: torch-free, the same judge, presets, shapes and report."""
    given = given_options(ctx)
    if "locate" in given:
        raise VitsegError("--locate compares the artifact's tensors with PyTorch's inside the model: it needs the "
                          "checkpoint, which a golden file does not hold", "use -r CHECKPOINT --locate where it is")
    clash = next((name for name in GOLDEN_BRINGS if name in given), None)
    if clash is not None or artifact is None:
        what = f"--{clash.replace('_', '-')}" if clash else "--server"
        raise VitsegError(f"--golden brings its own images, shapes and reference: {what} does not apply with it",
                          f"drop {what}, or drop --golden")
    if report:
        check_output_file(report, "--report")
    check_artifact_manifest(artifact)
    spare_inputs({"--report": report}, models=[artifact, golden])
    batches = tuple(parse_ints(batch_sizes, "--batch-sizes")) if batch_sizes is not None else None
    thresholds = thresholds_for(read_artifact_info(artifact).precision, **overrides)
    with status("verify") as update:
        result = goldens.verify_with_golden(artifact, golden, device, thresholds, backend.value if backend else None,
                                            batches, progress=lambda m, *counts, **info: update(m, *counts))
    _emit_verdict(result, artifact.name, f"{golden.name} (golden file)", report, json_output)


def _verify_artifact(artifact: Path, reference: str, revision: str | None, data: str, num_images: int, device: str,
                     backend_name: str | None, batch_sizes: str | None, sizes: str | None, overrides: dict,
                     locate: bool, save_diff: Path | None, report: Path | None, json_output: bool,
                     save_golden: Path | None = None) -> None:
    """verify for an artifact: its declared shapes and the data checked before any work, then the verdict and,
    with --locate, where it first leaves PyTorch."""
    info = read_artifact_info(artifact)
    batches = tuple(parse_ints(batch_sizes, "--batch-sizes")) if batch_sizes is not None else None
    other_sizes = [parse_size(t, "--sizes") for t in comma_items(sizes, "--sizes", "96x96,128x160")] if sizes is not None else None
    info.declared_shapes(batches, other_sizes)  # a shape the artifact does not take: one line, before any work
    check_labels_fit(open_source(data, "val"), data, len(info.class_names))  # bad data: one line, before any work
    thresholds = thresholds_for(info.precision, **overrides)
    with progress_bar() as bar:
        task = bar.add_task("verify", total=num_images)
        result = verification.verify_artifact(artifact, reference, data, num_images, device, thresholds, save_diff,
                                              progress=bar_progress(bar, task),
                                              backend=backend_name, batch_sizes=batches, sizes=other_sizes,
                                              revision=revision, save_golden=save_golden)
    found = None
    if locate:
        with status("locate") as update:
            found = locating.locate_artifact(artifact, reference, data, progress=lambda m, *counts, **info: (update(m, *counts), log(f"  {m}", *counts)),
                                             revision=revision)
    _emit_verdict(result, artifact.name, reference, report, json_output, found)


def manifest_reference(artifact: Path, revision: str | None = None) -> tuple[str, str | None]:
    """(the checkpoint the artifact records it was exported from, the revision to load it at) where that checkpoint
    still exists or is a Hub id (at `revision`, else the commit its manifest recorded), said on stderr exactly as it
    will be loaded; else VitsegError asking for --reference. The caller checked first that the manifest agrees with
    the artifact's own metadata (check_artifact_manifest), so what the message names is what both record."""
    recorded = read_artifact_info(artifact).source_checkpoint
    candidates = [Path(recorded), artifact.parent / recorded] if recorded else []
    found: str | None = next((str(c) for c in candidates if c.exists()), None)
    has_manifest = manifest_path(artifact).exists()
    records = f"{artifact.name}'s {'manifest' if has_manifest else 'metadata'} records"
    at = f" at revision {revision}" if revision else ""
    if found is None and recorded and hub.looks_like_hub_id(recorded):
        found = recorded  # resolved from the local Hugging Face cache by the loader, at the commit exported from
        source = read_manifest(artifact).source if has_manifest else None
        commit = ((source or {}).get("hub") or {}).get("commit")
        if revision is None and commit:
            revision, at = commit, f" at commit {commit}"
    if found is None:
        where = f"{recorded}, which is not here" if recorded else "none"
        raise VitsegError(f"{artifact.name}: no --reference given, and the source checkpoint {records} is {where}",
                          "pass the checkpoint it was exported from: -r RUN_DIR")
    log(f"reference: {found}{at} (the source checkpoint {records})")
    return found, revision


def served_model_info(server: str, served_model: str):
    """The vitseg metadata of a served model (its config's vitseg parameters): VitsegError when the server cannot be
    reached or does not have it."""
    endpoint = client.Endpoint.parse(server, served_model)
    return client.served_info(endpoint, client.model_config(endpoint, endpoint.client()))


def refuse_architecture_reference(reference: str, info: Callable[[], Any], name: str) -> None:
    """--reference that is an architecture name (random weights; a path that exists wins) where the artifact or
    served model records another source (a checkpoint path, a Hub id, trained weights' sha256) is bad input
    (VitsegError, exit 2), before any weights load: its masks would only be compared with a random network's. An
    artifact exported from that very name (a random-weights twin, on purpose) takes it; `info` is asked only then."""
    if Path(reference).exists() or reference not in registry.ARCHITECTURES:
        return
    meta = info()
    recorded, sha256 = meta.source_checkpoint, meta.source_sha256 or ""
    if recorded == reference or not (recorded or sha256):
        return
    source = recorded or f"weights with sha256 {sha256[:12]}…"
    served = "://" in name  # --server takes no default reference
    raise VitsegError(f"--reference {reference} is an architecture name (random weights), not the checkpoint {name} "
                      f"was exported from ({source})",
                      "pass that checkpoint: -r RUN_DIR, a .safetensors file or a Hub id"
                      + ("" if served else "; or drop -r to use the one the manifest records"))


def _emit_verdict(result, name: str, reference: str, report: Optional[Path], json_output: bool, found=None) -> None:
    """Write, print and judge a verify report (exit 3 through ParityError on a failure); `found`: the locate report."""
    r = result.to_json() | ({"locate": found.to_json()} if found is not None else {})
    emit({k: v for k, v in r.items() if k != "per_image"} | {"per_image": r["per_image"]}, json_output, report)
    if not json_output:
        print_verify_table(r)
        print_shape_lines(r)
        if found is not None:
            print_locate(found)
    if not result.passed:
        raise ParityError(f"{name} FAILED{result.failed_at} ({r['precision']} preset): " + "; ".join(result.failures),
                          "see the report; raise thresholds only with a reason")
    if not json_output:
        console.print(f"[green]PASS[/] {escape(name)} matches {escape(reference)} ({r['precision']} preset, "
                      f"{len(r['shapes'])} shape{'s' if len(r['shapes']) > 1 else ''})", soft_wrap=True)


def print_locate(found) -> None:
    """The locate report: the verdict line first, one table of the boundaries compared, the ranked quantized layers
    and the export command that keeps the first divergence in float."""
    console.print(found.verdict, highlight=False, markup=False, soft_wrap=True)
    table = Table(title=escape(f"locate: {found.images} images, {found.reference_note}"))
    for column, justify in (("boundary", "left"), ("kind", "left"), ("SQNR dB", "right"), ("cosine", "right"),
                            ("max|d|/range", "right"), ("non-finite", "right"), ("", "left")):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for b in found.boundaries:
        mark = {True: "ok", False: "diverges" if b.name in found.path else "past allowance (downstream)",
                None: b.note or "not compared"}[b.within]
        mark = "FIRST DIVERGENCE" if b.name == found.first_divergence else mark
        table.add_row(escape("  " * b.level + b.name), escape(b.kind), "-" if b.sqnr_db is None else f"{b.sqnr_db:.1f}",
                      "-" if b.cosine is None else f"{b.cosine:.6f}", "-" if b.max_rel_diff is None else f"{b.max_rel_diff:.2e}",
                      "-" if b.nonfinite is None else str(b.nonfinite), escape(mark))
    console.print(table)
    for row in found.quantized_layers[:5]:
        console.print(f"  in float alone: {row['layer']} ({row['module']}) -> SQNR {row['sqnr_db_when_float']} dB",
                      highlight=False, markup=False, soft_wrap=True)
    if found.keep_float_command:
        console.print(f"fix: {found.keep_float_command}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"located in {found.seconds:.1f} s, peak memory {found.peak_rss_mb:.0f} MB", highlight=False, markup=False)


def print_shape_lines(r: dict) -> None:
    """One compact line per checked shape, and one for batch consistency."""
    for v in r["shapes"]:
        diff = "" if v["max_abs_logit_diff"] is None else f"  max|d| {v['max_abs_logit_diff']:.1e}"
        shape = f"{v['height']}x{v['width']}"
        console.print(f"  batch {v['batch']:<3}{shape:<10}agreement {v['pixel_agreement'] * 100:8.4f}%  "
                      f"mIoU {v['miou_vs_reference'] * 100:6.2f}{diff}  {'pass' if v['passed'] else 'FAILED'}",
                      highlight=False, markup=False, soft_wrap=True)
    c = r.get("batch_consistency")
    if c is None:
        return
    if not c["images_compared"]:
        console.print("  batch consistency: one batch size only (static batch)", highlight=False, markup=False)
        return
    w = c["worst_image"]
    diff = "" if w["max_abs_logit_diff"] is None else f", max |diff| {w['max_abs_logit_diff']:.2e}"
    console.print(f"  batch consistency (batch {'/'.join(map(str, c['batch_sizes']))}, {c['images_compared']} comparisons): "
                  f"{'pass' if c['passed'] else 'FAILED'}; worst {w['image']} at batch {w['batch']}, {w['height']}x{w['width']} "
                  f"(agreement {w['pixel_agreement'] * 100:.4f}%{diff})", highlight=False, markup=False, soft_wrap=True)


def print_verify_table(r: dict) -> None:
    """The verify report (its JSON form) as a table on stdout."""
    name = r["artifact"] if "://" in r["artifact"] else Path(r["artifact"]).name
    table = Table(title=escape(f"verify {name} ({r['backend']}, {r['device']}) vs PyTorch fp32"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("limit", justify="right")
    t = r["thresholds"]

    def pct(x):
        return f"{x * 100:.4f}%"

    table.add_row("images", str(r["images"]), "")
    table.add_row("pixel agreement", pct(r["pixel_agreement"]), f">= {pct(t['min_agreement'])}")
    table.add_row("mIoU vs reference", pct(r["miou_vs_reference"]), f">= {pct(t['min_miou_vs_reference'])}")
    if r["max_abs_logit_diff"] is not None:
        table.add_row("max |logit diff|", f"{r['max_abs_logit_diff']:.3g}",
                      f"<= {t['max_abs_logit_diff']:.3g}" if t["max_abs_logit_diff"] is not None else "")
        table.add_row("mean |logit diff|", f"{r['mean_abs_logit_diff']:.3g}",
                      f"<= {t['max_mean_abs_logit_diff']:.3g}" if t["max_mean_abs_logit_diff"] is not None else "")
    table.add_row("non-finite logits", str(r["nonfinite"]), f"<= {t['max_nonfinite']}")
    table.add_row("flipped pixels (near-ties)", f"{r['flips']} ({r['low_margin_flips']})", "")
    if "reference_miou_vs_labels" in r:
        table.add_row("mIoU vs labels: reference / artifact",
                      f"{r['reference_miou_vs_labels'] * 100:.2f} / {r['artifact_miou_vs_labels'] * 100:.2f}", "")
    console.print(table)
