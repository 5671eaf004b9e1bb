"""llm-compressor's compressed-tensors checkpoints, read (``format: pack-quantized``): integer
weight-only schemes (W4A16, W8A16; group or channel; symmetric or not; ``g_idx`` act-order).
Layout of one linear: `quantlab.formats.layouts.unpack_compressed`. Other compressed-tensors
formats (float8, activation quantization) are left to transformers' own loader.
"""

from __future__ import annotations

from pathlib import Path

from quantlab.errors import CorruptFileError, QuantlabError
from quantlab.formats import layouts
from quantlab.formats.checkpoint import HFCheckpointFormat
from quantlab.formats.registry import register_format


class CompressedTensorsFormat(HFCheckpointFormat):
    name = "compressed-tensors"
    description = "llm-compressor's compressed-tensors pack-quantized (read only)"
    writable = False
    streams = False
    parts = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
    marker = "weight_packed"
    run_snippet = (
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained('{path}')   # or: vllm serve {path}"
    )

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
