"""What an exported artifact says about itself: its embedded metadata (ArtifactInfo) and its manifest
(ExportManifest), and the shapes it declares. A leaf of the import graph.

Torch-free on purpose: `vitseg predict` on an artifact runs from this metadata alone on devices that
have only numpy, Pillow and a runtime. Reading metadata never builds an inference session: ONNX
metadata is read straight from the file's protobuf (only the top-level fields, skipping the graph); which
reader an artifact needs is the format table's business (vitseg_export/formats.py, `read_artifact_info`).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vitseg_export import fields
from vitseg_export.errors import VitsegError
from vitseg_export.files import atomic_write_group, check_readable_file, json_bytes, sha256_file
from vitseg_export.machine.cpu import CPU_CLASSES

META_PREFIX = "vitseg."
MIN_INPUT_SIDE = 32  # the smallest height or width vitseg exports or runs a dynamic-size model at
# The largest model input vitseg accepts (export, profile, training sizes): past it a single image's logits and
# activations take tens of GB, so such a size is refused before anything is allocated.
MAX_INPUT_SIDE = 16384
MAX_INPUT_PIXELS = 8192 * 8192
# The largest batch a dynamic-batch artifact declares it serves when nothing bounds it (an ONNX graph or IR with a
# free batch dimension): recorded in its metadata (`max_batch`), raised with `vitseg export --max-batch`. An engine's
# profile and a Triton repository's max_batch_size state their own.
DEFAULT_MAX_BATCH = 8


def judged_batches(largest: int, also: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The batch sizes an artifact that serves batches up to `largest` is judged at: alone, a middle batch and the
    largest (where batch-dependent bugs show: NVIDIA/TensorRT #4853, a batcher forms exactly those), and `also`
    (a Triton repository's preferred batches)."""
    return tuple(sorted({1, max(1, min(largest, max(2, largest // 2))), largest, *also}))


def alternate_size(size: tuple[int, int]) -> tuple[int, int]:
    """The second size a dynamic-size artifact is judged at: three quarters of its own, made odd in both
    directions (an odd size exercises the padding and rounding of strided convolutions and resizes)."""
    return (max(MIN_INPUT_SIDE, (3 * size[0]) // 4 | 1), max(MIN_INPUT_SIDE + 1, (3 * size[1]) // 4 + 3 | 1))


# The embedded metadata, each field with its check (vitseg_export.fields: the one validator).
ARTIFACT_FIELDS = [
    fields.Field("architecture", fields.is_text, "a name"),
    fields.Field("class_names", fields.names_list, "a list of class names"),
    fields.Field("image_size", fields.size_pair(1, MAX_INPUT_SIDE), f"[height, width] in 1..{MAX_INPUT_SIDE}"),
    fields.Field("normalization", fields.is_normalization, "{mean: [3 numbers], std: [3 positive numbers]}"),
    fields.Field("precision", fields.is_text, "a precision name"),
    fields.Field("opset", lambda v: fields.is_int(v, 0, 64), "an opset number", 0),
    fields.Field("outputs", lambda v: isinstance(v, list) and bool(v) and set(v) <= {"logits", "mask"},
                 "a list of logits and/or mask"),
    fields.Field("dynamic_batch", lambda v: isinstance(v, bool), "true or false", False),
    fields.Field("dynamic_size", lambda v: isinstance(v, bool), "true or false", False),
    fields.Field("source_sha256", fields.is_text, "a hex digest", ""),
    fields.Field("vitseg_version", fields.is_text, "a version", "unknown"),
    fields.Field("family", fields.is_text, "a family name", ""),
    fields.Field("source_checkpoint", fields.is_text, "a path", ""),
    fields.Field("cpu_class", lambda v: v in ("", *CPU_CLASSES), f"one of {', '.join(CPU_CLASSES)}", ""),
    # the largest batch a dynamic-batch artifact was judged at and declares it serves (0: not recorded, an artifact
    # of an earlier vitseg: DEFAULT_MAX_BATCH)
    fields.Field("max_batch", lambda v: fields.is_int(v, 0, 1 << 16), "a batch size", 0),
]


@dataclass
class ArtifactInfo:
    """The vitseg metadata every artifact carries: written by the exporters, read by every runner."""

    path: Path
    format: str  # a row of the format table: "onnx", "trt", ...
    architecture: str
    class_names: list[str]
    image_size: tuple[int, int]  # (H, W) the artifact was exported for (its opt size when dynamic)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    precision: str
    opset: int | None
    outputs: list[str]
    dynamic_batch: bool
    dynamic_size: bool
    source_sha256: str | None
    vitseg_version: str
    family: str = ""
    source_checkpoint: str = ""
    extra: dict = field(default_factory=dict)
    profile: dict | None = None  # a TensorRT engine's optimization profile: {"min"|"opt"|"max": [N, 3, H, W]}
    cpu_class: str = ""  # the CPU class an int8 CPU artifact's arithmetic is made for (vitseg_export.machine.cpu), else ""
    max_batch: int = 0  # the largest batch it declares it serves (dynamic batch; 0: DEFAULT_MAX_BATCH)

    @property
    def largest_batch(self) -> int:
        """The largest batch it is judged at and declared to serve: its profile's maximum (an engine), its
        recorded `max_batch`, DEFAULT_MAX_BATCH for a dynamic batch that records none, 1 for a static batch."""
        if self.profile is not None:
            return int(self.profile["max"][0])
        if not self.dynamic_batch:
            return 1
        return self.max_batch or DEFAULT_MAX_BATCH

    def declared_shapes(self, batch_sizes: tuple[int, ...] | None = None,
                        sizes: list[tuple[int, int]] | None = None) -> dict[tuple[int, int], tuple[int, ...]]:
        """Every shape the artifact will be run at, as {(H, W): batch sizes}, the metadata size first.

        Static: its own batch and size. Dynamic batch: `batch_sizes` (default `judged_batches` of its largest
        batch: 1, 4 and 8 unless it records another `max_batch`). Dynamic size: the metadata size (the largest it
        was exported for) and `sizes` (default one smaller, odd `alternate_size`), each at every batch size. A
        TensorRT engine: its profile's min, opt, a middle and max batch at the opt size, and its min and max size at
        the opt batch. Asked shapes the artifact does not accept raise VitsegError naming them."""
        if self.profile is not None:
            return self._profile_shapes(batch_sizes, sizes)
        own = tuple(self.image_size)
        if batch_sizes is not None and not self.dynamic_batch and set(batch_sizes) != {1}:
            raise VitsegError(f"{self.path.name} has a static batch of 1: it cannot run batch "
                              f"{max(batch_sizes)}", "drop --batch-sizes, or export with --dynamic-batch")
        batches = tuple(sorted(set(batch_sizes or judged_batches(self.largest_batch))))
        if sizes is not None and not self.dynamic_size and any(tuple(s) != own for s in sizes):
            raise VitsegError(f"{self.path.name} takes {own[0]}x{own[1]} input only (a static size)",
                              "drop --sizes, or export with --dynamic-size")
        others = [tuple(s) for s in (sizes if sizes is not None else [alternate_size(own)] if self.dynamic_size else [])]
        for s in others:
            if min(s) < MIN_INPUT_SIDE:
                raise VitsegError(f"size {s[0]}x{s[1]} is too small", f"use at least {MIN_INPUT_SIDE}x{MIN_INPUT_SIDE}")
        return {size: batches for size in dict.fromkeys([own, *others])}  # type: ignore[misc]

    def _profile_shapes(self, batch_sizes, sizes) -> dict[tuple[int, int], tuple[int, ...]]:
        assert self.profile is not None
        low, opt, high = (self.profile[k] for k in ("min", "opt", "max"))
        for b in batch_sizes or ():
            if not low[0] <= b <= high[0]:
                raise VitsegError(f"{self.path.name} accepts batch {low[0]}..{high[0]} (its optimization profile), not {b}",
                                  "pick batch sizes inside the profile, or rebuild with --min-shape/--max-shape")
        for s in sizes or ():
            if not (low[2] <= s[0] <= high[2] and low[3] <= s[1] <= high[3]):
                raise VitsegError(f"{self.path.name} accepts {low[2]}x{low[3]} .. {high[2]}x{high[3]} (its optimization "
                                  f"profile), not {s[0]}x{s[1]}", "pick sizes inside the profile")
        opt_size = (opt[2], opt[3])
        shapes = {opt_size: tuple(sorted(set(batch_sizes or (low[0], opt[0], (low[0] + high[0]) // 2, high[0]))))}
        for s in sizes if sizes is not None else [(low[2], low[3]), (high[2], high[3])]:
            shapes[tuple(s)] = tuple(sorted(set(shapes.get(tuple(s), ())) | {opt[0]}))  # type: ignore[index]
        return shapes

    def metadata_json(self) -> dict:
        """The embedded metadata (keys without the `vitseg.` prefix), as the manifest's `metadata`."""
        return {"architecture": self.architecture, "family": self.family, "class_names": list(self.class_names),
                "image_size": list(self.image_size), "normalization": {"mean": list(self.mean), "std": list(self.std)},
                "precision": self.precision, "opset": self.opset, "outputs": list(self.outputs),
                "dynamic_batch": self.dynamic_batch, "dynamic_size": self.dynamic_size,
                "source_checkpoint": self.source_checkpoint, "source_sha256": self.source_sha256 or "",
                "vitseg_version": self.vitseg_version, **({"cpu_class": self.cpu_class} if self.cpu_class else {}),
                **({"max_batch": self.largest_batch} if self.dynamic_batch and self.profile is None else {})}

    def metadata_props(self) -> dict[str, str]:
        """The metadata as `vitseg.KEY` -> JSON text pairs (ONNX metadata_props, OpenVINO rt_info)."""
        return {META_PREFIX + k: json.dumps(v, allow_nan=False) for k, v in self.metadata_json().items()}

    @classmethod
    def from_metadata(cls, path: Path, fmt: str, meta: dict[str, str]) -> "ArtifactInfo":
        """Parse `vitseg.KEY` -> JSON text pairs; VitsegError when a required key is missing or invalid."""
        if META_PREFIX + "image_size" not in meta and META_PREFIX + "input_size" in meta:
            meta = {**meta, META_PREFIX + "image_size": meta[META_PREFIX + "input_size"]}  # its name in artifacts of earlier vitseg versions
        parsed = {}
        for key in (f.key for f in ARTIFACT_FIELDS if META_PREFIX + f.key in meta):  # others may be plain text
            try:
                parsed[key] = json.loads(meta[META_PREFIX + key])
            except json.JSONDecodeError:
                raise VitsegError(f"{path}: vitseg metadata '{key}' is not valid JSON", "re-export the artifact") from None
        v = fields.read_fields(parsed, ARTIFACT_FIELDS, f"{path}: vitseg metadata",
                               "the artifact's metadata is damaged; re-export it with `vitseg export`",
                               missing_hint="it was not exported by vitseg; re-export it with `vitseg export`")
        return cls(
            path=path, format=fmt, architecture=v["architecture"], class_names=v["class_names"],
            image_size=tuple(v["image_size"]), mean=tuple(v["normalization"]["mean"]),
            std=tuple(v["normalization"]["std"]), precision=v["precision"], opset=v["opset"] or None,
            outputs=v["outputs"], dynamic_batch=v["dynamic_batch"], dynamic_size=v["dynamic_size"],
            source_sha256=v["source_sha256"] or None, vitseg_version=v["vitseg_version"], family=v["family"],
            source_checkpoint=v["source_checkpoint"], cpu_class=v["cpu_class"], max_batch=v["max_batch"],
            extra={k[len(META_PREFIX):]: v for k, v in meta.items() if k.startswith(META_PREFIX)},
        )


@dataclass
class ExportManifest:
    """The `<artifact>.json` sidecar. JSON form: the fields below (those that are None left out), the
    precision section under the precision's own name, and `extra` (format-specific keys) spread in."""

    artifact: str
    format: str
    sha256: str
    size_bytes: int
    metadata: dict
    export_settings: dict | None = None
    self_parity: dict | None = None
    rewrites: list[str] | None = None
    fp32_graph_parity: dict | None = None
    precision_details: dict | None = None
    export_seconds: float | None = None
    random_weights: bool | None = None
    source: dict | None = None  # the weights it came from: LoadedCheckpoint.source_record() (a Hub id's commit, sha256s)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The manifest as written to disk."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key == "precision_details" and value is not None:
                out[self.metadata["precision"]] = value
            elif key != "extra" and value is not None:
                out[key] = value
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: dict) -> "ExportManifest":
        """Parse a manifest written by `to_json`."""
        known = {"artifact", "format", "sha256", "size_bytes", "metadata", "export_settings", "self_parity", "rewrites",
                 "fp32_graph_parity", "export_seconds", "random_weights", "source"}
        precision = data.get("metadata", {}).get("precision")
        extra = {k: v for k, v in data.items() if k not in known and k != precision}
        return cls(**{k: v for k, v in data.items() if k in known}, precision_details=data.get(precision), extra=extra)


@dataclass
class ExportResult:
    """What every exporter returns: where the artifact is, its manifest, and (ONNX graphs) the graph itself."""

    path: Path
    manifest: ExportManifest
    model_proto: Any = field(repr=False, default=None)  # onnx.ModelProto where the format is a graph


@dataclass
class ArtifactGroup:
    """Every file of an artifact, its manifest last, held in memory until the verdict allows writing them all."""

    path: Path
    manifest: ExportManifest
    files: dict[Path, bytes] = field(default_factory=dict)  # besides the manifest
    model_proto: Any = None  # the ONNX graph, where the format is one

    def all_files(self) -> dict[Path, bytes]:
        """The files and the manifest (last), as written."""
        return {**self.files, manifest_path(self.path): json_bytes(self.manifest.to_json())}

    def result(self) -> ExportResult:
        """What the exporters return."""
        return ExportResult(self.path, self.manifest, self.model_proto)


def write_groups(*groups: ArtifactGroup) -> None:
    """Step 7: write every file of `groups` as one group: all or nothing, existing files untouched on failure."""
    files: dict[Path, bytes] = {}
    for group in groups:
        files.update(group.all_files())
    atomic_write_group(files)


def manifest_path(artifact: Path) -> Path:
    """Where an artifact's manifest lives: beside it, named `<artifact>.json`."""
    return artifact.with_name(artifact.name + ".json")


def write_artifact(path: Path, files: dict[Path, bytes], manifest: ExportManifest) -> None:
    """Write an artifact's files and its manifest as one group: all or nothing, manifest last (so a manifest
    never describes a missing or older artifact), existing files untouched on failure."""
    atomic_write_group({**files, manifest_path(path): json_bytes(manifest.to_json())})


def check_artifact_file(path: Path) -> None:
    """VitsegError (one line) unless `path` is an existing regular file (not a directory, FIFO, socket or device)."""
    if not path.exists() and not path.is_symlink():
        raise VitsegError(f"artifact {path} does not exist", "check the path, or export one with `vitseg export`")
    check_readable_file(path, "artifact")


def read_manifest(path: Path) -> ExportManifest:
    """The manifest beside an artifact; VitsegError when it is missing or unreadable."""
    manifest = manifest_path(path)
    if not manifest.exists():
        raise VitsegError(f"{path} has no manifest {manifest.name} beside it", "keep the artifact and its .json together")
    check_readable_file(manifest, "manifest")
    try:
        text = manifest.read_bytes()
    except OSError as e:
        raise VitsegError(f"{manifest} cannot be read ({e.strerror or e})", "check the file and its permissions") from None
    try:
        return ExportManifest.from_json(json.loads(text))
    except (ValueError, TypeError, AttributeError) as e:
        raise VitsegError(f"{manifest} is not a valid vitseg manifest ({e})", "re-export the artifact") from None


def check_manifest_matches(path: Path) -> None:
    """Where an artifact has a manifest beside it, the manifest must be readable and describe this very file
    (its sha256): VitsegError otherwise (an artifact copied over another one's, a manifest of another model).
    An artifact without a manifest is fine where it carries its own metadata (ONNX, OpenVINO IR)."""
    check_artifact_file(path)
    if not manifest_path(path).exists():
        return
    manifest = read_manifest(path)
    if not isinstance(manifest.sha256, str) or sha256_file(path) != manifest.sha256:
        size, recorded = path.stat().st_size, manifest.size_bytes
        # a single-file artifact's manifest records its size (an IR's counts the .bin too): a shorter file was cut
        cut = isinstance(recorded, int) and "bin" not in manifest.extra and size < recorded
        why = f"its sha256 differs; the file is {size:,} bytes, the manifest records {recorded:,}: truncated" if cut else "its sha256 differs"
        raise VitsegError(f"{manifest_path(path).name} describes another file than {path.name} ({why})",
                          "copy the artifact again" + (" (it is incomplete)" if cut else "")
                          + ", keep it and its manifest together, or export it again")


def read_onnx_info(path: Path) -> ArtifactInfo:
    """The vitseg metadata of an ONNX artifact, from the file's protobuf (no onnx, no inference session)."""
    return ArtifactInfo.from_metadata(path, "onnx", read_onnx_metadata(path))


def read_manifest_info(path: Path) -> ArtifactInfo:
    """The vitseg metadata of an artifact that keeps it in its manifest only (a TensorRT engine), with the
    engine's optimization profile (the shapes it is judged at)."""
    manifest = read_manifest(path)
    info = ArtifactInfo.from_metadata(path, manifest.format,
                                      {META_PREFIX + k: json.dumps(v) for k, v in manifest.metadata.items()})
    info.profile = manifest.extra.get("profile")
    return info


# ---- ONNX metadata without onnx or an inference session ------------------------------------------------
# ModelProto's top-level fields are read with the protobuf wire format and the graph (field 7) skipped
# by its length, so reading the metadata of a 300 MB model costs a few seeks. Field numbers from onnx.proto:
# ir_version 1, graph 7, metadata_props 14 (StringStringEntryProto: key 1, value 2).

def _varint(f: io.BufferedIOBase | io.BytesIO) -> int | None:
    shift = result = 0
    while True:
        byte = f.read(1)
        if not byte:
            return None if shift == 0 else -1
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            return -1


def _fields(f: io.BufferedIOBase | io.BytesIO, size: int, keep: set[int]):
    """(field number, wire type, payload bytes of the `keep` fields else None) of one message, skipping
    the rest; ValueError if malformed."""
    while f.tell() < size:
        key = _varint(f)
        if key is None or key < 0 or key >> 3 == 0:
            raise ValueError("bad field key")
        number, wire = key >> 3, key & 7
        if wire == 0:
            if _varint(f) in (None, -1):
                raise ValueError("bad varint")
            yield number, wire, None
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, 1)
            yield number, wire, None
        elif wire == 2:
            length = _varint(f)
            if length is None or length < 0 or f.tell() + length > size:
                raise ValueError("length beyond the end of the data")
            payload = f.read(length) if number in keep else None
            if payload is None:
                f.seek(length, 1)
            yield number, wire, payload
        else:
            raise ValueError(f"wire type {wire}")


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """metadata_props of an ONNX model file; VitsegError when the file is not a (complete) ONNX model."""
    check_artifact_file(path)
    props: dict[str, str] = {}
    seen: set[int] = set()
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            for number, _, payload in _fields(f, size, {14}):
                seen.add(number)
                if number == 14 and payload is not None:
                    entry = {n: p for n, _, p in _fields(io.BytesIO(payload), len(payload), {1, 2})}
                    props[(entry.get(1) or b"").decode()] = (entry.get(2) or b"").decode()
    except OSError as e:  # permission denied, I/O error: the file may be fine
        raise VitsegError(f"{path} cannot be read ({e.strerror or e})", "check the file and its permissions") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise VitsegError(f"{path} is not a loadable ONNX model ({e})", "the file is damaged or truncated; export it again") from None
    if not {1, 7} <= seen:
        raise VitsegError(f"{path} is not a loadable ONNX model (no IR version or graph)",
                          "the file is damaged or truncated; export it again")
    return props


def check_manifest_agrees(info: ArtifactInfo, manifest: ExportManifest) -> None:
    """An artifact's manifest must say what the artifact's own embedded metadata says (an ONNX graph's or OpenVINO
    IR's): precision, input size, class names, architecture and the source checkpoint (its path and sha256, in the
    metadata and in the `source` record). VitsegError (exit 2) naming the first field that differs and both values:
    an edited or swapped manifest would make vitseg judge against, or report, what the artifact is not. A field a
    manifest of an earlier vitseg lacks is not compared. (An engine keeps its metadata in the manifest only, so
    there is nothing embedded to disagree with beyond the manifest's own `source` record.)"""
    metadata = manifest.metadata if isinstance(manifest.metadata, dict) else {}
    source = manifest.source if isinstance(manifest.source, dict) else {}
    image_size = metadata.get("image_size", metadata.get("input_size"))
    pairs = [
        ("metadata.precision", metadata.get("precision"), info.precision),
        ("metadata.image_size", image_size, list(info.image_size)),
        ("metadata.class_names", metadata.get("class_names"), list(info.class_names)),
        ("metadata.architecture", metadata.get("architecture"), info.architecture),
        ("metadata.source_checkpoint", metadata.get("source_checkpoint"), info.source_checkpoint),
        ("metadata.source_sha256", metadata.get("source_sha256"), info.source_sha256 or ""),
        ("source.checkpoint", source.get("checkpoint"), info.source_checkpoint),
        ("source.sha256", source.get("sha256"), info.source_sha256 or ""),
    ]
    name = manifest_path(info.path).name
    for key, recorded, embedded in pairs:
        if key.endswith("sha256") and recorded is not None:
            recorded = recorded or ""  # "" and null both mean none (random weights)
        if recorded is not None and recorded != embedded:
            raise VitsegError(f"{name} disagrees with {info.path.name} on {key}: the manifest says "
                              f"{json.dumps(recorded)}, the artifact's own metadata {json.dumps(embedded)}",
                              "re-export the artifact, or restore the manifest it was written with")
