"""Fuzzing of every parser that reads user-supplied files: only clean quantlab errors allowed.

Each target starts from a valid seed input and feeds the parser seeded random mutations (bit
flips, byte runs inserted or deleted, truncation, and "interesting" integers - 0, -1, 2^31, 2^32,
2^60, 2^64-1 - written over length and count fields). An input passes when the parser returns or
raises a `QuantlabError`; anything else - another exception, more than ``timeout`` seconds (a
hang), a `MemoryError` - is a finding, recorded with the input's bytes so it can be replayed.

Targets: ``gguf`` (the GGUF reader behind every ``.gguf`` path, and the architecture check),
``safetensors`` (header parsing of weight files), ``config`` (config.json of a model folder),
``quantization_config`` (checkpoint format detection and decoder choice), ``yaml`` (run configs).
`bench/fuzz.py` runs 100k inputs; the tests run a short seeded pass.
"""

from __future__ import annotations

import copy
import json
import random
import signal
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from quantlab.errors import QuantlabError

INTERESTING = (0, 1, 0x7F, 0xFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, 1 << 60, (1 << 64) - 1)


@dataclass
class FuzzResult:
    target: str
    inputs: int = 0
    accepted: int = 0  # parsed without error
    refused: int = 0  # clean QuantlabError
    findings: list[tuple[str, bytes]] = field(default_factory=list)  # (what happened, input)
    seconds: float = 0.0


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random mutations of ``data``."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not buf:
            buf = bytearray(rng.randbytes(rng.randint(1, 64)))
            continue
        kind = rng.randrange(6)
        pos = rng.randrange(len(buf))
        if kind == 0:  # flip bits
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:  # random byte
            buf[pos] = rng.randrange(256)
        elif kind == 2:  # an interesting integer over 8 bytes (length / count fields)
            value = rng.choice(INTERESTING)
            buf[pos : pos + 8] = struct.pack("<Q", value)[: len(buf) - pos]
        elif kind == 3:  # truncate
            del buf[pos:]
        elif kind == 4:  # delete a run
            del buf[pos : pos + rng.randint(1, 32)]
        else:  # insert a run
            buf[pos:pos] = rng.randbytes(rng.randint(1, 32))
    return bytes(buf)


_VALUES = (
    None,
    True,
    0,
    -1,
    1,
    3,
    7,
    1 << 40,
    -(1 << 62),
    1e308,
    float("nan"),
    0.5,
    "",
    "x",
    "gptq",
    "awq",
    "LlamaForCausalLM",
    [],
    [1],
    ["x"],
    {},
    {"a": 1},
)


def mutate_json(data: bytes, rng: random.Random) -> bytes:
    """Half the time bytes as `mutate` does; else a value of the parsed JSON replaced, deleted, or
    a key added, at any depth (structurally valid input with wrong contents)."""
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or rng.random() < 0.5:
        return mutate(data, rng)
    for _ in range(rng.randint(1, 3)):
        node = doc
        while isinstance(node, dict) and node and rng.random() < 0.5:
            child = node[rng.choice(list(node))]
            if not isinstance(child, dict):
                break
            node = child
        if not isinstance(node, dict):
            continue
        keys = list(node)
        action = rng.randrange(3)
        if action == 0 and keys:
            node[rng.choice(keys)] = copy.deepcopy(rng.choice(_VALUES))
        elif action == 1 and keys:
            del node[rng.choice(keys)]
        else:
            node[rng.choice(["bits", "group_size", "quant_method", "extra", "architectures"])] = (
                copy.deepcopy(rng.choice(_VALUES))
            )
    return json.dumps(doc).encode()


def _seed_gguf(folder: Path) -> bytes:
    import numpy as np

    from quantlab.formats.gguf_file import gguf_writer

    path = folder / "seed.gguf"
    with gguf_writer(path, "llama") as w:
        w.add_uint32("llama.block_count", 1)
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
        w.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(4, 16))
        w.add_tensor("blk.0.attn_q.weight", np.ones((16, 16), dtype=np.float16))
    return path.read_bytes()


def _seed_safetensors(folder: Path) -> bytes:
    import torch
    from safetensors.torch import save_file

    path = folder / "seed.safetensors"
    save_file({"a.weight": torch.ones(4, 8), "b.bias": torch.zeros(8, dtype=torch.float16)}, path)
    return path.read_bytes()


_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "tie_word_embeddings": False,
}
_QC = {
    "quant_method": "gptq",
    "bits": 4,
    "group_size": 128,
    "desc_act": False,
    "sym": True,
    "checkpoint_format": "gptq",
}
_RUN = """name: fuzz
model: tiny-llama
calibration: {corpus: c4, n_samples: 8, seq_len: 128}
variants:
  - {}
  - {method: gptq, bits: 4, group_size: 64, format: gptq}
  - {gguf_type: Q4_K_M, imatrix: true}
evaluation:
  perplexity: [{corpus: wikitext2, context: 256, max_tokens: 1024}]
  kld: true
  tasks: [piqa]
"""


def _targets(folder: Path) -> dict[str, tuple[bytes, Callable[[bytes], None]]]:
    from quantlab.formats import detect
    from quantlab.formats.gguf_file import check_gguf_architecture, open_gguf, read_header
    from quantlab.models.folder import inspect_folder, read_safetensors_header
    from quantlab.workbench.config import load_run_config

    def gguf(data: bytes) -> None:
        path = folder / "input.gguf"
        path.write_bytes(data)
        try:  # quantlab's own header parser (checks, sizes, manifests) sees every input
            read_header(path)
            check_gguf_architecture(path, "torch")
        except QuantlabError:
            pass
        reader = open_gguf(path)  # then gguf's reader (verify, conversions)
        for t in reader.tensors:  # touch what a caller would touch
            _ = t.name, t.tensor_type, t.shape
        del reader

    def safetensors(data: bytes) -> None:
        path = folder / "input.safetensors"
        path.write_bytes(data)
        read_safetensors_header(path)

    model = folder / "model"
    model.mkdir(exist_ok=True)
    (model / "model.safetensors").write_bytes(_seed_safetensors(folder))

    def config(data: bytes) -> None:
        (model / "config.json").write_bytes(data)
        inspect_folder(model)

    ckpt = folder / "ckpt"
    ckpt.mkdir(exist_ok=True)

    def quantization_config(data: bytes) -> None:
        (ckpt / "config.json").write_bytes(data)
        found = detect(ckpt)
        if found is not None:
            found[0].check_config(ckpt)

    def run_yaml(data: bytes) -> None:
        path = folder / "run.yaml"
        path.write_bytes(data)
        load_run_config(path)

    return {
        "gguf": (_seed_gguf(folder), gguf),
        "safetensors": (_seed_safetensors(folder), safetensors),
        "config": (json.dumps(_CONFIG).encode(), config),
        "quantization_config": (
            json.dumps({**_CONFIG, "quantization_config": _QC}).encode(),
            quantization_config,
        ),
        "yaml": (_RUN.encode(), run_yaml),
    }


TARGETS = ("gguf", "safetensors", "config", "quantization_config", "yaml")


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def fuzz(target: str, inputs: int, seed: int = 0, timeout: float = 2.0) -> FuzzResult:
    """Feed ``inputs`` mutated inputs to ``target``; see the module docstring."""
    rng = random.Random(f"{target}:{seed}")
    result = FuzzResult(target)
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        _run(target, inputs, timeout, rng, result)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    result.seconds = time.perf_counter() - start
    return result


def _run(target: str, inputs: int, timeout: float, rng: random.Random, result: FuzzResult):
    with tempfile.TemporaryDirectory(prefix="quantlab-fuzz-") as tmp:
        seed_input, parse = _targets(Path(tmp))[target]
        mutator = mutate_json if target in ("config", "quantization_config") else mutate
        for _ in range(inputs):
            data = mutator(seed_input, rng)
            result.inputs += 1
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                parse(data)
                result.accepted += 1
            except QuantlabError:
                result.refused += 1
            except _Timeout:
                result.findings.append((f"hang > {timeout} s", data))
            except Exception as exc:  # noqa: BLE001 - any other exception is what we look for
                result.findings.append((f"{type(exc).__name__}: {exc}"[:300], data))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
