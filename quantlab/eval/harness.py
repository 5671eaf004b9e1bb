"""Evaluate one model or artifact: every number measured the same way, into one `Metrics`.

``evaluate(target, config)`` opens the target in its native runtime (a ``.gguf`` file in llama.cpp,
anything else as a transformers model), tokenizes each corpus once with the *reference's* tokenizer
(or the target's own when there is no reference), and measures what ``config`` asks for:
perplexity under each protocol, KL divergence and top-1 agreement against the reference (whose
distributions are cached on disk, see `quantlab.eval.kld`), lm-eval accuracy, size, peak memory
and speed. Each stage's wall time is recorded.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from quantlab import settings
from quantlab.console import bar_stream
from quantlab.data.corpora import load_corpus
from quantlab.errors import ConfigError
from quantlab.eval.kld import (
    CachedReference,
    KLDResult,
    LiveReference,
    ReferenceRecorder,
    build_reference,
    evaluate_against_reference,
)
from quantlab.eval.lmeval import TaskResult
from quantlab.eval.measure import (
    HardwareInfo,
    MemoryResult,
    SizeResult,
    SpeedResult,
    hardware_info,
    measure_speed,
    peak_memory,
    size_of,
)
from quantlab.eval.perplexity import PerplexityConfig, PerplexityResult, make_windows, perplexity
from quantlab.fingerprint import content_sha256
from quantlab.version import __version__

# 2: quantized checkpoints' speed through the fastest kernels by default (EvalConfig.kernels)
METRICS_VERSION = 2


@dataclass(frozen=True)
class EvalConfig:
    """What to measure. The first perplexity config's windows are also used for the KLD."""

    perplexity: tuple[PerplexityConfig, ...] = ()
    kld: bool = False
    tasks: tuple[str, ...] = ()
    limit: int | None = None  # documents per lm-eval task
    speed: bool = False
    speed_prompt_tokens: int = 128
    speed_decode_tokens: int = 32
    speed_runs: int = 3
    dtype: str = "float32"  # for transformers models
    gguf_runtime: str = "llama.cpp"  # or "torch": a .gguf dequantized by gguf into transformers
    # speed of quantized checkpoints through the fastest kernels on the device, as deployed (the
    # CPU: PyTorch's int4/int8 kernels, bf16 activations; a GPU: quantlab's); False: through the
    # reference dequantization. Quality (perplexity, KLD, tasks) is always measured on the
    # checkpoint's exact weights in the evaluation dtype (`HFRunner.use_fast_runtime`)
    kernels: bool = True
    allow_fallback: bool = False  # unavailable corpora become the embedded pydoc corpus
    version: int = 1

    def __post_init__(self) -> None:
        if self.gguf_runtime not in ("llama.cpp", "torch"):
            raise ConfigError(f"gguf_runtime must be llama.cpp or torch, got {self.gguf_runtime!r}")
        if self.kld and not self.perplexity:
            raise ConfigError("kld needs a perplexity corpus (the KL divergence uses its tokens)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.speed_runs < 1 or self.speed_prompt_tokens < 1 or self.speed_decode_tokens < 1:
            raise ConfigError("speed runs, prompt tokens and decode tokens must be >= 1")


@dataclass
class Metrics:
    """Everything measured for one target. Serialises to JSON (`to_json` / `from_json`)."""

    target: str
    runtime: str
    target_sha256: str
    reference: str | None = None
    perplexity: list[PerplexityResult] = field(default_factory=list)
    kld: KLDResult | None = None
    tasks: list[TaskResult] = field(default_factory=list)
    size: SizeResult | None = None
    speed: SpeedResult | None = None
    memory: MemoryResult | None = None
    hardware: HardwareInfo | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    quantlab_version: str = __version__
    version: int = METRICS_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Metrics:
        data = json.loads(text)
        kinds = {"perplexity": PerplexityResult, "tasks": TaskResult}
        single = {
            "kld": KLDResult,
            "size": SizeResult,
            "speed": SpeedResult,
            "memory": MemoryResult,
            "hardware": HardwareInfo,
        }
        for key, kind in kinds.items():
            data[key] = [kind(**item) for item in data.get(key, [])]
        for key, kind in single.items():
            if data.get(key) is not None:
                data[key] = kind(**data[key])
        return cls(**data)


def _progress(label: str):
    """A tqdm bar fed by ``progress(done, total)`` callbacks."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=label, unit="window", file=bar_stream(), leave=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


def open_runner(
    target: str,
    *,
    n_ctx: int = 2048,
    dtype: str = "float32",
    cache=None,
    gguf_runtime: str = "llama.cpp",
    kernels: bool = False,
    device: str = "cpu",
):
    """A `LogitsRunner` for ``target`` and the path to measure: an artifact of any registered
    format (in its own runtime - llama.cpp for a ``.gguf`` - or, with ``gguf_runtime="torch"``,
    dequantized into transformers, for weight-quality numbers on the same arithmetic as every
    other target) or any model spec (transformers). ``kernels``: quantized linears through the
    fastest kernels on the device (`HFRunner.use_fast_runtime`; its ``runtime`` says which).
    ``device``: where a transformers model runs (a resolved torch device); llama.cpp runs where
    llama-cpp-python was built to (`quantlab.eval.runners.llama_cpp_device`)."""
    from quantlab.eval.runners import HFRunner, LlamaCppRunner
    from quantlab.formats import detect
    from quantlab.models import load_model, load_tokenizer, resolve_model

    found = detect(target)
    if found is not None:
        fmt, _ = found
        if fmt.runtime != "transformers" and gguf_runtime == fmt.runtime:
            fmt.check(Path(target), fmt.runtime)  # a corrupt or alien file fails here
            return LlamaCppRunner(target, n_ctx=n_ctx, device=device), Path(target)
        hf_model, _ = fmt.load(Path(target), dtype=dtype, cache=cache)
        runner = HFRunner(hf_model.to(device), fmt.tokenizer(Path(target), cache), target)
        if kernels:
            runner.use_fast_runtime()
        return runner, Path(target)
    model = resolve_model(target, cache=cache)
    hf = load_model(model, dtype=dtype, device=device)
    runner = HFRunner(hf, load_tokenizer(model), target)
    return runner, model.path


def _own_runtime(spec: str) -> bool:
    """Whether ``spec`` is an artifact that runs in a runtime of its own (a .gguf: llama.cpp)."""
    from quantlab.formats import detect

    found = detect(spec)
    return found is not None and found[0].runtime != "transformers"


def _tokenizer_of(spec: str, cache) -> object:
    """The transformers tokenizer of a model spec or of an artifact of any registered format."""
    from quantlab.formats import detect
    from quantlab.models import load_tokenizer, resolve_model

    found = detect(spec)
    if found is not None:
        return found[0].tokenizer(Path(spec), cache)
    return load_tokenizer(resolve_model(spec, cache=cache))


def _reference_path(spec: str, cache: Path) -> Path:
    from quantlab.formats import detect
    from quantlab.models import resolve_model

    if detect(spec) is not None:  # an artifact: a file or a folder
        return Path(spec)
    return resolve_model(spec, cache=cache).path


def _reference(
    spec: str, windows, cache: Path, stage_seconds: dict, target_runner, target_sha, device="cpu"
):
    """The reference's distributions on ``windows``: cached on disk, recorded during the target's
    own pass when the target is the reference, or computed by running the reference."""
    ref_sha = content_sha256(_reference_path(spec, cache))
    cached = cache / "references" / f"{windows.sha256[:20]}-{ref_sha[:20]}.npz"
    if cached.is_file():
        return CachedReference.load(cached), cached
    recordable = hasattr(target_runner, "logits_and_head_input") and not _own_runtime(spec)
    if ref_sha == target_sha and recordable:  # (a .gguf reference always runs in llama.cpp)
        return ReferenceRecorder(target_runner, windows), cached
    start = time.perf_counter()
    runner, _ = open_runner(spec, n_ctx=windows.ids.shape[1], cache=cache, device=device)
    reference = build_reference(runner, windows, progress=_progress(f"reference {spec}"))
    if isinstance(reference, CachedReference):
        reference.save(cached)
        if hasattr(runner, "close"):
            runner.close()
    stage_seconds["reference"] = time.perf_counter() - start
    return reference, cached


def evaluate(
    target: str,
    config: EvalConfig,
    *,
    reference: str | None = None,
    data_root=None,
    cache=None,
    device: str = "cpu",
) -> Metrics:
    """Measure ``target`` (a model spec, folder or ``.gguf`` file) as ``config`` says, on
    ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``; transformers models: the model, its
    quantized linears' kernels and lm-eval run there; memory is measured there)."""
    from quantlab.devices import resolve_device
    from quantlab.eval.lmeval import hf_lm, llama_cpp_lm, run_lm_eval

    device = resolve_device(device)
    cache_root = settings.cache_dir(cache)
    stages: dict[str, float] = {}
    n_ctx = max([2048] + [p.n_ctx for p in config.perplexity])
    start = time.perf_counter()
    with peak_memory(device) as memory:
        runner, path = open_runner(
            target,
            n_ctx=n_ctx,
            dtype=config.dtype,
            cache=cache,
            gguf_runtime=config.gguf_runtime,
            device=device,
        )
        stages["load"] = time.perf_counter() - start
        metrics = Metrics(target, runner.runtime, content_sha256(path), reference=reference)
        tok_runner = runner
        if reference is not None and not _own_runtime(reference):
            from quantlab.eval.runners import HFTokenizer

            tok_runner = HFTokenizer(_tokenizer_of(reference, cache), reference)
        try:
            for i, pconf in enumerate(config.perplexity):
                t0 = time.perf_counter()
                corpus = load_corpus(
                    pconf.corpus, pconf.split, data_root=data_root, fallback=config.allow_fallback
                )
                windows = make_windows(
                    corpus,
                    tok_runner.tokenize,
                    pconf,
                    tok_runner.name,
                    tok_runner.add_bos,
                    tok_runner.bos_id,
                )
                label = f"ppl {corpus.label} [{pconf.protocol}]"
                if i == 0 and config.kld:
                    ref, ref_file = _reference(
                        reference or target,
                        windows,
                        cache_root,
                        stages,
                        runner,
                        metrics.target_sha256,
                        device,
                    )
                    t0 = time.perf_counter()
                    ppl, kld = evaluate_against_reference(runner, windows, ref, _progress(label))
                    if isinstance(ref, ReferenceRecorder):
                        ref.reference.save(ref_file)
                    if isinstance(ref, LiveReference) and hasattr(ref.runner, "close"):
                        ref.runner.close()
                    metrics.kld = kld
                    metrics.reference = ref.name
                else:
                    ppl = perplexity(runner, windows, _progress(label))
                metrics.perplexity.append(ppl)
                stages[f"perplexity:{corpus.name}:{pconf.protocol}"] = time.perf_counter() - t0
            if config.tasks:
                t0 = time.perf_counter()
                lm = (
                    llama_cpp_lm(runner)
                    if runner.runtime.startswith("llama.cpp")
                    else hf_lm(runner.model, runner.tokenizer)
                )
                metrics.tasks = run_lm_eval(
                    lm, list(config.tasks), limit=config.limit, data_root=data_root, cache=cache
                )
                stages["tasks"] = time.perf_counter() - t0
            if config.speed:
                t0 = time.perf_counter()
                if config.kernels and hasattr(runner, "use_fast_runtime"):
                    runner.use_fast_runtime()  # the last stage: the model may change dtype
                rng = np.random.default_rng(0)
                prompt = rng.integers(
                    100, min(runner.vocab_size, 30000), config.speed_prompt_tokens
                )
                metrics.speed = measure_speed(
                    runner, prompt, config.speed_decode_tokens, config.speed_runs
                )
                stages["speed"] = time.perf_counter() - t0
        finally:
            if hasattr(runner, "close"):
                runner.close()
    metrics.memory = dataclasses.replace(memory)
    metrics.size = size_of(path)
    metrics.hardware = hardware_info()
    metrics.stage_seconds = stages
    return metrics
