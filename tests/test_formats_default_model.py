"""Checkpoints of the embedded default model: the format loses nothing, measured by the harness."""

import json

import pytest

from quantlab.eval.harness import EvalConfig, evaluate
from quantlab.eval.perplexity import PerplexityConfig
from quantlab.formats import write_artifact
from quantlab.formats.native import write_native
from quantlab.methods.rtn import RTNConfig
from quantlab.methods.runner import quantize_model
from quantlab.models import load_model

pytestmark = pytest.mark.slow


def test_gptq_checkpoint_perplexity_equals_in_memory_weights(default_model, data_root, tmp_path):
    """576 is not a multiple of 128: the GPTQ checkpoint keeps the short last group, and the
    loaded checkpoint measures exactly what the same QuantizedWeights measure in memory."""
    model = load_model(default_model)
    config = RTNConfig(bits=4, group_size=128, sym=True)
    result = quantize_model(model, default_model.folder.arch, "rtn", config, None, progress=False)
    native = write_native(result, default_model, tmp_path / "native")
    # keep_dtype: the embedding and norms in the source's fp32, as the native artifact has them
    ckpt = write_artifact(
        "gptq", tmp_path / "gptq", default_model, result=result, model=model, keep_dtype=True
    )
    manifest = json.loads((ckpt / "quantlab_manifest.json").read_text())
    assert any("not multiples of group size 128" in note for note in manifest["notes"])
    ppl = PerplexityConfig(corpus="wikitext2", split="test", max_tokens=4096)
    cfg = EvalConfig(perplexity=(ppl,))
    a = evaluate(str(native), cfg, data_root=data_root)
    b = evaluate(str(ckpt), cfg, data_root=data_root)
    assert a.perplexity[0].windows_sha256 == b.perplexity[0].windows_sha256
    assert a.perplexity[0].ppl == b.perplexity[0].ppl
    assert 20 < b.perplexity[0].ppl < 40
    # every original parameter is counted once (packed codes unpacked to their count), and the
    # size is the 4-bit linears plus the fp32 embedding / norms: about 10 bits per parameter
    assert b.size.weights == sum(p.numel() for p in model.parameters())
    assert 9 < b.size.bits_per_weight < 11
