"""Read quantized checkpoints - quantlab's and everyone else's - into a transformers model.

``load(path)`` recognises, from ``config.json``'s ``quantization_config``:
- ``quant_method: gptq``: ``checkpoint_format`` (or ``format``) ``gptq`` (v1, zeros minus one) or
  ``gptq_v2``; any bit width 2/3/4/8, ``desc_act`` ``g_idx``, partial last groups;
- ``quant_method: awq``: ``version: gemm`` (other AWQ kernels' layouts are refused by name);
- ``quant_method: compressed-tensors``: ``format: pack-quantized`` integer weight schemes (W4A16,
  W8A16, group / channel, symmetric or not), as llm-compressor writes them;
and a quantlab-native artifact (its tensors applied to its source model). Every quantized linear
becomes a `QuantLinear`; every other tensor is loaded as is. Shapes are checked against the
architecture; a missing, unexpected or misshapen tensor is refused naming it; when the folder has a
quantlab manifest its file checksums are verified first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantlab.errors import CorruptFileError, InvalidModelError, QuantlabError
from quantlab.fingerprint import content_sha256
from quantlab.formats import layouts
from quantlab.formats.checkpoint import read_manifest
from quantlab.types import QuantizedWeight

_GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")
_AWQ_PARTS = ("qweight", "qzeros", "scales")
_CT_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


@dataclass
class LoadedCheckpoint:
    """What `load` found: the format, its settings, and each quantized linear."""

    path: Path
    format: str  # gptq | gptq_v2 | awq | compressed-tensors | quantlab-native
    quantization_config: dict
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    manifest: dict | None = None


def _config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise InvalidModelError(f"{path} has no config.json") from None
    except ValueError as exc:
        raise CorruptFileError(f"{path / 'config.json'} is not valid JSON ({exc})") from None


def detect_format(path: str | Path) -> str | None:
    """The quantized format of a folder, or None for an unquantized model / anything else."""
    from quantlab.formats.native import is_native

    path = Path(path)
    if not path.is_dir():
        return None
    if is_native(path):
        return "quantlab-native"
    if not (path / "config.json").is_file():
        return None
    qc = _config(path).get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
        if fmt not in layouts.GPTQ_FORMATS:
            raise QuantlabError(f"{path}: GPTQ checkpoint_format {fmt!r} is not supported")
        return fmt
    if method == "awq":
        version = str(qc.get("version") or qc.get("format") or "gemm").lower()
        if version != "gemm":
            raise QuantlabError(f"{path}: AWQ version {version!r} is not supported (only gemm)")
        return "awq"
    if method == "compressed-tensors":
        # other compressed-tensors formats (float8, ...) are left to transformers
        return "compressed-tensors" if qc.get("format") == "pack-quantized" else None
    return None  # another quantization method: transformers' own loader may read it


def _verify(path: Path, manifest: dict) -> None:
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CorruptFileError(f"{f} is listed in the manifest but missing")
        if content_sha256(f) != digest:
            raise CorruptFileError(f"{f} does not match its checksum in the manifest")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            raise CorruptFileError(f"{index} is not a valid index ({exc})") from None
    else:
        files = sorted(
            p.name for p in path.glob("*.safetensors") if p.name != "imatrix.safetensors"
        )
    if not files:
        raise InvalidModelError(f"{path} has no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise CorruptFileError(f"{f} is missing (listed in {index.name})")
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError) as exc:
            raise CorruptFileError(f"{f} is not a readable safetensors file ({exc})") from None
    return tensors


def _decoder(fmt: str, qc: dict, dtype: torch.dtype):
    """``decode(name, parts, out, in) -> QuantizedWeight`` and the tensor parts it reads; a
    quantization_config with values of the wrong type is a `CorruptFileError`."""
    try:
        return _decoder_for(fmt, qc, dtype)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        detail = f"{type(exc).__name__}: {exc}"
        raise CorruptFileError(f"quantization_config is malformed ({detail})") from None


def _decoder_for(fmt: str, qc: dict, dtype: torch.dtype):
    if fmt in layouts.GPTQ_FORMATS:
        if "bits" not in qc:
            raise CorruptFileError("quantization_config has no 'bits'")
        bits, gs, sym = int(qc["bits"]), int(qc.get("group_size", -1)), bool(qc.get("sym", True))

        def gptq(name, parts, out, cols):
            return layouts.unpack_gptq(
                name, parts, out, cols, bits=bits, group_size=gs, sym=sym,
                checkpoint_format=fmt, dtype=dtype,
            )  # fmt: skip

        return gptq, _GPTQ_PARTS, "qweight"
    if fmt == "awq":
        if int(qc.get("bits", qc.get("w_bit", 4))) != 4:
            raise QuantlabError("AWQ GEMM checkpoints are 4-bit; this one says otherwise")
        gs = int(qc.get("group_size", qc.get("q_group_size", 128)))

        def awq(name, parts, out, cols):
            return layouts.unpack_awq(name, parts, out, cols, group_size=gs, dtype=dtype)

        return awq, _AWQ_PARTS, "qweight"
    if fmt == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        schemes = [g.get("weights") for g in groups.values() if g.get("weights")]
        if len(schemes) != 1:
            raise QuantlabError("compressed-tensors: exactly one weight scheme is supported")
        w = schemes[0]
        if w.get("strategy") not in ("group", "channel") or "num_bits" not in w:
            raise QuantlabError(
                f"compressed-tensors weight strategy {w.get('strategy')!r} is not supported "
                "(group and channel are)"
            )
        if w.get("type", "int") != "int" or (qc.get("config_groups", {}) and any(
            g.get("input_activations") for g in groups.values()
        )):  # fmt: skip
            raise QuantlabError("compressed-tensors: only integer weight-only schemes are read")
        bits, sym = int(w["num_bits"]), bool(w.get("symmetric", True))
        gs = w.get("group_size") if w.get("strategy") == "group" else -1

        def ct(name, parts, out, cols):
            qw = layouts.unpack_compressed(
                name, parts, bits=bits, group_size=gs, sym=sym, dtype=dtype
            )
            if qw.shape != (out, cols):
                raise CorruptFileError(f"tensor {name}.weight_shape {list(qw.shape)} != model's")
            return qw

        return ct, _CT_PARTS, "weight_packed"
    raise QuantlabError(f"unsupported format {fmt}")


def load(path: str | Path, *, dtype: str = "float32", verify: bool = True):
    """``(model, LoadedCheckpoint)``: the checkpoint in a transformers model, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantlab.models.arch import arch_spec_for_config
    from quantlab.qlinear import QuantLinear

    path = Path(path)
    fmt = detect_format(path)
    if fmt is None:
        raise InvalidModelError(f"{path} is not a quantized checkpoint quantlab can read")
    torch_dtype = getattr(torch, dtype)
    if fmt == "quantlab-native":
        return _load_native(path, dtype, verify)
    manifest = read_manifest(path)
    if manifest is not None and verify:
        _verify(path, manifest)
    config_dict = _config(path)
    arch_spec_for_config(config_dict)  # unsupported architectures (and remote code) stop here
    qc = config_dict["quantization_config"]
    decode, parts, marker = _decoder(fmt, qc, torch_dtype)
    tensors = _read_tensors(path)

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    checkpoint = LoadedCheckpoint(path, fmt, qc, manifest=manifest)
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or f"{name}.{marker}" not in tensors:
            continue
        found = {p: tensors.pop(f"{name}.{p}") for p in parts if f"{name}.{p}" in tensors}
        try:
            qw = decode(name, found, module.out_features, module.in_features)
        except KeyError as exc:
            raise CorruptFileError(f"tensor {name}.{exc.args[0]} is missing") from None
        except (ValueError, RuntimeError, IndexError) as exc:
            raise CorruptFileError(f"tensors of {name} are inconsistent: {exc}") from None
        bias = tensors.pop(f"{name}.bias", None)
        if (bias is None) != (module.bias is None):
            raise CorruptFileError(
                f"tensor {name}.bias is {'missing' if bias is None else 'extra'}"
            )
        checkpoint.weights[name] = qw
        model.set_submodule(name, QuantLinear(qw, None if bias is None else bias.to(torch_dtype)))
    if not checkpoint.weights:
        raise CorruptFileError(f"{path}: no quantized linear found ({marker} tensors)")
    _load_rest(model, tensors, torch_dtype)
    return model.eval(), checkpoint


def _load_rest(model, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    expected = model.state_dict()
    for name, tensor in tensors.items():
        if name not in expected:
            raise CorruptFileError(f"tensor {name} does not belong to this architecture")
        want = expected[name]
        if tensor.shape != want.shape:
            raise CorruptFileError(
                f"tensor {name} has shape {list(tensor.shape)}, expected {list(want.shape)}"
            )
    quant_buffers = {n for n, m in model.named_modules() if type(m).__name__ == "QuantLinear"}
    result = model.load_state_dict(
        {k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=False
    )
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {
            n for n, _ in model.named_parameters()
        }
        tied.add("lm_head.weight")
    missing = [
        k for k in result.missing_keys if k not in tied and k.rsplit(".", 1)[0] not in quant_buffers
    ]
    if missing:
        raise CorruptFileError(f"tensor {missing[0]} is missing ({len(missing)} missing in all)")
    model.tie_weights()


def _load_native(path: Path, dtype: str, verify: bool):
    from quantlab.formats.native import apply_native, read_native
    from quantlab.models import load_model, resolve_model

    artifact = read_native(path, verify=verify)
    source = resolve_model(artifact.manifest["source"]["path"])
    model = load_model(source, dtype=dtype)
    apply_native(model, artifact)
    qc = {k: artifact.manifest[k] for k in ("method", "bits", "group_size", "sym")}
    return model, LoadedCheckpoint(path, "quantlab-native", qc, artifact.weights, artifact.manifest)
