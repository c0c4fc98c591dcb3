"""Exit codes that do not depend on how the result is printed, and inputs refused as bad input (exit 2, one line):
a failed --check-trt with and without --json/--report, an architecture name given where the checkpoint an artifact
was exported from is needed, empty values where a path, checkpoint, artifact or data spec is named, and a manifest
that disagrees with the artifact's own metadata."""

from __future__ import annotations

import ast
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from clitools import error_lines, run_table
from PIL import Image
from torch import nn

from vitseg_export.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx
from vitseg_export.modeling import registry
from vitseg_export.modeling.registry import IMAGENET_MEAN, IMAGENET_STD, Architecture, ModelFamily

CLI = Path(__file__).resolve().parents[1] / "vitseg_export" / "cli"


def _one_error(r) -> str:
    """The one error line of a failed command (progress lines on stderr aside), asserting there is no traceback."""
    lines = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert "Traceback" not in r.stderr and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# ---- 1. --check-trt: the same exit code whether the result is printed as text or JSON ---------------------------

@dataclass(frozen=True)
class CubicConfig:
    num_classes: int = 3
    width: int = 8


class CubicNet(nn.Module):
    """Conv (stride 2) -> bicubic upsampling -> 1x1 classifier: exports a Resize in cubic mode, which runs in ONNX
    Runtime (so the export passes its parity check) and which TensorRT's ONNX parser refuses."""

    def __init__(self, config: CubicConfig):
        super().__init__()
        self.config = config
        self.stem = nn.Conv2d(3, config.width, 3, stride=2, padding=1)
        self.classifier = nn.Conv2d(config.width, config.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(torch.relu(self.stem(x)), scale_factor=2.0, mode="bicubic", align_corners=False)
        return self.classifier(up)


class CubicFamily(ModelFamily):
    name = "cubicseg"
    display_name = "CubicSeg"
    config_class = CubicConfig
    model_class = CubicNet
    head_prefix = "classifier."

    def architectures(self) -> list[Architecture]:
        return [Architecture("cubicseg-test", self.name, CubicConfig(), 48, IMAGENET_MEAN, IMAGENET_STD,
                             "a graph TensorRT's parser refuses")]


@pytest.fixture
def cubic_family():
    family = CubicFamily()
    with registry.FAMILIES.scoped(family), registry.ARCHITECTURES.scoped(*family.architectures()):
        yield family


def test_a_failed_check_trt_exits_2_with_and_without_json(tmp_path, cli, cubic_family):
    human = cli("export", "cubicseg-test", "--check-trt", "-o", str(tmp_path / "h.onnx"))
    assert human.exit_code == 2, human.stderr
    assert "TensorRT: " in human.stdout and "mode 'cubic'" in human.stdout
    assert "h.onnx has 1 TensorRT parser incompatibilit" in _one_error(human)

    as_json = cli("export", "cubicseg-test", "--check-trt", "--json", "-o", str(tmp_path / "j.onnx"))
    assert as_json.exit_code == 2, as_json.stderr  # was 0: the refusal was raised only when printing text
    printed = json.loads(as_json.stdout)  # the result is printed whole, then the refusal
    assert printed["trt_lint"] and "mode 'cubic'" in printed["trt_lint"][0] and printed["trt_build"] is None
    assert "j.onnx has 1 TensorRT parser incompatibility (listed in trt_lint); first: /segmenter/net/Resize (Resize): " \
           "mode 'cubic'" in _one_error(as_json)

    reported = cli("export", "cubicseg-test", "--check-trt", "--json", "--report", str(tmp_path / "r.json"),
                   "-o", str(tmp_path / "r.onnx"))
    assert reported.exit_code == 2 and json.loads((tmp_path / "r.json").read_text())["trt_lint"]
    assert (tmp_path / "j.onnx").is_file()  # the artifact itself is valid for onnxruntime and stays written


def test_a_failed_tensorrt_build_exits_2_with_json_too(tmp_path, cli, monkeypatch):
    from vitseg_export.errors import VitsegError
    from vitseg_export.export import tensorrt_engine
    from vitseg_export.runners.tensorrt_editions import TENSORRT_RTX

    try:
        TENSORRT_RTX.load()
    except VitsegError:
        pytest.skip("TensorRT-RTX is not installed here: --check-trt runs only its lint")

    def refuse(graph, settings=None):
        raise VitsegError("TensorRT-RTX's ONNX parser rejected graph.onnx at node 'x' (Col2Im): no importer")

    monkeypatch.setattr(tensorrt_engine, "check_build", refuse)
    r = cli("export", "segformer-b0-test", "--image-size", "64", "--check-trt", "--json", "-o", str(tmp_path / "b.onnx"))
    assert r.exit_code == 2 and "rejected graph.onnx at node 'x'" in _one_error(r), r.stderr
    assert json.loads(r.stdout)["trt_build"]["error"].startswith("TensorRT-RTX's ONNX parser rejected")


# ---- 2. an architecture name where the checkpoint an artifact came from is needed ------------------------------

@pytest.fixture
def trained(tmp_path, random_model):
    """(a checkpoint of weights that are not the architecture's random ones, its fp32 ONNX with manifest)."""
    model, arch = random_model("segformer-b0-test", 1)
    run = tmp_path / "run"
    save_checkpoint(model, CheckpointMeta.for_architecture(arch), run)
    artifact = tmp_path / "a.onnx"
    export_onnx(load_checkpoint(run), artifact, OnnxExportSettings(image_size=(64, 64)))
    return run, artifact


def test_an_architecture_name_is_no_reference_for_an_artifact_of_a_checkpoint(tmp_path, cli, trained):
    run, artifact = trained
    r = cli("verify", str(artifact), "-r", "segformer-b0-test", "--num-images", "2")
    assert r.exit_code == 2, r.stderr  # was 3: random weights judged, "FAILED"
    line = _one_error(r)
    assert f"--reference segformer-b0-test is an architecture name (random weights), not the checkpoint a.onnx " \
           f"was exported from ({run})" in line and "pass that checkpoint" in line
    locate = cli("verify", str(artifact), "-r", "segformer-b0-test", "--locate")
    assert locate.exit_code == 2 and "is an architecture name" in _one_error(locate)


def test_an_architecture_name_is_no_reference_for_a_served_model_of_a_checkpoint(cli, trained, monkeypatch):
    from vitseg_export.formats import read_artifact_info
    from vitseg_export.serving import client

    parameters = {k: {"string_value": v} for k, v in read_artifact_info(trained[1]).metadata_props().items()}
    monkeypatch.setattr(client, "model_config", lambda endpoint, c: {"parameters": parameters})  # what Triton says
    r = cli("verify", "--server", "http://localhost:8000", "--served-model", "m", "-r", "segformer-b0-test")
    assert r.exit_code == 2 and "is an architecture name (random weights), not the checkpoint " \
                                "http://localhost:8000/m was exported from" in _one_error(r), r.stderr


# ---- 3. an empty value where a path, checkpoint, artifact or data spec is named --------------------------------

BLANK_CASES = [
    "export ''", "export ' '", "export ck --data ''", "export ck --calib ''", "export ck --heldout ''",
    "export ck -o ''", "export ck --report ''", "export ck --timing-cache ''",
    "verify ''", "verify a.onnx -r ''", "verify a.onnx -r ' '", "verify a.onnx --data ''", "verify a.onnx --save-diff ''",
    "verify a.onnx --report ''",
    "predict '' x.png -o out", "predict a.onnx '' -o out", "predict a.onnx x.png -o ''", "predict a.onnx x.png -o out --report ''",
    "profile ''", "profile a.onnx ''", "profile a.onnx --report ''",
    "benchmark ''", "benchmark ck --data ''", "benchmark ck --calib ''", "benchmark ck -o ''", "benchmark ck --report ''",
    "prune '' -o out", "prune ck -o ''", "prune ck -o out --data ''", "prune ck -o out --report ''",
    "train -o ''", "train -o out --init ''", "train -o out --model ''", "train -o out --data ''", "train -o out --report ''",
    "qat ''", "qat ck --data ''", "qat ck --calib ''", "qat ck --heldout ''", "qat ck -o ''", "qat ck --report ''",
    "serve ''", "serve repo --tritonserver ''",
    "demo -o '' --precisions nosuch", "demo --model ''", "demo --report ''", "models --report ''", "doctor --report ''",
]


def test_an_empty_path_checkpoint_artifact_or_data_spec_is_refused_before_any_work(tmp_path, monkeypatch, random_model):
    """Typer made "" the Path ".": `vitseg export ""` exported the run in the working directory (exit 0), `vitseg
    demo -o ""` trained into it. Run inside a run directory, which must come out unchanged (the bad --precisions
    makes a demo that takes "" for "." stop at once)."""
    model, arch = random_model("segformer-b0-test")
    run = tmp_path / "run"
    save_checkpoint(model, CheckpointMeta.for_architecture(arch), run)
    before = sorted(p.name for p in run.iterdir())
    monkeypatch.chdir(run)
    results = run_table(tmp_path, [shlex.split(case) for case in BLANK_CASES])  # '' empty, ' ' blank
    wrong = []
    for case, r in zip(BLANK_CASES, results):
        lines = error_lines(r["stderr"])
        if r["code"] != 2 or len(lines) != 1 or "an empty value (" not in lines[0] or "Traceback" in r["stderr"]:
            wrong.append(f"{case}: exit {r['code']}, {r['stderr'].strip()[-300:]!r}")
    assert not wrong, "\n".join(wrong)
    assert sorted(p.name for p in run.iterdir()) == before


# ---- 4. a manifest that disagrees with the artifact's own metadata -------------------------------------------

@pytest.mark.parametrize("field, edit", [
    ("source.checkpoint", lambda m, tmp: m["source"].update(checkpoint=str(tmp / "other-run"))),
    ("source.checkpoint", lambda m, tmp: m["source"].update(checkpoint=str(tmp / "missing"))),
    ("metadata.source_checkpoint", lambda m, tmp: m["metadata"].update(source_checkpoint=str(tmp / "other-run"))),
    ("metadata.precision", lambda m, tmp: m["metadata"].update(precision="fp16")),
    ("metadata.image_size", lambda m, tmp: m["metadata"].update(image_size=[96, 96])),
    ("metadata.class_names", lambda m, tmp: m["metadata"].update(class_names=["a", "b", "c"])),
])
def test_a_manifest_that_disagrees_with_the_artifact_is_refused_naming_the_field(tmp_path, cli, trained, random_model,
                                                                                field, edit):
    run, artifact = trained
    other, arch = random_model("segformer-b0-test", 2)
    save_checkpoint(other, CheckpointMeta.for_architecture(arch), tmp_path / "other-run")
    manifest = artifact.with_name(artifact.name + ".json")
    data = json.loads(manifest.read_text())
    edit(data, tmp_path)
    manifest.write_text(json.dumps(data))
    for argv in (["verify", str(artifact), "--num-images", "2"],  # the default reference: the manifest's, refused first
                 ["verify", str(artifact), "-r", str(run), "--num-images", "2"],
                 ["predict", str(artifact), str(tmp_path / "x.png"), "-o", str(tmp_path / "masks")]):
        if argv[0] == "predict":
            Image.new("RGB", (64, 64), (20, 90, 30)).save(tmp_path / "x.png")
        r = cli(*argv)
        assert r.exit_code == 2, (argv, r.stderr)
        line = _one_error(r)
        assert f"a.onnx.json disagrees with a.onnx on {field}: the manifest says " in line, line
        assert "re-export the artifact, or restore the manifest" in line
        assert "reference:" not in r.stderr  # refused before it names a reference
    assert not (tmp_path / "masks").exists()


def test_an_untouched_artifact_verifies_against_the_checkpoint_its_manifest_names(tmp_path, cli, trained):
    run, artifact = trained
    r = cli("verify", str(artifact), "--num-images", "2", "--data", "synthetic[:2]", "--json")
    assert r.exit_code == 0, r.stderr
    assert f"reference: {run} (the source checkpoint a.onnx's manifest records)" in r.stderr
    assert json.loads(r.stdout)["reference"] == str(run)  # the checkpoint it names is the one judged against


# ---- 5. one name per job: no two CLI helpers called _report --------------------------------------------------

def test_the_cli_helpers_say_what_they_do():
    defined = {p.name: {n.name for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.FunctionDef)}
               for p in CLI.glob("*.py")}
    assert not [name for name, functions in defined.items() if "_report" in functions]
    assert "_exit_for" in defined["__init__.py"] and "_print_export_result" in defined["export.py"]
    assert "_emit_verdict" in defined["verify.py"]


def test_a_piped_failure_after_work_started_ends_with_its_one_error_line(tmp_path):
    """Piped (not a terminal): the steps that ran are plain indented lines, no bar or control codes, and the error is
    the last line and the only `error:` one (docs/reference/errors.md)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "vitseg_export", "export", "segformer-b0-test", "--precision", "int8",
                           "--min-agreement", "1.0", "--calib", "synthetic[:4]", "--calib-images", "4",
                           "-o", str(tmp_path / "q.onnx")], capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert proc.returncode == 3, proc.stderr
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1
    assert len(lines) > 1 and all(line.startswith("  ") for line in lines[:-1]), lines  # the steps, indented
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
