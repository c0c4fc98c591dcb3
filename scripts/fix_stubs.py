"""Make pybind11-stubgen output valid Python stubs: rename parameters that are keywords (`in`) and give
parameters after a defaulted one a `...` default (pybind11 signatures allow that order; Python doesn't),
and head the file with what generated it.

    python scripts/fix_stubs.py STUB.pyi WHEEL_FILE GENERATOR_VERSION
"""

import hashlib
import keyword
import os
import re
import sys

DEF = re.compile(r"^(\s*def \w+\()(.*)(\)\s*(->.*)?:.*)$")


def split_params(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def fix_line(line: str) -> str:
    m = DEF.match(line)
    if not m:
        return line
    params = split_params(m.group(2))
    seen_default = False
    fixed = []
    for p in params:
        name = p.split(":")[0].split("=")[0].strip().lstrip("*")
        if keyword.iskeyword(name):
            p = p.replace(name, name + "_", 1)
        if "=" in p:
            seen_default = True
        elif seen_default and not p.startswith("*"):
            p = p + " = ..."
        fixed.append(p)
    return m.group(1) + ", ".join(fixed) + m.group(3)


path, wheel, generator = sys.argv[1:4]
with open(wheel, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
HEADER = (
    "# mypy: ignore-errors\n"
    "# GENERATED FILE, do not edit: scripts/trt_stubs.sh ran pybind11-stubgen==" + generator + " on\n"
    "# " + os.path.basename(wheel) + "\n"
    "# (sha256 " + digest + "), then scripts/fix_stubs.py.\n"
    "# Errors inside these stubs are the generator's; the project's calls against them are what mypy checks.\n"
)
with open(path) as f:
    text = f.read()
lines = [fix_line(line) for line in text.split("\n")]
while lines and lines[0].startswith("#"):  # a previous header
    lines.pop(0)
# the `tensorrt` package re-exports the bindings and adds its version string
if "__version__: str" not in text:
    lines.insert(next(i for i, line in enumerate(lines) if line.startswith("import ")), "__version__: str")
with open(path, "w") as f:
    f.write(HEADER + "\n".join(lines))
