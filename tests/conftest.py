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
    # the consoles' own setting (None: follow sys.stdout / sys.stderr), not the stream it resolves to now, which
    # would pin them to this test's captured stream for every later test
    old_consoles = common.console._file, common.err_console._file
    common.console.file, common.err_console.file = out, err
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        common.console._file, common.err_console._file = old_consoles
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


# /proc/cpuinfo flags a CPU of each int8 class shows (vitseg_export/machine/cpu.py)
CLASS_FLAGS = {"avx2": {"avx2", "fma"}, "vnni": {"avx2", "fma", "avx512f", "avx512_vnni"},
               "amx": {"avx2", "fma", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"}}


@pytest.fixture
def cpu_class_is(monkeypatch):
    """cpu_class_is(name): this process's CPU detection answers `name` (avx2, vnni, amx) for the rest of the test,
    how a test reaches the branch of a class it does not run on. It changes vitseg's decisions, not the kernels
    ONNX Runtime picks: forcing avx2 is exact on any CPU (int8 of other classes is then emulated in float), and
    forcing vnni or amx is exact for saturation-safe (avx2) int8 only."""
    from vitseg_export.machine import cpu

    def force(name: str) -> None:
        monkeypatch.setattr(cpu, "cpu_flags", lambda: set(CLASS_FLAGS[name]))

    return force


@pytest.fixture(scope="session")
def nncf_extension() -> dict:
    """NNCF's PyTorch CPU extension, built once per session before the tests that train with it (it compiles on
    first use: about 30 s on 2 cores), so no single test carries the build; what prepare_nncf_torch returned."""
    pytest.importorskip("nncf", reason="NNCF is an optional extra (pip install -e '.[openvino]')")
    from vitseg_export.machine.extensions import prepare_nncf_torch

    return prepare_nncf_torch()


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
    """The unit tier (tests/unit: metrics, presets, the fallback search, the comparator's batches, the timing rule;
    milliseconds each) runs first, so a broken verdict core fails in seconds; gpu and trt tests skip, saying why,
    where this machine lacks what they need."""
    import importlib.util

    unit = Path(__file__).parent / "unit"
    items.sort(key=lambda item: not Path(str(item.fspath)).is_relative_to(unit))  # stable: order kept within tiers
    has_trt = importlib.util.find_spec("tensorrt") is not None
    has_cuda = False
    if any(item.get_closest_marker("gpu") for item in items):  # the unit tier alone never imports torch
        try:
            import torch

            has_cuda = torch.cuda.is_available()
        except ImportError:
            pass
    for item in items:
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here"))
        if item.get_closest_marker("trt") and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT: `import tensorrt` fails here (not installable on CI)"))


def make_image_folder(root: Path, count: int = 12, size: int | tuple[int, int] = 32, value: int = 1,
                      mask_size: int | None = None, skip_mask: int | None = None, random_classes: int | None = None,
                      mask_for=None, class_names: list[str] | None = None) -> str:
    """The one `folder:ROOT` dataset builder: `count` RGB images of `size` (S or (W, H)) under images/, masks under
    masks/ (of class `value`, at `mask_size` when given; random images and masks of `random_classes` classes,
    seeded; or `mask_for(i)` -> (H, W) array), the mask of image `skip_mask` left out, `class_names` in
    classes.txt. Returns the spec."""
    import numpy as np
    from PIL import Image

    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    if class_names:
        (root / "classes.txt").write_text("\n".join(class_names) + "\n")
    for i in range(count):
        if random_classes:
            image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
            mask = rng.integers(0, random_classes, (height, width), dtype=np.uint8)
        else:
            image = Image.new("RGB", (width, height), (i * 10 % 256, 50, 90))
            side = mask_size or None
            mask = mask_for(i) if mask_for else np.full((side, side) if side else (height, width), value, np.uint8)
        image.save(root / "images" / f"im{i:02d}.png")
        if i != skip_mask:
            Image.fromarray(mask).save(root / "masks" / f"im{i:02d}.png")
    return f"folder:{root}"


@pytest.fixture
def image_folder():
    """image_folder(root, count=12, size=32, value=1, mask_size=None, skip_mask=None) -> 'folder:ROOT'."""
    return make_image_folder


@pytest.fixture(scope="session")
def arm_python() -> list[str]:
    """The command prefix of an aarch64 Python 3.11 under QEMU (qemu-aarch64 -L ROOT VENV/bin/python3.11, the
    repository on PYTHONPATH: `arm_python + ["-m", "vitseg_export", ...]` runs vitseg's torch-free commands there),
    built once and cached by scripts/arm_python.sh (tests/armtools.py); skips, saying why, where it cannot be had."""
    from armtools import arm_python as find_arm_python

    prefix, why = find_arm_python(Path(__file__).resolve().parents[1])
    if prefix is None:
        pytest.skip(f"no aarch64 Python under QEMU: {why}")
    return prefix
