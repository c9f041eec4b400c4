"""Typed errors: every bad input says what was expected and what came.

Each error subclasses the built-in exception a Python user would catch for that
kind of mistake (ValueError, TypeError, OSError), so ``except ValueError`` keeps
working while ``except QLoraError`` catches everything from this library.
"""


class QLoraError(Exception):
    """Base class of every error raised by qlora_np."""


class InvalidValueError(QLoraError, ValueError):
    """Input values the formats cannot represent: NaN, inf, empty arrays."""


class ShapeError(QLoraError, ValueError):
    """An array has the wrong number of elements or dimensions."""


class DTypeError(QLoraError, TypeError):
    """An array has a dtype the operation does not accept."""


class BlocksizeError(QLoraError, ValueError):
    """A block size that the chosen format or strategy cannot use."""


class UnknownFormatError(QLoraError, ValueError):
    """An unknown quant type, strategy, backend or option name."""


class StateDictError(QLoraError, ValueError):
    """A checkpoint / state dict that is missing keys or disagrees with itself."""


class CheckpointError(QLoraError, OSError):
    """A model or checkpoint file that is missing, truncated or malformed."""


class UnsupportedModelError(CheckpointError):
    """A model file that is well formed but describes an architecture, option or tensor this
    library does not compute; the message names it."""


class DataError(QLoraError, ValueError):
    """A training-data file or record that cannot be used; the message names the file and line."""


class DeviceError(QLoraError, RuntimeError):
    """A device that cannot be used: "cuda" without numba.cuda, a GPU or its driver, or arrays
    on different devices."""


class DataWarning(UserWarning):
    """Training data that is usable but not all used (records left out, and why)."""
