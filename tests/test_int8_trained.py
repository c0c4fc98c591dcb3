"""int8 of a TRAINED model at the default targets, with no layer allowed back to float (issue 37, item 3): every
other int8 test runs 64 px random-weight twins, whose activation ranges and logit margins say nothing about a
trained network's. The checkpoint is shipped in models/ with its card (how it was trained, what it reached)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitseg_export.checkpoint import load_checkpoint
from vitseg_export.formats import get_format
from vitseg_export.settings import ExportRequest, Int8Settings, OnnxExportSettings
from vitseg_export.verdict.verify import verify_artifact

TRAINED = Path(__file__).resolve().parents[1] / "models" / "segformer-b0-test-synthetic"


def test_the_shipped_checkpoint_is_trained():
    """Its card's figure, read back: a random twin sits near chance (about a third of the pixels)."""
    loaded = load_checkpoint(TRAINED)
    assert loaded.meta.architecture == "segformer-b0-test"
    assert loaded.meta.training["val_miou"] > 0.5 and loaded.meta.training["val_pixel_accuracy"] > 0.85


@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), pytest.param("openvino", ".xml", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("openvino") is None, reason="OpenVINO is an optional extra"))])
def test_int8_of_a_trained_model_meets_the_default_targets_with_every_layer_int8(tmp_path, fmt, suffix):
    # default targets (min_agreement / min_miou_vs_reference None: the int8 preset's 99% and 98); max_fallback 0: no
    # layer may return to float. allow_float_fallback only stops the speed refusal: a 64 px model's int8 is slower
    # than its fp32 on every CPU (0.87x here), and on an AVX2 machine that would refuse the export before its verdict
    settings = Int8Settings(max_fallback=0, allow_float_fallback=True)
    request = ExportRequest(fmt, OnnxExportSettings(precision="int8", dynamic_batch=fmt == "onnx"), settings)
    path = tmp_path / f"q{suffix}"
    get_format(fmt).export(load_checkpoint(TRAINED), path, request, lambda m: None)
    int8 = json.loads(path.with_name(path.name + ".json").read_text())["int8"]
    assert int8["targets"] == {"min_agreement": 0.99, "min_miou_vs_reference": 0.98}
    assert int8.get("fallback_layers", []) == [] and int8.get("fallback_groups", []) == []
    assert int8["heldout_agreement"] >= 0.99 and int8["heldout_miou_vs_reference"] >= 0.98
    # most of the compute is int8: the depthwise convolutions (OpenVINO) and attention's activation x activation
    # products stay float by design; measured 85.5% (ONNX) on this checkpoint
    assert int8["int8_mac_share"] > 0.8
    # a second verdict: `vitseg verify`'s own run at the preset on the 64 validation images, 32 of which the export
    # never saw. (On 9 images of another seed stream the OpenVINO IR fell to 98.47% / 95.8: a verdict on few images
    # has a wide spread, which is why exports judge on 32 and more)
    report = verify_artifact(path, str(TRAINED), "synthetic[:64]", 64)
    assert report.passed, report.to_json()["failures"]
    assert report.summary.pixel_agreement >= 0.99 and report.summary.miou_vs_reference >= 0.98
