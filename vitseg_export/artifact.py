"""What an exported artifact says about itself, and the preprocessing every backend shares.

Torch-free on purpose: `vitseg predict` on an ONNX artifact runs from this metadata alone on devices
that have only numpy, Pillow and onnxruntime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vitseg_export.errors import VitsegError

META_PREFIX = "vitseg."
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan")


@dataclass
class ArtifactInfo:
    path: Path
    format: str  # "onnx" | "trt"
    architecture: str
    class_names: list[str]
    input_size: tuple[int, int]  # (H, W) the artifact was exported for (its opt size when dynamic)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    precision: str
    opset: int | None
    outputs: list[str]
    dynamic_batch: bool
    dynamic_size: bool
    source_sha256: str | None
    vitseg_version: str
    extra: dict

    @classmethod
    def from_metadata(cls, path: Path, fmt: str, meta: dict[str, str]) -> "ArtifactInfo":
        def get(key: str, default=None):
            value = meta.get(META_PREFIX + key)
            if value is None:
                if default is not None:
                    return default
                raise VitsegError(f"{path} carries no vitseg metadata '{key}'",
                                  "it was not exported by vitseg; re-export it with `vitseg export`")
            return json.loads(value)

        norm = get("normalization")
        return cls(
            path=path, format=fmt, architecture=get("architecture"), class_names=list(get("class_names")),
            input_size=tuple(get("input_size")), mean=tuple(norm["mean"]), std=tuple(norm["std"]),
            precision=get("precision"), opset=get("opset", 0) or None, outputs=list(get("outputs")),
            dynamic_batch=bool(get("dynamic_batch", False)), dynamic_size=bool(get("dynamic_size", False)),
            source_sha256=get("source_sha256", "") or None, vitseg_version=get("vitseg_version", "unknown"),
            extra={k[len(META_PREFIX):]: v for k, v in meta.items() if k.startswith(META_PREFIX)},
        )


def is_artifact(path: str | Path) -> bool:
    return Path(path).suffix.lower() in ONNX_SUFFIXES + ENGINE_SUFFIXES


def read_artifact_info(path: str | Path) -> ArtifactInfo:
    """Metadata of an ONNX artifact (its metadata_props, read through onnxruntime) or of a TensorRT engine
    (its sidecar manifest; the engine file stays a plain plan)."""
    path = Path(path)
    if not path.is_file():
        raise VitsegError(f"artifact {path} does not exist", "check the path, or export one with `vitseg export`")
    if path.suffix.lower() in ENGINE_SUFFIXES:
        manifest = manifest_path(path)
        if not manifest.is_file():
            raise VitsegError(f"{path} has no manifest {manifest.name} beside it", "keep the engine and its .json together")
        data = json.loads(manifest.read_text())
        return ArtifactInfo.from_metadata(path, "trt", {META_PREFIX + k: json.dumps(v) for k, v in data["metadata"].items()})
    if path.suffix.lower() not in ONNX_SUFFIXES:
        raise VitsegError(f"{path} is not an artifact vitseg knows", "expected .onnx, .engine or .plan")
    try:
        import onnxruntime as ort
    except ImportError:
        raise VitsegError("onnxruntime is not installed", "pip install onnxruntime (or onnxruntime-gpu)") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidProtobuf types
        raise VitsegError(f"{path} is not a loadable ONNX model ({str(e).splitlines()[0][:200]})",
                          "the file is damaged or truncated; export it again") from None
    return ArtifactInfo.from_metadata(path, "onnx", dict(session.get_modelmeta().custom_metadata_map))


def manifest_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".json")


# ---- preprocessing: identical for every backend, training included ---------------------------------

def load_rgb(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise VitsegError(f"cannot read image {path} ({e})", "pass JPEG/PNG images") from None


def pixels_from_image(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """RGB PIL image -> float32 (3, H, W) in [0, 1]: bilinear resize (PIL, antialiased) then x / 255.
    The training pipeline resizes PIL images with the same call, so train and deploy see the same pixels."""
    h, w = size
    if image.size != (w, h):
        image = image.resize((w, h), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0)


PALETTE = np.array([[220, 60, 60], [40, 40, 40], [250, 220, 40], [60, 140, 240], [80, 200, 120], [200, 90, 220],
                    [240, 150, 60], [60, 220, 220]], dtype=np.uint8)


def colorize(mask: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours (palette repeats after 8 classes)."""
    return PALETTE[mask.astype(np.int64) % len(PALETTE)]
