"""x86 against aarch64: an ONNX artifact run by ONNX Runtime here and by ONNX Runtime's aarch64 build under QEMU
(scripts/arm_python.sh's emulated Python) on the images of its golden file, batch 1; prints each side's masks'
agreement and the largest logit difference between the two platforms (not against PyTorch: that is
`vitseg verify --golden`, run on each side).

    python scripts/arm_agreement.py b0-int8.onnx b0-int8.onnx.golden [--arm .cache/arm] [--images 32]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[1]


def run_here(model: str, golden: str, images: int, out: str) -> None:
    """The worker: the golden file's first `images` images through ONNX Runtime's CPU provider, logits saved."""
    tensors = load_file(golden)
    key = next(k for k in sorted(tensors) if k.startswith("pixels/"))
    pixels = tensors[key][:images].astype(np.float32) / 255.0
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_outputs()[0].name
    logits = np.concatenate([session.run([name], {"pixels": p[None]})[0] for p in pixels])
    np.save(out, logits.astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("golden")
    parser.add_argument("--arm", default=str(REPO / ".cache" / "arm"), help="scripts/arm_python.sh's directory")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the output .npy of one side
    args = parser.parse_args()
    if args.worker:
        return run_here(args.model, args.golden, args.images, args.worker)
    arm = Path(args.arm)
    prefix = ["env", "-u", "PYTHONHOME", "qemu-aarch64", "-L", str(arm / "root"), str(arm / "venv" / "bin" / "python3.11")]
    with tempfile.TemporaryDirectory() as tmp:
        sides = {}
        for side, python in (("x86", [sys.executable]), ("aarch64", prefix)):
            out = Path(tmp) / f"{side}.npy"
            started = time.perf_counter()
            subprocess.run([*python, __file__, args.model, args.golden, "--images", str(args.images), "--worker", str(out)],
                           check=True)
            sides[side] = (np.load(out), time.perf_counter() - started)
    (x86, x86_s), (arm_logits, arm_s) = sides["x86"], sides["aarch64"]
    agreement = float((x86.argmax(1) == arm_logits.argmax(1)).mean())
    print(f"{Path(args.model).name}: {len(x86)} images, x86 vs aarch64 mask agreement {agreement * 100:.4f}%, max |logit "
          f"diff| {float(np.abs(x86 - arm_logits).max()):.3g}; x86 {x86_s:.1f} s, aarch64 (QEMU) {arm_s:.1f} s")


if __name__ == "__main__":
    main()
