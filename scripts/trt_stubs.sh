#!/usr/bin/env bash
# Regenerate tests/typing/tensorrt-<V>/tensorrt/__init__.pyi from the TensorRT Python bindings wheels.
# TensorRT's libraries cannot be installed here, so the bindings load against stand-in libnvinfer*
# libraries that define the few C entry points they link (never called: stub generation only
# introspects the pybind11 module). Usage: scripts/trt_stubs.sh 10.3.0 11.4.0.106
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
generator=${STUBGEN_VERSION:-3.0.0}
"$py" -m pip install -q "pybind11-stubgen==$generator"
for version in "$@"; do
  "$py" -m pip download -q --no-deps "tensorrt-cu12-bindings==$version" -d "$work/wheels"
done
cd "$work"
for whl in wheels/*.whl; do mkdir -p "unpacked/$(basename "$whl" .whl)" && (cd "unpacked/$(basename "$whl" .whl)" && unzip -q "../../$whl"); done
for so in unpacked/*/tensorrt_bindings/tensorrt.so; do
  nm -D --undefined-only "$so" | awk '{print $2}' | grep -v -E '@|^_ITM|^_ZGTt|__gmon_start__|__pthread_key_create|^_?Py|^(dlopen|dlsym|dlclose|pthread_once)$'
done | sort -u > symbols.txt
{ echo '#include <stddef.h>'; while read -r s; do echo "void* $s(void) { return NULL; }"; done < symbols.txt; } > standin.c
mkdir -p lib && gcc -shared -fPIC -o lib/libstandin.so standin.c
for major in 10 11; do for name in libnvinfer libnvonnxparser libnvinfer_plugin; do cp lib/libstandin.so "lib/$name.so.$major"; done; done
for dir in unpacked/*/; do
  version=$(basename "$dir" | sed -E 's/.*bindings-([0-9]+\.[0-9]+).*/\1/')
  LD_LIBRARY_PATH=lib PYTHONPATH="$dir" "$py" -m pybind11_stubgen tensorrt_bindings.tensorrt -o "stubs-$version" --ignore-all-errors
  mkdir -p "$root/tests/typing/tensorrt-$version/tensorrt"
  cp "stubs-$version/tensorrt_bindings/tensorrt.pyi" "$root/tests/typing/tensorrt-$version/tensorrt/__init__.pyi"
  wheel=$(ls wheels/*bindings-"$version"*.whl)
  "$py" "$root/scripts/fix_stubs.py" "$root/tests/typing/tensorrt-$version/tensorrt/__init__.pyi" "$wheel" "$generator"
  echo "wrote tests/typing/tensorrt-$version/tensorrt/__init__.pyi"
done
