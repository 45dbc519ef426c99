"""Revocation (issue 10, point 1): ``authority revoke-node`` / ``revoke-delegation`` publish a signed,
cumulative ``revocation`` that nodes apply at once: chains through the revoked node's CA are refused
as ``revoked`` by ``svid verify`` (docs/architecture.md, "Revocation").

* Before the revocation a node verifies the other node's SVID; after the pack, ``revoked``.
* A relay that holds the revocation back and passes the freshness on gets the freshness refused
  (``mix-and-match``: the epoch names the revocation), so the node goes stale, never trusting.
* An older revocation list after a newer one is ``rollback``.
* A rotated pki role signs the list again: a node does not lose its revocations with the reset.
* The revoked node's JWT key leaves the bundle; revoking an unknown node is ``malformed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qhx_edge.core import documents as D  # noqa: N812
from qhx_edge.core.errors import Revoked
from qhx_edge.core.policyfile import policy_fields
from qhx_edge.homes import node
from qhx_edge.issue.issuer import Issuer
from qhx_edge.store import clock
from tests.conftest import PASSPHRASE, Homes, attest_node, make_homes, run_cli

DOMAIN = "alpha.example"
WORKLOAD = f"spiffe://{DOMAIN}/web"


def _setup(tmp: Path) -> tuple[Homes, Path, list[bytes]]:
    """An authority, an attested issuing node (h.node_home) with a workload SVID, and a verifier node."""
    h = make_homes(tmp, suite="hybrid")
    now = clock.now()
    regs = [{"spiffe_id": WORKLOAD, "selectors": ["unix:uid:1000"]}]
    h.authority.publish_policy(policy_fields({"registrations": regs, "algorithms": {"/": "ES256"}}), now)
    attest_node(h, h.node_home)
    verifier = tmp / "V"
    node.init(verifier, h.authority.anchor(), now, passphrase=PASSPHRASE.encode())
    _carry(h, verifier)
    with Issuer(h.node_home, PASSPHRASE.encode) as iss:
        (issued,) = iss.x509_svids(frozenset({"unix:uid:1000"}))
    return h, verifier, list(issued.cert_chain)


def _carry(h: Homes, home: Path, *, drop: str | None = None) -> Any:
    now = clock.now()
    docs = [d for d in h.authority.export_documents() if drop is None or D.parse(d).type != drop]
    with node.Node(home) as n:
        try:
            return n.import_pack(h.authority.export_pack(docs, now), now).to_json()
        except node.ImportRejected as exc:
            return exc.result.to_json()


def _node_id(home: Path) -> str:
    with node.Node(home) as n:
        return n.node_id


def _verify(home: Path, chain: list[bytes]) -> dict[str, Any]:
    with node.Node(home) as n:
        return n.verify_svid(chain, clock.now())


def test_a_revoked_nodes_svids_are_refused_at_once(tmp_path: Path) -> None:
    h, verifier, chain = _setup(tmp_path)
    assert _verify(verifier, chain)["spiffe_id"] == WORKLOAD
    published = h.authority.revoke(clock.now(), node_id=_node_id(h.node_home))
    assert [D.parse(d).type for d in published] == ["revocation", "bundle", "freshness"]
    report = _carry(h, verifier)
    assert report["applied"], report
    with pytest.raises(Revoked, match="revoked"):
        _verify(verifier, chain)
    # The command line says so too, with the stable kind.
    pem = tmp_path / "chain.pem"
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    pem.write_bytes(b"".join(x509.load_der_x509_certificate(c).public_bytes(Encoding.PEM) for c in chain))
    out = run_cli("--home", str(verifier), "--json", "svid", "verify", str(pem))
    assert (out.code, out.json["error"]["kind"]) == (1, "revoked"), out.stdout
    # Its JWT key left the bundle.
    with node.Node(verifier) as n:
        bundle = n.store.current(DOMAIN, "bundle")
        revocation = n.store.current(DOMAIN, "revocation")
    assert bundle is not None
    assert revocation is not None
    jwt_revoked = {r.key for r in revocation.payload.revoked if r.use == "jwt"}
    import hashlib

    assert not {hashlib.sha256(k["spki"]).digest() for k in bundle.payload.jwt_authorities} & jwt_revoked


def test_a_held_back_revocation_holds_back_freshness(tmp_path: Path) -> None:
    """A relay passes the new freshness on but drops the revocation: the epoch names the revocation,
    so the freshness is refused and the node keeps trusting only until its old epoch runs out."""
    h, verifier, chain = _setup(tmp_path)
    h.authority.revoke(clock.now(), node_id=_node_id(h.node_home))
    report = _carry(h, verifier, drop="revocation")
    fresh = [d for d in report["documents"] if d.get("type") == "freshness" and d["report"].startswith("rejected")]
    assert fresh, report["documents"]
    assert fresh[-1]["report"] == "rejected:mix-and-match"
    _carry(h, verifier)  # the whole pack: now it applies
    with pytest.raises(Revoked):
        _verify(verifier, chain)


def test_an_older_revocation_list_is_rollback(tmp_path: Path) -> None:
    h, verifier, _chain = _setup(tmp_path)
    first = h.authority.revoke(clock.now(), delegation=1)[0]
    _carry(h, verifier)
    h.authority.revoke(clock.now(), node_id=_node_id(h.node_home))
    _carry(h, verifier)
    now = clock.now()
    older = h.authority.export_pack([first], now)
    with node.Node(verifier) as n, pytest.raises(node.ImportRejected) as refused:
        n.import_pack(older, now)
    assert refused.value.kind == "rollback"


def test_a_pki_rotation_keeps_the_revocations(tmp_path: Path) -> None:
    h, verifier, chain = _setup(tmp_path)
    h.authority.revoke(clock.now(), node_id=_node_id(h.node_home))
    _carry(h, verifier)
    h.authority.rotate_root(clock.now(), root_keys=None, root_threshold=None, roles=("pki",))
    report = _carry(h, verifier)
    assert report["applied"], report
    with pytest.raises(Revoked):
        _verify(verifier, chain)


def test_revoking_what_was_never_delegated_is_malformed(tmp_path: Path) -> None:
    h = make_homes(tmp_path, suite="classical")
    out = run_cli("--home", str(h.a), "--json", "authority", "revoke-node", "no-such-node")
    assert (out.code, out.json["error"]["kind"]) == (1, "malformed"), out.stdout
    out = run_cli("--home", str(h.a), "--json", "authority", "revoke-delegation", "7")
    assert (out.code, out.json["error"]["kind"]) == (1, "malformed"), out.stdout


def test_a_revoked_node_issues_nothing(tmp_path: Path) -> None:
    """The revoked node itself, once it holds the revocation, stops issuing with the revoked keys."""
    h, _verifier, _chain = _setup(tmp_path)
    h.authority.revoke(clock.now(), node_id=_node_id(h.node_home))
    _carry(h, h.node_home)
    with Issuer(h.node_home, PASSPHRASE.encode) as iss, pytest.raises(Revoked, match="revoked"):
        iss.x509_svids(frozenset({"unix:uid:1000"}))


def test_a_partner_that_releases_its_revocations_gets_them_applied(tmp_path: Path) -> None:
    """beta releases its revocations to alpha (``--partner-release revocation``): a beta node's SVID
    that alpha's node verified under the agreement is ``revoked`` there once beta's release pack
    (revocation first) is imported; alpha's node then needs beta's revocation for beta's freshness."""
    from tests.test_federation import ALPHA, BETA, TERMS, agree, authority, ok

    beta = make_homes(tmp_path / "beta", suite="classical", domain=BETA)
    now = clock.now()
    regs = [{"spiffe_id": f"spiffe://{BETA}/ns/logistics/api", "selectors": ["unix:uid:1000"]}]
    beta.authority.publish_policy(policy_fields({"registrations": regs, "algorithms": {"/": "ES256"}}), now)
    attest_node(beta, beta.node_home)
    with Issuer(beta.node_home, PASSPHRASE.encode) as iss:
        (issued,) = iss.x509_svids(frozenset({"unix:uid:1000"}))
    chain = list(issued.cert_chain)
    b_anchor = tmp_path / "beta-root.cbor"
    fp = ok("--home", beta.a, "--json", "authority", "anchor", "--to", b_anchor)["fingerprint"]
    a = authority(tmp_path, "A", ALPHA)
    releases = ("--partner-release", "bundle", "--partner-release", "freshness", "--partner-release", "revocation")
    agree(tmp_path, a, (beta.a, b_anchor, fp), BETA, *TERMS, *releases)
    n = tmp_path / "N"
    ok("--home", n, "--json", "node", "init", "--anchor", a[1], "--expect-fingerprint", a[2])

    def carry() -> None:
        ok("--home", a[0], "--json", "pack", "export", "--to", tmp_path / "a.pack")
        ok("--home", n, "--json", "pack", "import", tmp_path / "a.pack")
        ok("--home", beta.a, "--json", "pack", "export", "--partner", ALPHA, "--to", tmp_path / "b.pack")
        ok("--home", n, "--json", "pack", "import", tmp_path / "b.pack")

    carry()
    assert _verify(n, chain)["relation"] == "partner"
    beta.authority.revoke(clock.now(), node_id=_node_id(beta.node_home))
    carry()
    with pytest.raises(Revoked):
        _verify(n, chain)


def test_a_revoked_node_gets_no_new_delegation_and_its_jwt_key_stays_out(tmp_path: Path) -> None:
    """Review finding: attesting a revoked node again delegated to it anew and put its revoked JWT key
    back into the bundle, where a JWT-SVID it minted (ignoring its own revocation) validated again."""
    from qhx_edge.core.errors import AttestationFailed, BadSignature

    h, verifier, _chain = _setup(tmp_path)
    with Issuer(h.node_home, PASSPHRASE.encode) as iss:
        (token,) = iss.jwt_svids(frozenset({"unix:uid:1000"}), ["spiffe://alpha.example/db"], None)
    _carry(h, verifier)
    with Issuer(verifier, PASSPHRASE.encode) as v:
        assert v.validate_jwt(token.token, "spiffe://alpha.example/db")[0] == WORKLOAD
    h.authority.revoke(clock.now(), node_id=_node_id(h.node_home))
    with pytest.raises(AttestationFailed, match="revoked"):
        attest_node(h, h.node_home)  # re-attestation is refused
    _carry(h, verifier)  # the revocation (and a bundle without the key)
    with Issuer(verifier, PASSPHRASE.encode) as v, pytest.raises(BadSignature):
        v.validate_jwt(token.token, "spiffe://alpha.example/db")


def test_the_revocation_list_is_renewed_before_it_lapses(tmp_path: Path) -> None:
    """Review finding: the list expired with its lifetime and nothing signed it again, so a freshness
    later named an expired list and a node that had missed it could never catch up."""
    h, _verifier, chain = _setup(tmp_path)
    h.authority.state["lifetimes"]["revocation"] = 600
    h.authority._save()
    t0 = clock.now()
    h.authority.revoke(t0, node_id=_node_id(h.node_home))
    first = D.parse(h.authority.current("revocation")).payload
    later = t0 + 1200  # every list signed at t0 has expired by now (the SVID, of 1 h, has not)
    assert first.expires < later
    h.authority.publish_freshness(later)
    current = D.parse(h.authority.current("revocation")).payload
    assert current.version > first.version
    assert current.expires > later
    assert current.revoked == first.revoked
    newcomer = tmp_path / "late"
    node.init(newcomer, h.authority.anchor(), t0, passphrase=PASSPHRASE.encode())
    with node.Node(newcomer) as n:
        n.import_pack(h.authority.export_pack(h.authority.export_documents(), later), later)
        with pytest.raises(Revoked):
            n.verify_svid(chain, later)
