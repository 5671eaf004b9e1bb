"""Text corpora for evaluation and calibration, from local files first.

A corpus is a tuple of documents plus where they came from. Sources, in the order tried:
1. the local data root (``QUANTLAB_DATA``, laid out like the project's shared data folder);
2. the Hugging Face Hub through ``datasets``, when installed and online;
3. for callers that allow it, the embedded fallback corpus ``pydoc``: the English text of
   Python's own documentation, shipped with every CPython as ``pydoc_data.topics``. It is *not* a
   standard benchmark corpus: numbers on it compare variants with each other, not with papers.

Any local ``.txt`` / ``.jsonl`` file or folder of them is a corpus too (``.jsonl``: one document per
line, in its ``text`` field).

Layout of the local files (see the data folder's SOURCES.md): WikiText-2 raw is one line per
Hugging Face row, with an empty row stored as the line " "; the GPTQ papers evaluate on
``"\\n\\n".join(rows)``, which `Corpus.text` reproduces.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from quantlab import settings
from quantlab.errors import DataError

DOC_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Corpus:
    """Documents of one corpus split, and their provenance."""

    name: str
    split: str
    documents: tuple[str, ...]
    source: str  # a file path, "hub:<dataset id>", or "python:pydoc_data.topics"
    standard: bool  # a published benchmark corpus (numbers comparable with papers)
    note: str = ""
    raw: str | None = None  # the exact file text, when the corpus is one file (llama.cpp reads it)

    def text(self, separator: str = DOC_SEPARATOR) -> str:
        return separator.join(self.documents)

    @cached_property
    def sha256(self) -> str:
        """Hash of ``text()``: identifies the exact content evaluated or sampled."""
        return hashlib.sha256(self.text().encode("utf-8")).hexdigest()

    @property
    def label(self) -> str:
        tag = "" if self.standard else " [non-standard corpus]"
        return f"{self.name}/{self.split}{tag}"


Loader = Callable[[str, "Path | None"], Corpus]


@dataclass(frozen=True)
class CorpusEntry:
    name: str
    splits: tuple[str, ...]
    description: str
    loader: Loader


_CORPORA: dict[str, CorpusEntry] = {}


def register_corpus(name: str, splits: tuple[str, ...], description: str):
    """Decorator registering ``loader(split, data_root) -> Corpus`` under ``name``."""

    def wrap(loader: Loader) -> Loader:
        if name in _CORPORA:
            raise ValueError(f"corpus {name!r} is already registered")
        _CORPORA[name] = CorpusEntry(name, splits, description, loader)
        return loader

    return wrap


def corpus_names() -> list[str]:
    return list(_CORPORA)


def corpus_entry(name: str) -> CorpusEntry:
    try:
        return _CORPORA[name]
    except KeyError:
        raise DataError(
            f"unknown corpus {name!r}; known: {', '.join(_CORPORA)}, or a path to a "
            ".txt/.jsonl file or folder"
        ) from None


def _from_hub(dataset: str, config: str | None, split: str, **kwargs) -> list[str]:
    """The ``text`` column of a Hub dataset split, or `DataError` naming why not. Without a
    reachable Hub (decided once per process, `quantlab.net`) the answer is immediate."""
    from quantlab.net import hub_reachable, why_offline

    if not hub_reachable():
        raise DataError(f"hub:{dataset} is unavailable: {why_offline()}")
    try:
        import datasets
    except ImportError:
        raise DataError(f"hub:{dataset} needs the 'datasets' package") from None
    try:
        rows = datasets.load_dataset(dataset, config, split=split, **kwargs)
    except Exception as exc:  # network errors, missing splits: one line for the user
        msg = f"{type(exc).__name__}: {exc}"
        raise DataError(f"hub:{dataset} could not be loaded ({msg})") from None
    return list(rows["text"])


def _local(data_root: Path | None, *parts: str) -> Path | None:
    if data_root is None:
        return None
    path = data_root.joinpath(*parts)
    return path if path.exists() else None


def _unavailable(name: str, local: str, hub_error: DataError) -> DataError:
    return DataError(
        f"corpus {name} is not available: no {local} under the data root (set QUANTLAB_DATA) and "
        f"{hub_error}"
    )


@register_corpus("wikitext2", ("test", "validation"), "WikiText-2 raw v1 (Merity et al. 2016)")
def _wikitext2(split: str, data_root: Path | None) -> Corpus:
    fname = {"test": "wiki.test.raw", "validation": "wiki.valid.raw"}[split]
    path = _local(data_root, "wikitext-2-raw", fname)
    if path is not None:
        raw = path.read_text(encoding="utf-8")
        lines = [line + "\n" for line in raw.split("\n")]
        lines[-1] = lines[-1][:-1]  # text after the last newline (empty for a well-formed file)
        rows = tuple("" if line == " \n" else line for line in lines if line)
        return Corpus("wikitext2", split, rows, str(path), standard=True, raw=raw)
    try:
        rows = _from_hub("Salesforce/wikitext", "wikitext-2-raw-v1", split)
    except DataError as exc:
        raise _unavailable("wikitext2", f"wikitext-2-raw/{fname}", exc) from None
    raw = "".join(row or " \n" for row in rows)  # the file behind the rows (see module doc)
    return Corpus("wikitext2", split, tuple(rows), "hub:Salesforce/wikitext", True, raw=raw)


C4_HUB_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


@register_corpus("c4", ("train", "validation"), "C4 English web text (local sample or Hub shard)")
def _c4(split: str, data_root: Path | None) -> Corpus:
    if split == "train":
        path = _local(data_root, "calibration", "c4", "c4_prefix_completion.pf-decoding.jsonl")
        if path is not None:
            docs = []
            for line in path.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                docs.append(rec["prefix"] + rec["gold_completion"])
            note = "local sample: 1,480 C4 excerpts (not the first C4 train shard)"
            return Corpus("c4", split, tuple(docs), str(path), standard=False, note=note)
    else:
        folder = _local(data_root, "calibration", "c4")
        files = sorted(folder.glob("olmo-c4-sample.*.json.gz")) if folder else []
        if files:
            docs = []
            for f in files:
                with gzip.open(f, "rt", encoding="utf-8") as fh:
                    docs += [json.loads(line)["text"] for line in fh if line.strip()]
            note = "local sample: 30 C4 documents (OLMo test fixtures)"
            return Corpus("c4", split, tuple(docs), str(folder), standard=False, note=note)
    try:
        docs = _from_hub("allenai/c4", None, "train", data_files={"train": C4_HUB_FILES[split]})
    except DataError as exc:
        raise _unavailable("c4", "calibration/c4/", exc) from None
    return Corpus("c4", split, tuple(docs), f"hub:allenai/c4 {C4_HUB_FILES[split]}", standard=True)


LAMBADA_NOTE = "perplexity over whole passages (not LAMBADA's last-word task, which lm-eval runs)"


@register_corpus("lambada", ("test",), "LAMBADA passages (Paperno et al. 2016): novels")
def _lambada(split: str, data_root: Path | None) -> Corpus:
    path = _local(data_root, "lambada", "lambada_test.jsonl")
    if path is not None:
        lines = path.read_text(encoding="utf-8").splitlines()
        docs = tuple(json.loads(line)["text"] for line in lines if line.strip())
        return Corpus("lambada", split, docs, str(path), standard=False, note=LAMBADA_NOTE)
    try:
        docs = _from_hub("EleutherAI/lambada_openai", "default", "test")
    except DataError as exc:
        raise _unavailable("lambada", "lambada/lambada_test.jsonl", exc) from None
    hub = "hub:EleutherAI/lambada_openai"
    return Corpus("lambada", split, tuple(docs), hub, standard=False, note=LAMBADA_NOTE)


@register_corpus("pydoc", ("all",), "embedded fallback: Python's documentation (pydoc_data)")
def _pydoc(split: str, data_root: Path | None) -> Corpus:
    from pydoc_data.topics import topics

    docs = tuple(topics[key].strip() for key in sorted(topics))
    note = "embedded fallback corpus, not a standard benchmark; varies with the Python version"
    return Corpus("pydoc", split, docs, "python:pydoc_data.topics", standard=False, note=note)


def _from_path(path: Path) -> Corpus:
    files = [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
    if not files:
        raise DataError(f"{path} holds no .txt or .jsonl files")
    docs: list[str] = []
    for f in files:
        if f.suffix == ".jsonl":
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    docs.append(str(json.loads(line)["text"]))
                except (ValueError, KeyError, TypeError):
                    msg = f"{f}:{i}: expected a JSON object with a 'text' field"
                    raise DataError(msg) from None
        elif f.suffix == ".txt":
            docs.append(f.read_text(encoding="utf-8"))
        else:
            raise DataError(f"{f}: a local corpus must be a .txt or .jsonl file")
    raw = docs[0] if files == [path] and path.suffix == ".txt" else None
    return Corpus(path.name, "all", tuple(docs), str(path), standard=False, raw=raw)


_LOADED: dict[tuple, Corpus] = {}  # this process's corpora: a sweep loads each one once


def load_corpus(
    name: str,
    split: str | None = None,
    *,
    data_root: str | os.PathLike | None = None,
    fallback: bool = False,
) -> Corpus:
    """Load a corpus split; with ``fallback``, an unavailable corpus becomes ``pydoc`` (labelled).

    ``name`` is a registered corpus, ``hub:<dataset>`` or a path to a .txt/.jsonl file or folder.
    Registered and Hub corpora are loaded once per process (later calls get the same `Corpus`);
    local files are read each time (they may change).
    """
    root = settings.data_root(data_root)
    if name in _CORPORA:
        split = split or _CORPORA[name].splits[0]
    key = (name, split, str(root), fallback)
    if key in _LOADED:
        return _LOADED[key]
    corpus = _load(name, split, root, fallback)
    if name in _CORPORA or name.startswith("hub:"):
        _LOADED[key] = corpus
    return corpus


def _load(name: str, split: str | None, root: Path | None, fallback: bool) -> Corpus:
    if name.startswith("hub:"):
        dataset = name[4:]
        docs = _from_hub(dataset, None, split or "train")
        return Corpus(dataset, split or "train", tuple(docs), name, standard=False)
    if name not in _CORPORA and (Path(name).expanduser().exists() or os.sep in name):
        path = Path(name).expanduser()
        if not path.exists():
            raise DataError(f"corpus file {path} does not exist")
        return _from_path(path)
    entry = corpus_entry(name)
    split = split or entry.splits[0]
    if split not in entry.splits:
        raise DataError(f"corpus {name} has no split {split!r}; splits: {', '.join(entry.splits)}")
    try:
        return entry.loader(split, root)
    except DataError as exc:
        if not fallback:
            raise
        corpus = _pydoc("all", root)
        return dataclasses.replace(corpus, note=f"fallback: {exc}")
