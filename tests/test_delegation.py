"""Delegations: the node's intermediate CAs, signed by the pki role, accepted only by their node."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from qhx_edge.core import documents as D  # noqa: N812
from qhx_edge.core import trust
from qhx_edge.core.cards import parse_card, spki
from qhx_edge.core.suites import ES256, MLDSA65
from qhx_edge.core.x509ca import domain_name_constraints
from qhx_edge.homes import node
from qhx_edge.store import clock
from tests.conftest import PASSPHRASE, Homes, make_pack


def delegate(homes: Homes, node_home: Path, now: int, **kw: int) -> list[bytes]:
    n = node.Node(node_home, PASSPHRASE.encode)
    try:
        ident = n.identity
        cas = {alg: spki(ident.ca_key(alg, create=True)) for alg in (ES256, MLDSA65)}
        jwt = spki(ident.jwt_key(create=True))
        card = parse_card(n.card())
        return homes.authority.issue_delegation(
            node_id=n.node_id,
            card_fingerprint=card.fingerprint,
            ca_spkis=cas,
            jwt_spki=jwt,
            attestation={"method": "join-token"},
            now=now,
            **kw,
        )
    finally:
        n.close()


def test_delegation_round_trip_and_certificate_shape(homes: Homes) -> None:
    now = clock.now()
    docs = delegate(homes, homes.node_home, now)
    deleg = D.parse(docs[0]).payload
    assert isinstance(deleg, D.Delegation)
    with _Opened(homes.node_home) as n:
        result = n.import_pack(homes.authority.export_pack(docs, now), now)
        assert result.applied
        assert n.store.current(homes.authority.domain, "delegation") is not None
        held_notary = n.store.current(homes.authority.domain, "notary")
    # The notary role makes the node a notary for as long as its delegation, bound to the same card.
    notary = D.parse(docs[1]).payload
    assert isinstance(notary, D.NotaryDelegation)
    assert (notary.node_id, notary.card_fingerprint, notary.expires) == (deleg.node_id, deleg.card_fingerprint,
                                                                           deleg.expires)  # fmt: skip
    assert held_notary is not None
    assert held_notary.payload == notary
    bundle = D.parse(docs[2]).payload
    assert isinstance(bundle, D.Bundle)
    assert [j["kid"] for j in bundle.jwt_authorities] == [deleg.jwt_key["kid"]]
    roots = {
        x509.load_der_x509_certificate(c).subject: x509.load_der_x509_certificate(c) for c in bundle.x509_authorities
    }
    for der in deleg.x509_cas:
        cert = x509.load_der_x509_certificate(der)
        issuer = roots[cert.issuer]
        cert.verify_directly_issued_by(issuer)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert bc.ca
        assert bc.path_length == 0
        nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
        assert nc == domain_name_constraints("alpha.example")
        assert cert.not_valid_after_utc.timestamp() - now <= 7 * 86400
    assert deleg.expires <= now + 7 * 86400


class _Opened:
    def __init__(self, home: Path) -> None:
        self.node = node.Node(home, PASSPHRASE.encode)

    def __enter__(self) -> node.Node:
        return self.node

    def __exit__(self, *exc: object) -> None:
        self.node.close()


def test_a_delegation_for_another_node_is_passed_over(homes: Homes, tmp_path: Path) -> None:
    """Another node's delegation is not this node's to store, nor a fault of the pack: ``not-mine``."""
    now = clock.now()
    other = tmp_path / "other"
    node.init(other, homes.authority.anchor(), now, passphrase=PASSPHRASE.encode())
    docs = delegate(homes, other, now)
    with _Opened(homes.node_home) as n:
        before = n.store.trust_digest()
        result = n.import_pack(make_pack(docs[:1]), now)
        assert [d["report"] for d in result.to_json()["documents"]] == ["not-mine"]
        assert not result.applied
        assert n.store.trust_digest() == before
        assert n.store.current(homes.authority.domain, "delegation") is None


def test_delegation_rules_in_the_trust_core(homes: Homes) -> None:
    now = clock.now()
    docs = delegate(homes, homes.node_home, now, lifetime=3600)
    with _Opened(homes.node_home) as n:
        state = n.store.trust_state()
        assert state.node_id == n.node_id
        ok = trust.verify_batch(docs[:1], state, now)
        assert [v.status for v in ok.verdicts] == ["applied"]
        late = trust.verify_batch(docs[:1], state, now + 3600)
        assert late.verdicts[0].error is not None
        assert late.verdicts[0].error.kind == "expired"
        nobody = trust.TrustState(state.domains, state.clock_high_water, None)
        assert trust.verify_batch(docs[:1], nobody, now).verdicts[0].error.kind == "scope-violation"  # type: ignore[union-attr]
