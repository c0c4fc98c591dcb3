"""`vitseg serve`: a real Triton Inference Server on a model repository (or an artifact), in the foreground."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vitseg_export.cli.common import console, log
from vitseg_export.cli.options import arg, opt
from vitseg_export.tables import lazy_module

server = lazy_module("vitseg_export.serving.server")

def serve(
    source: Annotated[Path, arg("A model repository (vitseg export --format triton) or an artifact (.onnx, .xml, .engine).",
                                          "a repository or artifact", path=True)],
    http_port: Annotated[int, opt("--http-port", min=1, max=65535)] = 8000,
    grpc_port: Annotated[int, opt("--grpc-port", min=1, max=65535)] = 8001,
    metrics_port: Annotated[int, opt("--metrics-port", min=1, max=65535)] = 8002,
    tritonserver: Annotated[Optional[Path], opt("--tritonserver")] = None,
) -> None:
    """Serve with Triton Inference Server until Ctrl-C or SIGTERM (in-flight requests finish; nothing is left)."""
    if len({http_port, grpc_port, metrics_port}) < 3:
        raise typer.BadParameter("--http-port, --grpc-port and --metrics-port must differ")

    def ready(serving) -> None:
        for kind, url in serving.urls.items():
            console.print(f"{kind}: {url}", markup=False, highlight=False)
        for name, backend in serving.models.items():
            console.print(f"model {name} ({backend} backend): READY", markup=False, highlight=False)
        console.print("serving; Ctrl-C or SIGTERM stops it", markup=False, highlight=False)

    serving = server.serve(source, http_port, grpc_port, metrics_port, tritonserver, on_ready=ready, log=log)
    console.print(f"stopped Triton on {serving.urls['http']} (in-flight requests finished)", markup=False, highlight=False)
