"""Shared option aliases and consoles, so every command spells its options the same way."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import typer
from rich.console import Console
from rich.progress import Progress
from rich.text import Text

from vitseg_export.artifact import (
    MAX_INPUT_PIXELS,
    MAX_INPUT_SIDE,
    MIN_INPUT_SIDE,
    check_manifest_agrees,
    check_manifest_matches,
    manifest_path,
    read_manifest,
)
from vitseg_export.data.sources import data_folder
from vitseg_export.errors import VitsegError
from vitseg_export.files import check_outputs_spare_inputs, json_bytes, write_json
from vitseg_export.formats import artifact_files, format_for_path, read_artifact_info


class _BestEffortStderr(io.TextIOBase):
    """stderr for progress, logs and errors that never fails the command: a full or broken stderr
    (2>/dev/full, a closed pipe) loses those lines, not the work. Resolved at every write, like sys.stderr."""

    def write(self, text: str) -> int:
        stream = sys.stderr
        if stream is not None:
            try:
                stream.write(text)
            except (OSError, ValueError):
                pass
        return len(text)

    def flush(self) -> None:
        try:
            if sys.stderr is not None:
                sys.stderr.flush()
        except (OSError, ValueError):
            pass

    def isatty(self) -> bool:
        return bool(sys.stderr is not None and sys.stderr.isatty())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(sys.stderr, "encoding", None) or "utf-8"


# Results on stdout, progress and logs on stderr.
console = Console()
err_console = Console(file=_BestEffortStderr())

def finite_range(low: float, high: float | None, meaning: str, open_ends: bool = False) -> Callable[[Any], Any]:
    """A typer callback that refuses (usage error, exit 2) a value outside [low, high] ((low, high) with
    `open_ends`) and any NaN or infinity, naming the option, the value and the range: a NaN threshold would
    silently switch its check off."""
    def check(value: Any) -> Any:
        if value is None:
            return value
        outside = (value <= low or (high is not None and value >= high)) if open_ends else \
            (value < low or (high is not None and value > high))
        if not math.isfinite(value) or outside:
            raise typer.BadParameter(f"{value} is not {meaning}")
        return value

    return check


FRACTION = finite_range(0.0, 1.0, "a fraction in [0, 1]")
NON_NEGATIVE = finite_range(0.0, None, "a finite number >= 0")
POSITIVE = finite_range(0.0, None, "a finite number > 0", open_ends=True)
RATIO = finite_range(0.0, 1.0, "a fraction in (0, 1)", open_ends=True)
WORKSPACE = finite_range(0.0, 1024.0, "a workspace in (0, 1024] GB", open_ends=True)



def emit(data: Any, json_output: bool, report: Path | None) -> None:
    """A command's result in machine-readable form: written to `--report FILE` (atomically) and, with `--json`,
    printed on stdout."""
    if report is not None:
        write_json(report, data)
    if json_output:
        print_json(data)


def given_options(ctx: Any) -> set[str]:
    """The options the user set, whatever their value: the parser's parameter source, never the value (`--dla-core
    0` is given, and `0 in (None, False)` is True in Python)."""
    return {name for name in ctx.params
            if (source := ctx.get_parameter_source(name)) is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")}


def print_json(data: Any) -> None:
    """Strict JSON on stdout (undefined values as null)."""
    sys.stdout.write(json_bytes(data).decode())
    sys.stdout.flush()


def parse_size(text: str, option: str = "--image-size") -> tuple[int, int]:
    """'512' -> (512, 512); '384x512' -> (384, 512) as (H, W); VitsegError for anything else, and for sizes no
    model runs at (over MAX_INPUT_SIDE per side or MAX_INPUT_PIXELS in all: refused before anything is allocated)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values, default=0) <= 0:
        raise VitsegError(f"{option} '{text}' is not HxW or S", f"e.g. {option} 512 or {option} 384x512")
    if min(values) < MIN_INPUT_SIDE:
        raise VitsegError(f"{option} {text} is too small", f"use at least {MIN_INPUT_SIDE}x{MIN_INPUT_SIDE}")
    check_size(values[0], values[-1], option)
    return (values[0], values[-1])


def check_size(height: int, width: int, option: str = "--image-size") -> None:
    """VitsegError for an input size larger than vitseg runs a model at."""
    if max(height, width) > MAX_INPUT_SIDE or height * width > MAX_INPUT_PIXELS:
        raise VitsegError(f"{option} {height}x{width} is larger than vitseg runs a model at",
                          f"use at most {MAX_INPUT_SIDE} per side and {MAX_INPUT_PIXELS:,} pixels")


def square_size(text: str | None, option: str = "--image-size") -> int | None:
    """--image-size for training (S or HxW, as everywhere) as the one side training runs at: training crops square
    images, so HxW with H != W is refused in one line."""
    if text is None:
        return None
    height, width = parse_size(text, option)
    if height != width:
        raise VitsegError(f"{option} {text}: training runs at square sizes",
                          f"use {option} {max(height, width)}; export at {text} afterwards (vitseg export --image-size {text})")
    return height


def progress_bar(*columns: Any, transient: bool = True, disable: bool = False) -> Progress:
    """A rich progress bar on stderr, drawn only on a terminal (piped, it would print nothing but a blank
    line, and errors must be one line)."""
    return Progress(*columns, console=err_console, transient=transient, disable=disable or not err_console.is_terminal)


def bar_progress(bar: Progress, task: Any) -> Callable[..., None]:
    """The library's Progress (vitseg_export.progress) drawn as `task` of a rich `bar`: its counts move the bar."""
    def update(message: str, done: int | None = None, total: int | None = None, **info: Any) -> None:
        bar.update(task, completed=done, total=total)
    return update


def spare_inputs(outputs: dict, models: Iterable[str | Path] = (), data: Iterable[str | None] = (),
                 files: Iterable[Path] = ()) -> None:
    """The output rule before any work (files.check_outputs_spare_inputs): `outputs` may not be, contain or sit
    inside the command's inputs: `models` (artifacts with their sidecars and manifests, checkpoint files and
    directories; architecture names have none), the folders of `data` specs, other `files` (images)."""
    read = [f for m in models for f in artifact_files(Path(m)) if f.exists()] + [Path(f) for f in files]
    folders = [f for f in (data_folder(spec) for spec in data if spec) if f is not None]
    check_outputs_spare_inputs({k: v for k, v in outputs.items() if v is not None}, read, folders)


def check_artifact_manifest(model: str | Path) -> None:
    """Before an artifact is run (verify, predict, profile, an engine built from it), where its manifest exists: the
    manifest describes this very file (its sha256) and agrees with the artifact's own metadata
    (artifact.check_manifest_agrees: VitsegError naming the first field that differs). Nothing to check for what is
    not an artifact file (a checkpoint, a repository directory) or an artifact without a manifest."""
    path = Path(model)
    fmt = format_for_path(path)
    if fmt is None or fmt.directory or not manifest_path(path).exists():
        return
    info = read_artifact_info(path)  # a damaged artifact says so first, as when it is run
    check_manifest_matches(path)
    check_manifest_agrees(info, read_manifest(path))


MAX_BATCH = 1024  # the largest batch size profile and verify run (a larger one only allocates)


def comma_items(text: str, option: str, example: str) -> list[str]:
    """'a,b' -> ['a', 'b']: the items of a comma-separated option value, stripped. An empty item ('a,,b', 'a,', '')
    or one given twice is refused (VitsegError naming `option`): a list that says something twice, or nothing in
    a place, was typed by mistake, and taking it silently hides what was meant."""
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise VitsegError(f"{option} '{text}' is empty", f"e.g. {option} {example}")
    if not all(items):
        raise VitsegError(f"{option} '{text}' has an empty item (two commas in a row, or one at an end)", f"e.g. {option} {example}")
    twice = next((t for i, t in enumerate(items) if t in items[:i]), None)
    if twice is not None:
        raise VitsegError(f"{option} '{text}' names {twice} twice", "give each item once")
    return items


def parse_ints(text: str, option: str, maximum: int = MAX_BATCH) -> list[int]:
    """'1,4,8' -> [1, 4, 8]: distinct integers in 1..maximum, comma-separated (VitsegError naming `option` otherwise)."""
    items = comma_items(text, option, "1,4,8")
    try:
        values = [int(v) for v in items]
    except ValueError:
        values = []
    if not values or min(values) < 1 or max(values) > maximum:
        raise VitsegError(f"{option} '{text}' is not a comma-separated list of integers in 1..{maximum}",
                          f"e.g. {option} 1,4,8")
    return values


def log(message: str, done: int | None = None, total: int | None = None, **info: Any) -> None:
    """A progress line on stderr, printed as is (paths and data specs are never read as markup); a Progress
    (vitseg_export.progress), its counts shown as "(done/total)"."""
    counted = f" ({done}/{total})" if done is not None and total is not None else ""
    err_console.print(message + counted, markup=False, highlight=False, soft_wrap=True)


class _Status:
    def __init__(self, title: str):
        self.title = title

    def __enter__(self):
        self._status = err_console.status(Text(self.title))  # Text: user text (paths, specs) is never markup
        self._status.__enter__()
        return self.update

    def update(self, message: str, done: int | None = None, total: int | None = None, **info: Any) -> None:
        """A Progress (vitseg_export.progress) shown as the spinner's text."""
        counted = f" ({done}/{total})" if done is not None and total is not None else ""
        self._status.update(Text(f"{self.title}: {message}{counted}"))

    def __exit__(self, *exc):
        return self._status.__exit__(*exc)


def status(title: str) -> _Status:
    """A spinner on stderr; `with status("x") as update: update("step")`."""
    return _Status(title)


def keep_float_names(text: Optional[str]) -> tuple[str, ...]:
    """--keep-float NAME[,NAME...]: module paths under the network (checked against the model at export)."""
    if text is None:
        return ()
    return tuple(comma_items(text, "--keep-float", "encoder.block.2.0"))


