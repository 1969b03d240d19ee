"""Errors qloc reports to users: each names the input it is about."""

from __future__ import annotations

import logging
from collections.abc import Callable

NOTE = 25
"""Log level of messages qloc shows even where progress is quiet (between INFO and WARNING)."""
logging.addLevelName(NOTE, "NOTE")


class QlocError(Exception):
    """An error caused by user input or environment, with a message meant for the user."""


class UnsupportedArchitectureError(QlocError):
    """The model's family has no entry in qloc's architecture table."""


class DataError(QlocError):
    """Input data (a ParaRel file, a prompt, an answer) that qloc cannot use."""


class RunDirectoryError(QlocError):
    """A run directory that belongs to another run or is not a qloc run directory."""


class ContextLengthError(QlocError):
    """A prompt that, with its answer, is longer than the model's context. A sweep skips the unit
    it belongs to, with this message as the reason; elsewhere it is an input error."""


class ConfigError(QlocError):
    """A setting qloc cannot use. The message names each setting by its Python name (a field of a
    study's config, an argument); the command line shows its flag there instead.

    ``describe`` writes the message given a function that names a setting: ``ConfigError(lambda
    name: f"{name('steps')} must be at least 1")``; :meth:`invalid` writes the usual form."""

    def __init__(self, describe: Callable[[Callable[[str], str]], str]) -> None:
        self.describe = describe
        super().__init__(describe(str))

    @classmethod
    def invalid(cls, setting: str, value: object, problem: str) -> ConfigError:
        """``<setting> <value>: <problem>``."""
        return cls(lambda name: f"{name(setting)} {value!r}: {problem}")


def first_line(exc: BaseException) -> str:
    """The first line of a library's error message, to quote in one of qloc's."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
