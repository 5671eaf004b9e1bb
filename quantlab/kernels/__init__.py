"""Dequantization kernels with declared capabilities, and the one place that picks among them.

Every kernel is a `KernelSpec`: the op it implements, its backend (``cuda`` > ``triton`` >
``torch``, in order of preference), and what it supports - bit widths, layouts, devices and, for
matmuls, the largest batch it serves. `select` returns the best available kernel for a request,
or the one a caller forces with ``backend=``, and says exactly why a forced kernel cannot run.
Nothing here imports Triton or compiles CUDA: a kernel's module is imported when it is first
called. The ops themselves (declared once with ``torch.library`` so ``torch.compile`` can trace
them) are in `quantlab.kernels.ops`; the arithmetic every kernel must reproduce is
`quantlab.kernels.reference`.

Ops: ``dequant_gptq`` / ``dequant_awq`` (packed int -> (K, N) float), ``matmul_gptq`` (``x @ W``
with ``W`` dequantized on the fly), ``dequant_gguf`` (Q8_0 / Q4_0 / Q4_K blocks -> float),
``matmul_int4pack`` / ``matmul_int8pack`` (``x @ W.T`` in PyTorch's own CPU packed layouts, run by
its CPU kernels: the ``cpu`` backend, `quantlab.kernels.cpu`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from dataclasses import dataclass

from quantlab.errors import ConfigError

BACKENDS = ("cuda", "triton", "cpu", "torch")  # preference order
OPS = (
    "dequant_gptq",
    "dequant_awq",
    "matmul_gptq",
    "dequant_gguf",
    "matmul_int4pack",
    "matmul_int8pack",
)


@dataclass(frozen=True)
class KernelSpec:
    """One kernel and what it can run."""

    op: str  # one of OPS
    backend: str  # one of BACKENDS
    target: str  # "module:function", imported on first use
    bits: tuple[int, ...] = ()  # bit widths (empty: not applicable, e.g. GGUF)
    layouts: tuple[str, ...] = ()  # "gptq", "awq", or GGUF block types
    devices: tuple[str, ...] = ("cuda",)
    max_batch: int | None = None  # matmul only: most rows of x it serves
    dtypes: tuple[str, ...] = ()  # activation dtypes it takes (empty: any)

    @property
    def name(self) -> str:
        return f"{self.backend}.{self.op}"

    def unavailable(self, device: str) -> str | None:
        """Why this kernel cannot run on ``device`` here, or ``None`` if it can."""
        if device not in self.devices:
            return f"{self.name} runs on {', '.join(self.devices)}, not {device}"
        if self.backend == "triton":
            if importlib.util.find_spec("triton") is None:
                return f"{self.name} needs Triton (pip install 'quantlab[kernels]')"
            if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                return (
                    f"{self.name} runs on the CPU only in Triton's interpreter (TRITON_INTERPRET=1)"
                )
        if self.backend == "cpu":
            from quantlab.kernels.cpu import available

            return available()
        if self.backend == "cuda":
            if shutil.which("nvcc") is None and not _cuda_home():
                return f"{self.name} is compiled at first use and needs nvcc (CUDA toolkit)"
            from quantlab.kernels.cuda_ext import build_error

            return build_error()  # builds once; a failed build makes the kernel unavailable
        return None

    def refusal(self, *, bits=None, layout=None, batch=None, dtype=None) -> str | None:
        """Why this kernel does not support the request, or ``None`` if it does."""
        if dtype is not None and self.dtypes and str(dtype).split(".")[-1] not in self.dtypes:
            return f"{self.name} takes {', '.join(self.dtypes)} activations, not {dtype}"
        if bits is not None and self.bits and bits not in self.bits:
            return f"{self.name} supports {self.bits} bits, not {bits}"
        if layout is not None and self.layouts and layout not in self.layouts:
            return f"{self.name} supports layouts {', '.join(self.layouts)}, not {layout}"
        if batch is not None and self.max_batch is not None and batch > self.max_batch:
            return f"{self.name} serves batches up to {self.max_batch}, not {batch}"
        return None

    def load(self):
        module, function = self.target.split(":")
        return getattr(importlib.import_module(module), function)


def _cuda_home() -> str | None:
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")


_REGISTRY: dict[tuple[str, str], KernelSpec] = {}


def register_kernel(spec: KernelSpec) -> KernelSpec:
    """Add a kernel; a second kernel for the same (op, backend) is a programming error."""
    if spec.op not in OPS or spec.backend not in BACKENDS:
        raise ValueError(f"kernel {spec.name}: op must be in {OPS}, backend in {BACKENDS}")
    if (spec.op, spec.backend) in _REGISTRY:
        raise ValueError(f"kernel {spec.name} is already registered")
    _REGISTRY[(spec.op, spec.backend)] = spec
    return spec


def kernels() -> list[KernelSpec]:
    """Every registered kernel, best backend first."""
    return sorted(_REGISTRY.values(), key=lambda k: (k.op, BACKENDS.index(k.backend)))


def select(op: str, *, device: str, backend: str = "auto", **request) -> KernelSpec:
    """The kernel that runs ``op`` for ``request`` (bits, layout, batch) on ``device``: the forced
    ``backend``, or the most preferred one that is available and supports the request (never
    Triton's CPU interpreter, which is slow and meant for tests)."""
    if op not in OPS:
        raise ConfigError(f"unknown kernel op {op!r}; known: {', '.join(OPS)}")
    if backend != "auto":
        spec = _REGISTRY.get((op, backend))
        if spec is None:
            have = [b for b in BACKENDS if (op, b) in _REGISTRY]
            raise ConfigError(f"no {backend} kernel for {op}; have: {', '.join(have)}")
        why = spec.unavailable(device) or spec.refusal(**request)
        if why:
            raise ConfigError(why)
        return spec
    for name in BACKENDS:
        spec = _REGISTRY.get((op, name))
        if name == "triton" and device == "cpu":
            continue  # the interpreter is for tests: only a forced backend uses it
        if spec and not spec.unavailable(device) and not spec.refusal(**request):
            return spec
    raise ConfigError(f"no kernel runs {op} for {request} on {device}")


_T, _R = "quantlab.kernels.triton_kernels", "quantlab.kernels.reference"
_ANY = ("cpu", "cuda")
_TRITON_DEVICES = ("cuda", "cpu")  # the CPU through the interpreter only
for _op, _bits, _layouts in (
    ("dequant_gptq", (2, 4, 8), ("gptq",)),
    ("dequant_awq", (4,), ("awq",)),
    ("dequant_gguf", (), ("Q8_0", "Q4_0", "Q4_K")),
):
    register_kernel(KernelSpec(_op, "torch", f"{_R}:{_op}", _bits, _layouts, _ANY))
    register_kernel(KernelSpec(_op, "triton", f"{_T}:{_op}", _bits, _layouts, _TRITON_DEVICES))
register_kernel(KernelSpec("matmul_gptq", "torch", f"{_R}:matmul_gptq", (2, 4, 8), ("gptq",), _ANY))
register_kernel(
    KernelSpec(
        "matmul_gptq", "triton", f"{_T}:matmul_gptq", (2, 4, 8), ("gptq",), _TRITON_DEVICES, 64
    )
)
register_kernel(
    KernelSpec(
        "matmul_gptq",
        "cuda",
        "quantlab.kernels.cuda_ext:matmul_gptq",
        (4,),
        ("gptq",),
        ("cuda",),
        1,
    )
)
for _op, _bits, _layout in (("matmul_int4pack", 4, "int4pack"), ("matmul_int8pack", 8, "int8pack")):
    # PyTorch's CPU layouts: the reference unpacks them on the CPU
    register_kernel(KernelSpec(_op, "torch", f"{_R}:{_op}", (_bits,), (_layout,), ("cpu",)))
    register_kernel(
        KernelSpec(_op, "cpu", f"quantlab.kernels.cpu:{_op}", (_bits,), (_layout,), ("cpu",))
    )
