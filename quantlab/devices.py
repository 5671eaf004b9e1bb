"""Where the work runs: one device setting for every command, and what each stage costs there.

``--device cpu|cuda|cuda:N|auto`` (``device:`` in a run config, a choice in the app) is resolved
once by `resolve_device`: ``auto`` is the first GPU when torch sees one, else the CPU; a GPU that
is asked for and not visible is a one-line error naming why (a CPU build of torch, no driver, an
index past the last GPU).

`StageClock` times the stages of a piece of work (capture, read, copy, forward, hessians, solve,
write, ...) as *exclusive* wall time (a stage nested in another is not counted twice) and, on a
GPU, the peak device memory of each stage (``torch.cuda.max_memory_allocated`` and ``_reserved``
from a reset at the stage's start; a stage's peak includes the stages nested in it). Work on a GPU
is asynchronous, so a GPU clock synchronizes the device at each stage boundary.

`device_oom` turns an out-of-memory error inside a stage into one line saying where, how much was
asked for and what to lower.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from quantlab.errors import ConfigError, QuantlabError

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto (the GPU when one is visible)"
_PATTERN = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


def check_device_spec(spec: str) -> str:
    """``spec`` if it is a device setting (without looking for the hardware), else an error."""
    if not isinstance(spec, str) or not _PATTERN.match(spec):
        raise ConfigError(f"device must be {DEVICE_CHOICES}, got {spec!r}")
    return spec


def resolve_device(spec: str | None = "auto") -> str:
    """The torch device string ``spec`` names on this machine: ``cpu`` or ``cuda:N``."""
    import torch

    spec = check_device_spec(spec or "auto")
    if spec == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if spec == "auto":
        return "cuda:0" if available else "cpu"
    if not available:
        why = (
            "this torch is a CPU build"
            if torch.version.cuda is None
            else "torch finds no GPU (driver, CUDA_VISIBLE_DEVICES?)"
        )
        raise QuantlabError(f"device {spec} asked for, but no GPU is visible: {why}; use cpu")
    index = int(spec.split(":")[1]) if ":" in spec else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise QuantlabError(f"device {spec} asked for, but only {count} GPU(s) are visible")
    return f"cuda:{index}"


def is_gpu(device: str) -> bool:
    return str(device).startswith("cuda")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_BF16_UNITS: bool | None = None


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX, through oneDNN). Without
    such units (e.g. an AVX2-only CPU) a bf16 matrix product is several times *slower* than a
    float32 one (measured: 6x on a 2-core AMD EPYC), so bf16 shortcuts meant for speed are
    skipped there. Asked once per process."""
    global _BF16_UNITS
    if _BF16_UNITS is None:
        import torch

        try:
            _BF16_UNITS = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            _BF16_UNITS = False
    return _BF16_UNITS


def device_label(device: str) -> str:
    """``device`` with its hardware, for reports: ``cuda:0 (NVIDIA H200)`` or ``cpu (<model>)``."""
    if is_gpu(device):
        import torch

        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({cpu_name()})"


def process_device_memory(device: str) -> int | None:
    """Device memory this process holds on ``device`` as the driver sees it (NVML: the CUDA
    context and every allocator's pool, not only torch's), or None where NVML is missing."""
    if not is_gpu(device):
        return None
    try:
        import os

        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        import torch

        # by UUID: torch's index is not NVML's under CUDA_VISIBLE_DEVICES
        uuid = str(torch.cuda.get_device_properties(torch.device(device)).uuid)
        uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid():
                return int(proc.usedGpuMemory or 0) or None
    except Exception:  # no NVML, no permission, a driver without per-process accounting
        return None
    return None


class StageClock:
    """Exclusive wall time and (GPU) peak device memory per named stage; see the module doc."""

    def __init__(self, device: str = "cpu"):
        self.device = str(device)
        self.gpu = is_gpu(self.device)
        self.seconds: dict[str, float] = {}
        self.peak_allocated: dict[str, int] = {}
        self.peak_reserved: dict[str, int] = {}
        self._stack: list[list] = []  # [name, seconds of nested stages, their peaks]

    def _sync(self) -> None:
        if self.gpu:
            import torch

            torch.cuda.synchronize(self.device)

    def _fold_peaks(self) -> None:
        """Give every open stage the peaks reached so far, before a reset loses them."""
        import torch

        alloc = int(torch.cuda.max_memory_allocated(self.device))
        reserved = int(torch.cuda.max_memory_reserved(self.device))
        for frame in self._stack:
            frame[2], frame[3] = max(frame[2], alloc), max(frame[3], reserved)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.gpu:
            import torch

            self._sync()
            self._fold_peaks()
            torch.cuda.reset_peak_memory_stats(self.device)
        frame = [name, 0.0, 0, 0]
        self._stack.append(frame)
        start = time.perf_counter()
        try:
            yield
        finally:
            with suppress(Exception):  # a device error is being raised: keep that one
                self._sync()
            elapsed = time.perf_counter() - start
            self._stack.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - frame[1]
            alloc = reserved = 0
            if self.gpu:
                import torch

                alloc = max(int(torch.cuda.max_memory_allocated(self.device)), frame[2])
                reserved = max(int(torch.cuda.max_memory_reserved(self.device)), frame[3])
                self.peak_allocated[name] = max(self.peak_allocated.get(name, 0), alloc)
                self.peak_reserved[name] = max(self.peak_reserved.get(name, 0), reserved)
            if self._stack:
                parent = self._stack[-1]
                parent[1] += elapsed
                parent[2], parent[3] = max(parent[2], alloc), max(parent[3], reserved)

    def report(self) -> dict:
        """Seconds per stage, and on a GPU the peaks per stage in bytes, as plain data."""
        out: dict = {"seconds": dict(self.seconds)}
        if self.gpu:
            out["peak_allocated"] = dict(self.peak_allocated)
            out["peak_reserved"] = dict(self.peak_reserved)
        return out


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, oom):
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text.lower() or isinstance(exc, MemoryError)
    )


def _asked_for(text: str) -> str:
    match = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]i?B)", text)
    return f" (it asked for {match.group(1)} more)" if match else ""


@contextmanager
def device_oom(where: str, device: str, advice: str) -> Iterator[None]:
    """Turn an out-of-memory error inside the block into one `QuantlabError` line: ``where`` it
    happened, on which device, how much it asked for, and ``advice`` (what to lower)."""
    try:
        yield
    except QuantlabError:
        raise
    except BaseException as exc:
        if not _is_oom(exc):
            raise
        kind = "device" if is_gpu(device) else "host"
        msg = f"out of {kind} memory on {device} in {where}{_asked_for(str(exc))}; {advice}"
        if is_gpu(device):
            import torch

            torch.cuda.empty_cache()
        raise QuantlabError(msg) from None
