"""`quantlab plan`: which quantized variants of a model fit in a given amount of GPU memory.

Estimated from the config alone (no weights needed): every tensor's shape from the architecture,
its storage cost per format, the KV cache and the runtime's buffers.

- **Weights**: linears at the format's bits per weight: GPTQ/AWQ store ``bits`` per code plus,
  per group of ``g`` inputs, an fp16 scale and a ``bits`` zero point (``(16 + bits) / g``), GPTQ
  also an int32 ``g_idx`` per input column; their embedding and head stay fp16. GGUF types follow
  llama.cpp's per-tensor choices (``llama_tensor_get_type``: ``attn_v`` / ``ffn_down`` get more
  bits in the first and last eighth of the layers and every third layer between for ``*_M``
  types; the output (or a tied embedding) Q6_K; k-quants fall back to Q5_0 / Q5_1 / Q8_0 /
  IQ4_NL for rows that are not a multiple of 256), at ggml's block sizes, plus the tokenizer
  metadata. Norms stay F32. On SmolLM2 these rules give exactly the type mix llama.cpp wrote.
- **KV cache**: ``2 x layers x kv_heads x head_dim x context x batch`` values in fp16.
- **Compute buffer**: the logits and activations of one micro-batch of up to 512 tokens,
  ``batch x min(context, 512) x (vocab + 4 x hidden) x 4`` bytes (llama.cpp's is close to this).
- **Runtime**: a fixed 0.25 GiB (CUDA context, allocator slack).

Where the results store has measured variants of the model, they are listed with their measured
quality (best first) and their measured size replaces the estimate; their measured peak memory is
shown beside the estimate.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import ConfigError, QuantlabError

GIB = 2**30
RUNTIME_BYTES = GIB // 4
UBATCH = 512
# bytes per weight of ggml block types
GGML_BYTES = {
    "F32": 4.0,
    "F16": 2.0,
    "BF16": 2.0,
    "Q8_0": 34 / 32,
    "Q6_K": 210 / 256,
    "Q5_K": 176 / 256,
    "Q5_0": 22 / 32,
    "Q5_1": 24 / 32,
    "Q4_K": 144 / 256,
    "Q4_0": 18 / 32,
    "Q4_1": 20 / 32,
    "Q3_K": 110 / 256,
    "Q2_K": 84 / 256,
    "IQ4_NL": 18 / 32,
    "IQ4_XS": 136 / 256,
}
_BASE = {
    "Q8_0": "Q8_0",
    "Q6_K": "Q6_K",
    "Q5_K_M": "Q5_K",
    "Q5_K_S": "Q5_K",
    "Q4_K_M": "Q4_K",
    "Q4_K_S": "Q4_K",
    "Q4_0": "Q4_0",
    "Q3_K_M": "Q3_K",
    "Q2_K": "Q2_K",
    "IQ4_XS": "IQ4_XS",
    "IQ4_NL": "IQ4_NL",
}
_FALLBACK = {
    "Q2_K": "IQ4_NL",
    "Q3_K": "IQ4_NL",
    "IQ4_XS": "IQ4_NL",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}
GGUF_PLAN_TYPES = tuple(_BASE)
# tokenizer metadata in a GGUF file per vocabulary entry (tokens, types, merges; ~37 on SmolLM2)
GGUF_VOCAB_BYTES = 37


@dataclass(frozen=True)
class Shapes:
    """The tensors of a decoder-only transformer, from its config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict) -> Shapes:
        cfg = cfg.get("text_config", cfg)
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            return cls(
                layers=int(cfg["num_hidden_layers"]),
                hidden=hidden,
                intermediate=int(cfg["intermediate_size"]),
                heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                vocab=int(cfg["vocab_size"]),
                tied=bool(cfg.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"config.json lacks what the planner needs: {exc}") from None

    def linears(self) -> list[tuple[str, int, int]]:
        """(kind, out_features, in_features) of one block's linears."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [
            ("attn_q", q, h),
            ("attn_k", kv, h),
            ("attn_v", kv, h),
            ("attn_output", h, q),
            ("ffn_gate", i, h),
            ("ffn_up", i, h),
            ("ffn_down", h, i),
        ]

    @property
    def parameters(self) -> int:
        block = sum(o * i for _, o, i in self.linears()) + 2 * self.hidden
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * block + embed + self.hidden

    def kv_bytes(self, context: int, batch: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * context * batch * 2

    def compute_bytes(self, context: int, batch: int) -> int:
        return batch * min(context, UBATCH) * (self.vocab + 4 * self.hidden) * 4


def _more_bits(layer: int, n: int) -> bool:  # llama.cpp's use_more_bits
    return layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2


def gguf_tensor_type(
    ftype: str, kind: str, layer: int, n_layers: int, in_features: int, gqa: int = 1
) -> str:
    """The ggml type llama.cpp gives one tensor for ``ftype`` (the rules this planner models;
    ``gqa`` = attention heads per KV head)."""
    base = _BASE[ftype]
    t = base
    if kind == "output":
        t = "Q8_0" if base == "Q8_0" else "Q6_K"
    elif kind == "attn_v":
        if ftype in ("Q4_K_M", "Q5_K_M") and _more_bits(layer, n_layers):
            t = "Q6_K"
        elif ftype == "Q4_K_S" and layer < 4:
            t = "Q5_K"
        elif ftype == "Q3_K_M":
            t = "Q5_K" if layer < 2 else "Q4_K"
        elif ftype == "Q2_K":
            t = "Q4_K" if gqa >= 4 else "Q3_K"
        elif ftype in ("IQ4_XS", "IQ4_NL") and gqa >= 4:
            t = "Q5_K"
    elif kind == "ffn_down":
        if ftype in ("Q4_K_M", "Q5_K_M") and _more_bits(layer, n_layers):
            t = "Q6_K"
        elif ftype == "Q4_K_S" and layer < n_layers // 8:
            t = "Q5_K"
        elif ftype == "Q3_K_M":
            t = (
                "Q5_K"
                if layer < n_layers // 16
                else ("Q4_K" if _more_bits(layer, n_layers) else "Q3_K")
            )
        elif ftype == "Q2_K":
            t = "Q3_K"
    elif kind == "attn_output" and ftype in ("Q3_K_M", "Q2_K"):
        t = "Q4_K" if ftype == "Q3_K_M" else "Q3_K"
    if t in _FALLBACK and in_features % 256:
        t = _FALLBACK[t]
    return t


def gguf_weight_bytes(shapes: Shapes, ftype: str) -> tuple[int, dict[str, int]]:
    """Bytes of a GGUF file's tensors for ``ftype``, and how many tensors get each type."""
    mix: dict[str, int] = {}
    total = 0.0

    def add(t: str, n: int) -> None:
        nonlocal total
        total += n * GGML_BYTES[t]
        mix[t] = mix.get(t, 0) + 1

    embed = shapes.vocab * shapes.hidden
    if shapes.tied:  # llama.cpp quantizes a tied embedding as the output
        add(gguf_tensor_type(ftype, "output", 0, shapes.layers, shapes.hidden), embed)
    else:
        add(gguf_tensor_type(ftype, "token_embd", 0, shapes.layers, shapes.hidden), embed)
        add(gguf_tensor_type(ftype, "output", 0, shapes.layers, shapes.hidden), embed)
    for layer in range(shapes.layers):
        for kind, out, inp in shapes.linears():
            gqa = shapes.heads // shapes.kv_heads
            add(gguf_tensor_type(ftype, kind, layer, shapes.layers, inp, gqa), out * inp)
        total += 2 * shapes.hidden * 4
    total += shapes.hidden * 4 + shapes.vocab * GGUF_VOCAB_BYTES
    return int(total), mix


def int_weight_bytes(shapes: Shapes, bits: int, group: int, g_idx: bool) -> int:
    """Bytes of a GPTQ / AWQ checkpoint: packed linears, fp16 embedding / head / norms."""
    total = 0.0
    for _, out, inp in shapes.linears():
        groups = -(-inp // group) if group > 0 else 1
        total += out * inp * bits / 8 + groups * out * (2 + bits / 8) + (4 * inp if g_idx else 0)
    total *= shapes.layers
    total += shapes.vocab * shapes.hidden * 2 * (1 if shapes.tied else 2)
    return int(total + (2 * shapes.layers + 1) * shapes.hidden * 2)


@dataclass(frozen=True)
class PlanRow:
    name: str
    runtime: str
    weights: int
    kv: int
    compute: int
    runtime_bytes: int
    measured: object = None  # a results-store row
    note: str = ""

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.runtime_bytes


def candidates(shapes: Shapes, context: int, batch: int) -> list[PlanRow]:
    kv, compute = shapes.kv_bytes(context, batch), shapes.compute_bytes(context, batch)
    rows = [
        PlanRow(
            "fp16 / bf16", "transformers, vLLM", shapes.parameters * 2, kv, compute, RUNTIME_BYTES
        ),
    ]
    for bits in (8, 4, 3):
        rows.append(
            PlanRow(
                f"gptq w{bits} g128",
                "transformers, vLLM, GPTQModel",
                int_weight_bytes(shapes, bits, 128, True),
                kv,
                compute,
                RUNTIME_BYTES,
            )
        )
    rows.append(
        PlanRow(
            "awq w4 g128",
            "transformers, vLLM",
            int_weight_bytes(shapes, 4, 128, False),
            kv,
            compute,
            RUNTIME_BYTES,
        )
    )
    for ftype in GGUF_PLAN_TYPES:
        weights, mix = gguf_weight_bytes(shapes, ftype)
        note = ", ".join(f"{n} {t}" for t, n in sorted(mix.items(), key=lambda x: -x[1]))
        rows.append(
            PlanRow(f"gguf {ftype}", "llama.cpp", weights, kv, compute, RUNTIME_BYTES, note=note)
        )
    return rows


def parse_size(text: str) -> int:
    """``24GiB``, ``24 GB``, ``12g``, ``8192MiB`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise ConfigError(f"cannot read the memory size {text!r} (e.g. 24GiB, 16GB)")
    try:
        value = float(m.group(1))
    except ValueError:
        raise ConfigError(f"cannot read the memory size {text!r} (e.g. 24GiB, 16GB)") from None
    power = " kmgt".index(m.group(2) or " ")
    base = 1000 if m.group(3) == "b" else 1024
    return int(value * base**power)


def read_config(model: str, cache=None) -> tuple[dict, str, str | None]:
    """The config of ``model`` (a named model, a folder, or a config.json file): the config,
    a label, and the model's content hash when its weights are there (to find results)."""
    path = Path(model).expanduser()
    if path.is_file():
        return _json(path), str(path), None
    if path.is_dir() and not any(path.glob("*.safetensors")):
        return _json(path / "config.json"), str(path), None
    from quantlab.fingerprint import content_sha256
    from quantlab.models import resolve_model

    ref = resolve_model(model, cache=cache)
    return ref.folder.config, model, content_sha256(ref.path)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise QuantlabError(f"{path} does not exist") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object (a model config)")
    return data


def planned_vram(config: dict, weight_bytes: int, context: int, batch: int = 1) -> int:
    """The planner's GPU memory for a model of ``config`` whose weights take ``weight_bytes``
    (an artifact's measured size): weights + KV cache + compute buffer + runtime, as `plan`
    counts a measured row."""
    shapes = Shapes.from_config(config)
    kv, compute = shapes.kv_bytes(context, batch), shapes.compute_bytes(context, batch)
    return weight_bytes + kv + compute + RUNTIME_BYTES


def plan(config: dict, context: int, batch: int, measured_rows=()) -> list[PlanRow]:
    """Every candidate with its memory estimate; measured variants (from the store) first."""
    shapes = Shapes.from_config(config)
    kv, compute = shapes.kv_bytes(context, batch), shapes.compute_bytes(context, batch)
    rows = []
    from quantlab.formats import format_of_label

    for r in measured_rows:
        fmt = format_of_label(r.format)
        if (fmt is not None and not fmt.standalone) or not r.metrics.size:
            continue  # e.g. native artifacts hold only the quantized linears: no whole-model size
        size = r.metrics.size.bytes_on_disk
        runtime = r.metrics.runtime
        rows.append(PlanRow(r.variant, runtime, size, kv, compute, RUNTIME_BYTES, measured=r))
    return rows + candidates(shapes, context, batch)
