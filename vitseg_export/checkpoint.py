"""Checkpoint -> nn.Module. One entry point, `load_checkpoint(spec)`, accepts:

- a vitseg run directory (`model.safetensors` + `config.json` with "format": "vitseg"), or a
  `.safetensors` file with that `config.json` beside it;
- a Hugging Face directory (`config.json` + `model.safetensors` or `pytorch_model.bin`) of a model type a
  family maps (`ModelFamily.huggingface`: SegFormer), with or without its segmentation head;
- a Hugging Face Hub id (`org/name`, optionally at a revision), resolved by `hub.py` from the local cache first
  and loaded as the Hugging Face directory its snapshot is (recorded: id, commit, files' sha256);
- an architecture name (random weights, with a warning).

Foreign weights (a family's `foreign_formats`: timm ViT, the seed article's own state dicts) come in
through `--init` via `init_from_foreign`. No pickle anywhere: safetensors, or
`torch.load(weights_only=True)`. Family specifics (key names, configs) live in the family modules.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from vitseg_export import __version__, fields, hub
from vitseg_export.artifact import MAX_INPUT_SIDE, MIN_INPUT_SIDE
from vitseg_export.errors import CheckpointError, VitsegError
from vitseg_export.files import atomic_write_group, check_readable_file, json_bytes, sha256_file
from vitseg_export.modeling import registry
from vitseg_export.modeling.registry import PET_CLASSES, Architecture, ModelFamily, Segmenter

FORMAT = "vitseg"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class CheckpointMeta:
    """Everything besides the weights that inference and export need, as written to config.json."""

    architecture: str
    family: str
    config: Any
    class_names: list[str]
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    training: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The config.json form (format "vitseg")."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vitseg_version": __version__,
            "architecture": self.architecture,
            "family": self.family,
            "model_config": registry.config_to_dict(self.config),
            "class_names": list(self.class_names),
            "image_size": list(self.image_size),
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "training": self.training,
        }

    @classmethod
    def from_json(cls, data: dict, where: str) -> "CheckpointMeta":
        """Parse a config.json dict; CheckpointError (naming `where`) when it is not a valid vitseg config."""
        try:
            fields.read_fields(data, CONFIG_FIELDS, where, "the config.json is damaged; re-save the checkpoint with `vitseg train`")
        except VitsegError as e:
            raise CheckpointError(e.message, e.hint) from None
        try:
            family = data["family"]
            norm = data["normalization"]
            meta = cls(
                architecture=data["architecture"],
                family=family,
                config=registry.config_from_dict(family, data["model_config"]),
                class_names=list(data["class_names"]),
                image_size=(data["image_size"][0], data["image_size"][1]),
                mean=tuple(norm["mean"]),
                std=tuple(norm["std"]),
                training=data.get("training", {}),
            )
        except VitsegError as e:
            raise CheckpointError(f"{where}: {e.message}", e.hint) from None
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CheckpointError(f"{where} is not a valid vitseg config ({type(e).__name__}: {e})",
                                  "re-save the checkpoint with `vitseg train` or point at the run directory") from None
        if len(meta.class_names) != meta.config.num_classes:
            raise CheckpointError(f"{where} names {len(meta.class_names)} classes but its model predicts "
                                  f"{meta.config.num_classes}", "fix class_names in config.json to one name per class")
        return meta

    @classmethod
    def for_architecture(cls, arch: Architecture, num_classes: int | None = None,
                         class_names: list[str] | None = None) -> "CheckpointMeta":
        """The meta of `arch` (optionally with another class count / names): Pet class names for 3 classes."""
        config = arch.config if num_classes is None else replace(arch.config, num_classes=num_classes)
        n = config.num_classes
        names = class_names or (list(PET_CLASSES) if n == 3 else [f"class_{i}" for i in range(n)])
        return cls(arch.name, arch.family, config, names, (arch.image_size, arch.image_size), arch.mean, arch.std)


# The config.json fields vitseg reads, each with its check (vitseg_export.fields: the one validator): a damaged config
# is refused, never coerced.
CONFIG_FIELDS = [
    fields.Field("format_version", lambda v: v == FORMAT_VERSION, f"format version {FORMAT_VERSION}", FORMAT_VERSION),
    fields.Field("architecture", fields.is_text, "a name"),
    fields.Field("family", fields.is_text, "a family name"),
    fields.Field("class_names", fields.names_list, "a list of class names"),
    fields.Field("image_size", fields.size_pair(MIN_INPUT_SIDE, MAX_INPUT_SIDE),
                 f"[height, width] in {MIN_INPUT_SIDE}..{MAX_INPUT_SIDE}"),
    fields.Field("normalization", fields.is_normalization, "{mean: [3 numbers], std: [3 positive numbers]}"),
    fields.Field("training", lambda v: isinstance(v, dict), "an object", {}),
]


@dataclass
class LoadedCheckpoint:
    model: nn.Module  # the bare network: normalized input -> logits (H/4 for SegFormer)
    meta: CheckpointMeta
    source: str  # what the user named
    sha256: str | None  # of the weights file; None for random weights
    kind: str  # "vitseg" | "huggingface" | "random"
    hub: dict | None = None  # a Hub id's record (id, revision, commit, files' sha256): HubSnapshot.record()

    def source_record(self) -> dict:
        """What the manifest's `source` says about the weights an artifact came from."""
        return {"checkpoint": self.source, "kind": self.kind, "sha256": self.sha256 or "",
                **({"hub": self.hub} if self.hub else {})}

    def segmenter(self) -> Segmenter:
        """pixels in [0,1] -> logits at input resolution, the graph every backend runs."""
        return Segmenter(self.model, self.meta.mean, self.meta.std)


# ---- reading ------------------------------------------------------------------------------------

def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    check_readable_file(path, "checkpoint file", CheckpointError)
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path} cannot be read (permission denied)", "fix the file's permissions") from None
    try:
        return load_file(str(path))
    except PermissionError:
        raise CheckpointError(f"{path} cannot be read (permission denied)", "fix the file's permissions") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})",
                              "the file is truncated or damaged; copy it again or re-export it") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from .safetensors, or from .bin/.pth/.pt with torch.load(weights_only=True) (no code is
    unpickled). Raises CheckpointError for missing, damaged or non-tensor files."""
    check_readable_file(path, "checkpoint file", CheckpointError)
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path} cannot be read (permission denied)", "fix the file's permissions")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for damaged files
        raise CheckpointError(f"{path} could not be read as weights ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                              "convert it to .safetensors; vitseg never unpickles code") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors", "save model.state_dict() instead")
    return obj


def _load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], where: str, strict_prefixes: tuple[str, ...] = ()) -> list[str]:
    """load_state_dict that reports problems in one line. Keys under `strict_prefixes` may be missing
    (returned), everything else must match exactly in name and shape."""
    own = model.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
                  if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    allowed_missing = [k for k in missing if strict_prefixes and k.startswith(strict_prefixes)]
    missing = [k for k in missing if k not in allowed_missing]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {', '.join(mismatched[:3])}{' ...' if len(mismatched) > 3 else ''}")
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
    if problems:
        raise CheckpointError(f"{where} does not fit the model: {'; '.join(problems)}",
                              "the checkpoint is of another architecture or class count")
    model.load_state_dict(state_dict, strict=False)
    return allowed_missing


def _load_native(config_path: Path, weights_path: Path) -> LoadedCheckpoint:
    meta = CheckpointMeta.from_json(_read_json(config_path), str(config_path))
    if not weights_path.exists():
        raise CheckpointError(f"{weights_path} is missing beside {config_path.name}", "the run directory is incomplete")
    check_readable_file(weights_path, "checkpoint file", CheckpointError)
    model = registry.build_model(meta.family, meta.config)
    _load_into(model, _read_safetensors(weights_path), str(weights_path))
    return LoadedCheckpoint(model.eval(), meta, str(weights_path.parent), sha256_file(weights_path), "vitseg")


def _read_json(path: Path) -> dict:
    check_readable_file(path, "checkpoint file", CheckpointError)
    try:
        text = path.read_bytes()
    except OSError as e:  # permission denied, I/O error: not the file's content
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e})", "check the file and its permissions") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})", "restore the file from the run directory") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object", "restore the file from the run directory")
    return data


def _family_for_hf(directory: Path, hf: dict) -> ModelFamily:
    model_type = hf.get("model_type")
    readers = [f for f in registry.FAMILIES.values() if f.huggingface is not None]
    for family in readers:
        if family.huggingface.model_type == model_type:  # type: ignore[union-attr]
            return family
    names = " or ".join(f.display_name for f in readers)
    kinds = ", ".join(f"{f.display_name} (model_type '{f.huggingface.model_type}')" for f in readers)  # type: ignore[union-attr]
    raise CheckpointError(f"{directory} is a Hugging Face '{model_type}' checkpoint, not {names}",
                          f"vitseg loads Hugging Face {kinds} and its own run directories")


def _load_huggingface(directory: Path, hf: dict) -> LoadedCheckpoint:
    family = _family_for_hf(directory, hf)
    mapping = family.huggingface
    assert mapping is not None
    weights = next((directory / n for n in ("model.safetensors", "pytorch_model.bin") if (directory / n).exists()), None)
    if weights is None:
        raise CheckpointError(f"{directory} has config.json but no model.safetensors or pytorch_model.bin",
                              "download or copy the weights file into the directory")
    state, has_head = mapping.state_dict_from_hf(read_state_dict(weights))
    semantic = has_head or mapping.semantic_class in (hf.get("architectures") or [])
    # Encoder-only (e.g. ImageNet MiT): its id2label are ImageNet's; the head is new, for our default 3 classes.
    config = mapping.config_from_hf(hf, None if semantic else len(PET_CLASSES))
    model = family.build(config)
    new = _load_into(model, state, str(weights), strict_prefixes=() if has_head else (family.head_prefix,))
    if new:
        warnings.warn(f"{weights}: encoder-only checkpoint; the segmentation head ({len(new)} tensors) is randomly "
                      "initialized and must be trained (vitseg train --init ...)", stacklevel=2)
    labels = hf.get("id2label") or {}
    class_names = ([labels.get(str(i), labels.get(i, f"class_{i}")) for i in range(config.num_classes)]
                   if semantic else list(PET_CLASSES))
    meta = CheckpointMeta(family.name_for(config), family.name, config, class_names, mapping.image_size,
                          mapping.mean, mapping.std, training={"source": "huggingface", "path": str(directory)})
    _hf_preprocessing(directory, meta)
    return LoadedCheckpoint(model.eval(), meta, str(directory), sha256_file(weights), "huggingface")


def _hf_preprocessing(directory: Path, meta: CheckpointMeta) -> None:
    """Take normalization and size from preprocessor_config.json when the directory has one."""
    pre = directory / "preprocessor_config.json"
    if not pre.exists():
        return
    data = _read_json(pre)
    if data.get("image_mean") and data.get("image_std"):
        meta.mean, meta.std = tuple(data["image_mean"]), tuple(data["image_std"])
    size = data.get("size")
    if isinstance(size, dict) and "height" in size and "width" in size:
        meta.image_size = (int(size["height"]), int(size["width"]))


def _random_weights(name: str) -> LoadedCheckpoint:
    """An architecture with random weights, the same on every call, without touching the caller's RNG."""
    arch = registry.get_architecture(name)
    warnings.warn(f"'{name}' is an architecture name: using RANDOM weights (pass a checkpoint for real ones)",
                  stacklevel=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = registry.build_model(arch.family, arch.config)
    return LoadedCheckpoint(model.eval(), CheckpointMeta.for_architecture(arch), name, None, "random")


def load_checkpoint(spec: str | Path, revision: str | None = None) -> LoadedCheckpoint:
    """The one way in: run dir, .safetensors file, Hugging Face directory, Hub id (`org/name`, at `revision`), or
    architecture name; a path that exists wins over an id of the same spelling. Returns the model in eval mode with
    its meta; raises CheckpointError (one line) for anything else."""
    text = str(spec)
    path = Path(text)
    if revision is not None and (path.exists() or not hub.looks_like_hub_id(text)):
        raise CheckpointError(f"--revision applies to Hub ids (org/name), and '{text}' is not one", "drop --revision")
    if not path.exists():
        if text in registry.ARCHITECTURES:
            return _random_weights(text)
        if hub.looks_like_hub_id(text):
            return _load_hub(text, revision)
        looks_like_path = os.sep in text or text.endswith((".safetensors", ".bin", ".pth", ".pt", ".json"))
        hint = "check the path" if looks_like_path else "pass a run directory, a .safetensors file, or a name from `vitseg models`"
        raise CheckpointError(f"checkpoint '{text}' does not exist and is not an architecture name", hint)
    if not path.is_dir():  # before anything opens it: a FIFO would wait for a writer forever
        check_readable_file(path, "checkpoint", CheckpointError)
    if path.is_dir():
        config_path = path / CONFIG_FILE
        if not config_path.exists():
            raise CheckpointError(f"{path} has no config.json", "point at a vitseg run directory or a Hugging Face SegFormer directory")
        data = _read_json(config_path)
        if data.get("format") == FORMAT:
            return _load_native(config_path, path / WEIGHTS_FILE)
        if "model_type" in data:
            return _load_huggingface(path, data)
        raise CheckpointError(f"{config_path} is neither a vitseg nor a Hugging Face config", "point at a run directory")
    if path.suffix == ".safetensors":
        config_path = path.parent / CONFIG_FILE
        if not config_path.exists():
            raise CheckpointError(f"{path} has no config.json beside it",
                                  "keep the run directory together, or load foreign weights with `--init` and `--model`")
        data = _read_json(config_path)
        if data.get("format") != FORMAT:
            return _load_huggingface(path.parent, data)
        return _load_native(config_path, path)
    if path.name == CONFIG_FILE:
        return load_checkpoint(path.parent)
    raise CheckpointError(f"{path} is not a checkpoint vitseg can read",
                          "expected a run directory, a .safetensors file, or a Hugging Face SegFormer directory")


def _load_hub(repo_id: str, revision: str | None) -> LoadedCheckpoint:
    """A Hub id, resolved to its snapshot directory (cache first) and loaded as the Hugging Face directory it is."""
    snapshot = hub.resolve(repo_id, revision)
    config_path = snapshot.directory / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointError(f"Hub model {repo_id} has no config.json in its snapshot {snapshot.directory}",
                              "it is not a transformers model repository; vitseg loads SegFormer repositories")
    data = _read_json(config_path)
    if "model_type" not in data:
        raise CheckpointError(f"Hub model {repo_id}'s config.json is not a transformers config", "name a SegFormer model")
    loaded = _load_huggingface(snapshot.directory, data)
    loaded.meta.training = {"source": "huggingface-hub", "id": repo_id, "commit": snapshot.commit}
    return replace(loaded, source=repo_id, hub=snapshot.record())


def init_from_foreign(arch: Architecture, path: Path, num_classes: int | None = None) -> LoadedCheckpoint:
    """A model of `arch`'s family initialized from foreign weights in one of the family's
    `foreign_formats` (timm ViT, the seed article's state dicts, ...). Raises CheckpointError when the
    weights are in no layout the family knows or do not fit."""
    state = read_state_dict(path)
    family = registry.get_family(arch.family)
    meta = CheckpointMeta.for_architecture(arch, num_classes)
    for foreign in family.foreign_formats:
        if not foreign.detect(state):
            continue
        config, mapped, may_be_new, mean, std = foreign.convert(state, meta.config)
        meta.config = config
        if mean is not None and std is not None:
            meta.mean, meta.std = tuple(mean), tuple(std)
        model = family.build(config)
        new = _load_into(model, mapped, str(path), strict_prefixes=may_be_new)
        meta.training = {"init": str(path), "init_kind": foreign.kind, **({"new_tensors": new} if may_be_new else {})}
        return LoadedCheckpoint(model, meta, str(path), sha256_file(path), foreign.kind)
    kinds = ", ".join(f.kind for f in family.foreign_formats) or "none"
    raise CheckpointError(f"{path}: weight layout not recognized for the {arch.family} family",
                          f"it reads {kinds} weights; a Hugging Face checkpoint loads as a directory")


# ---- writing ------------------------------------------------------------------------------------

def save_checkpoint(model: nn.Module, meta: CheckpointMeta, run_dir: Path) -> Path:
    """Write model.safetensors + config.json into run_dir as one group (all or nothing, config last), so an
    interruption never leaves new weights beside an old config or a config without its weights."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_group({run_dir / WEIGHTS_FILE: save(state, metadata={"format": "pt"}),
                        run_dir / CONFIG_FILE: json_bytes(meta.to_json())})
    return run_dir
