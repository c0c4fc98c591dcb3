"""Every command with a table of bad values, as a user's install runs them (a subprocess where `import click`
fails): each is exit 2 (usage or input), one line on stderr, no traceback; nothing the command reads is
changed (an output onto an input is refused before any work); no NaN or out-of-range value switches a check
off; damaged or mismatched artifacts are input errors, not bugs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from clitools import NO_CLICK, error_lines, one_line, run_no_click, run_table
from conftest import make_image_folder
from PIL import Image

INPUT = "one of this command's inputs"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A checkpoint run, its ONNX and OpenVINO IR, images, a folder dataset, and damaged copies."""
    import warnings

    from vitseg_export.checkpoint import load_checkpoint, save_checkpoint
    from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx
    from vitseg_export.export.openvino_export import export_openvino
    from vitseg_export.settings import ExportRequest

    d = tmp_path_factory.mktemp("bad-values")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = load_checkpoint("segformer-b0-test")
        save_checkpoint(twin.model, twin.meta, d / "ck")
        other = load_checkpoint("segformer-b2-test")
        for parameter in twin.model.parameters():  # the same architecture, other weights: a .bin of the same size
            parameter.data.mul_(1.05)
        save_checkpoint(twin.model, twin.meta, d / "ck2")
    loaded = load_checkpoint(d / "ck")
    export_onnx(loaded, d / "a.onnx", OnnxExportSettings())
    export_openvino(loaded, d / "a.xml", ExportRequest("openvino", OnnxExportSettings(dynamic_batch=False)), lambda m: None)
    export_openvino(other, d / "other" / "b.xml", ExportRequest("openvino", OnnxExportSettings(dynamic_batch=False)),
                    lambda m: None)
    export_openvino(load_checkpoint(d / "ck2"), d / "same" / "c.xml",
                    ExportRequest("openvino", OnnxExportSettings(dynamic_batch=False)), lambda m: None)
    (d / "imgs").mkdir()
    for i in range(3):
        Image.new("RGB", (64, 48), (40 * i, 90, 20)).save(d / "imgs" / f"x{i}.png")
    make_image_folder(d / "data", count=12, size=64)
    os.symlink(d / "a.onnx", d / "link.onnx")
    os.symlink(d / "ck" / "model.safetensors", d / "link-to-weights.onnx")
    _damaged(d)
    _damaged_checkpoints(d)
    make_image_folder(d / "masks-file", count=12, size=64)
    shutil.rmtree(d / "masks-file" / "masks")
    (d / "masks-file" / "masks").write_text("not a folder")
    make_image_folder(d / "binary-classes", count=12, size=64)
    (d / "binary-classes" / "classes.txt").write_bytes(b"\xff\xfe\x00pet")
    return d


def _ir_copy(d: Path, name: str, manifest: bool = True) -> Path:
    (d / name).mkdir()
    for suffix in (".xml", ".bin") + ((".xml.json",) if manifest else ()):
        shutil.copy(d / ("a" + suffix), d / name / ("a" + suffix))
    return d / name / "a.xml"


def _damaged(d: Path) -> None:
    (_ir_copy(d, "no-bin").with_suffix(".bin")).unlink()
    truncated = _ir_copy(d, "truncated").with_suffix(".bin")
    truncated.write_bytes(truncated.read_bytes()[:1000])
    bare = _ir_copy(d, "truncated-no-manifest", manifest=False).with_suffix(".bin")
    bare.write_bytes(bare.read_bytes()[:1000])
    shutil.copy(d / "other" / "b.bin", _ir_copy(d, "other-bin").with_suffix(".bin"))
    _ir_copy(d, "garbage-xml").write_text("<net><layers><layer")
    for key, value in (("image_size", '"abc"'), ("class_names", "5"), ("normalization", '{"mean": [0, 0]}'),
                       ("dynamic_batch", '"yes"')):
        model = onnx.load(d / "a.onnx")
        next(p for p in model.metadata_props if p.key == f"vitseg.{key}").value = value
        onnx.save(model, d / f"bad-{key}.onnx")
    # a copy cut short beside its own manifest: the manifest's recorded size names the damage
    (d / "cut.onnx").write_bytes((d / "a.onnx").read_bytes()[:5000])
    shutil.copy(d / "a.onnx.json", d / "cut.onnx.json")


# config.json fields of the tiny run, damaged one at a time: each must be refused (exit 2), never coerced
BAD_CONFIGS = {
    "isz_00": ("image_size", [0, 0]), "isz_str": ("image_size", "64"), "isz_float": ("image_size", [64.5, 64]),
    "isz_huge": ("image_size", [100000, 100000]), "cls_str": ("class_names", "abc"), "fmt_99": ("format_version", 99),
    "mean_str": ("normalization", {"mean": "abc", "std": [1, 1, 1]}), "std_0": ("normalization", {"mean": [0, 0, 0], "std": [0, 1, 1]}),
    "heads_0": ("model_config.num_heads", [0, 2, 5, 8]), "mlp_nan": ("model_config.mlp_ratio", float("nan")),
    "classes_float": ("model_config.num_classes", 3.0), "dropout_2": ("model_config.classifier_dropout", 2.0),
    "channels_str": ("model_config.num_channels", "3"), "arch_int": ("architecture", 5), "training_str": ("training", "abc"),
}


def _damaged_checkpoints(d: Path) -> None:
    for name, (key, value) in BAD_CONFIGS.items():
        shutil.copytree(d / "ck", d / "bad" / name)
        config = json.loads((d / "ck" / "config.json").read_text())
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
        (d / "bad" / name / "config.json").write_text(json.dumps(config))
    shutil.copy(d / "same" / "c.bin", _ir_copy(d, "same-size-bin-no-manifest", manifest=False).with_suffix(".bin"))
    shutil.copy(d / "a.onnx", d / "wrong-manifest.onnx")
    shutil.copy(d / "a.xml.json", d / "wrong-manifest.onnx.json")  # a manifest, of another file
    model = onnx.load(d / "a.onnx")
    for key, value in (("image_size", "[96, 96]"), ("class_names", '["a", "b", "c", "d", "e"]'), ("precision", '"fp99"')):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        next(p for p in m.metadata_props if p.key == f"vitseg.{key}").value = value
        onnx.save(m, d / f"inconsistent-{key}.onnx")


def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


# (argv with {d} for the inputs' directory, what the one error line must say)
CASES = [
    # data loss: an output onto the command's own inputs
    ("export {d}/ck -o {d}/ck/model.safetensors", INPUT),
    ("export {d}/ck -o {d}/link-to-weights.onnx", INPUT),  # a symlink to the checkpoint's weights
    ("verify {d}/a.onnx -r {d}/ck --report {d}/a.onnx", INPUT),
    ("verify {d}/a.onnx -r {d}/ck --report {d}/a.onnx.json", INPUT),
    ("verify {d}/a.xml -r {d}/ck --report {d}/a.bin", INPUT),
    ("verify {d}/a.onnx -r {d}/ck --report {d}/ck/config.json", INPUT),
    ("verify {d}/a.onnx -r {d}/ck --report {d}/link.onnx", INPUT),
    ("verify {d}/a.onnx -r {d}/ck --data folder:{d}/data --save-diff {d}/data/diff", "is inside"),
    ("profile {d}/a.onnx --report {d}/a.onnx", INPUT),
    ("profile {d}/ck --report {d}/ck/config.json", INPUT),
    ("prune {d}/ck -o {d}/ck", INPUT),
    ("prune {d}/ck -o {d}", "contains"),
    ("train --model segformer-b0-test --init {d}/ck -o {d}/ck", INPUT),
    ("train --model segformer-b0-test --data folder:{d}/data -o {d}/data/run", "is inside"),
    ("predict {d}/a.onnx {d}/imgs/x0.png -o {d}/imgs", "contains"),
    ("benchmark {d}/ck -o {d}/ck", INPUT),
    # a threshold may never switch its check off, nor ask the impossible
    ("verify {d}/a.onnx -r {d}/ck --min-agreement nan", "'--min-agreement': nan is not a fraction in [0, 1]"),
    ("verify {d}/a.onnx -r {d}/ck --min-miou nan", "'--min-miou': nan"),
    ("verify {d}/a.onnx -r {d}/ck --max-abs-diff nan", "'--max-abs-diff': nan is not a finite number >= 0"),
    ("verify {d}/a.onnx -r {d}/ck --max-abs-diff inf", "'--max-abs-diff': inf"),
    ("verify {d}/a.onnx -r {d}/ck --max-abs-diff -1", "'--max-abs-diff': -1.0"),
    ("verify {d}/a.onnx -r {d}/ck --min-agreement 1.5", "'--min-agreement': 1.5 is not a fraction in [0, 1]"),
    ("verify {d}/a.onnx -r {d}/ck --min-agreement -0.1", "'--min-agreement'"),
    ("export {d}/ck --precision int8 --min-agreement nan -o {d}/q.onnx", "'--min-agreement': nan"),
    ("export {d}/ck --precision int8 --min-agreement 1.5 -o {d}/q.onnx", "'--min-agreement': 1.5"),
    # counts, sizes and other numbers, at parse time
    ("verify {d}/a.onnx -r {d}/ck --num-images 0", "'--num-images'"),
    ("verify {d}/a.onnx -r {d}/ck --batch-sizes 0", "--batch-sizes '0'"),
    ("verify {d}/a.onnx -r {d}/ck --batch-sizes 1,x", "--batch-sizes '1,x'"),
    ("verify {d}/a.onnx -r {d}/ck --batch-sizes 100000", "integers in 1..1024"),
    ("verify {d}/a.onnx -r {d}/ck --sizes 100000x100000", "--sizes 100000x100000 is larger than"),
    ("export {d}/ck --image-size 100000x100000 -o {d}/q.onnx", "--image-size 100000x100000 is larger than"),
    ("export {d}/ck --image-size 0x64 -o {d}/q.onnx", "is not HxW"),
    ("export {d}/ck --workspace nan --format onnx -o {d}/q.onnx", "'--workspace': nan"),
    ("export {d}/ck --workspace 0 -o {d}/q.onnx", "'--workspace': 0.0"),
    ("export {d}/ck --calib-images 0 -o {d}/q.onnx", "'--calib-images'"),
    ("export {d}/ck --dla-core -1 -o {d}/q.onnx", "'--dla-core'"),
    ("export {d}/ck --opset 99 -o {d}/q.onnx", "Invalid value for '--opset'"),
    ("profile {d}/a.onnx --batch-sizes 0", "--batch-sizes '0' is not"),
    ("profile {d}/a.onnx --batch 100000", "integers in 1..1024"),
    ("profile {d}/a.onnx --threads 0", "'--threads'"),
    ("profile {d}/a.onnx --threads -1", "'--threads'"),
    ("profile {d}/a.onnx --iters 0", "'--iters'"),
    ("profile {d}/a.onnx --warmup -1", "'--warmup'"),
    ("profile {d}/ck --image-size 100000x100000", "is larger than"),
    ("train --model segformer-b0-test --image-size 0 -o {d}/t", "--image-size '0' is not HxW or S"),
    ("train --model segformer-b0-test --image-size 100000 -o {d}/t", "--image-size 100000x100000 is larger than"),
    ("train --model segformer-b0-test --epochs 0 -o {d}/t", "'--epochs'"),
    ("train --model segformer-b0-test --workers -1 -o {d}/t", "'--workers'"),
    ("train --model segformer-b0-test --lr nan -o {d}/t", "'--lr': nan"),
    ("train --model segformer-b0-test --lr 0 -o {d}/t", "'--lr': 0.0 is not a finite number > 0"),
    ("train --model segformer-b0-test --batch-size 0 -o {d}/t", "'--batch-size'"),
    ("train --model segformer-b0-test --seed -1 -o {d}/t", "'--seed'"),
    ("prune {d}/ck -o {d}/p --ratio nan", "'--ratio': nan is not a fraction in (0, 1)"),
    ("prune {d}/ck -o {d}/p --ratio 1.5", "'--ratio': 1.5"),
    ("prune {d}/ck -o {d}/p --ratio 0", "'--ratio': 0.0"),
    ("prune {d}/ck -o {d}/p --image-size 0", "--image-size '0' is not HxW or S"),
    ("benchmark {d}/ck -o {d}/b --prune nan", "--prune 'nan'"),
    ("benchmark {d}/ck -o {d}/b --prune 2", "--prune '2'"),
    ("benchmark {d}/ck -o {d}/b --num-images 0", "'--num-images'"),
    ("benchmark {d}/ck -o {d}/b --image-size 0x0", "is not HxW"),
    ("benchmark {d}/ck -o {d}/b --threads 0", "'--threads'"),
    ("demo --epochs 0 -o {d}/demo", "'--epochs'"),
    ("demo --image-size 0 -o {d}/demo", "--image-size '0' is not HxW or S"),
    ("demo --train-images 1 -o {d}/demo", "'--train-images'"),
    ("models --bogus", "No such option: --bogus"),
    ("doctor --bogus", "No such option: --bogus"),
    # damaged or mismatched OpenVINO IRs
    ("predict {d}/no-bin/a.xml {d}/imgs/x0.png -o {d}/o", "has no a.bin beside it"),
    ("verify {d}/no-bin/a.xml -r {d}/ck", "has no a.bin beside it"),
    ("predict {d}/truncated/a.xml {d}/imgs/x0.png -o {d}/o", "is not the weights a.xml was exported with"),
    ("verify {d}/truncated-no-manifest/a.xml -r {d}/ck", "is not the weights a.xml was exported with"),
    ("predict {d}/truncated-no-manifest/a.xml {d}/imgs/x0.png -o {d}/o", "is not the one the IR records"),
    ("verify {d}/other-bin/a.xml -r {d}/ck", "is not the weights a.xml was exported with"),
    ("predict {d}/garbage-xml/a.xml {d}/imgs/x0.png -o {d}/o", "is not a readable OpenVINO IR"),
    # malformed artifact metadata, whatever the type
    ("verify {d}/bad-image_size.onnx -r {d}/ck", "'image_size' is \"abc\", not [height, width]"),
    ("predict {d}/bad-class_names.onnx {d}/imgs/x0.png -o {d}/o", "'class_names' is 5, not a list of class names"),
    ("predict {d}/bad-normalization.onnx {d}/imgs/x0.png -o {d}/o", "'normalization'"),
    ("profile {d}/bad-dynamic_batch.onnx", "'dynamic_batch' is \"yes\", not true or false"),
    # metadata that disagrees with the graph, an unknown precision, a manifest of another file, a swapped .bin
    ("verify {d}/inconsistent-image_size.onnx -r {d}/ck", "its metadata says 96x96, and its graph takes 64x64"),
    ("predict {d}/inconsistent-class_names.onnx {d}/imgs/x0.png -o {d}/o", "its metadata says 5 classes, and it predicts 3"),
    ("predict {d}/inconsistent-precision.onnx {d}/imgs/x0.png -o {d}/o", "precision 'fp99' is unknown"),
    ("predict {d}/wrong-manifest.onnx {d}/imgs/x0.png -o {d}/o", "describes another file than wrong-manifest.onnx"),
    ("predict {d}/same-size-bin-no-manifest/a.xml {d}/imgs/x0.png -o {d}/o", "is not the weights a.xml was exported with"),
    # a checkpoint named by one of its files protects all of them
    ("export {d}/ck/config.json -o {d}/ck/model.safetensors", INPUT),
    ("profile {d}/ck/config.json --iters 1 --warmup 0 --report {d}/ck/model.safetensors", INPUT),
    ("verify {d}/a.onnx -r {d}/ck/config.json --report {d}/ck/model.safetensors", INPUT),
    # an output of the wrong kind
    ("export {d}/ck --format openvino -o {d}/m.bin", "--format openvino writes .xml files"),
    ("export {d}/ck -o {d}/m.xml", "--format onnx writes .onnx files"),
    # options that do not apply are refused, not ignored; choices before any work; empty values are values
    ("export {d}/ck --min-shape 1x3x64x64 -o {d}/q.onnx", "--min-shape applies to --format trt"),
    ("export {d}/ck --calib synthetic -o {d}/q.onnx", "--calib applies to --precision int8 only"),
    ("export {d}/ck --triton-max-batch 4 -o {d}/q.onnx", "--triton-max-batch applies to --format triton only"),
    ("export {d}/ck --precision int8 --target bogus -o {d}/q.onnx", "Invalid value for '--target'"),
    ("export {d}/ck --precision int8 --calib-method bogus -o {d}/q.onnx", "Invalid value for '--calib-method'"),
    ("export {d}/ck --image-size '' -o {d}/q.onnx", "is not HxW"),
    ("verify {d}/a.onnx -r {d}/ck --batch-sizes ''", "--batch-sizes ''"),
    ("benchmark {d}/ck -o {d}/b --prune ''", "--prune ''"),
    ("benchmark {d}/ck -o {d}/b --image-size 31", "--image-size 31 is too small"),
    ("benchmark {d}/ck -o {d}/b --formats trt", "TensorRT is not available here"),
    ("demo --precisions bogus -o {d}/demo", "precision 'bogus' is unknown"),
    ("profile {d}/a.onnx --iters 1 --image-size 96", "takes 64x64 input only (a static size)"),
    ("profile {d}/ck --iters 1 --image-size 8", "--image-size 8 is too small"),
    ("train --model segformer-b0-test -o {d}/t --batch-size 99999999999999999999999", "'--batch-size'"),
    ("verify {d}/a.onnx -r {d}/ck --data synthetic[:99999999999999999999999]", "asks for"),
    # comma lists: an empty item or one given twice was typed by mistake (issue 37)
    ("verify {d}/a.onnx -r {d}/ck --batch-sizes 1,,4", "--batch-sizes '1,,4' has an empty item"),
    ("verify {d}/a.onnx -r {d}/ck --batch-sizes 4,1,4", "--batch-sizes '4,1,4' names 4 twice"),
    ("verify {d}/a.onnx -r {d}/ck --sizes 64x64,", "--sizes '64x64,' has an empty item"),
    ("export {d}/ck --format trt-rtx --compute-capability 8.6,,8.6 -o {d}/q.rtx.engine", "--compute-capability '8.6,,8.6' has an empty item"),
    ("export {d}/ck --format trt-rtx --compute-capability 8.6,8.6 -o {d}/q.rtx.engine", "--compute-capability '8.6,8.6' names 8.6 twice"),
    ("export {d}/ck --format trt-rtx --compute-capability 8.6, -o {d}/q.rtx.engine", "--compute-capability '8.6,' has an empty item"),
    ("export {d}/ck --precision fp16 --keep-float encoder.block.0.0, -o {d}/q.onnx", "--keep-float 'encoder.block.0.0,' has an empty item"),
    ("benchmark {d}/ck -o {d}/b --precisions fp32,fp32", "--precisions 'fp32,fp32' names fp32 twice"),
    ("benchmark {d}/ck -o {d}/b --formats onnx,", "--formats 'onnx,' has an empty item"),
    ("demo --precisions fp32,,int8 -o {d}/demo", "--precisions 'fp32,,int8' has an empty item"),
    # an option given twice: click would keep the last one without a word
    ("export {d}/ck --precision int8 --precision fp32 -o {d}/q.onnx", "--precision is given twice"),
    ("export {d}/ck -o {d}/q.onnx -o {d}/q2.onnx", "-o is given twice"),
    ("export {d}/ck -o {d}/q.onnx --output={d}/q2.onnx", "--output is given twice (as -o)"),
    ("verify {d}/a.onnx -r {d}/ck -r {d}/ck2", "-r is given twice"),
    ("export {d}/ck --revision '' -o {d}/q.onnx", "an empty value ('') is not a branch, tag or commit"),
    # a precision the repository's backend cannot serve, said for the repository and its backends
    ("export {d}/ck --format triton --precision bf16 -o {d}/t", "--precision bf16: Triton's onnxruntime backend serves "
     "onnx artifacts, which vitseg does not make in bf16 (use --triton-backend openvino or tensorrt)"),
    # a backend that does not run the artifact's format: not "damaged", which would send the user looking for damage
    ("verify {d}/a.xml -r {d}/ck --backend onnxruntime", "--backend onnxruntime does not run OpenVINO IRs like a.xml"),
    ("verify {d}/a.onnx -r {d}/ck --backend tensorrt-rtx", "--backend tensorrt-rtx does not run ONNX graphs like a.onnx"),
    # a file cut short beside its manifest: the recorded size says so before anything parses it
    ("verify {d}/cut.onnx -r {d}/ck", "cut.onnx is not a loadable ONNX model"),
    # data folders that are not what they claim
    ("verify {d}/a.onnx -r {d}/ck --data folder:{d}/masks-file", "is a file, not a folder of masks"),
    ("verify {d}/a.onnx -r {d}/ck --data folder:{d}/binary-classes", "classes.txt is not UTF-8 text"),
] + [(f"export {{d}}/bad/{name} -o {{d}}/q.onnx", key.rpartition(".")[2]) for name, (key, _) in BAD_CONFIGS.items()]

# environment values, each refused with its name and the range it means
ENV_CASES = [
    ({"VITSEG_MAX_IMAGE_PIXELS": "\u00b2"}, "VITSEG_MAX_IMAGE_PIXELS='\u00b2' is not a whole number"),
    ({"VITSEG_DEBUG": "maybe"}, "VITSEG_DEBUG='maybe' is not a yes or no"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a whole number"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 without RANK"),
    ({"RANK": "2"}, "RANK=2 is not below WORLD_SIZE=1"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' is not a whole number"),
]


def _argv(text: str, d: Path) -> list[str]:
    return ["" if a == "''" else a for a in text.format(d=d).split()]


def test_every_command_refuses_bad_values_in_one_line_and_keeps_its_inputs(inputs, tmp_path):
    before = _tree(inputs)
    cases = CASES + [("models", expected) for _, expected in ENV_CASES]
    table = [_argv(argv, inputs) for argv, _ in CASES] + [(["models"], env) for env, _ in ENV_CASES]
    results = run_table(tmp_path, table)
    problems = []
    for (argv, expected), r in zip(cases, results):
        lines = error_lines(r["stderr"])
        if r["code"] != 2 or len(lines) != 1 or "Traceback" in r["stderr"] or expected not in lines[0]:
            problems.append(f"{argv}: exit {r['code']}, stderr {r['stderr'][-400:]!r}")
    assert not problems, "\n".join(problems)
    assert _tree(inputs) == before  # nothing read was changed, nothing was written beside it
    assert not any((inputs / name).exists() for name in ("q.onnx", "t", "p", "b", "demo", "o"))


def test_an_invalid_environment_value_is_refused_not_replaced(tmp_path):
    proc = run_no_click(tmp_path, "models", env={"VITSEG_MAX_IMAGE_PIXELS": "64MP"})
    assert proc.returncode == 2 and "VITSEG_MAX_IMAGE_PIXELS='64MP' is not a whole number" in one_line(proc)
    assert run_no_click(tmp_path, "models", env={"VITSEG_MAX_IMAGE_PIXELS": "0"}).returncode == 0


def test_a_path_the_terminal_cannot_encode_still_prints(tmp_path, inputs):
    image = tmp_path / "é.png"
    shutil.copy(inputs / "imgs" / "x0.png", image)
    proc = run_no_click(tmp_path, "predict", inputs / "a.onnx", image, "-o", tmp_path / "masks",
                        env={"PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 0, proc.stderr
    assert "\\xe9.png" in proc.stdout and (tmp_path / "masks" / "é_mask.png").is_file()
    missing = run_no_click(tmp_path, "predict", inputs / "a.onnx", tmp_path / "ø.png", "-o", tmp_path / "m2",
                           env={"PYTHONIOENCODING": "ascii"})
    assert missing.returncode == 2 and "\\xf8.png does not exist" in one_line(missing)


def test_predict_names_each_mask_as_it_lands_and_a_summary(tmp_path, inputs):
    proc = run_no_click(tmp_path, "predict", inputs / "a.onnx", *sorted((inputs / "imgs").iterdir()), "-o", tmp_path / "m")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # a success prints no blank line either
    lines = proc.stdout.splitlines()
    assert [line.split(" -> ")[0] for line in lines[:3]] == [str(p) for p in sorted((inputs / "imgs").iterdir())]
    assert lines[3] == f"wrote 3 masks to {tmp_path / 'm'}" and len(lines) == 4
    failed = run_no_click(tmp_path, "predict", inputs / "no-bin" / "a.xml", inputs / "imgs" / "x0.png", "-o", tmp_path / "n")
    assert failed.returncode == 2 and failed.stderr.startswith("error: ")  # no leading blank line


def test_an_interrupted_predict_says_which_masks_it_finished(tmp_path, inputs):
    images = []
    for i in range(40):
        images.append(tmp_path / f"im{i:02d}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (256, 256, 3), np.uint8)).save(images[-1])
    script = tmp_path / "vitseg_no_click.py"
    script.write_text(NO_CLICK.replace("{prelude}", ""))
    proc = subprocess.Popen([sys.executable, str(script), "predict", str(inputs / "a.onnx"), *map(str, images),
                             "--overlay", "-o", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    rest, stderr = proc.communicate(timeout=120)
    finished = [line.split(" -> ")[1].split(", ")[0] for line in (first + rest).splitlines() if " -> " in line]
    assert proc.returncode == 130 and "error: interrupted" in stderr, stderr
    assert 1 <= len(finished) < len(images)
    written = sorted(str(p) for p in (tmp_path / "out").glob("*_mask.png"))
    assert sorted(finished) == written  # every mask it names exists, and it names every mask that exists
    for path in written:
        assert Image.open(path).size == (256, 256)  # whole
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files
    assert json.dumps(finished)  # the names are plain text


def test_a_closed_stdout_is_refused_and_a_full_stderr_costs_no_work(tmp_path, inputs):
    closed = run_no_click(tmp_path, "models", preexec_fn=lambda: os.close(1))
    assert closed.returncode == 2 and "stdout is closed" in closed.stderr
    with open("/dev/full", "w") as full:  # progress and logs go nowhere; the export itself must still land
        proc = run_no_click(tmp_path, "export", inputs / "ck", "-o", tmp_path / "m.onnx", stderr=full)
    assert proc.returncode == 0 and (tmp_path / "m.onnx").is_file() and (tmp_path / "m.onnx.json").is_file()
    with open("/dev/full", "w") as full:
        failed = run_no_click(tmp_path, "export", "--bogus", stderr=full)
    assert failed.returncode == 2  # the exit code still says it


def test_a_failed_int8_export_keeps_no_calibration_cache(tmp_path, twin, monkeypatch):
    """The ranges cache lands with the artifact, in its group: an export that fails after calibrating (here
    at its final self-parity) leaves neither."""
    from vitseg_export.errors import ParityError
    from vitseg_export.export import onnx_export, pipeline
    from vitseg_export.settings import Int8Settings

    real = pipeline.ExportSession.judge
    monkeypatch.setattr(pipeline.ExportSession, "judge", lambda self, plan, candidate, what, progress=None: (
        real(self, plan, candidate, what) if plan.precision.name == "fp32" else
        (_ for _ in ()).throw(ParityError("injected", "test"))))
    with pytest.raises(ParityError):
        onnx_export.export_onnx(twin("segformer-b0-test"), tmp_path / "out" / "q.onnx",
                                onnx_export.OnnxExportSettings(precision="int8"),
                                int8=Int8Settings(calib="synthetic[:4]", calib_images=4,
                                                  min_agreement=0.0, min_miou_vs_reference=0.0, allow_float_fallback=True))
    assert not (tmp_path / "out").exists()  # no artifact, no cache, and not the directories made for them


def test_an_output_directory_made_for_a_failed_write_is_removed(tmp_path, monkeypatch):
    from vitseg_export import files

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "_commit", full)
    with pytest.raises(OSError):
        files.atomic_write_group({tmp_path / "new" / "deep" / "a.png": b"x"})
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(OSError):
        files.atomic_write_group({tmp_path / "kept" / "a.png": b"x"})
    assert (tmp_path / "kept").is_dir()  # directories that were there stay


@pytest.fixture
def special(inputs, tmp_path):
    """Special files where vitseg reads files: a FIFO (opening it waits for a writer forever), a socket, a
    character device, and a directory; as an image, a checkpoint, an artifact, its manifest and weights, and the
    files of a data folder."""
    import socket

    d = tmp_path
    os.mkfifo(d / "pipe.png")
    os.mkfifo(d / "pipe.onnx")
    os.mkfifo(d / "pipe.safetensors")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(d / "sock.png"))
    (d / "dir.png").mkdir()
    shutil.copytree(inputs / "ck", d / "ck-fifo-config")
    (d / "ck-fifo-config" / "config.json").unlink()
    os.mkfifo(d / "ck-fifo-config" / "config.json")
    shutil.copytree(inputs / "ck", d / "ck-fifo-weights")
    (d / "ck-fifo-weights" / "model.safetensors").unlink()
    os.mkfifo(d / "ck-fifo-weights" / "model.safetensors")
    (d / "ir").mkdir()
    for suffix in (".xml", ".xml.json"):
        shutil.copy(inputs / ("a" + suffix), d / "ir" / ("a" + suffix))
    os.mkfifo(d / "ir" / "a.bin")
    shutil.copy(inputs / "a.onnx", d / "fifo-manifest.onnx")
    os.mkfifo(d / "fifo-manifest.onnx.json")
    for name, broken in (("fifo-image", ["images/im03.png", "images/im09.png"]),  # in the train/calib and val splits
                         ("fifo-mask", ["masks/im03.png", "masks/im09.png"]), ("fifo-classes", ["classes.txt"])):
        make_image_folder(d / name, count=12, size=64, class_names=["pet", "background", "border"])
        for file in broken:
            (d / name / file).unlink()
            os.mkfifo(d / name / file)
    yield d
    server.close()


SPECIAL_CASES = [
    ("predict {i}/a.onnx {d}/pipe.png -o {d}/o", "image {d}/pipe.png is a FIFO (named pipe), not a file"),
    ("predict {i}/a.onnx {d}/sock.png -o {d}/o", "image {d}/sock.png is a socket, not a file"),
    ("predict {i}/a.onnx /dev/zero -o {d}/o", "image /dev/zero is a character device, not a file"),
    ("predict {i}/a.onnx {d}/dir.png -o {d}/o", "image {d}/dir.png is a directory, not a file"),
    ("predict {d}/pipe.onnx {i}/imgs/x0.png -o {d}/o", "artifact {d}/pipe.onnx is a FIFO"),
    ("predict {d}/ir/a.xml {i}/imgs/x0.png -o {d}/o", "IR weights {d}/ir/a.bin is a FIFO"),
    ("predict {d}/fifo-manifest.onnx {i}/imgs/x0.png -o {d}/o", "manifest {d}/fifo-manifest.onnx.json is a FIFO"),
    ("predict {d}/pipe.safetensors {i}/imgs/x0.png -o {d}/o", "checkpoint {d}/pipe.safetensors is a FIFO"),
    ("verify {d}/pipe.onnx -r {i}/ck", "artifact {d}/pipe.onnx is a FIFO"),
    ("verify {i}/a.onnx -r {d}/pipe.safetensors", "checkpoint {d}/pipe.safetensors is a FIFO"),
    ("verify {i}/a.onnx -r /dev/zero", "checkpoint /dev/zero is a character device"),
    ("verify {i}/a.onnx -r {d}/ck-fifo-config", "config.json is a FIFO"),
    ("verify {i}/a.onnx -r {d}/ck-fifo-weights", "model.safetensors is a FIFO"),
    ("verify {i}/a.onnx -r {i}/ck --data folder:{d}/fifo-image", "im09.png is a FIFO"),
    ("verify {i}/a.onnx -r {i}/ck --data folder:{d}/fifo-mask", "masks/im09.png is a FIFO"),
    ("verify {i}/a.onnx -r {i}/ck --data folder:{d}/fifo-classes", "classes.txt is a FIFO"),
    ("profile {d}/pipe.onnx", "artifact {d}/pipe.onnx is a FIFO"),
    ("export {d}/pipe.safetensors -o {d}/m.onnx", "checkpoint {d}/pipe.safetensors is a FIFO"),
    ("export {i}/ck --precision int8 --calib folder:{d}/fifo-image -o {d}/m.onnx", "im03.png is a FIFO"),
    ("train --model segformer-b0-test --data folder:{d}/fifo-image --epochs 1 --output {d}/run", "im03.png is a FIFO"),
]


def test_special_files_are_refused_before_anything_opens_them(inputs, special, tmp_path):
    """A FIFO, socket, device or directory where a command reads a file: exit 2 at once, one line naming it (a
    FIFO opened for reading would wait for a writer forever: the table's timeout catches a hang)."""
    table = [_argv(argv.format(i=inputs, d="{d}"), special) for argv, _ in SPECIAL_CASES]
    results = run_table(tmp_path, table, timeout=300)
    problems = []
    for (argv, expected), r in zip(SPECIAL_CASES, results):
        lines = error_lines(r["stderr"])
        wanted = expected.format(i=inputs, d=special)
        if r["code"] != 2 or len(lines) != 1 or "Traceback" in r["stderr"] or wanted not in lines[0]:
            problems.append(f"{argv}: exit {r['code']}, stderr {r['stderr'][-400:]!r}")
    assert not problems, "\n".join(problems)
    assert not any((special / name).exists() for name in ("o", "m.onnx", "run"))
