"""Run the established toolkits' GPTQ and AWQ on quantlab's calibration tokens.

`run_reference(impl, method, model_path, input_ids, out_dir)` quantizes a Hugging Face model folder
with GPTQModel or llm-compressor, feeding the toolkit exactly the rows of ``input_ids`` (quantlab's
`CalibrationSet.input_ids`, one sample per row, attention mask all ones), and saves the result in
the toolkit's own checkpoint format. It serves two readers: the benchmark that compares quantlab's
methods with the toolkits on the same tokens, and the interoperability tests that need third-party
checkpoints of tiny models. The toolkits are optional (``pip install -e ".[reference]"``) and are
imported only when a run starts; importing this package imports neither.

| impl          | method | checkpoint written                                       |
|---------------|--------|----------------------------------------------------------|
| gptqmodel     | gptq   | GPTQ v1 (``quant_method: gptq``, ``format: gptq``)        |
| gptqmodel     | awq    | AWQ GEMM (``quant_method: awq``, ``format: gemm``)        |
| llmcompressor | gptq   | compressed-tensors ``pack-quantized``                    |
| llmcompressor | awq    | compressed-tensors ``pack-quantized`` (AWQ-smoothed)     |

Each impl module (`gptqmodel_impl`, `llmcompressor_impl`) documents the toolkit options it sets and
why. Both run in the calling process: a toolkit changes process-wide state (environment variables,
logger levels, torch settings), so a benchmark should give each impl its own subprocess.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from quantlab.errors import ConfigError, DataError, InvalidModelError, MissingDependencyError

IMPLS: dict[str, str] = {  # impl name -> the module that runs it
    "gptqmodel": "quantlab.reference.gptqmodel_impl",
    "llmcompressor": "quantlab.reference.llmcompressor_impl",
}
TOOLKIT_PACKAGES: dict[str, str] = {"gptqmodel": "gptqmodel", "llmcompressor": "llmcompressor"}
METHODS = ("gptq", "awq")
INSTALL_HINT = 'pip install -e ".[reference]"'


@dataclass(frozen=True)
class ReferenceRun:
    """One toolkit run and the checkpoint it wrote."""

    impl: str  # "gptqmodel" | "llmcompressor"
    method: str  # "gptq" | "awq"
    out_dir: Path  # the saved checkpoint folder
    seconds: float  # wall time of the toolkit's quantization call only (not load or save)
    save_seconds: float  # wall time of the toolkit's save call
    format: str  # what was written: "gptq" (v1), "awq-gemm", "compressed-tensors pack-quantized"
    versions: dict  # distribution name -> version used (toolkit, torch, transformers, ...)
    dtype: str  # the dtype the model was loaded in for calibration ("bfloat16")
    device: str  # where the toolkit calibrated ("cpu", "cuda", ...)


def available(impl: str) -> bool:
    """Whether ``impl``'s toolkit is installed (found on the path; it is not imported)."""
    _check_impl(impl)
    return importlib.util.find_spec(TOOLKIT_PACKAGES[impl]) is not None


def run_reference(
    impl: str,
    method: str,
    model_path: Path,
    input_ids: np.ndarray,
    out_dir: Path,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    damp_percent: float = 0.01,
) -> ReferenceRun:
    """Quantize ``model_path`` with ``impl``'s ``method`` on ``input_ids``; write ``out_dir``.

    ``input_ids`` is an int64 array (n_samples, seq_len); each row is one calibration sample.
    ``group_size`` -1 means one group per output row. ``act_order`` and ``damp_percent`` apply to
    GPTQ only. ``out_dir`` must not exist yet; it appears complete or not at all.

    Raises `MissingDependencyError` when the toolkit is not installed, `ConfigError` /
    `DataError` / `InvalidModelError` for bad arguments, and `QuantlabError` naming the toolkit
    when the toolkit itself fails.
    """
    _check_impl(impl)
    if method not in METHODS:
        raise ConfigError(f"unknown reference method {method!r}; known: {', '.join(METHODS)}")
    ids = _check_input_ids(input_ids)
    _check_settings(method, bits, group_size, act_order, damp_percent)
    model_path = Path(model_path)
    _check_ids_fit_model(ids, model_path)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"{out_dir} already exists; remove it or choose another output folder")
    if not available(impl):
        raise MissingDependencyError(f"{impl} is not installed; run: {INSTALL_HINT}")
    module = importlib.import_module(IMPLS[impl])
    return module.run(
        method,
        model_path,
        ids,
        out_dir,
        bits=bits,
        group_size=group_size,
        sym=sym,
        act_order=act_order,
        damp_percent=damp_percent,
    )


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of the named distributions ("not installed" for missing ones)."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ConfigError(f"unknown reference impl {impl!r}; known: {', '.join(IMPLS)}")


def _check_input_ids(input_ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise DataError(
            f"input_ids must be a non-empty (n_samples, seq_len) array, got {ids.shape}"
        )
    if not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    if ids.min() < 0:
        raise DataError("input_ids holds negative token ids")
    return ids.astype(np.int64, copy=False)


def _check_ids_fit_model(ids: np.ndarray, model_path: Path) -> None:
    """Refuse ids outside the model's vocabulary (GPTQModel would silently replace them)."""
    try:
        config = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"{model_path} has no readable config.json: {exc}") from exc
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if vocab and int(ids.max()) >= vocab:
        raise DataError(
            f"input_ids holds token id {int(ids.max())}, outside the model's vocabulary ({vocab})"
        )


def _check_settings(
    method: str, bits: int, group_size: int, act_order: bool, damp_percent: float
) -> None:
    if bits not in (2, 3, 4, 8):
        raise ConfigError(f"bits must be 2, 3, 4 or 8, got {bits}")
    if group_size != -1 and group_size < 1:
        raise ConfigError(f"group_size must be -1 or positive, got {group_size}")
    if method == "awq" and act_order:
        raise ConfigError("act_order applies to GPTQ only")
    if not 0 < damp_percent < 1:
        raise ConfigError(f"damp_percent must be in (0, 1), got {damp_percent}")
