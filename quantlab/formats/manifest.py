"""quantlab's manifest: what every artifact it writes says about itself, and how that is checked.

A checkpoint folder carries ``quantlab_manifest.json`` (written last, so a folder with it is
complete); a ``.gguf`` file carries ``<file>.manifest.json`` beside it. Both hold the format, the
quantlab version, the method and its config (or llama.cpp's type), the calibration set's hash,
the source model (`source_record`) and the sha256 of every file (`verify_files` checks them).
"""

from __future__ import annotations

import json
from pathlib import Path

from quantlab.errors import CorruptFileError
from quantlab.fingerprint import content_sha256

MANIFEST = "quantlab_manifest.json"


def source_record(source) -> dict:
    """What every manifest says about the source model (a `ResolvedModel`)."""
    return {"spec": source.spec, "path": str(source.path), "sha256": content_sha256(source.path)}


def read_manifest(path: str | Path) -> dict | None:
    """The quantlab manifest of a checkpoint folder, or None when there is none (or it is not a
    JSON object)."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def verify_files(path: Path, manifest: dict) -> None:
    """Every file the manifest lists exists under ``path`` and matches its sha256."""
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise CorruptFileError(f"{path}: the manifest's file list is malformed")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CorruptFileError(f"{f} is listed in the manifest but missing")
        if content_sha256(f) != digest:
            raise CorruptFileError(f"{f} does not match its checksum in the manifest")
