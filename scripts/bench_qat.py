"""PTQ against QAT, side by side in one run, for each int8 path `vitseg qat` offers: the int8 MAC share, the units
the fallback returned to float, held-out agreement with the fp32 model (before and after the fallback), each
artifact's mIoU against the labels next to the fp32 PyTorch model's on the same images, and (for CPU artifacts)
int8 vs fp32 speed on this machine, with the CPU flags.

    python scripts/bench_qat.py CHECKPOINT [--size 128] [--data synthetic] [--epochs 1] [--paths openvino,onnx-trt,onnx-cpu]
        [--cpu-class avx2] [--heldout-images 32] [--output bench-qat]

Every export runs with --allow-float-fallback so that a mostly-float PTQ is measured instead of refused.
Targets: QAT keeps more MACs in int8 than PTQ on at least one path where PTQ needed the fallback,
and its mIoU vs labels is within 0.5 pt of fp32. Writes summary.json; prints MET / NOT MET.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from vitseg_export.checkpoint import load_checkpoint
from vitseg_export.compare.inputs import load_inputs
from vitseg_export.compare.metrics import confusion, miou
from vitseg_export.errors import VitsegError
from vitseg_export.export.fallback import final_speed
from vitseg_export.formats import get_format
from vitseg_export.measure.profiling import environment
from vitseg_export.runners import runner_for
from vitseg_export.settings import ExportRequest, Int8Settings, OnnxExportSettings, QatSettings

PATHS = {  # name -> (format, int8 target)
    "openvino": ("openvino", "cpu"),
    "onnx-trt": ("onnx", "trt"),
    "onnx-cpu": ("onnx", "cpu"),
}


def miou_vs_labels(model, inputs, num_classes: int) -> float:
    """mIoU of an artifact's (or checkpoint's) masks against the images' labels, batch 1."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    with runner_for(model) as runner:
        for im in inputs.images:
            logits = runner.infer({"pixels": im.pixels[None]})["logits"]
            cm += confusion(logits[0].argmax(0), im.label, num_classes)
    return miou(cm)


def row(result, kind: str, seconds: float, inputs, num_classes: int) -> dict:
    d = result.manifest.precision_details or {}
    qat = d.get("qat", {})
    return {"kind": kind, "artifact": str(result.path), "seconds": round(seconds, 1),
            "int8_mac_share": d.get("int8_mac_share"),
            "units_in_float": len(d.get("fallback_layers", [])) if "fallback_groups" not in d else len(d.get("fallback_groups", [])),
            "heldout_before_fallback": d.get("heldout_before_fallback", {}).get("agreement"),
            "heldout_agreement": d.get("heldout_agreement"), "self_parity": result.manifest.self_parity["pixel_agreement"],
            "miou_vs_labels": miou_vs_labels(result.path, inputs, num_classes), "speed_here": final_speed(d) if d.get("cpu_class") else None,
            "qat_ptq_pytorch": qat.get("ptq_before_training"), "qat_after_pytorch": qat.get("qat_before_fallback"),
            "qat_steps": qat.get("steps")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--data", default="synthetic", help="QAT training data (train split) and calib/held-out source")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--cpu-class", default="avx2")
    ap.add_argument("--heldout-images", type=int, default=32)
    ap.add_argument("--output", type=Path, default=Path("bench-qat"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    env = environment()
    print(f"CPU: {env['cpu']}")
    loaded = load_checkpoint(args.checkpoint)
    num_classes = len(loaded.meta.class_names)
    labelled = load_inputs(args.data, "val", args.heldout_images, (args.size, args.size))
    fp32_miou = miou_vs_labels(args.checkpoint, labelled, num_classes)  # the fp32 PyTorch model, same images
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-qat-"))
    for name in args.paths.split(","):
        fmt_name, target = PATHS[name]
        fmt = get_format(fmt_name)
        int8 = Int8Settings(calib=args.data, calib_images=32, target=target, cpu_class=args.cpu_class,
                            allow_float_fallback=True)
        request = ExportRequest(fmt_name, OnnxExportSettings(precision="int8", image_size=(args.size, args.size),
                                                             dynamic_batch=fmt_name == "onnx", parity_data=args.data,
                                                             verdict_images=args.heldout_images), int8)
        for kind in ("ptq", "qat"):
            path = work / f"{name}-{kind}{fmt.suffixes[0]}"
            t0 = time.perf_counter()
            try:
                if kind == "ptq":
                    result = fmt.export(load_checkpoint(args.checkpoint), path, request, lambda m: None)
                else:
                    qat = QatSettings(data=args.data, epochs=args.epochs, lr=args.lr)
                    result = fmt.qat(load_checkpoint(args.checkpoint), path, request, qat, lambda m: None)
            except VitsegError as e:  # e.g. the targets unreachable even with every unit in float
                rows.append({"path": name, "kind": kind, "failed": e.message, "int8_mac_share": 0.0, "units_in_float": -1,
                             "miou_vs_labels": float("nan")})
                print(f"{name:9s} {kind}: FAILED: {e.message}", flush=True)
                continue
            rows.append({"path": name, **row(result, kind, time.perf_counter() - t0, labelled, num_classes)})
            r = rows[-1]
            print(f"{name:9s} {kind}: {r['int8_mac_share'] * 100:5.1f}% MACs int8, {r['units_in_float']} units float, "
                  f"held-out {r['heldout_before_fallback'] * 100:.2f}% -> {r['heldout_agreement'] * 100:.2f}%, "
                  f"mIoU vs labels {r['miou_vs_labels'] * 100:.2f}, {r['seconds']:.0f} s"
                  + (f", {r['speed_here']['speedup']:.2f}x fp32 here" if isinstance(r["speed_here"], dict) else ""), flush=True)
    print(f"fp32 PyTorch mIoU vs labels at {args.size}: {fp32_miou * 100:.2f}")
    met = []
    for name in args.paths.split(","):
        ptq, qat = [r for r in rows if r["path"] == name]
        fp32 = fp32_miou
        more = qat["int8_mac_share"] > ptq["int8_mac_share"] and ptq["units_in_float"] != 0  # -1: PTQ failed
        close = qat["miou_vs_labels"] >= fp32 - 0.005
        met.append(more and close)
        print(f"{name}: QAT {qat['int8_mac_share'] * 100:.1f}% vs PTQ {ptq['int8_mac_share'] * 100:.1f}% MACs int8 "
              f"(PTQ needed the fallback or failed: {ptq['units_in_float'] != 0}); QAT mIoU {qat['miou_vs_labels'] * 100:.2f} vs fp32 "
              f"{fp32 * 100:.2f}: {'MET' if more and close else 'NOT MET'}")
    print(f"target (QAT keeps more MACs int8 where PTQ fell back, mIoU within 0.5 pt): {'MET' if any(met) else 'NOT MET'}")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "summary.json").write_text(json.dumps({"environment": env, "args": {k: str(v) for k, v in vars(args).items()},
                                                          "fp32_miou_vs_labels": fp32_miou, "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
