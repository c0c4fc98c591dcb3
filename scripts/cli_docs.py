"""Write docs/cli.md, the option reference, from the app itself (Typer's Markdown generator):

    python scripts/cli_docs.py            # rewrite docs/cli.md
    python scripts/cli_docs.py --check    # exit 1 when docs/cli.md is stale (tests/test_cli_vocabulary.py runs it)
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
import typer.main
from typer.cli import get_docs_for_click

from vitseg_export.cli import app

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
HEADER = ("<!-- Generated from the app by `python scripts/cli_docs.py`; do not edit (a test fails when it is stale). "
          "Old spellings of renamed options: docs/reference/renamed-options.md -->\n\n")


def cli_docs() -> str:
    """The Markdown reference of every command and option, as `vitseg --help` would show them."""
    command = typer.main.get_command(app)
    text = get_docs_for_click(obj=command, ctx=typer.Context(command), name="vitseg", title="vitseg command reference")
    return HEADER + text.strip() + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if DOCS.exists() and DOCS.read_text() == cli_docs() else 1)
    DOCS.write_text(cli_docs())
    print(f"wrote {DOCS}")
