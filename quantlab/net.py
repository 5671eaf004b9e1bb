"""Is the Hugging Face Hub reachable? Decided once per process, in about a second at most.

quantlab runs air-gapped as often as not. Asking the Hub on a machine without a network costs
``datasets`` and ``huggingface_hub`` five retries with back-off (~31 s) per request, so a sweep
that asked for every corpus of every variant spent half its time waiting. Instead, the first
caller that would go to the Hub asks `hub_reachable()`: ``HF_HUB_OFFLINE`` set means no; else one
TCP connection to the Hub's host is tried with a short timeout (name resolution included, in a
thread that is not waited for beyond the timeout). The answer is remembered for the process; when
it is no, the Hub libraries are also switched to offline mode for the rest of the process (so
nothing else in them retries either), and callers fall back to local data or fail at once with a
clear message.
"""

from __future__ import annotations

import socket
import threading

from quantlab import settings

HUB_HOST = "huggingface.co"
TIMEOUT_S = 1.0

_answer: bool | None = None
_reason = ""  # why the Hub is not used, once decided
_lock = threading.Lock()


def _connects(host: str, port: int, timeout: float) -> bool:
    """One TCP connection to ``host``, within ``timeout`` seconds all in (DNS included)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:  # no route, refused, resolver failure, timeout
            result.append(False)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout + 0.25)  # a resolver that hangs is left behind, not waited for
    return bool(result and result[0])


def hub_reachable() -> bool:
    """Whether the Hugging Face Hub can be reached from this process (decided once)."""
    global _answer, _reason
    with _lock:
        if _answer is None:
            if settings.hub_offline():
                _answer, _reason = False, "offline mode is set (HF_HUB_OFFLINE)"
            else:
                _answer = _connects(HUB_HOST, 443, TIMEOUT_S)
                _reason = "" if _answer else "the Hub cannot be reached"
            if not _answer:
                go_offline()
        return _answer


def why_offline() -> str:
    """Why the Hub is not used ("" when it is, or before `hub_reachable` decided)."""
    return _reason


def go_offline() -> None:
    """Put the Hub libraries into offline mode for this process: no request, no retry."""
    import sys

    settings.set_hub_offline()
    # the libraries read these at import; if they are already imported, tell them directly
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True


def forget() -> None:
    """Decide again at the next call (tests)."""
    global _answer, _reason
    with _lock:
        _answer, _reason = None, ""
