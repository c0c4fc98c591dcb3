"""The design's rules, checked on the source (docs/design.md): imports point down the data flow with no cycle,
counting function-local imports and the "module:attr" references tables and lazy_module declarations name;
the tables import no implementation; every reference a table holds resolves; no top-level name is defined in
two modules; precisions are asked, not compared by name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vitseg_export"
# a lazy_module("vitseg_export...") declaration is an import made later: it counts. A table row's
# lazy("module:attr") names its implementation without importing it: the design, and not an edge.
REFERENCE = re.compile(r"""lazy_module\(\s*["'](vitseg_export[\w.]*)["']""")
TABLES = ("vitseg_export.tables", "vitseg_export.formats", "vitseg_export.precisions", "vitseg_export.runners",
          "vitseg_export.settings", "vitseg_export.artifact", "vitseg_export.errors", "vitseg_export.files",
          "vitseg_export.machine.probes", "vitseg_export.machine.cpu", "vitseg_export.machine.timing", "vitseg_export.fields", "vitseg_export.progress")
# The packages in data-flow order, bottom first (docs/design.md draws the same picture). A module may import its
# own layer and the layers below it, never a layer above.
LAYERS = (
    ("vitseg_export", "errors", "tables", "files", "fields", "progress", "images", "artifact", "precisions", "formats", "settings",
     "machine"),
    ("data",),
    ("modeling",),
    ("checkpoint", "hub"),
    ("runners",),
    ("compare",),
    ("predict",),
    ("serving",),
    ("train",),
    ("export",),
    ("measure",),
    ("verdict", "testing"),
    ("cli", "__main__"),
)


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _resolve(name: str, mods: dict) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _edges() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in the file, or names by a lazy reference."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        text = f.read_text()
        targets = [ref for ref in REFERENCE.findall(text)]
        for n in ast.walk(ast.parse(text)):
            if isinstance(n, ast.Import):
                targets += [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                targets += [n.module] + [f"{n.module}.{a.name}" for a in n.names]
        for t in targets:
            r = _resolve(t, mods) if t.startswith("vitseg_export") else None
            if r and r != m and not m.startswith(r + "."):
                edges[m].add(r)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(edges):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_cycle_counting_lazy_references():
    assert _cycle(_edges()) is None, " -> ".join(_cycle(_edges()) or [])


def _layer(module: str) -> int:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else parts[0]
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS and to docs/design.md")


def test_imports_point_down_the_layers():
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, targets in _edges().items() for t in targets if _layer(t) > _layer(m)]
    assert not upward, upward


def test_the_design_document_draws_every_layer():
    design = (PACKAGE.parent / "docs" / "design.md").read_text()
    missing = [name for layer in LAYERS for name in layer if name not in ("vitseg_export", "__main__") and name not in design]
    assert not missing, missing


def test_the_tables_and_leaves_import_no_implementation():
    edges = _edges()
    for table in TABLES:
        assert edges[table] <= set(TABLES) | {"vitseg_export.runners.base"}, (table, edges[table] - set(TABLES))


def test_every_reference_a_table_holds_resolves():
    from vitseg_export.formats import FORMATS
    from vitseg_export.precisions import PRECISIONS
    from vitseg_export.runners import BACKENDS
    from vitseg_export.tables import Lazy

    refs = [value for table in (FORMATS, PRECISIONS, BACKENDS) for row in table.values()
            for value in vars(row).values() if isinstance(value, Lazy)]
    assert len(refs) >= 20
    for ref in refs:
        assert callable(ref.resolve()), ref


def test_no_top_level_name_is_defined_in_two_modules():
    seen: dict[str, str] = {}
    clashes = []
    for m, f in sorted(_modules().items()):
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                if m.startswith("vitseg_export.cli") and node.name in seen:  # a command named like what it calls
                    continue
                if node.name in seen and not seen[node.name].startswith("vitseg_export.cli"):
                    clashes.append(f"{node.name}: {seen[node.name]} and {m}")
                seen.setdefault(node.name, m)
    assert not clashes, clashes


def test_precisions_are_asked_not_compared_by_name():
    names = {"fp32", "fp16", "int8"}
    found = []
    for m, f in _modules().items():
        if m == "vitseg_export.precisions" or m.startswith("vitseg_export.cli"):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare):
                constants = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                if names & set(constants):
                    found.append(f"{m}:{node.lineno}")
    assert len(found) <= 3, found


@pytest.mark.parametrize("module", ["vitseg_export.cli", "vitseg_export.predict.still", "vitseg_export.formats",
                                    "vitseg_export.runners.openvino_runner", "vitseg_export.export.tensorrt_engine"])
def test_light_modules_import_without_torch(module):
    """A lazy declaration must stay lazy: these load with torch unimportable (the edge path and start-up)."""
    import subprocess
    import sys

    code = ("import sys, importlib.abc\n"
            "class NoTorch(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'torchvision'):\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            f"import {module}\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
