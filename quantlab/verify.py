"""`quantlab verify ARTIFACT`: is this artifact complete, intact and loadable?

For a checkpoint folder (GPTQ, AWQ, compressed-tensors, quantlab-native): the quantlab manifest is
present (a folder without one was not finished by quantlab, or not written by it: reported), every
file it lists exists and matches its sha256, every tensor has the shape the config implies, and the
checkpoint loads into a model. For a ``.gguf`` file: the file parses, its architecture is one
llama.cpp runs, its ``.manifest.json`` (when quantlab wrote it) matches its sha256 and per-tensor
types, and llama.cpp loads it. Each check is printed; the exit status is 0 when all pass, 2 when
one fails (the first failure is named), so scripts can rely on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from quantlab.errors import CorruptFileError, QuantlabError


@dataclass
class Verification:
    artifact: str
    kind: str
    checks: list[tuple[str, str]] = field(default_factory=list)  # (check, outcome)


def _gguf(path: Path, report: Verification, log: Callable[[str], None]) -> None:
    from quantlab.fingerprint import content_sha256
    from quantlab.formats.gguf_file import check_gguf_architecture
    from quantlab.formats.gguf_quant import tensor_types

    arch = check_gguf_architecture(path, "llama.cpp")
    _ok(report, log, "parses", f"architecture {arch}")
    manifest_path = path.with_name(path.name + ".manifest.json")
    if manifest_path.is_file():
        manifest = _json(manifest_path)
        if manifest.get("files", {}).get(path.name) != content_sha256(path):
            raise CorruptFileError(f"{path} does not match the sha256 in {manifest_path.name}")
        _ok(report, log, "checksum", f"matches {manifest_path.name}")
        if manifest.get("tensor_types") and manifest["tensor_types"] != tensor_types(path):
            raise CorruptFileError(f"{path}: tensor types differ from {manifest_path.name}")
        _ok(report, log, "tensor types", f"{len(manifest.get('tensor_types', {}))} as recorded")
    else:
        _ok(report, log, "manifest", "none (not written by quantlab): checksums not checked")
    try:
        from llama_cpp import Llama
    except ImportError:
        _ok(report, log, "loads", "not checked (llama-cpp-python is not installed)")
        return
    try:
        llm = Llama(str(path), n_ctx=32, verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise QuantlabError(f"llama.cpp cannot load {path}: {exc}") from None
    llm.close()
    _ok(report, log, "loads", "llama.cpp loaded it")


def _folder(path: Path, report: Verification, log: Callable[[str], None]) -> None:
    from quantlab.formats.checkpoint import read_manifest
    from quantlab.formats.loader import _verify, detect_format, load
    from quantlab.formats.native import MANIFEST, is_native

    fmt = detect_format(path)
    if fmt is None:
        raise QuantlabError(f"{path} is not a quantized checkpoint or .gguf file quantlab reads")
    report.kind = fmt
    _ok(report, log, "format", fmt)
    try:
        manifest = _json(path / MANIFEST) if is_native(path) else read_manifest(path)
    except ValueError as exc:
        raise CorruptFileError(f"{path}: its manifest is not valid JSON ({exc})") from None
    if manifest is None:
        _ok(report, log, "manifest", "none (not written by quantlab): checksums not checked")
    else:
        _verify(path, manifest)
        _ok(report, log, "checksums", f"{len(manifest.get('files', {}))} files match the manifest")
    load(path, verify=False)  # shapes against the config, dtypes, every tensor read
    _ok(report, log, "loads", "tensors match the config; the model loads")


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} is not a JSON object")
    return data


def _ok(report: Verification, log, check: str, outcome: str) -> None:
    report.checks.append((check, outcome))
    log(f"ok  {check:<13} {outcome}")


def verify(artifact: str | Path, log: Callable[[str], None] = print) -> Verification:
    """Run every check on ``artifact``; raises a `QuantlabError` naming the first failure."""
    path = Path(artifact)
    if not path.exists():
        raise QuantlabError(f"{path} does not exist")
    if path.name.startswith(".") and ".tmp-" in path.name:
        raise QuantlabError(f"{path} is an unfinished temporary (a write was interrupted)")
    report = Verification(str(path), "gguf" if path.suffix == ".gguf" else "folder")
    if path.is_file():
        if path.suffix != ".gguf":
            raise QuantlabError(f"{path}: verify takes a .gguf file or a checkpoint folder")
        _gguf(path, report, log)
    else:
        _folder(path, report, log)
    return report
