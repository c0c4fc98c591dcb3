from __future__ import annotations

import numpy as np
import pytest

from vitseg_export.errors import BackendMissingError, VitsegError
from vitseg_export.runners import runner_for


def _available_runners(twin, exported):
    loaded = twin("segformer-b0-test")
    path = exported("segformer-b0-test", outputs="both", dynamic_size=True)
    runners = [("torch-cpu", runner_for(loaded, "cpu", backend="torch", outputs=("logits", "mask"))),
               ("onnxruntime-cpu", runner_for(path, "cpu"))]
    try:
        import torch

        if torch.cuda.is_available():
            runners.append(("torch-cuda", runner_for(loaded, "cuda", backend="torch", outputs=("logits", "mask"))))
    except ImportError:
        pass
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        runners.append(("onnxruntime-cuda", runner_for(path, "cuda")))
    return runners


def test_every_available_runner_obeys_one_interface(twin, exported):
    pixels = np.random.default_rng(0).random((2, 3, 64, 80), dtype=np.float32)
    outputs = {}
    for name, runner in _available_runners(twin, exported):
        with pytest.raises(RuntimeError, match="activate"):
            runner.infer({"pixels": pixels})
        with runner:
            assert runner.class_names == ["pet", "background", "border"] and tuple(runner.image_size) == (64, 64)
            out = runner.infer({"pixels": pixels})
            with pytest.raises(VitsegError, match="expected input 'pixels'"):
                runner.infer({"image": pixels})
        assert set(out) == {"logits", "mask"}, name
        assert out["logits"].shape == (2, 3, 64, 80) and out["logits"].dtype == np.float32
        assert out["mask"].shape == (2, 64, 80) and out["mask"].dtype == np.uint8
        assert np.array_equal(out["mask"], out["logits"].argmax(1))
        outputs[name] = out
    ref = outputs.pop("torch-cpu")
    for name, out in outputs.items():
        assert np.abs(out["logits"] - ref["logits"]).max() < 1e-3, name


def test_static_size_runner_refuses_other_sizes(exported):
    with runner_for(exported("vit-seg-tiny-test")) as runner:
        with pytest.raises(VitsegError, match="takes 32x32 images, got 40x40"):
            runner.infer({"pixels": np.zeros((1, 3, 40, 40), np.float32)})


def test_missing_backends_say_how_to_install(exported):
    import onnxruntime as ort

    path = exported("vit-seg-tiny-test")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendMissingError, match="pip install onnxruntime-gpu"):
            runner_for(path, "cuda").activate()
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(BackendMissingError, match="no CUDA GPU"):
            runner_for("vit-seg-tiny-test", "cuda", backend="torch").activate()
    with pytest.raises(VitsegError, match="unknown device"):
        runner_for(path, "tpu")


@pytest.mark.gpu
def test_cuda_torch_runner_matches_cpu(twin):
    import torch

    loaded = twin("segformer-b0-test")
    pixels = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    with runner_for(loaded, "cpu", backend="torch") as cpu, runner_for(loaded, "cuda", backend="torch") as gpu:
        a, b = cpu.infer({"pixels": pixels})["logits"], gpu.infer({"pixels": pixels})["logits"]
    assert torch.cuda.is_available() and np.abs(a - b).max() < 1e-3
