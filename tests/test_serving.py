"""Serving on a real Triton Inference Server (the tritonserver 2.51 binary the [serve] extra installs, Python
backend, CPU): repositories for every backend checked against Triton's own schema, `vitseg serve` answering
over HTTP and gRPC, concurrent clients getting the in-process masks, malformed requests answered with an error
while the server keeps serving, `vitseg verify --server`, `vitseg profile --server`, SIGTERM, a busy port.

The native backends (onnxruntime_onnx, openvino, tensorrt_plan) are not in that build: their repositories are
generated and schema-checked here, and loaded only in the NGC containers (not here)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient", reason="the [serve] extra (tritonclient) is not installed")

from vitseg_export.errors import VitsegError  # noqa: E402
from vitseg_export.serving.repository import repository_from_artifact, validate_config  # noqa: E402
from vitseg_export.serving.server import check_port, find_tritonserver  # noqa: E402
from vitseg_export.settings import ExportRequest, TritonSettings  # noqa: E402

MODEL = "seg"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(repository: Path, log: Path) -> tuple[subprocess.Popen, dict]:
    """`vitseg serve REPO` in a subprocess on free ports; returns it once it prints that it is serving."""
    ports = {"http": _free_port(), "grpc": _free_port(), "metrics": _free_port()}
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "vitseg_export", "serve", str(repository), "--http-port", str(ports["http"]),
                             "--grpc-port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"])],
                            stdout=subprocess.PIPE, stderr=out, text=True)
    for line in proc.stdout:
        if line.startswith("serving"):
            return proc, ports
    proc.wait(timeout=30)
    raise AssertionError(f"vitseg serve exited {proc.returncode}: {log.read_text()[-2000:]}")


def _stubs(repository: Path) -> list[str]:
    """Processes of a server on `repository` (tritonserver and its Python-backend stubs) still alive."""
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if ("tritonserver" in line or "triton_python_backend_stub" in line)
            and (str(repository) in line or "triton_python_backend_stub" in line)]


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """A tiny SegFormer (logits and mask out, dynamic batch) in a Python-backend repository, served by a real
    Triton for the whole session: (repository, ports, the ONNX artifact it serves)."""
    import warnings

    from vitseg_export.checkpoint import load_checkpoint
    from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx

    find_tritonserver()  # the [serve] extra's server, or one on PATH (BackendMissingError otherwise)
    d = tmp_path_factory.mktemp("served")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(load_checkpoint("segformer-b0-test"), d / "m.onnx", OnnxExportSettings(outputs="both"))
    repository_from_artifact(d / "m.onnx", d / "repo", ExportRequest(triton=TritonSettings(name=MODEL, backend="python")))
    proc, ports = _start(d / "repo", d / "serve.log")
    yield d / "repo", ports, d / "m.onnx"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def test_repositories_for_every_backend_follow_tritons_schema(tmp_path, exported):
    """onnxruntime (an .onnx), python (an .onnx, an IR), openvino (an IR) and tensorrt (an engine's manifest:
    TensorRT itself is not here) repositories: config.pbtxt parsed by tritonclient's ModelConfig."""
    from vitseg_export.artifact import ExportManifest, write_artifact
    from vitseg_export.checkpoint import load_checkpoint
    from vitseg_export.export.onnx_export import OnnxExportSettings
    from vitseg_export.export.openvino_export import export_openvino

    onnx_path = exported("segformer-b0-test", outputs="both")
    ir = tmp_path / "m.xml"
    export_openvino(load_checkpoint("segformer-b0-test"), ir, ExportRequest("openvino", OnnxExportSettings(dynamic_batch=True)),
                    lambda m: None)
    engine = tmp_path / "m.engine"
    meta = json.loads(onnx_path.with_name(onnx_path.name + ".json").read_text())["metadata"]
    profile = {"min": [1, 3, 64, 64], "opt": [4, 3, 64, 64], "max": [8, 3, 64, 64]}
    write_artifact(engine, {engine: b"a plan"}, ExportManifest("m.engine", "trt", "0", 6, meta, extra={"profile": profile}))
    cases = [(onnx_path, "onnxruntime", "onnxruntime_onnx", "model.onnx"), (onnx_path, "python", "python", "model.py"),
             (ir, "openvino", "openvino", "model.xml"), (ir, "python", "python", "m.bin"),
             (engine, "tensorrt", "tensorrt_plan", "model.plan")]
    for artifact, backend, named, file in cases:
        result = repository_from_artifact(artifact, tmp_path / "repo", ExportRequest(triton=TritonSettings(name=f"m-{backend}-{artifact.suffix[1:]}", backend=backend)))
        config = validate_config((result.path / "config.pbtxt").read_text())
        assert named in (config.platform, config.backend), (backend, config)
        assert config.max_batch_size == 8 and list(config.dynamic_batching.preferred_batch_size) == [4, 8]
        assert [i.name for i in config.input] == ["pixels"] and list(config.input[0].dims) == [3, 64, 64]
        assert {o.name for o in config.output} >= {"logits"} and config.parameters["vitseg.precision"].string_value == '"fp32"'
        assert (result.path / "1" / file).is_file() and json.loads((result.path / "vitseg.json").read_text())["format"] == "triton"
    with pytest.raises(VitsegError, match="does not follow Triton's model configuration schema"):
        validate_config('name: "x"\nmax_batch_size: "eight"\n')
    static = exported("segformer-b0-test", dynamic_batch=False)
    with pytest.raises(VitsegError, match="static batch of 1"):
        repository_from_artifact(static, tmp_path / "repo", ExportRequest(triton=TritonSettings(backend="onnxruntime")))
    with pytest.raises(VitsegError, match="over the engine's profile maximum 8"):
        repository_from_artifact(engine, tmp_path / "repo", ExportRequest(triton=TritonSettings(backend="tensorrt", max_batch_size=16)))
    with pytest.raises(VitsegError, match="does not run onnx artifacts"):
        repository_from_artifact(onnx_path, tmp_path / "repo", ExportRequest(triton=TritonSettings(backend="openvino")))


def test_export_format_triton_from_a_checkpoint(tmp_path, cli):
    r = cli("export", "segformer-b0-test", "--format", "triton", "--triton-backend", "python", "--triton-name", "b0", "--static-batch",
            "--triton-max-batch", "4", "--triton-preferred-batch", "2,4", "-o", str(tmp_path / "repo"))
    assert r.exit_code == 0, r.stderr  # a checkpoint is exported with a dynamic batch whatever was asked
    config = validate_config((tmp_path / "repo" / "b0" / "config.pbtxt").read_text())
    assert config.max_batch_size == 4 and config.backend == "python"
    assert "checked against Triton's schema" in r.stdout
    r = cli("export", "segformer-b0-test", "--format", "triton", "--triton-preferred-batch", "16", "-o", str(tmp_path / "r2"))
    assert r.exit_code == 2 and "--triton-preferred-batch 16 is outside 1..--triton-max-batch 8" in r.stderr
    assert not (tmp_path / "r2").exists()


def test_http_and_grpc_answer_with_the_in_process_masks(served):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from vitseg_export.runners import runner_for

    _, ports, artifact = served
    pixels = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    with runner_for(artifact) as local:
        expected = local.infer({"pixels": pixels})
    for module, port in ((httpclient, ports["http"]), (grpcclient, ports["grpc"])):
        client = module.InferenceServerClient(url=f"localhost:{port}")
        tensor = module.InferInput("pixels", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        result = client.infer(MODEL, [tensor])
        assert np.array_equal(result.as_numpy("mask"), expected["mask"])
        np.testing.assert_allclose(result.as_numpy("logits"), expected["logits"], atol=1e-6)


def test_eight_concurrent_clients_get_the_in_process_masks(served):
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.http as httpclient

    from vitseg_export.runners import runner_for

    _, ports, artifact = served
    images = np.random.default_rng(1).random((10, 1, 3, 64, 64), dtype=np.float32)
    with runner_for(artifact) as local:
        expected = [local.infer({"pixels": im})["mask"] for im in images]

    def client(seed: int) -> bool:
        c = httpclient.InferenceServerClient(url=f"localhost:{ports['http']}")
        ok = True
        for k in range(10):
            tensor = httpclient.InferInput("pixels", [1, 3, 64, 64], "FP32")
            tensor.set_data_from_numpy(images[(k + seed) % 10])
            ok &= np.array_equal(c.infer(MODEL, [tensor]).as_numpy("mask"), expected[(k + seed) % 10])
        return ok

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(client, range(8)))


def test_malformed_requests_get_an_error_and_the_server_keeps_serving(served):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    _, ports, _ = served
    client = httpclient.InferenceServerClient(url=f"localhost:{ports['http']}")

    def request(name="pixels", shape=(1, 3, 64, 64), dtype="FP32", array=None):
        tensor = httpclient.InferInput(name, list(shape), dtype)
        tensor.set_data_from_numpy(array if array is not None else np.zeros(shape, np.float64 if dtype == "FP64" else np.float32))
        return client.infer(MODEL, [tensor])

    bad = {"wrong input name": dict(name="image"), "FP64": dict(dtype="FP64"), "wrong size": dict(shape=(1, 3, 32, 32)),
           "batch 9 > max_batch_size 8": dict(shape=(9, 3, 64, 64)), "no batch dimension": dict(shape=(3, 64, 64))}
    for case, kwargs in bad.items():
        with pytest.raises(InferenceServerException):
            request(**kwargs)
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, [])  # no input at all
    assert request().as_numpy("mask").shape == (1, 64, 64)  # still serving


def test_verify_and_profile_of_the_live_endpoint(served, cli, tmp_path):
    _, ports, _ = served
    r = cli("verify", "--server", f"http://localhost:{ports['http']}", "--served-model", MODEL, "-r", "segformer-b0-test",
            "--num-images", "8", "--concurrency", "4", "--json", "--report", str(tmp_path / "r.json"))
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and report["backend"] == "triton" and report["device"] == "server"
    assert [s["batch"] for s in report["shapes"]] == [1, 4] and report["batch_consistency"]["images_compared"] == 8
    assert report["max_abs_logit_diff"] < 1e-3
    r = cli("verify", "--server", f"grpc://localhost:{ports['grpc']}", "--served-model", MODEL, "-r", "segformer-b0-test",
            "--num-images", "2", "--max-abs-diff", "0")
    assert r.exit_code == 3 and "FAILED at batch" in r.stderr  # an impossible limit fails: the check can fail
    r = cli("verify", "--server", f"grpc://localhost:{ports['grpc']}", "--served-model", MODEL, "-r", "segformer-b1-test")
    assert r.exit_code == 2 and "is an architecture name" in r.stderr  # another model's name is a wrong reference
    r = cli("profile", "--server", f"http://localhost:{ports['http']}", "--served-model", MODEL, "--concurrency", "1,2",
            "--duration", "1", "--json", str(tmp_path / "p.json"))
    assert r.exit_code == 0, r.stderr
    levels = json.loads((tmp_path / "p.json").read_text())["levels"]
    assert [level["concurrency"] for level in levels] == [1, 2]
    assert all(level["requests"] > 0 and level["errors"] == 0 and level["p50_ms"] > 0 for level in levels)
    r = cli("verify", "--server", f"http://localhost:{ports['http']}", "--served-model", "nosuch", "-r", "segformer-b0-test")
    assert r.exit_code == 2 and "is not ready" in r.stderr and MODEL in r.stderr
    r = cli("verify", "--server", f"http://localhost:{_free_port()}", "--served-model", MODEL, "-r", "segformer-b0-test")
    assert r.exit_code == 2 and "cannot reach a Triton server" in r.stderr


def test_sigterm_stops_the_server_with_nothing_left(served, tmp_path):
    """`vitseg serve ARTIFACT` (a temporary repository), answering; SIGTERM stops it within 20 s, exit 0, with no
    process, port or temp directory left."""
    import tritonclient.http as httpclient

    _, _, artifact = served
    temp_dirs = set(Path(tempfile.gettempdir()).glob("vitseg-serve-*"))
    before = len(_stubs(artifact.parent))
    proc, ports = _start(artifact, tmp_path / "serve.log")
    assert len(set(Path(tempfile.gettempdir()).glob("vitseg-serve-*")) - temp_dirs) == 1
    client = httpclient.InferenceServerClient(url=f"localhost:{ports['http']}")
    assert client.is_model_ready("segformer-b0-test-fp32")  # the artifact's model, by its default name
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)  # a hang fails here; how fast a loaded machine stops is not judged
    assert proc.returncode == 0 and "stopped Triton" in out
    check_port(ports["http"], "--http-port")  # free again, as `vitseg serve` checks it
    assert set(Path(tempfile.gettempdir()).glob("vitseg-serve-*")) == temp_dirs
    assert len(_stubs(artifact.parent)) <= before  # only the session server's own processes remain


def test_serve_refuses_what_it_cannot_run_in_one_line(served, tmp_path, cli):
    repository, ports, artifact = served
    temp_dirs = set(Path(tempfile.gettempdir()).glob("vitseg-serve-*"))  # the session server's own
    r = cli("serve", str(repository), "--http-port", str(ports["http"]), "--grpc-port", str(_free_port()),
            "--metrics-port", str(_free_port()))
    assert r.exit_code == 2 and f"--http-port {ports['http']} is in use" in r.stderr
    r = cli("serve", str(repository), "--tritonserver", str(tmp_path / "nope"))
    assert r.exit_code == 2 and "is not an executable file" in r.stderr
    native = tmp_path / "native"
    repository_from_artifact(artifact, native, ExportRequest(triton=TritonSettings(name="n", backend="onnxruntime")))
    r = cli("serve", str(native), "--http-port", str(_free_port()), "--grpc-port", str(_free_port()),
            "--metrics-port", str(_free_port()))
    assert r.exit_code == 2 and "needs Triton's onnxruntime backend" in r.stderr
    broken = tmp_path / "broken"
    repository_from_artifact(artifact, broken, ExportRequest(triton=TritonSettings(name="b", backend="python")))
    (broken / "b" / "1" / "m.onnx").unlink()  # the model cannot load: Triton's reason comes back in one line
    r = cli("serve", str(broken), "--http-port", str(_free_port()), "--grpc-port", str(_free_port()),
            "--metrics-port", str(_free_port()))
    assert r.exit_code == 2 and "Triton could not load model 'b'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert set(Path(tempfile.gettempdir()).glob("vitseg-serve-*")) == temp_dirs  # none of these left one
