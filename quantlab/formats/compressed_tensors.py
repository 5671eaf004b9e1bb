"""llm-compressor's compressed-tensors checkpoints (``format: pack-quantized``), the format vLLM
treats as native: integer weight-only schemes (W4A16, W8A16; also 2 and 3 bits, which
compressed-tensors packs and transformers decompresses but vLLM's kernels do not run), group or
channel, symmetric or not. Written and read; layout of one linear: `quantlab.formats.layouts`
(``pack_compressed`` / ``unpack_compressed``).

``quantization_config``: ``quant_method: compressed-tensors``, ``format: pack-quantized``,
``quantization_status: compressed``, one config group targeting ``Linear`` with the weights'
``num_bits``, ``strategy`` (``group`` with ``group_size``, or ``channel``), ``symmetric``,
``type: int`` and ``actorder`` (``weight`` for an act-order result with static groups: the
columns were visited in activation order, the groups stay consecutive), ``ignore: [lm_head]``.
compressed-tensors 0.19 removed group act-order (``g_idx``) and needs whole groups, so act-order
without static groups and ``in % group_size != 0`` are refused before any work. Reading still
accepts an older checkpoint's ``weight_g_idx``. Other compressed-tensors formats (float8,
activation quantization) are left to transformers' own loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import CorruptFileError, QuantlabError
from quantlab.formats import layouts
from quantlab.formats.checkpoint import HFCheckpointFormat
from quantlab.formats.registry import gathers_columns, register_format

CT_VERSION = "0.19.0"  # the compressed-tensors release whose config this writes


@dataclass(frozen=True)
class CompressedTensorsOptions:
    keep_dtype: bool = False  # False: embeddings, head and norms in 16 bits (as the toolkits)
    version: int = 1


class CompressedTensorsFormat(HFCheckpointFormat):
    name = "compressed-tensors"
    description = "compressed-tensors pack-quantized W4A16/W8A16 (vLLM, transformers)"
    options = CompressedTensorsOptions
    parts = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
    marker = "weight_packed"
    run_snippet = (
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained('{path}')   # or: vllm serve {path}"
    )

    def accepts(self, method, config, options, *, imatrix: bool = False) -> str | None:
        reason = super().accepts(method, config, options, imatrix=imatrix)
        if reason or config is None:
            return reason
        if getattr(config, "bits", None) not in (2, 3, 4, 8):
            return "format compressed-tensors holds 2, 3, 4 or 8-bit integer weights"
        if gathers_columns(config):
            return (
                "format compressed-tensors has no g_idx (removed in compressed-tensors 0.19): "
                "act-order needs static_groups"
            )
        return None

    def preflight(self, config, options, linears) -> str | None:
        group = getattr(config, "group_size", -1)
        for name, (_, cols) in linears.items():
            if group > 0 and cols % group:
                return (
                    f"{name} has in_features={cols}, not a multiple of group_size {group}, "
                    "which format compressed-tensors needs"
                )
        return None

    def pack(self, name, qw, options):
        return layouts.pack_compressed(name, qw)

    def quantization_config(self, method, config, summaries, options) -> dict:
        qw = next(iter(summaries.values()))
        weights = {
            "actorder": "weight" if getattr(config, "act_order", False) else None,
            "block_structure": None,
            "dynamic": False,
            "group_size": qw.group_size if qw.group_size > 0 else None,
            "num_bits": qw.bits,
            "observer": "minmax",
            "observer_kwargs": {},
            "scale_dtype": None,
            "strategy": "group" if qw.group_size > 0 else "channel",
            "symmetric": qw.sym,
            "type": "int",
            "zp_dtype": None if qw.sym else "torch.int8",
        }
        return {
            "config_groups": {
                "group_0": {
                    "format": "pack-quantized",
                    "input_activations": None,
                    "output_activations": None,
                    "targets": ["Linear"],
                    "weights": weights,
                }
            },
            "format": "pack-quantized",
            "global_compression_ratio": None,
            "ignore": ["lm_head"],
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": CT_VERSION,
        }

    def checkpoint_notes(self, summaries, options) -> list[str]:
        bits = next(iter(summaries.values())).bits
        notes = [
            "weight_scale is stored in float16 (quantlab's scales are float16 values); a bf16 "
            "loader rounds it to bf16"
        ]
        if bits not in (4, 8):
            notes.append(
                f"{bits}-bit pack-quantized: compressed-tensors and transformers decompress it; "
                "vLLM's kernels run 4 and 8 bits"
            )
        return notes

    def read_options(self, qc: dict, path: Path):
        if str(qc.get("quant_method", "")).lower() != "compressed-tensors":
            return None
        return self.options() if qc.get("format") == "pack-quantized" else None

    def _scheme(self, qc: dict) -> dict:
        groups = qc.get("config_groups") or {}
        schemes = [g.get("weights") for g in groups.values() if g.get("weights")]
        if len(schemes) != 1:
            raise QuantlabError("compressed-tensors: exactly one weight scheme is supported")
        return schemes[0]

    def code_bits(self, qc: dict, module: str | None = None) -> int:
        return int(self._scheme(qc)["num_bits"])

    def decoder(self, qc: dict, options, dtype):
        groups = qc.get("config_groups") or {}
        w = self._scheme(qc)
        if w.get("strategy") not in ("group", "channel") or "num_bits" not in w:
            raise QuantlabError(
                f"compressed-tensors weight strategy {w.get('strategy')!r} is not supported "
                "(group and channel are)"
            )
        if w.get("type", "int") != "int" or any(
            g.get("input_activations") for g in groups.values()
        ):
            raise QuantlabError("compressed-tensors: only integer weight-only schemes are read")
        bits, sym = int(w["num_bits"]), bool(w.get("symmetric", True))
        gs = w.get("group_size") if w.get("strategy") == "group" else -1

        def decode(name, parts, out, cols):
            qw = layouts.unpack_compressed(
                name, parts, bits=bits, group_size=gs, sym=sym, dtype=dtype
            )
            if qw.shape != (out, cols):
                raise CorruptFileError(f"tensor {name}.weight_shape {list(qw.shape)} != model's")
            return qw

        return decode


register_format(CompressedTensorsFormat())
