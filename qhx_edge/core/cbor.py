"""Deterministic CBOR (RFC 8949 §4.2.1, "core deterministic encoding").

Everything qhx-edge signs or stores goes through :func:`encode`, and every
byte string it reads goes through :func:`decode`, which accepts input only if
re-encoding the decoded value gives back exactly the same bytes.  That single
comparison rejects every non-deterministic form (non-minimal integer or length
heads, indefinite lengths, duplicate or unsorted map keys, non-shortest
floats) without a hand-written parser: cbor2 parses, we re-encode and compare.

Map keys are ordered by the bytewise order of their encodings (§4.2.1), not
cbor2's ``canonical=True`` length-first order (RFC 7049 §3.9), which differs
for keys of mixed types such as COSE's positive and negative labels.

The data model is deliberately small: unsigned and negative integers of at
most 64 bits, byte and text strings, arrays, maps, booleans, null, and tags
the caller names (COSE_Sign is tag 98).  Floats, undefined, simple values,
bignums and every other tag are refused as ``malformed``: nothing we sign
needs them, and each is a place for two encoders to disagree.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from typing import Any

import cbor2

from qhx_edge.core.errors import Incomplete, Malformed, NonDeterministic, Oversize

MAX_DEPTH = 24
_INT_MIN = -(2**64)
_INT_MAX = 2**64 - 1

Value = Any  # int | bytes | str | bool | None | list[Value] | dict[Value, Value] | cbor2.CBORTag


# Tags cbor2 interprets itself even with ``semantic_decoders={}`` (datetimes,
# bignums, decimals, shared and string references, sets, IP addresses, MIME,
# and the self-describe prefix 55799, which it silently drops).  Each is handed
# back as a plain CBORTag so that _normalise refuses it as ``malformed`` like
# any other tag the caller did not name, instead of cbor2 parsing it (or
# dropping it, which surfaced as ``non-deterministic``).
_CBOR2_SEMANTIC_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 55799)


def _raw_tag(tag: int) -> Callable[[Any, bool], cbor2.CBORTag]:
    return lambda value, _immutable: cbor2.CBORTag(tag, value)


_RAW_TAGS = {tag: _raw_tag(tag) for tag in _CBOR2_SEMANTIC_TAGS}


@functools.lru_cache(maxsize=4096, typed=True)
def _key_bytes(key: Value) -> bytes:
    """The encoding of a map key, which decides its order (§4.2.1).

    Cached: documents repeat the same few keys, and this ran once per key per
    map.  ``typed`` keeps ``True`` and ``1`` (equal in Python) apart.
    """
    return cbor2.dumps(key)


def _prepare(value: Value, depth: int = 0) -> Value:
    """Return ``value`` with every map rebuilt in RFC 8949 §4.2.1 key order."""
    if depth > MAX_DEPTH:
        raise Malformed(f"CBOR nesting deeper than {MAX_DEPTH}")
    if isinstance(value, bool) or value is None or isinstance(value, (bytes, str)):
        return value
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise Malformed("integer outside the 64-bit CBOR range")
        return value
    if isinstance(value, (list, tuple)):
        return [_prepare(v, depth + 1) for v in value]
    if isinstance(value, dict):
        items = [(_key_bytes(k), _prepare(k, depth + 1), _prepare(v, depth + 1)) for k, v in value.items()]
        items.sort(key=lambda item: item[0])
        return {k: v for _, k, v in items}
    if isinstance(value, cbor2.CBORTag):
        return cbor2.CBORTag(value.tag, _prepare(value.value, depth + 1))
    raise Malformed(f"type {type(value).__name__} is not allowed in deterministic CBOR")


def encode(value: Value) -> bytes:
    """Encode ``value`` deterministically (RFC 8949 §4.2.1)."""
    return cbor2.dumps(_prepare(value))


def _normalise(value: Value, tags: frozenset[int], depth: int = 0) -> Value:
    """Turn cbor2's output into plain lists and dicts, refusing what we do not allow."""
    if depth > MAX_DEPTH:
        raise Malformed(f"CBOR nesting deeper than {MAX_DEPTH}")
    if isinstance(value, bool) or value is None or isinstance(value, (bytes, str)):
        return value
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise Malformed("integer outside the 64-bit CBOR range (bignums are not allowed)")
        return value
    if isinstance(value, (list, tuple)):
        return [_normalise(v, tags, depth + 1) for v in value]
    if isinstance(value, dict) or (hasattr(value, "items") and not isinstance(value, cbor2.CBORTag)):
        out: dict[Value, Value] = {}
        for k, v in value.items():
            nk = _normalise(k, tags, depth + 1)
            if isinstance(nk, bool) or not isinstance(nk, (int, str, bytes)):
                raise Malformed("map keys must be integers, text or byte strings")
            out[nk] = _normalise(v, tags, depth + 1)
        if len(out) > 1:  # RFC 8949 §4.2.1 key order, as _prepare sorts (decode needs no second pass)
            out = dict(sorted(out.items(), key=lambda item: _key_bytes(item[0])))
        return out
    if isinstance(value, cbor2.CBORTag):
        if value.tag not in tags:
            raise Malformed(f"CBOR tag {value.tag} is not allowed here")
        return cbor2.CBORTag(value.tag, _normalise(value.value, tags, depth + 1))
    if isinstance(value, float):
        raise Malformed("floating-point values are not allowed")
    raise Malformed(f"CBOR item of type {type(value).__name__} is not allowed")


def decode(data: bytes, *, max_size: int, tags: frozenset[int] = frozenset()) -> Value:
    """Decode one deterministic CBOR item that fills ``data`` exactly.

    Raises :class:`Oversize` beyond ``max_size`` bytes, :class:`Malformed` for
    anything that is not one well-formed item of the allowed data model, and
    :class:`NonDeterministic` for a well-formed item that is not in
    deterministic encoding.  Nothing else escapes.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise Malformed("expected bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise Oversize(f"{len(data)} bytes exceeds the cap of {max_size}")
    return _decode(data, tags, whole=True)[0]


def decode_prefix(data: bytes, *, tags: frozenset[int] = frozenset()) -> tuple[Value, int]:
    """Decode the deterministic CBOR item at the start of ``data``; return it and its length.

    For framed files whose first item is a header followed by raw bytes (a
    sealed pack): the header is checked exactly like :func:`decode` checks a
    whole input, the rest is left to the caller.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise Malformed("expected bytes")
    return _decode(bytes(data), tags, whole=False)


def _decode(data: bytes, tags: frozenset[int], *, whole: bool) -> tuple[Value, int]:
    if not data:
        raise Malformed("empty input")
    fp = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            fp,
            max_depth=MAX_DEPTH + 2,
            allow_indefinite=True,  # decoded, then refused by the byte comparison
            allow_duplicate_keys=True,  # likewise: the re-encoding is shorter
            semantic_decoders=_RAW_TAGS,
            str_errors="strict",
        )
        raw = decoder.decode()
    except RecursionError as exc:
        raise Malformed("CBOR nesting too deep") from exc
    except cbor2.CBORDecodeEOF as exc:
        raise Incomplete(f"CBOR data ends early (truncated or still being written): {exc}") from exc
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, MemoryError, LookupError, RuntimeError) as exc:
        # RuntimeError: cbor2 refuses some unhashable map keys (a tag as key) that way.
        raise Malformed(f"not well-formed CBOR: {exc}") from exc
    end = fp.tell()
    if whole and end != len(data):
        raise Malformed(f"{len(data) - end} trailing bytes after the CBOR item")
    value = _normalise(raw, tags)
    # _normalise refuses all that _prepare refuses and already orders every map
    # as _prepare would, so this is encode(value) without its second traversal.
    encoded = cbor2.dumps(value)
    same = encoded == data if end == len(data) else encoded == data[:end]  # no copy in the common case
    if not same:
        raise NonDeterministic("input is not in deterministic CBOR encoding (RFC 8949 §4.2.1)")
    return value, end
