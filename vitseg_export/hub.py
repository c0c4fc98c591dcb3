"""Hugging Face Hub ids (`org/name`, with an optional revision) -> a snapshot directory on this disk.

Resolved through `huggingface_hub` from the user's cache first (`HF_HUB_CACHE`, by default
~/.cache/huggingface/hub), so a model transformers already downloaded loads without a network; downloaded
only where the network allows and `HF_HUB_OFFLINE` is unset. What was resolved (id, revision asked, the
commit the snapshot is, each file's sha256) is kept for the artifact's manifest, so an artifact says which
weights it came from. The snapshot is then an ordinary Hugging Face directory for `checkpoint.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from vitseg_export.errors import CheckpointError
from vitseg_export.files import sha256_file
from vitseg_export.tables import lazy_module

huggingface_hub = lazy_module("huggingface_hub")  # the torch extra
hub_errors = lazy_module("huggingface_hub.errors")
hub_constants = lazy_module("huggingface_hub.constants")  # HF_HUB_OFFLINE and HF_HUB_CACHE, read from the environment

# What a checkpoint needs from a model repository: never the other frameworks' weights (tf_model.h5, ...).
WANTED_FILES = ["config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin"]
# `org/name` as the Hub spells repository ids: one slash, names of letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def looks_like_hub_id(text: str) -> bool:
    """Whether `text` has the shape of a Hub model id (`org/name`); a path that exists is never asked."""
    return bool(_HUB_ID.match(text)) and ".." not in text and not text.endswith((".safetensors", ".json", ".bin"))


@dataclass
class HubSnapshot:
    """A resolved Hub id: the snapshot directory and what the manifest records about it."""

    repo_id: str
    revision: str | None  # as asked (None: the default branch)
    commit: str  # the snapshot's commit hash
    directory: Path
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256, of the files vitseg reads

    def record(self) -> dict:
        """The manifest's `source.hub` section."""
        return {"id": self.repo_id, "revision": self.revision or "main", "commit": self.commit, "files": self.files}


def cache_dir() -> str:
    """Where huggingface_hub keeps its cache on this machine (HF_HUB_CACHE / HF_HOME aware)."""
    return str(hub_constants.HF_HUB_CACHE)


def resolve(repo_id: str, revision: str | None = None) -> HubSnapshot:
    """The snapshot of `repo_id` at `revision`: from the local cache, else downloaded where the network is allowed.
    Raises CheckpointError (one line: the id, the cache looked in, how to fill it) when it is not to be had."""
    errors = hub_errors
    at = f"{repo_id}@{revision}" if revision else repo_id
    command = f"download {repo_id}" + (f" --revision {revision}" if revision else "")
    fill = f"on a connected machine run `hf {command}` or `huggingface-cli {command}`, then copy its cache into {cache_dir()}"
    try:
        directory = huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True,
                                                      allow_patterns=WANTED_FILES)
    except errors.LocalEntryNotFoundError:
        if hub_constants.HF_HUB_OFFLINE:
            raise CheckpointError(f"'{at}' is neither a path that exists nor a Hub model in the Hugging Face cache "
                                  f"({cache_dir()}), and HF_HUB_OFFLINE forbids downloading it", fill) from None
        directory = _download(repo_id, revision, at, fill)
    except errors.HFValidationError as e:
        raise CheckpointError(f"'{at}' is not a valid Hub model id ({str(e).splitlines()[0]})",
                              "name a model as org/name, or pass a path that exists") from None
    path = Path(directory)
    return HubSnapshot(repo_id, revision, path.name, path,
                       {name: sha256_file(path / name) for name in WANTED_FILES if (path / name).is_file()})


def _download(repo_id: str, revision: str | None, at: str, fill: str) -> str:
    errors = hub_errors
    try:
        return huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=WANTED_FILES)
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"Hub model {repo_id} has no revision '{revision}'",
                              "pass a branch, tag or commit the repository has (or drop --revision)") from None
    except errors.GatedRepoError:
        raise CheckpointError(f"Hub model {repo_id} is gated", "accept its terms on the Hub and log in: `hf auth login`") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f"'{repo_id}' is neither a path that exists nor a Hub model (nor in the cache {cache_dir()})",
                              "check the path or the id; a private model needs `hf auth login`") from None
    except (errors.LocalEntryNotFoundError, errors.HfHubHTTPError, OSError) as e:  # no network, Hub down
        reason = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        raise CheckpointError(f"'{at}' is neither a path that exists nor a Hub model in the Hugging Face cache "
                              f"({cache_dir()}), and it could not be downloaded ({reason})", fill) from None
