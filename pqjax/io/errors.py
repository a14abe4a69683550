"""The exception pqjax's own files raise (converters raise ``converters.ConversionError`` for foreign layouts)."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read (missing, incomplete, corrupt, another model or format, newer version)."""
