"""Golden files (compare/golden.py): an export's or a verify's images and PyTorch's outputs on them, so an artifact is
judged where it runs without PyTorch or the checkpoint, by the same judge, presets and shapes; a golden file that was
edited or belongs to another checkpoint, model or precision is refused in one line (exit 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_cli

from vitseg_export.compare.golden import golden_bytes, read_golden

B0 = "segformer-b0-test"
# torch (and what needs it) cannot be imported: what the device has (numpy, Pillow, onnxruntime, safetensors, typer, rich)
NO_TORCH = r"""
import sys, importlib.abc
class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith(("torch.", "torchvision", "onnxscript", "transformers", "modelopt")):
            raise ImportError(f"blocked import of {name}: verify --golden must not need it")
sys.meta_path.insert(0, BlockTorch())
sys.argv = ["vitseg"] + sys.argv[1:]
from vitseg_export.cli import main
main()
"""


def _torch_free(tmp_path, *args) -> subprocess.CompletedProcess:
    script = tmp_path / "no_torch.py"
    script.write_text(NO_TORCH)
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """fp32 and int8 ONNX artifacts of the tiny twin exported with --save-golden, and one of another model."""
    root = tmp_path_factory.mktemp("golden")
    for name, args in (("fp32.onnx", []), ("int8.onnx", ["--precision", "int8", "--num-images", "8"]),
                       ("static.onnx", ["--static-batch"])):
        result = run_cli("export", B0, "--image-size", "64", "--data", "synthetic[:16]", "--save-golden",
                         "-o", str(root / name), *args)
        assert result.exit_code == 0, result.stderr
    other = run_cli("export", "vit-seg-tiny-test", "--data", "synthetic[:16]", "--save-golden", "-o", str(root / "vit.onnx"))
    assert other.exit_code == 0, other.stderr
    return root


def _copy(made, tmp_path, name: str):
    for suffix in ("", ".json", ".golden"):
        shutil.copy(made / (name + suffix), tmp_path / (name + suffix))
    return tmp_path / name


def test_an_export_writes_its_golden_file_in_its_group_and_names_it(made):
    manifest = json.loads((made / "fp32.onnx.json").read_text())
    golden = read_golden(made / "fp32.onnx.golden")
    assert manifest["golden"]["file"] == "fp32.onnx.golden"
    assert manifest["golden"]["size_bytes"] == (made / "fp32.onnx.golden").stat().st_size
    header = golden.header
    assert header["logits_dtype"] == "float32" and read_golden(made / "int8.onnx.golden").header["logits_dtype"] == "float16"
    assert header["shapes"] == [{"size": [64, 64], "batches": [1, 4, 8]}]
    assert header["images"]["images"] == 16 and header["images"]["noise_images"] == 4
    assert header["images"]["image_list_sha256"] == manifest["self_parity"]["images_judged"]["image_list_sha256"]
    assert header["checkpoint"]["sha256"] == manifest["metadata"]["source_sha256"]
    pixels, logits, masks = (golden.tensors[f"{k}/64x64"] for k in ("pixels", "logits", "masks"))
    assert pixels.dtype == np.uint8 and pixels.shape == (16, 3, 64, 64)
    assert logits.shape == (16, 3, 64, 64) and np.array_equal(masks, logits.argmax(1))


def test_verify_with_a_golden_file_needs_no_torch_and_gives_verifys_verdict(made, tmp_path):
    for name, count in (("fp32.onnx", 16), ("int8.onnx", 8)):
        proc = _torch_free(tmp_path, "verify", made / name, "--golden", made / f"{name}.golden", "--json")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["passed"] and [s["batch"] for s in report["shapes"]] == [1, 4, 8]
        assert report["batch_consistency"]["passed"] and report["golden"]["artifact_sha256_matches"]
        assert report["images"] == count and "recorded in a golden file" in report["reference"]
    # the same figures as verify against PyTorch on the same 8-bit images (the fp32 graph is exact either way)
    assert json.loads(_torch_free(tmp_path, "verify", made / "fp32.onnx", "--golden", made / "fp32.onnx.golden",
                                  "--json").stdout)["max_abs_logit_diff"] < 1e-5
    # the blocker is real: verify against the checkpoint needs torch
    blocked = _torch_free(tmp_path, "verify", made / "fp32.onnx", "-r", B0)
    assert blocked.returncode != 0 and "blocked import of torch" in blocked.stderr


def test_a_golden_file_that_does_not_belong_is_refused_naming_the_field(made, tmp_path, cli):
    cases = [
        (made / "vit.onnx.golden", "its architecture is"),  # another model
        (made / "int8.onnx.golden", "too coarse for the fp32 preset"),  # float16 logits for fp32's 1e-3 limit
    ]
    for golden, says in cases:
        result = cli("verify", str(made / "fp32.onnx"), "--golden", str(golden))
        assert result.exit_code == 2 and says in result.stderr, result.stderr
    # shapes the artifact does not take: a golden file of batches 1, 4, 8 for a static-batch artifact
    static = cli("verify", str(made / "static.onnx"), "--golden", str(made / "fp32.onnx.golden"))
    assert static.exit_code == 2 and "static batch of 1" in static.stderr
    # another checkpoint: the same architecture, other weights
    from vitseg_export.compare.golden import write_golden

    golden = read_golden(made / "fp32.onnx.golden")
    header = {**golden.header, "checkpoint": {"source": "runs/other", "sha256": "0" * 64}}
    write_golden(tmp_path / "other.golden", header, golden.tensors)
    other = cli("verify", str(made / "fp32.onnx"), "--golden", str(tmp_path / "other.golden"))
    assert other.exit_code == 2 and "its checkpoint sha256 is" in other.stderr


def test_an_edited_golden_file_is_refused_and_a_consistent_forgery_fails(made, tmp_path, cli):
    artifact = _copy(made, tmp_path, "fp32.onnx")
    golden = read_golden(made / "fp32.onnx.golden")
    masks = golden.tensors["masks/64x64"].copy()
    masks[:, :, :32] = (masks[:, :, :32] + 1) % 3  # half of every reference mask changed
    tensors = {**golden.tensors, "masks/64x64": masks}
    # edited in place: its header still records the old sha256
    import safetensors.numpy

    edited = safetensors.numpy.save(tensors, metadata={"format": "vitseg-golden", "version": "1",
                                                      "golden": json.dumps(golden.header)})
    (tmp_path / "edited.golden").write_bytes(edited)
    result = cli("verify", str(artifact), "--golden", str(tmp_path / "edited.golden"))
    assert result.exit_code == 2 and "was edited after it was made: tensor masks/64x64" in result.stderr
    # rewritten with matching hashes: read as genuine, and the verdict fails on the masks
    (tmp_path / "forged.golden").write_bytes(golden_bytes({k: v for k, v in golden.header.items() if k != "tensors"},
                                                          tensors))
    forged = cli("verify", str(artifact), "--golden", str(tmp_path / "forged.golden"))
    assert forged.exit_code == 3 and "FAILED" in forged.stderr


def test_golden_options_that_do_not_apply_are_refused(made, cli):
    for extra, says in ((["--locate"], "needs the checkpoint"), (["-r", B0], "--reference does not apply"),
                        (["--num-images", "4"], "--num-images does not apply")):
        result = cli("verify", str(made / "fp32.onnx"), "--golden", str(made / "fp32.onnx.golden"), *extra)
        assert result.exit_code == 2 and says in result.stderr, result.stderr
    not_golden = cli("verify", str(made / "fp32.onnx"), "--golden", str(made / "fp32.onnx.json"))
    assert not_golden.exit_code == 2 and "is not a golden file" in not_golden.stderr
    from_artifact = cli("export", str(made / "fp32.onnx"), "--format", "trt-rtx", "--save-golden")
    assert from_artifact.exit_code == 2 and "--save-golden applies to checkpoints" in from_artifact.stderr


def test_verify_save_golden_makes_one_for_an_existing_artifact(made, tmp_path, cli):
    artifact = _copy(made, tmp_path, "int8.onnx")
    (tmp_path / "int8.onnx.golden").unlink()
    result = cli("verify", str(artifact), "-r", B0, "--data", "synthetic[:16]", "--num-images", "6", "--save-golden")
    assert result.exit_code == 0, result.stderr
    golden = read_golden(tmp_path / "int8.onnx.golden")
    assert golden.header["images"]["images"] == 6 and golden.header["artifact"]["name"] == "int8.onnx"
    again = _torch_free(tmp_path, "verify", artifact, "--golden", tmp_path / "int8.onnx.golden")
    assert again.returncode == 0, again.stderr
