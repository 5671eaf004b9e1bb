"""The GGUF format: single ``.gguf`` files that llama.cpp runs.

Two ways in, one file out (with ``<file>.manifest.json`` beside it):
- **llama.cpp's own quantization** (``{format: gguf, gguf_type: Q4_K_M}``, no method): the model's
  full-precision GGUF quantized by ``llama_model_quantize`` (`quantlab.formats.gguf_quant`), fed
  the importance matrix of the calibration set when the variant asks for it (``imatrix: true``;
  the IQ types need one); every k- and i-quant is exactly llama.cpp's;
- **a method's result, losslessly** (``{method: gptq, group_size: 32, format: gguf}``): codes and
  scales written as Q4_0 / Q4_1 / Q8_0 blocks without a second rounding
  (`quantlab.formats.gguf_lossless`); refused when not exact.

Evaluated in llama.cpp (its own runtime), or dequantized into transformers for weight-quality
numbers (``gguf_runtime: torch``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from quantlab.errors import ConfigError, CorruptFileError, QuantlabError
from quantlab.formats.gguf_quant import GGUF_TYPES, NEEDS_IMATRIX, imatrix_file
from quantlab.formats.registry import (
    ArtifactSize,
    Format,
    WriteRequest,
    gathers_columns,
    register_format,
)

LOSSLESS_BLOCK = 32  # GGUF's Q4_0 / Q4_1 / Q8_0 blocks hold 32 consecutive weights
# the types a front end offers first (the app's checkboxes); every GGUF_TYPES entry is accepted
COMMON_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "IQ4_XS")


@dataclass(frozen=True)
class GGUFOptions:
    # llama.cpp's type (no method); None with a method: the method's codes as exact blocks
    gguf_type: str | None = field(
        default=None, metadata={"choices": GGUF_TYPES, "common": COMMON_TYPES}
    )
    # with a method: the other tensors from an F32 copy of the model (True) or an F16 one
    keep_dtype: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        if self.gguf_type is not None:
            object.__setattr__(self, "gguf_type", str(self.gguf_type).upper())
            if self.gguf_type not in GGUF_TYPES:
                raise ConfigError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}")


# the llama.cpp file type a fitted file is labelled with: that of the type most tensors got
_FTYPE_OF = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def fitted_file_type(tensor_settings: dict[str, str]) -> str:
    """The llama.cpp file type (``general.file_type``) of a fit: the most common tensor type's
    (every tensor gets its own type through overrides; this only labels the file)."""
    from collections import Counter

    common = Counter(tensor_settings.values()).most_common(1)[0][0]
    ftype = _FTYPE_OF.get(common, common)
    return ftype if ftype in GGUF_TYPES else "Q8_0"


class GGUFFormat(Format):
    name = "gguf"
    description = (
        "a .gguf file for llama.cpp: its quantization (gguf_type) or a method's exact blocks"
    )
    options = GGUFOptions
    suffix = ".gguf"
    needs_method = False
    runtime = "llama.cpp"
    fit_family = "ggml"
    run_snippet = (
        "llama-cli -m {path} -p 'Hello'   # or: python -c \"from llama_cpp import Llama; "
        "print(Llama('{path}')('Hello', max_tokens=32))\""
    )

    def accepts(self, method, config, options, *, imatrix: bool = False) -> str | None:
        if method is None:
            if not options.gguf_type:
                return "format gguf needs gguf_type (llama.cpp's quantization) or a method"
            if options.gguf_type in NEEDS_IMATRIX and not imatrix:
                return f"gguf_type {options.gguf_type} needs imatrix: true"
            if options.keep_dtype:
                return "keep_dtype applies to a method's result written as GGUF blocks"
            return None
        if options.gguf_type:
            return (
                "gguf_type is llama.cpp's quantization: give no method (with a method, its result "
                "itself is written as Q4_0/Q4_1/Q8_0 blocks)"
            )
        bits, sym = getattr(config, "bits", None), getattr(config, "sym", None)
        if getattr(config, "group_size", None) != LOSSLESS_BLOCK or gathers_columns(config):
            return (
                "format gguf with a method writes blocks of 32 weights: group_size 32, no g_idx "
                "(act-order needs static_groups)"
            )
        if (bits, sym) not in ((4, True), (4, False), (8, True)):
            return (
                f"format gguf with a method holds 4-bit (Q4_0 sym, Q4_1 asym) or 8-bit symmetric "
                f"(Q8_0) results exactly; this one is {bits}-bit {'sym' if sym else 'asym'}"
            )
        return None

    def preflight(self, config, options, linears) -> str | None:
        if config is None:
            return None
        for name, (_out, cols) in linears.items():
            if cols % LOSSLESS_BLOCK:
                return (
                    f"{name} has in_features={cols}, not a multiple of group_size "
                    f"{LOSSLESS_BLOCK}, which format gguf needs"
                )
        return None

    def detect(self, path: Path):
        path = Path(path)  # a missing file too: opening it then says it does not exist
        return self.options() if path.suffix == self.suffix and not path.is_dir() else None

    def write(self, request: WriteRequest) -> Path:
        from quantlab import settings

        out, cache = Path(request.out), settings.cache_dir(request.cache)
        if request.result is not None:
            from quantlab.formats.gguf_lossless import lossless_artifact

            base = "F32" if request.options.keep_dtype else "F16"
            return lossless_artifact(request.result, request.source, out, cache, base)[0]
        from quantlab.formats.gguf_quant import llama_cpp_artifact

        if request.tensor_settings:  # a fit: one ggml type per tensor
            return llama_cpp_artifact(
                request.source,
                out,
                fitted_file_type(request.tensor_settings),
                cache,
                imatrix=request.imatrix,
                calibration=request.calibration,
                corpus_label=request.corpus_label,
                per_tensor=request.tensor_settings,
                extra=request.manifest_extra,
            )
        return llama_cpp_artifact(
            request.source,
            out,
            request.options.gguf_type,
            cache,
            imatrix=request.imatrix,
            calibration=request.calibration,
            corpus_label=request.corpus_label,
        )

    def notes(self, path: Path) -> list[str]:
        from quantlab.formats.gguf_quant import type_mix

        path = Path(path)
        manifest = _manifest(path) or {}
        mix = manifest.get("type_mix") or type_mix(path)
        notes = [f"tensor types: {', '.join(f'{n} {t}' for t, n in mix.items())}"]
        if imatrix_file(path).is_file():
            notes.append(
                f"importance matrix saved as {imatrix_file(path).name} "
                "(llama-quantize --imatrix reads it)"
            )
        return notes

    def side_files(self, path: Path) -> list[Path]:
        path = Path(path)
        manifest = path.with_name(path.name + ".manifest.json")
        return [manifest, imatrix_file(path), *super().side_files(path)]

    def check(self, path: Path, runtime: str) -> None:
        from quantlab.formats.gguf_file import check_gguf_architecture

        check_gguf_architecture(path, runtime)

    def load(self, path: Path, *, dtype: str = "float32", verify: bool = True, cache=None):
        """The file dequantized into a transformers model (transformers' GGUF loader, which
        dequantizes every tensor with ``gguf`` and undoes llama.cpp's q/k row order)."""
        import torch

        from quantlab.formats.registry import LoadedCheckpoint
        from quantlab.models.hf import prepare_transformers

        prepare_transformers()
        from transformers import AutoModelForCausalLM

        path = Path(path)
        self.check(path, "torch")  # a corrupt or alien file fails here
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, dtype=getattr(torch, dtype), gguf_file=path.name
        )
        return model.eval(), LoadedCheckpoint(path, self.name, {"gguf_file": path.name})

    def tokenizer(self, path: Path, cache=None):
        from transformers import AutoTokenizer

        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer.clean_up_tokenization_spaces = False
        return tokenizer

    def size(self, path: Path) -> ArtifactSize:
        import math

        from quantlab.formats.gguf_file import read_header
        from quantlab.formats.gguf_quant import HF_TO_GGUF

        tensors = read_header(path).tensors
        suffixes = tuple(f".{name}.weight" for name in HF_TO_GGUF.values())
        linears = [t for t in tensors if t.name.startswith("blk.") and t.name.endswith(suffixes)]
        return ArtifactSize(
            sum(t.nbytes for t in tensors),
            sum(math.prod(t.shape) for t in tensors),
            sum(t.nbytes for t in linears),
            sum(math.prod(t.shape) for t in linears),
        )

    def verify(self, path: Path, check) -> None:
        from quantlab.fingerprint import content_sha256
        from quantlab.formats.gguf_quant import tensor_types

        path = Path(path)
        if not path.is_file():
            raise QuantlabError(f"{path}: verify takes a .gguf file or a checkpoint folder")
        from quantlab.formats.gguf_file import check_gguf_architecture

        arch = check_gguf_architecture(path, "llama.cpp")
        check("parses", f"architecture {arch}")
        manifest_path = path.with_name(path.name + ".manifest.json")
        if manifest_path.is_file():
            manifest = _manifest(path, strict=True)
            if manifest.get("files", {}).get(path.name) != content_sha256(path):
                raise CorruptFileError(f"{path} does not match the sha256 in {manifest_path.name}")
            check("checksum", f"matches {manifest_path.name}")
            if manifest.get("tensor_types") and manifest["tensor_types"] != tensor_types(path):
                raise CorruptFileError(f"{path}: tensor types differ from {manifest_path.name}")
            check("tensor types", f"{len(manifest.get('tensor_types', {}))} as recorded")
        else:
            check("manifest", "none (not written by quantlab): checksums not checked")
        try:
            from llama_cpp import Llama
        except ImportError:
            check("loads", "not checked (llama-cpp-python is not installed)")
            return
        try:
            llm = Llama(str(path), n_ctx=32, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise QuantlabError(f"llama.cpp cannot load {path}: {exc}") from None
        llm.close()
        check("loads", "llama.cpp loaded it")


def _manifest(path: Path, *, strict: bool = False) -> dict | None:
    """The ``<file>.manifest.json`` beside a GGUF file (None if absent or, unless ``strict``,
    unreadable)."""
    import json

    manifest_path = Path(path).with_name(Path(path).name + ".manifest.json")
    if not manifest_path.is_file():
        return None
    try:
        data = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        if strict:
            raise CorruptFileError(f"{manifest_path} is not valid JSON ({exc})") from None
        return None
    if not isinstance(data, dict):
        if strict:
            raise CorruptFileError(f"{manifest_path} is not a JSON object")
        return None
    return data


register_format(GGUFFormat())
