"""What a model is, read from its folder without loading the weights (config + file headers)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass

from quantlab.models.resolve import ResolvedModel


@dataclass(frozen=True)
class ModelInfo:
    spec: str
    origin: str
    path: str
    architecture: str
    model_type: str
    parameters: int  # elements over all stored tensors (tied weights stored once)
    layers: int
    hidden_size: int
    intermediate_size: int
    attention_heads: int
    kv_heads: int
    vocab_size: int
    tied_embeddings: bool
    dtypes: dict[str, int]  # stored dtype -> number of tensors
    size_on_disk: int  # bytes, whole folder
    tokenizer: str  # tokenizer class and vocabulary size
    weights_note: str  # provenance caveat, e.g. "dequantized from Q4_1"

    def to_dict(self) -> dict:
        return asdict(self)


def _tokenizer_summary(model: ResolvedModel) -> str:
    path = model.path
    cfg = path / "tokenizer_config.json"
    cls = json.loads(cfg.read_text()).get("tokenizer_class", "?") if cfg.is_file() else "?"
    tok_json = path / "tokenizer.json"
    if not tok_json.is_file():
        return f"{cls} (no tokenizer.json)"
    data = json.loads(tok_json.read_text(encoding="utf-8"))
    tokens = set(data.get("model", {}).get("vocab", {}))
    tokens.update(t.get("content") for t in data.get("added_tokens", []))
    kind = data.get("model", {}).get("type", "?")
    return f"{cls}, {kind}, {len(tokens)} tokens"


def model_info(model: ResolvedModel) -> ModelInfo:
    cfg = model.folder.config
    text_cfg = cfg.get("text_config", cfg)
    heads = int(text_cfg.get("num_attention_heads", 0))
    provenance = model.path / "quantlab_provenance.json"
    note = ""
    if provenance.is_file():
        note = json.loads(provenance.read_text()).get("weights_note", "")
    return ModelInfo(
        spec=model.spec,
        origin=model.origin,
        path=str(model.path),
        architecture=model.folder.arch.architecture,
        model_type=str(cfg.get("model_type", "?")),
        parameters=sum(t.numel for t in model.folder.tensors),
        layers=int(text_cfg.get("num_hidden_layers", 0)),
        hidden_size=int(text_cfg.get("hidden_size", 0)),
        intermediate_size=int(text_cfg.get("intermediate_size", 0)),
        attention_heads=heads,
        kv_heads=int(text_cfg.get("num_key_value_heads", heads)),
        vocab_size=int(text_cfg.get("vocab_size", 0)),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        dtypes=dict(Counter(t.dtype for t in model.folder.tensors)),
        size_on_disk=model.folder.size_bytes,
        tokenizer=_tokenizer_summary(model),
        weights_note=note,
    )


def linear_shapes(model_ref: ResolvedModel) -> dict[str, tuple[int, int]]:
    """The (out, in) shape of every quantizable linear (the blocks' linears of its architecture),
    from the safetensors headers."""
    arch = model_ref.folder.arch
    return {
        t.name.removesuffix(".weight"): (t.shape[0], t.shape[1])
        for t in model_ref.folder.tensors
        if t.name.startswith(arch.blocks + ".")
        and len(t.shape) == 2
        and any(t.name.endswith(f".{name}.weight") for name in arch.linears)
    }
