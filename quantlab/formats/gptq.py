"""The GPTQ checkpoint format (AutoGPTQ v1 / GPTQModel v2): what transformers, vLLM and GPTQModel
load. Layout of one linear: `quantlab.formats.layouts` (``pack_gptq`` / ``unpack_gptq``).

``quantization_config``: ``quant_method: gptq``, ``bits``, ``group_size``, ``desc_act``,
``static_groups``, ``sym``, ``true_sequential``, ``damp_percent``, ``checkpoint_format`` (and
``format``) ``gptq`` or ``gptq_v2``; also written as ``quantize_config.json`` for older loaders.
Any bit width 2/3/4/8 whose rows fill whole int32 words, act-order ``g_idx``, and a shorter last
group are held. Linears with their own bits / group size (a fit's per-module settings) are written
with GPTQModel's ``dynamic`` overrides: ``{"+:<regex of module names>": {"bits": 8, "group_size":
128}}``, matched with ``re.match`` against module names by GPTQModel, vLLM and quantlab; linears
that vLLM fuses (q/k/v, gate/up) share one pattern that also names the fused module. v1 stores
``zero - 1`` and so cannot hold a zero point of 0 (asymmetric results usually have some):
``gptq_format: v2`` stores the zero point itself.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import ConfigError, CorruptFileError, QuantlabError
from quantlab.formats import layouts
from quantlab.formats.checkpoint import HFCheckpointFormat
from quantlab.formats.registry import register_format
from quantlab.version import __version__

_VERSIONS = {"v1": "gptq", "v2": "gptq_v2"}  # option -> checkpoint_format
# vLLM fuses these linears into one module: a per-module override must name the fused one too
FUSED_NAMES = {("q_proj", "k_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj"}


@dataclass(frozen=True)
class GPTQOptions:
    gptq_format: str = "v1"  # v1: every loader (no zero point 0); v2: GPTQModel
    keep_dtype: bool = False  # False: embeddings, head and norms in 16 bits (as the toolkits)
    version: int = 1

    def __post_init__(self) -> None:
        if self.gptq_format not in _VERSIONS:
            raise ConfigError(f"gptq_format must be v1 or v2, got {self.gptq_format!r}")


class GPTQFormat(HFCheckpointFormat):
    name = "gptq"
    description = "GPTQ checkpoint (transformers, vLLM, GPTQModel); v2 for GPTQModel"
    options = GPTQOptions
    parts = ("qweight", "qzeros", "scales", "g_idx")
    marker = "qweight"
    run_snippet = (
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained('{path}')   # or: vllm serve {path}"
    )

    def label(self, options) -> str:
        return _VERSIONS[options.gptq_format]

    def labels(self) -> tuple[str, ...]:
        return tuple(_VERSIONS.values())

    def label_options(self, label: str) -> dict:
        return {"gptq_format": next(v for v, f in _VERSIONS.items() if f == label)}

    def accepts(self, method, config, options, *, imatrix: bool = False) -> str | None:
        reason = super().accepts(method, config, options, imatrix=imatrix)
        if reason or config is None:
            return reason
        if getattr(config, "bits", None) not in (2, 3, 4, 8):
            return "format gptq holds 2, 3, 4 or 8-bit integer weights"
        return None

    fit_family = "int"
    fit_method = "gptq"

    def check_summaries(self, summaries, options) -> None:
        from quantlab.errors import FormatError

        if not summaries:
            raise FormatError("nothing was quantized: no linear to write")
        if len({q.sym for q in summaries.values()}) != 1:
            raise FormatError(
                "gptq checkpoints need one sym for every linear (bits and group size "
                "may differ per module)"
            )

    def options_for(self, config) -> dict:
        # v1 cannot store a zero point of 0, which asymmetric results usually have somewhere
        return {} if getattr(config, "sym", True) else {"gptq_format": "v2"}

    def preflight(self, config, options, linears) -> str | None:
        bits = config.bits
        for name, (out, cols) in linears.items():
            for what, n in (("in_features", cols), ("out_features", out)):
                if n * bits % 32:
                    return (
                        f"{name} has {what}={n}: x {bits} bits is not a whole number of int32 "
                        "words, which format gptq needs"
                    )
        return None

    def pack(self, name, qw, options):
        return layouts.pack_gptq(name, qw, self.label(options))

    def quantization_config(self, method, config, summaries, options) -> dict:
        qw = next(iter(summaries.values()))
        checkpoint_format = self.label(options)
        base, dynamic = dynamic_overrides(
            {name: (q.bits, q.group_size) for name, q in summaries.items()}
        )
        return {
            "quant_method": "gptq",
            "bits": base[0],
            "group_size": base[1],
            **({"dynamic": dynamic} if dynamic else {}),
            "desc_act": bool(getattr(config, "act_order", False)),
            "static_groups": bool(getattr(config, "static_groups", False)),
            "sym": qw.sym,
            "true_sequential": bool(getattr(config, "true_sequential", True)),
            "damp_percent": getattr(
                config, "damp_percent", 0.01
            ),  # RTN: a placeholder loaders need
            "lm_head": False,
            "checkpoint_format": checkpoint_format,
            "format": checkpoint_format,
            "pack_dtype": "int32",
            "meta": {"quantizer": [f"quantlab:{__version__}"], "method": method},
        }

    def extra_files(self, qconfig: dict) -> dict[str, dict]:
        return {"quantize_config.json": qconfig}

    def checkpoint_notes(self, summaries, options) -> list[str]:
        out = []
        partial = sorted(
            {
                q.shape[1]
                for q in summaries.values()
                if q.group_size > 0 and q.shape[1] % q.group_size
            }
        )
        if partial:
            group = next(iter(summaries.values())).group_size
            out.append(
                f"in_features {partial} are not multiples of group size {group}: the last group "
                "is shorter. GPTQModel's torch kernel and quantlab read it; Marlin/ExLlama/vLLM "
                "kernels refuse such shapes."
            )
        if any(q.act_order for q in summaries.values()):
            out.append("act-order (desc_act) g_idx: kernels without g_idx support cannot run it")
        if options.gptq_format == "v2":
            out.append("checkpoint_format gptq_v2: read by GPTQModel; most other loaders read v1")
        return out

    def read_options(self, qc: dict, path: Path):
        if str(qc.get("quant_method", "")).lower() != "gptq":
            return None
        fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
        version = next((v for v, f in _VERSIONS.items() if f == fmt), None)
        if version is None:
            raise QuantlabError(f"{path}: GPTQ checkpoint_format {fmt!r} is not supported")
        return GPTQOptions(version)  # (keep_dtype is a writing choice, not read back)

    def code_bits(self, qc: dict, module: str | None = None) -> int:
        return module_setting(qc, module)[0] if module else int(qc.get("bits", 4))

    def decoder(self, qc: dict, options, dtype):
        if "bits" not in qc:
            raise CorruptFileError("quantization_config has no 'bits'")
        sym = bool(qc.get("sym", True))
        module_setting(qc, "")  # a malformed dynamic fails here, before any tensor is read
        checkpoint_format = self.label(options)

        def decode(name, parts, out, cols):
            bits, gs = module_setting(qc, name)
            return layouts.unpack_gptq(
                name, parts, out, cols, bits=bits, group_size=gs, sym=sym,
                checkpoint_format=checkpoint_format, dtype=dtype,
            )  # fmt: skip

        return decode


def dynamic_overrides(settings: dict[str, tuple[int, int]]):
    """``(base, dynamic)`` for linears' (bits, group_size): the most common setting is the base,
    the others become GPTQModel ``dynamic`` entries (one anchored pattern per module, or per
    fused q/k/v or gate/up set that shares a setting, naming the fused module too)."""
    base = Counter(settings.values()).most_common(1)[0][0]
    by_parent: dict[str, dict[str, tuple[int, int]]] = {}
    for name, setting in settings.items():
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = setting
    dynamic = {}
    for parent, leaves in sorted(by_parent.items()):
        done = set()
        for fused_leaves, fused in FUSED_NAMES.items():
            chosen = {leaves.get(leaf) for leaf in fused_leaves}
            if len(chosen) == 1 and None not in chosen and chosen != {base}:
                names = "|".join([*fused_leaves, fused])
                setting = chosen.pop()
                dynamic[f"+:^{re.escape(parent)}\\.({names})$"] = _override(setting)
                done.update(fused_leaves)
        for leaf, setting in sorted(leaves.items()):
            if leaf not in done and setting != base:
                dynamic[f"+:^{re.escape(parent + '.' + leaf)}$"] = _override(setting)
    return base, dynamic


def _override(setting: tuple[int, int]) -> dict:
    return {"bits": setting[0], "group_size": setting[1]}


def module_setting(qc: dict, module: str) -> tuple[int, int]:
    """(bits, group_size) of ``module`` under ``qc``: the first ``dynamic`` pattern that matches
    its name (``re.match``, as GPTQModel and vLLM), else the checkpoint's own."""
    bits, group = int(qc["bits"]), int(qc.get("group_size", -1))
    dynamic = qc.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise CorruptFileError("quantization_config 'dynamic' is not a mapping")
    for pattern, override in dynamic.items():
        if not isinstance(override, dict):
            raise CorruptFileError(f"quantization_config dynamic[{pattern!r}] is not a mapping")
        try:
            negative = pattern.startswith("-:")
            matched = re.match(pattern.removeprefix("-:").removeprefix("+:"), module)
        except re.error as exc:
            raise CorruptFileError(
                f"quantization_config dynamic pattern {pattern!r}: {exc}"
            ) from None
        if matched:
            if negative:
                return bits, group  # not quantized: the loader finds no packed tensors for it
            return int(override.get("bits", bits)), int(override.get("group_size", group))
    return bits, group


register_format(GPTQFormat())
