"""Property tests of every decoder of untrusted bytes.

Contract (qhx_edge/errors.py): whatever the input, a decoder returns a value or
raises a :class:`qhx_edge.core.errors.Rejected` subclass -- never a cbor2,
cryptography or Python error, and never an :class:`EnvironmentFault`.  And a
signed document whose payload was changed is never accepted.

``QHX_FUZZ_EXAMPLES`` sets the number of examples of the arbitrary-bytes tests
(default 2000); the structured tests run a quarter of that.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from qhx_edge.core import cbor, documents
from qhx_edge.core.cose import COSE_SIGN_TAG, Envelope
from qhx_edge.core.documents import ROLE_FOR_TYPE, ROLES, Bundle, Freshness, Root, Signed
from qhx_edge.core.errors import NonDeterministic, QhxError, Rejected
from qhx_edge.core.suites import PrivateKey
from qhx_edge.core.trust import check_role
from qhx_edge.packs import pack

EXAMPLES = int(os.environ.get("QHX_FUZZ_EXAMPLES", "2000"))
STRUCTURED = max(EXAMPLES // 4, 25)
CAP = 1 << 20

BYTES_SETTINGS = settings(max_examples=EXAMPLES, deadline=None)
STRUCTURED_SETTINGS = settings(
    max_examples=STRUCTURED, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

DECODERS: dict[str, Callable[[bytes], Any]] = {
    "cbor.decode": lambda data: cbor.decode(data, max_size=CAP),
    "cbor.decode+tag98": lambda data: cbor.decode(data, max_size=CAP, tags=frozenset({COSE_SIGN_TAG})),
    "Envelope.parse": lambda data: Envelope.parse(data, max_size=CAP),
    "documents.parse": documents.parse,
    "pack.parse": pack.parse,
}


def only_rejected(decoder: Callable[[bytes], Any], data: bytes) -> Any:
    """Run ``decoder``; a QhxError must be a Rejected, anything else propagates and fails the test."""
    try:
        return decoder(data)
    except Rejected as exc:
        event(f"rejected: {exc.kind}")
        return exc
    except QhxError as exc:
        pytest.fail(f"{type(exc).__name__} ({exc.kind}) is not a Rejected: {exc}")


# --- strategies --------------------------------------------------------------------------

U64 = 2**64 - 1
model_ints = st.integers(min_value=-(2**64), max_value=U64)
model_keys = st.one_of(st.text(max_size=8), model_ints)
model_leaves = st.one_of(
    model_ints,
    st.integers(min_value=-30, max_value=30),
    st.binary(max_size=48),
    st.text(max_size=24),
    st.booleans(),
    st.none(),
)


def model_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(model_keys, children, max_size=6),
    )


# Values of our data model (tag 98 aside): what cbor.encode accepts.
model_values = st.recursive(model_leaves, model_containers, max_leaves=40)

# Anything cbor2 can write: the data model plus big integers, floats, tags, sets...
wild_leaves = st.one_of(
    model_leaves,
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True),
    st.sampled_from([cbor2.undefined, cbor2.CBORSimpleValue(16), cbor2.CBORSimpleValue(255)]),
)


def wild_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(st.one_of(model_keys, st.binary(max_size=4), st.booleans()), children, max_size=6),
        st.builds(cbor2.CBORTag, st.one_of(st.sampled_from([2, 3, 24, 28, 55799, 98]), st.integers(0, U64)), children),
        st.frozensets(st.integers(-5, 5), max_size=4),
    )


wild_values = st.recursive(wild_leaves, wild_containers, max_leaves=40)

cbor2_options = st.fixed_dictionaries(
    {
        "canonical": st.booleans(),
        "indefinite_containers": st.booleans(),
        "string_referencing": st.booleans(),
        "value_sharing": st.booleans(),
    }
)


@st.composite
def mutations(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with up to four random edits: flip, overwrite, truncate, append, insert, delete."""
    data = bytearray(base)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "append", "insert", "delete"]))
        if op in ("flip", "set", "delete", "truncate") and not data:
            op = "append"
        if op == "flip":
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=16))
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        else:
            i = draw(st.integers(0, len(data) - 1))
            del data[i : i + draw(st.integers(1, 4))]
    return bytes(data)


def height(value: Any) -> int:
    """Nesting height as cbor.py counts it: a scalar or empty container is 0."""
    if isinstance(value, cbor2.CBORTag):
        return 1 + height(value.value)
    if isinstance(value, (list, tuple)):
        return 1 + max(map(height, value)) if value else 0
    if isinstance(value, dict):
        return 1 + max(max(height(k), height(v)) for k, v in value.items()) if value else 0
    return 0


def same(a: Any, b: Any) -> bool:
    """Equality that also tells True from 1 and keeps map order out of it."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, cbor2.CBORTag):
        return a.tag == b.tag and same(a.value, b.value)
    return bool(a == b)


# --- arbitrary bytes ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DECODERS))
@BYTES_SETTINGS
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_give_only_typed_rejections(name: str, data: bytes) -> None:
    only_rejected(DECODERS[name], data)


# Heads that get past the first byte: a COSE_Sign, a map, a pack, a deep array.
PREFIXES = [b"\xd8\x62\x84", b"\xd8\x62\x84\x40\xa0", b"\xa3", b"\xa3\x66format", b"\x9f", b"\x81" * 20, b"\xc2"]


@pytest.mark.parametrize("name", sorted(DECODERS))
@BYTES_SETTINGS
@given(prefix=st.sampled_from(PREFIXES), rest=st.binary(max_size=512))
def test_plausible_prefixes_give_only_typed_rejections(name: str, prefix: bytes, rest: bytes) -> None:
    only_rejected(DECODERS[name], prefix + rest)


def test_the_helper_lets_other_errors_through() -> None:
    """only_rejected must fail the test on a non-Rejected error, or the properties prove nothing."""

    def boom(_: bytes) -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        only_rejected(boom, b"")

    def fault(_: bytes) -> None:
        from qhx_edge.core.errors import StoreCorrupt

        raise StoreCorrupt("not an input error")

    with pytest.raises(pytest.fail.Exception):
        only_rejected(fault, b"")


# --- structured inputs -------------------------------------------------------------------


@STRUCTURED_SETTINGS
@given(value=wild_values, options=cbor2_options, data=st.data())
def test_cbor2_written_values_and_their_mutations_give_only_typed_rejections(
    value: Any, options: dict[str, bool], data: st.DataObject
) -> None:
    encoded = cbor2.dumps(value, **options)
    candidates = [encoded, data.draw(mutations(encoded))]
    # The same value wrapped as an envelope, a document-shaped envelope and a pack,
    # so that the decoders get past their outer shape checks.
    body = cbor2.dumps(value, **options)
    candidates.append(cbor2.dumps(cbor2.CBORTag(98, [b"", {}, body, [[cbor.encode({1: -19}), {4: b"k"}, b"s"]]])))
    candidates.append(
        cbor.encode(
            cbor2.CBORTag(98, [cbor.encode({3: documents.CONTENT_TYPE}), {}, body, [[b"\xa1\x01\x32", {}, b""]]])
        )
    )
    candidates.append(cbor.encode({"format": pack.FORMAT, "version": 0, "documents": [body]}))
    candidates.append(data.draw(mutations(candidates[-2])))
    for candidate in candidates:
        for decoder in DECODERS.values():
            only_rejected(decoder, candidate)


@STRUCTURED_SETTINGS
@given(value=model_values, options=cbor2_options)
def test_cbor2_encodings_of_model_values_decode_only_when_deterministic(value: Any, options: dict[str, bool]) -> None:
    assume(height(value) <= cbor.MAX_DEPTH)
    ours = cbor.encode(value)
    theirs = cbor2.dumps(value, **options)
    result = only_rejected(DECODERS["cbor.decode"], theirs)
    if theirs == ours:
        assert same(result, value)
    else:
        assert isinstance(result, Rejected), f"accepted a non-deterministic encoding {theirs.hex()}"
        if not (options["string_referencing"] or options["value_sharing"]):
            # Plain cbor2 output of a model value is well-formed: only the encoding is wrong.
            assert isinstance(result, NonDeterministic)


@STRUCTURED_SETTINGS
@given(value=model_values)
def test_round_trip_and_idempotence(value: Any) -> None:
    if height(value) > cbor.MAX_DEPTH:
        with pytest.raises(Rejected):
            cbor.encode(value)
        return
    encoded = cbor.encode(value)
    decoded = cbor.decode(encoded, max_size=CAP)
    assert same(decoded, value)
    assert cbor.encode(decoded) == encoded
    assert cbor.encode(value) == encoded  # stable across calls
    # Inside the named tag too.
    if height(value) < cbor.MAX_DEPTH:
        tagged = cbor.encode(cbor2.CBORTag(98, value))
        assert same(cbor.decode(tagged, max_size=CAP, tags=frozenset({98})), cbor2.CBORTag(98, value))


@STRUCTURED_SETTINGS
@given(value=st.dictionaries(model_keys, model_leaves, min_size=2, max_size=12), seed=st.randoms())
def test_map_keys_come_out_in_bytewise_order_whatever_the_insertion_order(value: dict[Any, Any], seed: Any) -> None:
    items = list(value.items())
    seed.shuffle(items)
    encoded = cbor.encode(dict(items))
    assert encoded == cbor.encode(value)
    keys = list(cbor.decode(encoded, max_size=CAP))
    assert [cbor2.dumps(k) for k in keys] == sorted(cbor2.dumps(k) for k in value)


@STRUCTURED_SETTINGS
@given(value=model_values, data=st.data())
def test_mutated_deterministic_encodings_never_decode_to_something_else_silently(
    value: Any, data: st.DataObject
) -> None:
    """A mutation either is rejected, or decodes to a value whose encoding is exactly the mutated bytes."""
    assume(height(value) <= cbor.MAX_DEPTH)
    mutated = data.draw(mutations(cbor.encode(value)))
    result = only_rejected(DECODERS["cbor.decode"], mutated)
    if not isinstance(result, Rejected):
        assert cbor.encode(result) == mutated


# --- real signed documents ---------------------------------------------------------------

NOW = 1_700_000_000
DOMAIN = "alpha.example"


@dataclass(frozen=True)
class World:
    root: Root
    docs: tuple[tuple[bytes, Signed[Any]], ...]  # (raw, parsed original)


def build_world(suite: str) -> World:
    keys = {role: PrivateKey.generate(suite) for role in ROLES}
    common = {"domain": DOMAIN, "issued_at": NOW, "expires": NOW + 86400}
    root = Root.from_dict(
        {
            "type": "root",
            "version": 1,
            **common,
            "suite": suite,
            "keys": {k.public.keyid: k.public.to_cbor() for k in keys.values()},
            "roles": {role: {"keyids": [keys[role].public.keyid], "threshold": 1} for role in ROLES},
        }
    )
    freshness = Freshness(
        version=3,
        versions={"root": 1, "bundle": 2, "policy": 1},
        agreements={"beta.example": 4},
        **common,
    )
    bundle = Bundle(
        version=2,
        x509_authorities=(b"\x30\x82\x01\x0a" + bytes(range(64)),),
        jwt_authorities=({"kid": "jwt-1", "spki": b"\x30\x59" + bytes(32)},),
        refresh_hint=3600,
        unrecognized={"future_field": [1, "two", b"3"]},
        **common,
    )
    raws = [
        documents.sign(root, [keys["root"]]),
        documents.sign(freshness, [keys["freshness"]]),
        documents.sign(bundle, [keys["pki"]]),
    ]
    return World(root, tuple((raw, documents.parse(raw)) for raw in raws))


WORLDS = {suite: build_world(suite) for suite in ("classical", "hybrid")}


@pytest.mark.parametrize("suite", sorted(WORLDS))
def test_unmutated_documents_parse_and_verify(suite: str) -> None:
    """The mutation properties below are only meaningful if the originals are accepted."""
    world = WORLDS[suite]
    assert [doc.type for _, doc in world.docs] == ["root", "freshness", "bundle"]
    for raw, doc in world.docs:
        assert documents.parse(raw).payload == doc.payload
        check_role(doc, world.root, doc.role)
        for role in ROLES:
            if role != doc.role:
                with pytest.raises(Rejected):
                    check_role(doc, world.root, role)


def accepted_roles(doc: Signed[Any], root: Root) -> list[str]:
    out = []
    for role in ROLES:
        try:
            check_role(doc, root, role)
        except Rejected:
            continue
        except QhxError as exc:
            pytest.fail(f"check_role raised {type(exc).__name__}, not a Rejected: {exc}")
        out.append(role)
    return out


@STRUCTURED_SETTINGS
@given(suite=st.sampled_from(sorted(WORLDS)), which=st.integers(0, 2), data=st.data())
def test_mutated_documents_are_rejected_or_unchanged(suite: str, which: int, data: st.DataObject) -> None:
    world = WORLDS[suite]
    raw, original = world.docs[which]
    region = data.draw(st.sampled_from(["anywhere", "payload", "signature"]))
    if region == "anywhere":
        mutated = data.draw(mutations(raw))
    else:
        # Overwrite bytes inside the payload or a signature: the envelope stays
        # well-formed, so these mostly reach the signature check.
        part = original.envelope.payload if region == "payload" else original.envelope.signatures[-1].signature
        start = raw.rfind(part)
        assert start > 0
        buf = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(start, start + len(part) - 1))
            # Text-like bytes keep a text field valid UTF-8 and often a valid name too.
            buf[i] = data.draw(st.one_of(st.integers(0, 255), st.sampled_from(b"abcxyz019.-_")))
        mutated = bytes(buf)
    doc = only_rejected(documents.parse, mutated)
    if isinstance(doc, Rejected):
        return
    accepted = accepted_roles(doc, world.root)
    event(f"{region}: parsed, accepted by {accepted}")
    for role in accepted:
        # Accepted only where the signed content is untouched (a mutation in an
        # unprotected header or a re-encoding of nothing that is signed).
        assert role == original.role
        assert doc.envelope.protected == original.envelope.protected
        assert doc.envelope.payload == original.envelope.payload
        assert doc.payload == original.payload


def _replacement(draw: st.DrawFn, old: Any) -> Any:
    if isinstance(old, bool):
        return not old
    if isinstance(old, int):
        return draw(st.integers(min_value=0, max_value=U64))
    if isinstance(old, str):
        return draw(st.sampled_from([DOMAIN, "beta.example", "root", "bundle", "freshness", "policy"]))
    return draw(model_values)


@st.composite
def payload_edits(draw: st.DrawFn, payload: dict[str, Any]) -> dict[str, Any]:
    edited = dict(payload)
    op = draw(st.sampled_from(["replace", "add", "delete", "nested"]))
    key = draw(st.sampled_from(sorted(edited)))
    if op == "replace":
        edited[key] = _replacement(draw, edited[key])
    elif op == "add":
        edited[draw(st.text(min_size=1, max_size=8))] = draw(model_values)
    elif op == "delete":
        del edited[key]
    else:
        for name, value in edited.items():
            if isinstance(value, dict) and value:
                inner = dict(value)
                inner_key = draw(st.sampled_from(sorted(inner, key=repr)))
                inner[inner_key] = _replacement(draw, inner[inner_key])
                edited[name] = inner
                break
        else:
            edited["version"] = edited["version"] + 1
    return edited


@STRUCTURED_SETTINGS
@given(suite=st.sampled_from(sorted(WORLDS)), which=st.integers(0, 2), data=st.data())
def test_changed_payload_under_original_signatures_is_never_accepted(
    suite: str, which: int, data: st.DataObject
) -> None:
    """Re-wrap an edited payload with the original protected header and signatures."""
    world = WORLDS[suite]
    raw, original = world.docs[which]
    value = cbor.decode(raw, max_size=CAP, tags=frozenset({COSE_SIGN_TAG})).value
    payload = cbor.decode(original.envelope.payload, max_size=CAP)
    edited = data.draw(payload_edits(payload))
    assume(height(edited) <= cbor.MAX_DEPTH)
    new_payload = cbor.encode(edited)
    assume(new_payload != original.envelope.payload)
    forged = cbor.encode(cbor2.CBORTag(COSE_SIGN_TAG, [value[0], value[1], new_payload, value[3]]))
    doc = only_rejected(documents.parse, forged)
    if isinstance(doc, Rejected):
        return
    event("forged payload parsed")
    assert accepted_roles(doc, world.root) == []
    if doc.type == original.type:
        # The right key signed other bytes: that is a bad signature, not a missing one.
        with pytest.raises(Rejected) as info:
            check_role(doc, world.root, ROLE_FOR_TYPE[doc.type])
        assert info.value.kind == "bad-signature"


def test_hybrid_key_needs_both_signatures() -> None:
    """Dropping either half of a hybrid signer's pair leaves the threshold unmet."""
    world = WORLDS["hybrid"]
    raw, original = world.docs[1]
    value = cbor.decode(raw, max_size=CAP, tags=frozenset({COSE_SIGN_TAG})).value
    assert len(value[3]) == 2
    check_role(original, world.root, original.role)
    for keep in value[3]:
        stripped = cbor.encode(cbor2.CBORTag(COSE_SIGN_TAG, [value[0], value[1], value[2], [keep]]))
        doc = documents.parse(stripped)
        with pytest.raises(Rejected) as info:
            check_role(doc, world.root, doc.role)
        assert info.value.kind == "threshold"
