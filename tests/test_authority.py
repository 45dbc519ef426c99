"""Authority homes: suites, role keys, CAs, publishing, rotation; the documents a node gets."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509

from qhx_edge.core import documents as D  # noqa: N812
from qhx_edge.core import trust
from qhx_edge.core.errors import AlreadyInitialised, Malformed
from qhx_edge.core.policyfile import policy_fields
from qhx_edge.core.suites import ED25519, ES256, MLDSA65
from qhx_edge.core.x509ca import domain_name_constraints
from qhx_edge.homes import node
from qhx_edge.homes.authority import Authority
from tests.conftest import PASSPHRASE

NOW = 1_800_000_000


def _init(tmp: Path, suite: str, **kw: int) -> Authority:
    return Authority.init(
        tmp / suite,
        "alpha.example",
        suite=suite,
        passphrase=PASSPHRASE.encode(),
        now=NOW,
        root_keys=kw.get("n", 1),
        root_threshold=kw.get("m", 1),
    )


@pytest.mark.parametrize(
    ("suite", "sig_algs", "ca_algs"),
    [
        ("classical", {ED25519}, [ES256]),
        ("pq", {MLDSA65}, [ES256, MLDSA65]),
        ("hybrid", {ED25519, MLDSA65}, [ES256, MLDSA65]),
    ],
)
def test_init_per_suite(tmp_path: Path, suite: str, sig_algs: set[int], ca_algs: list[int]) -> None:
    auth = _init(tmp_path, suite, n=3, m=2)
    root = D.parse(auth.current("root"))
    assert isinstance(root.payload, D.Root)
    assert root.payload.suite == suite
    # One key set per role; root 2-of-3; each key holds exactly the suite's algorithms.
    assert set(root.payload.roles) == set(D.ROLES)
    assert len(root.payload.roles["root"].keyids) == 3
    assert root.payload.roles["root"].threshold == 2
    all_ids = [k for r in root.payload.roles.values() for k in r.keyids]
    assert len(all_ids) == len(set(all_ids)), "roles must not share keys (separation of duties)"
    assert all(set(k.algs) == sig_algs for k in root.payload.keys.values())
    trust.verify_anchor(auth.anchor(), NOW)
    # The bundle carries the CAs of the suite, self-signed, name-constrained to the domain.
    bundle = D.parse(auth.current("bundle")).payload
    assert isinstance(bundle, D.Bundle)
    certs = [x509.load_der_x509_certificate(der) for der in bundle.x509_authorities]
    assert len(certs) == len(ca_algs)
    for cert in certs:
        cert.verify_directly_issued_by(cert)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert bc.ca
        assert bc.path_length == 1
        nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
        assert nc == domain_name_constraints("alpha.example")
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://alpha.example"]
    # Key files are sealed and private.
    for f in (auth.home / "keys").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    # Freshness v1 names v1 of everything and expires after the policy's hard budget.
    fresh = D.parse(auth.current("freshness")).payload
    assert isinstance(fresh, D.Freshness)
    assert fresh.versions == {"root": 1, "bundle": 1, "policy": 1}
    assert fresh.expires - fresh.issued_at == 72 * 3600


def test_init_refuses_existing_home_and_bad_thresholds(tmp_path: Path) -> None:
    _init(tmp_path, "classical")
    with pytest.raises(AlreadyInitialised):
        _init(tmp_path, "classical")
    with pytest.raises(Malformed):
        Authority.init(
            tmp_path / "x", "alpha.example", suite="classical", root_keys=2, root_threshold=3, passphrase=None, now=NOW
        )
    with pytest.raises(Malformed):
        Authority.init(
            tmp_path / "y", "Not A Domain", suite="classical", root_keys=1, root_threshold=1, passphrase=None, now=NOW
        )


def test_publish_rotate_and_node_follows(tmp_path: Path) -> None:
    auth = _init(tmp_path, "classical", n=3, m=2)
    node.init(tmp_path / "N", auth.anchor(), NOW, passphrase=PASSPHRASE.encode())
    n = node.Node(tmp_path / "N")

    def sync(t: int) -> trust.Outcome:
        return n.import_pack(auth.export_pack(auth.export_documents(), t), t).outcome

    sync(NOW)
    auth.publish_bundle(NOW + 10)
    fields = policy_fields({"staleness": {"soft": 60, "hard": "10m", "svid_ttl": "2m", "ttl_floor": 30}})
    auth.publish_policy(fields, NOW + 20)
    auth.rotate_ca(NOW + 30)
    auth.rotate_root(NOW + 40, root_keys=5, root_threshold=3, roles=("freshness", "pki"))
    auth.rotate_root(NOW + 50, root_keys=1, root_threshold=1)
    out = sync(NOW + 60)
    assert not out.rejected
    st = n.status(NOW + 60)["domains"]["alpha.example"]
    assert st["versions"] == {t: int(auth.state["versions"][t]) for t in ("root", "bundle", "policy", "freshness")}
    assert st["budget"] == {"soft": 60, "hard": 600}
    # The freshness and pki roles were rotated in root v2: their marks were reset (TUF 5.3.11).
    assert ("alpha.example", "freshness") in out.resets
    # After rotate-ca the bundle carries two CA generations (overlap).
    bundle = D.parse(auth.current("bundle")).payload
    assert isinstance(bundle, D.Bundle)
    assert len(bundle.x509_authorities) == 2
    n.close()


def test_state_file_names_no_secrets(tmp_path: Path) -> None:
    auth = _init(tmp_path, "hybrid")
    state = json.loads((auth.home / "authority.json").read_text())
    text = json.dumps(state)
    for name in (auth.home / "keys").iterdir():
        assert name.read_bytes().hex() not in text
    assert state["domain"] == "alpha.example"
