"""A real Triton Inference Server in the foreground: `vitseg serve REPO_DIR|ARTIFACT`.

The `tritonserver` binary comes from `--tritonserver`, the `nvidia-pytriton` package (Triton 2.51 with its
Python backend, the `[serve]` extra: it runs on CPU-only machines) or PATH (an NGC container's
`/opt/tritonserver/bin`). For the packaged build, the Python backend is assembled in a temp directory with the
stub for the running Python, and the stub runs model.py in this Python environment (its `bin/` first on PATH).
Before the server starts: the ports are free, and every model's backend is one this server has. Then the
server's readiness is polled until every model is READY (or a model failed to load: Triton's reason, one line).
Ctrl-C and SIGTERM stop it cleanly: Triton stops accepting requests, finishes those in flight, unloads the
models; no child process and no temp directory is left.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from vitseg_export.errors import BackendMissingError, VitsegError
from vitseg_export.formats import is_artifact, read_artifact_info
from vitseg_export.progress import Progress, silent
from vitseg_export.serving.repository import NATIVE_BACKEND, REPOSITORY_RECORD, repository_from_artifact
from vitseg_export.settings import ExportRequest, TritonSettings

SERVE_HINT = "pip install 'vitseg-export[serve]' (it brings a tritonserver with the Python backend), or pass --tritonserver"
EXIT_TIMEOUT_S = 10  # Triton's --exit-timeout-secs: in-flight requests finish, idle keep-alive clients are not waited for
READY_TIMEOUT_S = 300.0  # model loading (a large engine, a cold OpenVINO cache) can take minutes


@dataclass(frozen=True)
class ServerBinary:
    """A tritonserver and what it needs: its shared libraries and its backends."""

    path: Path
    backends: Path  # the directory of backend folders (python, onnxruntime, ...)
    libraries: Path | None = None  # LD_LIBRARY_PATH for a packaged build
    stubs: Path | None = None  # Python-backend stubs per Python version (nvidia-pytriton)

    def backend_names(self) -> list[str]:
        """The backends this server has (folder names)."""
        return sorted(p.name for p in self.backends.iterdir() if p.is_dir()) if self.backends.is_dir() else []


def _packaged() -> ServerBinary | None:
    """The tritonserver inside the nvidia-pytriton wheel, if it is installed."""
    spec = importlib.util.find_spec("pytriton")  # located, never imported: PyTriton's own API is not used
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    return ServerBinary(binary, root / "backends", root.parent.parent / "nvidia_pytriton.libs", root / "python_backend_stubs")


def find_tritonserver(explicit: Path | None = None) -> ServerBinary:
    """The server to run: `explicit`, the packaged one, or tritonserver on PATH (backends beside it, as in the
    NGC container); BackendMissingError naming what to install."""
    if explicit is not None:
        if not explicit.is_file() or not os.access(explicit, os.X_OK):
            raise VitsegError(f"--tritonserver {explicit} is not an executable file", "pass the path of a tritonserver binary")
        return ServerBinary(explicit, explicit.resolve().parent.parent / "backends")
    packaged = _packaged()
    if packaged is not None:
        return packaged
    found = shutil.which("tritonserver")
    if found is None:
        raise BackendMissingError("no tritonserver here (not installed, not on PATH)", SERVE_HINT)
    return ServerBinary(Path(found), Path(found).resolve().parent.parent / "backends")


def backend_directory(server: ServerBinary, work: Path) -> Path:
    """A --backend-directory for `server`: its own, or (packaged build) one assembled in `work` with the
    Python-backend stub for this Python (the wheel keeps one per version beside the backend)."""
    if server.stubs is None:
        return server.backends
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server.stubs / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise BackendMissingError(f"this tritonserver has no Python-backend stub for Python {version}",
                                  f"run vitseg with one of: {', '.join(sorted(p.name for p in server.stubs.iterdir()))}")
    target = work / "backends" / "python"
    target.mkdir(parents=True)
    for entry in (server.backends / "python").iterdir():
        if entry.name != "__pycache__":
            (target / entry.name).symlink_to(entry)
    shutil.copy2(stub, target / stub.name)
    return work / "backends"


def repository_backends(repository: Path) -> dict[str, str]:
    """model name -> the Triton backend its config.pbtxt names (`backend:` or the platform's backend)."""
    platforms = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}
    models = {}
    for config in sorted(repository.glob("*/config.pbtxt")):
        fields = {}
        for line in config.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("backend", "platform") and value.strip().startswith('"'):
                fields[key.strip()] = value.strip().strip('"')
        backend = fields.get("backend") or platforms.get(fields.get("platform", ""), fields.get("platform", ""))
        models[config.parent.name] = backend
    return models


def check_port(port: int, option: str) -> None:
    """VitsegError when `port` cannot be listened on (another process has it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            raise VitsegError(f"{option} {port} is in use ({e.strerror or e})", f"pick a free port with {option}") from None


@dataclass
class Serving:
    """What the foreground server is: ports, models, and where its log goes."""

    http_port: int
    grpc_port: int
    metrics_port: int
    models: dict[str, str] = field(default_factory=dict)
    log: Path | None = None

    @property
    def urls(self) -> dict[str, str]:
        """How clients reach it."""
        return {"http": f"http://localhost:{self.http_port}", "grpc": f"grpc://localhost:{self.grpc_port}",
                "metrics": f"http://localhost:{self.metrics_port}/metrics"}


def _get(url: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b""


def model_states(http_port: int) -> list[dict]:
    """Triton's repository index: every model with its state and reason."""
    status, body = _get(f"http://127.0.0.1:{http_port}/v2/repository/index", b"{}")
    return json.loads(body) if status == 200 and body else []


def _last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("E") or "error" in line.lower()]
    return " ".join((lines[-1] if lines else "no error logged").split())[:300]


def wait_ready(process: subprocess.Popen, serving: Serving, stop: threading.Event, timeout: float = READY_TIMEOUT_S) -> bool:
    """Until the server and every model are ready (True) or `stop` is set (False); VitsegError with Triton's
    reason when a model fails to load or the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        if process.poll() is not None:
            raise VitsegError(f"tritonserver exited with code {process.returncode} while starting "
                              f"({_last_error(serving.log) if serving.log else 'see its log'})", "see the server log")
        states = model_states(serving.http_port)
        failed = [m for m in states if m.get("state") == "UNAVAILABLE" and m.get("reason")]
        if failed:
            m = failed[0]
            reason = " ".join(m["reason"].split(" At: ")[0].split())  # a Python backend's reason ends with its traceback
            raise VitsegError(f"Triton could not load model {m['name']!r}: {reason[:300]}",
                              "fix the model (see the server log), or re-export it")
        ready = {m["name"] for m in states if m.get("state") == "READY"}
        if set(serving.models) <= ready and _get(f"http://127.0.0.1:{serving.http_port}/v2/health/ready")[0] == 200:
            return True
        stop.wait(0.25)
    if stop.is_set():
        return False
    raise VitsegError(f"Triton did not become ready within {timeout:.0f} s", "see the server log")


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """For the block: Ctrl-C and SIGTERM set an event (the server is then stopped cleanly) instead of raising."""
    stop = threading.Event()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (Triton finishes in-flight requests and unloads the models), then SIGKILL of what is left of its
    process group (the Python-backend stubs) once Triton's own exit timeout has passed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=EXIT_TIMEOUT_S + 10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _repository(source: Path, work: Path, server: ServerBinary) -> Path:
    """The repository to serve: `source` itself, or a temporary one holding the artifact `source` (its format's
    native backend where this server has it, else the Python backend)."""
    if not is_artifact(source):
        if not source.is_dir():
            raise VitsegError(f"{source} is neither a model repository nor an artifact", "pass REPO_DIR, or a .onnx, .xml or .engine")
        if not any(source.glob("*/config.pbtxt")):
            raise VitsegError(f"{source} holds no model (no NAME/config.pbtxt)", "write one with `vitseg export --format triton`")
        return source
    native = NATIVE_BACKEND[read_artifact_info(source).format]
    backend = native if native in server.backend_names() else "python"
    repository = work / "repository"
    repository_from_artifact(source, repository, ExportRequest(triton=TritonSettings(backend=backend)))
    return repository


def serve(source: Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
          tritonserver: Path | None = None, on_ready: Callable[[Serving], None] = lambda s: None,
          log: Progress = silent) -> Serving:
    """Run Triton on `source` (a repository or an artifact) in the foreground until Ctrl-C or SIGTERM; returns
    once it has stopped cleanly. Raises VitsegError for a busy port, a missing server, a model it cannot load."""
    server = find_tritonserver(tritonserver)
    for port, option in ((http_port, "--http-port"), (grpc_port, "--grpc-port"), (metrics_port, "--metrics-port")):
        check_port(port, option)
    with tempfile.TemporaryDirectory(prefix="vitseg-serve-") as tmp:
        work = Path(tmp)
        repository = _repository(source, work, server)
        backends = backend_directory(server, work)
        serving = Serving(http_port, grpc_port, metrics_port, repository_backends(repository), work / "tritonserver.log")
        available = sorted(p.name for p in backends.iterdir() if p.is_dir())
        missing = {name: b for name, b in serving.models.items() if b not in available}
        if missing:
            name, backend = next(iter(missing.items()))
            raise VitsegError(f"model {name!r} needs Triton's {backend} backend, and this tritonserver has only "
                              f"{', '.join(available)}", "write it with `vitseg export --format triton --triton-backend python`, "
                              "or serve the repository in the NGC Triton container")
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        if server.libraries is not None:  # the packaged build's libraries, and this Python's libpython for the stub
            libraries = [str(server.libraries), sysconfig.get_config_var("LIBDIR") or "", env.get("LD_LIBRARY_PATH", "")]
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libraries if p)
        command = [str(server.path), f"--model-repository={repository}", f"--backend-directory={backends}",
                   f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}",
                   "--allow-gpu-metrics=false", f"--exit-timeout-secs={EXIT_TIMEOUT_S}", "--strict-readiness=true",
                   "--exit-on-error=false"]  # a model that fails to load: its reason is read from the index, then stop
        with _stop_on_signals() as stop, open(serving.log, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                _run(process, serving, stop, on_ready)
            finally:
                _stop(process)
    return serving


def _run(process: subprocess.Popen, serving: Serving, stop: threading.Event, on_ready: Callable[[Serving], None]) -> None:
    """Wait until the server is ready, tell `on_ready`, then serve until `stop` (or the server dies)."""
    if not wait_ready(process, serving, stop):
        return
    on_ready(serving)
    while not stop.is_set():
        if process.poll() is not None:
            raise VitsegError(f"tritonserver exited with code {process.returncode} "
                              f"({_last_error(serving.log) if serving.log else 'see its log'})", "see the server log")
        stop.wait(0.5)


__all__ = ["REPOSITORY_RECORD", "ServerBinary", "Serving", "backend_directory", "check_port", "find_tritonserver",
           "model_states", "repository_backends", "serve", "wait_ready"]
