"""Architectures as data: one `ArchSpec` per supported Hugging Face model class.

An `ArchSpec` says where a model's decoder blocks are and what is inside each: the linear layers
in the order they run, and which of them read the same input (and from which operation that input
comes). The calibration pipeline walks ``blocks``; GPTQ quantizes ``linears`` in that order
("true sequential"); AWQ searches one scale per `InputGroup` and folds it into ``prev_op``
(the idea of llm-compressor's ``AWQMapping`` registry). No code elsewhere asks "is this a Llama?".

All module paths are relative: ``blocks`` from the model root, the rest from one block.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantlab.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class InputGroup:
    """Linears that read the same tensor, and the module whose output that tensor is.

    ``prev_op`` is a norm (scales fold into its weight) or a linear (scales fold into its output
    rows). AWQ can only fold into a linear whose output width equals the group's input width, which
    is false for grouped-query attention's ``v_proj -> o_proj``; the method checks shapes.
    """

    prev_op: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    """Where things are in one Hugging Face causal-LM class (all paths are module names)."""

    architecture: str  # HF class name, as in config.json "architectures"
    blocks: str  # the ModuleList of decoder blocks, from the model root
    embed: str  # token embedding, from the model root
    final_norm: str  # norm after the last block, from the model root
    lm_head: str  # output projection, from the model root (may be tied to ``embed``)
    linears: tuple[str, ...]  # linears inside a block, in execution order
    input_groups: tuple[InputGroup, ...]  # linears sharing an input, with their producer
    no_clip: tuple[str, ...] = ()  # linears whose range AWQ must not clip (attention scores)
    # the attention's value and output projections, when the block is RMSNorm pre-norm and the
    # pair can take a per-head rotation (`quantlab.models.rotation`); None: no rotation
    value_output: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        grouped = [name for group in self.input_groups for name in group.linears]
        if sorted(grouped) != sorted(self.linears):
            raise ValueError(f"{self.architecture}: input groups must cover each linear once")


_ARCHS: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add an architecture; registering one name twice is a programming error."""
    if spec.architecture in _ARCHS:
        raise ValueError(f"architecture {spec.architecture!r} is already registered")
    _ARCHS[spec.architecture] = spec
    return spec


def supported_architectures() -> list[str]:
    return sorted(_ARCHS)


def arch_spec(architecture: str) -> ArchSpec:
    """The spec of an HF architecture name, or an error listing the supported ones."""
    try:
        return _ARCHS[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {architecture!r}; supported: "
            + ", ".join(supported_architectures())
        ) from None


def arch_spec_for_config(config: dict) -> ArchSpec:
    """The spec for a parsed config.json (its first ``architectures`` entry)."""
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise UnsupportedArchitectureError(
            f"config.json 'architectures' must be a list of class names, got {archs!r:.80}"
        )
    if not archs:
        raise UnsupportedArchitectureError(
            "config.json names no architecture ('architectures' is missing); supported: "
            + ", ".join(supported_architectures())
        )
    return arch_spec(archs[0])


# Llama-style decoder block: pre-norm attention, then pre-norm gated MLP. Mistral, Qwen2 and Qwen3
# share the module names (Qwen2 adds q/k/v biases, Qwen3 adds q/k norms inside attention; neither
# changes which linears share an input).
_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_LLAMA_GROUPS = (
    InputGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    InputGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    InputGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    InputGroup("mlp.up_proj", ("mlp.down_proj",)),
)

for _name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
    register_arch(
        ArchSpec(
            architecture=_name,
            blocks="model.layers",
            embed="model.embed_tokens",
            final_norm="model.norm",
            lm_head="lm_head",
            linears=_LLAMA_LINEARS,
            input_groups=_LLAMA_GROUPS,
            no_clip=("self_attn.q_proj", "self_attn.k_proj"),
            value_output=("self_attn.v_proj", "self_attn.o_proj"),
        )
    )
