"""Real-size models (select with `pytest -m slow`) and the CUDA paths (`gpu`, skipped without a GPU)."""

from __future__ import annotations

import pytest

from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx
from vitseg_export.verdict.verify import verify_artifact


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("segformer-b0", (512, 512)), ("vit-seg-base", (128, 128)), ("segformer-b2", (256, 320))])
def test_full_size_export_and_verify(tmp_path, twin, name, size):
    result = export_onnx(twin(name), tmp_path / f"{name}.onnx", OnnxExportSettings(image_size=size, outputs="both"))
    assert result.manifest.rewrites
    verdict = verify_artifact(tmp_path / f"{name}.onnx", name, "synthetic[:4]", 4)
    assert verdict.passed, verdict.failures


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_verifies_on_cuda(tmp_path, twin, precision):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu)")
    export_onnx(twin("segformer-b0-test"), tmp_path / "m.onnx", OnnxExportSettings(precision=precision))
    verdict = verify_artifact(tmp_path / "m.onnx", "segformer-b0-test", "synthetic[:4]", 4, device="cuda")
    assert verdict.passed, verdict.failures
