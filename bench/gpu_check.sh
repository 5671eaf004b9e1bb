#!/usr/bin/env bash
# The one script to run when a GPU machine is lent (see docs/KERNELS.md): the GPU tests of the
# kernels, then the kernel benchmark table. Runs from the repository root with the machine's own
# torch + triton; quantlab is used from the source tree (no install).
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
if python -c "import pytest" 2>/dev/null; then
  python -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "cuda or triton or selection" || true
fi
python bench/kernels.py --iters "${ITERS:-100}" --json "${OUT:-results}/bench-kernels.json"
