"""The TensorRT code cannot run here, so every call it makes is type-checked against stubs generated
from the TensorRT Python bindings of 10.3 (JetPack 6) and 11.4 (scripts/trt_stubs.sh)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRT_CODE = ["vitseg_export/export/tensorrt_engine.py", "vitseg_export/runners/tensorrt_runner.py"]
VERSIONS = ["10.3", "11.4"]


def _mypy(version: str, *files: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MYPYPATH": str(ROOT / "tests" / "typing" / f"tensorrt-{version}")}
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
