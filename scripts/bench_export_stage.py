"""The demo's export stage, measured: `run_benchmark` (what `vitseg demo` runs after training: export every format x
precision, verify each against PyTorch, profile) on a checkpoint, counting the work it repeats.

Prints the stage's wall time, the sum of the artifacts' export_seconds, how many times the fp32 graph was exported
(torch.onnx.export calls) and how many images PyTorch ran (the reference). Runs against whatever vitseg_export
is on the path, so an older checkout measures "before" (PYTHONPATH=OLD_CHECKOUT python scripts/bench_export_stage.py).

    python scripts/bench_export_stage.py vitseg-demo/run --output /tmp/stage [--formats onnx,openvino]
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import torch

from vitseg_export.measure import benchmark
from vitseg_export.runners import torch_runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--formats", default=None, help="comma list (default: the demo's, every available format)")
    parser.add_argument("--precisions", default="fp32,fp16,int8")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--num-images", type=int, default=32)
    args = parser.parse_args()

    counts = {"onnx_exports": 0, "reference_images": 0}
    profiling = [False]  # the eager row's latency runs are timing, not the reference
    export = torch.onnx.export

    def counted_export(*a, **kw):
        counts["onnx_exports"] += 1
        return export(*a, **kw)

    infer = torch_runner.TorchRunner.infer_impl

    def counted_infer(self, pixels):
        if not profiling[0]:
            counts["reference_images"] += int(pixels.shape[0])
        return infer(self, pixels)

    profile = benchmark.profile

    def uncounted_profile(*a, **kw):
        profiling[0] = True
        try:
            return profile(*a, **kw)
        finally:
            profiling[0] = False

    torch.onnx.export = counted_export
    torch_runner.TorchRunner.infer_impl = counted_infer
    benchmark.profile = uncounted_profile
    formats = tuple(args.formats.split(",")) if args.formats else benchmark.available_formats()
    settings = benchmark.BenchmarkSettings(formats=formats, precisions=tuple(args.precisions.split(",")),
                                           image_size=(args.image_size, args.image_size), verify_images=args.num_images)
    t0 = time.perf_counter()
    report = benchmark.run_benchmark(args.checkpoint, args.output, settings)
    stage = time.perf_counter() - t0
    exports = {Path(f).name: json.load(open(f)).get("export_seconds")
               for f in sorted(glob.glob(str(args.output / "artifacts" / "*.json")))}
    result = {"stage_seconds": round(stage, 1), "export_seconds_sum": round(sum(v or 0 for v in exports.values()), 1),
              "export_seconds": exports, **counts, "rows": {r.name: r.status for r in report.rows}}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
