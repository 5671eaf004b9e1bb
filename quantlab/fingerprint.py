"""Content hashes of models and artifacts (files or folders), for provenance and cache keys.

A folder's hash covers every file's relative path and bytes, in sorted order, so any change to a
weight, config or tokenizer changes it. Hashing reads everything once (about 1 s per GB); results
are remembered for the life of the process, keyed by path, size and modification time.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_MEMO: dict[tuple, str] = {}
CHUNK = 8 * 1024 * 1024


def _file_digest(path: Path, h) -> None:
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)


def content_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's sorted (relative path, bytes) pairs."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    key = (str(path), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key in _MEMO:
        return _MEMO[key]
    h = hashlib.sha256()
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
            h.update(f.stat().st_size.to_bytes(8, "little"))
        _file_digest(f, h)
    _MEMO[key] = h.hexdigest()
    return _MEMO[key]
