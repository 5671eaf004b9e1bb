"""llm-compressor's compressed-tensors checkpoints, the format vLLM treats as native. Written and
read:

- ``activations: none`` (default), ``format: pack-quantized``: integer weight-only schemes
  (W4A16, W8A16; also 2 and 3 bits, which compressed-tensors packs and transformers decompresses
  but vLLM's kernels do not run), group or channel, symmetric or not; layout of one linear:
  `quantlab.formats.layouts` (``pack_compressed`` / ``unpack_compressed``).
- ``activations: int8``, ``format: int-quantized``: W8A8 INT8, llm-compressor's ``W8A8`` preset:
  8-bit symmetric per-channel weights stored as ``int8`` ``weight`` with a ``weight_scale``
  column, and dynamic per-token symmetric int8 input activations (``input_activations``:
  ``strategy: token``, ``dynamic: true``), which vLLM quantizes at run time. Any method's
  result at ``bits: 8, group_size: -1, sym: true`` goes in.
- ``activations: fp8``, ``format: float-quantized``: W8A8 FP8, llm-compressor's ``FP8_DYNAMIC``:
  e4m3 weights with a float16 per-channel scale (max abs / 448) and dynamic per-token fp8 input
  activations. No `QuantizedWeight` holds e4m3 values, so the format makes it itself from the
  unquantized model (a variant with no method, like llama.cpp's GGUF types), and its loader
  decodes each such linear to a dense (dequantized) weight.

Whenever quantlab loads a checkpoint whose scheme quantizes input activations dynamically (its
own or llm-compressor's), every quantized linear rounds its input per token as the runtime does
(`fake_quantize_tokens`: int8 with compressed-tensors' ``scale = max|x| / 127.5``;
`fake_quantize_tokens_fp8`: e4m3 with ``max|x| / 448``; the same logits as transformers' loader,
bit for bit), so perplexity and KLD include the activations' rounding, not only the weights'.

Weight-only ``quantization_config``: ``quant_method: compressed-tensors``, ``format:
pack-quantized``, ``quantization_status: compressed``, one config group targeting ``Linear`` with
the weights' ``num_bits``, ``strategy`` (``group`` with ``group_size``, or ``channel``),
``symmetric``, ``type: int`` and ``actorder`` (``weight`` for an act-order result with static
groups: the columns were visited in activation order, the groups stay consecutive), ``ignore:
[lm_head]``. compressed-tensors 0.19 removed group act-order (``g_idx``) and needs whole groups, so
act-order without static groups and ``in % group_size != 0`` are refused before any work. Reading
still accepts an older checkpoint's ``weight_g_idx``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from quantlab.errors import ConfigError, CorruptFileError, FormatError, QuantlabError
from quantlab.formats import layouts
from quantlab.formats.checkpoint import HFCheckpointFormat
from quantlab.formats.registry import gathers_columns, register_format

CT_VERSION = "0.19.0"  # the compressed-tensors release whose config this writes


# option -> compressed-tensors format
ACTIVATIONS = {"none": "pack-quantized", "int8": "int-quantized", "fp8": "float-quantized"}
_LABELS = {
    "none": "compressed-tensors",
    "int8": "compressed-tensors W8A8-INT8",
    "fp8": "compressed-tensors W8A8-FP8",
}
_TOKEN_ACTIVATIONS = {  # llm-compressor's W8A8 / FP8_DYNAMIC presets: dynamic, per token
    "actorder": None, "block_structure": None, "dynamic": True, "group_size": None,
    "num_bits": 8, "observer": None, "observer_kwargs": {}, "scale_dtype": None,
    "strategy": "token", "symmetric": True, "zp_dtype": None,
}  # fmt: skip
FP8_MAX = 448.0  # float8_e4m3fn's largest value


@dataclass(frozen=True)
class FP8Weights:
    """What a W8A8 FP8 checkpoint's weights are (the manifest's ``config``): made by the format
    from the unquantized model, round to nearest in e4m3 after a per-channel scale."""

    bits: int = 8
    type: str = "float8_e4m3fn"
    strategy: str = "channel"  # scale = max|w| / 448 per output channel (float16)
    version: int = 1


def quantize_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e4m3 weight, float32 scale (out, 1))`` of a (out, in) weight: per output channel
    ``scale = max|w| / 448`` rounded up to a float16 value (stored in float16 exactly, and the
    row still fits in e4m3's range), weights rounded to nearest e4m3 (llm-compressor's
    FP8_DYNAMIC weights)."""
    from quantlab.primitives import _fp16_at_least

    w = w.float()
    scale = _fp16_at_least((w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=2**-24))
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fake_quantize_tokens_fp8(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded per token to e4m3 with compressed-tensors' dynamic scale ``max|x| / 448``
    and dequantized (what transformers computes for a W8A8 FP8 checkpoint)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


@dataclass(frozen=True)
class CompressedTensorsOptions:
    keep_dtype: bool = False  # False: embeddings, head and norms in 16 bits (as the toolkits)
    # input activations: none (weight-only, pack-quantized) or int8 (W8A8: dynamic per token)
    activations: str = "none"
    version: int = 1

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATIONS:
            raise ConfigError(
                f"activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}"
            )


def fake_quantize_tokens(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``x`` rounded per token (last dimension) to symmetric ``bits``-bit integers and
    dequantized, with compressed-tensors' dynamic scale ``max|x| / ((2**bits - 1) / 2)`` and
    codes clamped to [-2**(bits-1), 2**(bits-1) - 1]: what transformers computes for such a
    checkpoint, bit for bit (tested). vLLM's int8 kernel divides by 127 instead of 127.5 (a
    0.4 % larger step)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / ((2**bits - 1) / 2)
    half = 2 ** (bits - 1)
    return (torch.round(xf / scale).clamp(-half, half - 1) * scale).to(x.dtype)


def simulate_input_activations(model, names, args: dict) -> int:
    """Round the input of each linear in ``names`` as ``args`` (a compressed-tensors
    ``input_activations`` scheme) says; returns how many linears. Dynamic per-token int8 and
    fp8 only (what quantlab writes, and llm-compressor's W8A8 and FP8_DYNAMIC); other schemes
    are refused."""
    kind, strategy = args.get("type", "int"), args.get("strategy")
    bits = int(args.get("num_bits", 8))
    dynamic_token = strategy == "token" and args.get("dynamic") and args.get("symmetric", True)
    if not dynamic_token or (kind, bits) not in (("int", 8), ("float", 8)):
        raise QuantlabError(
            f"compressed-tensors input activations {kind}{bits}/{strategy} (dynamic "
            f"{args.get('dynamic')}) are not simulated; dynamic per-token int8 and fp8 are"
        )
    rounding = fake_quantize_tokens_fp8 if kind == "float" else fake_quantize_tokens
    for name in names:
        module = model.get_submodule(name)
        module.register_forward_pre_hook(lambda _m, a: (rounding(a[0]), *a[1:]))
    return len(names)


class CompressedTensorsFormat(HFCheckpointFormat):
    name = "compressed-tensors"
    description = "compressed-tensors pack-quantized W4A16/W8A16, or W8A8 INT8 (vLLM, transformers)"
    options = CompressedTensorsOptions
    parts = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
    marker = "weight_packed"
    run_snippet = (
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained('{path}')   # or: vllm serve {path}"
    )

    def label(self, options) -> str:
        return _LABELS[options.activations]

    def labels(self) -> tuple[str, ...]:
        return tuple(_LABELS.values())

    def label_options(self, label: str) -> dict:
        return {"activations": next(k for k, v in _LABELS.items() if v == label)}

    def layout_of(self, options) -> tuple[tuple[str, ...], str, str]:
        if options is not None and options.activations != "none":  # (the head has a weight too)
            return ("weight", "weight_scale"), "weight_scale", "weight"
        return self.parts, self.marker, self.marker

    def accepts(self, method, config, options, *, imatrix: bool = False) -> str | None:
        if options is not None and options.activations == "fp8":
            if method is not None or imatrix:
                return (
                    "format compressed-tensors with fp8 activations (W8A8 FP8) rounds the "
                    "unquantized model's weights to e4m3 itself: give no method (nor imatrix)"
                )
            return None
        reason = super().accepts(method, config, options, imatrix=imatrix)
        if reason or config is None:
            return reason
        if options is not None and options.activations == "int8":
            shape = (getattr(config, "bits", None), getattr(config, "group_size", None))
            if shape != (8, -1) or not getattr(config, "sym", False) or gathers_columns(config):
                return (
                    "format compressed-tensors with int8 activations (W8A8) holds 8-bit "
                    "symmetric per-channel weights: bits 8, group_size -1, sym true"
                )
            return None
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
        if options.activations == "int8":
            if (qw.bits, qw.group_size, qw.sym) != (8, -1, True):
                raise FormatError(f"{name}: W8A8 INT8 needs 8-bit symmetric per-channel codes")
            return {  # codes - 128: the signed int8 values; scale per output channel
                "weight": (qw.qweight.to(torch.int16) - 128).to(torch.int8).contiguous(),
                "weight_scale": qw.scales.reshape(-1, 1).half().contiguous(),
            }
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
        fmt = ACTIVATIONS[options.activations]
        inputs = None
        if options.activations != "none":
            kind = "float" if options.activations == "fp8" else "int"
            weights = {**weights, "observer": None, "zp_dtype": None, "type": kind}
            inputs = {**_TOKEN_ACTIVATIONS, "type": kind}
        return {
            "config_groups": {
                "group_0": {
                    "format": fmt,
                    "input_activations": inputs,
                    "output_activations": None,
                    "targets": ["Linear"],
                    "weights": weights,
                }
            },
            "format": fmt,
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
        if options.activations != "none":
            notes.append(
                f"W8A8 {options.activations.upper()}: vLLM quantizes each linear's input per "
                "token at run time; quantlab simulates that rounding when it evaluates it"
            )
        elif bits not in (4, 8):
            notes.append(
                f"{bits}-bit pack-quantized: compressed-tensors and transformers decompress it; "
                "vLLM's kernels run 4 and 8 bits"
            )
        return notes

    def read_options(self, qc: dict, path: Path):
        if str(qc.get("quant_method", "")).lower() != "compressed-tensors":
            return None
        kind = {v: k for k, v in ACTIVATIONS.items()}.get(qc.get("format"))
        return None if kind is None else self.options(activations=kind)

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
        if options is not None and options.activations == "fp8":
            if (w.get("type"), int(w["num_bits"]), w.get("strategy")) != ("float", 8, "channel"):
                raise QuantlabError(
                    "compressed-tensors float-quantized: only 8-bit per-channel weights are read"
                )

            def decode_fp8(name, parts, out, cols):  # dense: no QuantizedWeight holds e4m3
                weight, scale = parts["weight"], parts["weight_scale"]
                if weight.dtype != torch.float8_e4m3fn or tuple(weight.shape) != (out, cols):
                    raise CorruptFileError(f"tensor {name}.weight is not e4m3 ({out}, {cols})")
                if scale.numel() != out:
                    raise CorruptFileError(f"tensor {name}.weight_scale has not {out} entries")
                return weight.float() * scale.float().reshape(out, 1)

            return decode_fp8
        int8 = options is not None and options.activations == "int8"
        if w.get("type", "int") != "int" or (
            not int8 and any(g.get("input_activations") for g in groups.values())
        ):
            raise QuantlabError(
                "compressed-tensors: integer weight-only and W8A8 INT8 schemes are read"
            )
        bits, sym = int(w["num_bits"]), bool(w.get("symmetric", True))
        gs = w.get("group_size") if w.get("strategy") == "group" else -1
        if int8:
            if (bits, gs, sym) != (8, -1, True):
                raise QuantlabError(
                    "compressed-tensors int-quantized: only 8-bit symmetric per-channel weights "
                    "are read"
                )

            def decode_int8(name, parts, out, cols):
                from quantlab.types import QuantizedWeight

                weight, scale = parts["weight"], parts["weight_scale"]
                if weight.dtype != torch.int8 or tuple(weight.shape) != (out, cols):
                    raise CorruptFileError(f"tensor {name}.weight is not int8 ({out}, {cols})")
                if scale.numel() != out:
                    raise CorruptFileError(f"tensor {name}.weight_scale has not {out} entries")
                codes = (weight.to(torch.int16) + 128).to(torch.uint8)
                zeros = torch.full((out, 1), 128, dtype=torch.uint8)
                g_idx = torch.zeros(cols, dtype=torch.int32)
                scales = scale.float().reshape(out, 1)
                return QuantizedWeight(codes, scales, zeros, g_idx, 8, -1, True, dtype)

            return decode_int8

        def decode(name, parts, out, cols):
            qw = layouts.unpack_compressed(
                name, parts, bits=bits, group_size=gs, sym=sym, dtype=dtype
            )
            if qw.shape != (out, cols):
                raise CorruptFileError(f"tensor {name}.weight_shape {list(qw.shape)} != model's")
            return qw

        return decode

    def load(self, path: Path, *, dtype: str = "float32", verify: bool = True, cache=None):
        """The checkpoint as every other; with dynamic input activations (W8A8), each
        quantized linear rounds its input per token (`simulate_input_activations`)."""
        from quantlab.formats.loader import quantization_config

        model, checkpoint = super().load(path, dtype=dtype, verify=verify, cache=cache)
        qc = quantization_config(Path(path))
        groups = qc.get("config_groups") or {}
        inputs = [g["input_activations"] for g in groups.values() if g.get("input_activations")]
        if inputs:
            names = sorted([*checkpoint.weights, *checkpoint.dense])
            simulate_input_activations(model, names, inputs[0])
            kind = "fp" if inputs[0].get("type") == "float" else "int"
            checkpoint.activations = f"{kind}{inputs[0].get('num_bits', 8)} per token (dynamic)"
        return model, checkpoint

    def write(self, request) -> Path:
        if request.result is None and request.options.activations == "fp8":
            return self._write_fp8(request)
        return super().write(request)

    def _write_fp8(self, request) -> Path:
        """W8A8 FP8 from the unquantized model: every block linear's weight in e4m3 with a
        per-channel scale (`quantize_fp8_rows`), the rest as the other writers write it."""
        import time

        from quantlab.formats.checkpoint import WeightSummary
        from quantlab.methods.runner import QuantizationResult
        from quantlab.models import load_model

        start = time.perf_counter()
        model = load_model(request.source)
        arch = request.source.folder.arch
        packed, summaries = {}, {}
        for i in range(len(model.get_submodule(arch.blocks))):
            for linear in arch.linears:
                name = f"{arch.blocks}.{i}.{linear}"
                weight, scale = quantize_fp8_rows(model.get_submodule(name).weight.detach())
                packed[f"{name}.weight"] = weight.contiguous()
                packed[f"{name}.weight_scale"] = scale.half().contiguous()
                summaries[name] = WeightSummary(tuple(weight.shape), 8, -1, True, False)
        seconds = time.perf_counter() - start
        result = QuantizationResult("fp8", FP8Weights(), {}, {}, {}, 0, {}, None, seconds)
        return self.write_folder(request, result, model, summaries, packed)


register_format(CompressedTensorsFormat())
