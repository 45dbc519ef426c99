"""The envelope's written-shape reader (qhx_edge/core/cose.py) decides exactly as the generic one.

``Envelope.parse`` first tries to prove, by length accounting alone, that its
input is a deterministic COSE_Sign of the shape signers write; anything else
goes to the strict generic reader.  On every input the two must agree: the
same envelope, or the same typed error.  Hypothesis builds envelopes of the
written shape and of near shapes, encodes them deterministically or with a
longer head, adds trailing bytes or flips bytes.
"""

from __future__ import annotations

from typing import Any

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st

from qhx_edge.core import cbor, cose
from qhx_edge.core.errors import Rejected
from qhx_edge.core.suites import PrivateKey

MAX = 1 << 20


def generic(data: bytes) -> cose.Envelope | tuple[str, str]:
    try:
        return cose.Envelope.from_value(cbor.decode(data, max_size=MAX, tags=frozenset({cose.COSE_SIGN_TAG})))
    except Rejected as exc:
        return (exc.kind, type(exc).__name__)


def fast(data: bytes) -> cose.Envelope | tuple[str, str]:
    try:
        return cose.Envelope.parse(data, max_size=MAX)
    except Rejected as exc:
        return (exc.kind, type(exc).__name__)


headers = st.sampled_from([b"", cbor2.dumps({1: -8}), cbor2.dumps({1: -49}), cbor2.dumps({3: "x"}), b"\xa0"])
unprotected = st.one_of(
    st.just({}),
    st.builds(lambda k: {4: k}, st.binary(max_size=40)),
    st.builds(lambda k: {4: k, 5: 1}, st.binary(max_size=8)),
    st.just({4: "text"}),
    st.just({"4": b"k"}),
)
signature = st.tuples(headers, unprotected, st.binary(max_size=300)).map(list)
body_unprotected = st.one_of(st.just({}), st.just({1: 2}))
envelopes = st.builds(
    lambda p, u, payload, sigs: cbor2.CBORTag(98, [p, u, payload, sigs]),
    headers,
    body_unprotected,
    st.binary(max_size=2000),
    st.lists(signature, min_size=0, max_size=4),
)


def longer_head(data: bytes, at: int) -> bytes:
    """``data`` with the head at byte ``at`` rewritten one size longer when it is a short head."""
    first = data[at]
    major, info = first >> 5, first & 0x1F
    if info < 24:
        return data[:at] + bytes([(major << 5) | 24, info]) + data[at + 1 :]
    return data


@settings(max_examples=400, deadline=None)
@given(envelopes, st.integers(min_value=0, max_value=3), st.data())
def test_agrees_with_the_generic_reader(value: Any, change: int, data: st.DataObject) -> None:
    raw = cbor2.dumps(value)
    if change == 1:
        raw = longer_head(raw, data.draw(st.integers(min_value=0, max_value=len(raw) - 1)))
    elif change == 2:
        raw += data.draw(st.binary(min_size=1, max_size=3))
    elif change == 3:
        at = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ data.draw(st.integers(min_value=1, max_value=255))]) + raw[at + 1 :]
    assert fast(raw) == generic(raw)


def test_a_signed_envelope_takes_the_written_shape() -> None:
    """What cose.sign writes is read without the generic walk, and equals what that walk gives."""
    key = PrivateKey.generate("hybrid")
    raw = cose.sign(b"payload", [key], content_type="t")
    assert cose._written_shape(raw) is not None
    assert fast(raw) == generic(raw)
    padded = longer_head(raw, 2)  # the array head: same value, a longer head
    assert cose._written_shape(padded) is None
    assert fast(padded) == generic(padded) == ("non-deterministic", "NonDeterministic")
