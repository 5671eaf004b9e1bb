"""The AWQ GEMM checkpoint format (AutoAWQ ``version: gemm``): what transformers, vLLM and
GPTQModel load. Layout of one linear: `quantlab.formats.layouts` (``pack_awq`` / ``unpack_awq``).

``quantization_config``: ``quant_method: awq``, ``bits: 4``, ``group_size``, ``zero_point: true``,
``version: gemm``. 4-bit codes only, consecutive whole groups (``in % group_size == 0``), no
``g_idx`` (so act-order only with static groups), ``out % 8 == 0``. Any method's result that
fits is written, not only AWQ's (the format is a layout; AWQ's scaling is already folded into
the weights and norms).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import QuantlabError
from quantlab.formats import layouts
from quantlab.formats.checkpoint import HFCheckpointFormat
from quantlab.formats.registry import gathers_columns, register_format


@dataclass(frozen=True)
class AWQOptions:
    keep_dtype: bool = False  # False: embeddings, head and norms in 16 bits (as the toolkits)
    version: int = 1


class AWQFormat(HFCheckpointFormat):
    name = "awq"
    options = AWQOptions
    description = "AWQ GEMM checkpoint, 4-bit (transformers, vLLM, GPTQModel)"
    parts = ("qweight", "qzeros", "scales")
    marker = "qweight"
    run_snippet = (
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained('{path}')   # or: vllm serve {path}"
    )

    def accepts(self, method, config, options, *, imatrix: bool = False) -> str | None:
        reason = super().accepts(method, config, options, imatrix=imatrix)
        if reason or config is None:
            return reason
        if getattr(config, "bits", None) != 4 or gathers_columns(config):
            return (
                "format awq (GEMM) holds 4-bit weights without g_idx "
                "(act-order needs static_groups)"
            )
        if getattr(config, "group_size", -1) <= 0:
            return "format awq (GEMM) needs a group size (per-channel -1 is not an AWQ layout)"
        return None

    def preflight(self, config, options, linears) -> str | None:
        for name, (out, cols) in linears.items():
            if cols % config.group_size:
                return (
                    f"{name} has in_features={cols}, not a multiple of group_size "
                    f"{config.group_size}, which format awq needs"
                )
            if out % 8:
                return f"{name} has out_features={out}, not a multiple of 8 (AWQ packing)"
        return None

    def pack(self, name, qw, options):
        return layouts.pack_awq(name, qw)

    def quantization_config(self, method, config, summaries, options) -> dict:
        qw = next(iter(summaries.values()))
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": qw.group_size,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": None,
        }

    def read_options(self, qc: dict, path: Path):
        if str(qc.get("quant_method", "")).lower() != "awq":
            return None
        version = str(qc.get("version") or qc.get("format") or "gemm").lower()
        if version != "gemm":
            raise QuantlabError(f"{path}: AWQ version {version!r} is not supported (only gemm)")
        return self.options()

    def code_bits(self, qc: dict, module: str | None = None) -> int:
        return 4

    def decoder(self, qc: dict, options, dtype):
        if int(qc.get("bits", qc.get("w_bit", 4))) != 4:
            raise QuantlabError("AWQ GEMM checkpoints are 4-bit; this one says otherwise")
        gs = int(qc.get("group_size", qc.get("q_group_size", 128)))

        def decode(name, parts, out, cols):
            return layouts.unpack_awq(name, parts, out, cols, group_size=gs, dtype=dtype)

        return decode


register_format(AWQFormat())
