#!/usr/bin/env bash
# Everything a GPU machine is for, in one call: build the CUDA extension, run the CUDA tests, time
# the decode kernel and the end-to-end throughput against Hugging Face on the same card (and against
# pagedlm with batch_invariant=False: what the fixed-shape linears of batch invariance cost there).
#
#   bash benchmarks/cuda_check.sh [build] [test] [kernels] [throughput]   (default: all four)
#
# Logs go to $OUT (default ./cuda_logs). The throughput stage needs MODEL (a checkpoint directory)
# and DATASET (a JSONL, e.g. ../shared/data/alpaca_eval_805.jsonl); with RANDOM_WEIGHTS=1, MODEL only
# needs config.json and the tokenizer files, and random weights of that architecture are made first
# (speed does not depend on the weights once output lengths are enforced). DTYPES picks the
# throughput runs' dtypes (default: bfloat16 float32).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-cuda_logs}"
mkdir -p "$OUT"
stages=("${@:-build test kernels throughput}")
stages=(${stages[*]})
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

run() {  # run NAME CMD...: log to $OUT/NAME.log, show the tail
  local name="$1"
  shift
  echo "== $name: $*"
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  echo "== $name: exit $rc"
  [[ $rc -eq 0 ]] || status=1
  return $rc
}

for stage in "${stages[@]}"; do
  case "$stage" in
    build)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
      "$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
      TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        run build "$python" setup.py build_ext --inplace || exit 1
      ;;
    test)
      run test "$python" -m pytest -q -m cuda -p no:cacheprovider tests/test_ops.py tests/test_parity.py \
        tests/test_batch_invariance.py tests/test_linear.py tests/test_llm_api.py
      ;;
    kernels)
      run kernels "$python" benchmarks/kernel_bench.py --device cuda --dtypes bf16,fp16,fp32 --iters 50
      ;;
    throughput)
      if [[ "${RANDOM_WEIGHTS:-0}" == 1 ]]; then
        weights="$OUT/random-weights-model"
        "$python" - "$MODEL" "$weights" <<'EOF' || exit 1
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.bfloat16).save_pretrained(dst)
for f in src.iterdir():
    if f.name.startswith("tokenizer") or f.name == "generation_config.json":
        shutil.copy(f, dst / f.name)
EOF
        MODEL="$weights"
      fi
      for dtype in ${DTYPES:-bfloat16 float32}; do
        run "throughput_$dtype" "$python" benchmarks/throughput.py --device cuda --dtype "$dtype" \
          --model "$MODEL" --dataset "$DATASET" --systems pagedlm,pagedlm-batch-variant,hf-static,hf-cb,hf-single \
          --hf-single-requests "${HF_SINGLE_REQUESTS:-8}" --hf-requests "${HF_REQUESTS:-256}" \
          --hf-batch-sizes "${HF_BATCH_SIZES:-64,256}"
      done
      ;;
    *)
      echo "unknown stage $stage (build, test, kernels, throughput)" >&2
      exit 2
      ;;
  esac
done
exit $status
