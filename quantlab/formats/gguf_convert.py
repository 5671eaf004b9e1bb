"""Hugging Face folder -> GGUF through llama.cpp's own converter.

quantlab does not re-implement the conversion (tensor names, rotary permutation, tokenizer and
chat-template metadata): it runs ``convert_hf_to_gguf.py`` from the *same llama.cpp release as
the installed llama-cpp-python*, so the converter and the runtime that loads its output agree.
That script ships in the llama-cpp-python source distribution (``vendor/llama.cpp``, with its
``conversion/`` package and its own ``gguf-py``); quantlab takes those three parts out of the
sdist once and keeps them in the cache (``<cache>/llama.cpp/converter-<version>``). Where they
come from, first match wins:

1. ``llama_cpp=`` / ``--llama-cpp`` / ``QUANTLAB_LLAMA_CPP``: a llama.cpp checkout (a folder with
   ``convert_hf_to_gguf.py``) or a llama-cpp-python sdist (``.tar.gz``) already on disk;
2. the cache;
3. ``pip download --no-binary :all: --no-deps llama-cpp-python==<version>`` (the package index
   pip is configured with; nothing from the Hugging Face Hub).

A written file is checked before it is moved into place: it opens, names the model's
architecture, carries a tokenizer, and, when llama-cpp-python is installed, llama.cpp tokenizes a
fixed set of probe texts (digits, whitespace runs, accents, emoji, CJK, chat markup) to exactly
the ids the Hugging Face tokenizer gives. A file that fails is never left at the output path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from quantlab.atomic import atomic_directory
from quantlab.errors import CorruptFileError, MissingDependencyError, QuantlabError

# Output types of the converter itself (k-quants come from llama.cpp's quantizer afterwards).
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# The llama-cpp-python release quantlab is tested with (constraints.txt pins the same).
PINNED_VERSION = "0.3.36"
SCRIPT = "convert_hf_to_gguf.py"
_PARTS = (SCRIPT, "conversion/", "gguf-py/", "LICENSE")
# The HF config "architectures" entry -> the GGUF general.architecture llama.cpp writes for it.
GGUF_ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# Texts whose token ids must agree between the HF tokenizer and llama.cpp's.
PROBE_TEXTS = (
    "Hello world",
    "In 1999, 12345 people paid $3.50 each (about 43,210.75 in total).",
    " leading space and  two  spaces",
    "tabs\tand\nnewlines\n\n   indented\n",
    "accents: café, naïve, Ångström; emoji 🤖🚀; 中文字符; العربية",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "don't we'll I'M they've",
    "def f(x):\n    return x ** 2  # square\n",
    "= Valkyria Chronicles III = \n Senjō no Valkyria 3 : Unrecorded Chronicles",
)


def runtime_version() -> str:
    """The installed llama-cpp-python version, or the pinned one when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return PINNED_VERSION


def _extract_converter(sdist: Path, dest: Path) -> Path:
    """Take the converter script, ``conversion/`` and ``gguf-py/`` out of an sdist into ``dest``."""
    try:
        archive = tarfile.open(sdist, "r:gz")  # noqa: SIM115 (closed by the with below)
    except (OSError, tarfile.TarError) as exc:
        raise CorruptFileError(f"{sdist}: not a readable .tar.gz ({exc})") from None
    with archive, atomic_directory(dest) as tmp:
        found = False
        for member in archive:
            parts = member.name.split("/")
            # <name>-<version>/vendor/llama.cpp/<relative path>
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or not member.isfile():
                continue
            rel = "/".join(parts[3:])
            if ".." in parts or not rel.startswith(_PARTS):
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
            found = found or rel == SCRIPT
        if not found:
            raise QuantlabError(f"{sdist} holds no vendor/llama.cpp/{SCRIPT}")
    return dest


def _download_sdist(version: str, folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:"]
    cmd += ["--no-deps", f"llama-cpp-python=={version}", "-d", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    sdists = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not sdists:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise MissingDependencyError(
            f"llama.cpp's converter ships in the llama-cpp-python {version} sdist, which pip could "
            f"not download ({' / '.join(tail)}); point --llama-cpp or QUANTLAB_LLAMA_CPP at a "
            "llama.cpp checkout or at that .tar.gz"
        )
    return sdists[0]


def converter_dir(cache: str | os.PathLike, llama_cpp: str | os.PathLike | None = None) -> Path:
    """A folder with llama.cpp's ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/``."""
    explicit = llama_cpp or os.environ.get("QUANTLAB_LLAMA_CPP")
    version = runtime_version()
    cached = Path(cache) / "llama.cpp" / f"converter-{version}"
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_dir():
            if not (path / SCRIPT).is_file():
                raise QuantlabError(f"{path} is not a llama.cpp checkout: it has no {SCRIPT}")
            return path
        if path.is_file() and path.name.endswith(".tar.gz"):
            dest = Path(cache) / "llama.cpp" / f"converter-{path.name.removesuffix('.tar.gz')}"
            return dest if (dest / SCRIPT).is_file() else _extract_converter(path, dest)
        raise QuantlabError(f"--llama-cpp {path}: neither a llama.cpp folder nor an sdist .tar.gz")
    if (cached / SCRIPT).is_file():
        return cached
    with tempfile.TemporaryDirectory(prefix="quantlab-sdist-") as tmp:
        return _extract_converter(_download_sdist(version, Path(tmp)), cached)


def _tokenizer_mismatch(llm, model_dir: Path) -> str | None:
    """The first probe text that llama.cpp (``llm``) and the HF tokenizer encode differently,
    described; ``None`` when all agree."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir)
    for text in PROBE_TEXTS:
        want = hf.encode(text, add_special_tokens=False)
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if want != got:
            i = next(
                (k for k, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), len(got)
            )
            return f"{text!r}: HF ids {want[i : i + 4]} vs llama.cpp {got[i : i + 4]} at {i}"
    return None


def check_converted(gguf_path: Path, model_dir: Path, architecture: str) -> dict:
    """Check a freshly converted file (see the module docstring); returns what was checked.

    With llama-cpp-python, llama.cpp itself opens the file (vocabulary only) and its metadata is
    read from there; without it, ``gguf``'s reader does."""
    try:
        import llama_cpp
    except ImportError:
        from quantlab.formats.gguf_file import open_gguf

        reader = open_gguf(gguf_path)
        meta = {k: str(f.contents()) for k, f in reader.fields.items() if "tokens" not in k}
        del reader
        checks = _check_metadata(gguf_path, meta, architecture)
        checks["tokenizer_parity"] = "not checked (llama-cpp-python is not installed)"
        return checks
    try:
        llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise QuantlabError(f"llama.cpp cannot load the converted file: {exc}") from None
    try:
        checks = _check_metadata(gguf_path, dict(llm.metadata), architecture)
        mismatch = _tokenizer_mismatch(llm, model_dir)
    finally:
        llm.close()
    if mismatch:
        raise QuantlabError(
            f"llama.cpp tokenizes the converted file differently from the HF tokenizer: {mismatch}"
        )
    checks["tokenizer_parity"] = f"{len(PROBE_TEXTS)} probe texts, identical ids"
    return checks


def _check_metadata(gguf_path: Path, meta: dict, architecture: str) -> dict:
    arch = meta.get("general.architecture")
    want = GGUF_ARCH.get(architecture)
    if want and arch != want:
        raise QuantlabError(
            f"{gguf_path}: converter wrote architecture {arch!r}, expected {want!r}"
        )
    if "tokenizer.ggml.model" not in meta:
        raise QuantlabError(f"{gguf_path}: the converter wrote no tokenizer")
    return {
        "gguf_architecture": arch,
        "tokenizer_model": meta["tokenizer.ggml.model"],
        "tokenizer_pre": meta.get("tokenizer.ggml.pre"),
    }


def _converter_error(output: str, model_dir: Path) -> QuantlabError:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    if any("pre-tokenizer was not recognized" in line for line in lines):
        chk = next((line.split("chkhsh:")[-1].strip() for line in lines if "chkhsh:" in line), "")
        return QuantlabError(
            f"{model_dir}: llama.cpp's converter does not know this model's BPE pre-tokenizer "
            f"(chkhsh {chk}); a newer llama.cpp release may, or the tokenizer files are not the "
            "model's own"
        )
    last = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
    return QuantlabError(f"llama.cpp's converter failed on {model_dir}: {last.strip()}")


def convert_hf_to_gguf(
    model_ref,
    out: str | os.PathLike,
    outtype: str = "f16",
    *,
    cache: str | os.PathLike,
    llama_cpp: str | os.PathLike | None = None,
) -> tuple[Path, dict]:
    """Convert the resolved model ``model_ref`` to ``out`` (atomically); returns the path and the
    record of what was checked (see `check_converted`)."""
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise QuantlabError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    out = Path(out)
    architecture = model_ref.folder.arch.architecture
    if architecture not in GGUF_ARCH:
        raise QuantlabError(
            f"{architecture}: no GGUF conversion is tested for this architecture "
            f"(tested: {', '.join(GGUF_ARCH)})"
        )
    script = converter_dir(cache, llama_cpp) / SCRIPT
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use its own gguf-py
    cmd = [sys.executable, str(script), str(model_ref.path), "--outfile", str(tmp)]
    cmd += ["--outtype", outtype]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0 or not tmp.is_file():
            raise _converter_error(done.stderr + done.stdout, model_ref.path)
        checks = check_converted(tmp, model_ref.path, architecture)
        checks["converter"] = f"{script} (llama-cpp-python {runtime_version()})"
        os.replace(tmp, out)
    except OSError as exc:
        raise QuantlabError(f"cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return out, checks
