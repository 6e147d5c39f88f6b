#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu stand-alone (the kernels are torch-free), so CUDA kernels are checked on
# machines whose torch has no CUDA. Stops at the first error.
set -euo pipefail

cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
tmpdir="$(mktemp -d)"
trap 'rm -rf "$tmpdir"' EXIT

shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "nvcc_check: no csrc/cuda/*.cu found" >&2
  exit 1
fi
for src in "${sources[@]}"; do
  echo "nvcc_check: $src"
  "$NVCC" -c -std=c++17 -I csrc/include \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -o "$tmpdir/x.o" "$src"
done
echo "nvcc_check: ${#sources[@]} files OK"
