"""vitseg's torch-free commands on ARM: an aarch64 Python under QEMU's user-mode emulator with ONNX Runtime's
aarch64 wheel (tests/armtools.py, scripts/arm_python.sh), what a Jetson's or a Raspberry Pi's CPU computes; skipped,
saying why, where the emulator or the aarch64 packages cannot be had. Timings are printed (pytest -rP), not judged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from armtools import ORT_VERSION
from PIL import Image

from vitseg_export.checkpoint import load_checkpoint
from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}


def _run(command: list[str], timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV)
    return proc, time.perf_counter() - started


def _predict(python: list[str], model: Path, images: list[Path], out: Path) -> tuple[list[dict], float]:
    proc, seconds = _run([*python, "-m", "vitseg_export", "predict", str(model), *map(str, images), "-o", str(out),
                          "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), seconds


def test_predict_on_aarch64_writes_the_masks_x86_writes(arm_python, tmp_path):
    """An fp32 ONNX exported here, run by `vitseg predict` on x86 and on emulated aarch64: the same masks."""
    probe, probe_s = _run([*arm_python, "-c", "import platform, onnxruntime; "
                                              "print(platform.machine(), onnxruntime.__version__)"])
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.split() == ["aarch64", ORT_VERSION]

    started = time.perf_counter()
    model = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "RANDOM weights" is the point here
        export_onnx(load_checkpoint("segformer-b0-test"), model, OnnxExportSettings(image_size=(64, 64)))
    export_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    images = []
    for i, (w, h) in enumerate([(64, 64), (90, 70), (48, 80)]):  # the model's size and two that are resized
        images.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images[-1])

    x86_rows, x86_s = _predict([sys.executable], model, images, tmp_path / "x86")
    arm_rows, arm_s = _predict(arm_python, model, images, tmp_path / "arm")

    agreement = []
    for x86, arm in zip(x86_rows, arm_rows, strict=True):
        assert x86["image"] == arm["image"]
        a, b = (np.asarray(Image.open(row["mask"])) for row in (x86, arm))
        assert a.shape == b.shape
        agreement.append(float((a == b).mean()))
    print(f"\naarch64 under QEMU: {probe.stdout.strip()}, Python start + import onnxruntime {probe_s:.1f} s; "
          f"fp32 export (x86) {export_s:.1f} s; vitseg predict on {len(images)} images: x86 {x86_s:.1f} s, "
          f"aarch64 {arm_s:.1f} s; mask agreement per image {agreement}")
    assert agreement == [1.0] * len(images), f"aarch64 masks differ from x86's: agreement per image {agreement}"
    assert [row["class_pixels"] for row in arm_rows] == [row["class_pixels"] for row in x86_rows]


def _verify(python: list[str], model: Path, golden: Path) -> tuple[subprocess.CompletedProcess, float]:
    return _run([*python, "-m", "vitseg_export", "verify", str(model), "--golden", str(golden), "--json"])


def test_golden_verify_on_aarch64_of_fp32_and_int8_made_on_x86(arm_python, tmp_path):
    """Golden files made on x86 (vitseg export --save-golden), the artifacts judged on emulated aarch64 with ONNX
    Runtime's ARM kernels, torch-free: fp32 passes as on x86; int8's verdict there is recorded (ARM's int8 kernels are
    not x86's); a golden file of another model and an edited one are refused (exit 2) there too."""
    from vitseg_export.compare.golden import golden_bytes, read_golden
    from vitseg_export.settings import Int8Settings

    made = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "RANDOM weights" is the point here
        loaded = load_checkpoint("segformer-b0-test")
        for precision in ("fp32", "int8"):
            made[precision] = export_onnx(loaded, tmp_path / f"{precision}.onnx",
                                          OnnxExportSettings(precision=precision, image_size=(64, 64), verdict_images=8,
                                                             parity_data="synthetic[:16]"),
                                          int8=Int8Settings(calib="synthetic[:16]", calib_images=8,
                                                            allow_float_fallback=True), golden=True).path
    verdicts = {}
    for precision, model in made.items():
        x86, x86_s = _verify([sys.executable], model, model.with_name(model.name + ".golden"))
        arm, arm_s = _verify(arm_python, model, model.with_name(model.name + ".golden"))
        assert x86.returncode == 0, x86.stderr[-3000:]
        assert arm.returncode in (0, 3), arm.stderr[-3000:]  # a verdict, passed or not: never a crash
        report = json.loads(arm.stdout)
        verdicts[precision] = (report["passed"], report["pixel_agreement"], report["max_abs_logit_diff"], x86_s, arm_s)
        assert report["images"] == 8 and [s["batch"] for s in report["shapes"]] == [1, 4, 8]
    print("\nverify --golden (x86-made golden files), aarch64 under QEMU: " + "; ".join(
        f"{p}: passed {v[0]}, agreement {v[1] * 100:.3f}%, max |logit diff| {v[2]:.2e}, x86 {v[3]:.1f} s, aarch64 {v[4]:.1f} s"
        for p, v in verdicts.items()))
    assert verdicts["fp32"][0] and verdicts["fp32"][2] < 1e-3  # fp32 is fp32 on ARM too
    golden = read_golden(made["fp32"].with_name("fp32.onnx.golden"))
    masks = golden.tensors["masks/64x64"].copy()
    masks[0] = (masks[0] + 1) % 3
    edited = tmp_path / "edited.golden"
    edited.write_bytes(golden_bytes({k: v for k, v in golden.header.items() if k != "tensors"},
                                    {**golden.tensors, "masks/64x64": masks}))
    raw = bytearray(edited.read_bytes())
    raw[-1] ^= 0xFF  # one byte of the last tensor changed after the header recorded its sha256
    edited.write_bytes(bytes(raw))
    refused, _ = _verify(arm_python, made["fp32"], edited)
    assert refused.returncode == 2 and "was edited after it was made" in refused.stderr, refused.stderr[-2000:]
    other, _ = _verify(arm_python, made["fp32"], made["int8"].with_name("int8.onnx.golden"))
    assert other.returncode == 2 and "too coarse for the fp32 preset" in other.stderr, other.stderr[-2000:]
