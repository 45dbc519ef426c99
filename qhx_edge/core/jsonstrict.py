"""Strict JSON objects: the one reader of JSON from outside (JWT headers and claims, SPIFFE bundles).

RFC 8259 leaves repeated member names to the receiver ("unpredictable"); the
SPIFFE bundle format requires that they be detected (SPIFFE Trust Domain and
Bundle §6.3), and a JWT whose claims repeat ``aud`` must not mean two things.
So a repeated member is ``malformed``, as are ``NaN`` and ``Infinity`` (not
JSON), text that is not UTF-8, and nesting deeper than the caller allows
(checked before parsing: the parser recurses once per level).
"""

from __future__ import annotations

import json
from typing import Any

from qhx_edge.core.errors import Malformed


def nests_deeper(text: str, limit: int) -> bool:
    """Whether arrays and objects in a JSON text nest deeper than ``limit`` (strings skipped), without
    parsing it (the parser would recurse once per level)."""
    if text.count("[") + text.count("{") <= limit:
        return False  # too few brackets to nest deeper: no need to walk the text
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def strict_object(data: bytes, what: str, *, max_depth: int) -> dict[str, Any]:
    """``data`` as one JSON object, refused as :class:`Malformed` (naming ``what``) unless it is strict JSON."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise Malformed(f"{what} repeats the member {k!r}")
            out[k] = v
        return out

    def no_constant(name: str) -> Any:
        raise Malformed(f"{what} holds {name}, which is not JSON (RFC 8259 §6)")

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Malformed(f"{what} is not UTF-8") from exc
    if nests_deeper(text, max_depth):
        raise Malformed(f"{what} nests deeper than {max_depth} levels")
    try:
        value = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, and integers of too many digits
        raise Malformed(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise Malformed(f"{what} must be a JSON object")
    return value
