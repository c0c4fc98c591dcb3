from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from vitseg_export.checkpoint import load_checkpoint
from vitseg_export.errors import ParityError, VitsegError
from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx
from vitseg_export.modeling import registry
from vitseg_export.precisions import get_precision
from vitseg_export.runners import runner_for
from vitseg_export.verdict.testing import assert_mask_parity
from vitseg_export.verdict.verify import verify_artifact

TWINS = [a.name for a in registry.ARCHITECTURES.values() if a.tiny_twin_of is not None]


@pytest.mark.parametrize("name", TWINS)
def test_export_verify_round_trip_for_every_tiny_twin(tmp_path, twin, name):
    loaded = twin(name)
    path = tmp_path / f"{name}.onnx"
    export_onnx(loaded, path, OnnxExportSettings(outputs="both"))
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    ops = {n.op_type for n in model.graph.node}
    assert "LayerNormalization" in ops and "ArgMax" in ops and "Col2Im" not in ops
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert props["vitseg.architecture"] == name and props["vitseg.precision"] == "fp32"
    assert props["vitseg.class_names"] == ["pet", "background", "border"] and props["vitseg.opset"] == 17
    assert {"vitseg.image_size", "vitseg.normalization", "vitseg.source_sha256", "vitseg.vitseg_version"} <= set(props)
    manifest = json.loads((tmp_path / f"{name}.onnx.json").read_text())
    assert manifest["sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    assert manifest["export_settings"]["opset"] == 17 and manifest["self_parity"]["pixel_agreement"] == 1.0
    verdict = verify_artifact(path, name, "synthetic[:4]", num_images=4)
    r = verdict.to_json()
    assert verdict.passed, verdict.failures
    assert r["images"] == 4 and r["pixel_agreement"] >= get_precision("fp32").thresholds.min_agreement
    assert r["max_abs_logit_diff"] < 1e-3 and r["nonfinite"] == 0 and "reference_miou_vs_labels" in r
    for key in ("passed", "precision", "backend", "device", "images", "pixel_agreement", "miou_vs_reference",
                "max_abs_logit_diff", "mean_abs_logit_diff", "nonfinite", "thresholds"):
        assert key in r


def test_dynamic_batch_and_size_for_segformer(exported):
    path = exported("segformer-b0-test", dynamic_size=True, outputs="mask")
    with runner_for(path) as runner:
        for shape in [(1, 3, 64, 64), (3, 3, 77, 101)]:
            out = runner.infer({"pixels": np.random.default_rng(0).random(shape, dtype=np.float32)})
            assert out["mask"].shape == (shape[0], shape[2], shape[3]) and out["mask"].dtype == np.uint8


def test_requests_the_model_cannot_honour_are_refused(tmp_path, twin):
    vit = twin("vit-seg-tiny-test")
    with pytest.raises(VitsegError, match="cannot export with a dynamic size"):
        export_onnx(vit, tmp_path / "a.onnx", OnnxExportSettings(dynamic_size=True))
    with pytest.raises(VitsegError, match="not divisible by the patch size 8"):
        export_onnx(vit, tmp_path / "a.onnx", OnnxExportSettings(image_size=(36, 36)))
    with pytest.raises(VitsegError, match="built for 32x32 input"):
        export_onnx(vit, tmp_path / "a.onnx", OnnxExportSettings(image_size=(48, 48)))
    assert not list(tmp_path.iterdir())


def test_export_refuses_a_graph_that_differs_from_pytorch(tmp_path, monkeypatch, twin):
    """Corrupt the exported bytes before the parity check: nothing may be written."""
    from vitseg_export.export import pipeline

    original = pipeline.module_to_onnx

    def corrupted(*args, **kwargs):
        model = original(*args, **kwargs)
        init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        # random, not uniform: a uniform shift of a conv feeding a LayerNorm cancels exactly
        arr = onnx.numpy_helper.to_array(init) + np.random.default_rng(0).normal(0, 0.5, tuple(init.dims))
        init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
        return model

    monkeypatch.setattr(pipeline, "module_to_onnx", corrupted)
    with pytest.raises(ParityError, match="differs from PyTorch"):
        export_onnx(twin("segformer-b0-test"), tmp_path / "bad.onnx", OnnxExportSettings())
    assert not list(tmp_path.iterdir())


def test_simplify_keeps_outputs(tmp_path, twin):
    result = export_onnx(twin("segformer-b1-test"), tmp_path / "s.onnx", OnnxExportSettings(simplify=True))
    assert result.manifest.export_settings["simplify"] is True
    assert verify_artifact(tmp_path / "s.onnx", "segformer-b1-test", "synthetic[:2]", 2).passed


def _tampered_artifact(exported):
    """An artifact whose weights were changed after export: verify must catch it."""
    path = exported("segformer-b0-test", copy=True)
    model = onnx.load(path)
    for init in model.graph.initializer:
        if init.dims and len(init.dims) == 4 and init.dims[0] == 3:  # the classifier conv
            arr = onnx.numpy_helper.to_array(init).copy()
            arr[1] += 1.0
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(model, path)
    path.with_name(path.name + ".json").unlink()  # its manifest would say it is not the exported file (exit 2)
    return path


def test_verify_fails_loudly_with_exit_code_3(tmp_path, cli, exported):
    path = _tampered_artifact(exported)
    result = cli("verify", str(path), "--reference", "segformer-b0-test", "--data", "synthetic[:4]", "--num-images", "4",
                 "--report", str(tmp_path / "r.json"))
    assert result.exit_code == 3
    assert "FAILED at batch 1, 64x64" in result.stderr and "pixel agreement" in result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is False and report["max_abs_logit_diff"] > 0.1
    with pytest.raises(AssertionError, match="does not match"):
        assert_mask_parity(path, "segformer-b0-test", num_images=2)


def test_verify_cli_passes_and_thresholds_are_overridable(tmp_path, cli, exported):
    path = exported("vit-seg-small-test")
    ok = cli("verify", str(path), "--reference", "vit-seg-small-test", "--num-images", "3",
             "--data", "synthetic[:3]", "--json", "--save-diff", str(tmp_path / "diff"))
    assert ok.exit_code == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["passed"] and report["thresholds"]["min_agreement"] == 0.9999
    assert len(list((tmp_path / "diff").glob("*.png"))) == 3
    # an impossible limit must fail: proves the check can fail
    bad = cli("verify", str(path), "--reference", "vit-seg-small-test", "--num-images", "2",
              "--data", "synthetic[:2]", "--max-abs-diff", "0")
    assert bad.exit_code == 3 and "max |logit diff|" in bad.stderr
    assert assert_mask_parity(path, "vit-seg-small-test", num_images=2)["passed"]


def test_verify_refuses_a_reference_of_another_checkpoint(tmp_path, random_model):
    from vitseg_export.checkpoint import CheckpointMeta, save_checkpoint

    for run, seed in (("a", 0), ("b", 1)):
        model, arch = random_model("segformer-b0-test", seed)
        save_checkpoint(model, CheckpointMeta.for_architecture(arch), tmp_path / run)
    export_onnx(load_checkpoint(tmp_path / "a"), tmp_path / "a.onnx", OnnxExportSettings())
    with pytest.raises(VitsegError, match="exported from another checkpoint"):
        verify_artifact(tmp_path / "a.onnx", str(tmp_path / "b"), "synthetic[:2]", 2)


def test_export_cli_bad_inputs(tmp_path, cli):
    r = cli("export", "vit-seg-tiny-test", "--dynamic-size", "-o", str(tmp_path / "x.onnx"))
    assert r.exit_code == 2 and "dynamic size" in r.stderr and not (tmp_path / "x.onnx").exists()
    r = cli("export", "vit-seg-tiny-test", "--image-size", "7y", "-o", str(tmp_path / "x.onnx"))
    assert r.exit_code == 2 and "is not HxW" in r.stderr
    r = cli("export", str(tmp_path / "missing"), "-o", str(tmp_path / "x.onnx"))
    assert r.exit_code == 2 and "does not exist" in r.stderr
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    r = cli("verify", str(tmp_path / "broken.onnx"), "--reference", "vit-seg-tiny-test")
    assert r.exit_code == 2 and "not a loadable ONNX model" in r.stderr
    r = cli("verify", str(tmp_path / "none.onnx"), "--reference", "vit-seg-tiny-test")
    assert r.exit_code == 2 and "does not exist" in r.stderr
    ok = cli("export", "vit-seg-tiny-test", "-o", str(tmp_path / "ok.onnx"), "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["metadata"]["architecture"] == "vit-seg-tiny-test"
    assert "RANDOM weights" in ok.stderr
