"""Atomic file writes, strict JSON and hashing (torch-free): no half-written artifact is ever left behind.

Every file vitseg writes goes to a temp file in the target directory first and is renamed over the target
only when complete. Files of one artifact (e.g. model.onnx and its manifest, an IR's .xml/.bin/.json)
are written as a group: all temp files first, then the renames, the manifest last, so a manifest never
describes a missing or older file; Ctrl-C and SIGTERM are held back during the renames. Temp files are
removed on every path: exceptions, Ctrl-C, and SIGTERM (the CLI turns it into an exception, see
vitseg_export.cli, and calls `remove_temp_files` last). Files get the mode the umask gives (0644 usually),
like any other tool's output, not mkstemp's 0600.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import signal
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from vitseg_export.errors import VitsegError

# Temp files and backups that exist right now (registered before they are created), so that whatever
# interrupts a write, `remove_temp_files` (the CLI's last step) finds every one of them.
_LIVE_TEMPS: set[Path] = set()


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back until the block ends, so that a group's renames and its cleanup are never
    cut in half: their Python handlers are swapped for a recorder and the recorded signals are handed to the
    original handlers afterwards. Python runs signal handlers only in the main thread, so elsewhere nothing
    can interrupt the block and there is nothing to do."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, lambda received, frame: caught.append(received))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in caught:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def _new_temp_name(path: Path, kind: str = "tmp") -> Path:
    name = path.with_name(f".{path.name}.{secrets.token_hex(4)}.{kind}")
    _LIVE_TEMPS.add(name)
    return name


def _discard(temp: Path) -> None:
    temp.unlink(missing_ok=True)
    _LIVE_TEMPS.discard(temp)


def _write_temp(path: Path, data: bytes) -> Path:
    """`data` in a new temp file beside `path`, flushed to disk. Created with mode 0o666, so the kernel
    applies the umask exactly as for any other tool's output (not mkstemp's 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _new_temp_name(path)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _discard(temp)
        raise
    return temp


def _backup(path: Path) -> Path | None:
    """A hard link to the file about to be replaced (its previous content), or None if there is none."""
    if not path.is_file():
        return None
    backup = _new_temp_name(path, "bak")
    try:
        os.link(path, backup)
    except OSError:  # no hard links on this file system (FAT, some network shares): move it aside instead
        try:
            os.replace(path, backup)
        except BaseException:
            _LIVE_TEMPS.discard(backup)
            raise
    return backup


def _commit(temps: dict[Path, Path]) -> None:
    """Rename every temp file over its target, in order. On failure the targets already replaced get their
    previous content back (or are removed if they are new), so the group lands whole or not at all."""
    backups: dict[Path, Path | None] = {}
    renamed: list[Path] = []
    try:
        if len(temps) > 1:  # a single file needs no backup: its rename is atomic
            for path in temps:
                backups[path] = _backup(path)
        for path, temp in temps.items():
            os.replace(temp, path)
            renamed.append(path)
        for directory in {path.parent for path in temps}:
            _fsync_dir(directory)
    except BaseException:
        _roll_back(backups, renamed)
        raise
    finally:
        for backup in backups.values():
            if backup is not None:
                _discard(backup)


def _roll_back(backups: dict[Path, Path | None], renamed: list[Path]) -> None:
    for path, backup in backups.items():
        if backup is not None and (path in renamed or not path.exists()):  # replaced, or moved aside
            os.replace(backup, path)
    for path in renamed:
        if backups.get(path) is None:
            path.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    """Make the renames in `directory` durable (best effort: not every OS or file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_group(files: dict[Path, bytes]) -> None:
    """Write several files as one output, all or nothing: every file goes to a temp file beside its
    target (fsynced), then all are renamed over their targets in the dict's order (put a manifest last),
    with Ctrl-C and SIGTERM held back during the renames. On any failure (disk full, permissions, an
    interruption while writing) the temp files are removed, existing targets keep their previous
    content, and directories the write created are removed again. Files get the mode the umask gives."""
    files = {Path(path): data for path, data in files.items()}
    created = _missing_directories(files)
    temps: dict[Path, Path] = {}
    committed = False
    try:
        for path, data in files.items():
            temps[path] = _write_temp(path, data)
        with signals_deferred():
            _commit(temps)
        committed = True
    finally:
        with signals_deferred():
            for temp in temps.values():
                _discard(temp)
            for directory in [] if committed else created:  # deepest first; only those the failed write left empty
                try:
                    directory.rmdir()
                except OSError:
                    pass


def _missing_directories(files: dict[Path, bytes]) -> list[Path]:
    """The directories writing `files` will create, deepest first."""
    missing: set[Path] = set()
    for path in files:
        missing.update(d for d in path.parents if not d.exists())
    return sorted(missing, key=lambda d: len(d.parts), reverse=True)


def atomic_write_directory(target: Path, files: dict[str, bytes]) -> None:
    """Write a directory as one output, all or nothing: `files` (paths relative to `target` -> bytes) go into
    a temp directory beside it, which then replaces `target` (an existing one, with whatever else it held, is
    moved aside and removed only once the new one is in place). Ctrl-C and SIGTERM are held back during the
    swap; on any failure the previous directory is back as it was and no temp directory is left."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp, backup = _new_temp_name(target, "dir"), _new_temp_name(target, "old")
    try:
        for relative, data in files.items():
            path = temp / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        with signals_deferred():
            moved = target.exists()
            if moved:
                os.replace(target, backup)
            try:
                os.replace(temp, target)
            except BaseException:
                if moved:
                    os.replace(backup, target)
                raise
            _fsync_dir(target.parent)
    finally:
        with signals_deferred():
            for leftover in (temp, backup):
                shutil.rmtree(leftover, ignore_errors=True)
                _LIVE_TEMPS.discard(leftover)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write one file atomically (see atomic_write_group)."""
    atomic_write_group({Path(path): data})


def remove_temp_files() -> list[Path]:
    """Remove every temp file (and temp directory) a write left behind (none, unless an interruption bypassed
    its cleanup); returns them. The CLI calls it last, on every path."""
    left = sorted(_LIVE_TEMPS)
    for temp in left:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        _discard(temp)
    return left


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


def file_kind(mode: int) -> str:
    """What a stat mode is, in words: "a directory", "a FIFO (named pipe)", "a socket", ..."""
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a file")):
        if test(mode):
            return kind
    return "not a regular file"


def check_readable_file(path: Path | str, what: str, error: type[VitsegError] = VitsegError,
                        directory_hint: str = "pass a file inside it") -> None:
    """Before anything opens `path` (what vitseg reads: an image, a checkpoint, an artifact, a data set's file): it
    must exist and be a regular file. A directory, a FIFO, a socket or a device is refused in one line (`error`,
    exit 2): opening a FIFO waits for a writer forever, a device never ends. Symbolic links are followed."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode  # stat opens nothing: it cannot block on a FIFO
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist", "check the path") from None
    except OSError as e:  # a dangling or looping link, a name too long, a path through a file
        raise error(f"{what} {path} cannot be read ({e.strerror or e})", "check the path") from None
    if not stat.S_ISREG(mode):
        hint = (directory_hint if stat.S_ISDIR(mode) else
                "pass a regular file: vitseg reads no pipes, sockets or devices (copy the data to a file first)")
        raise error(f"{what} {path} is {file_kind(mode)}, not a file", hint)


def check_output_file(path: Path, what: str = "output") -> None:
    """Before any heavy work: `path` must not be a directory and its directory must be creatable and
    writable. Raises VitsegError (one line) otherwise."""
    path = Path(path)
    if path.is_dir():
        raise VitsegError(f"{what} {path} is a directory", "pass a file path, e.g. model.onnx")
    check_output_dir(path.parent, what)


def check_output_dir(directory: Path, what: str = "output") -> None:
    """Before any heavy work: `directory` must be (or be creatable as) a writable directory."""
    directory = Path(directory)
    existing = next((p for p in [directory, *directory.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise VitsegError(f"{what} {directory}: {existing} is a file, not a directory", "pick another output path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise VitsegError(f"{what} {directory} is not writable ({existing}: permission denied)",
                          "pick a directory you can write to")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")  # a weights file is read with the config.json beside it


def _protected(files: Iterable[Path], folders: Iterable[Path]) -> list[tuple[Path, bool]]:
    """(path, whole) for everything a command reads. A directory among `files` (a run or checkpoint directory)
    stands for its existing entries, each whole, and itself not whole: new files may be written beside them
    (an export next to its checkpoint), none of them replaced. A checkpoint named by one of its files (its
    weights, its config.json) stands for its whole directory the same way: the weights, the config and a
    Hugging Face directory's preprocessor_config.json are read together. `folders` are whole."""
    out: list[tuple[Path, bool]] = [(Path(f), True) for f in folders]
    for f in map(Path, files):
        checkpoint_file = f.is_file() and (f.name == "config.json" or f.suffix.lower() in WEIGHT_SUFFIXES) and \
            (f.parent / "config.json").is_file()
        directory = f if f.is_dir() else f.parent if checkpoint_file else None
        out.append((f, directory is None))
        if directory is not None:
            out += [(directory, False)] + [(entry, True) for entry in directory.iterdir()]
    return out


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_outputs_spare_inputs(outputs: Mapping[str, Path | Iterable[Path]], files: Iterable[Path] = (),
                               folders: Iterable[Path] = ()) -> None:
    """The one rule for outputs: nothing a command reads is ever written over. Before any work, refuse
    (VitsegError, one line) an output path that is, contains or sits inside one of the command's inputs,
    compared after resolving symlinks (and hard links): `outputs` maps an option name to the path(s) it writes;
    `files` are the files the command reads (a directory stands for its existing entries); `folders` are
    directories read as a whole (data folders), inside which nothing may be written."""
    hint = "write it somewhere else: vitseg never writes over what it reads"
    protected = _protected(files, folders)
    for option, paths in outputs.items():
        for out in [paths] if isinstance(paths, (str, Path)) else paths:
            out = Path(out)
            where = out.resolve()
            for source, whole in protected:
                if _same(out, source):
                    raise VitsegError(f"{option} {out} is {source}, one of this command's inputs", hint)
                if where in source.resolve().parents:
                    raise VitsegError(f"{option} {out} contains {source}, one of this command's inputs", hint)
                if whole and source.resolve() in where.parents:
                    raise VitsegError(f"{option} {out} is inside {source}, one of this command's inputs", hint)
