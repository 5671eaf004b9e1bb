"""Rotation: an orthogonal change of basis fused into the weights, so outliers spread before any
method rounds them (QuaRot, Ashkboos et al. 2024; SpinQuant; QuIP's incoherence processing).

A pre-norm decoder with RMSNorm computes the same function after two offline rotations:

- **R1, the residual stream** (``hidden x hidden``): every norm's weight is first folded into the
  linears that read it (``W <- W diag(gamma)``, ``gamma <- 1``; the final norm's into the output
  head), since RMSNorm without a weight commutes with an orthogonal ``Q`` (``rms(xQ) = rms(x)``).
  Then the embedding becomes ``E Q``, every linear reading the stream ``W Q``, every linear
  writing into it (``o_proj``, ``down_proj``) ``Q^T W`` (bias ``b Q``), and the head ``W Q``.
  A tied embedding is untied (the head now holds ``diag(gamma) Q``-rotated rows the embedding
  does not): the file grows by one embedding matrix.
- **R2, each attention head's values** (``head_dim x head_dim``): ``v_proj``'s rows of each
  key-value head become ``R2^T W`` (bias ``b R2``) and ``o_proj``'s columns of each head ``W R2``
  (attention mixes the values of a head linearly, so the two cancel).

The rotation of the MLP's inner dimension (``down_proj``'s input) cannot be fused: the gated
activation sits between ``up_proj`` and ``down_proj``, so it needs an online Hadamard transform at
run time. No loader quantlab writes for (transformers' GPTQ/AWQ/compressed-tensors loaders,
llama.cpp, quantlab-native) applies one, so it is not done: ``down_proj`` keeps its basis.

The matrices are randomised Hadamard matrices ``H diag(+-1) / sqrt(n)`` (orthogonal), with ``H``
a Sylvester power of two times a Paley matrix (``576 = 16 x 36``, ``1536 = 128 x 12``,
``14336 = 512 x 28``); a width with no such construction gets a seeded random orthogonal matrix
(QR of a Gaussian), which spreads outliers as well but costs a dense product at run time (none
here: everything is fused). Rotations are computed in float64 and stored in the model's dtype:
a float32 model's logits change by ~1e-5, a bfloat16 model's by its own rounding.

Supported: the architectures whose `ArchSpec` names its value/output pair (Llama, Mistral,
Qwen2, Qwen3: RMSNorm pre-norm blocks). `rotated_model` writes the rotated model as an ordinary
Hugging Face folder (cached), which every method, format and evaluation then takes as it takes
any other model.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from quantlab.errors import QuantlabError

ROTATION_VERSION = 1


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)`` over GF(q), q prime (chi: the Legendre symbol, chi(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)])
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx].double()


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``m`` by Paley's constructions (q prime), or None."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    q = m - 1
    if q % 4 == 3 and _is_prime(q):  # Paley I: I + [[0, 1], [-1, Q]] (Q skew-symmetric)
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    if m % 2 == 0:
        q = m // 2 - 1
        if q % 4 == 1 and _is_prime(q):  # Paley II: from the symmetric conference matrix
            c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
            c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
            a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """An orthonormal Hadamard matrix ``H / sqrt(n)`` (float64) of order ``n``: a Sylvester power
    of two (Kronecker) a Paley matrix, the largest power of two first; None if none is found."""
    two = n & -n  # the largest power of two dividing n
    while two >= 1:
        base = _paley(n // two)
        if base is not None:
            h = base
            size = 1
            while size < two:
                h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
                size *= 2
            return h / math.sqrt(n)
        two //= 2
    return None


def rotation_matrix(n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """An ``n x n`` orthogonal float64 matrix and what it is: a randomised Hadamard matrix
    ``diag(+-1) H / sqrt(n)``, else a random orthogonal one (seeded)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + n)
    h = hadamard(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
        return signs[:, None] * h, "randomised Hadamard"
    g = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))[None, :], "random orthogonal (no Hadamard order)"


def check_rotatable(model, arch) -> None:
    """Refuse, naming why, a model the rotation cannot keep the function of."""
    if arch.value_output is None:
        raise QuantlabError(
            f"rotation does not support {arch.architecture} (supported: the architectures whose "
            "blocks are RMSNorm pre-norm with a value/output pair: Llama, Mistral, Qwen2, Qwen3)"
        )
    blocks = model.get_submodule(arch.blocks)
    norms = [arch.final_norm] + [
        f"{arch.blocks}.{i}.{g.prev_op}" for i in range(len(blocks)) for g in _norm_groups(arch)
    ]
    for name in norms:
        norm = model.get_submodule(name)
        weight = getattr(norm, "weight", None)
        if weight is None or weight.ndim != 1 or getattr(norm, "bias", None) is not None:
            raise QuantlabError(f"rotation needs RMSNorm-style norms; {name} is not one")


def _norm_groups(arch):
    """The input groups that read the residual stream through a norm."""
    linears = set(arch.linears)
    return [g for g in arch.input_groups if g.prev_op not in linears]


def _writers(arch) -> list[str]:
    """The linears that write into the residual stream (fed by another linear: o_proj,
    down_proj)."""
    linears = set(arch.linears)
    return [n for g in arch.input_groups if g.prev_op in linears for n in g.linears]


@torch.no_grad()
def rotate_model(model, arch, seed: int = 0) -> dict:
    """Rotate ``model`` in place (R1 and R2, see the module docstring); returns what was done."""
    check_rotatable(model, arch)
    cfg = model.config
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    q1, kind1 = rotation_matrix(hidden, seed)
    q2, kind2 = rotation_matrix(head_dim, seed + 1)

    def update(param, fn) -> None:
        param.copy_(fn(param.detach().double()).to(param.dtype))

    embed = model.get_submodule(arch.embed)
    head = model.get_submodule(arch.lm_head)
    untied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
    if untied:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone())
        cfg.tie_word_embeddings = False
        if hasattr(cfg, "get_text_config"):
            cfg.get_text_config().tie_word_embeddings = False
    update(embed.weight, lambda e: e @ q1)
    final = model.get_submodule(arch.final_norm)
    gamma = final.weight.detach().double()
    update(head.weight, lambda w: (w * gamma[None, :]) @ q1)
    final.weight.fill_(1.0)
    v_name, o_name = arch.value_output
    for block in model.get_submodule(arch.blocks):
        for group in _norm_groups(arch):
            norm = block.get_submodule(group.prev_op)
            gamma = norm.weight.detach().double()
            for name in group.linears:
                update(block.get_submodule(name).weight, lambda w, g=gamma: (w * g[None, :]) @ q1)
            norm.weight.fill_(1.0)
        for name in _writers(arch):
            lin = block.get_submodule(name)
            update(lin.weight, lambda w: q1.T @ w)
            if lin.bias is not None:
                update(lin.bias, lambda b: b @ q1)
        v, o = block.get_submodule(v_name), block.get_submodule(o_name)
        update(v.weight, lambda w: (q2.T @ w.reshape(kv_heads, head_dim, -1)).reshape(w.shape))
        if v.bias is not None:
            update(v.bias, lambda b: (b.reshape(kv_heads, head_dim) @ q2).reshape(b.shape))
        update(o.weight, lambda w: (w.reshape(w.shape[0], heads, head_dim) @ q2).reshape(w.shape))
    return {
        "version": ROTATION_VERSION,
        "seed": seed,
        "residual": f"{kind1} {hidden} x {hidden} (R1: embedding, every block, head)",
        "values": f"{kind2} {head_dim} x {head_dim} per head (R2: {v_name}, {o_name})",
        "not_rotated": "the MLP's inner dimension (down_proj's input needs an online Hadamard)",
        "untied_embedding": bool(untied),
    }


def _source_key(folder: Path, seed: int) -> str:
    """What the rotated copy depends on: the source's config and weight files (names, sizes,
    modification times), the seed and the rotation's version."""
    h = hashlib.sha256(f"rotation v{ROTATION_VERSION} seed {seed}\n".encode())
    for item in sorted(folder.iterdir()):
        weights = item.suffix in (".safetensors", ".bin")
        if item.is_file() and (weights or item.name == "config.json"):
            st = item.stat()
            h.update(f"{item.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def rotated_model(model_ref, seed: int = 0, cache=None, *, log=None):
    """The rotated copy of ``model_ref`` as a `ResolvedModel` (a Hugging Face folder in the
    cache, made once per source and seed, atomically)."""
    from quantlab import settings
    from quantlab.atomic import atomic_directory
    from quantlab.models.folder import inspect_folder
    from quantlab.models.load import load_model, load_tokenizer
    from quantlab.models.resolve import ResolvedModel

    source = Path(model_ref.path)
    key = _source_key(source, seed)
    dest = settings.cache_dir(cache) / "rotated" / f"{source.name}-seed{seed}-{key[:16]}"
    provenance_file = dest / "quantlab_provenance.json"
    if not provenance_file.is_file():
        stored = json.loads((source / "config.json").read_text())
        dtype = stored.get("dtype") or stored.get("torch_dtype") or "float32"
        dtype = dtype if dtype in ("float32", "float16", "bfloat16") else "float32"
        if log:
            log(f"rotating {model_ref.spec} (seed {seed}, once) -> {dest}")
        model = load_model(model_ref, dtype=dtype)
        record = rotate_model(model, model_ref.folder.arch, seed)
        with atomic_directory(dest) as tmp:
            model.save_pretrained(tmp)
            load_tokenizer(model_ref).save_pretrained(tmp)
            original = {}
            if (source / "quantlab_provenance.json").is_file():
                original = json.loads((source / "quantlab_provenance.json").read_text())
            provenance = {
                "source": f"{model_ref.spec}, rotated by quantlab",
                "original_model": original.get("original_model", model_ref.spec),
                "weights_note": "; ".join(
                    filter(None, [original.get("weights_note", ""), "rotated (same function)"])
                ),
                "rotation": record,
                "source_key": key,
            }
            (tmp / "quantlab_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return ResolvedModel(
        f"{model_ref.spec} (rotated, seed {seed})",
        f"rotated copy of {model_ref.spec}",
        inspect_folder(dest),
        model_ref.trust_remote_code,
    )


def rotation_record(path) -> dict | None:
    """The rotation a model folder was made with (its provenance), or None."""
    provenance = Path(path) / "quantlab_provenance.json"
    if not provenance.is_file():
        return None
    return json.loads(provenance.read_text()).get("rotation")
