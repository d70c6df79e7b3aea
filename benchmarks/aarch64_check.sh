#!/usr/bin/env bash
# The native kernel on aarch64 (ARM Linux; the portable C paths an ARM Mac's CPU also runs), from an x86-64 Debian
# machine without ARM hardware: cross-compile kernels/native/lvq.c with and without OpenMP, then run the kernel's
# tests under qemu-user in an arm64 Debian tree with torch's aarch64 CPU wheel.
#   bash benchmarks/aarch64_check.sh [WORK_DIR]      # default /tmp/lowvram-aarch64; needs root for apt-get
# Left out under emulation, not on ARM: onnxruntime (its import segfaults in qemu-user: the tests that expect it
# as the default backend are deselected) and tests that start a second Python (qemu-user does not follow exec
# without binfmt_misc). torch 2.9.1: the newest aarch64 wheel on PyPI without CUDA libraries.
set -euo pipefail
W=${1:-/tmp/lowvram-aarch64}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$W"
command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null && command -v debootstrap >/dev/null \
  || apt-get install -y -q gcc-aarch64-linux-gnu libc6-dev-arm64-cross libgomp1-arm64-cross qemu-user debootstrap >/dev/null
if [ ! -x "$W/root/usr/bin/python3.11" ]; then
  debootstrap --foreign --arch=arm64 --variant=minbase --include=python3.11,libpython3.11-dev,libgomp1 bookworm \
    "$W/root" http://deb.debian.org/debian >/dev/null
  (cd "$W/root" && for f in var/cache/apt/archives/*.deb; do dpkg-deb -x "$f" .; done)  # no second stage: no exec
fi
if [ ! -d "$W/site/torch" ]; then
  P="--target $W/site --python-version 3.11 --implementation cp --only-binary=:all: --platform manylinux_2_28_aarch64
     --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64"
  pip install -q $P --no-deps "torch==2.9.1"
  pip install -q $P safetensors numpy sentencepiece tiktoken tokenizers jinja2 onnx pytest filelock typing-extensions \
    sympy networkx fsspec
fi
mkdir -p "$W/shadow/onnxruntime"
echo 'raise ImportError("onnxruntime is left out under qemu-user (its import segfaults there)")' \
  > "$W/shadow/onnxruntime/__init__.py"
PY_INC="-I$W/root/usr/include/python3.11 -idirafter $W/root/usr/include"
run_tests() {  # $1: extra gcc flags
  rm -rf "$W/pkg" && mkdir -p "$W/pkg"
  cp -r "$REPO/lowvram" "$W/pkg/lowvram" && cp -r "$REPO/kernels" "$W/pkg/lowvram/kernels"
  cp -r "$REPO/converters" "$W/pkg/lowvram/converters" && cp -r "$REPO/tests" "$REPO/pyproject.toml" "$W/pkg/"
  ln -s "$REPO/examples" "$W/pkg/examples" && ln -sfn "$REPO/../shared" "$W/shared"
  find "$W/pkg" \( -name __pycache__ -o -name '_lvq.*.so' \) -prune -exec rm -rf {} +
  # shellcheck disable=SC2086
  aarch64-linux-gnu-gcc -O3 -std=c11 -fPIC -shared $1 $PY_INC "$REPO/kernels/native/lvq.c" \
    -o "$W/pkg/lowvram/kernels/_lvq.cpython-311-aarch64-linux-gnu.so"
  (cd "$W/pkg" && qemu-aarch64 -L "$W/root" -E PYTHONPATH="$W/shadow:$W/pkg:$W/site" -E HOME="$W" \
    "$W/root/usr/bin/python3.11" -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_kernels.py \
    tests/test_repack_cache.py tests/test_dtypes.py \
    --deselect tests/test_kernels.py::test_default_backend_and_errors \
    --deselect tests/test_kernels.py::test_native_falls_back_for_shapes_it_does_not_take)
}
echo "== aarch64, gcc -fopenmp (Linux) =="
run_tests "-fopenmp"
echo "== aarch64, no OpenMP (as Apple clang builds it) =="
run_tests ""
