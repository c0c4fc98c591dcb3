"""`vitseg doctor`: what this machine can export and run."""

from __future__ import annotations

from rich.table import Table

from vitseg_export.cli.common import JsonFlag, console, print_json


def doctor(json_output: JsonFlag = False) -> None:
    """Print torch/CUDA, onnxruntime providers, TensorRT, CPU int8 features and what is therefore available."""
    from vitseg_export.doctor import probe

    r = probe()
    if json_output:
        print_json(r)
        return
    t = Table(title="vitseg doctor", show_header=False)
    t.add_column("what")
    t.add_column("status", overflow="fold")
    t.add_row("python", f"{r['python']} on {r['platform']}")
    t.add_row("cpu", f"{r['cpu']['model']} ({r['cpu']['cores']} cores); int8 features: "
              + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in r["cpu"]["int8_features"].items()))
    t.add_row("torch", r["torch"]["version"] or f"missing ({r['torch']['error']})")
    gpus = ", ".join(f"{d['name']} (sm {d['compute_capability']}, {d['memory_gb']} GB)" for d in r["cuda"]["devices"])
    t.add_row("cuda", gpus if r["cuda"]["available"] else "no CUDA GPU visible to torch")
    o = r["onnxruntime"]
    t.add_row("onnxruntime", f"{o['version']}; providers: {', '.join(o['providers'])}" if o["version"] else f"missing ({o['error']})")
    t.add_row("tensorrt", r["tensorrt"]["version"] or f"unavailable: {r['tensorrt']['error']}")
    a = r["available"]
    for fmt in ("onnx", "trt"):
        t.add_row(f"export --format {fmt}", ", ".join(f"{p} {'yes' if ok else 'no'}" for p, ok in a[fmt].items()))
    t.add_row("run", ", ".join(k.replace("run_", "") for k, v in a.items() if k.startswith("run_") and v) or "nothing")
    for note in r["notes"]:
        t.add_row("note", note)
    console.print(t)
