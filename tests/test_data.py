"""Corpora from the local data root, the fallback corpus, and reproducible calibration sets."""

import hashlib
import json

import numpy as np
import pytest

from quantlab.data import CalibrationConfig, build_calibration, load_corpus
from quantlab.errors import ConfigError, DataError
from quantlab.models.tiny import byte_tokenizer

WIKI_TEST_RAW_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_wikitext2_rows_match_the_hugging_face_dataset(data_root):
    corpus = load_corpus("wikitext2", "test", data_root=data_root)
    raw = (data_root / "wikitext-2-raw" / "wiki.test.raw").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == WIKI_TEST_RAW_SHA256
    assert len(corpus.documents) == 4358
    assert corpus.documents[0] == "" and corpus.documents[1] == " = Robert Boulter = \n"
    # SOURCES.md: "".join(HF rows) is 1,287,656 bytes with sha256 bbf94c53...
    joined = "".join(corpus.documents).encode("utf-8")
    assert len(joined) == 1_287_656
    assert hashlib.sha256(joined).hexdigest().startswith("bbf94c53")
    assert corpus.standard and corpus.text().startswith("\n\n = Robert Boulter = \n\n\n")


def test_c4_sample_splits(data_root):
    train = load_corpus("c4", "train", data_root=data_root)
    valid = load_corpus("c4", "validation", data_root=data_root)
    assert len(train.documents) == 1480 and len(valid.documents) == 30
    assert not train.standard and "sample" in train.note


def test_lambada_passages_are_held_out_text_for_perplexity(data_root):
    corpus = load_corpus("lambada", "test", data_root=data_root)
    assert len(corpus.documents) == 5153
    assert corpus.documents[0].startswith("In my palm is a clear stone")
    assert not corpus.standard and "last-word" in corpus.note  # not LAMBADA's own metric
    calib = {d[:200] for d in load_corpus("c4", "train", data_root=data_root).documents}
    assert not calib & {d[:200] for d in corpus.documents}  # never calibration text


def test_unknown_corpus_and_split():
    with pytest.raises(DataError, match="unknown corpus 'nope'"):
        load_corpus("nope")
    with pytest.raises(DataError, match="no split 'train'"):
        load_corpus("wikitext2", "train")


def test_without_data_and_offline_wikitext_is_unavailable_or_falls_back(monkeypatch):
    monkeypatch.delenv("QUANTLAB_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="QUANTLAB_DATA"):
        load_corpus("wikitext2", "test")
    corpus = load_corpus("wikitext2", "test", fallback=True)
    assert corpus.name == "pydoc" and not corpus.standard
    assert corpus.note.startswith("fallback:") and "[non-standard corpus]" in corpus.label


def test_embedded_fallback_corpus_is_python_documentation():
    corpus = load_corpus("pydoc")
    assert len(corpus.documents) > 50 and len(corpus.text()) > 200_000
    assert any("for" in d and "loop" in d for d in corpus.documents)


def test_local_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    lines = [json.dumps({"text": "beta"}), "", json.dumps({"text": "gamma"})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines))
    assert load_corpus(str(tmp_path / "a.txt")).documents == ("alpha text",)
    assert load_corpus(str(tmp_path)).documents == ("alpha text", "beta", "gamma")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object with a 'text'"):
        load_corpus(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_calibration_is_reproducible_and_seed_dependent(tokenizer):
    corpus = load_corpus("pydoc")
    config = CalibrationConfig(corpus="pydoc", split="all", n_samples=8, seq_len=64, seed=0)
    a = build_calibration(tokenizer, corpus, config)
    b = build_calibration(tokenizer, corpus, config)
    c = build_calibration(tokenizer, corpus, CalibrationConfig("pydoc", "all", 8, 64, seed=1))
    assert a.input_ids.shape == (8, 64) and a.input_ids.dtype == np.int64
    assert a.sha256 == b.sha256 and np.array_equal(a.input_ids, b.input_ids)
    assert a.sha256 != c.sha256
    assert a.provenance()["corpus_sha256"] == corpus.sha256
    # every window is a contiguous slice of the tokenized corpus
    stream = np.asarray(tokenizer(corpus.text(), add_special_tokens=False)["input_ids"])
    first = a.input_ids[0]
    starts = np.flatnonzero(stream[: len(stream) - 63] == first[0])
    assert any(np.array_equal(stream[s : s + 64], first) for s in starts)


def test_calibration_refuses_a_corpus_shorter_than_a_window(tokenizer, tmp_path):
    (tmp_path / "short.txt").write_text("tiny")
    corpus = load_corpus(str(tmp_path / "short.txt"))
    with pytest.raises(DataError, match="fewer than seq_len=64"):
        build_calibration(tokenizer, corpus, CalibrationConfig(str(tmp_path), None, 1, 64))


@pytest.mark.parametrize(
    "kwargs", [{"n_samples": 0}, {"seq_len": 0}, {"seed": -1}], ids=["samples", "seq_len", "seed"]
)
def test_calibration_config_is_validated(kwargs):
    with pytest.raises(ConfigError):
        CalibrationConfig(**kwargs)
