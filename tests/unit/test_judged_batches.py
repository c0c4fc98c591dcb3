"""Where an artifact is judged: 1, a middle batch and the largest it declares it serves (artifact.judged_batches),
and the shapes each kind of artifact declares (ArtifactInfo.declared_shapes), by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitseg_export.artifact import DEFAULT_MAX_BATCH, ArtifactInfo, judged_batches


@pytest.mark.parametrize("largest, also, expected", [
    (8, (), (1, 4, 8)),
    (16, (), (1, 8, 16)),
    (8, (4, 8), (1, 4, 8)),  # a Triton repository's default preferred batches
    (8, (3,), (1, 3, 4, 8)),
    (3, (), (1, 2, 3)),
    (2, (), (1, 2)),
    (1, (), (1,)),
])
def test_judged_batches(largest, also, expected):
    assert judged_batches(largest, also) == expected


def _info(**kw) -> ArtifactInfo:
    base = dict(path=Path("m.onnx"), format="onnx", architecture="a", class_names=["x", "y"], image_size=(64, 64),
                mean=(0.5,) * 3, std=(0.5,) * 3, precision="fp32", opset=17, outputs=["logits"], dynamic_batch=True,
                dynamic_size=False, source_sha256=None, vitseg_version="0")
    return ArtifactInfo(**{**base, **kw})


def test_a_dynamic_batch_is_judged_up_to_its_declared_largest_batch():
    assert DEFAULT_MAX_BATCH == 8
    assert _info().declared_shapes() == {(64, 64): (1, 4, 8)}  # no max_batch recorded: an earlier vitseg's artifact
    assert _info(max_batch=32).declared_shapes() == {(64, 64): (1, 16, 32)}
    assert _info(dynamic_batch=False, max_batch=0).declared_shapes() == {(64, 64): (1,)}
    assert _info(max_batch=32).metadata_json()["max_batch"] == 32
    assert "max_batch" not in _info(dynamic_batch=False).metadata_json()


def test_an_engine_profile_is_judged_at_min_opt_a_middle_batch_and_max():
    engine = _info(format="trt", profile={"min": [1, 3, 64, 64], "opt": [2, 3, 64, 64], "max": [8, 3, 64, 64]})
    assert engine.declared_shapes() == {(64, 64): (1, 2, 4, 8)}
