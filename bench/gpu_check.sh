#!/usr/bin/env bash
# The one script to run when a GPU machine is lent (see docs/KERNELS.md): the kernel tests on the
# GPU, then the kernel benchmark (tile sweep + table). Runs from the repository root with the
# machine's own torch + triton; quantlab is used from the source tree (no install). Wheels of
# packages that machine lacks (gguf, for the GGUF tests) are installed from .whl/ when present.
set -uo pipefail
OUT="${OUT:-results}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export QUANTLAB_CACHE="${QUANTLAB_CACHE:-/tmp/quantlab-cache}"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
echo "tests: $(date +%T)"
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider --timeout 120 tests/test_kernels.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -30
echo "bench: $(date +%T)"
python3 bench/kernels.py --iters "${ITERS:-100}" ${SWEEP:+--sweep} --json "$OUT/bench-kernels.json" 2>&1 | tee "$OUT/bench-kernels.log"
echo "done: $(date +%T)"
