"""Offline lm-eval tasks: local files converted to the official schemas, and a real run."""

import importlib.util

import pytest

from quantlab.eval.lmeval import LOCAL_TASKS, run_lm_eval, task_configs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm-eval")

EXPECTED_DOCS = {
    "piqa": 1838,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "lambada_openai": 5153,
    "winogrande": 1267,
    "hellaswag": 10042,
}


@pytest.mark.parametrize("name", sorted(LOCAL_TASKS))
def test_local_task_conversion(name, data_root):
    docs = LOCAL_TASKS[name].convert(data_root)
    assert len(docs) == EXPECTED_DOCS[name]
    first = docs[0]
    if name.startswith("arc"):
        assert first["answerKey"] in first["choices"]["label"]
    elif name == "piqa":
        assert first["label"] in (0, 1) and first["goal"]
    elif name == "hellaswag":
        assert len(first["choices"]) == 4 and first["label"] in range(4)
    elif name == "winogrande":
        assert len(first["context_options"]) == 2 and first["gold"] in (0, 1)
    else:
        assert first["text"].count(" ") > 5


def test_unknown_or_offline_names_pass_through(tmp_path, monkeypatch):
    monkeypatch.delenv("QUANTLAB_DATA", raising=False)
    assert task_configs(["piqa", "mmlu"], cache=tmp_path) == ["piqa", "mmlu"]


def test_lm_eval_runs_offline_on_a_tiny_model(tiny_models, data_root, tmp_path):
    from quantlab.eval.lmeval import hf_lm
    from quantlab.models import load_model, load_tokenizer, resolve_model

    model = resolve_model(str(tiny_models["tiny-llama"]))
    lm = hf_lm(load_model(model), load_tokenizer(model), batch_size=4)
    results = run_lm_eval(lm, ["piqa", "winogrande"], limit=4, data_root=data_root, cache=tmp_path)
    got = {(r.task, r.metric): r for r in results}
    assert set(got) == {("piqa", "acc"), ("piqa", "acc_norm"), ("winogrande", "acc")}
    assert all(0.0 <= r.value <= 1.0 and r.samples == 4 for r in results)
    assert all(r.source.startswith("local:") for r in results)
