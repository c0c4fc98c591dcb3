"""`vitseg export`: checkpoint -> artifact (+ manifest) of any format in the format table, parity-checked
before it is written."""

from __future__ import annotations

import enum
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from vitseg_export.cli.common import (
    FRACTION,
    MAX_BATCH,
    WORKSPACE,
    check_artifact_manifest,
    check_size,
    comma_items,
    console,
    emit,
    given_options,
    keep_float_names,
    log,
    parse_ints,
    parse_size,
    spare_inputs,
    status,
)
from vitseg_export.cli.options import (
    CHECKPOINT_HELP,
    INT8,
    CalibMethodChoice,
    CpuClassChoice,
    FormatChoice,
    OutputsChoice,
    PrecisionChoice,
    TargetChoice,
    TritonBackendChoice,
    TritonDeviceChoice,
    arg,
    opt,
)
from vitseg_export.compare.golden import golden_path
from vitseg_export.data.sources import check_labels_fit, open_source
from vitseg_export.errors import VitsegError
from vitseg_export.files import check_output_dir, check_output_file
from vitseg_export.formats import format_for_path, get_format
from vitseg_export.machine.cpu import SAFE_CLASS
from vitseg_export.precisions import get_precision
from vitseg_export.runners.tensorrt_editions import EDITIONS, TENSORRT_RTX
from vitseg_export.serving.repository import TRITON_BACKENDS
from vitseg_export.settings import check_options_apply, default_of, export_request
from vitseg_export.tables import lazy_module

checkpoints = lazy_module("vitseg_export.checkpoint")  # torch
trt_lint = lazy_module("vitseg_export.export.trt_lint")  # onnx, for --check-trt only
tensorrt_engine = lazy_module("vitseg_export.export.tensorrt_engine")  # --check-trt's build with TensorRT-RTX
tensorrt_census = lazy_module("vitseg_export.export.tensorrt_census")
onnx = lazy_module("onnx")


def default_artifact_path(checkpoint: str, architecture: str, precision: str, fmt) -> Path:
    """Beside the source (a run directory, else the directory of an artifact or checkpoint file, else the working
    directory): `<architecture>-<precision><suffix>`, or for a repository format the folder `triton`."""
    src = Path(checkpoint)
    base = src if src.is_dir() else (src.parent if src.exists() else Path("."))
    return base / ("triton" if fmt.directory else f"{architecture}-{precision}{fmt.suffixes[0]}")


SOURCE_HELP = CHECKPOINT_HELP + " For formats that build on one: an artifact (.onnx)."
COMPUTE_CAPABILITY_HELP = (f" ({', '.join(TENSORRT_RTX.targets)}; "
                           f"default {','.join(TENSORRT_RTX.default_targets)})")
DEFAULT_PREFERRED_BATCH = ",".join(map(str, default_of("triton_preferred_batch")))


def export(
    ctx: typer.Context,
    checkpoint: Annotated[str, arg(SOURCE_HELP, "a checkpoint or artifact")],
    format: Annotated[FormatChoice, opt("--format", " to write")] = FormatChoice("onnx"),
    precision: Annotated[PrecisionChoice, opt("--precision", " to convert to")] = PrecisionChoice("fp32"),
    output: Annotated[Optional[Path], opt("--output", "the artifact (default: beside the checkpoint; triton: the "
                                                      "repository directory)")] = None,
    revision: Annotated[Optional[str], opt("--revision")] = None,
    image_size: Annotated[Optional[str], opt("--image-size", " to export at")] = None,
    opset: Annotated[int, opt("--opset", min=13, max=21)] = default_of("opset"),
    max_batch: Annotated[int, opt("--max-batch", min=1, max=MAX_BATCH)] = default_of("max_batch"),
    dynamic_batch: Annotated[Optional[bool], opt("--dynamic-batch")] = None,
    dynamic_size: Annotated[bool, opt("--dynamic-size")] = default_of("dynamic_size"),
    outputs: Annotated[OutputsChoice, opt("--outputs")] = OutputsChoice(default_of("outputs")),
    simplify: Annotated[bool, opt("--simplify")] = default_of("simplify"),
    no_fold: Annotated[bool, opt("--no-fold")] = default_of("no_fold"),
    data: Annotated[str, opt("--data", " whose validation images judge the export")] = default_of("data"),
    num_images: Annotated[Optional[int], opt("--num-images", " the verdict rests on (16; int8: 32)", min=1, max=100000)] = None,
    fp16_io: Annotated[bool, opt("--fp16-io")] = default_of("fp16_io"),
    keep_float: Annotated[Optional[str], opt("--keep-float")] = None,
    calib: Annotated[Optional[str], opt("--calib")] = None,
    calib_images: Annotated[int, opt("--calib-images", min=1, max=100000)] = default_of("calib_images"),
    calib_method: Annotated[CalibMethodChoice, opt("--calib-method")] = CalibMethodChoice(default_of("calib_method")),
    heldout: Annotated[Optional[str], opt("--heldout")] = None,
    target: Annotated[Optional[TargetChoice], opt("--target")] = None,
    cpu_class: Annotated[CpuClassChoice, opt("--cpu-class")] = CpuClassChoice(SAFE_CLASS),
    min_agreement: Annotated[Optional[float], opt("--min-agreement", " on held-out images, reached by keeping layers "
                                                                     "float", panel=INT8, callback=FRACTION)] = None,
    allow_float_fallback: Annotated[bool, opt("--allow-float-fallback")] = default_of("allow_float_fallback"),
    check_trt: Annotated[bool, opt("--check-trt")] = default_of("check_trt"),
    save_golden: Annotated[bool, opt("--save-golden")] = default_of("save_golden"),
    workspace: Annotated[float, opt("--workspace", callback=WORKSPACE)] = default_of("workspace"),
    min_shape: Annotated[Optional[str], opt("--min-shape")] = None,
    opt_shape: Annotated[Optional[str], opt("--opt-shape")] = None,
    max_shape: Annotated[Optional[str], opt("--max-shape")] = None,
    sparse_weights: Annotated[bool, opt("--sparse-weights")] = default_of("sparse_weights"),
    timing_cache: Annotated[Optional[Path], opt("--timing-cache")] = None,
    version_compatible: Annotated[bool, opt("--version-compatible")] = default_of("version_compatible"),
    dla_core: Annotated[Optional[int], opt("--dla-core", min=0, max=15)] = None,
    weakly_typed: Annotated[bool, opt("--weakly-typed")] = default_of("weakly_typed"),
    compute_capability: Annotated[Optional[str], opt("--compute-capability", COMPUTE_CAPABILITY_HELP)] = None,
    triton_name: Annotated[Optional[str], opt("--triton-name")] = None,
    triton_backend: Annotated[Optional[TritonBackendChoice], opt("--triton-backend")] = None,
    triton_device: Annotated[TritonDeviceChoice, opt("--triton-device")] = TritonDeviceChoice(default_of("triton_device")),
    triton_instances: Annotated[int, opt("--triton-instances", min=1, max=64)] = default_of("triton_instances"),
    triton_max_batch: Annotated[int, opt("--triton-max-batch", min=1, max=MAX_BATCH)] = default_of("triton_max_batch"),
    triton_preferred_batch: Annotated[str, opt("--triton-preferred-batch")] = DEFAULT_PREFERRED_BATCH,
    triton_queue_delay_us: Annotated[int, opt("--triton-queue-delay-us", min=0, max=10_000_000)] = default_of(
        "triton_queue_delay_us"),
    json_output: Annotated[bool, opt("--json")] = False,
    report: Annotated[Optional[Path], opt("--report")] = None,
) -> None:
    """Export a checkpoint (or an artifact, for formats that build on one), judged before anything is written."""
    fmt, options = get_format(format), export_options(ctx.params)
    check_export_options(given_options(ctx), fmt, options)
    fmt.require()  # a missing backend says so before any other work
    if report:
        check_output_file(report, "--report")
    result = _run_export(fmt, checkpoint, output, export_request(fmt, options), revision, report)[1]
    _print_export_result(fmt, result, check_trt, json_output, report)


def export_options(params: dict) -> dict:
    """`vitseg export`'s option values as the request takes them: choices as plain strings, sizes, shapes and lists
    parsed (VitsegError, one line, naming the option for a bad one)."""
    values = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in params.items()}
    parsers = {"image_size": parse_size, "keep_float": keep_float_names,
               "min_shape": lambda v: _shape(v, "--min-shape"), "opt_shape": lambda v: _shape(v, "--opt-shape"),
               "max_shape": lambda v: _shape(v, "--max-shape"),
               "triton_preferred_batch": lambda v: tuple(parse_ints(v, "--triton-preferred-batch")),
               "compute_capability": lambda v: TENSORRT_RTX.check_targets(tuple(comma_items(v, "--compute-capability", "8.6,8.9")))}
    return {k: (parsers[k](v) if k in parsers and v is not None else v) for k, v in values.items()}


def check_export_options(given: set[str], fmt, options: dict) -> None:
    """Options given for a format, precision or int8 target they do not apply to are refused (the rows' `options`
    columns say what applies where); `--format triton --triton-backend tensorrt` takes TensorRT's build options."""
    precision = get_precision(options.get("precision") or "fp32")
    engine_backends = {f"--format triton --triton-backend {b.name}": b.options for b in TRITON_BACKENDS.values() if b.options}
    chosen = f"--format triton --triton-backend {options.get('triton_backend')}" if fmt.name == "triton" else None
    check_options_apply(given, fmt, precision, options.get("target") or fmt.int8_target, engine_backends, chosen)


def _print_export_result(fmt, result, check_trt: bool, json_output: bool, report: Optional[Path]) -> None:
    """What `vitseg export` prints about the written artifact (and the TensorRT check, where asked); a failed
    --check-trt then exits 2 whether the result was printed as text or as JSON (--json, --report)."""
    path = result.path
    lint = _lint(result, check_trt)
    build = _trt_build(fmt, result) if check_trt and not lint else None
    data = {"artifact": str(path), **result.manifest.to_json(),
            **({"trt_lint": [str(p) for p in lint], "trt_build": build} if check_trt else {})}
    emit(data, json_output, report)
    if not json_output:
        for line in fmt.summary(path, result.manifest):
            console.print(line, highlight=False, soft_wrap=True, markup=False)
        if check_trt:
            _print_lint(lint)
            _print_build(build)
    _raise_if_trt_refused(path, lint, build, json_output)


def _raise_if_trt_refused(path: Path, lint: list, build: dict | None, json_output: bool) -> None:
    """--check-trt's verdict, the same in every output mode: a graph TensorRT's parser or builder refuses is a bad
    input for that target (VitsegError, exit 2; the artifact itself stays written, valid for onnxruntime)."""
    hint = "the ONNX artifact itself is valid for onnxruntime; fix the graph before building an engine"
    if lint:
        where = "listed in trt_lint" if json_output else "listed above"
        count = f"{len(lint)} TensorRT parser incompatibilit{'y' if len(lint) == 1 else 'ies'}"
        raise VitsegError(f"{path.name} has {count} ({where}); first: {lint[0]}", hint)
    if isinstance(build, dict) and build.get("error"):
        raise VitsegError(build["error"], hint)


def _run_export(fmt, checkpoint: str, output: Optional[Path], request, revision: Optional[str] = None,
                report: Optional[Path] = None):
    """(artifact path, ExportResult): from an ONNX artifact where the format builds on one, else from the checkpoint.
    The output path and the data specs are checked before any heavy work."""
    check_output = check_output_dir if fmt.directory else check_output_file
    if output is not None:
        check_output(output, "--output")
        spare_export_inputs(fmt, checkpoint, output, request, report)
        if not fmt.directory and format_for_path(output) is not fmt:
            raise VitsegError(f"--output {output}: --format {fmt.name} writes {' or '.join(fmt.suffixes)} files",
                              f"e.g. -o {output.with_suffix(fmt.suffixes[0])}")
    sources = check_export_data(request)
    source = format_for_path(Path(checkpoint))
    if source is not None:
        if fmt.from_artifact is None or source.name not in fmt.artifact_sources:
            builds = f"from {' or '.join(fmt.artifact_sources)} artifacts or checkpoints" if fmt.artifact_sources else "from checkpoints"
            raise VitsegError(f"--format {fmt.name} builds {builds}, and {checkpoint} is a {source.name} artifact",
                              "pass the checkpoint it was exported from")
        if revision is not None or request.golden:
            option = "--revision" if revision is not None else "--save-golden"
            raise VitsegError(f"{option} applies to checkpoints (Hub ids; PyTorch's reference), and {checkpoint} is an "
                              "artifact", f"drop {option}" + (", or run vitseg verify ARTIFACT -r CHECKPOINT --save-golden"
                                                              if request.golden else ""))
        check_artifact_manifest(checkpoint)  # the engine's manifest copies its source record
        path = output or (default_artifact_path(checkpoint, "", "", fmt) if fmt.directory
                          else Path(checkpoint).with_suffix(fmt.suffixes[0]))
        spare_export_inputs(fmt, checkpoint, path, request, report)
        with status(fmt.name) as update:
            return path, fmt.from_artifact(Path(checkpoint), path, request, lambda m, *counts, **info: (update(m, *counts), log(f"  {m}", *counts)))

    loaded = checkpoints.load_checkpoint(checkpoint, revision=revision)
    for spec, source in sources.items():
        check_labels_fit(source, spec, loaded.meta.config.num_classes)
    path = output or default_artifact_path(checkpoint, loaded.meta.architecture, request.precision, fmt)
    check_output(path, "output")
    spare_export_inputs(fmt, checkpoint, path, request, report)
    with status("export") as update:
        return path, fmt.export(loaded, path, request, lambda m, *counts, **info: (update(m, *counts), log(f"  {m}", *counts)))


def spare_export_inputs(fmt, checkpoint: str, path: Path, request, report: Optional[Path] = None) -> None:
    """Every file the export writes (the artifact, its sidecars and manifest, the ONNX beside an engine) spares
    the checkpoint or artifact it reads and the data folders."""
    written = [path] if fmt.directory else fmt.files(path)
    if fmt.onnx_beside and format_for_path(Path(checkpoint)) is None:
        written += fmt.files(path.with_suffix(".onnx"))
    if request.golden:
        written.append(golden_path(path))
    spare_inputs({"--output": written, "--report": report}, models=[checkpoint],
                 data=[request.onnx.parity_data, request.int8.calib, request.int8.heldout])


def check_export_data(request) -> dict:
    """Open every data spec the export will read (DataError, one line, for a bad one) before the export starts;
    returns {spec: its validation split}, the images whose labels the export compares with."""
    held_out = {request.onnx.parity_data: open_source(request.onnx.parity_data, "val")}
    if request.precision == "int8":
        open_source(request.int8.calib, "calib")
        spec = request.int8.heldout or request.int8.calib
        held_out[spec] = open_source(spec, "val")
    return held_out


def _lint(result, check_trt: bool) -> list:
    if not check_trt or result.model_proto is None:
        return []

    return trt_lint.lint_for_tensorrt(result.model_proto)


def _trt_build(fmt, result) -> dict:
    """--check-trt's real build: the exported graph parsed and built by TensorRT-RTX ahead of time (an engine
    format's own build already did that). {"skipped": why} where it cannot; {"error": message} on failure."""
    if result.model_proto is None:
        return {"skipped": f"--format {fmt.name} has no ONNX graph to build"}
    if fmt.name in {e.format for e in EDITIONS.values()}:
        return {"skipped": f"--format {fmt.name} built the engine itself (its manifest has the census)"}
    try:
        TENSORRT_RTX.load()
    except VitsegError as e:
        return {"skipped": f"{e.message} ({e.hint}): only the lint ran"}
    with tempfile.TemporaryDirectory(prefix="vitseg-check-trt-") as tmp:
        graph = Path(tmp) / "graph.onnx"
        onnx.save(result.model_proto, graph)
        try:
            return tensorrt_engine.check_build(graph)
        except VitsegError as e:
            return {"error": e.message}


def _print_build(build: dict | None) -> None:
    if build is None or build.get("error"):
        return
    if "skipped" in build:
        console.print(f"TensorRT build: not run ({build['skipped']})", soft_wrap=True, highlight=False, markup=False)
        return
    console.print(f"TensorRT build: {build['tensorrt_edition']} {build['tensorrt_version']} parsed the graph and built an "
                  f"engine ahead of time in {build['build_seconds']:.1f} s ({build['engine_bytes'] / 1e6:.1f} MB, compute "
                  f"capability {', '.join(build['compute_capabilities'])})", soft_wrap=True, highlight=False, markup=False)
    console.print(f"  {tensorrt_census.describe_census(build['census'])}", soft_wrap=True, highlight=False, markup=False)


def _print_lint(lint: list) -> None:
    for problem in lint:
        console.print(f"  TensorRT: {problem}", soft_wrap=True, highlight=False, markup=False)
    if not lint:
        console.print("TensorRT lint: every op and attribute is supported by the TensorRT ONNX parser")


def _shape(text: Optional[str], option: str) -> Optional[tuple[int, ...]]:
    """'1x3x512x512' -> (1, 3, 512, 512): a batch in 1..MAX_BATCH, 3 channels, a size vitseg runs at."""
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or shape[1] != 3 or not 1 <= shape[0] <= MAX_BATCH:
        raise VitsegError(f"{option} '{text}' is not NxCxHxW with 3 channels and N in 1..{MAX_BATCH}", f"e.g. {option} 1x3x512x512")
    check_size(shape[2], shape[3], option)
    return shape
