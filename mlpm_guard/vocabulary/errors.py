"""Exceptions raised by mlpm-guard. Every message names what was wrong and how to fix it."""

from __future__ import annotations


class MlpmGuardError(Exception):
    """Base class of every error mlpm-guard raises on purpose."""


class ConfigError(MlpmGuardError, ValueError):
    """An argument, option or configuration file has an invalid value."""


class DataError(MlpmGuardError, ValueError):
    """A labelled data file cannot be read (missing column, unknown label, empty file)."""


class NotFittedError(MlpmGuardError, RuntimeError):
    """A :class:`~mlpm_guard.Prototypes` was used before ``fit`` or ``load``."""


class BackboneMismatchError(MlpmGuardError, ValueError):
    """Prototypes were fitted on a different backbone than the one they are used with."""


class PrototypeFileError(MlpmGuardError, ValueError):
    """A saved prototype folder is missing, truncated, corrupted or from an unknown format."""


class BackboneLoadError(MlpmGuardError, RuntimeError):
    """The backbone model or tokenizer could not be loaded."""


class InputError(MlpmGuardError, ValueError):
    """A prompt or message list is not of an accepted form."""


class InputTypeError(InputError, TypeError):
    """A guard method was called with an argument of the wrong type (a programming error, raised at the call)."""
