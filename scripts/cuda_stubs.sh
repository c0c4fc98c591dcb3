#!/usr/bin/env bash
# Regenerate tests/typing/cuda-bindings/cuda/bindings/runtime.pyi (the CUDA runtime calls vitseg's TensorRT
# path makes, type-checked by tests/test_trt_typing.py) from the installed cuda-bindings wheel with mypy's
# stubgen (introspection: names, enums and classes; the Cython functions' signatures are opaque to it).
# Usage: scripts/cuda_stubs.sh   (with cuda-bindings installed: pip install -e '.[trt]')
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
version=$("$py" -c "import importlib.metadata as m; print(m.version('cuda-bindings'))")
stubgen=$("$py" -c "import importlib.metadata as m; print(m.version('mypy'))")
out="$root/tests/typing/cuda-bindings"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$(dirname "$py")/stubgen" -m cuda.bindings.runtime --inspect-mode -o "$work"
mkdir -p "$out/cuda/bindings"
{ echo "# mypy: ignore-errors"
  echo "# GENERATED FILE, do not edit: scripts/cuda_stubs.sh ran mypy $stubgen stubgen --inspect-mode on cuda-bindings==$version."
  cat "$work/cuda/bindings/runtime.pyi"; } > "$out/cuda/bindings/runtime.pyi"
: > "$out/cuda/__init__.pyi"
: > "$out/cuda/bindings/__init__.pyi"
echo "wrote tests/typing/cuda-bindings (cuda-bindings $version)"
