"""The one export pipeline (export/pipeline.py): a run exports the fp32 graph once and runs PyTorch once per image
set across formats and precisions; the int8 decision and the final verdict rest on the same images and metric;
a Triton repository's artifact is judged at the batches the batcher will form."""

from __future__ import annotations

import json

import pytest

from vitseg_export.export import pipeline
from vitseg_export.runners.torch_runner import TorchRunner

B0 = "segformer-b0-test"


@pytest.fixture
def counted(monkeypatch):
    """Counts torch.onnx exports of the fp32 graph and the images PyTorch's reference runs (its `infer_impl`)."""
    counts = {"graph_exports": 0, "reference_images": 0}
    export, infer = pipeline.module_to_onnx, TorchRunner.infer_impl

    def counted_export(*args, **kwargs):
        counts["graph_exports"] += 1
        return export(*args, **kwargs)

    def counted_infer(self, pixels):
        counts["reference_images"] += int(pixels.shape[0])
        return infer(self, pixels)

    monkeypatch.setattr(pipeline, "module_to_onnx", counted_export)
    monkeypatch.setattr(TorchRunner, "infer_impl", counted_infer)
    return counts


def test_a_benchmark_exports_the_graph_once_and_runs_pytorch_once_per_image_set(tmp_path, counted, monkeypatch):
    """Two formats x two precisions (the ONNX graph dynamic, the IRs static): one torch.onnx export, and PyTorch runs
    each of the 8 verdict images and 4 noise images once, for the exports' verdicts and the benchmark's own pass."""
    from vitseg_export.measure import benchmark

    monkeypatch.setattr(benchmark, "profile", _no_profile)  # latency is not what is counted here
    monkeypatch.setattr(benchmark, "_compare_with_baseline", lambda *a, **k: None)
    settings = benchmark.BenchmarkSettings(formats=("onnx", "openvino"), precisions=("fp32", "fp16"), image_size=(64, 64),
                                           verify_data="synthetic[:16]", verify_images=8)
    report = benchmark.run_benchmark(B0, tmp_path, settings)
    assert [r.status for r in report.rows[1:]] == ["verified"] * 4, [r.status for r in report.rows]
    assert counted["graph_exports"] == 1
    assert counted["reference_images"] == 8 + 4  # 8 held-out images + 4 noise images, each once
    manifests = [json.loads(p.read_text()) for p in sorted((tmp_path / "artifacts").glob("*.json"))]
    assert len(manifests) == 4
    assert {m["self_parity"]["images_judged"]["image_list_sha256"] for m in manifests} == \
        {manifests[0]["self_parity"]["images_judged"]["image_list_sha256"]}  # one image set for every verdict


def _no_profile(*args, **kwargs):
    class Profile:
        gflops, params, file_size_mb = 0.0, 0, 0.0

        def batch(self, n):
            return {"p50_ms": 1.0, "p90_ms": 1.0}

    return Profile()


def test_the_int8_decision_and_the_verdict_are_one_answer(tmp_path, twin):
    """The fallback's held-out figures are the final verdict's at batch 1: same images, same reference, same
    metric (earlier versions decided against the fp32 graph on 32 images and judged on 3 images plus noise)."""
    from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx
    from vitseg_export.settings import Int8Settings

    result = export_onnx(twin(B0), tmp_path / "q.onnx", OnnxExportSettings(precision="int8", verdict_images=12),
                         int8=Int8Settings(calib="synthetic[:24]", calib_images=8, allow_float_fallback=True))
    details, parity = result.manifest.precision_details, result.manifest.self_parity
    alone = next(s for s in parity["shapes"] if s["batch"] == 1)
    assert details["heldout"]["images"] == parity["images"] == 12 and alone["images"] == 12
    assert details["heldout_agreement"] == alone["pixel_agreement"]
    assert details["heldout_miou_vs_reference"] == alone["miou_vs_reference"]
    assert parity["images_judged"]["data"] == "synthetic[:24]" and parity["images_judged"]["noise_images"] == 0
    assert result.manifest.fp32_graph_parity["images_judged"]["image_list_sha256"] == \
        parity["images_judged"]["image_list_sha256"]  # the fp32 graph was judged on the same images


def test_a_triton_repository_from_a_checkpoint_is_judged_at_the_batchers_batches(tmp_path, cli):
    r = cli("export", B0, "--format", "triton", "--triton-max-batch", "6", "--triton-preferred-batch", "2,5",
            "--data", "synthetic[:8]", "-o", str(tmp_path / "repo"))
    assert r.exit_code == 0, r.stderr
    record = json.loads(next((tmp_path / "repo").glob("*/vitseg.json")).read_text())
    assert record["judged_batches"] == [1, 2, 3, 5, 6]  # 1, the middle of 6, the preferred batches, the largest
    assert [s["batch"] for s in record["self_parity"]["shapes"]] == [1, 2, 3, 5, 6]
    assert record["self_parity"]["batch_consistency"]["passed"] and record["metadata"]["max_batch"] == 6


def test_max_batch_raises_the_largest_judged_batch_and_is_recorded(tmp_path, cli):
    from vitseg_export.formats import read_artifact_info

    r = cli("export", B0, "--image-size", "64", "--max-batch", "16", "--data", "synthetic[:4]", "-o", str(tmp_path / "m.onnx"))
    assert r.exit_code == 0, r.stderr
    parity = json.loads((tmp_path / "m.onnx.json").read_text())["self_parity"]
    assert [s["batch"] for s in parity["shapes"]] == [1, 8, 16]
    assert read_artifact_info(tmp_path / "m.onnx").declared_shapes() == {(64, 64): (1, 8, 16)}  # verify's default
    for extra, out, says in ((["--static-batch"], "x.onnx", "needs a dynamic batch"),
                             (["--format", "triton"], "repo", "--triton-max-batch")):
        refused = cli("export", B0, "--image-size", "64", "--max-batch", "16", *extra, "-o", str(tmp_path / out))
        assert refused.exit_code == 2 and says in refused.stderr, refused.stderr
