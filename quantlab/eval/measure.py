"""Size, memory, speed and hardware: the cost side of every evaluated artifact.

- Size: bytes on disk (file or folder) and effective bits per weight = 8 * tensor bytes / weights,
  read from the GGUF tensor table or the safetensors headers (no weights loaded).
- Memory: peak resident memory (RSS) of this process while a block of work runs. On Linux the peak
  is reset before the block by writing ``5`` to ``/proc/self/clear_refs`` and read from ``VmHWM``
  after it; on a GPU (the device the work ran on), ``torch.cuda.max_memory_allocated`` and
  ``max_memory_reserved`` over the same block - measured VRAM, not an estimate - and, where NVML
  is available, the whole process's device memory as the driver sees it (CUDA context and any
  allocator torch does not own included), read at the end of the block.
- Speed: prefill tokens/s (one prompt of ``prompt_tokens``) and decode tokens/s (``decode_tokens``
  greedy steps with the KV cache), each the median of ``runs`` timed runs after one warm-up, in the
  artifact's native runtime (llama.cpp for GGUF, torch otherwise), with the thread count recorded.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantlab.errors import QuantlabError


@dataclass(frozen=True)
class SizeResult:
    bytes_on_disk: int
    tensor_bytes: int
    weights: int  # number of stored tensor elements (original parameters)
    bits_per_weight: float  # the whole file: 8 * tensor bytes / weights
    # the quantized linears alone (codes + scales + zero points + indices over their weights);
    # for an unquantized model, its linears' dtype. None in rows measured before it existed.
    linear_bits_per_weight: float | None = None


def size_of(path: str | os.PathLike) -> SizeResult:
    """Size of an artifact (any registered format) or a Hugging Face folder, and its bits per
    weight."""
    from quantlab.formats import detect

    path = Path(path)
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    on_disk = sum(f.stat().st_size for f in files)
    found = detect(path)
    # an unquantized folder: every tensor is a weight; the linears are the blocks' own
    stored = found[0].size(path) if found is not None else _folder_size(path)
    linear_bpw = None
    if stored.linear_weights:
        linear_bpw = 8 * stored.linear_bytes / stored.linear_weights
    bpw = 8 * stored.tensor_bytes / max(stored.weights, 1)
    return SizeResult(on_disk, stored.tensor_bytes, stored.weights, bpw, linear_bpw)


def _folder_size(path: Path):
    import json

    from quantlab.formats import ArtifactSize
    from quantlab.models.arch import arch_spec_for_config
    from quantlab.models.folder import SAFETENSORS_DTYPE_SIZES, read_safetensors_header

    st = sorted(p for p in path.glob("*.safetensors") if p.name != "imatrix.safetensors")
    infos = [t for f in st for t in read_safetensors_header(f)]
    linears = []
    try:
        arch = arch_spec_for_config(json.loads((path / "config.json").read_text()))
        suffixes = tuple(f".{name}.weight" for name in arch.linears)
        linears = [t for t in infos if t.name.startswith(arch.blocks) and t.name.endswith(suffixes)]
    except (OSError, ValueError, QuantlabError):  # no (known) architecture: no linear share
        pass
    nbytes = lambda ts: sum(t.numel * SAFETENSORS_DTYPE_SIZES[t.dtype] for t in ts)  # noqa: E731
    return ArtifactSize(
        nbytes(infos),
        sum(t.numel for t in infos),
        nbytes(linears) if linears else None,
        sum(t.numel for t in linears) if linears else None,
    )


@dataclass
class MemoryResult:
    peak_rss_bytes: int | None = None  # process peak RSS during the block (Linux)
    cuda_peak_bytes: int | None = None  # torch max allocated during the block (GPU)
    note: str = ""
    cuda_reserved_bytes: int | None = None  # torch max reserved (the caching allocator's pool)
    process_device_bytes: int | None = None  # NVML: the process's device memory at the end
    device: str | None = None  # where the measured work ran ("cpu", "cuda:0 (NVIDIA H200)")
    # the planner's estimate of this artifact's GPU memory at the evaluation's context and batch
    # (`quantlab.workbench.plan.planned_vram`), set beside a measured VRAM to check the planner
    planned_bytes: int | None = None

    @property
    def vram_bytes(self) -> int | None:
        """The measured VRAM of the work: what the process held on the GPU at its peak (torch's
        reserved pool, or NVML's count when larger: it includes the CUDA context)."""
        values = [v for v in (self.cuda_reserved_bytes, self.process_device_bytes) if v]
        return max(values) if values else self.cuda_peak_bytes


def _read_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextmanager
def peak_memory(device: str | None = None) -> Iterator[MemoryResult]:
    """Measure the peak memory of the enclosed block (see module doc) on ``device`` (default:
    the current GPU when torch sees one)."""
    from quantlab.devices import device_label, is_gpu, process_device_memory

    result = MemoryResult()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
        result.note = "peak RSS since process start (could not reset the counter)"
    import torch

    if device is None:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    cuda = is_gpu(device)
    if cuda:  # what earlier work left in torch's cache is not this block's memory
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield result
    result.peak_rss_bytes = _read_hwm()
    if result.peak_rss_bytes is None and not reset:
        import resource

        result.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result.device = device_label(device)
    if cuda:
        torch.cuda.synchronize(device)
        result.cuda_peak_bytes = int(torch.cuda.max_memory_allocated(device))
        result.cuda_reserved_bytes = int(torch.cuda.max_memory_reserved(device))
        result.process_device_bytes = process_device_memory(device)


@dataclass(frozen=True)
class SpeedResult:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prompt_tokens: int
    decode_tokens: int
    runs: int  # timed runs (after one warm-up); the median is reported
    runtime: str
    threads: int


def measure_speed(runner, prompt: np.ndarray, decode_tokens: int = 32, runs: int = 3):
    """Median prefill and decode throughput of ``runner.timed_generate`` (after one warm-up)."""
    runner.timed_generate(prompt, decode_tokens)
    prefill, decode = [], []
    for _ in range(runs):
        t_prefill, t_decode = runner.timed_generate(prompt, decode_tokens)
        prefill.append(len(prompt) / t_prefill)
        decode.append(decode_tokens / t_decode)
    return SpeedResult(
        prefill_tokens_per_s=statistics.median(prefill),
        decode_tokens_per_s=statistics.median(decode),
        prompt_tokens=len(prompt),
        decode_tokens=decode_tokens,
        runs=runs,
        runtime=runner.runtime,
        threads=runner.threads,
    )


@dataclass(frozen=True)
class HardwareInfo:
    cpu: str
    cores: int
    gpu: str | None
    platform: str
    versions: dict[str, str] = field(default_factory=dict)


def hardware_info() -> HardwareInfo:
    from quantlab.devices import cpu_name

    cpu = cpu_name()
    versions = {"python": platform.python_version()}
    gpu = None
    import importlib.metadata as md

    for pkg in ("quantlab", "torch", "transformers", "llama_cpp_python", "lm_eval", "gguf"):
        try:
            versions[pkg] = md.version(pkg.replace("_", "-"))
        except md.PackageNotFoundError:
            continue
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    return HardwareInfo(cpu, os.cpu_count() or 1, gpu, platform.platform(), versions)
