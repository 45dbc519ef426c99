"""Payload classes: strict validation on decode, unknown fields preserved, exact bytes kept."""

from __future__ import annotations

from typing import Any

import pytest

from qhx_edge.core import cbor
from qhx_edge.core import documents as D  # noqa: N812
from qhx_edge.core.errors import Malformed
from qhx_edge.core.suites import PrivateKey

NOW = 1_800_000_000


@pytest.fixture(scope="module")
def key() -> PrivateKey:
    return PrivateKey.generate("classical")


def _fresh(**extra: Any) -> dict[str, Any]:
    return {
        "type": "freshness",
        "domain": "alpha.example",
        "version": 3,
        "issued_at": NOW,
        "expires": NOW + 60,
        "versions": {"root": 1, "bundle": 2, "policy": 1},
        "agreements": {},
        **extra,
    }


def test_unknown_fields_are_preserved_through_decode_and_encode(key: PrivateKey) -> None:
    d = _fresh(future_field={"nested": [1, 2, b"x"]}, zz=7)
    payload = D.Freshness.from_dict(d)
    assert payload.unrecognized == {"future_field": {"nested": [1, 2, b"x"]}, "zz": 7}
    assert payload.to_dict() == d
    signed = D.sign(payload, [key])
    doc = D.parse(signed)
    assert doc.raw == signed
    assert cbor.decode(doc.envelope.payload, max_size=1 << 20) == d


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"type": "bundle"}, "expected a freshness"),
        ({"domain": "Alpha.Example"}, "trust domain"),
        ({"domain": ".alpha"}, "trust domain"),
        ({"version": 0}, "version"),
        ({"version": True}, "version"),
        ({"version": "3"}, "version"),
        ({"issued_at": -1}, "issued_at"),
        ({"expires": NOW - 1}, "before issued_at"),
        ({"versions": {"root": 1, "bundle": 2}}, "policy"),
        ({"versions": {"root": 1, "bundle": 2, "policy": 1, "delegation": 1}}, "unknown types"),
        ({"agreements": {"NOT VALID": 1}}, "trust domain"),
    ],
)
def test_freshness_strict_validation(change: dict[str, Any], match: str) -> None:
    with pytest.raises(Malformed, match=match):
        D.Freshness.from_dict(_fresh(**change))


def test_missing_common_field() -> None:
    d = _fresh()
    del d["expires"]
    with pytest.raises(Malformed, match="expires"):
        D.Freshness.from_dict(d)


def test_root_validation(key: PrivateKey) -> None:
    pub = key.public
    roles = {r: {"keyids": [pub.keyid], "threshold": 1} for r in D.ROLES}
    base = {
        "type": "root",
        "domain": "alpha.example",
        "version": 1,
        "issued_at": NOW,
        "expires": NOW + 10,
        "suite": "classical",
        "keys": {pub.keyid: pub.to_cbor()},
        "roles": roles,
    }
    assert D.Root.from_dict(base).role_keys("pki") == {pub.keyid: pub}
    bad_id = dict(base, keys={"00" * 32: pub.to_cbor()})
    with pytest.raises(Malformed, match="does not match"):
        D.Root.from_dict(bad_id)
    missing_role = dict(base, roles={k: v for k, v in roles.items() if k != "notary"})
    with pytest.raises(Malformed, match="notary"):
        D.Root.from_dict(missing_role)
    too_high = dict(base, roles={**roles, "pki": {"keyids": [pub.keyid], "threshold": 2}})
    with pytest.raises(Malformed, match="exceeds"):
        D.Root.from_dict(too_high)
    dup = dict(base, roles={**roles, "root": {"keyids": [pub.keyid] * 3, "threshold": 3}})
    with pytest.raises(Malformed, match="more than once"):
        D.Root.from_dict(dup)
    unknown_key = dict(base, roles={**roles, "pki": {"keyids": ["ab" * 32], "threshold": 1}})
    with pytest.raises(Malformed, match="unknown key"):
        D.Root.from_dict(unknown_key)
    with pytest.raises(Malformed, match="suite"):
        D.Root.from_dict(dict(base, suite="rot13"))


def test_bundle_and_policy_validation() -> None:
    common = {"domain": "alpha.example", "version": 1, "issued_at": NOW, "expires": NOW + 10}
    bundle = {"type": "bundle", **common, "x509_authorities": [b"\x30"], "jwt_authorities": [], "refresh_hint": 60}
    assert D.Bundle.from_dict(bundle).refresh_hint == 60
    with pytest.raises(Malformed, match="kid"):
        D.Bundle.from_dict(dict(bundle, jwt_authorities=[{"spki": b"x"}]))  # SPIFFE bundle §4.2.2
    policy = {
        "type": "policy",
        **common,
        "registrations": [{"spiffe_id": "spiffe://alpha.example/web", "selectors": ["unix:uid:1000"]}],
        "authorization": [],
        "algorithms": {"/": "ES256"},
        "staleness": {"soft": 10, "hard": 20, "svid_ttl": 5, "ttl_floor": 1},
    }
    assert D.Policy.from_dict(policy).staleness.hard == 20
    foreign = dict(policy, registrations=[{"spiffe_id": "spiffe://beta.example/web", "selectors": ["unix:uid:1"]}])
    with pytest.raises(Malformed, match="must start with"):
        D.Policy.from_dict(foreign)
    with pytest.raises(Malformed, match="soft budget"):
        D.Policy.from_dict(dict(policy, staleness={"soft": 30, "hard": 20, "svid_ttl": 5, "ttl_floor": 1}))


def test_parse_rejects_wrong_content_type_and_unknown_type(key: PrivateKey) -> None:
    from qhx_edge.core import cose

    payload = D.Freshness.from_dict(_fresh()).to_bytes()
    with pytest.raises(Malformed, match="content type"):
        D.parse(cose.sign(payload, [key], content_type="text/plain"))
    odd = cbor.encode(dict(_fresh(), type="receipt-of-the-future"))
    with pytest.raises(Malformed, match="unknown document type"):
        D.parse(cose.sign(odd, [key], content_type=D.CONTENT_TYPE))
