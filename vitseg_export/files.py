"""Atomic file writes, strict JSON and hashing (torch-free): no half-written artifact is ever left behind.

Every file vitseg writes goes to a temp file in the target directory first and is renamed over the target
only when complete. Files of one artifact (e.g. model.onnx and its manifest, an IR's .xml/.bin/.json)
are written as a group: all temp files first, then the renames, the manifest last, so a manifest never
describes a missing or older file. Temp files are removed on every path: exceptions, Ctrl-C, and SIGTERM
(the CLI turns it into an exception, see vitseg_export.cli). Files get the mode the umask gives (0644
usually), like any other tool's output, not mkstemp's 0600.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # read once at import: os.umask can only be read by setting it


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def atomic_write_group(files: dict[Path, bytes]) -> None:
    """Write every file to a temp file beside it, then rename them over their targets in order (put a
    manifest last). All or nothing: on any failure (disk full, permissions, interruption) the temp files
    are removed and targets already replaced get their previous content back (or are removed if new)."""
    temps: list[tuple[Path, Path]] = []
    backups: dict[Path, Path | None] = {}
    try:
        for path, data in files.items():
            tmp = _temp_beside(Path(path))
            temps.append((tmp, Path(path)))
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, FILE_MODE)
        for tmp, path in temps:
            backups[path] = _backup(path)
            os.replace(tmp, path)
    except BaseException:
        _restore(backups, done={path for tmp, path in temps if not tmp.exists()})
        raise
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        for backup in backups.values():
            if backup is not None:
                backup.unlink(missing_ok=True)


def _backup(path: Path) -> Path | None:
    """A hard link to the file about to be replaced (its previous content), or None if it is new."""
    if not path.is_file():
        return None
    backup = _temp_beside(path)
    backup.unlink()
    os.link(path, backup)
    return backup


def _restore(backups: dict[Path, Path | None], done: set[Path]) -> None:
    for path in done:
        backup = backups.get(path)
        if backup is not None:
            os.replace(backup, path)
        else:
            path.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write one file atomically (see atomic_write_group)."""
    atomic_write_group({Path(path): data})


def jsonable(value: Any) -> Any:
    """`value` with NaN/inf floats turned into None (strict JSON has no NaN) and tuples into lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def json_bytes(data: Any) -> bytes:
    """Strict JSON (undefined values as null, never NaN), indented, with a final newline."""
    return (json.dumps(jsonable(data), indent=2, allow_nan=False, default=str) + "\n").encode()


def write_json(path: Path, data: Any) -> None:
    """Write strict JSON atomically."""
    atomic_write_bytes(path, json_bytes(data))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_file(path: Path, what: str = "output") -> None:
    """Before any heavy work: `path` must not be a directory and its directory must be creatable and
    writable. Raises VitsegError (one line) otherwise."""
    from vitseg_export.errors import VitsegError

    path = Path(path)
    if path.is_dir():
        raise VitsegError(f"{what} {path} is a directory", "pass a file path, e.g. model.onnx")
    check_output_dir(path.parent, what)


def check_output_dir(directory: Path, what: str = "output") -> None:
    """Before any heavy work: `directory` must be (or be creatable as) a writable directory."""
    from vitseg_export.errors import VitsegError

    directory = Path(directory)
    existing = next((p for p in [directory, *directory.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise VitsegError(f"{what} {directory}: {existing} is a file, not a directory", "pick another output path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise VitsegError(f"{what} {directory} is not writable ({existing}: permission denied)",
                          "pick a directory you can write to")
