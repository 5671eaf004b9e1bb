"""lm-eval accuracy tasks, offline from the local data root, on any model quantlab can run.

When the data root (``QUANTLAB_DATA``) holds the task files, each task below is built as an
lm-eval task config (a dict, no YAML) over a JSONL file converted once into the cache, with the
same prompt, choices, target and metrics as lm-eval's official task of that name. Any other task
name is handed to lm-eval unchanged (it then downloads from the Hub when online).

Differences forced by the local files (see the data folder's SOURCES.md):
- ``winogrande``: the local file stores lm-eval's partial-scoring form (two contexts, one
  continuation, gold), which is exactly what the official task scores; nothing differs.
- ``hellaswag``: the local file is llama.cpp's text form: the context is
  ``activity_label + ": " + ctx`` after the same bracket clean-up as lm-eval's ``preprocess``, but
  ``ctx_b`` is not capitalised as lm-eval does, so scores can differ slightly from the official
  task.
- ``piqa``, ``arc_easy``, ``arc_challenge``, ``lambada_openai``: the same documents and fields as
  the Hub datasets (ARC from the original AI2 files, reshaped to the HF schema); no difference.

Models: `hf_lm` wraps an in-memory transformers model in lm-eval's ``HFLM``; `LlamaCppLM` is a
small ``LM`` subclass over `LlamaCppRunner` that encodes context/continuation pairs as ``HFLM``
does, so GGUF and transformers results are comparable.
"""

from __future__ import annotations

import bz2
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantlab import settings
from quantlab.atomic import atomic_directory
from quantlab.errors import DataError, MissingDependencyError

CONVERSION_VERSION = 1


def _multiple_choice(doc_to_text, doc_to_target, doc_to_choice, norm: bool = True) -> dict:
    metrics = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
    if norm:
        metrics.append({"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True})
    return {
        "output_type": "multiple_choice",
        "doc_to_text": doc_to_text,
        "doc_to_target": doc_to_target,
        "doc_to_choice": doc_to_choice,
        "metric_list": metrics,
    }


# --- converters: local files -> documents in the Hub dataset's schema ---------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _piqa(root: Path) -> list[dict]:
    docs = _read_jsonl(root / "piqa" / "valid.jsonl")
    labels = (root / "piqa" / "valid-labels.lst").read_text().split()
    if len(labels) != len(docs):
        raise DataError(f"piqa: {len(docs)} questions but {len(labels)} labels")
    return [
        {"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(lab)}
        for d, lab in zip(docs, labels, strict=True)
    ]


def _arc(name: str) -> Callable[[Path], list[dict]]:
    def convert(root: Path) -> list[dict]:
        out = []
        for d in _read_jsonl(root / "arc" / f"ARC-{name}-Test.jsonl"):
            choices = d["question"]["choices"]
            out.append(
                {
                    "id": d["id"],
                    "question": d["question"]["stem"],
                    "choices": {
                        "text": [c["text"] for c in choices],
                        "label": [c["label"] for c in choices],
                    },
                    "answerKey": d["answerKey"],
                }
            )
        return out

    return convert


def _lambada(root: Path) -> list[dict]:
    return _read_jsonl(root / "lambada" / "lambada_test.jsonl")


def _winogrande(root: Path) -> list[dict]:
    return _read_jsonl(root / "winogrande" / "winogrande_xl_dev.llm-foundry.jsonl")


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval's hellaswag preprocess(), applied to the (already mostly cleaned) local text
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(root: Path) -> list[dict]:
    with bz2.open(root / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"hellaswag: {len(lines)} lines is not a multiple of 6")
    docs = []
    for i in range(0, len(lines), 6):
        ctx, label, endings = lines[i], lines[i + 1], lines[i + 2 : i + 6]
        docs.append(
            {
                "query": _hellaswag_preprocess(ctx),
                "choices": [_hellaswag_preprocess(e) for e in endings],
                "label": int(label),
            }
        )
    return docs


def _winogrande_gold(doc: dict) -> int:  # an int makes lm-eval score partial contexts
    return int(doc["gold"])


@dataclass(frozen=True)
class LocalTask:
    """One offline task: how to convert the local files and the lm-eval task config."""

    name: str
    files: tuple[str, ...]  # relative to the data root (what must exist)
    convert: Callable[[Path], list[dict]]
    config: dict
    note: str = ""


LOCAL_TASKS: dict[str, LocalTask] = {
    t.name: t
    for t in (
        LocalTask(
            "piqa",
            ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
            _piqa,
            _multiple_choice("Question: {{goal}}\nAnswer:", "label", "{{[sol1, sol2]}}"),
        ),
        LocalTask(
            "arc_easy",
            ("arc/ARC-Easy-Test.jsonl",),
            _arc("Easy"),
            _multiple_choice(
                "Question: {{question}}\nAnswer:",
                "{{choices.label.index(answerKey)}}",
                "{{choices.text}}",
            ),
        ),
        LocalTask(
            "arc_challenge",
            ("arc/ARC-Challenge-Test.jsonl",),
            _arc("Challenge"),
            _multiple_choice(
                "Question: {{question}}\nAnswer:",
                "{{choices.label.index(answerKey)}}",
                "{{choices.text}}",
            ),
        ),
        LocalTask(
            "lambada_openai",
            ("lambada/lambada_test.jsonl",),
            _lambada,
            {
                "output_type": "loglikelihood",
                "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
                "doc_to_target": "{{' '+text.split(' ')[-1]}}",
                "metric_list": [
                    {
                        "metric": "perplexity",
                        "aggregation": "perplexity",
                        "higher_is_better": False,
                    },
                    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                ],
            },
        ),
        LocalTask(
            "winogrande",
            ("winogrande/winogrande_xl_dev.llm-foundry.jsonl",),
            _winogrande,
            _multiple_choice(
                _winogrande_gold, "{{continuation}}", "{{context_options}}", norm=False
            ),
        ),
        LocalTask(
            "hellaswag",
            ("hellaswag/hellaswag_val_full.txt.bz2",),
            _hellaswag,
            _multiple_choice("{{query}}", "{{label}}", "choices"),
            note="llama.cpp text form: ctx_b not capitalised as in lm-eval",
        ),
    )
}


def _converted(task: LocalTask, root: Path, cache: Path) -> Path:
    """The task's documents as JSONL in the cache (converted once, atomically)."""
    folder = cache / "lm-eval" / f"{task.name}-v{CONVERSION_VERSION}"
    path = folder / "test.jsonl"
    if not path.is_file():
        docs = task.convert(root)
        lines = "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)
        with atomic_directory(folder) as tmp:
            (tmp / "test.jsonl").write_text(lines, encoding="utf-8")
    return path


def task_configs(
    names: list[str], *, data_root: str | Path | None = None, cache: str | Path | None = None
) -> list[str | dict]:
    """lm-eval task entries: local dict configs where the data root has the files, else names."""
    root = settings.data_root(data_root)
    cache_root = settings.cache_dir(cache)
    out: list[str | dict] = []
    for name in names:
        task = LOCAL_TASKS.get(name)
        if task is None or root is None:
            out.append(name)
            continue
        missing = [f for f in task.files if not (root / f).is_file()]
        if missing:
            raise DataError(f"task {name}: {', '.join(missing)} missing under {root}")
        path = _converted(task, root, cache_root)
        out.append(
            {
                "task": name,
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(path)}},
                "test_split": "test",
                "metadata": {"version": 1.0, "quantlab_source": str(root), "note": task.note},
                **task.config,
            }
        )
    return out


@dataclass(frozen=True)
class TaskResult:
    task: str
    metric: str  # "acc", "acc_norm", "perplexity"
    value: float
    stderr: float | None
    samples: int  # documents evaluated (after --limit)
    source: str  # "local:<data root>" or "lm-eval (Hub)"


def run_lm_eval(
    lm,
    tasks: list[str],
    *,
    limit: int | None = None,
    data_root=None,
    cache=None,
    batch_size: int = 8,
) -> list[TaskResult]:
    """Run lm-eval on ``lm`` (an lm-eval ``LM``); one `TaskResult` per task and metric."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        msg = "accuracy tasks need lm-eval: pip install 'quantlab[eval]'"
        raise MissingDependencyError(msg) from None
    configs = task_configs(tasks, data_root=data_root, cache=cache)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=configs,
        limit=limit,
        batch_size=batch_size,
        task_manager=TaskManager(),
        log_samples=False,
        bootstrap_iters=1000,
        verbosity="ERROR",
    )
    results = []
    for config in configs:
        name = config if isinstance(config, str) else config["task"]
        source = (
            "lm-eval (Hub)" if isinstance(config, str) else f"local:{settings.data_root(data_root)}"
        )
        metrics = out["results"][name]
        n = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            bookkeeping = metric.endswith("_stderr") or metric in ("alias", "sample_len")
            if bookkeeping or not isinstance(value, float | int):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            stderr = float(stderr) if isinstance(stderr, float | int) else None
            results.append(TaskResult(name, metric, float(value), stderr, n, source))
    return results


def hf_lm(model, tokenizer, batch_size: int = 8):
    """lm-eval's ``HFLM`` around an in-memory transformers model."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def llama_cpp_lm(runner):
    """An lm-eval ``LM`` over a `LlamaCppRunner` (loglikelihood, rolling, greedy generation)."""
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from quantlab.eval.perplexity import log_softmax

    class LlamaCppLM(LM):
        def __init__(self):
            super().__init__()
            self.runner = runner
            self.max_length = runner.n_ctx
            self.prefix = runner.bos_id if runner.bos_id is not None else 0

        def _encode(self, text: str) -> list[int]:
            return runner.tokenize(text, add_special=False).tolist()

        def _encode_pair(self, context: str, continuation: str):
            # as HFLM: trailing spaces of the context belong to the continuation
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
            whole, ctx = self._encode(context + continuation), self._encode(context)
            return ctx, whole[len(ctx) :]

        def _score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
            ids = (ctx + cont)[-(self.max_length + 1) :][:-1] if cont else ctx
            logprobs = log_softmax(runner.logits(np.asarray(ids))[-len(cont) :])
            picked = logprobs[np.arange(len(cont)), cont]
            return float(picked.sum()), bool((logprobs.argmax(axis=1) == cont).all())

        def loglikelihood(self, requests):
            out = []
            for req in requests:
                context, continuation = req.args
                ctx, cont = (
                    self._encode_pair(context, continuation)
                    if context
                    else ([self.prefix], self._encode(continuation))
                )
                out.append(self._score(ctx, cont))
            return out

        def loglikelihood_rolling(self, requests):
            out = []
            for req in requests:
                tokens = self._encode(req.args[0])
                windows = get_rolling_token_windows(tokens, self.prefix, self.max_length, 1)
                total = 0.0
                for ctx, cont in map(make_disjoint_window, windows):
                    total += self._score(list(ctx), list(cont))[0]
                out.append(total)
            return out

        def generate_until(self, requests):
            out = []
            for req in requests:
                context, kwargs = req.args
                until = kwargs.get("until") or []
                max_new = int(kwargs.get("max_gen_toks", 256))
                ids = self._encode(context)[-(self.max_length - max_new) :]
                text = runner.generate_text(ids, max_new)
                for stop in until if isinstance(until, list) else [until]:
                    text = text.split(stop)[0]
                out.append(text)
            return out

    return LlamaCppLM()
