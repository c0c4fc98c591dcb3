"""`vitseg doctor`: what this machine can export and run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from rich.markup import escape
from rich.table import Table

from vitseg_export.cli.common import console, emit, log
from vitseg_export.cli.options import opt
from vitseg_export.measure.doctor import probe
from vitseg_export.tables import lazy_module

extensions = lazy_module("vitseg_export.machine.extensions")  # imports torch and NNCF: only with --prepare


def doctor(
    prepare: Annotated[bool, opt("--prepare")] = False,
    json_output: Annotated[bool, opt("--json")] = False,
    report: Annotated[Optional[Path], opt("--report")] = None,
) -> None:
    """Print the CPU and its int8 features, torch/CUDA, every backend and format (with what it needs), and
    therefore what this machine can export and run."""
    r = probe()
    if prepare:
        r["prepared"] = [extensions.prepare_nncf_torch(log)]
    emit(r, json_output, report)
    if json_output:
        return
    t = Table(title="vitseg doctor", show_header=False)
    t.add_column("what")
    t.add_column("status", overflow="fold")
    t.add_row("python", f"{r['python']} on {r['platform']}")
    t.add_row("cpu", f"{r['cpu']['model']} ({r['cpu']['cores']} cores); class {r['cpu']['class']} "
              f"(`--cpu-class {r['cpu']['class']}` builds int8 for this machine's class); int8 features: "
              + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in r["cpu"]["int8_features"].items())
              + "; bf16: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in r["cpu"]["bf16_features"].items()))
    gpus = ", ".join(f"{d['name']} (sm {d['compute_capability']}, {d['memory_gb']} GB)" for d in r["cuda"]["devices"])
    t.add_row("cuda", gpus if r["cuda"]["available"] else "no CUDA GPU visible to torch")
    for name, b in r["backends"].items():
        t.add_row(f"backend {name}", escape(f"{b['detail']}; devices: {', '.join(b['devices'])}" if b["available"]
                                            else f"unavailable: {b['detail']} ({b['hint']})"))
    for name, f in r["formats"].items():
        status = (", ".join(f"{p} yes" for p in f["precisions"]) if f["available"]
                  else f"no: {f['detail']} ({f['hint']})")
        t.add_row(f"export --format {name}", escape(status))
    serve = r["serve"]
    t.add_row("vitseg serve", escape(f"{serve['path']} (backends: {', '.join(serve['backends']) or 'none'})" if serve["available"]
                                     else f"no: {serve['detail']} ({serve['hint']})"))
    for row in r.get("prepared", []):
        t.add_row("prepared", escape(f"{row['extension']}: {row['status']} ({row['seconds']:.1f} s"
                                     + (f", in {row['build_dir']})" if row["build_dir"] else ")")))
    for note in r["notes"]:
        t.add_row("note", escape(note))
    console.print(t)
