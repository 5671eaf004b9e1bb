"""KL divergence against a reference model, exact over the whole vocabulary.

The reference (usually the unquantized model) must provide its full next-token distribution at
every scored position. Keeping those distributions is what makes llama.cpp's
``--kl-divergence-base`` file huge (37 GiB for Llama-3 on WikiText-2), and keeping only the
top-k log-probs is not good enough: on SmolLM2-135M the top 100 tokens leave ~14% of the
probability mass outside, and merging that tail understates the KLD by 10-20% (measured; see
docs/EVALUATION.md).

quantlab keeps instead the *input of the reference's output layer* at every scored position (the
final hidden state, ``hidden`` floats per token) plus the output layer's weights once. The full
logits are then recomputed exactly: ``logits = hidden @ W^T (+ b)`` is the very operation the model
runs last, and gives bit-identical logits. For 32k scored tokens that is 75 MB for SmolLM2
(hidden 576) instead of 6 GB of fp32 logits. A reference without that access (a GGUF run by
llama.cpp) is run again alongside each evaluated model instead (`LiveReference`).

Per position, ``KLD = sum_v p_v (log p_v - log q_v)`` with P the reference and Q the model,
accumulated in float64. Reported as ``llama-perplexity --kl-divergence`` does: mean, median, 99th
percentile and maximum KLD, top-1 agreement (same most likely token), and the perplexity ratio on
the same tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantlab.errors import CorruptFileError
from quantlab.eval.perplexity import (
    PerplexityResult,
    TokenWindows,
    iter_scored_logprobs,
    log_softmax,
    nll_of,
    perplexity_from_nll,
)

FORMAT_VERSION = 1


@dataclass(eq=False)
class CachedReference:
    """The reference's output-layer inputs at every scored position, and that layer's weights."""

    hidden: np.ndarray  # (N, H) float32: input of the output layer at each scored position
    head_weight: np.ndarray  # (V, H) float32
    head_bias: np.ndarray | None  # (V,) float32, or None
    nll: np.ndarray  # (N,) float64: the reference's negative log-likelihood of the real token
    windows_sha256: str
    name: str

    def logprobs(self, window: int, per: int) -> np.ndarray:
        """(per, V) log-probs of the reference at the scored positions of ``window``."""
        import torch
        import torch.nn.functional as F

        h = torch.from_numpy(self.hidden[window * per : (window + 1) * per])
        b = None if self.head_bias is None else torch.from_numpy(self.head_bias)
        with torch.inference_mode():
            logits = F.linear(h, torch.from_numpy(self.head_weight), b)
        return log_softmax(logits.numpy())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")  # a process of its own
        arrays = {"hidden": self.hidden, "head_weight": self.head_weight, "nll": self.nll}
        if self.head_bias is not None:
            arrays["head_bias"] = self.head_bias
        meta = np.array([self.windows_sha256, self.name, str(FORMAT_VERSION)])
        np.savez(tmp, meta=meta, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CachedReference:
        try:
            with np.load(path, allow_pickle=False) as z:
                sha, name, version = (str(x) for x in z["meta"])
                if version != str(FORMAT_VERSION):
                    raise CorruptFileError(f"{path}: reference cache of format {version}")
                bias = z["head_bias"] if "head_bias" in z.files else None
                return cls(z["hidden"], z["head_weight"], bias, z["nll"], sha, name)
        except (OSError, KeyError, ValueError) as exc:
            raise CorruptFileError(f"{path}: unreadable reference cache ({exc})") from None


class LiveReference:
    """A reference that is run again on each window (no cache), alongside the evaluated model.

    Its negative log-likelihoods are recorded as windows are served, so the reference runs once.
    """

    def __init__(self, runner, windows: TokenWindows):
        self.runner, self.windows, self.name = runner, windows, runner.name
        self.windows_sha256 = windows.sha256
        self._nll: dict[int, np.ndarray] = {}

    def logprobs(self, window: int, per: int) -> np.ndarray:
        ids = self.windows.ids[window]
        lp = log_softmax(self.runner.logits(ids)[self.windows.first_scored : len(ids) - 1])
        self._nll[window] = nll_of(lp, self.windows.targets()[window])
        return lp

    @property
    def nll(self) -> np.ndarray:
        """(N,) float64 over every window (each window is run if it has not been served yet)."""
        per = self.windows.scored_per_window
        for i in range(self.windows.ids.shape[0]):
            if i not in self._nll:
                self.logprobs(i, per)
        return np.concatenate([self._nll[i] for i in range(self.windows.ids.shape[0])])


def build_reference(runner, windows: TokenWindows, progress=None):
    """A `CachedReference` when the runner exposes its output layer, else a `LiveReference`."""
    if not hasattr(runner, "logits_and_head_input"):
        return LiveReference(runner, windows)
    targets, first, stop = windows.targets(), windows.first_scored, windows.ids.shape[1] - 1
    hidden, nll = [], []
    for i, row in enumerate(windows.ids):
        logits, head_in = runner.logits_and_head_input(row)
        hidden.append(head_in[first:stop])
        nll.append(nll_of(log_softmax(logits[first:stop]), targets[i]))
        if progress is not None:
            progress(i + 1, windows.ids.shape[0])
    weight, bias = runner.head_parameters()
    return CachedReference(
        np.concatenate(hidden), weight, bias, np.concatenate(nll), windows.sha256, runner.name
    )


@dataclass(frozen=True)
class KLDResult:
    """Divergence of a model from the reference on the same scored tokens (nats)."""

    mean: float
    median: float
    p99: float
    max: float
    top1_agreement: float  # fraction of positions whose most likely token equals the reference's
    ppl_ratio: float  # ppl(model) / ppl(reference) on the same tokens
    reference_ppl: float
    reference: str
    scored_tokens: int


def kl_divergence(p_logprobs: np.ndarray, q_logprobs: np.ndarray, rows_per_chunk: int = 512):
    """KL(P||Q) per row over the whole vocabulary, in float64."""
    import torch

    out = np.empty(p_logprobs.shape[0], dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, p_logprobs.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            lp = torch.from_numpy(p_logprobs[rows]).double()
            lq = torch.from_numpy(q_logprobs[rows]).double()
            out[rows] = torch.sum(lp.exp() * (lp - lq), dim=-1).numpy()
    return np.maximum(out, 0.0)


class ReferenceRecorder:
    """Builds a `CachedReference` from the very pass that evaluates the same model.

    When the evaluated model *is* the reference (the unquantized model measured against itself),
    recording its output-layer inputs while it is evaluated saves a second forward pass; its KLD
    is still computed, from the recomputed reference logits, like any other model's.
    """

    def __init__(self, runner, windows: TokenWindows):
        self.runner, self.windows, self.name = runner, windows, runner.name
        self.windows_sha256 = windows.sha256
        self.weight, self.bias = runner.head_parameters()
        self.hidden: list[np.ndarray] = []
        self.reference: CachedReference | None = None

    def scored_logprobs(self):
        """Yield the runner's scored log-probs per window, recording its output-layer inputs."""
        first, stop = self.windows.first_scored, self.windows.ids.shape[1] - 1
        for row in self.windows.ids:
            logits, head_in = self.runner.logits_and_head_input(row)
            self.hidden.append(head_in[first:stop])
            yield log_softmax(logits[first:stop])

    def logprobs(self, window: int, per: int) -> np.ndarray:
        partial = CachedReference(self.hidden[window], self.weight, self.bias, np.empty(0), "", "")
        return partial.logprobs(0, per)

    def finish(self, nll: np.ndarray) -> CachedReference:
        self.reference = CachedReference(
            np.concatenate(self.hidden), self.weight, self.bias, nll, self.windows_sha256, self.name
        )
        return self.reference


def evaluate_against_reference(
    runner, windows: TokenWindows, reference, progress=None
) -> tuple[PerplexityResult, KLDResult]:
    """One pass of ``runner`` over ``windows``: its perplexity and its KLD from ``reference``."""
    if reference.windows_sha256 != windows.sha256:
        raise ValueError("the reference was computed on other token windows")
    targets, per = windows.targets(), windows.scored_per_window
    recording = isinstance(reference, ReferenceRecorder)
    scored = reference.scored_logprobs() if recording else iter_scored_logprobs(runner, windows)
    kls, nlls, agree = [], [], []
    for i, lq in enumerate(scored):
        lp = reference.logprobs(i, per)
        kls.append(kl_divergence(lp, lq))
        nlls.append(nll_of(lq, targets[i]))
        agree.append(lq.argmax(axis=1) == lp.argmax(axis=1))
        if progress is not None:
            progress(i + 1, windows.ids.shape[0])
    kl, nll, same = np.concatenate(kls), np.concatenate(nlls), np.concatenate(agree)
    if recording:
        reference = reference.finish(nll)
    ppl = perplexity_from_nll(nll, windows)
    ref_ppl = float(np.exp(reference.nll.mean()))
    kld = KLDResult(
        mean=float(kl.mean()),
        median=float(np.median(kl)),
        p99=float(np.percentile(kl, 99)),
        max=float(kl.max()),
        top1_agreement=float(same.mean()),
        ppl_ratio=ppl.ppl / ref_ppl,
        reference_ppl=ref_ppl,
        reference=reference.name,
        scored_tokens=int(kl.size),
    )
    return ppl, kld
