"""An aarch64 Python for the tests: Debian's arm64 python3.11 with ONNX Runtime's aarch64 wheel, run under QEMU's
user-mode emulator (`qemu-aarch64 -L ROOT`), built and cached by scripts/arm_python.sh. vitseg is not installed
there: the command prefix puts the repository on PYTHONPATH, so `PREFIX + ["-m", "vitseg_export", ...]` runs this
checkout's vitseg on ARM's own kernels (NEON), what a Jetson's or a Raspberry Pi's CPU computes.

Environment: VITSEG_ARM_CACHE (the cache folder; default <repo>/.cache/arm), VITSEG_ARM_BUILD=0 (never build:
use the cache or say why it is missing; .ci/run sets it when its own build failed, so pytest does not try again)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

ORT_VERSION = "1.19.2"  # scripts/arm_python.sh's pin: 1.32's aarch64 wheel dies with SIGSEGV on import under QEMU 7.2
BUILD_TIMEOUT_S = 1800  # a cold build measured 134 s on 2 busy cores (apt lists, 33 debs, pip under emulation)


def arm_cache(repo: Path) -> Path:
    """Where scripts/arm_python.sh keeps the aarch64 root and venv."""
    return Path(os.environ.get("VITSEG_ARM_CACHE") or repo / ".cache" / "arm").resolve()


def arm_python(repo: Path, build: bool | None = None) -> tuple[list[str] | None, str]:
    """(the command prefix that runs the aarch64 Python with `repo` importable, the build's summary line), or
    (None, why not): not x86_64 Linux, no bash, or what scripts/arm_python.sh said it could not do (no qemu-user and
    not root, apt or pip failed, ...). Builds the cache when missing unless `build` is False (default: unless
    VITSEG_ARM_BUILD=0); a current cache costs one emulated import of onnxruntime (about 1 s)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None, f"this is {platform.system()} {platform.machine()}: the aarch64 Python is emulated on x86_64 Linux"
    bash = shutil.which("bash")
    if bash is None:
        return None, "no bash to run scripts/arm_python.sh"
    if build is None:
        build = os.environ.get("VITSEG_ARM_BUILD", "1") != "0"
    cache = arm_cache(repo)
    command = [bash, str(repo / "scripts" / "arm_python.sh"), str(cache), *([] if build else ["--check"])]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"scripts/arm_python.sh {cache} ran past {BUILD_TIMEOUT_S} s"
    said = [line for line in proc.stdout.splitlines() if line.strip()]
    last = said[-1] if said else (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    if proc.returncode != 0:
        failed = cache / "failed"
        if not build and failed.is_file():  # the reason an earlier build (.ci/run's) gave
            last = f"{last}; the last build said: {failed.read_text().strip()}"
        return None, last
    qemu = shutil.which("qemu-aarch64")
    if qemu is None:  # the script found one a moment ago
        return None, "qemu-aarch64 is not on PATH"
    prefix = ["env", "-u", "PYTHONHOME", f"PYTHONPATH={repo}", qemu, "-L", str(cache / "root"),
              str(cache / "venv" / "bin" / "python3.11")]
    return prefix, last
