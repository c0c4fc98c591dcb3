"""The one table of artifact formats: name, file suffixes, exporter, the backend that runs it, the
precisions it carries, how to read its metadata and whether this machine can make it. The CLI's
`--format` choices, `vitseg doctor`, the benchmark matrix and artifact reading all go through it; a new
format is one `register_format(...)` row plus its exporter and runner modules.

Plain data: a row names its implementations as "module:attr" strings (tables.lazy), imported the first time
they are called, so the table imports nothing it lists and stays torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vitseg_export.artifact import ArtifactInfo, check_artifact_file, manifest_path
from vitseg_export.errors import BackendMissingError, VitsegError
from vitseg_export.machine.probes import Availability
from vitseg_export.precisions import PRECISIONS
from vitseg_export.progress import Progress
from vitseg_export.tables import Table, lazy

# (loaded checkpoint, output path, ExportRequest, progress) -> ExportResult
Exporter = Callable[[Any, Path, Any, Progress], Any]


@dataclass(frozen=True)
class Format:
    name: str
    suffixes: tuple[str, ...]  # the first is what `vitseg export` writes
    description: str
    backend: str  # the runner backend (vitseg_export.runners.BACKENDS) that runs its artifacts
    precisions: tuple[str, ...]
    export: Exporter
    read_info: Callable[[Path], ArtifactInfo]
    probe: Callable[[], Availability]  # can this machine make artifacts of this format?
    summary: Callable[[Path, Any], list[str]]  # what `vitseg export` prints about a written artifact (path, ExportManifest)
    int8_target: str = "cpu"  # the int8 graph flavour its exporter asks for (vitseg_export.export.int8)
    from_artifact: Exporter | None = None  # build from an existing vitseg artifact (of `artifact_sources`) instead
    artifact_sources: tuple[str, ...] = ()  # the formats of the artifacts it builds from
    directory: bool = False  # --output names a directory (a repository) the artifact is written into
    static_by_default: bool = False  # static batch unless --dynamic-batch is asked for (runtimes that gain from it)
    sidecars: tuple[str, ...] = ()  # suffixes of the files beside an artifact that belong to it (an IR's .bin)
    onnx_beside: bool = False  # exporting a checkpoint also writes the ONNX it was built from beside the artifact
    # `vitseg qat`: (loaded checkpoint, output path, ExportRequest, QatSettings, progress, on_step) -> ExportResult
    qat: Callable[..., Any] | None = None
    # the `vitseg export` options (parameter names) that apply to this format alone; given for another, refused
    options: tuple[str, ...] = ()
    # the format's own refusals at planning time, before any work (export/pipeline.py ExportPlan -> None, or
    # VitsegError): an engine's profile shapes and compute capabilities, a Triton repository's batches
    plan: Callable[[Any], None] | None = None
    other_backends: tuple[str, ...] = ()  # backends besides `backend` that run its artifacts (`--backend`)

    def check_backend(self, backend: str, path: Path) -> None:
        """Refuse (VitsegError, one line) a --backend that does not run this format's artifacts: the runtime would
        report the file as unreadable, and the user would look for damage that is not there."""
        if backend not in (self.backend, *self.other_backends):
            runs = " or ".join((self.backend, *self.other_backends))
            raise VitsegError(f"--backend {backend} does not run {self.description.split(' (')[0]}s like {path.name}",
                              f"use --backend {runs}, or drop --backend ({self.backend} is the default)")

    def files(self, path: Path) -> list[Path]:
        """Every file an artifact at `path` consists of: itself, its sidecars, its manifest."""
        return [path, *(path.with_suffix(s) for s in self.sidecars), manifest_path(path)]

    def check_precision(self, precision: str) -> None:
        """Refuse (VitsegError, one line naming where it is offered) a precision this format does not carry."""
        if precision not in self.precisions:
            where, fix = PRECISIONS.row(precision).offered_where or ("", "use one of " + ", ".join(self.precisions))
            raise VitsegError(f"--precision {precision} is not offered for --format {self.name}" + (f": {where}" if where else ""), fix)

    def require(self) -> None:
        """Raise BackendMissingError (one line, exit 2) when this machine cannot make this format."""
        availability = self.probe()
        if not availability.ok:
            raise BackendMissingError(availability.detail, availability.hint)


FORMATS: Table[Format] = Table("--format {name} is unknown", "use one of: {names}")
# Add a row (`--format` choices, doctor and the benchmark matrix follow) / the row of a name (one-line error).
register_format = FORMATS.register
get_format = FORMATS.row


# the precisions every format carries; the others name on their row where they are offered (bf16: OpenVINO IRs and
# TensorRT engines)
EVERY_FORMAT = tuple(name for name, row in PRECISIONS.items() if row.offered_where is None)
# the options every TensorRT edition's build takes, and those of a Triton repository
ENGINE_OPTIONS = ("workspace", "min_shape", "opt_shape", "max_shape", "sparse_weights", "version_compatible")
TRITON_OPTIONS = ("triton_name", "triton_backend", "triton_max_batch", "triton_instances", "triton_preferred_batch",
                  "triton_queue_delay_us", "triton_device")


def format_for_path(path: Path) -> Format | None:
    """The format whose suffix `path` has (the longest that matches: `.rtx.engine` before `.engine`), or None."""
    name = path.name.lower()
    matches = [(len(s), f) for f in FORMATS.values() for s in f.suffixes if name.endswith(s) and len(name) > len(s)]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def is_artifact(path: str | Path) -> bool:
    """Whether the path names a file of a registered artifact format (by suffix)."""
    return format_for_path(Path(path)) is not None


def artifact_files(path: Path) -> list[Path]:
    """The files an artifact consists of (itself, sidecars, manifest); [path] for anything that is not one."""
    fmt = format_for_path(Path(path))
    return fmt.files(Path(path)) if fmt is not None else [Path(path)]


def read_artifact_info(path: str | Path) -> ArtifactInfo:
    """The metadata of an artifact of any registered format, read without building an inference session.
    Raises VitsegError for a missing file, an unknown suffix or missing metadata."""
    path = Path(path)
    check_artifact_file(path)
    fmt = format_for_path(path)
    if fmt is None:
        suffixes = ", ".join(s for fmt in FORMATS.values() for s in fmt.suffixes)
        raise VitsegError(f"{path} is not an artifact vitseg knows", f"expected {suffixes}")
    return fmt.read_info(path)


register_format(Format(
    "onnx", (".onnx",), "ONNX graph (any runtime; ONNX Runtime runs it here)", "onnxruntime", EVERY_FORMAT,
    export=lazy("vitseg_export.export.onnx_export:export_artifact"), read_info=lazy("vitseg_export.artifact:read_onnx_info"),
    probe=lazy("vitseg_export.machine.probes:probe_onnx_export"), summary=lazy("vitseg_export.export.onnx_export:onnx_summary"),
    int8_target="cpu", qat=lazy("vitseg_export.export.qat_onnx:qat_onnx"), options=("save_golden",),
    other_backends=("openvino",)))
register_format(Format(
    "trt", (".engine", ".plan"), "TensorRT engine (built from the ONNX graph on the target GPU)", "tensorrt",
    EVERY_FORMAT + ("bf16",), export=lazy("vitseg_export.export.tensorrt_engine:export_engine"),
    read_info=lazy("vitseg_export.artifact:read_manifest_info"),
    probe=lazy("vitseg_export.runners.tensorrt_runner:probe_tensorrt"),
    summary=lazy("vitseg_export.export.tensorrt_engine:engine_summary"), int8_target="trt",
    from_artifact=lazy("vitseg_export.export.tensorrt_engine:engine_from_artifact"), artifact_sources=("onnx",),
    onnx_beside=True, options=ENGINE_OPTIONS + ("dla_core", "weakly_typed", "timing_cache", "save_golden"),
    plan=lazy("vitseg_export.export.tensorrt_engine:plan_engine")))
register_format(Format(
    "trt-rtx", (".rtx.engine",), "TensorRT-RTX engine (built ahead of time on any machine; runs on RTX GPUs)",
    "tensorrt-rtx", EVERY_FORMAT + ("bf16",), export=lazy("vitseg_export.export.tensorrt_engine:export_rtx_engine"),
    read_info=lazy("vitseg_export.artifact:read_manifest_info"),
    probe=lazy("vitseg_export.runners.tensorrt_runner:probe_rtx_build"),
    summary=lazy("vitseg_export.export.tensorrt_engine:engine_summary"), int8_target="trt",
    from_artifact=lazy("vitseg_export.export.tensorrt_engine:rtx_engine_from_artifact"), artifact_sources=("onnx",),
    onnx_beside=True, options=ENGINE_OPTIONS + ("compute_capability", "save_golden"),
    plan=lazy("vitseg_export.export.tensorrt_engine:plan_engine")))
register_format(Format(
    "openvino", (".xml",), "OpenVINO IR (Intel CPUs, iGPUs, NPUs)", "openvino", tuple(PRECISIONS),
    export=lazy("vitseg_export.export.openvino_export:export_openvino"),
    read_info=lazy("vitseg_export.runners.openvino_runner:read_openvino_info"),
    probe=lazy("vitseg_export.machine.probes:probe_openvino_export"),
    summary=lazy("vitseg_export.export.openvino_export:ir_summary"), static_by_default=True, sidecars=(".bin",),
    plan=lazy("vitseg_export.export.openvino_export:check_ir_plan"), options=("save_golden",),
    qat=lazy("vitseg_export.export.qat_openvino:qat_openvino")))
register_format(Format(
    "triton", (), "Triton Inference Server model repository (config.pbtxt, the artifact, vitseg's record)", "triton",
    tuple(PRECISIONS), export=lazy("vitseg_export.serving.repository:export_repository"),
    read_info=lazy("vitseg_export.serving.repository:read_repository_info"),
    probe=lazy("vitseg_export.machine.probes:probe_triton_repository"),
    summary=lazy("vitseg_export.serving.repository:repository_summary"),
    from_artifact=lazy("vitseg_export.serving.repository:repository_from_artifact"),
    artifact_sources=("onnx", "openvino", "trt"), directory=True, options=TRITON_OPTIONS,
    plan=lazy("vitseg_export.serving.repository:plan_repository")))
