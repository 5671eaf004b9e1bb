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
import time
from dataclasses import dataclass
from pathlib import Path

from quantlab import settings
from quantlab.errors import QuantlabError
from quantlab.version import __version__
from quantlab.workbench.config import IMPL, RunConfig, Variant
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
    if variant.method and variant.impl == IMPL:
        parts["methods"] = METHODS_VERSION
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# Bumped when quantlab's methods produce different tensors for the same settings, so that stored
# results of the older code are not taken for the current code's (2: the faster GPTQ/AWQ arithmetic
# of 2026-11-28, equal to ~1e-7 but not bit for bit, and AWQ's screened search; 3: GPTQ's
# triangular inverse from matrix products, equal to ~5e-8).
METHODS_VERSION = 3


def _eval_config(config: RunConfig, data_root, notes: list[str]):
    """The run's evaluation, less the lm-eval tasks whose files are not there when the run
    allows falling back (each skipped task noted)."""
    from quantlab.eval.lmeval import LOCAL_TASKS

    e = config.evaluation
    if not e.allow_fallback:
        return e
    root = settings.data_root(data_root)
    tasks = list(e.tasks)
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
    return dataclasses.replace(e, tasks=tuple(tasks))


def add_card_evaluation(target: str, metrics, reference: str | None) -> None:
    """Put the measured numbers into the model card of the artifact at ``target`` (if any)."""
    from quantlab.formats import detect
    from quantlab.formats.card import add_evaluation
    from quantlab.workbench.produce import evaluation_lines

    found = detect(target)
    if found is not None:
        add_evaluation(found[0].card_path(Path(target)), evaluation_lines(metrics, reference))


def make_executor(executor: str, *, address: str | None = None, resources=None):
    """The executor named ``executor``: ``local`` or ``ray`` (with its address and resources)."""
    from quantlab.workbench.executors import LocalExecutor

    if executor == "local":
        return LocalExecutor()
    if executor == "ray":
        from quantlab.workbench.ray_executor import RayExecutor

        return RayExecutor(address, resources)
    raise QuantlabError(f"unknown executor {executor!r}; use local or ray")


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
    wait: bool = False,
) -> SweepReport:
    """Run every variant of ``config`` not yet in the store; see the module docstring.

    ``progress_file``: a JSON file rewritten (atomically) at every stage - run, variant i of N,
    stage, seconds elapsed, estimated seconds left - for front ends such as the app.
    ``executor``: ``local`` (one variant after another in this process) or ``ray`` (each
    variant's quantization and evaluation as Ray tasks on the cluster at ``address``, rows still
    written here; `quantlab.workbench.ray_executor`), with ``resources`` (a `TaskResources`).
    The run holds its store's lock for the run's name (`ResultStore.run_lock`): a second sweep of
    the same run fails at once naming the first, or with ``wait`` waits for it; rows stored by
    another run meanwhile count as done."""
    from quantlab.console import progress, say
    from quantlab.fingerprint import content_sha256
    from quantlab.models import resolve_model
    from quantlab.workbench.executors import SweepJob
    from quantlab.workbench.produce import preflight

    log = log or say
    runner = make_executor(executor, address=address, resources=resources)
    start = time.perf_counter()
    model_ref = resolve_model(config.model, cache=cache)
    preflight(config.variants, model_ref)
    model_sha = content_sha256(model_ref.path)
    out_root = Path(output or config.output) / config.name
    notes: list[str] = []
    eval_config = _eval_config(config, data_root, notes)
    for note in notes:
        log(f"note: {note}")
    done, skipped = [], []
    with (
        ResultStore(store_path or config.store) as store,
        store.run_lock(config.name, wait=wait, log=log),
    ):
        keys = {v.name: result_key(v, config, model_sha, data_root) for v in config.variants}

        def stored(variant: Variant) -> bool:
            return store.has(keys[variant.name])

        job = SweepJob(config, model_ref, eval_config, out_root, data_root, cache, log, stored)
        config_json = json.dumps(config.to_dict())
        run_id = store.start_run(config.name, config.model, config_json, config.sha256())
        todo = [v for v in config.variants if not stored(v)]
        skipped = [v.name for v in config.variants if v not in todo]
        if skipped:
            log(f"already in {store.path}: {', '.join(skipped)}")
        display = progress(len(todo), config.name)
        sweep_start = time.perf_counter()

        def stage(i: int, name: str, what: str) -> None:
            display.stage(i, name, what)
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

        def record(outcome) -> None:
            variant, timings = outcome.variant, outcome.timings
            display.advance()
            if stored(variant):  # another run stored it while this one worked on it
                log(f"{variant.name}: stored meanwhile by another run; kept that row")
                return
            store.record(
                key=keys[variant.name],
                run_id=run_id,
                run_name=config.name,
                variant=variant,
                model=config.model,
                model_sha256=model_sha,
                calibration_sha256=outcome.calibration_sha256,
                config_sha256=config.sha256(),
                artifact=outcome.produced.target,
                fmt=outcome.produced.format,
                metrics=outcome.metrics,
                versions=_versions(),
                timings=timings,
            )
            if not variant.is_reference:  # the artifact's card gets the measured numbers
                add_card_evaluation(outcome.produced.target, outcome.metrics, config.model)
            done.append(variant.name)
            log(
                f"{variant.name}: quantize {timings['quantize_s']:.1f} s, "
                f"evaluate {timings['evaluate_s']:.1f} s"
            )

        try:
            runner.run(job, todo, record, stage)
        finally:
            display.close()
        store.finish_run(run_id)
        stage(len(todo) + 1, "", "done")
        skipped = [v.name for v in config.variants if v.name not in done and stored(v)]
    if not done and not skipped:
        raise QuantlabError("nothing to run")
    return SweepReport(run_id, done, skipped, keys, notes, time.perf_counter() - start)
