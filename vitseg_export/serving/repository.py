"""artifact -> Triton model repository: `REPO/NAME/config.pbtxt`, `REPO/NAME/1/<model files>` and vitseg's
record of it (`REPO/NAME/vitseg.json`), written as one directory, all or nothing.

The config is generated from the artifact's metadata: `pixels` in (FP32, or FP16 for an fp16-I/O graph; the
graph normalizes), `logits` and/or `mask` out (the graph argmaxes: no ensemble is needed), `max_batch_size`
within what the artifact accepts (a static-batch artifact is refused; an engine's profile bounds it),
`dynamic_batching` with preferred sizes and a queue delay, an `instance_group`, and vitseg's metadata as
`parameters` (so a client can rebuild the ArtifactInfo: `vitseg verify --server`). Every config is parsed with
Triton's own schema (tritonclient's `ModelConfig`) before anything is written.

Triton backends are a table: the native ones (onnxruntime_onnx, tensorrt_plan, openvino) load the artifact
under Triton's file names; `python` runs vitseg's own torch-free runner (onnxruntime, OpenVINO or TensorRT) in
a Python-backend model (triton_model.py, copied as model.py) for Triton installs without the native backend.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vitseg_export.artifact import ArtifactInfo, ExportManifest, ExportResult, judged_batches, read_manifest
from vitseg_export.compare.judge import ReferenceOutputs, VerdictImages, passed_or_refused, verdict_of
from vitseg_export.errors import BackendMissingError, VitsegError
from vitseg_export.files import atomic_write_directory, json_bytes, sha256_file
from vitseg_export.formats import format_for_path, get_format, read_artifact_info
from vitseg_export.precisions import get_precision
from vitseg_export.progress import Progress, silent
from vitseg_export.runners import runner_for
from vitseg_export.runners.tensorrt_editions import edition_for_format
from vitseg_export.settings import ExportRequest, OnnxExportSettings, TritonSettings
from vitseg_export.tables import Table, lazy_module

model_config_pb2 = lazy_module("tritonclient.grpc.model_config_pb2")  # the [serve] extra: Triton's own schema
text_format = lazy_module("google.protobuf.text_format")

SERVE_HINT = "pip install 'vitseg-export[serve]'"
MODEL_FILE = "model.py"  # what Triton's Python backend loads from a version directory
PYTHON_MODEL_RECORD = "vitseg-python.json"  # which artifact file the Python-backend model runs, on which device
REPOSITORY_RECORD = "vitseg.json"  # vitseg's record of a repository model (the artifact's manifest and more)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class TritonBackend:
    """One way Triton runs a vitseg artifact."""

    name: str
    config: str  # the config.pbtxt line that names it
    formats: tuple[str, ...]  # the artifact formats it runs (vitseg_export.formats)
    file_names: dict[str, str]  # artifact file suffix -> the name Triton expects in the version directory
    python: bool = False  # a Python-backend model that runs vitseg's runner
    description: str = ""
    # the `vitseg export` options that apply with this backend alone (an engine's build options for tensorrt)
    options: tuple[str, ...] = ()


TRITON_BACKENDS: Table[TritonBackend] = Table("--triton-backend {name} is not a Triton backend vitseg writes", "use one of: {names}")
TRITON_BACKENDS.register(TritonBackend("onnxruntime", 'platform: "onnxruntime_onnx"', ("onnx",), {".onnx": "model.onnx"},
                                       description="Triton's ONNX Runtime backend (NGC containers)"))
TRITON_BACKENDS.register(TritonBackend("openvino", 'backend: "openvino"', ("openvino",), {".xml": "model.xml", ".bin": "model.bin"},
                                       description="Triton's OpenVINO backend (NGC containers)"))
TRITON_BACKENDS.register(TritonBackend("tensorrt", 'platform: "tensorrt_plan"', ("trt",), {".engine": "model.plan", ".plan": "model.plan"},
                                       description="Triton's TensorRT backend (NGC containers, Jetson -igpu builds)",
                                       # its build options; a repository carries no golden file
                                       options=tuple(o for o in get_format("trt").options if o != "save_golden")))
# TensorRT-RTX engines: Triton's tensorrt_plan backend loads TensorRT's engines only, so vitseg's runner serves them
TRITON_BACKENDS.register(TritonBackend("python", 'backend: "python"', ("onnx", "openvino", "trt", "trt-rtx"), {}, python=True,
                                       description="Triton's Python backend running vitseg's own runner"))
NATIVE_BACKEND = {"onnx": "onnxruntime", "openvino": "openvino", "trt": "tensorrt", "trt-rtx": "python"}  # format -> default
ARTIFACT_FORMAT = {"onnxruntime": "onnx", "openvino": "openvino", "tensorrt": "trt", "python": "onnx"}  # from a checkpoint


def validate_config(text: str, where: str = "config.pbtxt") -> Any:
    """Parse a config.pbtxt with Triton's own schema; returns the ModelConfig message. VitsegError naming the
    problem for a text Triton would reject; BackendMissingError without tritonclient."""
    try:
        message = model_config_pb2.ModelConfig()
    except ImportError:
        raise BackendMissingError("checking a config.pbtxt against Triton's schema needs tritonclient", SERVE_HINT) from None
    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise VitsegError(f"{where} does not follow Triton's model configuration schema ({e})",
                          "report this as a bug in vitseg") from None


def _dims(info: ArtifactInfo, leading: tuple[int, ...] = ()) -> str:
    h, w = (-1, -1) if info.dynamic_size else info.image_size
    return "[" + ", ".join(str(d) for d in (*leading, h, w)) + "]"


def config_text(name: str, info: ArtifactInfo, backend: TritonBackend, settings: TritonSettings, io_type: str) -> str:
    """The config.pbtxt of a vitseg artifact served by `backend`."""
    outputs = []
    if "logits" in info.outputs:
        outputs.append(f'  {{ name: "logits" data_type: {io_type} dims: {_dims(info, (len(info.class_names),))} }}')
    if "mask" in info.outputs:
        outputs.append(f'  {{ name: "mask" data_type: TYPE_UINT8 dims: {_dims(info)} }}')
    parameters = "\n".join(f"parameters {{ key: {json.dumps(k)} value: {{ string_value: {json.dumps(v)} }} }}"
                           for k, v in sorted(info.metadata_props().items()))
    kind = "KIND_GPU" if settings.device == "gpu" else "KIND_CPU"
    preferred = ", ".join(str(b) for b in settings.preferred_batch)
    return (f"# written by vitseg-export {info.vitseg_version}: {info.architecture} {info.precision} "
            f"({backend.description})\n"
            f'name: "{name}"\n{backend.config}\nmax_batch_size: {settings.max_batch_size}\n'
            f'input [\n  {{ name: "pixels" data_type: {io_type} dims: {_dims(info, (3,))} }}\n]\n'
            f"output [\n" + ",\n".join(outputs) + "\n]\n"
            f"dynamic_batching {{\n  preferred_batch_size: [ {preferred} ]\n"
            f"  max_queue_delay_microseconds: {settings.max_queue_delay_us}\n}}\n"
            f"instance_group [ {{ count: {settings.instances} kind: {kind} }} ]\n"
            f"# vitseg's metadata: what `vitseg verify --server` rebuilds the artifact's description from\n"
            f"{parameters}\n")


def check_settings(settings: TritonSettings, info: ArtifactInfo, artifact: Path) -> None:
    """Refuse (VitsegError, one line) settings the artifact cannot honour or Triton would reject."""
    if settings.name is not None and not NAME.match(settings.name):
        raise VitsegError(f"--triton-name {settings.name!r} is not a Triton model name",
                          "use letters, digits, '_', '-' and '.', starting with a letter or digit")
    if settings.device not in ("cpu", "gpu"):
        raise VitsegError(f"--triton-device {settings.device} is not a Triton instance kind", "use cpu or gpu")
    if not info.dynamic_batch:
        raise VitsegError(f"{artifact.name} has a static batch of 1, and Triton's dynamic batcher sends batches of up to "
                          f"{settings.max_batch_size}", "export it with --dynamic-batch, or pass its checkpoint (vitseg then "
                          "exports it with a dynamic batch)")
    bad = [b for b in settings.preferred_batch if not 1 <= b <= settings.max_batch_size]
    if bad:
        raise VitsegError(f"--triton-preferred-batch {bad[0]} is outside 1..--triton-max-batch {settings.max_batch_size}",
                          "pick preferred sizes the batcher may form")
    if info.profile is not None:
        low, high = info.profile["min"][0], info.profile["max"][0]
        if low != 1:
            raise VitsegError(f"{artifact.name}'s optimization profile starts at batch {low}, and Triton sends batches "
                              "from 1", "rebuild the engine with --min-shape 1x3xHxW")
        if settings.max_batch_size > high:
            raise VitsegError(f"--triton-max-batch {settings.max_batch_size} is over the engine's profile maximum {high}",
                              f"use --triton-max-batch {high}, or rebuild with a larger --max-shape")


def _io_type(manifest: ExportManifest) -> str:
    """TYPE_FP16 for a graph with fp16 inputs and outputs (`--fp16-io`), else TYPE_FP32."""
    return "TYPE_FP16" if (manifest.precision_details or {}).get("io_dtype") == "float16" else "TYPE_FP32"


def _model_files(artifact: Path, backend: TritonBackend, settings: TritonSettings) -> dict[str, bytes]:
    """The version directory's files: the artifact under Triton's names, or (python) the artifact and its
    manifest as they are, the model.py that runs them, and which file and device it runs."""
    fmt = format_for_path(artifact)
    assert fmt is not None
    sources = [p for p in fmt.files(artifact) if p.is_file()]
    if not backend.python:
        return {backend.file_names[p.suffix.lower()]: p.read_bytes() for p in sources if p.suffix.lower() in backend.file_names}
    files = {p.name: p.read_bytes() for p in sources}
    files[MODEL_FILE] = Path(__file__).with_name("triton_model.py").read_bytes()
    files[PYTHON_MODEL_RECORD] = json_bytes({"artifact": artifact.name, "device": "cuda" if settings.device == "gpu" else "cpu"})
    return files


def triton_batches(settings: TritonSettings) -> tuple[int, ...]:
    """The batches Triton's dynamic batcher will form for this model, which its artifact is judged at before the
    repository is written: 1, a middle batch, `max_batch_size` and every preferred batch."""
    return judged_batches(settings.max_batch_size, settings.preferred_batch)


def judge_at_batches(artifact: Path, info: ArtifactInfo, settings: TritonSettings, data: str = "synthetic",
                     num_images: int = 8, progress: Progress = silent, capabilities: list | None = None) -> dict:
    """The artifact at every batch the batcher will form, against itself run alone (batch 1: the shape its export
    verdict against PyTorch covers, recorded in its manifest), by its precision's batch-consistency limits (fp32:
    logits within 1e-3; reduced precisions: masks within the preset's agreement). Returns the record; ParityError
    (nothing written) when a batch differs."""
    precision = get_precision(info.precision)
    limits = precision.consistency()
    shapes = {tuple(info.image_size): triton_batches(settings)}
    images = VerdictImages.load(data, num_images, tuple(info.image_size))  # type: ignore[arg-type]
    batches = list(shapes[tuple(info.image_size)])
    if info.profile is not None:  # an engine runs on its GPU only: where none is, as pending as the engine itself
        why = edition_for_format(info.format).why_not_run_here(capabilities or None)
        if why is not None:
            return {"verdict": "pending", "reason": why, "batches": batches,
                    "verify_on_target": f"vitseg verify --server URL --served-model {settings.name or 'NAME'} -r CHECKPOINT "
                                        f"--concurrency {settings.max_batch_size}"}
    device = "cuda" if info.profile is not None else "cpu"
    progress(f"judging {artifact.name} at the batches Triton will form ({', '.join(map(str, batches))})")
    with ReferenceOutputs(runner_for(artifact, device=device), f"{artifact.name} run alone (batch 1)") as reference:
        verdict = verdict_of(reference, runner_for(artifact, device=device), images, shapes, limits,
                             len(info.class_names), consistency=limits)
    return passed_or_refused(verdict, artifact.name, f"{artifact.name} differs at the batches Triton's batcher will form",
                             "serve batches the artifact is right at (--triton-max-batch), or re-export it",
                             "; no repository was written").to_json()


def repository_from_artifact(artifact: Path, repository: Path, request: ExportRequest,
                             progress: Progress = silent, judged: dict | None = None) -> Any:
    """Write the Triton model of a vitseg artifact (.onnx, .xml, .engine) into `repository`, checked against
    Triton's schema first and judged at every batch the batcher will form (`judged`: the verdict of an artifact
    just exported and judged at those batches). Returns an ExportResult whose manifest describes the repository
    model. Raises VitsegError for an artifact or settings Triton cannot serve, ParityError when a batch differs."""
    info, manifest = read_artifact_info(artifact), read_manifest(artifact)
    settings = request.triton
    backend = TRITON_BACKENDS.row(settings.backend or NATIVE_BACKEND[info.format])
    if info.format not in backend.formats:
        runs = [b.name for b in TRITON_BACKENDS.values() if info.format in b.formats]
        raise VitsegError(f"Triton's {backend.name} backend does not run {info.format} artifacts ({artifact.name})",
                          f"use --triton-backend {' or '.join(runs)}")
    check_settings(settings, info, artifact)
    name = settings.name or f"{info.architecture}-{info.precision}"
    text = config_text(name, info, backend, settings, _io_type(manifest))
    validate_config(text, f"{name}/config.pbtxt")
    parity = judged or {**(manifest.self_parity or {}), "triton_batches": judge_at_batches(
        artifact, info, settings, request.onnx.parity_data,
        request.onnx.verdict_images or get_precision(info.precision).verdict_images, progress,
        manifest.extra.get("compute_capabilities"))}
    progress(f"writing the Triton model {name} ({backend.name} backend) into {repository}")
    version = {f"1/{relative}": data for relative, data in _model_files(artifact, backend, settings).items()}
    record = ExportManifest(
        artifact=name, format="triton", sha256=sha256_file(artifact), size_bytes=sum(len(b) for b in version.values()),
        metadata=info.metadata_json(), self_parity=parity, precision_details=manifest.precision_details,
        extra={"repository": str(repository), "backend": backend.name, "triton": {
            "max_batch_size": settings.max_batch_size, "preferred_batch": list(settings.preferred_batch),
            "max_queue_delay_us": settings.max_queue_delay_us, "instances": settings.instances, "device": settings.device},
            "judged_batches": list(triton_batches(settings)),
            "source_artifact": str(artifact), "source_format": info.format, "source_manifest": manifest.to_json(),
            "files": sorted(["config.pbtxt", *version])})
    atomic_write_directory(repository / name, {**version, REPOSITORY_RECORD: json_bytes(record.to_json()),
                                               "config.pbtxt": text.encode()})
    return ExportResult(repository / name, record)


def check_repository_request(request: ExportRequest, repository: Path) -> None:
    """Every refusal a repository export can make before any work (VitsegError, one line): its name and batches
    (check_settings), the int8 target its backend needs, and --max-batch (a repository's is --triton-max-batch)."""
    settings = request.triton
    backend = TRITON_BACKENDS.row(settings.backend or "onnxruntime")
    fmt = get_format(ARTIFACT_FORMAT[backend.name])
    if request.precision not in fmt.precisions:  # said for the repository, not for the artifact format behind it
        serving = [b for b in TRITON_BACKENDS if request.precision in get_format(ARTIFACT_FORMAT[b]).precisions]
        raise VitsegError(f"--precision {request.precision}: Triton's {backend.name} backend serves {fmt.name} artifacts, "
                          f"which vitseg does not make in {request.precision}",
                          f"use --triton-backend {' or '.join(serving)}" if serving else "pick another --precision")
    if get_precision(request.precision).calibrated and fmt.int8_target != request.int8.target:
        raise VitsegError(f"--precision int8 for Triton's {backend.name} backend needs --target {fmt.int8_target}",
                          f"add --target {fmt.int8_target} (or pick another --triton-backend)")
    if request.onnx.max_batch != OnnxExportSettings.max_batch:
        raise VitsegError("--max-batch: a Triton repository's largest batch is --triton-max-batch", "use --triton-max-batch")
    if settings.name is not None and not NAME.match(settings.name):
        raise VitsegError(f"--triton-name {settings.name!r} is not a Triton model name",
                          "use letters, digits, '_', '-' and '.', starting with a letter or digit")
    bad = [b for b in settings.preferred_batch if not 1 <= b <= settings.max_batch_size]
    if bad:
        raise VitsegError(f"--triton-preferred-batch {bad[0]} is outside 1..--triton-max-batch {settings.max_batch_size}",
                          "pick preferred sizes the batcher may form")


def plan_repository(plan: Any) -> None:
    """The triton format's planning check (formats.py `plan`): check_repository_request."""
    check_repository_request(plan.request, plan.output)


def export_repository(source: Any, repository: Path, request: ExportRequest, progress: Progress) -> Any:
    """The triton format's exporter from a checkpoint: the artifact its backend runs, exported with a dynamic
    batch and judged against PyTorch at every batch Triton's batcher will form (1, a middle batch, the largest,
    the preferred ones) in a temp directory, then its repository model, written only after that verdict."""
    check_repository_request(request, repository)
    settings = request.triton
    backend = TRITON_BACKENDS.row(settings.backend or "onnxruntime")
    fmt = get_format(ARTIFACT_FORMAT[backend.name])
    fmt.require()
    served = replace(request, onnx=replace(request.onnx, dynamic_batch=True, max_batch=settings.max_batch_size,
                                           judge_batches=tuple(settings.preferred_batch)))
    with tempfile.TemporaryDirectory(prefix="vitseg-triton-") as tmp:
        artifact = Path(tmp) / f"{source.meta.architecture}-{request.precision}{fmt.suffixes[0]}"
        exported = fmt.export(source, artifact, served, progress)
        return repository_from_artifact(artifact, repository, replace(request, triton=replace(settings, backend=backend.name)),
                                        progress, judged=exported.manifest.self_parity)


def repository_summary(path: Path, manifest: ExportManifest) -> list[str]:
    """What `vitseg export --format triton` prints."""
    x = manifest.extra
    t = x["triton"]
    lines = [f"wrote the Triton model {path} ({x['backend']} backend, max batch {t['max_batch_size']}, preferred "
             f"{t['preferred_batch']}, queue delay {t['max_queue_delay_us']} us, {t['instances']} x {t['device']}): "
             + ", ".join(x["files"]), "config.pbtxt checked against Triton's schema (tritonclient ModelConfig)"]
    parity = manifest.self_parity
    if parity and parity.get("pixel_agreement") is not None:
        lines.append(f"the artifact it serves matched PyTorch on {parity['images']} images ({parity.get('pixels', 0):,} "
                     f"pixels): agreement {parity['pixel_agreement'] * 100:.4f}%, judged at batches "
                     f"{', '.join(map(str, x.get('judged_batches', [])))}")
    if x["backend"] != "python":
        lines.append(f"serve it with Triton's {x['backend']} backend (the NGC tritonserver container); here "
                     "`vitseg serve` runs Python-backend models (export with --triton-backend python)")
    return lines


def read_repository_info(model_dir: Path) -> ArtifactInfo:
    """The vitseg metadata of a repository model directory (its vitseg.json)."""
    record = model_dir / REPOSITORY_RECORD
    if not record.is_file():
        raise VitsegError(f"{model_dir} has no {REPOSITORY_RECORD}: it is not a model vitseg wrote",
                          "write it with `vitseg export --format triton`")
    manifest = read_manifest(record.with_suffix(""))  # read_manifest reads PATH.json
    return ArtifactInfo.from_metadata(model_dir, "triton", {f"vitseg.{k}": json.dumps(v) for k, v in manifest.metadata.items()})


__all__ = ["TRITON_BACKENDS", "TritonBackend", "check_settings", "config_text", "export_repository",
           "read_repository_info", "repository_from_artifact", "repository_summary", "validate_config"]
