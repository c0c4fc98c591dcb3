"""The client side of a served model: what clients receive is judged (`TritonClientRunner` behind the runner
interface, so `vitseg verify --server` is the same comparator loop as file verify) and timed (`load_test`:
concurrent clients for a while, client-side latency percentiles, throughput and errors).

A runner's batch of N images goes out as N concurrent single-image requests, so the server's dynamic
batcher forms the batches: the shapes a served model is judged at are the concurrency levels it is sent.
The artifact's description comes from the model's own config (`parameters` vitseg wrote into config.pbtxt).
Talks KServe v2 over HTTP (`http://host:port`, the default) or gRPC (`grpc://host:port`) with tritonclient.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vitseg_export.artifact import META_PREFIX, ArtifactInfo
from vitseg_export.errors import BackendMissingError, VitsegError
from vitseg_export.runners.base import INPUT_NAME, Runner
from vitseg_export.tables import lazy_module

http = lazy_module("tritonclient.http")  # the [serve] extra
grpc = lazy_module("tritonclient.grpc")
SERVE_HINT = "pip install 'vitseg-export[serve]'"
NUMPY_TYPES = {"FP32": np.float32, "FP16": np.float16, "UINT8": np.uint8}


@dataclass(frozen=True)
class Endpoint:
    """Where a served model is: protocol, host:port, model name."""

    protocol: str  # "http" or "grpc"
    address: str  # host:port
    model: str

    @classmethod
    def parse(cls, url: str, model: str) -> "Endpoint":
        """'http://localhost:8000', 'grpc://host:8001' or 'localhost:8000' (HTTP); VitsegError otherwise."""
        scheme, sep, rest = url.partition("://")
        protocol, address = (scheme, rest) if sep else ("http", url)
        host, colon, port = address.rstrip("/").rpartition(":")
        if protocol not in ("http", "grpc") or not colon or not host or not port.isdigit() or "/" in address.rstrip("/"):
            raise VitsegError(f"--server {url!r} is not a Triton endpoint", "use http://HOST:PORT or grpc://HOST:PORT")
        return cls(protocol, address.rstrip("/"), model)

    def __str__(self) -> str:
        return f"{self.protocol}://{self.address}/{self.model}"

    def client(self, concurrency: int = 1) -> Any:
        """A tritonclient client for this endpoint (BackendMissingError without tritonclient)."""
        try:
            if self.protocol == "grpc":
                return grpc.InferenceServerClient(url=self.address)
            return http.InferenceServerClient(url=self.address, concurrency=concurrency, connection_timeout=10.0,
                                              network_timeout=300.0)
        except ImportError:
            raise BackendMissingError("talking to a Triton server needs tritonclient", SERVE_HINT) from None


def _reason(e: Exception) -> str:
    """The message of a tritonclient error, on one line."""
    text = e.message() if callable(getattr(e, "message", None)) else str(e)
    return " ".join(str(text).split())[:300]


def model_config(endpoint: Endpoint, client: Any) -> dict:
    """The served model's config as JSON (the same form over HTTP and gRPC); VitsegError naming what is wrong
    when the server cannot be reached or the model is not ready."""
    as_json = {"as_json": True} if endpoint.protocol == "grpc" else {}
    try:
        live = client.is_server_live()
    except Exception as e:  # connection refused, DNS, timeouts: tritonclient raises several types
        raise VitsegError(f"cannot reach a Triton server at {endpoint.protocol}://{endpoint.address} ({_reason(e)})",
                          "start one with `vitseg serve REPO`, or check --server") from None
    if not live:
        raise VitsegError(f"the Triton server at {endpoint.address} is not live", "see its log")
    if not client.is_model_ready(endpoint.model):
        index = client.get_model_repository_index(**as_json)
        rows = index.get("models", []) if isinstance(index, dict) else index
        known = {r.get("name"): r for r in rows}
        state = known.get(endpoint.model)
        detail = (f"state {state.get('state')}: {state.get('reason', '')}" if state else
                  f"the server has {', '.join(sorted(known)) or 'no models'}")
        raise VitsegError(f"model {endpoint.model!r} is not ready on {endpoint.address} ({detail})",
                          "pass --model with a model the server has loaded")
    config = client.get_model_config(endpoint.model, **as_json)
    return config["config"] if endpoint.protocol == "grpc" else config


def served_info(endpoint: Endpoint, config: dict) -> ArtifactInfo:
    """The ArtifactInfo of a served vitseg model, from the `vitseg.*` parameters of its config."""
    parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items() if k.startswith(META_PREFIX)}
    if not parameters:
        raise VitsegError(f"{endpoint} was not written by vitseg (its config has no vitseg parameters)",
                          "write its repository with `vitseg export --format triton`")
    return ArtifactInfo.from_metadata(endpoint, "triton", parameters)  # type: ignore[arg-type]


def served_devices() -> list[str]:
    """The triton backend's one "device": the server at the other end."""
    return ["server"]


class TritonClientRunner(Runner):
    """A model served by Triton, behind the runner interface: a batch of N images is sent as N concurrent
    single-image requests (up to `concurrency` in flight), which the server's dynamic batcher batches."""

    backend = "triton"
    devices = ("server",)

    def __init__(self, url: str, device: str = "server", outputs: tuple[str, ...] | None = None, model_name: str = "",
                 concurrency: int = 8):
        """`url`: http://HOST:PORT or grpc://HOST:PORT; `model_name`: the served model's name; `outputs` is accepted
        for the uniform interface (the model decides)."""
        self.endpoint = Endpoint.parse(url, model_name)
        super().__init__(f"triton:{self.endpoint}", device)
        self.concurrency = concurrency

    def activate_impl(self) -> None:
        self.client = self.endpoint.client(self.concurrency)
        self.config = model_config(self.endpoint, self.client)
        self.describe(served_info(self.endpoint, self.config))
        self.max_batch = int(self.config.get("max_batch_size", 0))
        self.dynamic_batch = self.max_batch > 0
        self.output_names = [o["name"] for o in self.config.get("output", [])]
        self.input_type = self.config["input"][0]["data_type"].replace("TYPE_", "")
        self.pool = ThreadPoolExecutor(self.concurrency) if self.endpoint.protocol == "grpc" else None

    def request(self, pixels: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """One request of one image (1, 3, H, W) -> its `outputs` (default all); VitsegError with the server's reason."""
        module = grpc if self.endpoint.protocol == "grpc" else http
        names = outputs or self.output_names
        data = pixels.astype(NUMPY_TYPES[self.input_type], copy=False)
        tensor = module.InferInput(INPUT_NAME, list(data.shape), self.input_type)
        tensor.set_data_from_numpy(data)
        try:
            result = self.client.infer(self.endpoint.model, [tensor], outputs=[module.InferRequestedOutput(n) for n in names])
        except Exception as e:  # InferenceServerException and transport errors
            raise VitsegError(f"{self.endpoint} answered with an error ({_reason(e)})", "see the server's log") from None
        return {n: result.as_numpy(n) for n in names}

    def infer_impl(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        images = [pixels[i:i + 1] for i in range(pixels.shape[0])]
        if self.pool is not None:  # gRPC: a client is thread-safe; requests from a thread pool
            results = list(self.pool.map(self.request, images))
        else:  # HTTP: the client's own concurrency (async_infer over `concurrency` connections)
            results = self._http_concurrent(images)
        return {n: np.concatenate([r[n] for r in results]) for n in self.output_names}

    def _http_concurrent(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        pending = []
        for image in images:
            data = image.astype(NUMPY_TYPES[self.input_type], copy=False)
            tensor = http.InferInput(INPUT_NAME, list(data.shape), self.input_type)
            tensor.set_data_from_numpy(data)
            pending.append(self.client.async_infer(self.endpoint.model, [tensor],
                                                   outputs=[http.InferRequestedOutput(n) for n in self.output_names]))
        results = []
        for request in pending:
            try:
                result = request.get_result()
            except Exception as e:
                raise VitsegError(f"{self.endpoint} answered with an error ({_reason(e)})", "see the server's log") from None
            results.append({n: result.as_numpy(n) for n in self.output_names})
        return results

    def deactivate_impl(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.client.close()


@dataclass
class LoadLevel:
    """What `concurrency` clients saw in `seconds`: one row of `vitseg profile --server`."""

    concurrency: int
    seconds: float
    requests: int
    errors: int
    throughput_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    first_error: str | None = None


@dataclass
class LoadReport:
    """`vitseg profile --server`: the endpoint, the model and one row per concurrency level. JSON: field names."""

    endpoint: str
    image_size: list[int]
    levels: list[LoadLevel] = field(default_factory=list)
    environment: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The JSON `--json` writes."""
        return asdict(self)


def load_test(url: str, model: str, concurrency: int, seconds: float, warmup: int = 3) -> LoadLevel:
    """`concurrency` clients (threads, one connection each) sending single-image requests back to back for
    `seconds`, after each warmed up: client-side latency of every request that succeeded, throughput, errors.
    Each request asks for what a segmentation client wants: the mask (the logits where the model has no mask)."""
    probe = TritonClientRunner(url, model_name=model, concurrency=1).activate()
    pixels = np.random.default_rng(0).random((1, 3, *probe.image_size), dtype=np.float32)
    wanted = ["mask"] if "mask" in probe.output_names else probe.output_names
    probe.deactivate()
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    ready, go = threading.Barrier(concurrency + 1), threading.Event()
    deadline = [0.0]
    failed: list[VitsegError] = []

    def client_loop() -> None:
        runner = None
        try:
            runner = TritonClientRunner(url, model_name=model, concurrency=1).activate()
            for _ in range(warmup):
                runner.request(pixels, wanted)
        except VitsegError as e:  # a client that cannot even warm up: the whole level fails with its reason
            failed.append(e)
            return
        finally:
            ready.wait()
        go.wait()  # the window's deadline is set
        try:
            while time.perf_counter() < deadline[0]:
                t0 = time.perf_counter()
                try:
                    runner.request(pixels, wanted)
                except VitsegError as e:
                    with lock:
                        errors.append(e.message)
                    continue
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1e3)
        finally:
            runner.deactivate()

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    ready.wait()  # every client connected and warmed up: the measured window starts now
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    go.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if failed:
        raise failed[0]
    return _level(concurrency, elapsed, np.asarray(latencies), errors)


def _level(concurrency: int, elapsed: float, lat: np.ndarray, errors: list[str]) -> LoadLevel:
    """One concurrency level's figures from the latencies (ms) of the requests that succeeded."""
    def pct(q: float) -> float | None:
        return float(np.percentile(lat, q)) if lat.size else None

    return LoadLevel(concurrency, round(elapsed, 3), int(lat.size), len(errors), lat.size / elapsed, pct(50), pct(90),
                     pct(99), float(lat.mean()) if lat.size else None, errors[0] if errors else None)


__all__ = ["Endpoint", "LoadLevel", "LoadReport", "TritonClientRunner", "load_test", "model_config", "served_devices",
           "served_info"]
