"""`vitseg export`: checkpoint -> artifact (+ manifest) of any format in the format table, parity-checked
before it is written."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from vitseg_export.cli.common import (
    FRACTION,
    MAX_BATCH,
    WORKSPACE,
    JsonFlag,
    KeepFloatOption,
    check_size,
    console,
    keep_float_names,
    log,
    parse_ints,
    parse_size,
    print_json,
    spare_inputs,
    status,
)
from vitseg_export.data.sources import check_labels_fit, open_source
from vitseg_export.errors import VitsegError
from vitseg_export.files import check_output_dir, check_output_file
from vitseg_export.formats import FORMATS, format_for_path, get_format
from vitseg_export.machine.cpu import CPU_CLASSES, SAFE_CLASS
from vitseg_export.precisions import PRECISIONS, get_precision
from vitseg_export.runners.tensorrt_editions import EDITIONS, TENSORRT, TENSORRT_RTX
from vitseg_export.settings import (
    CALIB_METHODS,
    INT8_TARGETS,
    OUTPUT_CHOICES,
    EngineSettings,
    ExportRequest,
    Int8Settings,
    OnnxExportSettings,
    TritonSettings,
)
from vitseg_export.tables import lazy_module

checkpoints = lazy_module("vitseg_export.checkpoint")  # torch
trt_lint = lazy_module("vitseg_export.export.trt_lint")  # onnx, for --check-trt only
tensorrt_engine = lazy_module("vitseg_export.export.tensorrt_engine")  # --check-trt's build with TensorRT-RTX
tensorrt_census = lazy_module("vitseg_export.export.tensorrt_census")
onnx = lazy_module("onnx")
repository = lazy_module("vitseg_export.serving.repository")  # the Triton backends


def default_artifact_path(checkpoint: str, architecture: str, precision: str, suffix: str = ".onnx") -> Path:
    """Beside a run directory (else in the working directory): `<architecture>-<precision><suffix>`."""
    src = Path(checkpoint)
    base = src if src.is_dir() else Path(".")
    return base / f"{architecture}-{precision}{suffix}"


def export(
    checkpoint: Annotated[str, typer.Argument(help="Run dir, .safetensors, Hugging Face SegFormer dir, or architecture name; for formats that build on one, an artifact (.onnx, .xml, .engine).")],
    format: Annotated[str, typer.Option("--format", help=f"Artifact format: {', '.join(FORMATS)}.")] = "onnx",
    precision: Annotated[str, typer.Option("--precision", help=f"Numeric precision: {', '.join(PRECISIONS)}.")] = "fp32",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Artifact path (default: beside the checkpoint); triton: the repository directory.")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (17: native LayerNormalization, TensorRT-portable).")] = 17,
    dynamic_batch: Annotated[Optional[bool], typer.Option("--dynamic-batch/--static-batch", help="Dynamic batch dimension (default: dynamic, static for formats that run faster static: openvino).")] = None,
    dynamic_size: Annotated[bool, typer.Option("--dynamic-size", help="Dynamic height/width (SegFormer only).")] = False,
    outputs: Annotated[str, typer.Option(help="logits, mask (in-graph argmax, uint8) or both.")] = "logits",
    image_size: Annotated[Optional[str], typer.Option("--image-size", help="HxW (or S) to export at; default: the checkpoint's.")] = None,
    simplify: Annotated[bool, typer.Option("--simplify", help="Simplify with onnxslim (verified not to change outputs).")] = False,
    no_fold: Annotated[bool, typer.Option("--no-fold", help="Skip the exact graph rewrites (decoder/BatchNorm folding).")] = False,
    fp16_io: Annotated[bool, typer.Option("--fp16-io", help="fp16: float16 graph input/output (default float32).")] = False,
    keep_float: KeepFloatOption = None,
    data: Annotated[str, typer.Option("--data", help="Images that judge the export (their validation split): synthetic[:N], pets:DIR or folder:DIR.")] = "synthetic",
    calib: Annotated[Optional[str], typer.Option("--calib", help="int8: calibration data spec (its calib split); default: --data.")] = None,
    heldout: Annotated[Optional[str], typer.Option("--heldout", help="int8: data spec whose validation split decides the float fallback; default: --calib's.")] = None,
    calib_images: Annotated[Optional[int], typer.Option("--calib-images", min=1, max=100000, help="int8: calibration images (default 32).")] = None,
    calib_method: Annotated[Optional[str], typer.Option("--calib-method", help="int8: minmax (default), entropy or percentile.")] = None,
    target: Annotated[Optional[str], typer.Option("--target", help="int8: cpu (ONNX Runtime) or trt (TensorRT: float part in fp16); default trt for --format trt, else cpu.")] = None,
    cpu_class: Annotated[Optional[str], typer.Option("--cpu-class", help=f"int8 for CPUs: the class of the CPU it will run on: {SAFE_CLASS} (default: 7-bit weights, exact and verified on every x86 CPU), vnni or amx (8-bit weights: exact only with AVX512-VNNI/AVX-VNNI/AMX). `vitseg doctor` names this machine's.")] = None,
    allow_float_fallback: Annotated[bool, typer.Option("--allow-float-fallback", help="int8: accept an artifact that is mostly float after the fallback, or slower than fp32 on the CPU class it is for (default: refused).")] = False,
    check_trt: Annotated[bool, typer.Option("--check-trt", help="Check the ONNX for TensorRT: lint it against the parser's supported ops/attributes, then parse and build it with TensorRT-RTX (NVIDIA's parser and builder, ahead of time, no GPU needed) where it is installed.")] = False,
    workspace: Annotated[Optional[float], typer.Option("--workspace", callback=WORKSPACE, help="trt: builder workspace in GB (default 4).")] = None,
    min_shape: Annotated[Optional[str], typer.Option("--min-shape", help="trt: NxCxHxW of the optimization profile.")] = None,
    opt_shape: Annotated[Optional[str], typer.Option("--opt-shape", help="trt: NxCxHxW.")] = None,
    max_shape: Annotated[Optional[str], typer.Option("--max-shape", help="trt: NxCxHxW.")] = None,
    sparsity: Annotated[bool, typer.Option("--sparsity", help="trt: allow 2:4 sparse kernels (Ampere+).")] = False,
    timing_cache: Annotated[Optional[Path], typer.Option("--timing-cache", help="trt: timing cache file to reuse and update.")] = None,
    version_compatible: Annotated[bool, typer.Option("--version-compatible", help="trt: version-compatible engine.")] = False,
    dla_core: Annotated[Optional[int], typer.Option("--dla-core", min=0, max=15, help="trt: build for this DLA core (Jetson; fp16/int8, static shapes).")] = None,
    weakly_typed: Annotated[bool, typer.Option("--weakly-typed", help="trt: TensorRT 10.x fallback with FP16/INT8 builder flags.")] = False,
    compute_capability: Annotated[Optional[str], typer.Option("--compute-capability", help=f"trt-rtx: the GPU compute capabilities to build for, comma-separated ({', '.join(TENSORRT_RTX.targets)}; default {','.join(TENSORRT_RTX.default_targets)}).")] = None,
    min_agreement: Annotated[Optional[float], typer.Option("--min-agreement", callback=FRACTION, help="int8: held-out agreement to reach by falling back layers (default: the int8 preset).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="triton: the model's name (default: ARCHITECTURE-PRECISION).")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="triton: onnxruntime, openvino, tensorrt (Triton's native backends) or python (vitseg's runner in Triton's Python backend); default: the artifact's native one.")] = None,
    max_batch_size: Annotated[Optional[int], typer.Option("--max-batch-size", min=1, max=MAX_BATCH, help="triton: the largest batch the dynamic batcher forms (default 8).")] = None,
    instances: Annotated[Optional[int], typer.Option("--instances", min=1, max=64, help="triton: model instances (default 1).")] = None,
    preferred_batch: Annotated[Optional[str], typer.Option("--preferred-batch", help="triton: batch sizes the batcher prefers, comma-separated (default 4,8).")] = None,
    max_queue_delay_us: Annotated[Optional[int], typer.Option("--max-queue-delay-us", min=0, max=10_000_000, help="triton: how long a request may wait for others to batch with (default 0: never).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="triton: cpu (default) or gpu instances.")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Export a checkpoint (or, for formats that build on one, an artifact); refuses to write a graph whose
    outputs differ from PyTorch. Formats and precisions: `vitseg doctor` lists what this machine has."""
    fmt = get_format(format)
    get_precision(precision)
    # given: set to anything but the unset default (identity: `0 in (None, False)` is True in Python, and --dla-core 0
    # or --max-queue-delay-us 0 are given values)
    given = {k: v for k, v in locals().items() if k in OPTION_GROUPS and v is not None and v is not False}
    _refuse_what_does_not_apply(fmt.name, precision, backend, target or fmt.int8_target, given)
    _check_choices(outputs, calib_method, target, backend, device, cpu_class)
    fmt.require()  # a missing backend says so before any other work
    request = ExportRequest(
        format, OnnxExportSettings(precision=precision, opset=opset, image_size=parse_size(image_size) if image_size is not None else None,
                                   dynamic_batch=not fmt.static_by_default if dynamic_batch is None else dynamic_batch,
                                   dynamic_size=dynamic_size, outputs=outputs,
                                   simplify=simplify, fp16_io=fp16_io, fold=not no_fold, parity_data=data,
                                   keep_float=keep_float_names(keep_float)),
        Int8Settings(calib=calib or data, calib_images=calib_images or 32, method=calib_method or "minmax",
                     target=target or fmt.int8_target, heldout=heldout, min_agreement=min_agreement,
                     cpu_class=cpu_class or SAFE_CLASS, allow_float_fallback=allow_float_fallback),
        _engine_settings(workspace, min_shape, opt_shape, max_shape, sparsity, timing_cache, version_compatible, dla_core, weakly_typed,
                         compute_capability),
        check_trt, _triton_settings(name, backend, max_batch_size, instances, preferred_batch, max_queue_delay_us, device))
    _report(fmt, _run_export(fmt, checkpoint, output, request)[1], check_trt, json_output)


def _report(fmt, result, check_trt: bool, json_output: bool) -> None:
    """What `vitseg export` prints about the written artifact (and the TensorRT check, where asked)."""
    path = result.path
    lint = _lint(result, check_trt)
    build = _trt_build(fmt, result) if check_trt and not lint else None
    if json_output:
        print_json({"artifact": str(path), **result.manifest.to_json(),
                    **({"trt_lint": [str(p) for p in lint], "trt_build": build} if check_trt else {})})
    else:
        for line in fmt.summary(path, result.manifest):
            console.print(line, highlight=False, soft_wrap=True, markup=False)
        if check_trt:
            _print_lint(path, lint)
            _print_build(build)
    if isinstance(build, dict) and build.get("error"):
        raise VitsegError(build["error"], "the ONNX artifact itself is valid for onnxruntime; fix the graph before building an engine")


# option -> what it applies to: the int8 precision, a TensorRT engine, a Triton repository, fp16
OPTION_GROUPS = {**dict.fromkeys(("calib", "heldout", "calib_images", "calib_method", "target", "min_agreement",
                                  "allow_float_fallback"), "int8"),
                 "cpu_class": "int8_cpu",
                 **dict.fromkeys(("workspace", "min_shape", "opt_shape", "max_shape", "sparsity", "version_compatible"), "trt"),
                 # one TensorRT edition's own (its `options`: runners/tensorrt_editions.py)
                 **{option: "edition" for e in EDITIONS.values() for option in e.options},
                 **dict.fromkeys(("name", "backend", "max_batch_size", "instances", "preferred_batch",
                                  "max_queue_delay_us", "device"), "triton"),
                 "fp16_io": "fp16"}


def _refuse_what_does_not_apply(fmt: str, precision: str, backend: Optional[str], target: str, given: dict) -> None:
    """An option given for a format or precision it does not apply to is refused, never silently ignored."""
    triton_engine = fmt == "triton" and backend == "tensorrt"
    edition = next((e for e in EDITIONS.values() if e.format == fmt), TENSORRT if triton_engine else None)
    engines = " or ".join(f"--format {e.format}" for e in EDITIONS.values())
    for option, group in OPTION_GROUPS.items():
        applies = {"int8": precision == "int8", "int8_cpu": precision == "int8" and target == "cpu", "trt": edition is not None,
                   "edition": edition is not None and option in edition.options, "triton": fmt == "triton",
                   "fp16": precision == "fp16"}[group]
        if option in given and not applies:
            flag = "--" + option.replace("_", "-")
            owners = [e for e in EDITIONS.values() if option in e.options]
            what = {"int8": "--precision int8", "int8_cpu": "--precision int8 for CPUs (--target cpu)",
                    "trt": f"{engines} (or --format triton --backend tensorrt)",
                    "edition": " or ".join(f"--format {e.format} ({e.display})" for e in owners),
                    "triton": "--format triton", "fp16": "--precision fp16"}[group]
            against = f"--format {fmt} --precision {precision}" + (f" --target {target}" if group == "int8_cpu" else "")
            raise VitsegError(f"{flag} applies to {what} only, not {against}",
                              f"drop {flag}, or export with {what}")


def _check_choices(outputs: str, calib_method: Optional[str], target: Optional[str], backend: Optional[str],
                   device: Optional[str], cpu_class: Optional[str]) -> None:
    """Values with a fixed set of choices, checked before any work."""
    for option, value, choices in (("--outputs", outputs, OUTPUT_CHOICES), ("--calib-method", calib_method, CALIB_METHODS),
                                   ("--target", target, INT8_TARGETS), ("--device", device, ("cpu", "gpu")),
                                   ("--cpu-class", cpu_class, CPU_CLASSES)):
        if value is not None and value not in choices:
            raise VitsegError(f"{option} {value} is unknown", f"use one of: {', '.join(choices)}")
    if backend is not None:
        repository.TRITON_BACKENDS.row(backend)


def _engine_settings(workspace, min_shape, opt_shape, max_shape, sparsity, timing_cache, version_compatible, dla_core,
                     weakly_typed, compute_capability) -> EngineSettings:
    capabilities = () if compute_capability is None else TENSORRT_RTX.check_targets(
        tuple(c.strip() for c in compute_capability.split(",") if c.strip()))
    return EngineSettings(workspace_gb=4.0 if workspace is None else workspace, min_shape=_shape(min_shape, "--min-shape"),
                          opt_shape=_shape(opt_shape, "--opt-shape"), max_shape=_shape(max_shape, "--max-shape"),
                          sparsity=sparsity, timing_cache=timing_cache, version_compatible=version_compatible,
                          dla_core=dla_core, weakly_typed=weakly_typed, compute_capabilities=capabilities)


def _triton_settings(name, backend, max_batch_size, instances, preferred_batch, max_queue_delay_us, device) -> TritonSettings:
    defaults = TritonSettings()
    return TritonSettings(name=name, backend=backend, max_batch_size=max_batch_size or defaults.max_batch_size,
                          instances=instances or defaults.instances,
                          preferred_batch=tuple(parse_ints(preferred_batch, "--preferred-batch")) if preferred_batch is not None
                          else defaults.preferred_batch,
                          max_queue_delay_us=defaults.max_queue_delay_us if max_queue_delay_us is None else max_queue_delay_us,
                          device=device or defaults.device)


def _run_export(fmt, checkpoint: str, output: Optional[Path], request):
    """(artifact path, ExportResult): from an ONNX artifact where the format builds on one, else from the checkpoint.
    The output path and the data specs are checked before any heavy work."""
    check_output = check_output_dir if fmt.directory else check_output_file
    if output is not None:
        check_output(output, "--output")
        spare_export_inputs(fmt, checkpoint, output, request)
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
        path = output or (Path(checkpoint).parent / "triton" if fmt.directory else Path(checkpoint).with_suffix(fmt.suffixes[0]))
        spare_export_inputs(fmt, checkpoint, path, request)
        with status(fmt.name) as update:
            return path, fmt.from_artifact(Path(checkpoint), path, request, lambda m: (update(m), log(f"  {m}")))

    loaded = checkpoints.load_checkpoint(checkpoint)
    for spec, source in sources.items():
        check_labels_fit(source, spec, loaded.meta.config.num_classes)
    path = output or (default_artifact_path(checkpoint, "triton", "repository", "") if fmt.directory else
                      default_artifact_path(checkpoint, loaded.meta.architecture, request.precision, fmt.suffixes[0]))
    check_output(path, "output")
    spare_export_inputs(fmt, checkpoint, path, request)
    with status("export") as update:
        return path, fmt.export(loaded, path, request, lambda m: (update(m), log(f"  {m}")))


def spare_export_inputs(fmt, checkpoint: str, path: Path, request) -> None:
    """Every file the export writes (the artifact, its sidecars and manifest, the ONNX beside an engine) spares
    the checkpoint or artifact it reads and the data folders."""
    written = [path] if fmt.directory else fmt.files(path)
    if fmt.onnx_beside and format_for_path(Path(checkpoint)) is None:
        written += fmt.files(path.with_suffix(".onnx"))
    spare_inputs({"--output": written}, models=[checkpoint],
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


def _print_lint(path: Path, lint: list) -> None:
    if lint:
        for problem in lint:
            console.print(f"  TensorRT: {problem}", soft_wrap=True, highlight=False, markup=False)
        raise VitsegError(f"{path.name} has {len(lint)} TensorRT parser incompatibilities (listed above)",
                          "the ONNX artifact itself is valid for onnxruntime; fix the graph before building an engine")
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
