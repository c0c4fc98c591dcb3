"""Does `vitseg export CHECKPOINT --precision int8` give the same answer every time on one machine?

Runs the export --runs times (default 20) in a row, the second half while a CPU-bound process (a busy loop)
holds one core, and prints the outcome table: the exit code, the speed decision made before calibrating
(int8/fp32 speed ratio, its 95% interval, the outcome by vitseg_export/timing.py's rule), the decision after
the fallback where there was one, the seconds to the decision and to the end; then the exit codes counted,
and the CPU it ran on (model and int8 flags). Figures from one CPU class say nothing about another.

    python scripts/int8_decisions.py runs/b0 --runs 20
    python scripts/int8_decisions.py runs/b0 --runs 20 -- --cpu-class vnni     # judged on a VNNI machine
    python scripts/int8_decisions.py runs/b0 --vitseg "python /tmp/old/vitseg_export"  # another checkout's CLI

Extra arguments after `--` go to `vitseg export`. --json FILE keeps every run's record.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from vitseg_export.machine.cpu import cpu_info

DECISION_LINE = re.compile(r"int8 (?P<speedup>[\d.]+)x fp32 \(95% interval (?P<low>[\d.]+)-(?P<high>[\d.]+) over "
                           r"(?P<pairs>\d+) pairs.*?\): (?P<outcome>faster|slower|no measurable gain)")


def spin() -> None:
    """Spin on core 0 for ever."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    while True:
        pass


def busy_core() -> multiprocessing.Process:
    """A process spinning on one core (core 0) until terminated."""
    process = multiprocessing.Process(target=spin, daemon=True)
    process.start()
    return process


def one_run(command: list[str], checkpoint: str, extra: list[str], work: Path) -> dict:
    """One export, timed from its stderr: when calibration starts (the decision is made) and when it ends."""
    out = work / "q.onnx"
    argv = [*command, "export", checkpoint, "--precision", "int8", "-o", str(out), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    decided_at, lines = None, []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line.rstrip())
        if decided_at is None and "calibrating on" in line:
            decided_at = time.perf_counter() - t0
    proc.wait()
    total = time.perf_counter() - t0
    record: dict = {"exit": proc.returncode, "seconds": round(total, 1),
                    "seconds_to_decision": round(decided_at if decided_at is not None else total, 1)}
    manifest = out.with_name(out.name + ".json")
    if proc.returncode == 0 and manifest.is_file():
        details = json.loads(manifest.read_text())["int8"]
        decision = details.get("speed_decision", {})
        record["before"] = decision.get("before_calibration")
        record["after"] = decision.get("after_fallback")
        record["agreement"] = details.get("heldout_agreement")
        manifest.unlink()
        out.unlink(missing_ok=True)
    else:
        error = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "")
        match = DECISION_LINE.search(error)
        record["before"] = {k: (v if k == "outcome" else float(v)) for k, v in match.groupdict().items()} if match else None
        record["error"] = error[:300]
    return record


def describe(decision) -> str:
    if isinstance(decision, dict):
        return f"{decision['speedup']:.2f}x ({decision['low']:.2f}-{decision['high']:.2f}, {int(decision['pairs'])} pairs) {decision['outcome']}"
    if isinstance(decision, str) and decision.startswith("not timed: the placement timed before"):
        return "= before (no layer returned to float)"
    return str(decision or "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--vitseg", default=f"{sys.executable} -m vitseg_export", help="the CLI to run (a command line)")
    parser.add_argument("--json", type=Path, help="write every run's record here")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # after --: arguments for vitseg export
    args = parser.parse_args(argv[:len(argv) - len(extra) - (1 if "--" in argv else 0)])
    args.extra = extra
    info = cpu_info()
    flags = " ".join(f for f, on in {**info["int8_features"], **info["bf16_features"]}.items() if on)
    print(f"CPU: {info['model']}, {info['cores']} cores, class {info['class']}; flags: {flags}", flush=True)
    print(f"vitseg export {args.checkpoint} --precision int8 {' '.join(args.extra)}\n")
    print("| run | load | exit | before calibrating: int8 vs fp32 (95% interval) | after the fallback | to the decision "
          "| total |\n|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory(prefix="vitseg-decisions-") as work:
        for i in range(args.runs):
            loaded = i >= args.runs // 2
            spinner = busy_core() if loaded else None
            try:
                record = one_run(shlex.split(args.vitseg), args.checkpoint, args.extra, Path(work))
            finally:
                if spinner is not None:
                    spinner.terminate()
                    spinner.join()
            record = {"run": i + 1, "load": "one core busy" if loaded else "quiet", **record}
            rows.append(record)
            print(f"| {record['run']} | {record['load']} | {record['exit']} | {describe(record.get('before'))} | "
                  f"{describe(record.get('after'))} | {record['seconds_to_decision']:.1f} s | {record['seconds']:.1f} s |",
                  flush=True)
    counts = Counter(r["exit"] for r in rows)
    print(f"exit codes: {dict(counts)}; the most common in {counts.most_common(1)[0][1]} of {len(rows)} runs")
    if args.json:
        args.json.write_text(json.dumps({"cpu": info, "argv": sys.argv[1:], "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
