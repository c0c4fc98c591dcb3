"""The one table of artifact formats: name, file suffixes, exporter, the backend that runs it, the
precisions it carries, how to read its metadata and whether this machine can make it. The CLI's
`--format` choices, `vitseg doctor`, the benchmark matrix and artifact reading all go through it; a new
format is one `register_format(...)` row plus its exporter and runner modules.

Torch-free: exporters and probes import their heavy dependencies only when called.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vitseg_export.artifact import META_PREFIX, ArtifactInfo, manifest_path, read_manifest, read_onnx_metadata
from vitseg_export.errors import BackendMissingError
from vitseg_export.tables import Table


@dataclass(frozen=True)
class Availability:
    """Whether something can be used here; `detail` is its version or why not, `hint` how to get it."""

    ok: bool
    detail: str
    hint: str = ""


# (loaded checkpoint, output path, ExportRequest, progress) -> ExportResult
Exporter = Callable[[Any, Path, Any, Callable[[str], None]], Any]


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
    from_onnx: Exporter | None = None  # convert an existing vitseg ONNX artifact instead of a checkpoint
    static_by_default: bool = False  # static batch unless --dynamic-batch is asked for (runtimes that gain from it)
    sidecars: tuple[str, ...] = ()  # suffixes of the files beside an artifact that belong to it (an IR's .bin)
    onnx_beside: bool = False  # exporting a checkpoint also writes the ONNX it was built from beside the artifact

    def files(self, path: Path) -> list[Path]:
        """Every file an artifact at `path` consists of: itself, its sidecars, its manifest."""
        return [path, *(path.with_suffix(s) for s in self.sidecars), manifest_path(path)]

    def require(self) -> None:
        """Raise BackendMissingError (one line, exit 2) when this machine cannot make this format."""
        availability = self.probe()
        if not availability.ok:
            raise BackendMissingError(availability.detail, availability.hint)


FORMATS: Table[Format] = Table("--format {name} is unknown", "use one of: {names}")
# Add a row (`--format` choices, doctor and the benchmark matrix follow) / the row of a name (one-line error).
register_format = FORMATS.register
get_format = FORMATS.row


def format_for_path(path: Path) -> Format | None:
    """The format whose suffix `path` has, or None."""
    suffix = path.suffix.lower()
    return next((f for f in FORMATS.values() if suffix in f.suffixes), None)


def artifact_files(path: Path) -> list[Path]:
    """The files an artifact consists of (itself, sidecars, manifest); [path] for anything that is not one."""
    fmt = format_for_path(Path(path))
    return fmt.files(Path(path)) if fmt is not None else [Path(path)]


def module_version(module: str) -> tuple[str | None, str | None]:
    """(version, None) when `module` imports, else (None, why not)."""
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown"), None
    except Exception as e:  # ImportError, or a broken native library (OSError) for tensorrt
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# ---- ONNX -------------------------------------------------------------------------------------------

def _export_onnx(loaded: Any, output: Path, request: Any, progress: Callable[[str], None]) -> Any:
    from vitseg_export.export.onnx_export import export_onnx

    return export_onnx(loaded, output, request.onnx, progress=progress, int8=request.int8)


def _read_onnx_info(path: Path) -> ArtifactInfo:
    return ArtifactInfo.from_metadata(path, "onnx", read_onnx_metadata(path))


def _probe_onnx_export() -> Availability:
    versions = {m: module_version(m) for m in ("torch", "onnx", "onnxruntime")}
    missing = [f"{m} ({why})" for m, (v, why) in versions.items() if v is None]
    if missing:
        return Availability(False, "missing " + ", ".join(missing), "pip install 'vitseg-export[torch]'")
    return Availability(True, ", ".join(f"{m} {v}" for m, (v, _) in versions.items()))


# ---- TensorRT ---------------------------------------------------------------------------------------

def _export_trt(loaded: Any, output: Path, request: Any, progress: Callable[[str], None]) -> Any:
    from vitseg_export.export.tensorrt_engine import export_engine

    return export_engine(loaded, output, request, progress)


def _read_manifest_info(path: Path) -> ArtifactInfo:
    manifest = read_manifest(path)
    info = ArtifactInfo.from_metadata(path, manifest.format,
                                      {META_PREFIX + k: json.dumps(v) for k, v in manifest.metadata.items()})
    info.profile = manifest.extra.get("profile")  # the engine's optimization profile: the shapes it is judged at
    return info


def _probe_tensorrt() -> Availability:
    from vitseg_export.export.tensorrt_engine import tensorrt_availability

    ok, detail, hint = tensorrt_availability()
    return Availability(ok, detail, hint)


def _engine_from_artifact(onnx_path: Any, output: Path, request: Any, progress: Callable[[str], None]) -> Any:
    from vitseg_export.export.onnx_export import ExportResult
    from vitseg_export.export.tensorrt_engine import check_against_onnx, engine_from_onnx

    def check(engine: Path) -> dict:
        return check_against_onnx(engine, Path(onnx_path), request.onnx.parity_data)

    return ExportResult(output, engine_from_onnx(Path(onnx_path), output, request.engine, progress, check))


def _onnx_summary(path: Path, manifest: Any) -> list[str]:
    from rich.markup import escape

    lines = []
    details, meta, precision = manifest.precision_details or {}, manifest.metadata, manifest.metadata["precision"]
    if precision == "int8":
        share = details["int8_mac_share"]
        lines.append(f"int8 ({details['target']} target): {share * 100:.1f}% of MACs run in int8, "
                     f"{len(details['fallback_layers'])} layers fell back to float"
                     + (" [bold yellow](mostly float: most compute is NOT int8)[/]" if share < 0.5 else ""))
        lines += [f"  float: {escape(row['node'])} ({escape(row['reason'])})" for row in details["fallback_layers"]]
    elif precision == "fp16":
        ops = ", ".join(f"{op} {n}" for op, n in details["fp32_ops"].items()) or "none"
        lines.append(f"fp16 (AutoCast): {len(details['fp32_nodes'])} nodes kept in fp32 ({ops}); I/O {details['io_dtype']}")
    lines.append(f"wrote {escape(str(path))} ({manifest.size_bytes / 1e6:.2f} MB, opset {meta['opset']}, "
                 f"outputs {', '.join(meta['outputs'])}) and {escape(path.name)}.json")
    return lines + _parity_lines(manifest.self_parity)


def _engine_summary(path: Path, manifest: Any) -> list[str]:
    from rich.markup import escape

    x = manifest.extra
    lines = [f"wrote {escape(str(path))} ({manifest.size_bytes / 1e6:.2f} MB, TensorRT {x['tensorrt_version']}, "
             f"{x['gpu']} sm {x['compute_capability']}, {'strongly' if x['strongly_typed'] else 'weakly'} typed) "
             f"and {escape(path.name)}.json"]
    return lines + _parity_lines(manifest.self_parity)


def _parity_lines(parity: dict | None) -> list[str]:
    """What `vitseg export` prints about the self-parity check: the worst case, and the shapes it covered."""
    if not parity:
        return []
    line = f"self-parity vs PyTorch on {parity['images']} inputs: agreement {parity['pixel_agreement'] * 100:.4f}%"
    if parity.get("reference"):
        line = line.replace("vs PyTorch", f"vs {parity['reference']}")
    if parity["max_abs_logit_diff"] is not None:
        line += f", max |logit diff| {parity['max_abs_logit_diff']:.2e}"
    shapes = ", ".join(f"{s['batch']}x{s['height']}x{s['width']}" for s in parity.get("shapes", []))
    consistency = parity.get("batch_consistency") or {}
    if shapes:
        line += f" (worst of shapes {shapes}"
        line += f"; batch consistency {'pass' if consistency.get('passed') else 'FAILED'})" if consistency.get("images_compared") else ")"
    return [line]


# ---- OpenVINO ---------------------------------------------------------------------------------------

def _export_openvino(loaded: Any, output: Path, request: Any, progress: Callable[[str], None]) -> Any:
    from vitseg_export.export.openvino_export import export_openvino

    return export_openvino(loaded, output, request, progress)


def _read_openvino_info(path: Path) -> ArtifactInfo:
    from vitseg_export.runners.openvino_runner import read_openvino_info

    return read_openvino_info(path)


def _probe_openvino() -> Availability:
    versions = {m: module_version(m) for m in ("openvino", "nncf", "torch", "onnx")}
    missing = [m for m, (v, _) in versions.items() if v is None]
    if missing:
        return Availability(False, f"missing {', '.join(missing)}", "pip install 'vitseg-export[torch,openvino]'")
    return Availability(True, ", ".join(f"{m} {v}" for m, (v, _) in versions.items()))


def _openvino_summary(path: Path, manifest: Any) -> list[str]:
    from rich.markup import escape

    details = manifest.precision_details or {}
    lines = []
    if manifest.metadata["precision"] == "int8":
        lines.append(f"int8 (NNCF, accuracy control): {details['int8_mac_share'] * 100:.1f}% of MACs in int8, "
                     f"{len(details['float_layers'])} layers kept in float")
    batch = "dynamic batch" if manifest.metadata["dynamic_batch"] else "static batch 1"
    lines.append(f"wrote {escape(str(path))} + {escape(str(manifest.extra['bin']))} "
                 f"({manifest.size_bytes / 1e6:.2f} MB, {batch}, weights {details.get('weights')}) and {escape(path.name)}.json")
    return lines + _parity_lines(manifest.self_parity)


def _builtin_rows() -> None:
    from vitseg_export.precisions import PRECISIONS

    register_format(Format("onnx", (".onnx",), "ONNX graph (any runtime; ONNX Runtime runs it here)", "onnxruntime",
                           tuple(PRECISIONS), _export_onnx, _read_onnx_info, _probe_onnx_export, _onnx_summary,
                           int8_target="cpu"))
    register_format(Format("trt", (".engine", ".plan"), "TensorRT engine (built from the ONNX graph on the target GPU)",
                           "tensorrt", tuple(PRECISIONS), _export_trt, _read_manifest_info, _probe_tensorrt,
                           _engine_summary, int8_target="trt", from_onnx=_engine_from_artifact, onnx_beside=True))
    register_format(Format("openvino", (".xml",), "OpenVINO IR (Intel CPUs, iGPUs, NPUs)", "openvino",
                           tuple(PRECISIONS), _export_openvino, _read_openvino_info, _probe_openvino, _openvino_summary,
                           static_by_default=True, sidecars=(".bin",)))


_builtin_rows()
