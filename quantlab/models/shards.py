"""A model read block by block from its safetensors shards, never held whole.

`ShardedModel` gives the block walk (`quantlab.methods.runner.quantize_model`) a model it can
walk without loading it: the model's modules are built on the ``meta`` device (shapes only,
`model_skeleton`), and the walk asks the `ShardBlockLoader` to fill one decoder block (or the
embedding, for capturing the first block's inputs) from the shards just before it is needed and
to return it to ``meta`` right after. Each shard is memory-mapped only while a block's tensors are
copied out of it (`TensorSource`), so only the block's byte ranges are touched.

`bound_allocator` changes glibc's mmap threshold for the rest of the process; `release_memory`
hands freed heap pages back to the OS between blocks (see each).
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantlab.errors import QuantlabError


class TensorSource:
    """The tensors of a model folder's safetensors shards, read by name on demand."""

    def __init__(self, folder):
        self.path = Path(folder.path)
        self.file_of = {t.name: self.path / t.file for t in folder.tensors}

    def names(self) -> list[str]:
        return list(self.file_of)

    def read(self, names) -> dict[str, torch.Tensor]:
        """Copies of ``names`` (as stored: dtype and all); each shard is mapped only while read."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        out = {}
        for path, group in by_file.items():
            with safe_open(path, framework="pt") as fh:
                for name in group:
                    out[name] = fh.get_tensor(name)
        return out


def _libc():
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc: its allocator behaves differently, nothing to tune
        return None


def bound_allocator() -> None:
    """Make glibc serve every allocation of 1 MiB or more (all tensors of any size) with its own
    mapping, unmapped when freed. By default glibc raises that threshold to 32 MiB after the first
    large free, so a block's tensors land in the heap, whose top cannot shrink past any live
    allocation: the process's memory then creeps up block after block although nothing is kept
    (measured: +0.9 GB of heap over 60 blocks of 22 MB)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (setting it disables the dynamic raise)


def release_memory() -> None:
    """Hand freed heap pages back to the OS (between blocks). No ``gc.collect()``: a block's
    tensors are freed by reference counting, and a full collection of transformers' object graph
    costs 0.24 s per block."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def model_skeleton(model_ref):
    """The model's modules with every parameter and persistent buffer on ``meta`` (no memory);
    non-persistent buffers (rotary frequencies) are rebuilt on the CPU."""
    from quantlab.models.hf import prepare_transformers

    prepare_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        model_ref.path, trust_remote_code=model_ref.trust_remote_code
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=model_ref.trust_remote_code
        )
    rebuild_buffers(model, "streaming", "quantize without --streaming")
    return model.eval()


def rebuild_buffers(model, what: str, instead: str) -> None:
    """Rebuild on the CPU the modules of a ``meta`` model whose non-persistent buffers (rotary
    frequencies: computed from the config, never stored) are on ``meta``; a module that cannot
    be rebuilt from the config alone is an error naming ``what`` failed and what to do
    ``instead``."""
    persistent = set(model.state_dict())
    for module_name, module in list(model.named_modules()):
        meta_buffers = [
            n
            for n, b in module.named_buffers(recurse=False)
            if b.is_meta and f"{module_name}.{n}".lstrip(".") not in persistent
        ]
        if not meta_buffers:
            continue
        try:
            rebuilt = type(module)(config=model.config)
        except TypeError:
            raise QuantlabError(
                f"{what} cannot rebuild {module_name} ({type(module).__name__}) of "
                f"{type(model).__name__} off the meta device; {instead}"
            ) from None
        parent_name, _, child = module_name.rpartition(".")
        model.get_submodule(parent_name).register_module(child, rebuilt)


def load_module(module, prefix: str, source: TensorSource, device: str = "cpu") -> None:
    """Read the ``prefix.*`` tensors into ``module`` (float32 on ``device``); a tensor the module
    needs and the shards lack is named."""
    names = [n for n in source.names() if n.startswith(prefix + ".")]
    stored = source.read(names)
    state = {
        n[len(prefix) + 1 :]: (t.to(device).float() if t.is_floating_point() else t.to(device))
        for n, t in stored.items()
    }
    expected = set(module.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise QuantlabError(f"{source.path}: {prefix} lacks tensor(s) {', '.join(missing[:5])}")
    # tensors the model does not have (e.g. rotary buffers old checkpoints saved) are dropped,
    # as transformers drops them when it loads the model
    module.load_state_dict({k: state[k] for k in expected}, assign=True, strict=True)


class ShardBlockLoader:
    """Fills the skeleton's embedding and blocks from the shards when the walk needs them, and
    returns them to ``meta`` afterwards (the `quantlab.methods.runner.BlockLoader` of streaming)."""

    def __init__(self, model_ref, device: str = "cpu"):
        if not model_ref.folder.tensors:
            raise QuantlabError(f"{model_ref.path}: streaming reads safetensors shards; found none")
        self.source = TensorSource(model_ref.folder)
        self.arch = model_ref.folder.arch
        self.device = device

    def load_embedding(self, model) -> None:
        load_module(model.get_submodule(self.arch.embed), self.arch.embed, self.source, self.device)

    def release_embedding(self, model) -> None:
        model.get_submodule(self.arch.embed).to("meta")

    def load_block(self, prefix: str, block) -> None:
        load_module(block, prefix, self.source, self.device)

    def release_block(self, prefix: str, block) -> None:
        block.to("meta")
        release_memory()
