#!/usr/bin/env bash
# An aarch64 Python 3.11 (Debian bookworm's arm64 packages, unpacked, no chroot) with ONNX Runtime's aarch64 wheel,
# run under QEMU's user-mode emulator on an x86_64 machine (ARM's own kernels: NEON, int8 dot products): what
# `tests/test_arm.py` runs vitseg's torch-free commands with (tests/armtools.py gives the command prefix).
#
# Usage: scripts/arm_python.sh DIR [--check]
#   DIR/root   the arm64 packages unpacked (qemu-aarch64 -L DIR/root)
#   DIR/venv   a venv of that Python: onnxruntime 1.19.2, numpy<2, pillow, typer, rich (+ safetensors when a wheel
#              installs); vitseg itself is not installed there (run it with PYTHONPATH=<repo>)
#   DIR/stamp  written last: what this script's inputs were and the one-line summary; a second run that finds it
#              current and the venv importing onnxruntime does nothing else (about 1 s; a cold build: about 2 min
#              on 2 cores, most of it pip under emulation)
#   DIR/failed the last failure's message (removed on success), read by tests/armtools.py when it may not build
#   --check    never build: exit 0 with the summary when DIR is built and current, 3 when it is not
# Needs: x86_64 Linux, qemu-aarch64 (installed from Debian's qemu-user when missing and this is root with apt),
# Debian's arm64 package lists (added with dpkg --add-architecture arm64 + apt-get update when missing: root), PyPI.
# The last line printed (stdout) is the summary (exit 0) or what failed (exit non-zero); progress goes to stderr,
# each tool's output to DIR/build.log.
#
# onnxruntime is pinned to 1.19.2: the 1.32 aarch64 wheel dies with SIGSEGV on import under Debian 12's QEMU (7.2).
set -euo pipefail

usage() { echo "usage: $0 DIR [--check]" >&2; exit 2; }
[ $# -ge 1 ] || usage
dir=$1; shift
check_only=0
for arg in "$@"; do
  case $arg in --check) check_only=1 ;; *) usage ;; esac
done
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
root=$dir/root venv=$dir/venv stamp=$dir/stamp failed=$dir/failed log=$dir/build.log

# Bookworm's arm64 runtime of python3.11 (+ venv and the pip wheel). Every name must exist: apt-get download fails
# as a whole on one unknown name (bookworm has no libmpdec3); when it fails, the unknown names are said.
DEBS=(libc6:arm64 libgcc-s1:arm64 libstdc++6:arm64 python3.11:arm64 python3.11-minimal:arm64
  libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 libpython3.11:arm64 zlib1g:arm64 libexpat1:arm64
  libssl3:arm64 libffi8:arm64 libbz2-1.0:arm64 liblzma5:arm64 libsqlite3-0:arm64 libncursesw6:arm64
  libtinfo6:arm64 libreadline8:arm64 libuuid1:arm64 libdb5.3:arm64 libcrypt1:arm64 libnsl2:arm64
  libtirpc3:arm64 libgssapi-krb5-2:arm64 libkrb5-3:arm64 libk5crypto3:arm64 libkrb5support0:arm64
  libcom-err2:arm64 libkeyutils1:arm64 media-types python3.11-venv:arm64 python3-pip-whl python3-setuptools-whl)
# Binary wheels only: nothing is compiled under emulation (there is no compiler in DIR/root anyway).
PIP_REQS=("onnxruntime==1.19.2" "numpy<2" "pillow" "typer" "rich")
PIP_OPTIONAL=("safetensors")  # the golden-file format may use it; the build goes on without it
key="v1 $dir | ${DEBS[*]} | ${PIP_REQS[*]} | ${PIP_OPTIONAL[*]}"

start=$(date +%s)
step="start"
say() { echo "arm_python: [$(( $(date +%s) - start )) s] $*" >&2; }
die() {
  local msg="arm_python: FAILED ($step): $*"
  echo "$msg" > "$failed" 2>/dev/null || true
  if [ -s "$log" ]; then echo "--- last lines of $log:" >&2; tail -n 15 "$log" >&2; fi
  echo "$msg"
  exit 1
}
trap 'die "command failed (line $LINENO); see $log"' ERR
# run CMD...: its output to the log, not the terminal
run() { "$@" >>"$log" 2>&1; }
apt_opts=(-y -q -o DPkg::Lock::Timeout=300)

[ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] \
  || die "this machine is $(uname -s) $(uname -m): the recipe emulates aarch64 on x86_64 Linux"

# One build at a time (CI's pre-build and the test fixture may race); the stamp is re-read under the lock.
exec 9>"$dir/.lock"
flock 9

qemu=$(command -v qemu-aarch64 || true)
arm_py() { "$qemu" -L "$root" "$venv/bin/python3.11" "$@"; }
PROBE='import platform, sys, onnxruntime, numpy, PIL, typer, rich
try:
    import safetensors; st = "safetensors " + safetensors.__version__
except ImportError:
    st = "no safetensors"
print(f"{platform.machine()} Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
      f"numpy {numpy.__version__}, Pillow {PIL.__version__}, {st}")'

if [ -n "$qemu" ] && [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "$key" ]; then
  step="cached venv check"
  if found=$(arm_py -c "$PROBE" 2>>"$log"); then
    rm -f "$failed"
    echo "arm_python: $found in $dir (cached; checked in $(( $(date +%s) - start )) s)"
    exit 0
  fi
  say "the cached venv does not import onnxruntime: rebuilding"
fi
if [ "$check_only" = 1 ]; then
  trap - ERR
  echo "arm_python: not built in $dir (run scripts/arm_python.sh $dir)"
  exit 3
fi
: > "$log"
rm -f "$stamp"

is_root=0; [ "$(id -u)" = 0 ] && is_root=1
have_apt=0; command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1 && have_apt=1
[ "$have_apt" = 1 ] || die "no apt-get/dpkg here: the recipe needs Debian's packages (qemu-user and arm64 python3.11)"
arm_lists() { compgen -G "/var/lib/apt/lists/*_binary-arm64_Packages*" >/dev/null; }
updated=0
apt_update() {
  # apt-get update exits 0 or not depending on the apt version when an unreachable third-party source fails, so
  # success is judged by the arm64 lists it leaves
  say "apt-get update"
  run apt-get update -q -o DPkg::Lock::Timeout=300 || say "apt-get update reported errors (see $log)"
  updated=1
}

step="qemu-user"
if [ -z "$qemu" ]; then
  [ "$is_root" = 1 ] || die "qemu-aarch64 is missing and this is not root (apt-get install qemu-user)"
  say "apt-get install qemu-user"
  run apt-get install "${apt_opts[@]}" qemu-user || { apt_update; run apt-get install "${apt_opts[@]}" qemu-user; } \
    || die "apt-get install qemu-user failed"
  qemu=$(command -v qemu-aarch64) || die "qemu-user installed but no qemu-aarch64 on PATH"
fi

step="arm64 package lists"
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  [ "$is_root" = 1 ] || die "dpkg has no arm64 architecture and this is not root (dpkg --add-architecture arm64)"
  say "dpkg --add-architecture arm64"
  dpkg --add-architecture arm64
fi
if ! arm_lists; then
  [ "$is_root" = 1 ] || die "no arm64 package lists and this is not root (apt-get update)"
  apt_update
  arm_lists || die "apt-get update left no arm64 package lists (see $log)"
fi

step="apt-get download"
debs=$dir/debs
# names apt has no candidate for (one `apt-cache policy`: the names it knows, each with its Candidate line)
unknown_debs() {
  apt-cache policy "${DEBS[@]}" 2>/dev/null | awk -v want="${DEBS[*]}" '
    /^[^ ]/ { name = $0; sub(/:$/, "", name) }
    /^  Candidate:/ && $2 != "(none)" { ok[name] = 1 }
    END { n = split(want, w, " "); for (i = 1; i <= n; i++) if (!(w[i] in ok)) printf "%s%s", (m++ ? " " : ""), w[i] }'
}
download() { rm -rf "$debs"; mkdir -p "$debs"; (cd "$debs" && run apt-get download "${DEBS[@]}"); }
if [ ! -f "$debs/.done" ] || [ "$(cat "$debs/.done")" != "${DEBS[*]}" ]; then
  say "apt-get download (${#DEBS[@]} packages)"
  # it fails as a whole on one unknown name or one stale list entry (a 404): refresh the lists once, then name
  # what apt does not know
  if ! download; then
    if [ "$is_root" = 1 ] && [ "$updated" = 0 ]; then apt_update; fi
    if ! download; then
      missing=$(unknown_debs)
      [ -z "$missing" ] || die "apt knows no package (or no candidate) named: $missing"
      die "apt-get download failed (see $log)"
    fi
  fi
  echo "${DEBS[*]}" > "$debs/.done"
fi

step="unpack"
rm -rf "$root" "$root.tmp"; mkdir -p "$root.tmp"
for deb in "$debs"/*.deb; do dpkg -x "$deb" "$root.tmp"; done
mv "$root.tmp" "$root"
[ -x "$root/usr/bin/python3.11" ] || die "no usr/bin/python3.11 in the unpacked packages"
pip_whl=$(compgen -G "$root/usr/share/python-wheels/pip-*.whl" | head -n 1) || die "no pip wheel in python3-pip-whl"

step="venv"
say "venv"
rm -rf "$venv"
run "$qemu" -L "$root" "$root/usr/bin/python3.11" -m venv --without-pip "$venv" \
  || die "the emulated python3.11 could not make a venv (see $log)"
# Debian ships no .pyc (its postinst compiles them): compile the stdlib once, or every emulated start compiles
# what it imports (PYTHONDONTWRITEBYTECODE is often set in CI)
say "compileall (the stdlib's .pyc)"
run arm_py -m compileall -q -j 0 "$root/usr/lib/python3.11" || say "compileall of the stdlib reported errors (ignored)"

step="pip install"
say "pip install ${PIP_REQS[*]} (emulated: about 1.5 min)"
pip_args=(install --only-binary=:all: --no-input --disable-pip-version-check --no-warn-script-location)
run arm_py "$pip_whl/pip" "${pip_args[@]}" "${PIP_REQS[@]}" || die "pip install ${PIP_REQS[*]} failed (see $log)"
for extra in "${PIP_OPTIONAL[@]}"; do
  run arm_py "$pip_whl/pip" "${pip_args[@]}" "$extra" || say "no aarch64 wheel of $extra installed (optional; see $log)"
done

step="check"
found=$(arm_py -c "$PROBE" 2>>"$log") || die "the venv does not import its packages (see $log)"
case $found in aarch64\ *) ;; *) die "the emulated Python reports '$found', not aarch64" ;; esac
printf '%s\n%s\n' "$key" "$found" > "$stamp"
rm -f "$failed"
echo "arm_python: $found in $dir (built in $(( $(date +%s) - start )) s)"
