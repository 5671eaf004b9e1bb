"""The embedded default model: converted once, described correctly, generates real English."""

import importlib.util

import pytest

from quantlab.cli import DEMO_PROMPT, main
from quantlab.data import CalibrationConfig, build_calibration, load_corpus
from quantlab.models import generate_greedy, load_tokenizer, model_info
from quantlab.models.embedded import PROVENANCE_FILE, embedded_gguf_path

pytestmark = pytest.mark.slow

# Greedy continuation of DEMO_PROMPT, recorded from transformers (fp32, CPU) and identical to
# llama.cpp's greedy output on the shipped Q4_1 GGUF: " the primary colors of the RGB color
# model: red, blue, and green. These colors are fundamental"
PROMPT_IDS = [504, 1296, 3003, 4683, 359]
GREEDY_20 = [
    260,
    3003,
    4683,
    282,
    260,
    35526,
    2380,
    1743,
    42,
    2382,
    28,
    4461,
    28,
    284,
    2654,
    30,
    1216,
    4683,
    359,
    4959,
]


def test_info_reports_the_smollm2_shape(default_model):
    info = model_info(default_model)
    assert info.architecture == "LlamaForCausalLM"
    assert (info.layers, info.hidden_size, info.intermediate_size) == (30, 576, 1536)
    assert (info.attention_heads, info.kv_heads, info.vocab_size) == (9, 3, 49152)
    assert info.parameters == 134_515_008
    assert info.tied_embeddings
    assert "Q4_1" in info.weights_note
    assert (default_model.path / PROVENANCE_FILE).is_file()


def test_cli_info_prints_a_table(default_model, capsys):
    assert main(["info", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert "30" in out and "576" in out and "134,515,008" in out


def test_greedy_generation_is_the_recorded_english(default_model):
    tok = load_tokenizer(default_model)
    assert tok(DEMO_PROMPT).input_ids == PROMPT_IDS
    ids = generate_greedy(default_model, DEMO_PROMPT, max_new_tokens=20)
    assert ids == GREEDY_20
    assert tok.decode(ids).startswith(" the primary colors of the RGB color model: red, blue")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")
def test_greedy_generation_matches_llama_cpp_on_the_shipped_gguf():
    from llama_cpp import Llama

    llm = Llama(model_path=str(embedded_gguf_path()), n_ctx=128, n_threads=2, verbose=False)
    assert llm.tokenize(DEMO_PROMPT.encode(), add_bos=False, special=False) == PROMPT_IDS
    out = []
    for token in llm.generate(PROMPT_IDS, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(token)
        if len(out) == len(GREEDY_20):
            break
    assert out == GREEDY_20


def test_calibration_hash_is_stable_across_machines(default_model, data_root):
    tok = load_tokenizer(default_model)
    config = CalibrationConfig(corpus="c4", split="train", n_samples=4, seq_len=512, seed=0)
    calib = build_calibration(tok, load_corpus("c4", "train", data_root=data_root), config)
    # (conversion version 3: "½" and "¼" now split as llama.cpp's smollm pre-tokenizer does)
    assert calib.corpus_tokens == 401_897
    assert calib.sha256 == "6c5de0a1846360fd20f9e4deb18b730b6909d3ab543214e887f4be28aaf633ef"
