"""Verdicts at every shape an artifact accepts: per-shape parity and batch consistency. The faulty artifacts
are built here: one exact at batch 1 and wrong inside a batch (as TensorRT engines of SegFormer were,
NVIDIA/TensorRT #4853), one right at its metadata size and wrong at another."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
from graph_faults import break_other_sizes, mix_batch, mix_from_fifth

from vitseg_export.artifact import alternate_size
from vitseg_export.errors import ParityError, VitsegError
from vitseg_export.export import pipeline
from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx
from vitseg_export.formats import read_artifact_info
from vitseg_export.verdict.testing import assert_mask_parity
from vitseg_export.verdict.verify import verify_artifact

B0 = "segformer-b0-test"


def _tampered(exported, fault, **settings):
    path = exported(B0, copy=True, **settings)
    model = onnx.load(path)
    onnx.save(fault(model), path)
    path.with_name(path.name + ".json").unlink()  # its manifest would say it is not the exported file (exit 2)
    return path


def test_declared_shapes_follow_the_artifact(exported):
    static = read_artifact_info(exported(B0, dynamic_batch=False))
    assert static.declared_shapes() == {(64, 64): (1,)}
    with pytest.raises(VitsegError, match="static batch of 1"):
        static.declared_shapes(batch_sizes=(1, 4))
    with pytest.raises(VitsegError, match="static size"):
        static.declared_shapes(sizes=[(96, 96)])
    dynamic = read_artifact_info(exported(B0))
    assert dynamic.declared_shapes() == {(64, 64): (1, 4, 8)}  # 1, a middle batch, the largest it serves (8)
    assert dynamic.declared_shapes(batch_sizes=(8, 1, 4)) == {(64, 64): (1, 4, 8)}
    both = read_artifact_info(exported(B0, dynamic_size=True))
    assert both.declared_shapes() == {(64, 64): (1, 4, 8), alternate_size((64, 64)): (1, 4, 8)}
    assert alternate_size((64, 64)) == (49, 51)
    assert both.declared_shapes((1,), [(80, 96)]) == {(64, 64): (1,), (80, 96): (1,)}
    with pytest.raises(VitsegError, match="too small"):
        both.declared_shapes(sizes=[(16, 16)])


def test_an_engine_is_judged_at_its_profile(tmp_path):
    """Torch- and TensorRT-free: the shapes come from the engine's manifest (its optimization profile)."""
    from vitseg_export.artifact import ArtifactInfo

    info = ArtifactInfo(tmp_path / "m.engine", "trt", "segformer-b0", ["a", "b"], (512, 512), (0.5,) * 3, (0.5,) * 3,
                        "fp16", 17, ["logits"], True, True, None, "x",
                        profile={"min": [1, 3, 256, 256], "opt": [2, 3, 512, 512], "max": [8, 3, 1024, 768]})
    assert info.declared_shapes() == {(512, 512): (1, 2, 4, 8), (256, 256): (2,), (1024, 768): (2,)}
    assert info.declared_shapes(batch_sizes=(4,), sizes=[(300, 300)]) == {(512, 512): (4,), (300, 300): (2,)}
    with pytest.raises(VitsegError, match="accepts batch 1..8"):
        info.declared_shapes(batch_sizes=(16,))
    with pytest.raises(VitsegError, match="not 2000x2000"):
        info.declared_shapes(sizes=[(2000, 2000)])


def test_the_engine_profile_is_read_from_its_manifest(tmp_path):
    from vitseg_export.artifact import ExportManifest, write_artifact

    engine = tmp_path / "m.engine"
    meta = {"architecture": "segformer-b0", "family": "segformer", "class_names": ["a", "b"], "image_size": [64, 64],
            "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]}, "precision": "fp32", "opset": 17,
            "outputs": ["logits"], "dynamic_batch": True, "dynamic_size": False}
    profile = {"min": [1, 3, 64, 64], "opt": [4, 3, 64, 64], "max": [8, 3, 64, 64]}
    write_artifact(engine, {engine: b"plan"}, ExportManifest("m.engine", "trt", "0", 4, meta, extra={"profile": profile}))
    assert read_artifact_info(engine).declared_shapes() == {(64, 64): (1, 4, 8)}


def test_metadata_of_earlier_versions_names_the_size_input_size(tmp_path):
    import json

    from vitseg_export.artifact import META_PREFIX, ArtifactInfo

    meta = {"architecture": "segformer-b0", "class_names": ["a", "b"], "input_size": [48, 64],
            "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]}, "precision": "fp32", "outputs": ["logits"]}
    info = ArtifactInfo.from_metadata(tmp_path / "old.onnx", "onnx", {META_PREFIX + k: json.dumps(v) for k, v in meta.items()})
    assert info.image_size == (48, 64) and info.metadata_json()["image_size"] == [48, 64]
    assert "input_size" not in info.metadata_json()


def test_verify_rejects_an_artifact_wrong_only_inside_a_batch(tmp_path, exported, cli):
    path = _tampered(exported, mix_batch)
    report = verify_artifact(path, B0, "synthetic[:4]", 4)
    r = report.to_json()
    assert not report.passed and report.failed_at.startswith(" at batch 4, 64x64")
    assert [(s["batch"], s["passed"]) for s in r["shapes"]] == [(1, True), (4, False), (8, False)]
    assert r["shapes"][0]["max_abs_logit_diff"] < 1e-4  # exact alone
    assert r["batch_consistency"]["passed"] is False and r["batch_consistency"]["batch_sizes"] == [1, 4, 8]
    assert r["batch_consistency"]["worst_image"]["batch"] in (4, 8)
    assert any("batch consistency" in f and "at batch 4" in f for f in report.failures)
    # the top-level keys are the worst case over shapes
    assert r["pixel_agreement"] == min(s["pixel_agreement"] for s in r["shapes"])
    result = cli("verify", str(path), "-r", B0, "--data", "synthetic[:4]", "--num-images", "4",
                 "--report", str(tmp_path / "r.json"))
    assert result.exit_code == 3 and "FAILED at batch 4, 64x64 (agreement" in result.stderr
    assert "batch 4" in result.stdout and "FAILED" in result.stdout
    assert json.loads((tmp_path / "r.json").read_text())["shapes"][1]["passed"] is False
    # batch 1 alone is today's behaviour: it cannot see the fault
    alone = cli("verify", str(path), "-r", B0, "--data", "synthetic[:4]", "--num-images", "4", "--batch-sizes", "1")
    assert alone.exit_code == 0, alone.stderr
    with pytest.raises(AssertionError, match="at batch 4"):
        assert_mask_parity(path, B0, num_images=4)


def test_verify_rejects_an_artifact_wrong_at_another_size(exported, cli):
    path = _tampered(exported, lambda m: break_other_sizes(m, 64, 3), dynamic_size=True)
    report = verify_artifact(path, B0, "synthetic[:4]", 4)
    r = report.to_json()
    assert not report.passed and "49x51" in report.failed_at
    assert {(s["height"], s["passed"]) for s in r["shapes"]} == {(64, True), (49, False)}
    assert r["batch_consistency"]["passed"]  # wrong, but the same alone and in a batch
    result = cli("verify", str(path), "-r", B0, "--data", "synthetic[:4]", "--num-images", "4", "--batch-sizes", "1")
    assert result.exit_code == 3 and "FAILED at batch 1, 49x51" in result.stderr
    ok = cli("verify", str(path), "-r", B0, "--data", "synthetic[:4]", "--num-images", "4", "--sizes", "64x64")
    assert ok.exit_code == 0, ok.stderr
    with pytest.raises(AssertionError, match="49x51"):
        assert_mask_parity(path, B0, num_images=2)


def test_right_at_batch_4_wrong_at_batch_8_fails_verify_and_the_triton_repository(tmp_path, exported, cli):
    """The batches a Triton batcher forms are the ones judged: verify judges 1, 4 and 8 by default, and a repository
    is judged at its max_batch_size and preferred batches before it is written (NVIDIA/TensorRT#4853)."""
    path = _tampered(exported, mix_from_fifth)
    manifest = json.loads(exported(B0).with_name(exported(B0).name + ".json").read_text())
    manifest.update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), size_bytes=path.stat().st_size)
    path.with_name(path.name + ".json").write_text(json.dumps(manifest))  # as if its exporter had recorded it
    at_four = cli("verify", str(path), "-r", B0, "--data", "synthetic[:8]", "--num-images", "8", "--batch-sizes", "1,4")
    assert at_four.exit_code == 0, at_four.stderr  # what the batch-1-and-4 verdict of earlier versions saw
    result = cli("verify", str(path), "-r", B0, "--data", "synthetic[:8]", "--num-images", "8", "--json")
    assert result.exit_code == 3, result.stderr
    report = json.loads(result.stdout)
    assert [(s["batch"], s["passed"]) for s in report["shapes"]] == [(1, True), (4, True), (8, False)]
    repository = tmp_path / "repo"
    served = cli("export", str(path), "--format", "triton", "-o", str(repository), "--data", "synthetic[:8]")
    assert served.exit_code == 3, served.stderr
    assert "batch 8" in served.stderr and not repository.exists()
    # the same artifact served only at the batches it is right at is judged there and written
    small = cli("export", str(path), "--format", "triton", "-o", str(repository), "--data", "synthetic[:8]",
                "--triton-max-batch", "4", "--triton-preferred-batch", "2,4")
    assert small.exit_code == 0, small.stderr
    record = json.loads(next(repository.glob("*/vitseg.json")).read_text())
    assert record["judged_batches"] == [1, 2, 4] and record["self_parity"]["triton_batches"]["batch_consistency"]["passed"]


def test_export_self_parity_refuses_shapes_the_graph_declares_but_fails(tmp_path, monkeypatch, twin):
    original = pipeline.module_to_onnx
    fault = {"apply": mix_batch}
    monkeypatch.setattr(pipeline, "module_to_onnx", lambda *a, **k: fault["apply"](original(*a, **k)))
    with pytest.raises(ParityError, match="at batch 4, 64x64"):
        export_onnx(twin(B0), tmp_path / "dyn.onnx", OnnxExportSettings())
    assert not list(tmp_path.iterdir())
    # a static graph is never run inside a batch: the same fault is harmless there, and the export says so
    result = export_onnx(twin(B0), tmp_path / "static.onnx", OnnxExportSettings(dynamic_batch=False))
    assert [s["batch"] for s in result.manifest.self_parity["shapes"]] == [1]
    fault["apply"] = lambda m: break_other_sizes(m, 64, 3)
    with pytest.raises(ParityError, match="49x51"):
        export_onnx(twin(B0), tmp_path / "size.onnx", OnnxExportSettings(dynamic_size=True))
    assert not (tmp_path / "size.onnx").exists() and not (tmp_path / "dyn.onnx").exists()


def test_honest_exports_record_every_shape_and_batch_consistency(exported):
    manifest = json.loads(exported(B0, dynamic_size=True).with_name(exported(B0, dynamic_size=True).name + ".json").read_text())
    parity = manifest["self_parity"]
    assert {(s["batch"], s["height"]) for s in parity["shapes"]} == {(b, h) for b in (1, 4, 8) for h in (64, 49)}
    assert all(s["passed"] for s in parity["shapes"])
    consistency = parity["batch_consistency"]
    assert consistency["passed"] and consistency["batch_sizes"] == [1, 4, 8] and consistency["images_compared"] > 0
    assert consistency["worst_image"]["max_abs_logit_diff"] < 1e-4
    static = json.loads(exported(B0, dynamic_batch=False).with_name(
        exported(B0, dynamic_batch=False).name + ".json").read_text())["self_parity"]
    assert [s["batch"] for s in static["shapes"]] == [1] and static["batch_consistency"]["images_compared"] == 0


def test_short_batches_are_filled_and_every_image_is_judged_at_every_batch(exported):
    """3 images at batch 4: the batch is filled with images already seen, their outputs dropped."""
    report = verify_artifact(exported(B0), B0, "synthetic[:3]", 3, batch_sizes=(1, 4)).to_json()
    assert [s["images"] for s in report["shapes"]] == [3, 3]
    assert report["batch_consistency"]["images_compared"] == 3 and report["passed"]


def test_cli_refuses_shapes_the_artifact_does_not_take(exported, cli):
    static = exported(B0, dynamic_batch=False)
    r = cli("verify", str(static), "-r", B0, "--batch-sizes", "1,4")
    assert r.exit_code == 2 and "static batch of 1" in r.stderr
    r = cli("verify", str(exported(B0)), "-r", B0, "--batch-sizes", "0")
    assert r.exit_code == 2 and "--batch-sizes" in r.stderr
    r = cli("verify", str(exported(B0)), "-r", B0, "--sizes", "96x96")
    assert r.exit_code == 2 and "static size" in r.stderr


def test_parity_is_judged_on_fp32_logits_at_the_input_resolution(twin, exported):
    """NVIDIA's SegFormer parity lessons (TensorRT-Model-Connect): logits upsampled to the input size before
    argmax (SegFormer predicts at H/4), and an fp32 reference."""
    from vitseg_export.runners import runner_for

    pixels = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    with runner_for(twin(B0), backend="torch") as reference, runner_for(exported(B0)) as artifact:
        ref, art = reference.infer({"pixels": pixels})["logits"], artifact.infer({"pixels": pixels})["logits"]
        assert reference.precision == "fp32"
    assert ref.shape == art.shape == (1, 3, 64, 64) and ref.dtype == np.float32
