"""A backend and format registered from this one module: ONNX Runtime with every graph optimization off
(the unoptimized graph, a useful second opinion when an optimized kernel is suspected), writing `.tonnx`
files. It shows up in `--format` choices, `vitseg doctor`, the benchmark matrix and artifact reading
without any other file naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitseg_export import formats, runners
from vitseg_export.artifact import ArtifactInfo, read_onnx_metadata
from vitseg_export.formats import Format, read_artifact_info
from vitseg_export.machine.probes import Availability, module_version
from vitseg_export.runners import Backend


def _make_runner(model, device, outputs, **options):
    from vitseg_export.runners.onnxruntime_runner import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(Path(model), device, optimize=False, **options)
    runner.backend = "onnxruntime-noopt"
    return runner


def _probe() -> Availability:
    version, why = module_version("onnxruntime")
    return Availability(version is not None, f"onnxruntime {version}" if version else str(why), "pip install onnxruntime")


def _export(loaded, output, request, progress):
    from vitseg_export.export.onnx_export import export_onnx

    return export_onnx(loaded, output, request.onnx, progress=progress, int8=request.int8)


def _read_info(path: Path) -> ArtifactInfo:
    return ArtifactInfo.from_metadata(path, "tonnx", read_onnx_metadata(path))


@pytest.fixture
def toy_backend():
    backend = Backend("onnxruntime-noopt", _make_runner, _probe, lambda: ["cpu"])
    fmt = Format("tonnx", (".tonnx",), "ONNX run without graph optimizations", "onnxruntime-noopt", ("fp32", "fp16"),
                 _export, _read_info, _probe, lambda path, m: [f"wrote {path}"])
    with runners.BACKENDS.scoped(backend), formats.FORMATS.scoped(fmt):
        yield
    assert "tonnx" not in formats.FORMATS and "onnxruntime-noopt" not in runners.BACKENDS  # put back


def test_a_backend_registered_from_one_module_is_everywhere(tmp_path, cli, toy_backend):
    r = cli("export", "segformer-b0-test", "--format", "tonnx", "-o", str(tmp_path / "m.tonnx"))
    assert r.exit_code == 0, r.stderr
    assert f"wrote {tmp_path / 'm.tonnx'}" in r.stdout and (tmp_path / "m.tonnx.json").is_file()
    assert read_artifact_info(tmp_path / "m.tonnx").format == "tonnx"
    r = cli("verify", str(tmp_path / "m.tonnx"), "-r", "segformer-b0-test", "--num-images", "2", "--data", "synthetic[:2]",
            "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["backend"] == "onnxruntime-noopt"
    doctor = json.loads(cli("doctor", "--json").stdout)
    assert doctor["formats"]["tonnx"]["available"] and doctor["backends"]["onnxruntime-noopt"]["devices"] == ["cpu"]
    r = cli("benchmark", "vit-seg-tiny-test", "--formats", "onnx,tonnx", "--precisions", "fp32,int8", "--allow-float-fallback", "--output",
            str(tmp_path / "b"), "--num-images", "2", "--iters", "2", "--calib", "synthetic[:4]")
    assert r.exit_code == 0, r.stderr
    rows = {row["name"]: row for row in json.loads((tmp_path / "b" / "benchmark.json").read_text())["rows"]}
    assert set(rows) == {"pytorch-eager-fp32", "onnx-fp32", "onnx-int8", "tonnx-fp32"}  # the format has no int8
    assert rows["tonnx-fp32"]["status"] == "verified" and rows["tonnx-fp32"]["path"].endswith(".tonnx")


def test_unknown_formats_and_backends_name_the_known_ones(cli, exported):
    r = cli("export", "segformer-b0-test", "--format", "tonnx")
    assert r.exit_code == 2 and "'tonnx' is not one of 'onnx'" in r.stderr
    # a real artifact, so the refusal can only come from resolving the backend
    r = cli("verify", str(exported("segformer-b0-test")), "-r", "segformer-b0-test", "--backend", "nosuch")
    assert r.exit_code == 2 and "'nosuch' is not one of 'torch', 'onnxruntime'" in r.stderr
