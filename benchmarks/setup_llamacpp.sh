#!/usr/bin/env bash
# Set up llama.cpp, the CPU peer of benchmarks/throughput.py. Run it from the project's venv:
#
#     . .venv/bin/activate && bash benchmarks/setup_llamacpp.sh [--batched-bench]
#
# Everything lands under ${PAGEDLM_BENCH_CACHE:-~/.cache/pagedlm/bench}; the project's venv is not touched:
#   sdist/           llama-cpp-python's sdist, which vendors llama.cpp
#   llama.cpp        link to that llama.cpp tree (convert_hf_to_gguf.py, tools/batched-bench)
#   llamacpp-venv/   a venv with llama-cpp-python built from the sdist (-march=native; 4-8 min on 2 cores)
#   convert-deps/    sentencepiece, the one converter import the project's venv lacks (pip --target)
#   llama.cpp-build/bin/llama-batched-bench   only with --batched-bench (another few minutes)
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail

VERSION=0.3.36
BENCH=${PAGEDLM_BENCH_CACHE:-$HOME/.cache/pagedlm/bench}
PYTHON=${PYTHON:-python}
JOBS=$(nproc)
mkdir -p "$BENCH/sdist"
cd "$BENCH"

SDIST=sdist/llama_cpp_python-$VERSION.tar.gz
if [ ! -f "$SDIST" ]; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d sdist
fi
if [ ! -f llama.cpp/convert_hf_to_gguf.py ]; then
    tar xzf "$SDIST" -C sdist
    ln -sfn "sdist/llama_cpp_python-$VERSION/vendor/llama.cpp" llama.cpp
fi

if ! llamacpp-venv/bin/python -c "import llama_cpp" 2>/dev/null; then
    "$PYTHON" -m venv llamacpp-venv
    CMAKE_BUILD_PARALLEL_LEVEL=$JOBS llamacpp-venv/bin/pip install "$SDIST"
fi

if ! PYTHONPATH=convert-deps "$PYTHON" -c "import sentencepiece" 2>/dev/null; then
    "$PYTHON" -m pip install --target convert-deps sentencepiece
fi

if [ "${1:-}" = "--batched-bench" ] && [ ! -x llama.cpp-build/bin/llama-batched-bench ]; then
    cmake -S llama.cpp -B llama.cpp-build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build llama.cpp-build --target llama-batched-bench -j "$JOBS"
fi

echo "llama.cpp peer ready under $BENCH (llama-cpp-python $VERSION)"
