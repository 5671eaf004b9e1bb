"""Model cards: the ``README.md`` an artifact carries, as the Hugging Face Hub reads it.

A card opens with YAML front matter (``base_model``, ``library_name``, ``tags``, ``pipeline_tag``
and quantlab's ``quantization`` block: method, config, format, calibration set and its hash),
then says in prose what the file is, how it was made and how to run it. `add_evaluation`
replaces its "Evaluation" section with the numbers measured by quantlab's harness and how they
were measured. A folder artifact's card is its ``README.md``; a single-file artifact's is
``<stem>.md`` beside it. Cards are documentation: they are not in the manifest's checksums (the
evaluation is added after the artifact is complete).
"""

from __future__ import annotations

import os
from pathlib import Path

EVALUATION = "## Evaluation"


def _front(meta: dict) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def write_card(
    path: Path,
    *,
    title: str,
    meta: dict,
    about: list[str],
    details: list[tuple[str, str]],
    how_to_run: str,
    evaluation: list[str] | None = None,
) -> Path:
    """Write the card at ``path`` (atomically: a temporary file renamed into place)."""
    lines = [_front(meta), f"# {title}", "", *about, "", "## How it was made", ""]
    lines += [f"- **{key}**: {value}" for key, value in details]
    lines += ["", "## How to run it", "", "```", how_to_run.strip(), "```", "", EVALUATION, ""]
    lines += evaluation or ["Not evaluated yet."]
    _write(Path(path), "\n".join(lines).rstrip() + "\n")
    return Path(path)


def add_evaluation(path: Path, lines: list[str]) -> None:
    """Replace the card's evaluation section with ``lines`` (a card that is not there, or not
    quantlab's, is left alone)."""
    path = Path(path)
    if not path.is_file():
        return
    text = path.read_text()
    if EVALUATION not in text:
        return
    head = text[: text.index(EVALUATION)]
    _write(path, head + EVALUATION + "\n\n" + "\n".join(lines).rstrip() + "\n")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
