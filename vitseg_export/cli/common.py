"""Shared option aliases and consoles, so every command spells its options the same way."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

# Results on stdout, progress and logs on stderr.
console = Console()
err_console = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
OutputDir = Annotated[Path, typer.Option("--output", "-o", help="Output directory.")]
DataSpec = Annotated[str, typer.Option("--data", help="synthetic[:N], pets:DIR or folder:DIR")]


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()
