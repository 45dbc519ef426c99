"""Structurally valid, validly signed documents of every type through the full import path.

The decoder properties (test_decoder_properties.py) feed bytes to the
parsers; here hypothesis builds *payload maps* of the real document types
(every common field, every type's own fields, with values drawn from the
edges: huge, negative and boolean integers, text where bytes belong, unknown
fields, nested maps with mixed key types), signs them with the role that owns
the type, packs them with the authority's manifest and imports them into a
real node store.  Properties:

* the import returns a report or raises a typed :class:`Rejected`; never any
  other exception (an OverflowError at SQLite, a KeyError in a rule);
* every document reported rejected has a stable kind, and when nothing is
  applied the store's trust digest is unchanged.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qhx_edge.core import cbor, cose
from qhx_edge.core import documents as D  # noqa: N812
from qhx_edge.core.errors import Rejected, all_kinds
from qhx_edge.homes.node import ImportRejected, Node
from qhx_edge.store import clock
from tests.conftest import PASSPHRASE, Homes, make_homes

EXAMPLES = max(int(os.environ.get("QHX_FUZZ_EXAMPLES", "2000")) // 20, 40)
KINDS = set(all_kinds())

# The edges of every integer field: SQLite's range (2^63 - 1), the decoder's (2^64 - 1), negatives, bools.
edge_ints = st.one_of(
    st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1, -1, -(2**64)]),
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.booleans(),
)
leaves = st.one_of(edge_ints, st.text(max_size=12), st.binary(max_size=40), st.none())
mixed_maps = st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-3, 3)), leaves, max_size=3)
values = st.one_of(leaves, mixed_maps, st.lists(leaves, max_size=3))


def _valid(kind: str, domain: str, now: int) -> dict[str, Any]:
    """A well-formed payload of ``kind`` (the overrides below make it wrong in one or two places)."""
    common = {"type": kind, "domain": domain, "version": 2, "issued_at": now - 10, "expires": now + 86400}
    own: dict[str, dict[str, Any]] = {
        "bundle": {"x509_authorities": [], "jwt_authorities": [], "refresh_hint": 3600},
        "policy": {
            "registrations": [{"spiffe_id": f"spiffe://{domain}/w", "selectors": ["unix:uid:0"]}],
            "authorization": [],
            "algorithms": {"/": "ES256"},
            "staleness": {"soft": 3600, "hard": 7200, "svid_ttl": 600, "ttl_floor": 60},
        },
        "freshness": {"versions": {"root": 1, "bundle": 2, "policy": 2}, "agreements": {}},
        "delegation": {
            "node_id": "n1",
            "card_fingerprint": "0" * 64,
            "attestation": {"method": "join-token"},
            "x509_cas": [b"\x30\x00"],
            "jwt_key": {"kid": "k", "spki": b"\x30\x00"},
        },
    }
    return {**common, **own[kind]}


FIELDS = {
    "bundle": ["x509_authorities", "jwt_authorities", "refresh_hint"],
    "policy": ["registrations", "authorization", "algorithms", "staleness"],
    "freshness": ["versions", "agreements"],
    "delegation": ["node_id", "card_fingerprint", "attestation", "x509_cas", "jwt_key"],
}
COMMON = ["domain", "version", "issued_at", "expires"]
WILD: dict[str, st.SearchStrategy[Any]] = {
    "domain": st.sampled_from(["bravo.example", "Alpha", ".x", "", "alpha.example\n"]),
    "version": edge_ints,
    "issued_at": edge_ints,
    "expires": edge_ints,
}


@st.composite
def payloads(draw: st.DrawFn, domain: str, now: int) -> dict[str, Any]:
    kind = draw(st.sampled_from(sorted(FIELDS)))
    payload = _valid(kind, domain, now)
    keys = st.sampled_from(COMMON + FIELDS[kind] + ["extra", "type"])
    for key in draw(st.lists(keys, min_size=1, max_size=2, unique=True)):
        if key == "type":
            payload["type"] = draw(st.sampled_from([*sorted(FIELDS), "root", "receipt", 5]))
        elif key == "extra":
            payload.update(draw(mixed_maps))
        else:
            payload[key] = draw(WILD.get(key, values))
    if not isinstance(payload.get("type"), str) or payload["type"] not in D.ROLE_FOR_TYPE:
        payload["type"] = kind  # signed by the role of a real type (an unknown type has no role to sign it)
    return payload


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Homes, Node]:
    homes = make_homes(tmp_path_factory.mktemp("props"))
    n = Node(homes.node_home, PASSPHRASE.encode)
    yield homes, n  # type: ignore[misc]
    n.close()


def _sign(homes: Homes, payload: dict[str, Any]) -> bytes:
    """Sign whatever map hypothesis made with the role that owns its type (no validation on the way)."""
    role = D.ROLE_FOR_TYPE[payload["type"]]
    return cose.sign(cbor.encode(payload), homes.authority._signers(role), content_type=D.CONTENT_TYPE)


@settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(data=st.data())
def test_signed_structured_documents_import_or_are_rejected_with_a_kind(world: tuple[Homes, Node], data: Any) -> None:
    homes, n = world
    now = clock.now()
    batch = data.draw(st.lists(payloads(homes.authority.domain, now), min_size=1, max_size=3))
    docs = [_sign(homes, p) for p in batch]
    before = n.store.trust_digest()
    refused: Rejected | None = None
    try:
        result = n.import_pack(homes.authority.export_pack(docs, now), now)
    except ImportRejected as exc:
        result = exc.result
    except Rejected as exc:  # the whole pack refused (e.g. a document the manifest cannot carry)
        refused = exc
    if refused is not None:
        assert refused.kind in KINDS
        assert n.store.trust_digest() == before
        return
    reports = result.to_json()["documents"]
    for report in reports:
        if report["report"].startswith("rejected"):
            assert report["error"]["kind"] in KINDS, report
    if not result.applied:
        assert n.store.trust_digest() == before
