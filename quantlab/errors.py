"""Errors that quantlab raises for bad input.

Every error a user can cause (a missing folder, a corrupt file, an unsupported architecture, a
dataset that is not there) is a `QuantlabError` subclass whose message names the problem in one
line. The CLI prints that line and exits with status 2; anything else is a bug in quantlab.
"""

from __future__ import annotations


class QuantlabError(Exception):
    """Base class: a problem with the user's input or environment, explained in one line."""


class ModelNotFoundError(QuantlabError):
    """A model spec names no embedded model, no local folder and no reachable Hub repository."""


class InvalidModelError(QuantlabError):
    """A model folder exists but is not a usable Hugging Face model (no config, bad JSON, ...)."""


class UnsupportedArchitectureError(QuantlabError):
    """The model's architecture has no `ArchSpec`."""


class CorruptFileError(QuantlabError):
    """A weight or data file is truncated or malformed."""


class UnsafeModelError(QuantlabError):
    """Loading would execute code from the model files (pickle weights, trust_remote_code)."""


class OfflineError(QuantlabError):
    """Something needs the Hugging Face Hub and the Hub cannot be reached."""


class DataError(QuantlabError):
    """A corpus or calibration set cannot be built from what is available."""


class ConfigError(QuantlabError):
    """A configuration value is out of range or inconsistent."""


class MissingDependencyError(QuantlabError):
    """An optional package needed for this feature is not installed."""


class FormatError(QuantlabError):
    """A result cannot be written in the requested checkpoint format without losing something."""
