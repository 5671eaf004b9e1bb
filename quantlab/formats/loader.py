"""Read quantized checkpoints - quantlab's and everyone else's - into a transformers model.

``load(path)`` (also ``quantlab.load``) asks the format registry which format the artifact is
(`quantlab.formats.registry.detect`) and lets that format load it. The Hugging Face checkpoint
formats (GPTQ, AWQ, compressed-tensors) share `load_quantized_folder`: every linear whose marker
tensor is present is decoded by the format into a `QuantizedWeight` and becomes a `QuantLinear`;
every other tensor is loaded as is. Shapes are checked against the architecture; a missing,
unexpected or misshapen tensor is refused naming it; when the folder has a quantlab manifest its
file checksums are verified first.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from quantlab.errors import CorruptFileError, InvalidModelError
from quantlab.formats.manifest import read_manifest, verify_files
from quantlab.formats.registry import LoadedCheckpoint, detect


def read_config(path: Path) -> dict:
    """A folder's config.json, or a clean error."""
    try:
        data = json.loads((path / "config.json").read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise InvalidModelError(f"{path} has no config.json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path / 'config.json'} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path / 'config.json'} is not a JSON object")
    return data


def quantization_config(path: Path) -> dict | None:
    """The ``quantization_config`` of a folder's config.json (None when it has none)."""
    if not path.is_dir() or not (path / "config.json").is_file():
        return None
    qc = read_config(path).get("quantization_config")
    return qc if isinstance(qc, dict) else None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors weights (the index's files when there is one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
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


Decode = Callable[[str, dict, int, int], object]  # (name, parts, out, in) -> QuantizedWeight


def load_quantized_folder(
    path: Path,
    label: str,
    decode: Decode,
    parts: tuple[str, ...],
    marker: str,
    *,
    dtype: str = "float32",
    verify: bool = True,
):
    """``(model, LoadedCheckpoint)`` of a Hugging Face quantized checkpoint folder whose
    quantized linears are the tensors ``<linear>.<part>`` that ``decode`` turns into a
    `QuantizedWeight` (``marker`` is the part every quantized linear has). A decoder may return
    a dense tensor instead (a float format no `QuantizedWeight` holds, FP8): that linear is then
    an ordinary one with the checkpoint's dequantized weight, and is not in
    ``checkpoint.weights``."""
    from quantlab.models.hf import prepare_transformers

    prepare_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantlab.models.arch import arch_spec_for_config
    from quantlab.qlinear import QuantLinear

    torch_dtype = getattr(torch, dtype)
    manifest = read_manifest(path)
    if manifest is not None and verify:
        verify_files(path, manifest)
    config_dict = read_config(path)
    arch_spec_for_config(config_dict)  # unsupported architectures (and remote code) stop here
    qc = config_dict["quantization_config"]
    tensors = read_tensors(path)

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # built on the meta device: no float copy of the linears the checkpoint quantized (an 8B
    # model would take 32 GB in float32 before its linears are replaced); every real tensor
    # comes from the checkpoint, the rotary frequencies are rebuilt from the config
    from quantlab.models.shards import rebuild_buffers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    rebuild_buffers(model, "loading", "this architecture is not supported")
    checkpoint = LoadedCheckpoint(path, label, qc, manifest=manifest)
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
        if isinstance(qw, torch.Tensor):  # dequantized by the decoder: an ordinary linear,
            tensors[f"{name}.weight"] = qw  # filled with the rest (its bias too)
            checkpoint.dense.append(name)
            continue
        bias = tensors.pop(f"{name}.bias", None)
        if (bias is None) != (module.bias is None):
            raise CorruptFileError(
                f"tensor {name}.bias is {'missing' if bias is None else 'extra'}"
            )
        bias = None if bias is None else bias.to(torch_dtype)
        checkpoint.weights[name] = qw
        model.set_submodule(name, QuantLinear(qw, bias))
    if not checkpoint.weights and not checkpoint.dense:
        raise CorruptFileError(f"{path}: no quantized linear found ({marker} tensors)")
    _load_rest(model, tensors)
    return model.eval(), checkpoint


def _load_rest(model, tensors: dict[str, torch.Tensor]) -> None:
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
        {k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=False, assign=True
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
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # (a tensor the model has and neither the checkpoint nor the config provides)
        raise CorruptFileError(f"tensor {left[0]} is missing ({len(left)} missing in all)")


def load(path: str | Path, *, dtype: str = "float32", verify: bool = True, cache=None):
    """``(model, LoadedCheckpoint)``: the quantized artifact at ``path`` in a transformers
    model, in eval mode, whatever registered format it is."""
    path = Path(path)
    found = detect(path)
    if found is None:
        raise InvalidModelError(f"{path} is not a quantized checkpoint quantlab can read")
    fmt, _ = found
    return fmt.load(path, dtype=dtype, verify=verify, cache=cache)
