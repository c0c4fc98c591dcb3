"""Golden files: a verdict's images and the PyTorch reference's outputs on them, so an artifact is judged where it
runs without PyTorch or the checkpoint (a Jetson, a Raspberry Pi, a CI job): `vitseg verify ARTIFACT --golden FILE`.

Format (`NAME.golden`, version 1): a safetensors file (a well-kept container: a JSON header, raw little-endian
tensors, no code) whose metadata holds `format` ("vitseg-golden"), `version` and `golden` (JSON: what it was made
for and how; docs/reference/manifest-and-report.md "Golden files"), with tensors per input size `HxW`:

- `pixels/HxW`  uint8 (N, 3, H, W): the real held-out images exactly as judged (x / 255 is the model input)
- `logits/HxW`  (N, C, H, W): the reference's logits, float32 where the precision's preset limits logits tightly
  (fp32: 1e-3), else float16 (its rounding, under 0.03 for |logit| < 64, is far inside those presets' limits)
- `masks/HxW`   uint8 or uint16 (N, H, W): the reference's own masks (argmax of its float32 logits)
- `noise/HxW`, `noise_logits/HxW`, `noise_masks/HxW`: noise images (finiteness and ranges), where judged

The header records every tensor's sha256: a file edited after it was made is refused (exit 2), as is one made for
another checkpoint, other classes or shapes the artifact does not take.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitseg_export import __version__
from vitseg_export.artifact import ArtifactInfo
from vitseg_export.compare.comparator import RecordedOutputs, record
from vitseg_export.compare.inputs import InputImage, InputSet, Size
from vitseg_export.compare.judge import VerdictImages
from vitseg_export.errors import VitsegError
from vitseg_export.files import atomic_write_bytes, check_readable_file
from vitseg_export.precisions import Thresholds, thresholds_dict
from vitseg_export.tables import lazy_module

safetensors_numpy = lazy_module("safetensors.numpy")

FORMAT, VERSION = "vitseg-golden", 1
SUFFIX = ".golden"
REMAKE = "make one for this artifact: vitseg verify ARTIFACT -r CHECKPOINT --save-golden, or vitseg export --save-golden"


# logits kept in float16 move by up to 0.03 (|logit| < 64): fine for logit limits of 0.1 and more (fp16's 0.5, int8's
# none), not for fp32's 1e-3, whose golden files keep float32
COARSEST_LIMIT_FOR_FLOAT16 = 0.1


def logits_dtype(logit_limit: float | None) -> str:
    """The dtype a golden file keeps logits in for a preset whose max |logit diff| limit is `logit_limit`."""
    return "float32" if logit_limit is not None and logit_limit < COARSEST_LIMIT_FOR_FLOAT16 else "float16"


def golden_path(artifact: Path) -> Path:
    """Where an artifact's golden file lives by default: beside it, `<artifact>.golden`."""
    return artifact.with_name(artifact.name + SUFFIX)


def eight_bit(pixels: np.ndarray) -> np.ndarray:
    """Model-input pixels in [0, 1] as the uint8 a golden file stores (x / 255 gives them back exactly)."""
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def _key(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@dataclass
class Golden:
    """A golden file in memory: its header and tensors."""

    header: dict
    tensors: dict[str, np.ndarray]

    def sizes(self) -> list[Size]:
        """The input sizes it holds, the artifact's own first."""
        return [tuple(s["size"]) for s in self.header["shapes"]]  # type: ignore[misc]

    def shapes(self) -> dict[Size, tuple[int, ...]]:
        """{(H, W): batch sizes} the reference was recorded for, which the artifact is judged at."""
        return {tuple(s["size"]): tuple(s["batches"]) for s in self.header["shapes"]}  # type: ignore[misc]

    def images(self) -> VerdictImages:
        """The judged images at their first size (the judge resizes nothing: every size is stored)."""
        return VerdictImages(self.header["images"]["data"], self._set("pixels", "real"), self._set("noise", "noise"))

    def _set(self, kind: str, tag: str) -> InputSet | None:
        first = self.sizes()[0]
        if f"{kind}/{_key(first)}" not in self.tensors:
            return None
        names = self.header["images"]["names" if kind == "pixels" else "noise_names"]
        source = f"golden:{self.header['images']['source']}" + ("" if kind == "pixels" else " noise")
        images = [InputImage(name, pixels.astype(np.float32) / 255.0) for name, pixels in
                  zip(names, self.tensors[f"{kind}/{_key(first)}"])]
        return GoldenInputs(source, images, sizes={size: self.tensors[f"{kind}/{_key(size)}"] for size in self.sizes()},
                            tag=tag)

    def reference(self) -> "GoldenReference":
        """The recorded reference, served to the judge like a live one."""
        return GoldenReference(self)


class GoldenInputs(InputSet):
    """A golden file's images: at another size they are the stored pixels of that size (no resize: exactly what the
    reference saw there)."""

    def __init__(self, source: str, images: list[InputImage], sizes: dict, tag: str):
        super().__init__(source, images)
        self.stored, self.tag = sizes, tag

    def at_shapes(self, shapes) -> InputSet:
        images = []
        for size in shapes:
            stored = self.stored.get(tuple(size))
            if stored is None:
                raise VitsegError(f"the golden file holds no images at {size[0]}x{size[1]}", REMAKE)
            images += [InputImage(im.name, pixels.astype(np.float32) / 255.0) for im, pixels in zip(self.images, stored)]
        return InputSet(self.source, images, next(iter(shapes.values())), dict(shapes))


class GoldenReference:
    """The reference outputs a golden file recorded, as the judge takes a reference (compare/judge.py)."""

    def __init__(self, golden: Golden):
        self.golden = golden
        header = golden.header
        self.name = f"PyTorch fp32 ({header['checkpoint']['source']}), recorded in a golden file"
        self.seconds, self.runs = 0.0, 0

    def __enter__(self) -> "GoldenReference":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release."""

    def seconds_per_image(self) -> float:
        """0.0: nothing runs."""
        return 0.0

    def outputs(self, inputs: InputSet) -> RecordedOutputs:
        """The recorded logits and masks of every image of `inputs` (by name and size)."""
        noise = inputs.source.endswith(" noise")
        logits_kind, masks_kind = ("noise_logits", "noise_masks") if noise else ("logits", "masks")
        names = self.golden.header["images"]["noise_names" if noise else "names"]
        index = {name: i for i, name in enumerate(names)}
        logits, masks = [], []
        for im in inputs.images:
            key = _key(im.size)
            logits.append(self.golden.tensors[f"{logits_kind}/{key}"][index[im.name]])
            masks.append(self.golden.tensors[f"{masks_kind}/{key}"][index[im.name]])
        return RecordedOutputs(logits, masks=masks)


def golden_header(info: ArtifactInfo, artifact: str, artifact_sha256: str, checkpoint: str, checkpoint_sha256: str | None,
                  thresholds: Thresholds) -> dict:
    """What a golden file records about what it is for: the artifact and checkpoint (sha256), the model's classes and
    size, the precision and the preset it was made under."""
    return {"vitseg_version": __version__, "architecture": info.architecture, "class_names": list(info.class_names),
            "image_size": list(info.image_size), "precision": info.precision, "thresholds": thresholds_dict(thresholds),
            "checkpoint": {"source": str(checkpoint), "sha256": checkpoint_sha256 or ""},
            "artifact": {"name": artifact, "sha256": artifact_sha256}}


def record_golden(images: VerdictImages, reference, shapes: dict[Size, tuple[int, ...]], header: dict,
                  logits_dtype: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and tensors of a golden file: `images` (eight_bit) and `reference`'s outputs on them (recorded
    outputs, or run here where they were too large to keep) at every size of `shapes`, logits in `logits_dtype`,
    the reference's masks from its float32 logits. `header`: what it is for (architecture, classes, checkpoint...)."""
    if not images.eight_bit:
        raise ValueError("a golden file stores 8-bit pixels: judge on VerdictImages(eight_bit=True)")
    tensors: dict[str, np.ndarray] = {}
    names: dict[str, list[str]] = {}
    for size in shapes:
        for kind, inputs in (("", images.real_at({size: (1,)})), ("noise", images.noise_at({size: (1,)}))):
            if inputs is None:
                continue
            out = reference.outputs(inputs)
            logits = np.stack((out if isinstance(out, RecordedOutputs) else record(out, inputs)).logits)
            prefix = f"{kind}_" if kind else ""
            tensors[f"{kind or 'pixels'}/{_key(size)}"] = np.stack([eight_bit(im.pixels) for im in inputs.images])
            tensors[f"{prefix}logits/{_key(size)}"] = logits.astype(logits_dtype)
            tensors[f"{prefix}masks/{_key(size)}"] = logits.argmax(1).astype(np.uint8 if logits.shape[1] <= 256 else np.uint16)
            names[kind or "real"] = [im.name for im in inputs.images]
    header = {**header, "logits_dtype": logits_dtype,
              "shapes": [{"size": list(size), "batches": list(batches)} for size, batches in shapes.items()],
              "images": {**images.record(), "names": names["real"], "noise_names": names.get("noise", [])}}
    return header, tensors


def golden_bytes(header: dict, tensors: dict[str, np.ndarray]) -> bytes:
    """A golden file's bytes: the tensors and a header recording their sha256."""
    header = {**header, "format": FORMAT, "version": VERSION,
              "tensors": {name: {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": _sha(t)}
                          for name, t in sorted(tensors.items())}}
    metadata = {"format": FORMAT, "version": str(VERSION), "golden": json.dumps(header, allow_nan=False)}
    return safetensors_numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)


def write_golden(path: Path, header: dict, tensors: dict[str, np.ndarray]) -> None:
    """Write a golden file atomically."""
    atomic_write_bytes(path, golden_bytes(header, tensors))


def read_golden(path: Path) -> Golden:
    """A golden file, checked whole: its format and version, every tensor against the sha256 its header recorded
    (VitsegError naming the first that differs: the file was edited)."""
    check_readable_file(path, "golden file")
    try:
        data = Path(path).read_bytes()
        tensors = safetensors_numpy.load(data)
        size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + size]).get("__metadata__") or {}
        header = json.loads(metadata.get("golden", "null"))
    except ImportError:
        raise VitsegError("reading a golden file needs safetensors", "pip install safetensors") from None
    except Exception as e:  # safetensors raises its own errors for a damaged file; json its own
        raise VitsegError(f"{path} is not a golden file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                          REMAKE) from None
    if not isinstance(header, dict) or metadata.get("format") != FORMAT:
        raise VitsegError(f"{path} is not a vitseg golden file (no '{FORMAT}' header)", REMAKE)
    if header.get("version") != VERSION:
        raise VitsegError(f"{path} is a golden file of format version {header.get('version')}, this vitseg reads {VERSION}",
                          REMAKE)
    recorded = header.get("tensors", {})
    for name in sorted(set(recorded) | set(tensors)):
        if name not in tensors or name not in recorded or _sha(tensors[name]) != recorded[name]["sha256"]:
            raise VitsegError(f"{path.name} was edited after it was made: tensor {name} does not match the sha256 its "
                              "header records", REMAKE)
    return Golden(header, tensors)


def check_golden_belongs(golden: Golden, info: ArtifactInfo, logit_limit: float | None, path: Path) -> None:
    """Refuse (VitsegError, one line naming the field) a golden file that does not belong to the artifact: another
    checkpoint, architecture, classes or image size, or logits stored too coarsely for the preset's logit limit.
    Shapes the artifact does not take are refused by the judge (ArtifactInfo.declared_shapes)."""
    header = golden.header
    fields = (("checkpoint sha256", header["checkpoint"]["sha256"] or "", info.source_sha256 or ""),
              ("architecture", header["architecture"], info.architecture),
              ("class_names", header["class_names"], list(info.class_names)),
              ("image_size", list(header["image_size"]), list(info.image_size)))
    for name, recorded, artifact in fields:
        if recorded != artifact and (recorded or artifact):
            raise VitsegError(f"{path.name} does not belong to {info.path.name}: its {name} is {json.dumps(recorded)[:80]}, "
                              f"the artifact's {json.dumps(artifact)[:80]}", REMAKE)
    if header["logits_dtype"] != "float32" and logits_dtype(logit_limit) == "float32":
        raise VitsegError(f"{path.name} keeps its logits in float16, too coarse for the {info.precision} preset's logit "
                          f"limit ({logit_limit:g})", REMAKE)


__all__ = ["Golden", "GoldenReference", "check_golden_belongs", "eight_bit", "golden_bytes", "golden_header", "golden_path",
           "logits_dtype", "read_golden", "record_golden", "write_golden"]
