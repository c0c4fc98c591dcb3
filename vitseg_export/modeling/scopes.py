"""Which exported node belongs to which module of the network: the names the exporters keep, read back.

torch.onnx's TorchScript exporter names every node after the modules called on the way to it, each by its
qualified name from its last non-numeric atom on (`/segmenter/net/encoder/block.2.0/mlp/dense2/MatMul`; a
ModuleList is never called, so `block.2.0` stands for encoder.block[2][0]; a Sequential is, so ViT blocks are
`/segmenter/net/blocks/blocks.3/...`). OpenVINO keeps those names through an ONNX import, and its PyTorch frontend
names ops `__module.segmenter.net.encoder.block.2.0/aten::...`. One hooked forward of the exported module records
each module's call chain; from it every name scheme is matched. `vitseg verify --locate` finds boundaries with it,
`--keep-float` the layers of a module.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

import torch

from vitseg_export.errors import VitsegError

ROOT = "segmenter"  # ExportGraph's name for the Segmenter: every exported node's scope starts with it
NET = f"{ROOT}.net"


def unqualified(qualified: str) -> str:
    """The scope name torch.onnx's TorchScript exporter gives a module: its qualified name from the last
    non-numeric atom on (`segmenter.net.encoder.block.2.0` -> `block.2.0`)."""
    atoms = qualified.split(".")
    start = max((i for i, a in enumerate(atoms) if not a.isnumeric()), default=0)
    return ".".join(atoms[start:])


@dataclass
class ModuleScopes:
    """Each module's call chain (qualified names under the exported root, ExportGraph), and the name tests."""

    chains: dict[str, list[str]]

    @classmethod
    def record(cls, root: torch.nn.Module, pixels: torch.Tensor, on_call: Callable | None = None) -> "ModuleScopes":
        """Run `root` (an ExportGraph) once on `pixels` with hooks recording every module's call chain; `on_call`
        (qualified name, module, args, output) sees every call as it ends."""
        chains: dict[str, list[str]] = {}
        stack: list[str] = []
        handles = []

        def before(name: str):
            def hook(module, args):
                chains.setdefault(name, stack + [name])
                stack.append(name)
            return hook

        def after(name: str):
            def hook(module, args, output):
                stack.pop()
                if on_call is not None:
                    on_call(name, module, args, output)
            return hook

        for name, module in root.named_modules():
            if name:
                handles += [module.register_forward_pre_hook(before(name)), module.register_forward_hook(after(name))]
        try:
            with torch.no_grad():
                root(pixels)
        finally:
            for handle in handles:
                handle.remove()
        return cls(chains)

    def modules(self) -> list[str]:
        """Every module of the network, by its path under it (`encoder.block.2.0`)."""
        return [q[len(NET) + 1:] for q in self.chains if q.startswith(NET + ".")]

    def in_scope(self, module: str) -> Callable[[str], bool]:
        """Whether a node or op name belongs to `module` (a path under the network; "" for the network)."""
        qualified = f"{NET}.{module}" if module else NET
        chain = self.chains.get(qualified)
        if chain is None:
            return lambda name: False
        onnx_prefix = "/" + "/".join(unqualified(q) for q in chain) + "/"
        frontend = f"__module.{qualified}"
        return lambda name: name.startswith(onnx_prefix) or name.startswith(frontend + "/") or name.startswith(frontend + ".")

    def called_after(self, module: str, count: int = 2) -> list[str]:
        """The first `count` modules (paths under the network) called after `module` and its own submodules, in the
        order the forward pass called them: the modules that read its output next."""
        order = self.modules()
        if module not in order:
            return []
        following = order[order.index(module) + 1:]
        return [m for m in following if not m.startswith(module + ".")][:count]

    def module_of(self, name: str) -> str | None:
        """The innermost module (path under the network) a node or op name belongs to."""
        best = None
        for module in self.modules():
            if self.in_scope(module)(name) and (best is None or len(module) > len(best)):
                best = module
        return best

    def check(self, names: tuple[str, ...], option: str = "--keep-float") -> tuple[str, ...]:
        """`names` as module paths of this network; VitsegError (one line) naming the nearest ones for a name it
        does not have."""
        known = self.modules()
        for name in names:
            if name not in known:
                near = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
                raise VitsegError(f"{option} {name}: the network has no module of that name",
                                  f"use a module path such as {', '.join(near) if near else ', '.join(known[:3])}")
        return names

    def selector(self, names: tuple[str, ...]) -> Callable[[str], bool]:
        """A test for node or op names inside any of the modules `names`."""
        tests = [self.in_scope(n) for n in names]
        return lambda node: any(test(node) for test in tests)
