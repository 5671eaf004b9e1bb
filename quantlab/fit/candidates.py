"""What a fit chooses between: the quantizable tensors of a model (units) and, per tensor, the
settings a format can store it in, each with its exact size.

Units are named as the Hugging Face model names them: every linear of every decoder block
(``model.layers.3.mlp.down_proj``), plus, for GGUF, the token embedding (``model.embed_tokens``,
which llama.cpp also uses as the output layer when the embeddings are tied) and the output head
(``lm_head``, untied models). GPTQ checkpoints keep the embedding and head in 16 bits, so a GPTQ
fit chooses for the linears only.

Settings (`Setting`):
- ``ggml`` family (GGUF files): a ggml block type (``Q4_K``, ``IQ4_NL``, ``Q8_0``, ...). A type
  is a candidate for a tensor only where its block divides the tensor's width (llama.cpp would
  otherwise fall back to another type): on the width-576 default model that leaves the block-32
  types for every tensor but ``ffn_down`` (width 1536, a multiple of 256). Bytes: ggml's block
  arithmetic (``gguf.GGML_QUANT_SIZES``), exact.
- ``int`` family: ``bits`` 2/3/4/8 at a group size (32/64/128), as GPTQ/RTN store it: packed
  codes, an fp16 scale and a ``bits``-wide zero point per group and row, an int32 ``g_idx`` per
  input column (`quantlab.formats.layouts`), exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from quantlab.errors import ConfigError

# ggml types a GGUF fit chooses from, fewest bits first (k-quants / IQ4_XS need widths that are
# multiples of 256; the block-32 types are what llama.cpp falls back to elsewhere)
GGUF_FIT_TYPES = (
    "Q2_K", "Q3_K", "IQ4_XS", "IQ4_NL", "Q4_0", "Q4_K", "Q4_1", "Q5_0", "Q5_K", "Q5_1",
    "Q6_K", "Q8_0",
)  # fmt: skip
INT_FIT_BITS = (2, 3, 4, 8)  # what GPTQ checkpoints hold and GPTQModel / vLLM run
FAMILIES = ("ggml", "int")
# llama.cpp's tensor names for the HF linears of a block (one table: quantlab.formats.gguf_quant)


def ggml_block(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    except KeyError:
        raise ConfigError(f"unknown ggml type {type_name!r}") from None


@dataclass(frozen=True)
class Setting:
    """One way to store a tensor: a ggml type (``family`` gguf) or integer ``bits`` at
    ``group_size`` (``family`` int)."""

    family: str
    type_name: str = ""  # gguf
    bits: int = 0  # int
    group_size: int = 0  # int (-1: one group per row)

    @property
    def key(self) -> str:
        """``Q4_K`` or ``w4g128``: how sensitivity files and allocations name it."""
        if self.family == "ggml":
            return self.type_name
        return f"w{self.bits}" + ("pc" if self.group_size == -1 else f"g{self.group_size}")

    @classmethod
    def from_key(cls, key: str) -> Setting:
        if key.startswith("w") and key[1:2].isdigit():
            bits, _, group = key[1:].partition("g")
            if key.endswith("pc"):
                return cls("int", bits=int(key[1:-2]), group_size=-1)
            return cls("int", bits=int(bits), group_size=int(group))
        return cls("ggml", type_name=key)

    def fits(self, out: int, cols: int) -> bool:
        """Whether a tensor of shape (out, cols) can be stored exactly in this setting."""
        if self.family == "ggml":
            return cols % ggml_block(self.type_name)[0] == 0
        return (cols * self.bits) % 32 == 0 and (out * self.bits) % 32 == 0

    def bits_per_weight(self, out: int = 4096, cols: int = 4096) -> float:
        """Storage bits per weight (for a tensor of that shape; ggml types: any shape)."""
        return 8 * self.nbytes(out, cols) / (out * cols)

    def nbytes(self, out: int, cols: int) -> int:
        """Bytes of a (out, cols) tensor stored this way."""
        if self.family == "ggml":
            block, size = ggml_block(self.type_name)
            return out * (cols // block) * size
        groups = 1 if self.group_size == -1 else math.ceil(cols / self.group_size)
        # qweight + scales (fp16) + qzeros (bits per group and row) + g_idx (int32)
        return (
            out * cols * self.bits // 8
            + groups * out * 2
            + groups * out * self.bits // 8
            + 4 * cols
        )


@dataclass(frozen=True)
class Unit:
    """One tensor a fit chooses a setting for."""

    name: str  # HF module name: model.layers.3.mlp.down_proj, model.embed_tokens, lm_head
    kind: str  # llama.cpp's kind: attn_q ... ffn_down, token_embd, output
    layer: int  # block index, -1 outside the blocks
    shape: tuple[int, int]  # (out_features, in_features) as the HF model stores it
    gguf_name: str  # blk.3.ffn_down.weight, token_embd.weight, output.weight

    @property
    def weights(self) -> int:
        return self.shape[0] * self.shape[1]


def model_units(arch, linears: dict[str, tuple[int, int]], config: dict, *, family: str):
    """The units of a model: its block linears (``linears``: HF name -> (out, in), e.g.
    `quantlab.models.info.linear_shapes`) and, for ``family`` ggml, the embedding and
    head."""
    from quantlab.formats.gguf_quant import HF_TO_GGUF, gguf_tensor_name

    units = []
    for name, shape in sorted(linears.items(), key=lambda kv: _order(kv[0], arch)):
        local = name.removeprefix(arch.blocks + ".").split(".", 1)[1]
        layer = int(name.removeprefix(arch.blocks + ".").split(".", 1)[0])
        kind = HF_TO_GGUF.get(local, local)
        units.append(Unit(name, kind, layer, tuple(shape), gguf_tensor_name(name)))
    if family == "ggml":
        cfg = config.get("text_config", config)
        vocab, hidden = int(cfg["vocab_size"]), int(cfg["hidden_size"])
        shape = (vocab, hidden)
        units.append(Unit(arch.embed, "token_embd", -1, shape, "token_embd.weight"))
        if not cfg.get("tie_word_embeddings", False):
            units.append(Unit(arch.lm_head, "output", -1, shape, "output.weight"))
    return units


def _order(name: str, arch) -> tuple[int, int]:
    index, local = name.removeprefix(arch.blocks + ".").split(".", 1)
    linears = list(arch.linears)
    return int(index), linears.index(local) if local in linears else len(linears)


def candidate_settings(
    unit: Unit, family: str, *, group_sizes=(128,), types=GGUF_FIT_TYPES, bits=INT_FIT_BITS
) -> list[Setting]:
    """The settings ``unit`` can be stored in, in ``family`` (integer bits at each of
    ``group_sizes``)."""
    out, cols = unit.shape
    if family == "ggml":
        options = [Setting("ggml", type_name=t) for t in types]
    elif family == "int":
        options = [Setting("int", bits=b, group_size=g) for g in group_sizes for b in bits]
    else:
        raise ConfigError(f"unknown setting family {family!r}; known: {', '.join(FAMILIES)}")
    return [s for s in options if s.fits(out, cols)]
