"""Where quantlab keeps its cache and finds local datasets.

These are the only settings read from the environment, and only here:

- ``QUANTLAB_CACHE``: the cache folder (converted models, tiny test models); default
  ``~/.cache/quantlab``.
- ``QUANTLAB_DATA``: the local data root, laid out like the project's shared data folder
  (``wikitext-2-raw/``, ``calibration/c4/``, ``piqa/``, ...). Unset means "no local data": corpora
  then come from the Hub when online, or the embedded fallback corpus.
- ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` (the Hugging Face libraries' own): set, quantlab
  never tries the Hub (`quantlab.net`); quantlab sets them itself once it finds the Hub
  unreachable, so that those libraries do not retry either.

Every function that uses them also takes an explicit argument, which wins.
"""

from __future__ import annotations

import os
from pathlib import Path

from quantlab.errors import DataError


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The cache folder (created on demand by whoever writes into it)."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get("QUANTLAB_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "quantlab"


def data_root(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local data root, or None when none is configured.

    A configured root that does not exist is an error rather than silently ignored: a typo in
    ``QUANTLAB_DATA`` must not quietly switch the evaluation to another corpus.
    """
    value = explicit if explicit is not None else os.environ.get("QUANTLAB_DATA") or None
    if value is None:
        return None
    root = Path(value).expanduser()
    if not root.is_dir():
        source = "data root" if explicit is not None else "QUANTLAB_DATA"
        raise DataError(f"{source} points to {root}, which is not a folder")
    return root


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_offline() -> bool:
    """Whether the user put the Hugging Face libraries in offline mode."""
    values = (os.environ.get(v, "") for v in _OFFLINE_VARS)
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in values)


def set_hub_offline() -> None:
    """Offline mode for this process and its children (the Hub libraries read these)."""
    for var in _OFFLINE_VARS:
        os.environ[var] = "1"
