"""GPTQModel's GPTQ (-> GPTQ v1 checkpoint) and AWQ (-> AWQ GEMM checkpoint) on given token ids.

Calibration. Each row of ``input_ids`` becomes one sample ``{"input_ids": row, "attention_mask":
ones}``, passed to ``quantize()`` with ``batch_size=1`` (one forward per row, no padding),
``calibration_sort=None`` (the default ``"desc"`` sorts rows by length; ``None`` keeps our order)
and ``calibration_concat_size=None`` (no re-packing of rows). No tokenizer is involved. Three
filters in GPTQModel 7.6.0 cannot be switched off, so the ids they would touch are refused up front
instead of letting them change the set silently: rows of 10 tokens or fewer are dropped
(``quantize()`` takes ``calibration_data_min_length`` but does not forward it to its processors),
rows longer than the model's ``max_position_embeddings`` are truncated (both checked here), and ids
outside the vocabulary are replaced by the pad token (`quantlab.reference.run_reference` refuses
those for every toolkit).

Settings. The model is loaded in bfloat16 (GPTQModel's torch kernels run only fp16/bf16) and packed
with the portable torch kernels: ``BACKEND.GPTQ_TORCH`` for GPTQ, ``BACKEND.AWQ_TORCH`` for AWQ (the
only AWQ backend that runs on a CPU). The device is GPTQModel's own choice (the accelerator when
there is one, else the CPU). GPTQ: ``desc_act=act_order``, ``damp_percent`` as given, and
``act_group_aware=False``: GPTQModel turns its group-aware reordering (GAR) on by default, which is
not part of GPTQ as published, so a run with ``act_order=False`` quantizes columns in their natural
order like every other GPTQ. ``offload_to_disk=False`` keeps finished layers in memory instead of a
temporary folder (the models we benchmark fit). Everything else is GPTQModel's default: true
sequential, no MSE grid, damping auto-increment on a failed Cholesky, and the RTN fallback for
modules that see under 0.5 % of the tokens (only MoE experts can; our models are dense).

Process state. On a machine with two cores or fewer, ``GPTQMODEL_CPU_WORKERS=2`` is set before
GPTQModel is imported (its default there is one worker, which serialises its pipeline); an explicit
value is respected, and it only takes effect if GPTQModel was not already used in this process.
GPTQModel writes per-module JSON logs into ``./logs``; they go to a temporary folder instead (the
same numbers are saved as ``quant_log.csv`` in the checkpoint). Its INFO messages (a table row per
module) are hidden during the run and ``save()``'s printout of the config files it wrote is
swallowed; warnings, errors and GPTQModel's progress bars still print.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np

from quantlab.atomic import atomic_directory
from quantlab.errors import ConfigError, MissingDependencyError, QuantlabError
from quantlab.reference import INSTALL_HINT, ReferenceRun, package_versions

MIN_ROW_TOKENS = 11  # GPTQModel drops calibration rows of <= 10 tokens
EXPECTED_FORMAT = {"gptq": "gptq", "awq": "awq-gemm"}  # method -> the checkpoint asked for


def run(
    method: str,
    model_path: Path,
    input_ids: np.ndarray,
    out_dir: Path,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool,
    damp_percent: float,
) -> ReferenceRun:
    """Quantize with GPTQModel and save its checkpoint into ``out_dir`` (see module docstring)."""
    _check_rows(model_path, input_ids)
    if (os.cpu_count() or 1) <= 2:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    try:
        import torch
        from gptqmodel import BACKEND, GPTQModel
        from gptqmodel.looper import loop_processor
        from gptqmodel.quantization.config import AWQConfig, GPTQConfig
    except ImportError as exc:
        raise MissingDependencyError(
            f"GPTQModel cannot be imported ({exc}); {INSTALL_HINT}"
        ) from exc

    if method == "gptq":
        config = GPTQConfig(
            bits=bits,
            group_size=group_size,
            sym=sym,
            desc_act=act_order,
            act_group_aware=False,
            damp_percent=damp_percent,
            format="gptq",
            offload_to_disk=False,
        )
        backend = BACKEND.GPTQ_TORCH
    else:
        config = AWQConfig(
            bits=bits, group_size=group_size, sym=sym, format="gemm", offload_to_disk=False
        )
        backend = BACKEND.AWQ_TORCH
    calibration = [
        {"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in input_ids
    ]

    try:
        with (
            tempfile.TemporaryDirectory(prefix="quantlab-gptqmodel-logs-") as logs,
            mock.patch.object(loop_processor, "_PROJECT_LOG_DIR", Path(logs)),
            _gptqmodel_log_level(logging.WARNING),
            atomic_directory(out_dir) as tmp,
        ):
            model = GPTQModel.load(str(model_path), config, dtype=torch.bfloat16)
            device = str(model.quantize_config.device)
            start = time.perf_counter()
            model.quantize(
                calibration,
                calibration_sort=None,
                calibration_concat_size=None,
                batch_size=1,
                backend=backend,
            )
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # save() prints config.json in full
                model.save(str(tmp))
            save_seconds = time.perf_counter() - start
            written = _written_format(tmp / "quantize_config.json")
            if written != EXPECTED_FORMAT[method]:
                raise QuantlabError(
                    f"GPTQModel {method} wrote {written!r}, expected {EXPECTED_FORMAT[method]!r}"
                )
    except QuantlabError:
        raise
    except Exception as exc:
        raise QuantlabError(f"GPTQModel {method} failed: {type(exc).__name__}: {exc}") from exc

    return ReferenceRun(
        impl="gptqmodel",
        method=method,
        out_dir=out_dir,
        seconds=seconds,
        save_seconds=save_seconds,
        format=written,
        versions=package_versions("gptqmodel", "torch", "transformers"),
        dtype="bfloat16",
        device=device.lower().removeprefix("device."),
    )


def _check_rows(model_path: Path, input_ids: np.ndarray) -> None:
    """Refuse ids that GPTQModel would drop or truncate (see the module docstring)."""
    seq_len = input_ids.shape[1]
    if seq_len < MIN_ROW_TOKENS:
        raise ConfigError(
            f"GPTQModel drops calibration rows shorter than {MIN_ROW_TOKENS} tokens; "
            f"seq_len is {seq_len}"
        )
    config = json.loads((model_path / "config.json").read_text())
    max_positions = config.get("max_position_embeddings")
    if max_positions and seq_len > max_positions:
        raise ConfigError(
            f"GPTQModel truncates calibration rows to max_position_embeddings={max_positions}; "
            f"seq_len is {seq_len}"
        )


@contextlib.contextmanager
def _gptqmodel_log_level(level: int) -> Iterator[None]:
    """Set GPTQModel's shared logger to ``level`` for the block."""
    from logbar import LogBar

    log = LogBar.shared()
    previous = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(previous)


def _written_format(quantize_config: Path) -> str:
    """The checkpoint layout GPTQModel recorded: "gptq" (v1), "awq-gemm", "gptq-gptq_v2", ..."""
    cfg = json.loads(quantize_config.read_text())
    method, layout = cfg.get("quant_method"), cfg.get("format")
    return "gptq" if (method, layout) == ("gptq", "gptq") else f"{method}-{layout}"
