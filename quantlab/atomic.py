"""Write a folder so that it appears complete or not at all.

`atomic_directory(final)` yields a fresh temporary folder beside ``final`` (same file system);
when the block finishes, the files are flushed to disk and the folder is renamed to ``final`` in
one step. If the block raises, or the process dies, only a ``.<name>.tmp-*`` folder is left, which
no reader treats as a result. Used for the model cache now and for every artifact later.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantlab.errors import QuantlabError

TMP_MARKER = ".tmp-"


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``final`` when the block completes without error.

    If ``final`` already exists when the block ends (another process finished first), the new
    copy is discarded and the existing one kept.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARKER}", dir=final.parent))
    except OSError as exc:
        raise QuantlabError(f"cannot create a folder in {final.parent}: {exc.strerror}") from exc
    try:
        yield tmp
        _fsync_tree(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise QuantlabError(f"could not write {final}: {exc.strerror or exc}") from exc
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_io_error(exc):  # e.g. safetensors' "I/O error: No space left on device"
            raise QuantlabError(f"could not write {final}: {exc}") from exc
        raise


def _is_io_error(exc: BaseException) -> bool:
    """An error raised by a native writer (safetensors, gguf) for a failed write."""
    return type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc)
