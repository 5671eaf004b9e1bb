"""llm-compressor's GPTQ and AWQ on given token ids, saved as compressed-tensors pack-quantized.

Calibration. ``oneshot`` is handed a ready `torch.utils.data.DataLoader` over the rows of
``input_ids`` (``batch_size=1``, in order, attention mask all ones), so its own dataset path never
runs: that path tokenizes text, draws ``num_calibration_samples`` rows and orders them randomly or
by descending length (an unstable sort, which need not keep equal-length rows in order).
``num_calibration_samples``, ``max_seq_length`` and ``shuffle_calibration_samples=False`` are
passed as well, matching the loader, so the run's recorded arguments describe what it saw.

Scheme. One config group targets every ``Linear`` except ``lm_head``: int weights of ``bits`` bits,
``symmetric=sym``, ``strategy="group"`` with ``group_size`` (``"channel"`` when it is -1), no
activation quantization: W4A16 for the defaults. GPTQ is one `GPTQModifier` with
``dampening_frac=damp_percent`` and ``actorder="weight"`` when ``act_order`` else ``None`` (the
modifier's default, ``"static"``, an alias of ``"weight"``, would reorder columns even with
act_order off). ``"weight"`` is the only activation order llm-compressor 0.14 runs for GPTQ: columns
are solved in descending order of the Hessian diagonal but groups stay contiguous in the original
column order, so the checkpoint has no ``g_idx``, unlike GPTQModel's ``desc_act``. Note also that
llm-compressor computes each group's scale and zero point from the weights before the GPTQ solve
(its min-max observer), where the GPTQ paper's code fits them as the solve reaches each group. AWQ
is `AWQModifier` with its default mappings for the architecture and grid (``n_grid=20``,
``duo_scaling=True``) followed by a `QuantizationModifier` with the same scheme; mappings whose
shapes do not fit (``v_proj -> o_proj`` under grouped-query attention) are skipped, and the
toolkit logs how many.

Settings. The model is loaded in bfloat16, as for GPTQModel, so both toolkits start from the same
weights; llm-compressor picks the device itself (the accelerator when there is one, else the CPU).
The checkpoint is written with ``save_pretrained(save_compressed=True)`` plus the tokenizer;
llm-compressor adds its ``recipe.yaml``.

CPU patch. Without an accelerator, AWQ fails in ``IntermediatesCache.pin_memory`` ("Cannot access
accelerator device when none is available"): it pins cached activations for faster host-to-device
copies, which means nothing on a CPU. Only then, and only for the duration of ``oneshot``, that
method is replaced by a no-op.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np

from quantlab.atomic import atomic_directory
from quantlab.errors import MissingDependencyError, QuantlabError
from quantlab.reference import INSTALL_HINT, ReferenceRun, package_versions

FORMAT = "compressed-tensors pack-quantized"


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
    """Quantize with llm-compressor; save its checkpoint into ``out_dir`` (see the module doc)."""
    try:
        import torch
        from llmcompressor import oneshot
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache
        from torch.utils.data import DataLoader
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise MissingDependencyError(
            f"llm-compressor cannot be imported ({exc}); {INSTALL_HINT}"
        ) from exc

    weights = {"num_bits": bits, "type": "int", "symmetric": sym}
    if group_size == -1:
        weights["strategy"] = "channel"
    else:
        weights |= {"strategy": "group", "group_size": group_size}
    scheme = {"group_0": {"targets": ["Linear"], "weights": weights}}
    if method == "gptq":
        recipe = [
            GPTQModifier(
                config_groups=scheme,
                ignore=["lm_head"],
                dampening_frac=damp_percent,
                actorder="weight" if act_order else None,
            )
        ]
    else:
        recipe = [AWQModifier(), QuantizationModifier(config_groups=scheme, ignore=["lm_head"])]

    rows = torch.from_numpy(input_ids)  # (n_samples, seq_len) int64
    samples = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in rows]
    loader = DataLoader(samples, batch_size=1, shuffle=False)
    on_accelerator = torch.accelerator.is_available()
    device = torch.accelerator.current_accelerator().type if on_accelerator else "cpu"
    no_pinning = (
        mock.patch.object(IntermediatesCache, "pin_memory", _no_pin_memory)
        if method == "awq" and not on_accelerator
        else contextlib.nullcontext()
    )

    try:
        with atomic_directory(out_dir) as tmp:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
            tokenizer = AutoTokenizer.from_pretrained(model_path)
            start = time.perf_counter()
            with no_pinning:
                oneshot(
                    model=model,
                    processor=tokenizer,
                    recipe=recipe,
                    dataset=loader,
                    num_calibration_samples=rows.shape[0],
                    max_seq_length=rows.shape[1],
                    shuffle_calibration_samples=False,
                )
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            with warnings.catch_warnings():
                # llm-compressor leaves hf_device_map = {...: "cpu"}, which transformers reads
                # as "offloaded modules"; the model sits whole on one device, nothing is offloaded
                warnings.filterwarnings("ignore", "Attempting to save a model with offloaded")
                model.save_pretrained(tmp, save_compressed=True)
            tokenizer.save_pretrained(tmp)
            save_seconds = time.perf_counter() - start
            written = _written_format(tmp / "config.json")
            if written != FORMAT:
                raise QuantlabError(
                    f"llm-compressor {method} wrote {written!r}, expected {FORMAT!r}"
                )
    except QuantlabError:
        raise
    except Exception as exc:
        raise QuantlabError(f"llm-compressor {method} failed: {type(exc).__name__}: {exc}") from exc

    return ReferenceRun(
        impl="llmcompressor",
        method=method,
        out_dir=out_dir,
        seconds=seconds,
        save_seconds=save_seconds,
        format=written,
        versions=package_versions("llmcompressor", "compressed-tensors", "torch", "transformers"),
        dtype="bfloat16",
        device=device,
    )


def _no_pin_memory(self, batch_index: int, input_names: list[str] | None = None) -> None:
    """Stands in for ``IntermediatesCache.pin_memory`` on machines without an accelerator."""


def _written_format(config_json: Path) -> str:
    """The layout recorded in the saved config, e.g. "compressed-tensors pack-quantized"."""
    qcfg = json.loads(config_json.read_text()).get("quantization_config", {})
    return f"{qcfg.get('quant_method')} {qcfg.get('format')}"
