"""Perplexity under named protocols, on token ids shared by every model.

Two protocols, because published numbers come from two different procedures:

``gptq`` (the GPTQ and AWQ papers' evaluation): the corpus documents joined with "\\n\\n" and
tokenized once with the tokenizer's default special tokens; cut into non-overlapping windows of
``seq_len`` tokens (default 2048; a shorter tail is dropped); in each window every token but the
first is scored (``logits[:-1]`` predict ``ids[1:]``).

``llamacpp`` (llama.cpp's ``llama-perplexity -f FILE -c N_CTX``): the file's raw text tokenized
with BOS only if the model adds one; chunks of ``n_ctx`` tokens; when the model uses BOS, the
first token of every chunk is replaced by BOS; only the second half of each chunk is scored
(``first = n_ctx/2``: logits at positions ``first .. n_ctx-2`` predict tokens
``first+1 .. n_ctx-1``). llama-perplexity needs at least ``2 * n_ctx`` tokens.

`TokenWindows` holds the windows and which positions count; both protocols then reduce to the same
loop (`score_windows`) over a `LogitsRunner`, which also yields per-position log-probs for the KL
divergence. The number of scored tokens is always reported.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from quantlab.data.calibration import hash_token_ids
from quantlab.data.corpora import Corpus
from quantlab.errors import ConfigError, DataError

PROTOCOLS = ("gptq", "llamacpp")
DEFAULT_CONTEXT = {"gptq": 2048, "llamacpp": 512}


@dataclass(frozen=True)
class PerplexityConfig:
    """Corpus, protocol and context length; ``max_tokens`` caps the tokens fed (quick runs)."""

    corpus: str = "wikitext2"
    split: str | None = "test"
    protocol: str = "gptq"
    context: int | None = None  # seq_len (gptq) or n_ctx (llamacpp); None = protocol default
    max_tokens: int | None = None
    version: int = 1

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )
        if self.context is not None and self.context < 4:
            raise ConfigError(f"perplexity context must be >= 4, got {self.context}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def n_ctx(self) -> int:
        return self.context or DEFAULT_CONTEXT[self.protocol]


@dataclass(frozen=True, eq=False)
class TokenWindows:
    """The exact inputs of one perplexity evaluation, shared by every model compared."""

    ids: np.ndarray  # (n_windows, n_ctx) int64: what each model is fed
    first_scored: int  # logits at positions first_scored .. n_ctx-2 are scored
    config: PerplexityConfig
    corpus_label: str
    corpus_sha256: str
    tokenizer: str  # which tokenizer produced the ids

    @property
    def scored_per_window(self) -> int:
        return self.ids.shape[1] - 1 - self.first_scored

    @property
    def scored_tokens(self) -> int:
        return self.ids.shape[0] * self.scored_per_window

    @property
    def sha256(self) -> str:
        """Identity of the inputs and of which positions count."""
        h = hashlib.sha256(hash_token_ids(self.ids).encode())
        h.update(f"{self.config.protocol}:{self.first_scored}".encode())
        return h.hexdigest()

    def targets(self) -> np.ndarray:
        """(n_windows, scored_per_window) ids that the scored positions predict."""
        return self.ids[:, self.first_scored + 1 :]


def corpus_file_text(corpus: Corpus) -> str:
    """The text llama-perplexity would read from the corpus's file (raw, not document-joined)."""
    return corpus.raw if corpus.raw is not None else corpus.text()


def make_windows(
    corpus: Corpus,
    tokenize,
    config: PerplexityConfig,
    tokenizer_name: str,
    add_bos: bool,
    bos_id: int | None,
) -> TokenWindows:
    """Tokenize ``corpus`` once (``tokenize(text, add_special)``) and cut it per protocol."""
    n_ctx = config.n_ctx
    if config.protocol == "gptq":
        stream = tokenize(corpus.text("\n\n"), True)
        first = 0
        min_tokens = n_ctx
    else:
        stream = tokenize(corpus_file_text(corpus), add_bos)
        first = n_ctx // 2
        min_tokens = 2 * n_ctx
    if config.max_tokens is not None:
        stream = stream[: max(config.max_tokens, 0)]
    if len(stream) < min_tokens:
        raise DataError(
            f"{corpus.label}: {len(stream)} tokens, the {config.protocol} protocol with context "
            f"{n_ctx} needs at least {min_tokens}"
        )
    n_windows = len(stream) // n_ctx
    ids = np.array(stream[: n_windows * n_ctx], dtype=np.int64).reshape(n_windows, n_ctx)
    if config.protocol == "llamacpp" and add_bos:
        if bos_id is None:
            raise DataError("the llamacpp protocol needs a BOS token for a model that adds one")
        ids[:, 0] = bos_id
    return TokenWindows(ids, first, config, corpus.label, corpus.sha256, tokenizer_name)


def log_softmax(logits: np.ndarray, rows_per_chunk: int = 512) -> np.ndarray:
    """Row-wise log-softmax of float32 logits, computed in float64 (as llama-perplexity sums its
    exponentials in double), returned as float32."""
    import torch

    out = np.empty(logits.shape, dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, logits.shape[0], rows_per_chunk):
            chunk = torch.from_numpy(np.ascontiguousarray(logits[start : start + rows_per_chunk]))
            out[start : start + rows_per_chunk] = torch.log_softmax(chunk.double(), dim=-1).numpy()
    return out


def iter_scored_logprobs(runner, windows: TokenWindows) -> Iterator[np.ndarray]:
    """For each window, the (scored_per_window, vocab) log-probs at the scored positions."""
    stop = windows.ids.shape[1] - 1
    for row in windows.ids:
        logits = runner.logits(row)
        yield log_softmax(logits[windows.first_scored : stop])


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    scored_tokens: int
    windows: int
    protocol: str  # "gptq" or "llamacpp" (see module doc)
    context: int  # seq_len or n_ctx
    corpus: str  # label, e.g. "wikitext2/test"
    corpus_sha256: str
    windows_sha256: str  # identity of the exact token ids and scored positions
    tokenizer: str


def nll_of(logprobs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position negative log-likelihood of ``targets`` (float64)."""
    return -np.take_along_axis(logprobs, targets[:, None], axis=1)[:, 0].astype(np.float64)


def perplexity_from_nll(nll: np.ndarray, windows: TokenWindows) -> PerplexityResult:
    mean = float(np.mean(nll))
    return PerplexityResult(
        ppl=float(np.exp(mean)),
        nll=mean,
        scored_tokens=int(nll.size),
        windows=int(windows.ids.shape[0]),
        protocol=windows.config.protocol,
        context=int(windows.ids.shape[1]),
        corpus=windows.corpus_label,
        corpus_sha256=windows.corpus_sha256,
        windows_sha256=windows.sha256,
        tokenizer=windows.tokenizer,
    )


def perplexity(runner, windows: TokenWindows, progress=None) -> PerplexityResult:
    """Perplexity of ``runner`` on ``windows``; ``progress(done, total)`` after each window."""
    targets, nll = windows.targets(), []
    for i, lp in enumerate(iter_scored_logprobs(runner, windows)):
        nll.append(nll_of(lp, targets[i]))
        if progress is not None:
            progress(i + 1, windows.ids.shape[0])
    return perplexity_from_nll(np.concatenate(nll), windows)
