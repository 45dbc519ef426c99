"""The decoder's fast path (qhx_edge/core/cbor.py) never decides differently from the byte comparison.

The fast path proves an input deterministic by length accounting (RFC 8949
§4.2.1: with definite lengths, every head at least as long as its shortest
form, and keys in strictly increasing encoded order, equal lengths mean the
shortest form everywhere).  These tests hold it to that: on any input it
either returns exactly what the byte comparison returns, or returns ``None``
(undecided) -- and on the deterministic encoding of a value it decides.
"""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qhx_edge.core import cbor
from qhx_edge.core.errors import Rejected

TAGS = frozenset({98})

leaves = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.binary(max_size=300),
    st.text(max_size=40),
    st.booleans(),
    st.none(),
)
keys = st.one_of(st.integers(min_value=-(2**64), max_value=2**64 - 1), st.text(max_size=30), st.binary(max_size=8))


def _containers(children: Any) -> Any:
    return st.one_of(
        st.lists(children, max_size=30),
        st.dictionaries(keys, children, max_size=30),
        st.builds(lambda v: cbor2.CBORTag(98, v), children),
    )


values = st.recursive(leaves, _containers, max_leaves=60)


def _compare(data: bytes, *, whole: bool) -> tuple[str, Any]:
    """What the byte comparison decides: ("ok", (value, length)) or ("error", kind)."""
    try:
        return "ok", cbor._decode_compare(data, TAGS, whole=whole)
    except Rejected as exc:
        return "error", exc.kind


@settings(max_examples=200, deadline=None)
@given(values)
def test_fast_path_decides_every_deterministic_encoding(value: Any) -> None:
    data = cbor.encode(value)
    fast = cbor._decode_fast(data, TAGS, whole=True)
    assert fast is not None
    assert fast == _compare(data, whole=True)[1]
    assert cbor.encode(fast[0]) == data


def _mutations(data: bytes, cuts: list[int], byte: int) -> list[bytes]:
    out = []
    for c in cuts:
        i = c % (len(data) + 1)
        out += [data[:i] + bytes([byte]) + data[i:], data[:i] + data[i + 1 :], data[:i] + bytes([byte]) + data[i + 1 :]]
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        values.map(cbor2.dumps),  # cbor2's own order: maps often unsorted
        values.map(lambda v: cbor2.dumps(v, canonical=True)),  # RFC 7049 length-first order
        values.map(cbor.encode),
    ),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=4),
    st.integers(min_value=0, max_value=255),
    st.binary(max_size=4),
)
def test_fast_path_never_disagrees_with_the_byte_comparison(
    data: bytes, cuts: list[int], byte: int, tail: bytes
) -> None:
    for candidate in [data, data + tail, *_mutations(data, cuts, byte)]:
        if not candidate:
            continue
        for whole in (True, False):
            fast = cbor._decode_fast(candidate, TAGS, whole=whole)
            if fast is not None:
                assert _compare(candidate, whole=whole) == ("ok", fast), candidate.hex()


@pytest.mark.parametrize(
    "hexdata",
    [
        "1817",  # 23 in two bytes
        "190017",  # 23 in three bytes
        "5800",  # empty byte string with a one-byte length
        "9f01ff",  # indefinite array
        "a2616201616101",  # keys out of order
        "a26161016161 02".replace(" ", ""),  # duplicate key
        "a22000 182000".replace(" ", ""),  # -1 before 32: length-first order, but 0x1820 < 0x20 bytewise
        "f93c00",  # a float
        "d9d9f7 01".replace(" ", ""),  # self-describe tag
        "c249010000000000000000",  # bignum
    ],
)
def test_fast_path_leaves_every_non_deterministic_form_undecided(hexdata: str) -> None:
    assert cbor._decode_fast(bytes.fromhex(hexdata), TAGS, whole=True) is None


def test_fast_path_accepts_bytewise_order_where_length_first_differs() -> None:
    # RFC 8949 §4.2.1 puts 24 (0x1818) before -1 (0x20); RFC 7049 length-first would not.
    data = bytes.fromhex("a2181800" + "2000")
    assert cbor._decode_fast(data, TAGS, whole=True) == ({24: 0, -1: 0}, len(data))
    assert cbor.decode(data, max_size=64) == {24: 0, -1: 0}
