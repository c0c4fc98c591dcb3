"""NVIDIA's own ONNX parser and builder on every graph vitseg makes for TensorRT: TensorRT-RTX builds engines ahead
of time without a GPU, so here every graph kind is parsed and built for real, the parsed network's census is
checked (every quantized Conv/MatMul computes in int8), `--format trt-rtx` writes engines with a pending verdict
and says how to verify them, and what cannot run here says so in one line."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
from onnx import helper

from vitseg_export.errors import BackendMissingError, VitsegError
from vitseg_export.export.int8 import quantized_layers
from vitseg_export.formats import format_for_path, get_format
from vitseg_export.runners import tensorrt_editions
from vitseg_export.settings import EngineSettings, ExportRequest, Int8Settings, OnnxExportSettings, TritonSettings

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                                reason="needs TensorRT-RTX (pip install tensorrt-rtx; the test extra brings it)")

INT8 = dict(calib="synthetic[:8]", calib_images=8, heldout="synthetic[:6]", target="trt",
            allow_float_fallback=True)


def _export_rtx(loaded, path: Path, precision: str = "fp32", engine: EngineSettings | None = None, **onnx_settings):
    from vitseg_export.export.tensorrt_engine import export_rtx_engine

    request = ExportRequest("trt-rtx", OnnxExportSettings(precision=precision, parity_data="synthetic[:4]", **onnx_settings),
                            Int8Settings(**INT8), engine or EngineSettings())
    return export_rtx_engine(loaded, path, request, lambda m: None)


def _check_engine(result, path: Path) -> dict:
    """The written engine and what its manifest must say on a machine where it cannot run."""
    manifest = json.loads(path.with_name(path.name + ".json").read_text())
    x = manifest
    assert path.stat().st_size == manifest["size_bytes"] > 100_000 and manifest["format"] == "trt-rtx"
    assert x["tensorrt_edition"] == "TensorRT-RTX" and x["tensorrt_version"] == tensorrt_editions.TENSORRT_RTX.load().__version__
    assert x["compute_capabilities"] == list(tensorrt_editions.TENSORRT_RTX.default_targets)
    assert x["source_onnx_sha256"] and Path(x["source_onnx"]).is_file() and x["build_seconds"] > 0
    census = x["census"]
    assert census["layers"] and not census["float_with_dequantized_input"] and not census["macs_unknown"]
    assert abs(sum(e["mac_share"] for e in census["by_type"].values()) - 1.0) < 1e-3
    # the verdict branches on the machine: judged where the engine runs (an RTX-class GPU it was built for), pending
    # with the reason elsewhere; the reason is the edition's own account of this machine's GPUs (none, or another)
    why = tensorrt_editions.TENSORRT_RTX.why_not_run_here(x["compute_capabilities"])
    if why is None:  # its GPU is here: the runtime must be too, or that is the reason
        from vitseg_export.runners.tensorrt_runner import tensorrt_availability

        ok, detail, _ = tensorrt_availability(tensorrt_editions.TENSORRT_RTX)
        why = None if ok else detail
    if why is None:
        assert manifest["self_parity"]["pixel_agreement"] is not None and "verdict" not in manifest["self_parity"]
    else:
        assert manifest["self_parity"]["verdict"] == "pending" and manifest["self_parity"]["reason"] == why
        assert manifest["self_parity"]["verify_on_target"].startswith(f"vitseg verify {path.name} --reference ")
    return manifest


def _int8_everywhere_it_was_quantized(manifest: dict, fp32_graph: Path | None = None, every_weighted_layer: bool = False) -> None:
    """Every Conv/MatMul the ONNX quantizes (a DequantizeLinear input) computes in int8 in the parsed network; and,
    read from the fp32 graph the int8 one was made from (no Q/DQ to read), the int8 layers are layers with constant
    weights, all of them where Model Optimizer quantizes every one (`every_weighted_layer`: the ViT; SegFormer's
    decoder and stage-1 attention stay fp16 by its own placement rules)."""
    quantized = set(quantized_layers(onnx.load(manifest["source_onnx"])))
    census = {row["name"]: row["computes_in"] for row in manifest["census"]["layers"]}
    assert quantized and {name: census.get(name) for name in quantized} == dict.fromkeys(quantized, "int8")
    assert manifest["census"]["by_type"]["int8"]["layers"] == len(quantized)
    if fp32_graph is None:  # a graph quantized from PyTorch (QAT): no fp32 ONNX of the same nodes to read
        return
    fp32 = onnx.load(fp32_graph)
    constants = {i.name for i in fp32.graph.initializer} | {o for n in fp32.graph.node if n.op_type == "Constant" for o in n.output}
    weighted = {n.name for n in fp32.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and n.input[1] in constants}
    int8 = {name for name, kind in census.items() if kind == "int8"}
    assert int8 <= weighted and (int8 == weighted) is every_weighted_layer, sorted(weighted - int8)


@pytest.mark.parametrize("name,precision,settings", [
    ("segformer-b0-test", "fp32", {"dynamic_batch": False}),  # static
    ("vit-seg-tiny-test", "fp32", {}),  # dynamic batch
    ("segformer-b0-test", "fp32", {"dynamic_size": True}),
    ("segformer-b0-test", "fp16", {}),  # Model Optimizer's AutoCast
    ("vit-seg-tiny-test", "fp16", {"outputs": "both"}),
    ("segformer-b0-test", "int8", {}),  # Model Optimizer's Q/DQ for TensorRT
    ("vit-seg-tiny-test", "int8", {"outputs": "both"})])
def test_every_graph_kind_builds_with_nvidias_parser_and_builder(tmp_path, twin, exported, name, precision, settings):
    path = tmp_path / f"{name}-{precision}.rtx.engine"
    result = _export_rtx(twin(name), path, precision, **settings)
    manifest = _check_engine(result, path)
    if settings.get("dynamic_size"):
        assert manifest["profile"]["max"][2:] == [128, 128] and manifest["profile"]["min"][2:] == [32, 32]  # 2x the export size
    if precision == "int8":
        _int8_everywhere_it_was_quantized(manifest, exported(name, outputs=settings.get("outputs", "logits")),
                                          every_weighted_layer=name.startswith("vit"))
    else:
        assert set(manifest["census"]["by_type"]) == {"fp32" if precision == "fp32" else "fp16"}


def test_a_bf16_engine_computes_in_bf16_and_its_onnx_is_judged_emulated(tmp_path, twin):
    """bf16 for TensorRT: an AutoCast bf16 graph, built strongly typed, every layer bf16 in the parsed network (the
    census); the ONNX beside it judged against PyTorch by the bf16 preset on ONNX Runtime's CPU provider, emulated;
    the engine's own verdict pending without an RTX GPU."""
    path = tmp_path / "b.rtx.engine"
    manifest = _check_engine(_export_rtx(twin("segformer-b0-test"), path, "bf16"), path)
    assert set(manifest["census"]["by_type"]) == {"bf16"} and manifest["strongly_typed"]
    beside = onnx.load(manifest["source_onnx"])
    assert sum(t.data_type == onnx.TensorProto.BFLOAT16 for t in beside.graph.initializer) > 10
    assert beside.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 I/O
    onnx_manifest = json.loads(Path(manifest["source_onnx"] + ".json").read_text())
    assert onnx_manifest["bf16"]["converter"] == "modelopt.onnx.autocast (bf16)"
    parity = onnx_manifest["self_parity"]
    assert parity["pixel_agreement"] >= 0.995 and parity["miou_vs_reference"] >= 0.99 and parity["max_abs_logit_diff"] <= 1.0
    assert parity["max_abs_logit_diff"] > 0  # rounded to bf16: not the fp32 graph's logits


def test_qat_pruned_and_triton_graphs_build(tmp_path, twin):
    """The graphs of `vitseg qat --target trt`, of a pruned model and of a `--format triton --backend tensorrt`
    repository (its engine's ONNX: dynamic batch, as the repository exports it) build too."""
    from vitseg_export.checkpoint import load_checkpoint, save_checkpoint
    from vitseg_export.export.qat_onnx import qat_onnx
    from vitseg_export.export.tensorrt_engine import rtx_engine_from_artifact
    from vitseg_export.modeling.pruning import prune_model
    from vitseg_export.settings import QatSettings

    qat = tmp_path / "qat.onnx"
    qat_onnx(twin("segformer-b0-test"), qat, ExportRequest("onnx", OnnxExportSettings(precision="int8", parity_data="synthetic[:4]"),
                                                           Int8Settings(**INT8)),
             QatSettings(data="synthetic[:16]", epochs=1, batch_size=8, num_workers=0), lambda m: None)
    engine = tmp_path / "qat.rtx.engine"
    rtx_engine_from_artifact(qat, engine, ExportRequest("trt-rtx"), lambda m: None)
    _int8_everywhere_it_was_quantized(_check_engine(None, engine))

    loaded = twin("vit-seg-tiny-test")
    pruned, _ = prune_model(loaded.model, loaded.meta.family, 0.5, "all")
    meta = copy.deepcopy(loaded.meta)
    meta.config = pruned.config
    save_checkpoint(pruned, meta, tmp_path / "pruned")
    _check_engine(_export_rtx(load_checkpoint(tmp_path / "pruned"), tmp_path / "pruned.rtx.engine"), tmp_path / "pruned.rtx.engine")

    triton = ExportRequest("triton", OnnxExportSettings(parity_data="synthetic[:4]"), triton=TritonSettings(backend="tensorrt"))
    onnx_settings = replace(triton.onnx, dynamic_batch=True)  # what export_repository asks of the engine's export
    path = tmp_path / "triton.rtx.engine"
    _check_engine(_export_rtx(twin("segformer-b0-test"), path, **{k: getattr(onnx_settings, k) for k in
                                                                   ("dynamic_batch", "outputs")}), path)


def test_cli_export_trt_rtx_says_the_verdict_is_pending_and_how_to_get_it(tmp_path, cli):
    out = tmp_path / "b0.rtx.engine"
    r = cli("export", "segformer-b0-test", "--format", "trt-rtx", "--precision", "int8", "--compute-capability", "12.0,8.6",
            "--calib", "synthetic[:8]", "--calib-images", "8", "--allow-float-fallback", "-o", str(out))
    assert r.exit_code == 0, r.stderr
    assert "built ahead of time (no GPU)" in r.stdout and "compute capability 8.6, 12.0" in r.stdout
    census = next(line for line in r.stdout.splitlines() if line.startswith("parsed network computes in: "))
    assert "int8 " in census and " 0 Conv/MatMul layers with Q/DQ inputs TensorRT runs in float" in census
    pending = [line for line in r.stdout.splitlines() if line.startswith("verdict pending")]
    assert len(pending) == 1 and "vitseg verify b0.rtx.engine --reference segformer-b0-test --device cuda" in pending[0]
    manifest = json.loads(out.with_name(out.name + ".json").read_text())
    assert manifest["compute_capabilities"] == ["8.6", "12.0"] and (tmp_path / "b0.rtx.onnx").is_file()
    assert format_for_path(out) is get_format("trt-rtx") and format_for_path(tmp_path / "b0.engine") is get_format("trt")


@pytest.mark.parametrize("args,message", [
    (["--format", "trt-rtx", "--compute-capability", "9.0"], "--compute-capability 9.0: TensorRT-RTX builds for 7.5, 8.0, 8.6, 8.9, 12.0, 12.1 only"),
    (["--format", "trt-rtx", "--compute-capability", "abc,8.6"], "--compute-capability abc: TensorRT-RTX builds for"),
    (["--format", "onnx", "--compute-capability", "8.6"], "--compute-capability applies to --format trt-rtx only, not --format onnx"),
    (["--format", "trt-rtx", "--dla-core", "0"], "--dla-core applies to --format trt or --format triton --triton-backend tensorrt only"),
    (["--format", "trt-rtx", "--weakly-typed"], "--weakly-typed applies to --format trt or --format triton --triton-backend tensorrt only"),
    (["--format", "trt-rtx", "--timing-cache", "t.cache"], "--timing-cache applies to --format trt or --format triton --triton-backend tensorrt only"),
    (["--format", "trt-rtx", "-o", "x.engine"], "--format trt-rtx writes .rtx.engine files"),
    (["--format", "trt-rtx", "--precision", "bf16", "--compute-capability", "8.6,7.5"],
     "--compute-capability 7.5: compute capability 7.5 (Turing) has no bf16 arithmetic")])
def test_bad_engine_requests_are_one_line_and_write_nothing(tmp_path, cli, args, message):
    r = cli("export", "segformer-b0-test", *[a if a != "x.engine" else str(tmp_path / a) for a in args])
    errors = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert r.exit_code == 2 and message in r.stderr and len(errors) == 1, r.stderr
    assert "exporting" not in r.stderr and not list(tmp_path.iterdir())  # refused before any work


@pytest.fixture(scope="module")
def rtx_engine(tmp_path_factory, ) -> Path:
    import warnings

    from vitseg_export.checkpoint import load_checkpoint

    path = tmp_path_factory.mktemp("rtx") / "b0.rtx.engine"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _export_rtx(load_checkpoint("segformer-b0-test"), path)
    return path


def test_an_engine_says_in_one_line_why_it_cannot_run_here(rtx_engine, monkeypatch, cli):
    from vitseg_export.runners.tensorrt_runner import TensorRTRTXRunner, TensorRTRunner

    r = cli("profile", str(rtx_engine), "--device", "cuda", "--iters", "2")
    why = tensorrt_editions.TENSORRT_RTX.why_not_run_here(["8.0", "8.6", "8.9", "12.0", "12.1"])
    if why is None:  # an RTX-class GPU: it runs
        assert r.exit_code == 0, r.stderr
    else:
        assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0 and f"cannot run here: {why}" in r.stderr
    monkeypatch.setattr(tensorrt_editions, "cuda_devices", lambda: [("NVIDIA H200", 9, 0)])  # as on the lent GPU machine
    with pytest.raises(BackendMissingError, match=r"built for compute capability 8.0, 8.6, 8.9, 12.0, 12.1, and this GPU "
                                                  r"\(NVIDIA H200\) is 9.0 \(TensorRT-RTX has no 9.0 target\)"):
        TensorRTRTXRunner(rtx_engine).activate()
    with pytest.raises(VitsegError, match="b0.rtx.engine is a TensorRT-RTX engine, and the tensorrt backend runs TensorRT "
                                          "engines") as wrong:  # before TensorRT itself is looked for
        TensorRTRunner(rtx_engine).activate()
    assert wrong.value.hint == "run it with --backend tensorrt-rtx"


def test_engine_files_are_checked_without_a_gpu(rtx_engine, tmp_path, cli):
    """A cut, random or manifest-less engine says what is wrong with the file, on any machine (not "runs on the GPU
    only", which --device cuda would not cure); a good engine run by a backend that cannot run it says that, not
    "damaged"."""
    import shutil

    data = rtx_engine.read_bytes()
    manifest = rtx_engine.with_name(rtx_engine.name + ".json")
    cases = {"half": data[: len(data) // 2], "random": __import__("os").urandom(len(data))}
    for name, content in cases.items():
        (tmp_path / f"{name}.rtx.engine").write_bytes(content)
        shutil.copy(manifest, tmp_path / f"{name}.rtx.engine.json")
    shutil.copy(rtx_engine, tmp_path / "renamed.rtx.engine")  # without its manifest
    image = tmp_path / "x.png"
    __import__("PIL.Image").Image.new("RGB", (64, 64)).save(image)
    expected = {
        "half": f"half.rtx.engine.json describes another file than half.rtx.engine (its sha256 differs; the file is "
                f"{len(data) // 2:,} bytes, the manifest records {len(data):,}: truncated)",
        "random": "random.rtx.engine.json describes another file than random.rtx.engine (its sha256 differs)",
        "renamed": "renamed.rtx.engine has no manifest renamed.rtx.engine.json beside it"}
    for name, message in expected.items():
        for device in ("cpu", "cuda"):
            r = cli("predict", str(tmp_path / f"{name}.rtx.engine"), str(image), "-o", str(tmp_path / "out"), "--device", device)
            assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, (name, device, r.stderr)
    assert not (tmp_path / "out").exists()
    r = cli("verify", str(rtx_engine), "-r", "segformer-b0-test", "--backend", "onnxruntime")
    assert r.exit_code == 2 and "--backend onnxruntime does not run TensorRT-RTX engines like b0.rtx.engine" in r.stderr
    assert "use --backend tensorrt-rtx" in r.stderr and "damaged" not in r.stderr


def test_a_missing_tensorrt_rtx_is_one_line_before_any_work(tmp_path):
    code = ("import sys, importlib.abc\n"
            "class NoRTX(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0].startswith('tensorrt_rtx'):\n"
            "            raise ImportError('No module named ' + repr(name))\n"
            "sys.meta_path.insert(0, NoRTX())\n"
            "sys.argv = ['vitseg'] + sys.argv[1:]\n"
            "from vitseg_export.cli import main\n"
            "main()\n")
    out = tmp_path / "m.rtx.engine"
    proc = subprocess.run([sys.executable, "-c", code, "export", "segformer-b0-test", "--format", "trt-rtx", "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in proc.stderr.splitlines() if line.strip()] and len(errors) == 1
    assert "TensorRT-RTX is not available here" in errors[0] and "pip install tensorrt-rtx" in errors[0]
    assert not list(tmp_path.iterdir())


def test_check_trt_builds_the_graph_and_names_the_node_the_parser_rejects(tmp_path, cli, exported):
    from vitseg_export.export.tensorrt_engine import check_build

    r = cli("export", "vit-seg-tiny-test", "--check-trt", "--json", "-o", str(tmp_path / "v.onnx"))
    assert r.exit_code == 0, r.stderr
    build = json.loads(r.stdout)["trt_build"]
    assert build["tensorrt_edition"] == "TensorRT-RTX" and build["engine_bytes"] > 0 and set(build["census"]["by_type"]) == {"fp32"}
    human = cli("export", "vit-seg-tiny-test", "--check-trt", "-o", str(tmp_path / "h.onnx"))
    assert "TensorRT build: TensorRT-RTX" in human.stdout and "parsed network computes in: fp32" in human.stdout
    model = onnx.load(exported("vit-seg-tiny-test"))  # a graph with an op TensorRT's parser has no importer for
    model.graph.node.append(helper.make_node("Col2Im", ["logits", "shape", "block"], ["bad"], name="the_bad_node"))
    model.graph.initializer.extend([onnx.numpy_helper.from_array(__import__("numpy").array([4, 4], "int64"), n)
                                    for n in ("shape", "block")])
    model.graph.output.append(helper.make_empty_tensor_value_info("bad"))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    with pytest.raises(VitsegError, match="TensorRT-RTX's ONNX parser rejected bad.onnx at node 'the_bad_node' .Col2Im.: "):
        check_build(bad)


def test_an_op_the_parser_cannot_import_is_named_with_the_lints_reason(tmp_path, cli, exported):
    """An ONNX with an op TensorRT has no importer for (Unique): the parser says only "false"; the error line names
    the node and op, vitseg's lint's reason, and a fix that is not the --check-trt the user may have just given."""
    model = onnx.load(exported("segformer-b0-test"))
    model.graph.node.append(helper.make_node("Unique", ["logits"], ["uq"], name="the_unique"))
    model.graph.output.append(helper.make_empty_tensor_value_info("uq"))
    onnx.save(model, tmp_path / "u.onnx")
    for extra in ((), ("--check-trt",)):
        r = cli("export", str(tmp_path / "u.onnx"), "--format", "trt-rtx", *extra, "-o", str(tmp_path / "u.rtx.engine"))
        line = r.stderr.strip().splitlines()[-1]
        assert r.exit_code == 2 and line.startswith("error: TensorRT-RTX's ONNX parser rejected u.onnx at node "
                                                    "'the_unique' (Unique): no importer for this op; vitseg's lint: "
                                                    "the_unique (Unique): not in the TensorRT ONNX parser's supported operators")
        assert "--check-trt" not in line and not (tmp_path / "u.rtx.engine").exists()


def test_a_trt_rtx_engine_is_served_by_vitsegs_runner_not_tritons_tensorrt_backend(rtx_engine, tmp_path):
    from vitseg_export.serving.repository import repository_from_artifact

    request = ExportRequest("triton", triton=TritonSettings(backend="python"))
    result = repository_from_artifact(rtx_engine, tmp_path / "repo", request)
    files = sorted(p.name for p in (result.path / "1").iterdir())
    assert files == ["b0.rtx.engine", "b0.rtx.engine.json", "model.py", "vitseg-python.json"]
    assert result.manifest.extra["source_format"] == "trt-rtx"
    with pytest.raises(VitsegError, match="Triton's tensorrt backend does not run trt-rtx artifacts") as refused:
        repository_from_artifact(rtx_engine, tmp_path / "repo2", replace(request, triton=TritonSettings(backend="tensorrt")))
    assert refused.value.hint == "use --triton-backend python" and not (tmp_path / "repo2").exists()


def test_doctor_says_trt_rtx_builds_here_and_runs_on_an_rtx_gpu(cli):
    doctor = json.loads(cli("doctor", "--json").stdout)
    assert doctor["formats"]["trt-rtx"]["available"] and doctor["formats"]["trt-rtx"]["precisions"] == {
        "fp32": True, "fp16": True, "int8": True, "bf16": True}
    backend = doctor["backends"]["tensorrt-rtx"]
    assert not backend["available"] and "needs a CUDA GPU to run engines" in backend["detail"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_segformer_b0_at_512_builds_in_every_precision(tmp_path, twin, precision):
    path = tmp_path / f"b0-{precision}.rtx.engine"
    manifest = _check_engine(_export_rtx(twin("segformer-b0"), path, precision, image_size=(512, 512)), path)
    if precision == "int8":
        from vitseg_export.export.onnx_export import export_onnx

        export_onnx(twin("segformer-b0"), tmp_path / "fp32.onnx", OnnxExportSettings(image_size=(512, 512)))
        _int8_everywhere_it_was_quantized(manifest, tmp_path / "fp32.onnx")
