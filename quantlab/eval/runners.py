"""Anything that maps token ids to logits, behind one interface.

The evaluation harness never asks what a model is: it tokenizes a corpus once and feeds the same
ids to every `LogitsRunner`, so perplexity and KL divergence compare like with like across formats.

- `HFRunner`: a transformers model in memory (fp32/bf16, or with quantized linears).
- `LlamaCppRunner`: a GGUF file run by llama.cpp (llama-cpp-python, every position's logits kept).

Both return fp32 logits of shape ``(T, vocab)`` for a window of ``T`` ids, and can tokenize text
with their own tokenizer (used when no reference tokenizer is given, e.g. a GGUF evaluated alone).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from quantlab.errors import MissingDependencyError, QuantlabError


class LogitsRunner(Protocol):
    name: str  # what is evaluated, for reports
    runtime: str  # "transformers[+how its quantized linears run]" or "llama.cpp"
    vocab_size: int
    add_bos: bool  # whether its tokenizer puts BOS at the start of a text

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """(T,) int64 ids -> (T, vocab) float32 logits, one fresh context per call."""
        ...

    def tokenize(self, text: str, add_special: bool) -> np.ndarray: ...

    @property
    def bos_id(self) -> int | None: ...


class HFTokenizer:
    """A transformers tokenizer seen as the harness sees tokenizers (ids, BOS behaviour)."""

    def __init__(self, tokenizer, name: str):
        self.tokenizer, self.name = tokenizer, name
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.add_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    def tokenize(self, text: str, add_special: bool) -> np.ndarray:
        ids = self.tokenizer(text, add_special_tokens=add_special, verbose=False)["input_ids"]
        return np.asarray(ids, dtype=np.int64)


def runtime_of(model) -> str:
    """What runs ``model``'s linears (see `HFRunner`)."""
    import torch

    from quantlab.qlinear import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return "transformers"
    backends = sorted({m.kernel["backend"] for m in layers if m.kernel is not None})
    if not backends:
        return "transformers+reference dequant"
    label = f"transformers+{'/'.join(backends)} kernels"
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        label += f", {str(dtype).split('.')[-1]}"
    rest = sum(m.kernel is None for m in layers)
    return label if not rest else f"{label} ({rest} of {len(layers)} linears: reference dequant)"


class HFRunner(HFTokenizer):
    """A transformers causal LM on CPU or GPU. ``runtime`` says how its quantized linears run:
    ``transformers`` (none), ``transformers+reference dequant`` (quantlab's `QuantLinear`
    dequantizing every weight at every forward: correct everywhere, not fast) or
    ``transformers+<backend> kernels`` (``cpu``: PyTorch's int4/int8 CPU kernels), naming how
    many linears stayed on the reference path when some did."""

    def __init__(self, model, tokenizer, name: str):
        super().__init__(tokenizer, name)
        self.model = model
        self.vocab_size = int(model.config.vocab_size)

    @property
    def runtime(self) -> str:
        return runtime_of(self.model)

    def use_fast_runtime(self) -> bool:
        """Run the quantized linears through the fastest kernels on this device, as a user would
        deploy them (`quantlab.qlinear.use_fast_kernels`). PyTorch's CPU int4/int8 kernels are
        fast only with bfloat16 activations (their float32 path is scalar), so a float32 model
        whose linears they run is cast to bfloat16. Returns whether anything changed; the
        ``runtime`` then says what runs (e.g. ``transformers+cpu kernels, bfloat16``)."""
        import torch

        from quantlab.qlinear import use_fast_kernels

        counts = use_fast_kernels(self.model)
        if not set(counts) - {"reference"}:
            return False
        if counts.get("cpu") and next(self.model.parameters()).dtype == torch.float32:
            self.model.to(torch.bfloat16)
        return True

    @property
    def device(self):
        return next(self.model.parameters()).device

    def logits(self, ids: np.ndarray) -> np.ndarray:
        import torch

        batch = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.device)[None]
        with torch.inference_mode():
            out = self.model(batch, use_cache=False).logits[0]
        return out.float().cpu().numpy()

    def logits_and_head_input(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (T, V) and the output layer's input (T, H), both float32."""
        captured = {}

        def keep_input(_module, inputs, _output) -> None:  # returning None keeps the output
            captured["x"] = inputs[0]

        hook = self.model.get_output_embeddings().register_forward_hook(keep_input)
        try:
            logits = self.logits(ids)
        finally:
            hook.remove()
        return logits, captured["x"][0].float().cpu().numpy()

    @property
    def threads(self) -> int:
        import torch

        return torch.get_num_threads()

    def timed_generate(self, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
        """Seconds for the prefill of ``prompt`` and for ``new_tokens`` greedy steps after it."""
        import time

        import torch

        device = self.device
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        ids = torch.as_tensor(np.asarray(prompt, dtype=np.int64), device=self.device)[None]
        with torch.inference_mode():
            sync()
            start = time.perf_counter()
            out = self.model(ids, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            sync()
            prefilled = time.perf_counter()
            past = out.past_key_values
            for _ in range(new_tokens):
                out = self.model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync()
            done = time.perf_counter()
        return prefilled - start, done - prefilled

    def head_parameters(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The output layer's weight (V, H) and bias (V,) as float32 copies."""
        head = self.model.get_output_embeddings()
        weight = head.weight.detach().float().cpu().numpy().copy()
        bias = None if head.bias is None else head.bias.detach().float().cpu().numpy().copy()
        return weight, bias


def llama_cpp_gpu() -> bool:
    """Whether the installed llama-cpp-python was built with GPU offload (CUDA, Metal, ...)."""
    try:
        import llama_cpp
    except ImportError:
        return False
    supports = getattr(llama_cpp, "llama_supports_gpu_offload", None)
    return bool(supports()) if supports is not None else False


class LlamaCppRunner:
    """A GGUF file run by llama.cpp through llama-cpp-python, with every position's logits.
    With ``device`` a GPU and a llama-cpp-python built with GPU offload, every layer runs on the
    GPU (``runtime`` says ``llama.cpp (GPU)``); otherwise on the CPU, whatever ``device`` says."""

    runtime = "llama.cpp"

    def __init__(
        self,
        path: str | os.PathLike,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        device: str = "cpu",
    ):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise MissingDependencyError(
                "evaluating GGUF files needs llama-cpp-python: pip install 'quantlab[gguf]'"
            ) from None
        path = Path(path)
        if not path.is_file():
            raise QuantlabError(f"GGUF file {path} does not exist")
        self.path, self.name = path, path.name
        self.n_ctx = n_ctx
        gpu = str(device).startswith("cuda") and llama_cpp_gpu()
        placement = {"n_gpu_layers": 0}
        if gpu:
            self.runtime = "llama.cpp (GPU)"
            index = int(str(device).split(":")[1]) if ":" in str(device) else 0
            placement = {"n_gpu_layers": -1, "main_gpu": index, "split_mode": 0}  # that GPU only
        try:
            self.llm = Llama(
                **placement,
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=min(n_ctx, 512),
                logits_all=True,
                flash_attn=True,  # what llama.cpp's tools use on CPU ("auto")
                n_threads=n_threads or os.cpu_count() or 1,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise QuantlabError(f"llama.cpp cannot load {path}: {exc}") from None
        self.vocab_size = int(self.llm.n_vocab())
        self.add_bos = bool(self.llm.metadata.get("tokenizer.ggml.add_bos_token", "true") == "true")

    @property
    def bos_id(self) -> int | None:
        return int(self.llm.token_bos())

    def logits(self, ids: np.ndarray) -> np.ndarray:
        ids = [int(i) for i in ids]
        if len(ids) > self.n_ctx:
            raise QuantlabError(f"window of {len(ids)} tokens exceeds n_ctx={self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    @property
    def threads(self) -> int:
        return int(self.llm.context_params.n_threads)

    def timed_generate(self, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
        """Seconds for the prefill of ``prompt`` and for ``new_tokens`` greedy steps after it.

        Only the last position's logits are computed here (as llama-bench does), not every
        position's as for perplexity.
        """
        import time

        llm, n_vocab = self.llm, self.vocab_size
        if len(prompt) + new_tokens > self.n_ctx:
            raise QuantlabError(f"{len(prompt)} + {new_tokens} tokens exceed n_ctx={self.n_ctx}")

        def last_logits() -> np.ndarray:
            return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

        saved, llm._logits_all = llm._logits_all, False
        try:
            llm.reset()
            start = time.perf_counter()
            llm.eval([int(t) for t in prompt])
            token = int(last_logits().argmax())
            prefilled = time.perf_counter()
            for _ in range(new_tokens):
                llm.eval([token])
                token = int(last_logits().argmax())
            done = time.perf_counter()
        finally:
            llm._logits_all = saved
            llm.reset()
        return prefilled - start, done - prefilled

    def generate_text(self, ids: list[int], max_new_tokens: int) -> str:
        """Greedy continuation of ``ids`` (stops at end-of-generation tokens), as text."""
        out = []
        self.llm.reset()
        for token in self.llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if self.llm._model.token_is_eog(token) or len(out) >= max_new_tokens:
                break
            out.append(token)
        return self.llm.detokenize(out).decode("utf-8", errors="replace")

    def close(self) -> None:
        """Free llama.cpp's model and context now (not at interpreter exit, where it can fail)."""
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def tokenize(self, text: str, add_special: bool) -> np.ndarray:
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=add_special and self.add_bos)
        return np.asarray(ids, dtype=np.int64)
