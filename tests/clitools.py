"""Running the real CLI as a user's install does: in a subprocess where `import click` fails (typer 0.29
vendors its own; `pip install -e '.[torch]'` brings no click), one command at a time or a table of them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

GUARD = r"""
import sys, importlib.abc
class NoClick(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "click" or name.startswith("click."):
            raise ImportError("click is not installed in the environment a user gets from pip install -e .[torch]")
sys.meta_path.insert(0, NoClick())
"""

NO_CLICK = GUARD + r"""
sys.argv = ["vitseg"] + sys.argv[1:]
{prelude}
from vitseg_export.cli import main
main()
"""

# Runs every case of a JSON list ({"argv": [...], "env": {...}}) through main() in one process (imports paid
# once), with the case's environment variables set for it, capturing each one's exit code, stdout and stderr;
# writes the results as JSON.
TABLE = GUARD + r"""
import contextlib, io, json, os
from vitseg_export.cli import common, main
cases, destination = sys.argv[1:3]
results = []
for case in json.load(open(cases)):
    out, err = io.StringIO(), io.StringIO()
    common.console.file, common.err_console.file = out, err
    sys.argv = ["vitseg", *case["argv"]]
    saved = dict(os.environ)
    os.environ.update(case["env"])
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    os.environ.clear()
    os.environ.update(saved)
    results.append({"argv": case["argv"], "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
json.dump(results, open(destination, "w"))
"""


def run_no_click(tmp_path: Path, *args, env=None, prelude: str = "", **kw) -> subprocess.CompletedProcess:
    """`vitseg ARGS` in a subprocess without click; text stdout/stderr captured unless `kw` says otherwise."""
    script = tmp_path / "vitseg_no_click.py"
    script.write_text(NO_CLICK.replace("{prelude}", prelude))
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw}
    return subprocess.run([sys.executable, str(script), *map(str, args)], text=True, timeout=300,
                          env={**os.environ, **(env or {})}, **streams)


def run_table(tmp_path: Path, table: list, env=None, timeout: float = 1200) -> list[dict]:
    """Every case of `table` (an argv list, or (argv list, {VAR: value})) through the CLI in one subprocess
    without click: [{argv, code, stdout, stderr}]."""
    cases, results, script = tmp_path / "cases.json", tmp_path / "results.json", tmp_path / "vitseg_table.py"
    rows = [case if isinstance(case, tuple) else (case, {}) for case in table]
    cases.write_text(json.dumps([{"argv": [str(a) for a in argv], "env": env_vars} for argv, env_vars in rows]))
    script.write_text(TABLE)
    proc = subprocess.run([sys.executable, str(script), str(cases), str(results)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(results.read_text())


# a glog line (abseil, gRPC, TensorFlow-style C++ libraries): severity letter, MMDD, time, thread id, file:line]
GLOG_LINE = re.compile(r"^[IWEF]\d{4} \d{2}:\d{2}:\d{2}\.\d+\s+\d+ [^ ]+:\d+\] ")


def error_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not warnings, deprecation notes or third-party glog lines (blank lines count: an
    error is one line, nothing around it)."""
    return [line for line in stderr.splitlines()
            if not line.startswith(("warning:", "deprecated:")) and not GLOG_LINE.match(line)]


def one_line(proc) -> str:
    """The one stderr line of a failed command (asserting there is exactly one, and no traceback)."""
    lines = error_lines(proc.stderr)
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    return lines[0]
