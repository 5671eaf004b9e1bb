"""Data: text corpora (local first, Hub when online, embedded fallback) and calibration sets."""

from quantlab.data.calibration import (
    CalibrationConfig,
    CalibrationSet,
    build_calibration,
    calibration_for,
    hash_token_ids,
    tokenize_corpus,
)
from quantlab.data.corpora import Corpus, corpus_entry, corpus_names, load_corpus, register_corpus

__all__ = [
    "CalibrationConfig",
    "CalibrationSet",
    "Corpus",
    "build_calibration",
    "calibration_for",
    "corpus_entry",
    "corpus_names",
    "hash_token_ids",
    "load_corpus",
    "register_corpus",
    "tokenize_corpus",
]
