"""Executors: where a sweep's variants are quantized and evaluated.

An executor takes the variants left to do (`SweepJob` says everything they share) and, for each,
makes its artifact (`quantize_variant`), evaluates it from disk (`evaluate_variant`) and hands the
outcome (`VariantDone`) back to the sweep, which alone writes the results store. Two executors
share that interface:

- `LocalExecutor`: one variant after another in this process (`quantlab run`);
- `quantlab.workbench.ray_executor.RayExecutor`: each variant's quantization and evaluation as
  Ray tasks on a cluster (`quantlab run --executor ray`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from quantlab.workbench.config import RunConfig, Variant
from quantlab.workbench.produce import (
    Produced,
    SharedInputs,
    artifact_path,
    produce,
    remove_artifact,
)


def silent(_message: str) -> None:
    """A log that says nothing."""


def never(_variant) -> bool:
    """No variant is stored yet (the default of `SweepJob.stored`)."""
    return False


@dataclass
class SweepJob:
    """What every variant of a sweep needs."""

    config: RunConfig
    model_ref: object  # the resolved model
    eval_config: object  # the EvalConfig every artifact is measured with
    out_root: Path  # artifacts go to <out_root>/<variant name>
    data_root: object = None
    cache: object = None
    log: Callable[[str], None] = silent
    stored: Callable[[Variant], bool] = never  # whether a variant's row is in the store now

    def shared_inputs(self) -> SharedInputs:
        return SharedInputs(
            self.model_ref,
            self.config.calibration,
            data_root=self.data_root,
            cache=self.cache,
            log=self.log,
            device=self.config.device,
            offload=self.config.offload,
        )


@dataclass
class VariantDone:
    """One variant made and measured, ready to be recorded."""

    variant: Variant
    produced: Produced
    metrics: object  # Metrics
    timings: dict[str, float]
    calibration_sha256: str | None


Stage = Callable[[int, str, str], None]  # (variant index from 1, variant name, what it does)


class Executor(Protocol):
    def run(
        self, job: SweepJob, todo: list[Variant], done: Callable[[VariantDone], None], stage: Stage
    ) -> None: ...


def quantize_variant(job: SweepJob, variant: Variant, shared: SharedInputs) -> Produced:
    """Make ``variant``'s artifact, removing first whatever a killed earlier attempt left."""
    from quantlab.formats import get_format

    out = artifact_path(job.out_root, variant)
    remove_artifact(out, get_format(variant.format) if variant.format else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    return produce(variant, shared, out)


def evaluate_variant(job: SweepJob, produced: Produced):
    """Measure an artifact from disk; returns ``(metrics, seconds)``."""
    from quantlab.eval.harness import evaluate

    start = time.perf_counter()
    metrics = evaluate(
        produced.target,
        job.eval_config,
        reference=job.config.model,
        data_root=job.data_root,
        cache=job.cache,
        device=job.config.device,
    )
    _plan_beside_measured(job, metrics)
    return metrics, time.perf_counter() - start


def _plan_beside_measured(job: SweepJob, metrics) -> None:
    """Put the planner's estimate beside a measured VRAM (a GPU evaluation), so the report can
    check the planner against reality: the artifact's size on disk + the KV cache and compute
    buffer of the evaluation's longest window, batch 1."""
    from quantlab.workbench.plan import planned_vram

    memory = metrics.memory
    if memory is None or not memory.vram_bytes or metrics.size is None:
        return
    context = max([p.n_ctx for p in job.eval_config.perplexity] or [2048])
    if job.eval_config.speed:
        speed = job.eval_config.speed_prompt_tokens + job.eval_config.speed_decode_tokens
        context = max(context, speed)
    try:
        memory.planned_bytes = planned_vram(
            job.model_ref.folder.config, metrics.size.bytes_on_disk, context
        )
    except Exception:  # noqa: BLE001 - a config the planner cannot read: no estimate, no check
        memory.planned_bytes = None


def timings(produced: Produced, metrics, evaluate_s: float) -> dict[str, float]:
    out = {"quantize_s": produced.seconds, "evaluate_s": evaluate_s}
    out.update({f"eval:{k}": v for k, v in metrics.stage_seconds.items()})
    return out


class LocalExecutor:
    """One variant after another, in this process."""

    def run(self, job: SweepJob, todo, done, stage) -> None:
        shared = job.shared_inputs()
        for i, variant in enumerate(todo, 1):
            if job.stored(variant):  # another run (waited for, or in parallel) stored it
                job.log(f"{variant.name}: already stored by another run")
                continue
            stage(i, variant.name, "quantize")
            produced = quantize_variant(job, variant, shared)
            stage(i, variant.name, "evaluate")
            metrics, seconds = evaluate_variant(job, produced)
            calib = shared.calibration()[1].sha256 if variant.needs_calibration else None
            done(
                VariantDone(variant, produced, metrics, timings(produced, metrics, seconds), calib)
            )
