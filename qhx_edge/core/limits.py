"""Caps every decoder shares (docs/architecture.md "Verification rules": size caps on everything).

``MAX_INT``: the largest integer any decoded message may carry.  Every integer
of a document, a pack manifest or an evidence segment ends up in SQLite, whose
INTEGER is a signed 64-bit value: a larger one would fail at the database
instead of being refused as ``malformed`` where it was read.
"""

from __future__ import annotations

from typing import Any

MAX_INT = 2**63 - 1


def is_uint(value: Any, minimum: int = 0) -> bool:
    """Whether ``value`` is an integer (not a bool) from ``minimum`` to :data:`MAX_INT`."""
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= MAX_INT
