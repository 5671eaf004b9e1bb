"""Calibration sets: ``n_samples`` token windows of ``seq_len`` tokens, drawn with a seed.

As in the GPTQ reference code, the corpus is tokenized as one stream (documents joined by
``"\\n\\n"``, no special tokens) and each sample is a window starting at a uniformly drawn offset
(numpy ``default_rng(seed)``). The same corpus, tokenizer, sizes and seed give the same ids on every
machine; `CalibrationSet.sha256` hashes the ids (little-endian int64, with the shape) and is the
calibration's provenance in every artifact's manifest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from quantlab.data.corpora import Corpus
from quantlab.errors import ConfigError, DataError


@dataclass(frozen=True)
class CalibrationConfig:
    """How to draw a calibration set and run it through the model. ``corpus`` is any name
    `load_corpus` accepts (``split`` None: its first split); ``dtype`` is the dtype of the
    calibration forward passes (bfloat16 is about 2x faster on CPUs with bf16 units; weights
    are solved in float32 either way); ``allow_fallback`` uses the embedded pydoc corpus when the
    corpus is unavailable (labelled as such)."""

    corpus: str = "c4"
    split: str | None = None
    n_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    dtype: str = "float32"
    allow_fallback: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"calibration dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.n_samples < 1:
            raise ConfigError(f"calibration n_samples must be >= 1, got {self.n_samples}")
        if self.seq_len < 8:
            raise ConfigError(f"calibration seq_len must be >= 8, got {self.seq_len}")
        if self.seed < 0:
            raise ConfigError(f"calibration seed must be >= 0, got {self.seed}")


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    """The token windows and where they came from."""

    input_ids: np.ndarray  # (n_samples, seq_len) int64
    config: CalibrationConfig
    corpus_label: str  # e.g. "c4/train [non-standard corpus]"
    corpus_sha256: str
    corpus_tokens: int  # length of the tokenized stream the windows were cut from
    sha256: str  # hash of input_ids: the calibration set's identity

    def provenance(self) -> dict:
        """What goes into an artifact's manifest."""
        return {
            "sha256": self.sha256,
            "corpus": self.corpus_label,
            "corpus_sha256": self.corpus_sha256,
            "n_samples": self.config.n_samples,
            "seq_len": self.config.seq_len,
            "seed": self.config.seed,
        }


def hash_token_ids(ids: np.ndarray) -> str:
    arr = np.ascontiguousarray(ids, dtype="<i8")
    h = hashlib.sha256(b"quantlab-token-ids-v1")
    h.update(np.asarray(arr.shape, dtype="<i8").tobytes())
    h.update(arr.tobytes())
    return h.hexdigest()


def tokenize_corpus(tokenizer, corpus: Corpus) -> np.ndarray:
    """The corpus as one stream of token ids (no BOS/EOS added), int64."""
    ids = tokenizer(corpus.text(), add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def build_calibration(tokenizer, corpus: Corpus, config: CalibrationConfig) -> CalibrationSet:
    """Draw the calibration windows of ``config`` from ``corpus``."""
    stream = tokenize_corpus(tokenizer, corpus)
    n = len(stream)
    if n < config.seq_len:
        raise DataError(
            f"corpus {corpus.label} has {n} tokens, fewer than seq_len={config.seq_len}"
        )
    rng = np.random.default_rng(config.seed)
    starts = rng.integers(0, n - config.seq_len + 1, size=config.n_samples)
    windows = np.stack([stream[s : s + config.seq_len] for s in starts])
    return CalibrationSet(
        input_ids=windows,
        config=config,
        corpus_label=corpus.label,
        corpus_sha256=corpus.sha256,
        corpus_tokens=n,
        sha256=hash_token_ids(windows),
    )


def calibration_for(model_ref, config: CalibrationConfig, *, data_root=None, fallback=None):
    """``(corpus, calibration set)`` of ``config`` for the resolved model ``model_ref``: the
    corpus loaded (local data root, Hub, or with ``fallback`` - default: the config's
    ``allow_fallback`` - the embedded pydoc text) and tokenized with the model's own tokenizer."""
    from quantlab.data.corpora import load_corpus
    from quantlab.models import load_tokenizer

    fallback = config.allow_fallback if fallback is None else fallback
    corpus = load_corpus(config.corpus, config.split, data_root=data_root, fallback=fallback)
    return corpus, build_calibration(load_tokenizer(model_ref), corpus, config)
