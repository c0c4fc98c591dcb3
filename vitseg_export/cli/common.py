"""Shared option aliases and consoles, so every command spells its options the same way."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.text import Text

from vitseg_export.files import json_bytes

# Results on stdout, progress and logs on stderr.
console = Console()
err_console = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
OutputDir = Annotated[Path, typer.Option("--output", "-o", help="Output directory.")]
DataSpec = Annotated[str, typer.Option("--data", help="synthetic[:N], pets:DIR or folder:DIR")]
BackendOption = Annotated[Optional[str], typer.Option("--backend", help="Run artifacts with this backend (default: their format's).")]


def print_json(data: Any) -> None:
    """Strict JSON on stdout (undefined values as null)."""
    sys.stdout.write(json_bytes(data).decode())
    sys.stdout.flush()


def parse_size(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '384x512' -> (384, 512) as (H, W)."""
    from vitseg_export.errors import VitsegError

    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values, default=0) <= 0:
        raise VitsegError(f"image size '{text}' is not HxW or S", "e.g. --image-size 512 or --image-size 384x512")
    return (values[0], values[-1])


def parse_ints(text: str, option: str) -> list[int]:
    """'1,4,8' -> [1, 4, 8]: positive integers, comma-separated (VitsegError naming `option` otherwise)."""
    from vitseg_export.errors import VitsegError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise VitsegError(f"{option} '{text}' is not a comma-separated list of positive integers", f"e.g. {option} 1,4,8")
    return values


def log(message: str) -> None:
    """A progress line on stderr, printed as is (paths and data specs are never read as markup)."""
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)


class _Status:
    def __init__(self, title: str):
        self.title = title

    def __enter__(self):
        self._status = err_console.status(Text(self.title))  # Text: user text (paths, specs) is never markup
        self._status.__enter__()
        return lambda msg: self._status.update(Text(f"{self.title}: {msg}"))

    def __exit__(self, *exc):
        return self._status.__exit__(*exc)


def status(title: str) -> _Status:
    """A spinner on stderr; `with status("x") as update: update("step")`."""
    return _Status(title)
