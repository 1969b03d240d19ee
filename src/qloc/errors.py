"""Errors qloc reports to users: each names the input it is about."""


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
