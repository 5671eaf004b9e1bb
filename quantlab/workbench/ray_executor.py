"""`quantlab run CONFIG --executor ray`: the sweep's variants as Ray tasks.

Ray (an existing distributed engine) schedules; quantlab only says what to run and what each task
needs. For a run config with N variants left to do, the driver submits:

- one *shared* task (if any variant needs calibration): draws the calibration set once and, if a
  GGUF variant asks for it, measures the importance matrix once; its result lives in Ray's object
  store and every variant task receives it from there (no variant recomputes it);
- per variant, a *quantize* task (writes the artifact under the run's output folder, atomically;
  it first removes whatever a killed earlier attempt left) and an *evaluate* task that Ray starts
  when the quantize task's result exists;
- each with declared resources (`TaskResources`: CPUs, GPUs, memory).

The driver alone writes the results store, one row per variant as its evaluation returns, so rows
are only ever complete and never written twice. Tasks whose worker dies (killed, out of memory,
node lost) are retried by Ray (``max_retries``); a task that raises (bad input) is not retried:
the sweep stops with that error and the rows already recorded stay (rerun to resume, as with the
local executor).

On a cluster every node must see the same paths: the model folder, the run's output folder, the
data root and the cache (shared storage), and have quantlab installed in the same environment.
See docs/SCALE.md.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from quantlab.errors import QuantlabError
from quantlab.workbench.executors import (
    VariantDone,
    evaluate_variant,
    never,
    quantize_variant,
    silent,
    timings,
)

GiB = 1024**3
ENV_VARS = (
    "QUANTLAB_DATA",
    "QUANTLAB_CACHE",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HOME",
    "TRITON_INTERPRET",
)


@dataclass(frozen=True)
class TaskResources:
    """What each quantize/evaluate task declares to Ray's scheduler."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_bytes: int | None = None  # None: estimated from the model's size
    max_retries: int = 3  # attempts after a worker dies (not after an error raised by the task)


def estimate_task_memory(model_bytes: int) -> int:
    """Memory to declare for one variant task: the model loaded in float32 (weights on disk may
    be 16-bit), a block's compute copy and the quantized copy, evaluation's reference and the
    process (1 GiB)."""
    return int(3 * 2 * model_bytes + GiB)


# -- what runs on the workers (module level, so Ray can import them there) ---------------------


@dataclass(frozen=True)
class CorpusLabel:
    """What a variant needs of the calibration corpus besides its ids: its label (the corpus's
    documents stay out of the object store)."""

    label: str


def shared_task(job, need_imatrix: bool):
    """Calibration set (and importance matrix) for every variant of the run."""
    shared = job.shared_inputs()
    corpus, calibration = shared.calibration()
    imatrix = shared.imatrix() if need_imatrix else None
    return CorpusLabel(corpus.label), calibration, imatrix


def quantize_task(job, variant, shared_values):
    """Quantize and write one variant (removing what an attempt killed before this one left)."""
    shared = job.shared_inputs()
    if shared_values is not None:
        shared.provide(*shared_values)
    return quantize_variant(job, variant, shared)


def evaluate_task(produced, job):
    """Evaluate one artifact (the quantize task's result); returns (metrics, seconds)."""
    return evaluate_variant(job, produced)


# -- the driver -----------------------------------------------------------------------------------


def connect(address: str | None):
    """Use the Ray instance this process already joined, or join ``address`` (``auto``: the
    cluster started on this node with ``ray start``), or start a local one."""
    try:
        import ray
    except ImportError:
        raise QuantlabError(
            "--executor ray needs Ray: pip install 'quantlab[ray]' (or pip install ray)"
        ) from None
    if ray.is_initialized():
        return ray
    env = {k: os.environ[k] for k in ENV_VARS if k in os.environ}
    try:
        ray.init(
            address=address,
            runtime_env={"env_vars": env} if env else None,
            include_dashboard=False,
            log_to_driver=True,
        )
    except ConnectionError as exc:
        raise QuantlabError(f"cannot reach the Ray cluster at {address}: {exc}") from None
    return ray


def _largest_node(ray, resource: str) -> float:
    sizes = [n["Resources"].get(resource, 0) for n in ray.nodes() if n.get("Alive")]
    return max(sizes, default=0)


class RayExecutor:
    """Each variant's quantization and evaluation as Ray tasks on the cluster at ``address``
    (``auto``: the one started on this node; None: a local one), each declaring ``resources``."""

    def __init__(self, address: str | None = None, resources: TaskResources | None = None):
        self.address, self.resources = address, resources or TaskResources()

    def run(self, job, todo, done, stage) -> None:
        """Run ``todo`` on Ray; ``done(VariantDone)`` is called here, in the driver, as each
        variant's evaluation returns."""
        ray = connect(self.address)
        # what the tasks get: nothing of the driver's (its log, its store)
        job = dataclasses.replace(job, log=silent, stored=never)
        resources = self.resources
        model_ref = job.model_ref
        weights = sum(f.stat().st_size for f in model_ref.folder.weight_files)
        memory = resources.memory_bytes or estimate_task_memory(weights)
        largest = _largest_node(ray, "memory")
        if largest and memory > largest:
            raise QuantlabError(
                f"each variant task needs about {memory / GiB:.1f} GiB but the largest Ray node "
                f"offers {largest / GiB:.1f} GiB; pass --task-memory to declare less"
            )
        # Ray would leave a task no node can ever hold pending forever
        for resource, wanted, option in (
            ("CPU", resources.cpus, "--task-cpus"),
            ("GPU", resources.gpus, "--task-gpus"),
        ):
            have = _largest_node(ray, resource)
            if wanted > have:
                raise QuantlabError(
                    f"each variant task declares {wanted:g} {resource}(s) but the largest Ray "
                    f"node has {have:g}; lower {option}"
                )
        options = {
            "num_cpus": resources.cpus,
            "num_gpus": resources.gpus,
            "memory": memory,
            "max_retries": resources.max_retries,
        }
        need_calibration = [v for v in todo if v.needs_calibration]
        need_imatrix = any(v.method is None and v.imatrix for v in todo)
        shared_ref = None
        if need_calibration:
            shared_ref = (
                ray.remote(shared_task)
                .options(name="quantlab-shared", **options)
                .remote(job, need_imatrix)
            )
        quantize = ray.remote(quantize_task)
        evaluate = ray.remote(evaluate_task)
        pending = {}
        for variant in todo:
            q = quantize.options(name=f"quantize:{variant.name}", **options).remote(
                job, variant, shared_ref if variant.needs_calibration else None
            )
            e = evaluate.options(name=f"evaluate:{variant.name}", **options).remote(q, job)
            pending[e] = (variant, q)
        calib_sha = None
        finished = 0
        stage(1, "", f"{len(todo)} variants on Ray")
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    variant, q = pending.pop(ref)
                    try:
                        metrics, evaluate_s = ray.get(ref)
                        produced = ray.get(q)
                    except ray.exceptions.RayError as exc:  # raised by the task, or retries spent
                        cause = getattr(exc, "cause", None)
                        cause = cause if isinstance(cause, Exception) else exc
                        raise QuantlabError(
                            f"variant {variant.name} failed on Ray: {cause}"
                        ) from None
                    if variant.needs_calibration and calib_sha is None:
                        calib_sha = ray.get(shared_ref)[1].sha256
                    sha = calib_sha if variant.needs_calibration else None
                    done(
                        VariantDone(
                            variant, produced, metrics, timings(produced, metrics, evaluate_s), sha
                        )
                    )
                    finished += 1
                    stage(min(finished + 1, len(todo)), variant.name, f"{len(pending)} left on Ray")
        finally:
            if shared_ref is not None:
                ray.cancel(shared_ref, force=True)  # a no-op once it has finished
            for ref in pending:  # an error stops the sweep: do not leave work running
                ray.cancel(ref, force=True)
            for _, q in pending.values():
                ray.cancel(q, force=True)
