"""`quantlab verify ARTIFACT`: is this artifact complete, intact and loadable?

The registry finds the artifact's format and the format runs its checks (`Format.verify`). For a
checkpoint folder (GPTQ, AWQ, compressed-tensors, native): the quantlab manifest is present (a
folder without one was not finished by quantlab, or not written by it: reported), every file it
lists exists and matches its sha256, every tensor has the shape the config implies, and the
checkpoint loads into a model. For a ``.gguf`` file: the file parses, its architecture is one
llama.cpp runs, its ``.manifest.json`` (when quantlab wrote it) matches its sha256 and per-tensor
types, and llama.cpp loads it. Each check is printed; the exit status is 0 when all pass, 2 when
one fails (the first failure is named), so scripts can rely on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from quantlab.errors import QuantlabError


@dataclass
class Verification:
    artifact: str
    kind: str
    checks: list[tuple[str, str]] = field(default_factory=list)  # (check, outcome)


def _ok(report: Verification, log, check: str, outcome: str) -> None:
    report.checks.append((check, outcome))
    log(f"ok  {check:<13} {outcome}")


def verify(artifact: str | Path, log: Callable[[str], None] = print) -> Verification:
    """Run every check on ``artifact``; raises a `QuantlabError` naming the first failure."""
    from quantlab.formats import detect

    path = Path(artifact)
    if not path.exists():
        raise QuantlabError(f"{path} does not exist")
    if path.name.startswith(".") and ".tmp-" in path.name:
        raise QuantlabError(f"{path} is an unfinished temporary (a write was interrupted)")
    found = detect(path)
    if found is None:
        raise QuantlabError(
            f"{path}: not an artifact quantlab reads (a checkpoint folder or .gguf)"
        )
    fmt, options = found
    report = Verification(str(path), fmt.label(options))
    _ok(report, log, "format", report.kind)
    fmt.verify(path, lambda check, outcome: _ok(report, log, check, outcome))
    return report
