"""Deterministic CBOR (RFC 8949 §4.2.1, "core deterministic encoding").

Everything qhx-edge signs or stores goes through :func:`encode`, and every
byte string it reads goes through :func:`decode`, which accepts input only if
re-encoding the decoded value gives back exactly the same bytes.  That single
comparison rejects every non-deterministic form (non-minimal integer or length
heads, indefinite lengths, duplicate or unsorted map keys, non-shortest
floats) without a hand-written parser: cbor2 parses, we re-encode and compare.

Most input is deterministic, so :func:`decode` first tries a path that needs
no re-encoding: cbor2 parses with indefinite lengths and duplicate keys
refused, and one walk over the value checks the data model, checks that every
map's keys are in strictly increasing order of their encodings, and sums the
length of the value's deterministic encoding.  A CBOR head with a non-minimal
argument is always longer than the minimal one and every other item's length
is fixed by its value, so when that sum equals the number of bytes read, the
input *is* the deterministic encoding of the value (RFC 8949 §4.2.1: definite
lengths, minimal heads, sorted keys) -- exactly what the byte comparison
would have found.  Anything else (an error, an unsorted map, a length that
does not add up) goes to the byte comparison, which decides, so the fast path
never changes a verdict or an error kind.

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


# Keys longer than this are encoded each time, never cached: a cache entry keeps its key alive,
# and a hostile input's megabyte-long keys must not stay in memory after it was refused.
MAX_CACHED_KEY = 64


@functools.lru_cache(maxsize=4096, typed=True)
def _cached_key_bytes(key: Value) -> bytes:
    return cbor2.dumps(key)


def _key_bytes(key: Value) -> bytes:
    """The encoding of a map key, which decides its order (§4.2.1).

    Short keys are cached: documents repeat the same few keys, and this ran
    once per key per map.  ``typed`` keeps ``True`` and ``1`` (equal in
    Python) apart.
    """
    if isinstance(key, int) or (isinstance(key, (str, bytes)) and len(key) <= MAX_CACHED_KEY):
        return _cached_key_bytes(key)
    return cbor2.dumps(key)  # long or composite keys (a tuple can hold anything): never kept


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


class _Undecided(Exception):
    """The fast path cannot prove the input deterministic: the byte comparison decides."""


def loads_strict(data: bytes) -> Any:
    """One CBOR item from the start of ``data`` as cbor2 reads it strictly (no indefinite lengths, no
    duplicate keys, tags left raw), or None on any error: for readers that prove determinism by
    their own means (:func:`qhx_edge.core.cose.Envelope.parse`) and fall back to :func:`decode`."""
    try:
        return cbor2.loads(data, **_STRICT)
    except Exception:  # the caller's fallback, decode, gives the typed error
        return None


def head_size(n: int) -> int:
    """Bytes of a CBOR head whose argument is ``n`` in its shortest form (RFC 8949 §3, §4.2.1)."""
    return _head_size(n)


def _head_size(n: int) -> int:
    """Bytes of a CBOR head whose argument is ``n`` in its shortest form (RFC 8949 §3, §4.2.1)."""
    if n < 24:
        return 1
    if n < 0x100:
        return 2
    if n < 0x10000:
        return 3
    if n < 0x100000000:
        return 5
    return 9


def _leaf_size(item: Value) -> int:
    """The deterministic encoding's length of a text, byte string or 64-bit integer; -1 for anything else."""
    t = type(item)
    if t is str:
        n = len(item) if item.isascii() else len(item.encode())
        return (1 if n < 24 else _head_size(n)) + n
    if t is bytes:
        n = len(item)
        return (1 if n < 24 else _head_size(n)) + n
    if t is int:
        if 0 <= item < 24 or -24 <= item < 0:
            return 1
        if 0 <= item <= _INT_MAX:
            return _head_size(item)
        if _INT_MIN <= item < 0:
            return _head_size(-1 - item)
    return -1


def _walk(value: Value, tags: frozenset[int], depth: int) -> tuple[Value, int]:
    """``value`` as :func:`_normalise` returns it, and the length of its deterministic encoding.

    Raises :class:`_Undecided` for anything :func:`_normalise` would refuse and
    for a map whose keys are not in strictly increasing encoded order.  Lists
    and maps outside tags are returned as they are (their members are checked
    in place); the immutable ones cbor2 makes inside tags become lists and dicts.
    """
    if depth > MAX_DEPTH:
        raise _Undecided
    n = _leaf_size(value)
    if n >= 0:
        return value, n
    t = type(value)
    if t is bool or value is None:
        return value, 1
    if t is list or t is tuple:
        if value and depth >= MAX_DEPTH:  # its members sit one level deeper
            raise _Undecided
        size = _head_size(len(value))
        items = value if t is list else list(value)
        for i, item in enumerate(items):
            n = _leaf_size(item)
            if n < 0:
                v, n = _walk(item, tags, depth + 1)
                if v is not item:
                    items[i] = v
            size += n
        return items, size
    if t is dict or t is cbor2.frozendict:
        if value and depth >= MAX_DEPTH:  # its keys and values sit one level deeper
            raise _Undecided
        size = _head_size(len(value))
        out: dict[Value, Value] = value if t is dict else dict(value)
        prev = b""
        for k, item in out.items():
            tk = type(k)
            if not (tk is str or tk is bytes or (tk is int and _INT_MIN <= k <= _INT_MAX)):
                raise _Undecided
            kb = _key_bytes(k)
            if kb <= prev:  # out of order, or equal (no two keys encode alike)
                raise _Undecided
            prev = kb
            n = _leaf_size(item)
            if n < 0:
                v, n = _walk(item, tags, depth + 1)
                if v is not item:
                    out[k] = v  # a value replaced, no key added: safe while iterating
            size += len(kb) + n
        return out, size
    if t is cbor2.CBORTag and value.tag in tags:
        v, n = _walk(value.value, tags, depth + 1)
        return cbor2.CBORTag(value.tag, v), _head_size(value.tag) + n
    raise _Undecided


def _decode_fast(data: bytes, tags: frozenset[int], *, whole: bool) -> tuple[Value, int] | None:
    """The decoded value and its length if ``data`` provably starts with (whole: is) a
    deterministic item of the allowed data model; ``None`` when undecided."""
    try:
        if whole:
            # loads ignores trailing bytes: the length check below catches them.
            raw = cbor2.loads(data, **_STRICT)
            end = len(data)
        else:
            fp = io.BytesIO(data)
            raw = cbor2.CBORDecoder(fp, **_STRICT).decode()
            end = fp.tell()
        value, size = _walk(raw, tags, 0)
    except Exception:  # any doubt goes to the byte comparison, which decides
        return None
    # Every head read is at least as long as its shortest form, so equal totals
    # mean every head was the shortest and the item ends exactly at ``end``.
    return (value, end) if size == end else None


_STRICT: dict[str, Any] = {
    "max_depth": MAX_DEPTH + 2,
    "allow_indefinite": False,
    "allow_duplicate_keys": False,
    "semantic_decoders": _RAW_TAGS,
    "str_errors": "strict",
}


def _decode(data: bytes, tags: frozenset[int], *, whole: bool) -> tuple[Value, int]:
    if not data:
        raise Malformed("empty input")
    fast = _decode_fast(data, tags, whole=whole)
    if fast is not None:
        return fast
    return _decode_compare(data, tags, whole=whole)


def _decode_compare(data: bytes, tags: frozenset[int], *, whole: bool) -> tuple[Value, int]:
    """The decision by byte comparison: parse leniently, normalise, re-encode, compare."""
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
