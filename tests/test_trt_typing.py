"""TensorRT itself cannot run here, so every call the shared TensorRT code makes is type-checked against stubs
generated from the TensorRT Python bindings of 10.3 (JetPack 6) and 11.4 (scripts/trt_stubs.sh); the same code
runs for real with TensorRT-RTX, which builds here (tests/test_tensorrt_rtx.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRT_CODE = ["vitseg_export/export/tensorrt_engine.py", "vitseg_export/export/tensorrt_census.py",
            "vitseg_export/runners/tensorrt_runner.py", "vitseg_export/runners/tensorrt_editions.py",
            "vitseg_export/runners/cuda.py"]
VERSIONS = ["10.3", "11.4"]


def _mypy(version: str, *files: str) -> subprocess.CompletedProcess:
    stubs = [ROOT / "tests" / "typing" / f"tensorrt-{version}", ROOT / "tests" / "typing" / "cuda-bindings"]
    env = {**os.environ, "MYPYPATH": os.pathsep.join(map(str, stubs))}
    return subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--python-executable", sys.executable,
                           "--config-file", str(ROOT / "pyproject.toml"), *files],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.mark.parametrize("version", VERSIONS)
def test_tensorrt_code_type_checks_against_both_versions(version):
    result = _mypy(version, *TRT_CODE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_check_fails_on_a_call_removed_in_tensorrt_11(tmp_path):
    snippet = tmp_path / "uses_fp16_flag.py"
    snippet.write_text("import tensorrt as trt\n\n\ndef f(config: trt.IBuilderConfig) -> None:\n"
                       "    config.set_flag(trt.BuilderFlag.FP16)\n")
    assert _mypy("10.3", str(snippet)).returncode == 0
    removed = _mypy("11.4", str(snippet))
    assert removed.returncode == 1 and "FP16" in removed.stdout


def test_the_check_catches_a_cuda_call_that_does_not_exist(tmp_path):
    snippet = tmp_path / "uses_cuda.py"
    snippet.write_text("from cuda.bindings import runtime\n\n\ndef f() -> None:\n    runtime.cudaMalloc(16)\n"
                       "    runtime.cudaMallocTypo(16)\n")
    result = _mypy("11.4", str(snippet))
    assert result.returncode == 1 and "cudaMallocTypo" in result.stdout and "cudaMalloc(" not in result.stdout


def test_tensorrt_code_imports_without_torch():
    """The engine builder and runner need TensorRT and cuda-python, not PyTorch (Jetson production images)."""
    code = ("import sys, importlib.abc\n"
            "class NoTorch(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'torchvision'):\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "import vitseg_export.export.tensorrt_engine, vitseg_export.runners.tensorrt_runner, vitseg_export.runners.cuda\n"
            "from vitseg_export.runners.tensorrt_runner import tensorrt_availability\n"
            "ok, detail, hint = tensorrt_availability()\n"
            "print(ok, detail)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "torch" not in proc.stdout.lower()  # without TensorRT here it says TensorRT is missing, never torch
