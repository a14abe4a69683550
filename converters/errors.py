"""The one exception type the converters raise, and a helper to list keys in messages."""
from __future__ import annotations

from typing import Iterable


class ConversionError(ValueError):
    """A checkpoint could not be converted (bad path, corrupt file, wrong keys/shapes/dtypes)."""


def key_list(keys: Iterable[str], limit: int = 20) -> str:
    """``'a', 'b', ... (+N more; M total)`` for error messages."""
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    if len(keys) > limit:
        shown += f", ... (+{len(keys) - limit} more; {len(keys)} total)"
    return shown
