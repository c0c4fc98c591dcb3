"""The Python-backend model of a Triton repository vitseg writes (`--triton-backend python`): copied into the
repository as `NAME/1/model.py`, it runs the artifact beside it with vitseg's own torch-free runner
(onnxruntime, OpenVINO or TensorRT), for Triton installs without the native backend. Imported by Triton's
Python-backend stub only (it needs `triton_python_backend_utils`), in the Python environment the server was
started with, where vitseg is installed.

Dynamic batching hands `execute` several requests at once; they are concatenated into one batch per input
size (what makes batching pay), run once, and split back. A request the model cannot run (no `pixels`, another
dtype, rank or channel count, a size the artifact does not take) gets its own error response; the others in
the same call are answered.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

from vitseg_export.errors import VitsegError
from vitseg_export.runners import runner_for
from vitseg_export.runners.base import INPUT_NAME

RECORD = "vitseg-python.json"  # serving/repository.py writes it: which artifact, which device


class TritonPythonModel:
    """Triton's Python-backend interface: initialize / execute / finalize."""

    def initialize(self, args: dict) -> None:
        """Load the artifact named by the version directory's record with its format's runner."""
        version = Path(args["model_repository"]) / args["model_version"]
        record = json.loads((version / RECORD).read_text())
        self.runner = runner_for(version / record["artifact"], device=record["device"]).activate()
        config = json.loads(args["model_config"])
        self.outputs = [o["name"] for o in config["output"]]
        self.max_batch = int(config.get("max_batch_size", 0)) or 1

    def _pixels(self, request) -> np.ndarray:
        """The request's `pixels` as float32 (N, 3, H, W); VitsegError for anything else."""
        tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
        if tensor is None:
            raise VitsegError(f"the request has no input {INPUT_NAME!r}")
        pixels = tensor.as_numpy()
        if pixels.dtype not in (np.float32, np.float16) or pixels.ndim != 4 or pixels.shape[1] != 3:
            raise VitsegError(f"{INPUT_NAME} must be float32 (N, 3, H, W), got {pixels.dtype} {tuple(pixels.shape)}")
        return pixels.astype(np.float32, copy=False)

    def execute(self, requests: list) -> list:
        """One response per request, in order: requests of one input size run as one batch."""
        responses: list = [None] * len(requests)
        self._requested = [[n for n in r.requested_output_names() if n in self.outputs] for r in requests]
        groups: dict[tuple, list[tuple[int, np.ndarray]]] = {}
        for index, request in enumerate(requests):
            try:
                pixels = self._pixels(request)
            except VitsegError as e:
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
                continue
            groups.setdefault(pixels.shape[1:], []).append((index, pixels))
        for members in groups.values():
            self._run(members, responses)
        return responses

    def _run(self, members: list[tuple[int, np.ndarray]], responses: list) -> None:
        """Run requests of one size as one batch (in chunks of at most max_batch_size images) and answer each."""
        batch = np.concatenate([pixels for _, pixels in members])
        try:
            chunks = [self.runner.infer({INPUT_NAME: batch[i:i + self.max_batch]})
                      for i in range(0, len(batch), self.max_batch)]
        except VitsegError as e:
            for index, _ in members:
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
            return
        outputs = {name: np.concatenate([c[name] for c in chunks]) for name in self.outputs}
        start = 0
        for index, pixels in members:
            end = start + len(pixels)
            wanted = self._requested[index] or self.outputs  # only what the client asked for (a mask is 1/C of logits)
            responses[index] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, np.ascontiguousarray(outputs[name][start:end])) for name in wanted])
            start = end

    def finalize(self) -> None:
        """Release the runner when Triton unloads the model."""
        self.runner.deactivate()
