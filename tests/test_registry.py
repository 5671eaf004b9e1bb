"""Registry-driven tests: every registered method on every tiny architecture, every format's
round trip, every method x format pair a format accepts, and a toy method and a toy format,
registered from this file alone, through ``quantlab quantize`` and ``quantlab run``.

A method or format added to quantlab is covered here without anyone writing a test for it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from quantlab.cli import main
from quantlab.data import CalibrationConfig, calibration_for
from quantlab.formats import (
    ArtifactSize,
    Format,
    LoadedCheckpoint,
    detect,
    formats,
    get_format,
    load,
    register_format,
    unregister_format,
)
from quantlab.methods import get_method, method_names, register_method, unregister_method
from quantlab.methods.runner import quantize_model
from quantlab.models import load_model, resolve_model
from quantlab.primitives import quantize_rtn
from quantlab.workbench.config import parse_variant
from quantlab.workbench.produce import SharedInputs, linear_shapes, produce
from quantlab.workbench.store import ResultStore

ARCHS = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]
# settings tried, in order, until a format accepts one (what a format holds differs)
CANDIDATES = (
    {"bits": 4, "group_size": 32, "sym": True},
    {"bits": 4, "group_size": 32, "sym": False},
    {"bits": 8, "group_size": 32, "sym": True},
)


def _config(method: str, **settings):
    """``method``'s config with those of ``settings`` it has (a registered method may have fewer
    fields)."""
    spec = get_method(method)
    names = {f.name for f in spec.fields()}
    return spec.config_cls(**{k: v for k, v in settings.items() if k in names})


@pytest.fixture(scope="module")
def calibration(tiny_models):
    ref = resolve_model(str(tiny_models["tiny-llama"]))
    cfg = CalibrationConfig(corpus="pydoc", split="all", n_samples=4, seq_len=64)
    return calibration_for(ref, cfg)[1]


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model(ids).logits


# -- methods -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", method_names())
def test_every_method_quantizes_every_linear_of_every_architecture(
    tiny_models, calibration, arch, method
):
    """Every linear quantized, the model left holding exactly the dequantized weights, and
    only the linears (and what the method says it changed) touched."""
    model_ref = resolve_model(str(tiny_models[arch]))
    model = load_model(model_ref)
    spec = model_ref.folder.arch
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = _config(method, bits=4, group_size=64)
    result = quantize_model(model, spec, method, config, calibration, progress=False)
    expected = {f"{spec.blocks}.{i}.{lin}" for i in range(2) for lin in spec.linears}
    assert set(result.weights) == expected and result.linears == len(expected)
    assert set(result.imatrix) == expected and result.imatrix_tokens == 4 * 64
    for full, qw in result.weights.items():
        torch.testing.assert_close(model.get_parameter(f"{full}.weight"), qw.dequantize())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{n}.weight" for n in expected} | set(result.modified)


# -- formats -------------------------------------------------------------------------------------


def _accepted(fmt, method: str, shapes) -> object | None:
    """The first candidate config ``fmt`` accepts for ``method`` on these shapes, or None."""
    for settings in CANDIDATES:
        config = _config(method, **settings)
        options = fmt.options(**fmt.options_for(config))
        if fmt.accepts(method, config, options) is None and not fmt.preflight(
            config, options, shapes
        ):
            return config
    return None


def _keep(fmt) -> dict:
    """The option that keeps the source's dtype for unquantized tensors, where a format has one
    (its default, 16 bits, rounds the embeddings: the logits would differ from memory's)."""
    names = {f.name for f in dataclasses.fields(fmt.options)}
    return {"keep_dtype": True} if "keep_dtype" in names else {}


def _writable_formats():
    """Every writable format; those run in a runtime of their own (GGUF) need a model whose
    tokenizer that runtime's converter knows (the tiny models' byte tokenizer it does not): the
    tiny Llama with the default model's tokenizer (slow: it needs the default model)."""
    return [
        pytest.param(f.name, marks=pytest.mark.slow) if f.runtime != "transformers" else f.name
        for f in formats()
        if f.writable
    ]


@pytest.fixture(scope="session")
def tiny_with_real_tokenizer(tmp_path_factory):
    """A seeded random Llama (hidden 64, 2 blocks) with SmolLM2's tokenizer and vocabulary."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    source = resolve_model("smollm2-135m")
    dest = tmp_path_factory.mktemp("tiny-real-tokenizer")
    base = json.loads((source.path / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=base["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=base["rms_norm_eps"],
        tie_word_embeddings=True,
        bos_token_id=base["bos_token_id"],
        eos_token_id=base["eos_token_id"],
        pad_token_id=base["pad_token_id"],
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source.path / name).is_file():
            shutil.copy(source.path / name, dest / name)
    return dest


def _source(fmt, request):
    tiny_models = request.getfixturevalue("tiny_models")
    if fmt.runtime != "transformers":
        return resolve_model(str(request.getfixturevalue("tiny_with_real_tokenizer")))
    return resolve_model(str(tiny_models["tiny-llama"]))


@pytest.mark.parametrize("fmt_name", _writable_formats())
def test_every_format_round_trips_to_the_same_logits(request, tmp_path, fmt_name):
    """write -> detect -> load: the artifact computes what the quantized model in memory does
    (formats run in their own runtime are loaded into transformers here)."""
    from quantlab.formats import write_artifact

    fmt = get_format(fmt_name)
    source = _source(fmt, request)
    config = _accepted(fmt, "rtn", linear_shapes(source))
    assert config is not None, f"{fmt_name} accepts none of {CANDIDATES}"
    model = load_model(source)
    result = quantize_model(model, source.folder.arch, "rtn", config, progress=False)
    out = tmp_path / f"artifact{fmt.suffix}"
    options = {**fmt.options_for(config), **_keep(fmt)}
    path = write_artifact(fmt_name, out, source, result=result, model=model, **options)
    found = detect(path)
    assert found is not None and found[0] is fmt
    loaded, checkpoint = load(path)
    assert checkpoint.format == fmt.label(found[1])
    assert torch.equal(_logits(loaded), _logits(model)), fmt_name
    size = fmt.size(path)
    assert size.tensor_bytes > 0 and size.weights >= sum(p.numel() for p in model.parameters()) // 2
    reports = []
    fmt.verify(path, lambda check, outcome: reports.append(check))
    assert "loads" in reports


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("fmt_name", _writable_formats())
def test_every_accepted_method_and_format_pair_is_made_by_the_one_quantize_path(
    request, tmp_path, method, fmt_name
):
    """The pair through `produce` (what `quantlab quantize` and `quantlab run` call), loaded
    back: the same logits as the method's result applied in memory. A pair the format refuses is
    refused by the variant's validation, with the format's reason."""
    from quantlab.errors import ConfigError

    fmt = get_format(fmt_name)
    source = _source(fmt, request)
    config = _accepted(fmt, method, linear_shapes(source))
    if config is None:  # the format holds none of the candidates: say so, in the format's words
        config = _config(method, **CANDIDATES[0])
        reason = fmt.accepts(method, config, fmt.options())
        with pytest.raises(ConfigError, match=reason.split(":")[0] if reason else "shape"):
            parse_variant({"method": method, "format": fmt_name, **dataclasses.asdict(config)})
        return
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "version"}
    options = {**fmt.options_for(config), **_keep(fmt)}
    variant = parse_variant({"method": method, "format": fmt_name, **fields, **options})
    calib = CalibrationConfig(corpus="pydoc", n_samples=2, seq_len=32, allow_fallback=True)
    shared = SharedInputs(source, calib)
    made = produce(variant, shared, tmp_path / f"out{fmt.suffix}", progress=False)
    assert made.format == fmt.label(variant.options)
    assert detect(made.target)[0] is fmt
    loaded, checkpoint = load(made.target)
    if fmt.runtime == "transformers":  # quantized linears kept (others load dequantized)
        assert len(checkpoint.weights) == len(linear_shapes(source))
    memory = load_model(source)
    calibration = shared.calibration()[1] if get_method(method).needs_calibration else None
    quantize_model(memory, source.folder.arch, method, config, calibration, progress=False)
    assert torch.equal(_logits(loaded), _logits(memory)), f"{method} -> {fmt_name}"


# -- a toy method and a toy format, from this file alone -----------------------------------------


@dataclass(frozen=True)
class ShrinkConfig:
    """Round to nearest after shrinking each row's range to ``shrink`` of its largest weight."""

    bits: int = 4
    group_size: int = 32
    sym: bool = True
    shrink: float = 0.9
    version: int = 1

    def __post_init__(self) -> None:
        from quantlab.errors import ConfigError

        if not 0 < self.shrink <= 1:
            raise ConfigError(f"shrink must be in (0, 1], got {self.shrink}")


def shrink_block(ctx, config: ShrinkConfig) -> None:
    for name in ctx.linear_names:
        w = ctx.weight(name)
        bound = config.shrink * w.abs().amax(dim=1, keepdim=True)
        clipped = torch.maximum(torch.minimum(w, bound), -bound)
        qw = quantize_rtn(clipped, config.bits, config.group_size, config.sym)
        ctx.set_quantized(name, dataclasses.replace(qw, dtype=ctx.original_dtype(name)))


MARKER = "toy_format.json"


class DequantizedFormat(Format):
    """A Hugging Face folder of the dequantized weights (what any tool loads), marked as ours."""

    name = "dequantized"
    description = "the dequantized model as an ordinary Hugging Face folder (a test format)"

    def accepts(self, method, config, options, *, imatrix=False):
        return super().accepts(method, config, options, imatrix=imatrix)

    def detect(self, path: Path):
        marker = Path(path) / MARKER
        return self.options() if marker.is_file() else None

    def write(self, request):
        from quantlab.atomic import atomic_directory

        with atomic_directory(request.out) as tmp:
            request.model.save_pretrained(tmp)
            from quantlab.models import load_tokenizer

            load_tokenizer(request.source).save_pretrained(tmp)
            marker = {"method": request.result.method, "linears": len(request.result.weights)}
            (tmp / MARKER).write_text(json.dumps(marker))
        return Path(request.out)

    def load(self, path, *, dtype="float32", verify=True, cache=None):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        marker = json.loads((Path(path) / MARKER).read_text())
        return model.eval(), LoadedCheckpoint(Path(path), self.name, marker)

    def size(self, path):
        from quantlab.models.folder import SAFETENSORS_DTYPE_SIZES, read_safetensors_header

        infos = [t for f in Path(path).glob("*.safetensors") for t in read_safetensors_header(f)]
        return ArtifactSize(
            sum(t.numel * SAFETENSORS_DTYPE_SIZES[t.dtype] for t in infos),
            sum(t.numel for t in infos),
        )

    def verify(self, path, check):
        self.load(path)
        check("loads", "transformers loads it")


@pytest.fixture
def toys():
    register_method("shrink", ShrinkConfig, needs_calibration=False)(shrink_block)
    register_format(DequantizedFormat())
    yield
    unregister_method("shrink")
    unregister_format("dequantized")


def test_a_toy_method_and_format_run_through_quantize(toys, tiny_models, tmp_path, capsys):
    model = str(tiny_models["tiny-llama"])
    out = tmp_path / "toy"
    args = ["quantize", model, "--method", "shrink", "--shrink", "0.8", "--bits", "8"]
    assert main([*args, "--format", "dequantized", "--out", str(out)]) == 0
    assert (
        "shrink ShrinkConfig(bits=8, group_size=32, sym=True, shrink=0.8" in capsys.readouterr().out
    )
    assert json.loads((out / MARKER).read_text()) == {"method": "shrink", "linears": 14}
    assert main(["verify", str(out)]) == 0
    # the toy's settings are checked like the built-ins'
    assert main([*args[:-2], "--shrink", "2", "--out", str(tmp_path / "bad")]) == 2
    assert "shrink must be in (0, 1], got 2.0" in capsys.readouterr().err
    assert main([*args, "--act-order", "--out", str(tmp_path / "bad")]) == 2
    assert "--act-order does not apply to --method shrink" in capsys.readouterr().err


def test_a_toy_method_and_format_run_through_a_sweep(toys, tiny_models, tmp_path, capsys):
    config = {
        "name": "toys",
        "model": str(tiny_models["tiny-llama"]),
        "calibration": {"corpus": "pydoc", "n_samples": 2, "seq_len": 32},
        "variants": [
            {},
            {"method": "shrink", "shrink": 0.8, "format": "dequantized"},
            {"method": "shrink", "bits": 8, "sym": False},  # the default format (native)
        ],
        "evaluation": {
            "perplexity": [{"corpus": "pydoc", "split": "all", "context": 32, "max_tokens": 256}],
            "kld": True,
            "speed": False,
        },
        "output": str(tmp_path / "out"),
        "store": str(tmp_path / "results.db"),
    }
    path = tmp_path / "toys.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    with ResultStore(tmp_path / "results.db") as store:
        rows = {r.variant: r for r in store.results(run_name="toys")}
    assert set(rows) == {"unquantized", "shrink-w4-g32-shrink0.8-dequantized", "shrink-w8-g32-asym"}
    toy = rows["shrink-w4-g32-shrink0.8-dequantized"]
    assert toy.format == "dequantized" and toy.metrics.kld.mean > 0
    assert toy.variant_config["shrink"] == 0.8 and toy.variant_config["method"] == "shrink"
    assert rows["shrink-w8-g32-asym"].format == "native"
    assert rows["shrink-w8-g32-asym"].metrics.kld.mean < toy.metrics.kld.mean
