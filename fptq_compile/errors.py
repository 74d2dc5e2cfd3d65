"""The typed errors of fptq_compile.

Every error the compiler raises on purpose derives from :class:`FptqError`, so a caller
(or the CLI) can catch one type and show a one-line message. Messages name what is
wrong: the node, the module path and the pass where one applies.
"""

from __future__ import annotations


class FptqError(Exception):
    """Base class of every error fptq_compile raises on purpose."""


class ConfigError(FptqError, ValueError):
    """A configuration value or user argument is invalid."""


class ModelLoadError(FptqError):
    """A model could not be loaded (missing path, corrupt file, unsupported architecture)."""


class UnsupportedGraphError(FptqError):
    """The captured graph has no structure the compiler can work with."""


class PreconditionError(FptqError):
    """A pass was run on a graph or plan that does not meet its preconditions."""


class CalibrationError(FptqError):
    """Calibration data is missing, empty or does not fit the model."""


class ExportError(FptqError):
    """Lowering or writing an artifact failed."""


class PassError(FptqError):
    """An unexpected failure inside a pass; the message names the pass."""
