"""Shared fixtures: the CLI runner, and the fixture zoo of tiny twins (built once per session, handed
out as copies so a test may change its model) and their fp32 ONNX exports (shared, read-only)."""

from __future__ import annotations

import copy
import io
import shutil
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    """Run `vitseg ARGS` in-process through the real entry point (main(), with its error handling)."""
    from vitseg_export.cli import common, main

    out, err = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = ["vitseg", *map(str, args)]
    old_consoles = common.console.file, common.err_console.file
    common.console.file, common.err_console.file = out, err
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        common.console.file, common.err_console.file = old_consoles
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def _twin_cache() -> dict:
    return {}


@pytest.fixture
def twin(_twin_cache):
    """twin(name) -> a LoadedCheckpoint of an architecture with its deterministic random weights (a copy:
    change it freely). Tiny twins (`*-test`) keep the suite fast."""
    from vitseg_export.checkpoint import load_checkpoint

    def get(name: str):
        if name not in _twin_cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "RANDOM weights" is the point here
                _twin_cache[name] = load_checkpoint(name)
        return copy.deepcopy(_twin_cache[name])

    return get


@pytest.fixture
def random_model():
    """random_model(name, seed=0) -> (network in eval mode, Architecture), weights drawn from `seed`."""
    import torch

    from vitseg_export.modeling import registry

    def get(name: str, seed: int = 0):
        arch = registry.get_architecture(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return registry.build_model(arch.family, arch.config).eval(), arch

    return get


@pytest.fixture(scope="session")
def _export_cache(tmp_path_factory) -> dict:
    return {"dir": tmp_path_factory.mktemp("exports")}


@pytest.fixture
def exported(_export_cache, twin, tmp_path):
    """exported(name, copy=False, **OnnxExportSettings fields) -> path of the twin's ONNX export, made once per
    session for each (name, settings); with copy=True a private copy in tmp_path (to tamper with)."""
    from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx

    def get(name: str, copy: bool = False, **settings) -> Path:
        key = (name, tuple(sorted(settings.items())))
        if key not in _export_cache:
            path = _export_cache["dir"] / f"{len(_export_cache)}-{name}.onnx"
            export_onnx(twin(name), path, OnnxExportSettings(**settings))
            _export_cache[key] = path
        path = _export_cache[key]
        if not copy:
            return path
        shutil.copy(path, tmp_path / path.name)
        shutil.copy(path.with_name(path.name + ".json"), tmp_path / (path.name + ".json"))
        return tmp_path / path.name

    return get


def pytest_collection_modifyitems(config, items):
    import importlib.util

    has_trt = importlib.util.find_spec("tensorrt") is not None
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    for item in items:
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here"))
        if item.get_closest_marker("trt") and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT: `import tensorrt` fails here (not installable on CI)"))


def make_image_folder(root: Path, count: int = 12, size: int = 32, value: int = 1, mask_size: int | None = None,
                      skip_mask: int | None = None) -> str:
    """A `folder:ROOT` dataset: `count` RGB images (size x size) under images/, masks of class `value` (at
    `mask_size`, default the image size) under masks/, the mask of image `skip_mask` left out. Returns the spec."""
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        Image.new("RGB", (size, size), (i * 10 % 256, 50, 90)).save(root / "images" / f"im{i:02d}.png")
        if i != skip_mask:
            m = mask_size or size
            Image.fromarray(np.full((m, m), value, np.uint8)).save(root / "masks" / f"im{i:02d}.png")
    return f"folder:{root}"


@pytest.fixture
def image_folder():
    """image_folder(root, count=12, size=32, value=1, mask_size=None, skip_mask=None) -> 'folder:ROOT'."""
    return make_image_folder
