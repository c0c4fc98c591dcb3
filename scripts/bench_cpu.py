"""The CPU performance figures of every vitseg row and its peers, measured in ONE interleaved run (batch 1,
fixed threads: each timed iteration runs every row once, round-robin, so machine noise hits all rows alike).

    python scripts/bench_cpu.py --segformer RUN_DIR --vit RUN_DIR [--size 512] [--threads 2] [--output bench-cpu]

Rows, SegFormer at --size (default 512): transformers eager fp32 (the baseline every speedup is against),
the same transformers model exported as-is to ONNX (static shape) on ONNX Runtime and on OpenVINO (the
peers), and vitseg's artifacts: ONNX fp32 (dynamic batch as shipped, and static), ONNX int8 (--target cpu),
OpenVINO IR fp32 / fp16 / int8. ViT (vit-seg-base at 128): PyTorch eager (the seed article's model, the
baseline) and the same vitseg rows. Agreement and mIoU come from verifying each artifact against its
checkpoint on held-out images. Also: the machine's fp32 matmul peak (torch and OpenVINO, same threads, same
run; the larger counts) and
the efficiency of the best fp32 row; where the time goes (ONNX Runtime and OpenVINO profilers, per op
type); the CPU flags. Writes summary.json and summary.md; prints the CPU performance targets as MET / NOT MET.
Architecture names work too (random weights: latencies only, agreement is then meaningless).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vitseg_export.checkpoint import load_checkpoint
from vitseg_export.formats import get_format
from vitseg_export.machine.timing import interleaved_medians
from vitseg_export.measure.profiling import environment, onnx_op_breakdown, openvino_op_breakdown
from vitseg_export.runners import runner_for
from vitseg_export.settings import ExportRequest, Int8Settings, OnnxExportSettings
from vitseg_export.verdict.verify import verify_artifact

ARTIFACTS = [  # (row, format, precision, dynamic batch, int8 CPU class)
    ("vitseg onnx fp32 (dynamic batch, as shipped)", "onnx", "fp32", True, None),
    ("vitseg onnx fp32 (static)", "onnx", "fp32", False, None),
    # ONNX Runtime's CPU optimizer turns a static graph's MatMul+Add into Gemm, which it then cannot fuse
    # with Q/DQ into integer kernels: the int8 graph is measured as shipped (dynamic batch) and static
    ("vitseg onnx int8 (--cpu-class avx2, dynamic batch, as shipped)", "onnx", "int8", True, "avx2"),
    ("vitseg onnx int8 (--cpu-class avx2, static)", "onnx", "int8", False, "avx2"),
    ("vitseg onnx int8 (--cpu-class vnni, dynamic batch)", "onnx", "int8", True, "vnni"),
    ("vitseg openvino fp32 IR", "openvino", "fp32", False, None),
    ("vitseg openvino fp16 IR", "openvino", "fp16", False, None),
    ("vitseg openvino bf16 IR", "openvino", "bf16", False, None),
    ("vitseg openvino int8 IR (--cpu-class avx2: overflow fix)", "openvino", "int8", False, "avx2"),
    ("vitseg openvino int8 IR (--cpu-class vnni)", "openvino", "int8", False, "vnni"),
]


def probe_table() -> list[dict]:
    """int8 vs fp32 per op type on this CPU (vitseg_export/export/int8_probe.py), both runtimes, both classes."""
    from vitseg_export.export.int8 import ort_layer_runner
    from vitseg_export.export.int8_probe import time_layers
    from vitseg_export.export.openvino_export import ov_layer_runner

    rows = []
    for runtime, compile_fn in (("onnxruntime", ort_layer_runner), ("openvino", ov_layer_runner)):
        for made_for in ("avx2", "vnni"):
            record = time_layers(compile_fn, runtime, made_for)
            rows += [{"runtime": runtime, "made_for": made_for, "op": op, **row} for op, row in record["ops"].items()]
    return rows


def matmul_peak_gflops(threads: int, n: int = 2048, iters: int = 10) -> dict[str, float]:
    """fp32 GFLOP/s of an n x n matmul in torch and in OpenVINO (same threads): the larger is the machine's
    usable fp32 peak (torch's GEMM reached 47% of OpenVINO's on a 2-core AVX-512 EPYC)."""
    import openvino as ov
    import openvino.opset13 as ops

    from vitseg_export.runners.openvino_runner import openvino_core

    torch.set_num_threads(threads)
    a, b = torch.rand(n, n), torch.rand(n, n)
    lhs = ops.parameter([n, n], np.float32)
    request = openvino_core().compile_model(ov.Model([ops.matmul(lhs, ops.constant(b.numpy()), False, False)], [lhs]), "CPU",
                                            {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                                             "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
    peaks = {}
    for name, fn in (("torch", lambda: a @ b), ("openvino", lambda: request.infer([a.numpy()]))):
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        peaks[name] = 2 * n**3 * iters / (time.perf_counter() - t0) / 1e9
    return peaks


def export_rows(checkpoint: str, size: tuple[int, int], out: Path, args) -> dict[str, dict]:
    loaded = load_checkpoint(checkpoint)
    rows = {}
    for name, fmt_name, precision, dynamic, cpu_class in ARTIFACTS:
        if args.int8_only and precision in ("fp16", "bf16"):
            continue
        fmt = get_format(fmt_name)
        path = out / f"{fmt_name}-{precision}{'-' + cpu_class if cpu_class else ''}{'-dyn' if dynamic else ''}{fmt.suffixes[0]}"
        # every int8 row is made and timed, also one vitseg would refuse here: the refusal is in its details
        request = ExportRequest(fmt_name, OnnxExportSettings(precision=precision, image_size=size, dynamic_batch=dynamic,
                                                             verdict_images=args.verify_images),
                                Int8Settings(calib_images=args.calib_images, cpu_class=cpu_class or "avx2",
                                             allow_float_fallback=True))
        print(f"export {name} -> {path}", flush=True)
        try:
            result = fmt.export(loaded, path, request, lambda m: None)
            rows[name] = {"path": str(path), "format": fmt_name, "precision": precision,
                          "details": result.manifest.precision_details}
        except Exception as e:  # a row that cannot be made is reported, the others go on
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
    return rows


def hf_segformer(loaded, tmp: Path):
    """transformers' SegformerForSemanticSegmentation with the checkpoint's weights (on-disk key names)."""
    import transformers
    from safetensors.torch import save_file

    c = loaded.meta.config
    config = transformers.SegformerConfig(
        num_channels=3, num_labels=c.num_classes, hidden_sizes=list(c.hidden_sizes), depths=list(c.depths),
        num_attention_heads=list(c.num_heads), sr_ratios=list(c.sr_ratios), patch_sizes=list(c.patch_sizes),
        strides=list(c.strides), mlp_ratios=[c.mlp_ratio] * 4, decoder_hidden_size=c.decoder_dim)
    config.save_pretrained(tmp)
    state = {("segformer." + k if k.startswith("encoder.") else k): v.contiguous()
             for k, v in loaded.model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    return transformers.SegformerForSemanticSegmentation.from_pretrained(tmp).eval()


def peer_callables(loaded, size, threads: int, tmp: Path) -> dict[str, tuple[Callable, str]]:
    """transformers eager, and its plain ONNX export on ONNX Runtime and on OpenVINO (at OpenVINO's defaults, and f32
    forced): name -> (callable, the precision it computes in, as its runtime reports it)."""
    import onnxruntime as ort

    from vitseg_export.runners.openvino_runner import openvino_core

    hf = hf_segformer(loaded, tmp)
    x = torch.rand(1, 3, *size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(hf, (x,), str(tmp / "hf.onnx"), input_names=["pixel_values"], output_names=["logits"],
                          opset_version=17, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(tmp / "hf.onnx"), opts, providers=["CPUExecutionProvider"])
    request = openvino_core().compile_model(str(tmp / "hf.onnx"), "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                      "INFERENCE_NUM_THREADS": threads}).create_infer_request()

    # OpenVINO's default inference precision is the CPU's fastest (bf16 where the CPU has it): named in the row
    default = request.get_compiled_model().get_property("INFERENCE_PRECISION_HINT").to_string()

    def eager(pixels):
        with torch.inference_mode():
            return hf(pixel_values=torch.from_numpy(pixels)).logits

    rows = {"transformers eager fp32 (baseline)": (eager, "f32"),
            "transformers plain ONNX on onnxruntime": (lambda p: session.run(None, {"pixel_values": p}), "f32"),
            "OpenVINO on the plain transformers ONNX (its defaults)": (lambda p: request.infer({"pixel_values": p}), default)}
    # the same peer forced to f32, for a like-for-like fp32 comparison (the same row as the default where that is f32)
    f32 = openvino_core().compile_model(str(tmp / "hf.onnx"), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                        "INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    rows["OpenVINO on the plain transformers ONNX (f32 forced)"] = (lambda p: f32.infer({"pixel_values": p}), "f32")
    return rows


def interleaved(fns: dict[str, Callable], pixels: np.ndarray, iters: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    return interleaved_medians(fns, iters, pixels)


def bench_model(label: str, checkpoint: str, size: tuple[int, int], out: Path, args) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = export_rows(checkpoint, size, out, args)
    loaded = load_checkpoint(checkpoint)
    fns: dict[str, Callable] = {}
    computes_in: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.int8_only:
            pass  # no peers: the int8 rows against their format's fp32
        elif loaded.meta.family == "segformer":
            for name, (fn, precision) in peer_callables(loaded, size, args.threads, Path(tmp)).items():
                fns[name], computes_in[name] = fn, precision
        else:
            eager = runner_for(loaded, "cpu", backend="torch", threads=args.threads).activate()
            fns["vitseg PyTorch eager fp32 (baseline)"] = lambda p: eager.infer({"pixels": p})
            computes_in["vitseg PyTorch eager fp32 (baseline)"] = "f32"
        runners = {}
        for name, row in rows.items():
            if "path" in row:
                runners[name] = runner_for(row["path"], "cpu", threads=args.threads).activate()
                fns[name] = (lambda r: (lambda p: r.infer({"pixels": p})))(runners[name])
                # what the runtime computes in, as compiled here (OpenVINO: the inference precision it was given)
                between = getattr(runners[name], "compiled_precision", "f32")
                computes_in[name] = f"int8 + {between}" if row["precision"] == "int8" else between
                row["computes_in"] = computes_in[name]
        pixels = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
        print(f"{label}: timing {len(fns)} rows, {args.iters} interleaved iterations", flush=True)
        latency = interleaved(fns, pixels, args.iters, args.threads)
    baseline = next(iter(latency.values()))
    for name, row in rows.items():
        if "path" in row:
            report = verify_artifact(Path(row["path"]), checkpoint, "synthetic", args.verify_images)
            row.update(passed=report.passed, pixel_agreement=report.summary.pixel_agreement,
                       miou_vs_reference=report.summary.miou_vs_reference,
                       miou_drop_vs_labels=report.summary.labels.miou_drop_vs_labels if report.summary.labels else None)
    table = [{"row": name, "latency_ms": ms, "speedup": baseline / ms, "computes_in": computes_in.get(name), **rows.get(name, {})}
             for name, ms in latency.items()]
    table += [{"row": name, **row} for name, row in rows.items() if "error" in row]
    return {"model": label, "checkpoint": checkpoint, "size": list(size), "rows": table,
            "where_the_time_goes": breakdowns(rows, pixels, args.threads)}


def breakdowns(rows: dict, pixels: np.ndarray, threads: int) -> dict:
    out = {}
    for name, row in rows.items():
        if "path" not in row or row["precision"] == "fp16":
            continue
        profiler = onnx_op_breakdown if row["format"] == "onnx" else openvino_op_breakdown
        out[name] = profiler(Path(row["path"]), pixels, runs=5, threads=threads)[:8]
    return out


def best(rows: list[dict], prefix: str, precision: str) -> dict | None:
    candidates = [r for r in rows if r["row"].startswith(prefix) and r.get("precision") == precision and "latency_ms" in r
                  and r.get("passed")]
    return min(candidates, key=lambda r: r["latency_ms"], default=None)


def fastest(rows: list[dict], predicate: Callable[[dict], bool]) -> dict | None:
    """The fastest timed row that `predicate` accepts."""
    return min((r for r in rows if "latency_ms" in r and predicate(r)), key=lambda r: r["latency_ms"], default=None)


def verified(r: dict) -> bool:
    return r["row"].startswith("vitseg") and bool(r.get("passed"))


def is_peer(r: dict) -> bool:
    return not r["row"].startswith("vitseg") and "eager" not in r["row"]


def targets(seg: dict, vit: dict | None) -> list[str]:
    """The CPU performance targets (issue 36), each MET / NOT MET, from the rows of this one run; only verified vitseg
    rows count, and every peer at its own defaults."""
    lines = []
    rows = seg["rows"]
    fp32 = best(rows, "vitseg", "fp32")
    if fp32:
        lines.append(f"SegFormer best fp32 ({fp32['row']}): {fp32['speedup']:.2f}x vs transformers eager (target >= 11.0x) "
                     + ("MET" if fp32["speedup"] >= 11 else "NOT MET"))
    bf16 = best(rows, "vitseg", "bf16")
    default_peer = next((r for r in rows if "its defaults" in r["row"] and "latency_ms" in r), None)
    if bf16 and default_peer:
        ratio = default_peer["latency_ms"] / bf16["latency_ms"]
        lines.append(f"SegFormer bf16 ({bf16['row']}, computes in {bf16.get('computes_in')}): {ratio:.2f}x OpenVINO's default "
                     f"on the plain export (computes in {default_peer['computes_in']}) (target > 1.0x) " + ("MET" if ratio > 1 else "NOT MET"))
    int8 = fastest(rows, lambda r: verified(r) and r.get("precision") == "int8")
    if int8:
        floats = fastest(rows, lambda r: verified(r) and r.get("precision") != "int8" and r.get("format") == int8["format"])
        if floats:
            ratio = floats["latency_ms"] / int8["latency_ms"]
            lines.append(f"SegFormer fastest int8 ({int8['row']}): {ratio:.2f}x the fastest verified float row of its format "
                         f"({floats['row']}, {floats.get('computes_in')}), agreement {int8['pixel_agreement'] * 100:.2f}% "
                         "(target >= 1.3x at >= 99%) " + ("MET" if ratio >= 1.3 and int8["pixel_agreement"] >= 0.99 else "NOT MET"))
    if vit:
        vfp32, vint8 = best(vit["rows"], "vitseg", "fp32"), best(vit["rows"], "vitseg", "int8")
        if vfp32 and vint8:
            ratio = vfp32["latency_ms"] / vint8["latency_ms"]
            lines.append(f"ViT best int8 ({vint8['row']}): {ratio:.2f}x its best fp32 (target >= 1.5x) " + ("MET" if ratio >= 1.5 else "NOT MET"))
    top, peer = fastest(rows, verified), fastest(rows, is_peer)
    if top and peer:
        ratio = peer["latency_ms"] / top["latency_ms"]
        lines.append(f"vitseg fastest verified ({top['row']}) vs the fastest peer ({peer['row']}, computes in "
                     f"{peer['computes_in']}): {ratio:.2f}x (target >= 2.0x) " + ("MET" if ratio >= 2 else "NOT MET"))
    return lines


def int8_lines(model: dict, here: str) -> list[str]:
    """The int8 figures: every int8 row against its own format's fp32 in the same interleaved run, its share of
    MACs in int8 and its agreement; the target (>= 1.3x at >= 99%) applies where the CPU has VNNI/AMX."""
    rows = {r["row"]: r for r in model["rows"] if "latency_ms" in r}
    fp32 = {"onnx": rows.get("vitseg onnx fp32 (dynamic batch, as shipped)"), "openvino": rows.get("vitseg openvino fp32 IR")}
    lines = []
    for name, r in rows.items():
        if r.get("precision") != "int8" or fp32.get(r["format"]) is None:
            continue
        ratio = fp32[r["format"]]["latency_ms"] / r["latency_ms"]
        d = r.get("details") or {}
        made_for = d.get("cpu_class", "?")
        verdict = ""
        if here in ("vnni", "amx") and made_for == here:
            verdict = " (target >= 1.3x at >= 99%: " + ("MET" if ratio >= 1.3 and r.get("pixel_agreement", 0) >= 0.99 else "NOT MET") + ")"
        lines.append(f"{model['model']} {name}: {ratio:.2f}x its fp32 ({r['latency_ms']:.1f} vs {fp32[r['format']]['latency_ms']:.1f} ms), "
                     f"{d.get('int8_mac_share', 0) * 100:.1f}% of MACs int8, {len(d.get('fallback_layers', []))} units in float, "
                     f"agreement {r.get('pixel_agreement', 0) * 100:.2f}%, made for {made_for} on this {here} CPU{verdict}")
    return lines


def markdown(result: dict) -> str:
    cpu = result["environment"]["cpu"]
    lines = [f"Date: {time.strftime('%Y-%m-%d')}. CPU: {cpu['model']}, {cpu['cores']} cores, int8 flags: "
             + ", ".join(k for k, v in cpu["int8_features"].items() if v) + "; bf16 flags: "
             + (", ".join(k for k, v in cpu.get("bf16_features", {}).items() if v) or "none") + f"; threads {result['threads']}; "
             f"fp32 matmul peak {result['matmul_peak_gflops']:.1f} GFLOP/s ("
             + ", ".join(f"{k} {v:.1f}" for k, v in result["matmul_gflops_by_library"].items()) + ")", ""]
    for model in [m for m in (result["segformer"], result["vit"]) if m]:
        lines += [f"### {model['model']} at {model['size'][0]}x{model['size'][1]}, batch 1", "",
                  "| row | computes in | p50 latency | speedup | agreement | mIoU vs ref | verdict |", "|---|---|---|---|---|---|---|"]
        for r in model["rows"]:
            agreement = f"{r['pixel_agreement'] * 100:.2f}%" if r.get("pixel_agreement") is not None else "-"
            miou = f"{r['miou_vs_reference'] * 100:.2f}" if r.get("miou_vs_reference") is not None else "-"
            status = r.get("error") or ("verified" if r.get("passed") else ("FAILED" if "passed" in r else "peer"))
            latency = f"{r['latency_ms']:.1f} ms" if "latency_ms" in r else "-"
            speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
            lines.append(f"| {r['row']} | {r.get('computes_in') or '-'} | {latency} | {speedup} | {agreement} | {miou} | {status} |")
        lines.append("")
    if result["probe"]:  # --no-probe: no table at all, not an empty one
        lines += ["### int8 vs fp32 per op type (one layer each, interleaved pairs; int8_probe, vitseg_export/timing.py)",
                  "", "| runtime | made for | op | shape | fp32 | int8 | int8 speedup (95% interval) | outcome |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['runtime']} | {r['made_for']} | {r['op']} | {'x'.join(map(str, r['shape']))} | {r['baseline_ms']:.3f} ms "
                  f"| {r['candidate_ms']:.3f} ms | {r['speedup']:.2f}x ({r['low']:.2f}-{r['high']:.2f}) | {r['outcome']} |"
                  for r in result["probe"]]
        lines.append("")
    return "\n".join(lines + result["targets"]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--segformer", default="segformer-b0")
    ap.add_argument("--vit", default="vit-seg-base")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--verify-images", type=int, default=16)
    ap.add_argument("--calib-images", type=int, default=32)
    ap.add_argument("--output", type=Path, default=Path("bench-cpu"))
    ap.add_argument("--no-vit", action="store_true", help="SegFormer only (the issue-36 targets are SegFormer's)")
    ap.add_argument("--no-probe", action="store_true", help="skip the per-op-type int8 probe table")
    ap.add_argument("--int8-only", action="store_true", help="fp32 and int8 rows only (no peers, no fp16): the int8 figures")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    peaks = matmul_peak_gflops(args.threads)
    peak = max(peaks.values())
    seg = bench_model("segformer", args.segformer, (args.size, args.size), args.output / "segformer", args)
    vit_size = None if args.no_vit else tuple(load_checkpoint(args.vit).meta.image_size)  # the ViT's position embedding fixes it (128)
    vit = None if args.no_vit else bench_model("vit-seg-base", args.vit, vit_size, args.output / "vit", args)
    fp32 = best(seg["rows"], "vitseg", "fp32")
    gflops = None
    if fp32:
        from vitseg_export.measure.profiling import onnx_compute

        onnx_row = next(r for r in seg["rows"] if r["row"].startswith("vitseg onnx fp32 (static)"))
        gflops = onnx_compute(Path(onnx_row["path"]), (args.size, args.size))["gflops"]
    result = {"environment": environment(args.threads), "threads": args.threads, "matmul_peak_gflops": peak,
              "matmul_gflops_by_library": peaks,
              "segformer": seg, "vit": vit,
              "best_fp32_efficiency": (gflops / (fp32["latency_ms"] / 1e3) / peak) if fp32 and gflops else None}
    result["probe"] = [] if args.no_probe else probe_table()
    here = result["environment"]["cpu"]["class"]
    result["targets"] = ([] if args.int8_only else targets(seg, vit)) + int8_lines(seg, here) + (int8_lines(vit, here) if vit else [])
    if result["best_fp32_efficiency"]:
        result["targets"].append(f"best SegFormer fp32 row: {gflops:.2f} GFLOP per image, "
                                 f"{result['best_fp32_efficiency'] * 100:.1f}% of the measured matmul peak")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (args.output / "summary.md").write_text(markdown(result))
    print(markdown(result))
    for model in [m for m in (seg, vit) if m]:
        for name, ops in model["where_the_time_goes"].items():
            print(f"{model['model']} {name}: " + ", ".join(f"{o['op']} {o['share'] * 100:.0f}%" for o in ops[:6]))


if __name__ == "__main__":
    main()
