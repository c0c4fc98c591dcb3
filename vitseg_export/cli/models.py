"""`vitseg models`: the registered architectures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from rich.table import Table

from vitseg_export.cli.common import console, emit
from vitseg_export.cli.options import opt
from vitseg_export.tables import lazy_module

registry = lazy_module("vitseg_export.modeling.registry")


def models(
    include_test: Annotated[bool, opt("--include-test")] = False,
    json_output: Annotated[bool, opt("--json")] = False,
    report: Annotated[Optional[Path], opt("--report")] = None,
) -> None:
    """List the architectures vitseg builds, trains and exports."""

    rows = []
    for arch in registry.ARCHITECTURES.values():
        if arch.tiny_twin_of and not include_test:
            continue
        rows.append({
            "name": arch.name,
            "family": arch.family,
            "params": registry.count_parameters(registry.build_model(arch.family, arch.config)),
            "image_size": arch.image_size,
            "num_classes": arch.num_classes,
            "description": arch.description,
            "test_twin": f"{arch.name}-test" if not arch.tiny_twin_of else None,
        })
    emit(rows, json_output, report)
    if json_output:
        return
    table = Table(title="vitseg architectures")
    for col in ("name", "family", "params", "image size", "classes", "description"):
        table.add_column(col, justify="right" if col in ("params", "image size", "classes") else "left")
    for r in rows:
        table.add_row(r["name"], r["family"], f"{r['params'] / 1e6:.2f}M", str(r["image_size"]),
                      str(r["num_classes"]), r["description"])
    console.print(table)
