"""The evaluation harness on tiny models: protocols, exact KLD, caching, lm-eval plumbing, JSON."""

import copy
import json

import numpy as np
import pytest
import torch

from quantlab.cli import main
from quantlab.data import load_corpus
from quantlab.data.corpora import Corpus
from quantlab.errors import ConfigError, CorruptFileError, DataError
from quantlab.eval.harness import EvalConfig, Metrics, evaluate
from quantlab.eval.kld import (
    CachedReference,
    LiveReference,
    ReferenceRecorder,
    build_reference,
    evaluate_against_reference,
    kl_divergence,
)
from quantlab.eval.perplexity import (
    PerplexityConfig,
    iter_scored_logprobs,
    log_softmax,
    make_windows,
    perplexity,
)
from quantlab.eval.runners import HFRunner
from quantlab.models import load_model, load_tokenizer, resolve_model


@pytest.fixture(scope="module")
def tiny(tiny_models):
    model = resolve_model(str(tiny_models["tiny-llama"]))
    return HFRunner(load_model(model), load_tokenizer(model), "tiny-llama")


@pytest.fixture(scope="module")
def pydoc():
    return load_corpus("pydoc")


def windows_for(runner, corpus, **kwargs):
    config = PerplexityConfig(corpus=corpus.name, **kwargs)
    return make_windows(corpus, runner.tokenize, config, runner.name, runner.add_bos, runner.bos_id)


def fake_corpus(n_chars: int) -> Corpus:
    return Corpus("fake", "all", ("x" * n_chars,), "test", standard=False, raw="y" * n_chars)


def char_tokenize(text, add_special):
    return np.array(([0] if add_special else []) + [ord(c) for c in text], dtype=np.int64)


def test_gptq_protocol_windows_are_contiguous_and_fully_scored():
    config = PerplexityConfig(protocol="gptq", context=8)
    w = make_windows(fake_corpus(30), char_tokenize, config, "chars", False, None)
    # 31 tokens (one BOS from the default special tokens) -> 3 windows of 8, tail dropped
    assert w.ids.shape == (3, 8) and w.first_scored == 0
    assert w.scored_per_window == 7 and w.scored_tokens == 21
    assert w.ids[0, 0] == 0 and (w.ids[0, 1:] == ord("x")).all()


def test_llamacpp_protocol_scores_the_second_half_and_puts_bos_first():
    config = PerplexityConfig(protocol="llamacpp", context=8)
    w = make_windows(fake_corpus(40), char_tokenize, config, "chars", True, 7)
    assert w.ids.shape == (5, 8) and w.first_scored == 4 and w.scored_per_window == 3
    assert (w.ids[:, 0] == 7).all() and (w.ids[:, 1:] == ord("y")).all()  # raw text, BOS each
    assert (w.targets() == ord("y")).all()


def test_too_few_tokens_and_bad_configs_are_refused():
    with pytest.raises(DataError, match="needs at least 16"):
        make_windows(
            fake_corpus(10),
            char_tokenize,
            PerplexityConfig(protocol="llamacpp", context=8),
            "chars",
            False,
            None,
        )
    with pytest.raises(ConfigError):
        PerplexityConfig(protocol="lm-eval")
    with pytest.raises(ConfigError):
        EvalConfig(kld=True)


def test_perplexity_equals_transformers_own_loss(tiny, pydoc):
    w = windows_for(tiny, pydoc, protocol="gptq", context=128, max_tokens=512)
    ours = perplexity(tiny, w)
    losses = []
    with torch.inference_mode():
        for row in w.ids:
            ids = torch.as_tensor(row)[None]
            losses.append(tiny.model(ids, labels=ids).loss.item())
    assert ours.scored_tokens == 4 * 127
    assert ours.ppl == pytest.approx(float(np.exp(np.mean(losses))), rel=1e-5)


def test_kld_of_a_model_against_itself_is_zero(tiny, pydoc):
    w = windows_for(tiny, pydoc, protocol="llamacpp", context=128, max_tokens=1024)
    cached = build_reference(tiny, w)
    live = LiveReference(tiny, w)
    recorder = ReferenceRecorder(tiny, w)
    for ref in (cached, live, recorder):
        ppl, kld = evaluate_against_reference(tiny, w, ref)
        assert kld.mean == 0.0 and kld.max == 0.0 and kld.top1_agreement == 1.0
        assert kld.ppl_ratio == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_array_equal(recorder.reference.hidden, cached.hidden)


def test_kld_grows_with_the_perturbation(tiny, pydoc):
    w = windows_for(tiny, pydoc, protocol="gptq", context=128, max_tokens=512)
    ref = build_reference(tiny, w)
    means = []
    for sigma in (0.01, 0.05, 0.2):
        model = copy.deepcopy(tiny.model)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.add_(torch.randn(p.shape, generator=gen) * p.std() * sigma)
        _, kld = evaluate_against_reference(HFRunner(model, tiny.tokenizer, "noisy"), w, ref)
        means.append(kld.mean)
        assert kld.p99 >= kld.median >= 0 and kld.max >= kld.p99
    assert 0 < means[0] < means[1] < means[2]


def test_cached_reference_recomputes_logits_exactly_and_round_trips(tiny, pydoc, tmp_path):
    w = windows_for(tiny, pydoc, protocol="gptq", context=64, max_tokens=256)
    ref = build_reference(tiny, w)
    direct = list(iter_scored_logprobs(tiny, w))
    loaded = CachedReference.load(ref.save(tmp_path / "ref.npz"))
    for i, lp in enumerate(direct):
        np.testing.assert_allclose(loaded.logprobs(i, w.scored_per_window), lp, atol=1e-6)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CorruptFileError):
        CachedReference.load(tmp_path / "bad.npz")


def test_kl_divergence_matches_the_definition():
    rng = np.random.default_rng(0)
    p = log_softmax(rng.normal(size=(5, 50)).astype(np.float32))
    q = log_softmax(rng.normal(size=(5, 50)).astype(np.float32))
    expected = (np.exp(p.astype(np.float64)) * (p.astype(np.float64) - q)).sum(axis=1)
    np.testing.assert_allclose(kl_divergence(p, q), expected, rtol=1e-10)


def test_evaluate_records_everything_and_round_trips_as_json(tiny_models, tmp_path):
    config = EvalConfig(
        perplexity=(PerplexityConfig("pydoc", "all", "gptq", context=128, max_tokens=512),),
        kld=True,
        speed=True,
        speed_prompt_tokens=16,
        speed_decode_tokens=4,
        speed_runs=2,
    )
    target = str(tiny_models["tiny-qwen2"])
    m = evaluate(target, config, cache=tmp_path)
    assert m.kld.mean == 0.0 and m.perplexity[0].scored_tokens == 4 * 127
    assert m.size.bits_per_weight == 32.0 and m.memory.peak_rss_bytes > 0
    assert m.speed.prefill_tokens_per_s > 0 and m.speed.decode_tokens_per_s > 0
    assert set(m.stage_seconds) >= {"load", "perplexity:pydoc:gptq", "speed"}
    assert len(list((tmp_path / "references").glob("*.npz"))) == 1  # recorded in the same pass
    again = Metrics.from_json(m.to_json())
    assert again == m
    # the second run reads the cached reference
    m2 = evaluate(target, config, cache=tmp_path)
    assert m2.perplexity[0].ppl == m.perplexity[0].ppl and m2.kld.mean == 0.0


def test_cli_eval_prints_a_table_and_writes_json(tiny_models, tmp_path, capsys):
    out = tmp_path / "m.json"
    code = main(
        [
            "--cache",
            str(tmp_path),
            "eval",
            str(tiny_models["tiny-mistral"]),
            "--ppl",
            "pydoc",
            "--context",
            "128",
            "--max-tokens",
            "512",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "ppl pydoc/all [non-standard corpus] [gptq, ctx 128]" in text
    assert json.loads(out.read_text())["perplexity"][0]["scored_tokens"] == 4 * 127
