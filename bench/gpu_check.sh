#!/usr/bin/env bash
# The one script to run when a GPU machine is lent (see docs/KERNELS.md and docs/SCALE.md), in one
# call of at most ~8 minutes on an H200:
#   1. the GPU tests: the device path of the block walk and evaluation (tests/test_gpu.py) and the
#      kernels (tests/test_kernels.py);
#   2. GPTQ and AWQ 4-bit g128 on the Llama-3-8B shape (a synthetic model written there: random
#      bf16 weights, the real tensors) with 128 x 2048 calibration tokens of local text, streamed
#      and computed on the GPU: time per stage, peak VRAM per stage, and the quantized model's
#      evaluation (perplexity windows, decode/prefill tokens/s, measured VRAM);
#   3. the kernel benchmark (tile sweep + table), when time is left.
# Runs from the repository root with the machine's own torch + triton; quantlab is used from the
# source tree (no install). Wheels of packages that machine lacks (greenlet, gguf) are installed
# from .whl/ when present (carry .whl). Results go to $OUT (or ./results).
#   bench/gpu_check.sh            # all three
#   bench/gpu_check.sh tests      # or: scale, kernels (any of them, in that order)
set -uo pipefail
OUT="${OUT:-results}"
mkdir -p "$OUT"
STEPS="${*:-tests scale kernels}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export QUANTLAB_CACHE="${QUANTLAB_CACHE:-/tmp/quantlab-cache}"
START=$(date +%s)
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
for step in $STEPS; do
  echo "== $step: $(date +%T) ($(( $(date +%s) - START )) s in)"
  case "$step" in
    tests)
      timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider --timeout 120 \
        tests/test_gpu.py tests/test_kernels.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -30 ;;
    scale)
      timeout "${SCALE_TIMEOUT:-330}" python3 bench/scale.py --sizes llama-3-8b --methods gptq,awq \
        --device cuda --n-samples 128 --seq-len 2048 --calib-dtype bfloat16 \
        --eval-tokens 8192 --eval-context 2048 --eval-dtype bfloat16 --speed \
        --work /tmp/qlscale --json "$OUT/scale-8b.json" 2>&1 | tee "$OUT/scale-8b.log" | tail -25
      cp /tmp/qlscale/scale.log "$OUT/scale-children.log" 2>/dev/null || true ;;
    kernels)
      timeout "${KERNEL_TIMEOUT:-120}" python3 bench/kernels.py --iters "${ITERS:-100}" ${SWEEP:+--sweep} \
        --json "$OUT/bench-kernels.json" 2>&1 | tee "$OUT/bench-kernels.log" | tail -40 ;;
    *) echo "unknown step $step (tests, scale, kernels)" ;;
  esac
done
echo "done: $(date +%T) ($(( $(date +%s) - START )) s)"
