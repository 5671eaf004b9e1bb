"""The CUDA C++ kernel (``csrc/gptq_gemv.cu``: int4 GPTQ dequant + GEMV, batch 1), built at first
use with ``torch.utils.cpp_extension`` for sm_80 and sm_90 and cached.

The build folder is ``<quantlab cache>/kernels/cuda-<hash of the sources>``, so an edited source
is rebuilt and an unchanged one is loaded from the cache in milliseconds. `nvcc_command` is the
compile line the tests run on machines without a GPU (nvcc only needs the toolkit).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "binding.cpp", CSRC / "gptq_gemv.cu")
ARCHS = ("80", "90")
NVCC_FLAGS = ["-O3", "--use_fast_math", *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS)]


def nvcc_command(arch: str, out: Path) -> list[str]:
    """Compile the kernel file alone for ``sm_<arch>`` (what the no-GPU tests check)."""
    return ["nvcc", f"-arch=sm_{arch}", "-O3", "-c", str(SOURCES[1]), "-o", str(out)]


@functools.cache
def extension():
    """The compiled extension module (built once per source hash, then loaded from the cache)."""
    from torch.utils.cpp_extension import load

    from quantlab import settings

    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    build = settings.cache_dir() / "kernels" / f"cuda-{digest}"
    build.mkdir(parents=True, exist_ok=True)
    return load(
        name=f"quantlab_cuda_{digest}",
        sources=[str(p) for p in SOURCES],
        extra_cuda_cflags=NVCC_FLAGS,
        build_directory=str(build),
        verbose=False,
    )


@functools.cache
def build_error() -> str | None:
    """``None`` when the extension builds (or is cached); else why it does not."""
    try:
        extension()
    except Exception as exc:  # noqa: BLE001 - compiler, ninja, headers: any failure disables it
        return f"the CUDA kernel could not be built: {str(exc).strip().splitlines()[-1][:200]}"
    return None


def matmul_gptq(x, qweight, qzeros, scales, g_idx, bits: int, splits: int | None = None):
    """``x @ W`` for one row of ``x`` (shape ``(1, K)``, float16), ``W`` int4 in the GPTQ layout."""
    if bits != 4 or x.shape[0] != 1 or x.dtype != torch.float16:
        raise ValueError("the CUDA GEMV serves int4 weights and one float16 row of x")
    K = x.shape[1]
    if splits is None:  # about 4 waves of blocks over the GPU's SMs
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        blocks_n = -(-qweight.shape[1] // 256)
        splits = max(1, min(K // 256, -(-4 * sms // blocks_n)))
    with torch.cuda.device(x.device):  # the kernel launches on the current device's stream
        stream = torch.cuda.current_stream(x.device).cuda_stream
        y = extension().gptq_gemv_int4(
            x.reshape(-1), qweight, qzeros, scales.half(), g_idx, splits, stream
        )
    return y.view(1, -1)
