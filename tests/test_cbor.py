"""Unit tests of the deterministic CBOR codec (qhx_edge/core/cbor.py, RFC 8949 §4.2.1)."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest

from qhx_edge.core import cbor
from qhx_edge.core.errors import Malformed, NonDeterministic, Oversize, Rejected

CAP = 1 << 16


def dec(hexstr: str, **kw: Any) -> Any:
    return cbor.decode(bytes.fromhex(hexstr), max_size=kw.pop("max_size", CAP), **kw)


def kind_of(hexstr: str, **kw: Any) -> str:
    with pytest.raises(Rejected) as info:
        dec(hexstr, **kw)
    return info.value.kind


# --- round trips ----------------------------------------------------------------

# RFC 8949 Appendix A examples that lie inside our data model.
RFC_EXAMPLES = [
    (0, "00"),
    (1, "01"),
    (10, "0a"),
    (23, "17"),
    (24, "1818"),
    (25, "1819"),
    (100, "1864"),
    (1000, "1903e8"),
    (1000000, "1a000f4240"),
    (1000000000000, "1b000000e8d4a51000"),
    (2**64 - 1, "1bffffffffffffffff"),
    (-1, "20"),
    (-10, "29"),
    (-100, "3863"),
    (-1000, "3903e7"),
    (-(2**64), "3bffffffffffffffff"),
    (False, "f4"),
    (True, "f5"),
    (None, "f6"),
    (b"", "40"),
    (b"\x01\x02\x03\x04", "4401020304"),
    ("", "60"),
    ("a", "6161"),
    ("IETF", "6449455446"),
    ('"\\', "62225c"),
    ("\u00fc", "62c3bc"),
    ("\u6c34", "63e6b0b4"),
    ([], "80"),
    ([1, 2, 3], "83010203"),
    ([1, [2, 3], [4, 5]], "8301820203820405"),
    (list(range(1, 26)), "98190102030405060708090a0b0c0d0e0f101112131415161718181819"),
    ({}, "a0"),
    ({1: 2, 3: 4}, "a201020304"),
    ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    (["a", {"b": "c"}], "826161a161626163"),
    ({"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"}, "a56161614161626142616361436164614461656145"),
]


@pytest.mark.parametrize(("value", "hexstr"), RFC_EXAMPLES, ids=[h for _, h in RFC_EXAMPLES])
def test_rfc8949_examples_encode_and_decode(value: Any, hexstr: str) -> None:
    assert cbor.encode(value).hex() == hexstr
    decoded = dec(hexstr)
    assert decoded == value
    assert type(decoded) is type(value)


def test_tuples_encode_as_arrays_and_come_back_as_lists() -> None:
    assert cbor.encode((1, (2, 3))) == cbor.encode([1, [2, 3]])
    assert dec(cbor.encode((1, (2, 3))).hex()) == [1, [2, 3]]


def test_nested_round_trip() -> None:
    value = {
        "type": "bundle",
        "version": 7,
        "keys": [[-19, b"\x00" * 32], [-49, b"\xff" * 1952]],
        -1: {"x": None, "y": [True, False]},
        24: "",
        b"raw": 2**63,
    }
    data = cbor.encode(value)
    assert cbor.decode(data, max_size=CAP) == value
    assert cbor.encode(cbor.decode(data, max_size=CAP)) == data


def test_bytes_like_input_is_accepted() -> None:
    data = cbor.encode({"a": [1, 2]})
    assert cbor.decode(bytearray(data), max_size=CAP) == {"a": [1, 2]}
    assert cbor.decode(memoryview(data), max_size=CAP) == {"a": [1, 2]}


@pytest.mark.parametrize("bad", ["00", 0, None, [0]])
def test_non_bytes_input_is_malformed(bad: Any) -> None:
    with pytest.raises(Malformed):
        cbor.decode(bad, max_size=CAP)


def test_named_tag_round_trips_and_unnamed_is_refused() -> None:
    value = cbor2.CBORTag(98, [b"", {}, b"x", []])
    data = cbor.encode(value)
    assert data.hex() == "d8628440a0417880"
    assert cbor.decode(data, max_size=CAP, tags=frozenset({98})) == value
    with pytest.raises(Malformed, match="tag 98"):
        cbor.decode(data, max_size=CAP)
    # A nested tag needs naming too.
    inner = cbor.encode([cbor2.CBORTag(98, 0)])
    with pytest.raises(Malformed):
        cbor.decode(inner, max_size=CAP, tags=frozenset({99}))


# --- key order: RFC 8949 §4.2.1 bytewise, not RFC 7049 length-first ------------------

KEY_ORDER = [
    # (keys in insertion order, expected deterministic encoding)
    ({-1: 0, 24: 0}, "a21818002000"),  # 0x18 < 0x20 although 24 is the longer encoding
    ({24: 0, -1: 0}, "a21818002000"),
    ({"a": 0, 256: 0}, "a219010000616100"),  # int (major 0) before text (major 3)
    ({b"": 0, 1000: 0}, "a21903e8004000"),
    ({-25: 0, -24: 0}, "a23700381800"),
    ({"b": 0, "aa": 0}, "a261620062616100"),
    ({4: b"11", 1: -7, -1: 1}, "a30126044231312001"),  # a COSE header
]


@pytest.mark.parametrize(("value", "hexstr"), KEY_ORDER)
def test_map_keys_sorted_bytewise(value: dict[Any, Any], hexstr: str) -> None:
    assert cbor.encode(value).hex() == hexstr
    assert dec(hexstr) == value


def test_key_order_differs_from_cbor2_canonical_and_that_order_is_refused() -> None:
    value = {-1: 0, 24: 0}
    length_first = cbor2.dumps(value, canonical=True)
    assert length_first.hex() == "a22000181800"
    assert cbor.encode(value) != length_first
    with pytest.raises(NonDeterministic):
        cbor.decode(length_first, max_size=CAP)


def test_insertion_order_does_not_matter() -> None:
    a = {"z": 1, 2: [{"y": 0, "x": 1}], -3: b""}
    b = {-3: b"", 2: [{"x": 1, "y": 0}], "z": 1}
    assert cbor.encode(a) == cbor.encode(b)
    decoded = cbor.decode(cbor.encode(a), max_size=CAP)
    assert list(decoded) == [2, -3, "z"]  # 0x02 < 0x22 < 0x61


# --- encoder refusals -----------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [2**64, -(2**64) - 1, 1.0, float("nan"), {1, 2}, frozenset(), object(), {"a": 1.5}, [b"", 2**70]],
    ids=["2^64", "-2^64-1", "float", "nan", "set", "frozenset", "object", "nested-float", "nested-bignum"],
)
def test_encode_refuses_values_outside_the_data_model(value: Any) -> None:
    with pytest.raises(Malformed):
        cbor.encode(value)


def test_encode_refuses_too_deep_nesting() -> None:
    ok: Any = 0
    for _ in range(cbor.MAX_DEPTH):
        ok = [ok]
    assert cbor.decode(cbor.encode(ok), max_size=CAP) == ok
    with pytest.raises(Malformed):
        cbor.encode([ok])


# --- decoder refusals -----------------------------------------------------------------

NON_DETERMINISTIC = "non-deterministic"
MALFORMED = "malformed"

REJECT = [
    # non-minimal integer heads
    ("1801", NON_DETERMINISTIC),
    ("1817", NON_DETERMINISTIC),
    ("190001", NON_DETERMINISTIC),
    ("1900ff", NON_DETERMINISTIC),
    ("1a0000ffff", NON_DETERMINISTIC),
    ("1b00000000ffffffff", NON_DETERMINISTIC),
    ("3800", NON_DETERMINISTIC),
    ("390000", NON_DETERMINISTIC),
    # non-minimal length heads (byte string, text, array, map) and tag number
    ("5801ff", NON_DETERMINISTIC),
    ("59000161", NON_DETERMINISTIC),
    ("780161", NON_DETERMINISTIC),
    ("980100", NON_DETERMINISTIC),
    ("b8010000", NON_DETERMINISTIC),
    # indefinite lengths
    ("9fff", NON_DETERMINISTIC),
    ("9f01ff", NON_DETERMINISTIC),
    ("bfff", NON_DETERMINISTIC),
    ("bf616101ff", NON_DETERMINISTIC),
    ("5fff", NON_DETERMINISTIC),
    ("5f41ff41ffff", NON_DETERMINISTIC),
    ("7f6161ff", NON_DETERMINISTIC),
    ("7fff", NON_DETERMINISTIC),
    ("5f6161ff", MALFORMED),  # text chunk inside an indefinite byte string: not well-formed
    # duplicate map keys
    ("a201010102", NON_DETERMINISTIC),
    ("a2616100616101", NON_DETERMINISTIC),
    ("a2010001f500", MALFORMED),  # 1 and true: two items, then one trailing byte
    ("a3010001000200", NON_DETERMINISTIC),
    # unsorted map keys
    ("a202000100", NON_DETERMINISTIC),
    ("a22000181800", NON_DETERMINISTIC),  # cbor2 canonical (length-first) order
    ("a2616200616100", NON_DETERMINISTIC),
    ("a261610019010000", NON_DETERMINISTIC),
    # trailing bytes
    ("0000", MALFORMED),
    ("0100", MALFORMED),
    ("80ff", MALFORMED),
    ("a0a0", MALFORMED),
    # empty input
    ("", MALFORMED),
    # truncated / not well-formed
    ("18", MALFORMED),
    ("1b00", MALFORMED),
    ("4201", MALFORMED),
    ("81", MALFORMED),
    ("a101", MALFORMED),
    ("1c", MALFORMED),
    ("5c", MALFORMED),
    ("ff", MALFORMED),
    ("6180", MALFORMED),  # invalid UTF-8
    ("62c328", MALFORMED),
    # floats (every width), undefined and simple values
    ("f90000", MALFORMED),
    ("f93c00", MALFORMED),
    ("fa47c35000", MALFORMED),
    ("fb3ff0000000000000", MALFORMED),
    ("fb7ff8000000000000", MALFORMED),
    ("f7", MALFORMED),
    ("f0", MALFORMED),
    ("f820", MALFORMED),
    ("8201f93c00", MALFORMED),
    ("a1f93c0000", MALFORMED),  # float key
    # non-scalar map keys
    ("a18000", MALFORMED),
    ("a1a000", MALFORMED),
    # disallowed tags, whether cbor2 knows them or not
    ("c074323031332d30332d32315432303a30343a30305a", MALFORMED),  # 0: date/time string
    ("c11a514b67b0", MALFORMED),  # 1: epoch
    ("c48221196ab3", MALFORMED),  # 4: decimal fraction
    ("d8184100", MALFORMED),  # 24: embedded CBOR
    ("d81c00", MALFORMED),  # 28: shareable
    ("d81d00", MALFORMED),  # 29: shared reference
    ("d81c81d81d00", MALFORMED),  # cyclic shared reference
    ("d8246161", MALFORMED),  # 36: MIME
    ("d82550" + "00" * 16, MALFORMED),  # 37: UUID
    ("d901028101", MALFORMED),  # 258: set
    ("d9d9f700", MALFORMED),  # 55799: self-described CBOR
    ("d9d9f7d9d9f700", MALFORMED),
    ("d86380", MALFORMED),  # 99 (not named by the caller)
    ("db" + "ff" * 8 + "00", MALFORMED),
    # bignums and integers beyond 64 bits
    ("c249010000000000000000", MALFORMED),  # 2^64
    ("c349010000000000000000", MALFORMED),  # -2^64 - 1
    ("c240", MALFORMED),  # bignum 0
    ("c24101", MALFORMED),  # bignum 1
    ("c34100", MALFORMED),  # bignum -1
    ("8201c249010000000000000000", MALFORMED),
]


@pytest.mark.parametrize(("hexstr", "kind"), REJECT, ids=[h[:24] or "empty" for h, _ in REJECT])
def test_decode_rejects(hexstr: str, kind: str) -> None:
    assert kind_of(hexstr) == kind


@pytest.mark.parametrize(
    "tag", [0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 55799]
)
@pytest.mark.parametrize("content", ["00", "40", "4401020304", "6161", "80", "820101", "a0"])
def test_every_tag_cbor2_interprets_is_malformed(tag: int, content: str) -> None:
    """cbor2's semantic tags (dates, bignums, references, sets...) are tags like any other."""
    data = cbor2.dumps(cbor2.CBORTag(tag, 0))[:-1] + bytes.fromhex(content)
    with pytest.raises(Malformed):
        cbor.decode(data, max_size=CAP)


def test_duplicate_keys_are_not_silently_merged() -> None:
    # A decoder that let the last (or first) duplicate win would accept one of these.
    for data in ("a2616100616101", "a2616101616100"):
        with pytest.raises(NonDeterministic):
            dec(data)


def test_non_minimal_head_of_a_named_tag() -> None:
    assert dec("d86280", tags=frozenset({98})) == cbor2.CBORTag(98, [])
    assert kind_of("d9006280", tags=frozenset({98})) == NON_DETERMINISTIC
    assert kind_of("da0000006280", tags=frozenset({98})) == NON_DETERMINISTIC


def test_integer_range_edges() -> None:
    assert dec("1bffffffffffffffff") == 2**64 - 1
    assert dec("3bffffffffffffffff") == -(2**64)
    assert dec("1b0000000100000000") == 2**32
    assert kind_of("1b00000000ffffffff") == NON_DETERMINISTIC


# --- depth ---------------------------------------------------------------------------


@pytest.mark.parametrize("opener", ["81", "a100"], ids=["array", "map"])
def test_nesting_limit(opener: str) -> None:
    ok = opener * cbor.MAX_DEPTH + "00"
    assert dec(ok) is not None
    for depth in (cbor.MAX_DEPTH + 1, cbor.MAX_DEPTH + 2, cbor.MAX_DEPTH + 3, 500, 10_000):
        assert kind_of(opener * depth + "00") == MALFORMED, depth


def test_deep_nesting_inside_a_named_tag_counts_the_tag() -> None:
    ok = "81" * (cbor.MAX_DEPTH - 1) + "00"
    assert dec("d862" + ok, tags=frozenset({98})) is not None
    assert kind_of("d862" + "81" + ok, tags=frozenset({98})) == MALFORMED


# --- size ----------------------------------------------------------------------------


def test_oversize_is_checked_before_parsing() -> None:
    good = cbor.encode(b"\x00" * 100)
    assert cbor.decode(good, max_size=len(good)) == b"\x00" * 100
    with pytest.raises(Oversize):
        cbor.decode(good, max_size=len(good) - 1)
    # Garbage beyond the cap is oversize, not malformed: the cap comes first.
    with pytest.raises(Oversize) as info:
        cbor.decode(b"\xff" * 10, max_size=9)
    assert info.value.kind == "oversize"


def test_declared_length_beyond_the_input_is_malformed_not_a_huge_allocation() -> None:
    # A byte string head claiming 2^63 bytes followed by nothing.
    assert kind_of("5b8000000000000000") == MALFORMED
    assert kind_of("9b8000000000000000") == MALFORMED
    assert kind_of("bb8000000000000000") == MALFORMED


def test_error_kinds_are_the_stable_strings() -> None:
    assert Malformed.kind == "malformed"
    assert NonDeterministic.kind == "non-deterministic"
    assert Oversize.kind == "oversize"
    for cls in (Malformed, NonDeterministic, Oversize):
        assert issubclass(cls, Rejected)


@pytest.mark.parametrize(
    "hex_input",
    [
        "a1d862810101",  # a tag (98) wrapping an array as a map key: cbor2 raises RuntimeError itself
        "a1f501",  # true as a map key
        "a1800101",  # an array as a map key
    ],
)
def test_map_keys_must_be_integers_or_strings(hex_input: str) -> None:
    with pytest.raises(Malformed):
        cbor.decode(bytes.fromhex(hex_input), max_size=100, tags=frozenset({98}))
