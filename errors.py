"""The exceptions edgelora raises.

Every error a user can cause derives from :class:`EdgeLoraError`; the CLIs print its
message (no traceback) and exit non-zero. Messages name the file, key and shapes involved.
:class:`InternalError` is a bug in edgelora, not an input problem: it keeps its traceback.
"""


class EdgeLoraError(Exception):
    """Base class: an input problem the user can fix, reported without a traceback."""


class ConfigError(EdgeLoraError, ValueError):
    """A model or export configuration value is invalid (names the field)."""


class CheckpointError(EdgeLoraError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


class AdapterError(EdgeLoraError, ValueError):
    """A LoRA adapter is missing, malformed, or does not fit the model."""


class OutputError(EdgeLoraError):
    """The output location cannot be written as asked (e.g. holds another model's export)."""


class ProgramError(EdgeLoraError):
    """A ``.pte``/``.ptd`` file is missing, corrupt, or the pair does not fit together."""


class DependencyError(EdgeLoraError):
    """An option needs a library (or a part of one) this installation lacks (names both)."""


class InternalError(RuntimeError):
    """An invariant of edgelora itself broke (a bug to report, never caused by input)."""
