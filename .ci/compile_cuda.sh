#!/usr/bin/env bash
# Compiles every csrc/**/*.cu with plain nvcc for sm_80 and sm_90: the kernels include only CUDA
# headers, so this checks them without a GPU or a CUDA build of torch.
set -euo pipefail

cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then
  NVCC=/usr/local/cuda/bin/nvcc
fi
if [[ -z "$NVCC" ]]; then
  echo "compile_cuda: nvcc not found; skipping the CUDA kernel compile check"
  exit 0
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
mapfile -t sources < <(find csrc -name '*.cu' | sort)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "compile_cuda: no .cu files under csrc/" >&2
  exit 1
fi
for src in "${sources[@]}"; do
  echo "compile_cuda: $src"
  "$NVCC" -c -std=c++17 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    "$src" -o "$out/$(basename "$src").o"
done
echo "compile_cuda: ${#sources[@]} files OK ($("$NVCC" --version | tail -1))"
