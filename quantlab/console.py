"""What a long command shows on the terminal: one progress display and quantlab's own lines.

Inside `session(log_path)`, everything that is not quantlab's own goes to the log file:
- the process's file descriptor 2 is pointed at the log, so native libraries (llama.cpp's
  per-tensor quantization log, torch's C++ warnings, failed optional native loads) write there;
- ``sys.stderr`` (Python warnings, library progress bars and logging handlers) writes there too,
  and the root logger gets a handler on the file.
quantlab's own messages (`say`) and its progress display (`progress`) write to the terminal
through a duplicate of the original descriptor. With ``verbose`` nothing is redirected. When the
command fails, the end of the log is shown with its path. Outside a session, `say` and
`progress` write to ``sys.stderr`` as usual (library use, tests).

`progress` is a bar on a terminal (tqdm: variant i/N, stage, elapsed, time left) and one line
per stage otherwise (a captured or piped run stays readable).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

_terminal = None  # the real stderr while a session redirects fd 2, else None
_inner_bars = True  # whether nested progress bars (a method's blocks) reach the terminal


def stream():
    """Where quantlab's own output goes: the terminal (during a session) or ``sys.stderr``."""
    return _terminal if _terminal is not None else sys.stderr


def bar_stream():
    """Where a nested progress bar goes (a method's blocks, evaluation windows): the terminal
    for a single-artifact command, the log during a sweep (which has its own display)."""
    return stream() if _inner_bars else sys.stderr


def say(message: str) -> None:
    """One line of quantlab's own on the terminal."""
    out = stream()
    try:
        from tqdm import tqdm

        tqdm.write(message, file=out)
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        print(message, file=out, flush=True)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    text = text.replace("\r", "\n")
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(kept)


@contextlib.contextmanager
def session(log_path: Path | None, *, verbose: bool = False, inner_bars: bool = True) -> Iterator:
    """Send third-party output to ``log_path`` for the duration (see the module docstring)."""
    global _terminal, _inner_bars
    if verbose or log_path is None or _terminal is not None:
        yield None
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a", buffering=1, errors="replace")  # noqa: SIM115 (closed below)
    log.write(f"\n=== quantlab {' '.join(sys.argv[1:])} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fd = os.dup(2)
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    old_stderr = sys.stderr
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    handler = logging.StreamHandler(log)
    root = logging.getLogger()
    root.addHandler(handler)
    logging.captureWarnings(True)
    _terminal, _inner_bars = terminal, inner_bars
    failed = False
    try:
        yield log_path
    except BaseException:
        failed = True
        raise
    finally:
        _terminal, _inner_bars = None, True
        logging.captureWarnings(False)
        root.removeHandler(handler)
        sys.stderr.flush()
        sys.stderr = old_stderr
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        log.close()
        if failed:
            tail = _tail(log_path)
            if tail:
                print(f"--- the end of {log_path} ---\n{tail}\n---", file=terminal, flush=True)
        terminal.close()


class Progress:
    """One display for a run of ``total`` items: a bar on a terminal, lines otherwise."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc = total, desc
        self.start = time.perf_counter()
        self.done = 0
        self.out = stream()
        self.bar = None
        if getattr(self.out, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="variant", file=self.out)

    def _eta(self) -> str:
        if not self.done:
            return ""
        left = (time.perf_counter() - self.start) / self.done * (self.total - self.done)
        return f", ~{_duration(left)} left"

    def stage(self, index: int, name: str, what: str) -> None:
        """Item ``index`` (from 1) of ``total``, called ``name``, is now doing ``what``."""
        if self.bar is not None:
            self.bar.set_postfix_str(f"{index}/{self.total} {name}: {what}")
            return
        elapsed = _duration(time.perf_counter() - self.start)
        if index > self.total:  # the end
            line = f"{self.desc}: {what} ({self.done}/{self.total} in {elapsed})"
        else:
            line = f"[{index}/{self.total}] {name}: {what} ({elapsed} elapsed{self._eta()})"
        print(line, file=self.out, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress(total: int, desc: str) -> Progress:
    return Progress(total, desc)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
