"""`quantlab run`: take one model through every variant of a run config, evaluate every artifact
the same way, and store the results.

For each variant: quantize (quantlab's method, a reference toolkit, or llama.cpp), write the
artifact (atomically), evaluate it *from disk* with the shared harness against the unquantized
model, and record one row in the results store. What is shared across variants: the calibration
set (drawn once; every method and the importance matrix see the same token ids), the importance
matrix (measured once on the unquantized model, for every GGUF variant that asks for it), the
full-precision GGUF, and the reference's distributions for the KL divergence (cached on disk by
the harness). GPTQ and AWQ each need their own pass: each block's inputs come from the blocks
already quantized *by that method*, so those statistics cannot be shared.

A variant whose result key is already in the store is skipped, so a killed sweep resumes where
it stopped; an artifact left without a row (killed during evaluation) is redone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from quantlab import __version__, settings
from quantlab.errors import QuantlabError
from quantlab.workbench.config import RunConfig, Variant
from quantlab.workbench.store import ResultStore


@dataclass
class SweepReport:
    run_id: int
    done: list[str]  # variants evaluated in this run
    skipped: list[str]  # variants already in the store
    keys: dict[str, str]  # variant name -> result key (select the rows with these)
    notes: list[str]
    seconds: float


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"quantlab": __version__}
    for pkg in (
        "torch",
        "transformers",
        "llama-cpp-python",
        "gguf",
        "lm-eval",
        "gptqmodel",
        "llmcompressor",
    ):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def result_key(variant: Variant, config: RunConfig, model_sha256: str, data_root=None) -> str:
    """What determines a variant's result: its settings, the calibration it uses, the
    evaluation, the model's content and the code versions."""
    from quantlab.eval.harness import METRICS_VERSION

    calibration = dataclasses.asdict(config.calibration) if variant.needs_calibration else None
    parts = {
        "variant": json.loads(variant.settings_key()),
        "calibration": calibration,
        "evaluation": dataclasses.asdict(config.evaluation),
        "model": model_sha256,
        # results made from the fallback corpus must not stand in for the real one
        "data_root": str(settings.data_root(data_root) or "") or None,
        "quantlab": __version__,
        "metrics": METRICS_VERSION,
    }
    if variant.method and variant.impl == "quantlab":
        parts["methods"] = METHODS_VERSION
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# Bumped when quantlab's methods produce different tensors for the same settings, so that stored
# results of the older code are not taken for the current code's (2: the faster GPTQ/AWQ arithmetic
# of 2026-11-28, equal to ~1e-7 but not bit for bit, and AWQ's screened search; 3: GPTQ's
# triangular inverse from matrix products, equal to ~5e-8).
METHODS_VERSION = 3


class _Shared:
    """What variants share, computed on first use."""

    def __init__(self, config: RunConfig, model_ref, data_root, cache):
        self.config, self.model_ref, self.data_root, self.cache = (
            config,
            model_ref,
            data_root,
            cache,
        )
        self._calibration = self._imatrix = None

    def calibration(self):
        if self._calibration is None:
            from quantlab.data import CalibrationConfig, calibration_for

            c = self.config.calibration
            cfg = CalibrationConfig(
                corpus=c.corpus,
                split=c.split,
                n_samples=c.n_samples,
                seq_len=c.seq_len,
                seed=c.seed,
            )
            self._calibration = calibration_for(
                self.model_ref, cfg, data_root=self.data_root, fallback=c.allow_fallback
            )
        return self._calibration

    def imatrix(self):
        if self._imatrix is None:
            from quantlab.methods.runner import collect_imatrix
            from quantlab.models import load_model

            _, calib = self.calibration()
            model = load_model(self.model_ref)
            self._imatrix = collect_imatrix(
                model, self.model_ref.folder.arch, calib, calib_dtype=self.config.calibration.dtype
            )
        return self._imatrix


def _remove(path: Path) -> None:
    """Remove a leftover artifact: a folder, or a .gguf file with its manifest and imatrix, and
    the temporary folders of writes that were killed before they finished."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    if path.is_dir():
        shutil.rmtree(path)
        return
    for f in (
        path,
        path.with_name(path.name + ".manifest.json"),
        path.with_name(path.stem + ".imatrix.gguf"),
    ):
        f.unlink(missing_ok=True)


def produce(variant: Variant, shared: _Shared, out: Path) -> tuple[str, str]:
    """Quantize and write ``variant``; returns (what to evaluate, its format)."""
    from quantlab.formats.gguf_quant import llama_cpp_artifact

    model_ref, cache = shared.model_ref, settings.cache_dir(shared.cache)
    if variant.is_reference:
        return str(model_ref.path), "hf"
    if variant.gguf_type:  # llama.cpp's quantization of the full-precision GGUF
        corpus, calibration, imatrix = None, None, None
        if variant.imatrix:
            corpus, calibration = shared.calibration()
            imatrix = shared.imatrix()
        llama_cpp_artifact(
            model_ref,
            out,
            variant.gguf_type,
            cache,
            imatrix=imatrix,
            calibration=calibration,
            corpus_label=corpus.label if corpus else "",
        )
        return str(out), "gguf"
    if variant.impl != "quantlab":  # a reference toolkit on the same calibration ids
        from quantlab.reference import run_reference

        _, calibration = shared.calibration()
        run = run_reference(
            variant.impl,
            variant.method,
            model_ref.path,
            calibration.input_ids,
            out,
            bits=variant.bits,
            group_size=variant.group_size,
            sym=True if variant.sym is None else variant.sym,
            act_order=variant.act_order,
            damp_percent=variant.damp_percent,
        )
        return str(run.out_dir), f"{variant.impl}: {run.format}"
    from quantlab.formats.checkpoint import write_checkpoint
    from quantlab.formats.native import write_native
    from quantlab.methods import get_method
    from quantlab.methods.runner import quantize_model
    from quantlab.models import load_model

    spec = get_method(variant.method)
    method_config = spec.config_cls(**variant.method_options())
    calibration = shared.calibration()[1] if spec.needs_calibration else None
    fmt = "gptq_v2" if variant.format == "gptq" and variant.gptq_format == "v2" else variant.format
    if variant.streaming:
        from quantlab.methods.streaming import quantize_streaming

        done = quantize_streaming(
            model_ref,
            variant.method,
            method_config,
            calibration,
            fmt,
            out,
            calib_dtype=shared.config.calibration.dtype,
        )
        return str(done.out_dir), fmt
    model = load_model(model_ref)
    result = quantize_model(
        model,
        model_ref.folder.arch,
        variant.method,
        method_config,
        calibration,
        calib_dtype=shared.config.calibration.dtype,
    )
    if variant.format == "native":
        return str(write_native(result, model_ref, out)), "native"
    if variant.format == "gguf":
        from quantlab.formats.gguf_lossless import lossless_artifact

        return str(lossless_artifact(result, model_ref, out, cache)[0]), "gguf"
    return str(write_checkpoint(fmt, result, model, model_ref, out)), fmt


def artifact_path(out_root: Path, variant: Variant) -> Path:
    return out_root / f"{variant.name}{'.gguf' if variant.format == 'gguf' else ''}"


def preflight(config: RunConfig, model_ref) -> None:
    """Refuse, before any work, variants whose format cannot hold this model's shapes."""
    arch = model_ref.folder.arch
    linears = [
        t
        for t in model_ref.folder.tensors
        if t.name.startswith(arch.blocks + ".")
        and len(t.shape) == 2
        and any(t.name.endswith(f".{name}.weight") for name in arch.linears)
    ]
    for v in config.variants:
        whole_groups = v.format == "awq" or (v.format == "gguf" and v.method)
        if not whole_groups or v.group_size <= 0:
            continue
        bad = next((t for t in linears if t.shape[1] % v.group_size), None)
        if bad is not None:
            raise QuantlabError(
                f"variant {v.name}: {bad.name} has in_features={bad.shape[1]}, not a multiple "
                f"of group_size {v.group_size}, which format {v.format} needs"
            )


def _eval_config(config: RunConfig, data_root, notes: list[str]):
    from quantlab.eval.harness import EvalConfig
    from quantlab.eval.lmeval import LOCAL_TASKS
    from quantlab.eval.perplexity import PerplexityConfig

    e = config.evaluation
    tasks = list(e.tasks)
    root = settings.data_root(data_root)
    if e.allow_fallback:
        unavailable = [
            t
            for t in tasks
            if t in LOCAL_TASKS
            and (root is None or not all((root / f).is_file() for f in LOCAL_TASKS[t].files))
        ]
        for task in unavailable:
            where = f"the data folder {root}" if root else "a data folder (none is configured)"
            notes.append(f"task {task} skipped: its files are not in {where}")
            tasks.remove(task)
    ppl = tuple(
        PerplexityConfig(
            corpus=p.corpus,
            split=p.split,
            protocol=p.protocol,
            context=p.context,
            max_tokens=p.max_tokens,
        )
        for p in e.perplexity
    )
    return EvalConfig(
        perplexity=ppl,
        kld=e.kld,
        tasks=tuple(tasks),
        limit=e.limit,
        speed=e.speed,
        allow_fallback=e.allow_fallback,
    )


def run_sweep(
    config: RunConfig,
    *,
    data_root=None,
    cache=None,
    store_path: str | Path | None = None,
    output: str | Path | None = None,
    log=None,
    progress_file: str | Path | None = None,
    executor: str = "local",
    address: str | None = None,
    resources=None,
) -> SweepReport:
    """Run every variant of ``config`` not yet in the store; see the module docstring.

    ``progress_file``: a JSON file rewritten (atomically) at every stage - run, variant i of N,
    stage, seconds elapsed, estimated seconds left - for front ends such as the app.
    ``executor``: ``local`` (one variant after another in this process) or ``ray`` (each
    variant's quantization and evaluation as Ray tasks on the cluster at ``address``, rows still
    written here; `quantlab.workbench.ray_executor`), with ``resources`` (a `TaskResources`)."""
    from tqdm import tqdm

    from quantlab.eval.harness import evaluate
    from quantlab.fingerprint import content_sha256
    from quantlab.models import resolve_model

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if executor not in ("local", "ray"):
        raise QuantlabError(f"unknown executor {executor!r}; use local or ray")
    start = time.perf_counter()
    model_ref = resolve_model(config.model, cache=cache)
    preflight(config, model_ref)
    model_sha = content_sha256(model_ref.path)
    out_root = Path(output or config.output) / config.name
    notes: list[str] = []
    eval_config = _eval_config(config, data_root, notes)
    for note in notes:
        log(f"note: {note}")
    shared = _Shared(config, model_ref, data_root, cache)
    done, skipped = [], []
    with ResultStore(store_path or config.store) as store:
        config_json = json.dumps(config.to_dict())
        run_id = store.start_run(config.name, config.model, config_json, config.sha256())
        keys = {v.name: result_key(v, config, model_sha, data_root) for v in config.variants}
        todo = [v for v in config.variants if not store.has(keys[v.name])]
        skipped = [v.name for v in config.variants if v not in todo]
        if skipped:
            log(f"already in {store.path}: {', '.join(skipped)}")
        bar = tqdm(total=len(todo), desc=config.name, unit="variant", file=sys.stderr)
        sweep_start = time.perf_counter()

        def stage(i: int, name: str, what: str) -> None:
            bar.set_postfix_str(f"{i}/{len(todo)} {name}: {what}")
            if progress_file is None:
                return
            elapsed = time.perf_counter() - sweep_start
            per = elapsed / (i - 1) if i > 1 else None
            state = {
                "run": config.name,
                "variant": name,
                "index": i,
                "total": len(todo),
                "stage": what,
                "elapsed_s": elapsed,
                "skipped": skipped,
                "eta_s": None if per is None else per * (len(todo) - i + 1),
            }
            tmp = Path(f"{progress_file}.tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(progress_file)

        def record(variant: Variant, target: str, fmt: str, metrics, timings: dict, calib_sha):
            store.record(
                key=keys[variant.name],
                run_id=run_id,
                run_name=config.name,
                variant=variant,
                model=config.model,
                model_sha256=model_sha,
                calibration_sha256=calib_sha if variant.needs_calibration else None,
                config_sha256=config.sha256(),
                artifact=target,
                fmt=fmt,
                metrics=metrics,
                versions=_versions(),
                timings=timings,
            )
            done.append(variant.name)
            log(
                f"{variant.name}: quantize {timings['quantize_s']:.1f} s, "
                f"evaluate {timings['evaluate_s']:.1f} s"
            )
            bar.update(1)

        if executor == "ray":
            from quantlab.workbench.ray_executor import run_on_ray

            run_on_ray(
                todo,
                config=config,
                model_ref=model_ref,
                eval_config=eval_config,
                out_root=out_root,
                data_root=data_root,
                cache=cache,
                record=record,
                stage=stage,
                resources=resources,
                address=address,
                log=log,
            )
        for i, variant in enumerate(todo if executor == "local" else [], 1):
            timings = {}
            stage(i, variant.name, "quantize")
            t0 = time.perf_counter()
            out = artifact_path(out_root, variant)
            _remove(out)  # left by a run killed before its row was recorded
            out.parent.mkdir(parents=True, exist_ok=True)
            target, fmt = produce(variant, shared, out)
            timings["quantize_s"] = time.perf_counter() - t0
            stage(i, variant.name, "evaluate")
            t0 = time.perf_counter()
            metrics = evaluate(
                target, eval_config, reference=config.model, data_root=data_root, cache=cache
            )
            timings["evaluate_s"] = time.perf_counter() - t0
            timings.update({f"eval:{k}": v for k, v in metrics.stage_seconds.items()})
            calib_sha = shared.calibration()[1].sha256 if variant.needs_calibration else None
            record(variant, target, fmt, metrics, timings, calib_sha)
        bar.close()
        store.finish_run(run_id)
        stage(len(todo) + 1, "", "done")
    if not done and not skipped:
        raise QuantlabError("nothing to run")
    return SweepReport(run_id, done, skipped, keys, notes, time.perf_counter() - start)
