"""Issuance under bounded staleness: SVID shape, chains, TTL rules, rotation, JWT-SVIDs, audit."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_der_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qhx_edge.core import documents as D  # noqa: N812
from qhx_edge.core import staleness
from qhx_edge.core.cards import parse_card, spki
from qhx_edge.core.errors import QhxError, StoreLocked
from qhx_edge.core.policyfile import policy_fields
from qhx_edge.core.spiffe import parse_spiffe_id
from qhx_edge.core.suites import ES256, MLDSA65
from qhx_edge.core.x509ca import domain_name_constraints, private_key_object
from qhx_edge.homes import node
from qhx_edge.issue.issuer import BACKDATE, JWT_MAX_TTL, Issuer, X509Svid, algorithm_for, audience_digest
from qhx_edge.store import clock
from tests.conftest import PASSPHRASE, Homes, make_homes, need_module, need_tool

DOMAIN = "alpha.example"
WEB = f"spiffe://{DOMAIN}/web"
PQ = f"spiffe://{DOMAIN}/pq/db"
API = f"spiffe://{DOMAIN}/api"
UID = frozenset({"unix:uid:1000", "unix:gid:100", "unix:user:alice"})
BOTH = UID | {"unix:gid:5"}
STALENESS = {"soft": 3600, "hard": 4 * 3600, "svid_ttl": 3600, "ttl_floor": 300}
POLICY: dict[str, Any] = {
    "staleness": STALENESS,
    "algorithms": {"/": "ES256", "/pq/": "ML-DSA-65"},
    "registrations": [
        {"spiffe_id": WEB, "selectors": ["unix:uid:1000"]},
        {"spiffe_id": PQ, "selectors": ["unix:uid:1000", "unix:gid:5"], "ttl": 600},
        {"spiffe_id": API, "selectors": ["unix:uid:2000"]},
    ],
}


class Clock:
    """An injected clock for the Issuer."""

    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def delegate(
    homes: Homes, now: int, *, algs: tuple[int, ...] = (ES256, MLDSA65), lifetime: int = 7 * 86400
) -> list[bytes]:
    n = node.Node(homes.node_home, PASSPHRASE.encode)
    try:
        ident = n.identity
        return homes.authority.issue_delegation(
            node_id=n.node_id,
            card_fingerprint=parse_card(n.card()).fingerprint,
            ca_spkis={alg: spki(ident.ca_key(alg, create=True)) for alg in algs},
            jwt_spki=spki(ident.jwt_key(create=True)),
            attestation={"method": "join-token"},
            now=now,
            lifetime=lifetime,
        )
    finally:
        n.close()


def load(homes: Homes, docs: list[bytes], now: int) -> None:
    n = node.Node(homes.node_home)
    try:
        n.import_pack(homes.authority.export_pack(docs, now), now)
    finally:
        n.close()


def attested(homes: Homes, now: int, policy: dict[str, Any] | None = None, **kw: Any) -> Clock:
    """Publish ``policy``, delegate the node, import both at ``now``; a clock set to ``now``."""
    docs = homes.authority.publish_policy(policy_fields(policy or POLICY), now)
    docs += delegate(homes, now, **kw)
    load(homes, docs, now)
    return Clock(now)


def issuer(homes: Homes, clk: Clock) -> Issuer:
    return Issuer(homes.node_home, PASSPHRASE.encode, now=clk)


def held(homes: Homes, type_: str) -> Any:
    n = node.Node(homes.node_home)
    try:
        doc = n.store.current(DOMAIN, type_)
        assert doc is not None
        return doc.payload
    finally:
        n.close()


def audit_issues(homes: Homes) -> list[dict[str, Any]]:
    n = node.Node(homes.node_home)
    try:
        assert n.store.verify_audit_chain() > 0
        return [e for e in n.store.audit_entries() if e["event"] == "issue"]
    finally:
        n.close()


def leaf(svid: X509Svid) -> x509.Certificate:
    return x509.load_der_x509_certificate(svid.cert_chain[0])


def rejected(kind: str, fn: Any, *args: Any) -> QhxError:
    with pytest.raises(QhxError) as info:
        fn(*args)
    assert info.value.kind == kind, info.value.message
    return info.value


@pytest.fixture
def ready(homes: Homes) -> tuple[Homes, Clock]:
    return homes, attested(homes, clock.now())


# --- SVID shape and chains ------------------------------------------------------------------


def _check_spiffe_shape(svid: X509Svid, now: int, ttl: int) -> x509.Certificate:
    cert = leaf(svid)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # the subject is empty (RFC 5280 §4.2.1.6)
    assert list(san.value) == [x509.UniformResourceIdentifier(svid.spiffe_id)]  # exactly one URI SAN
    assert cert.subject == x509.Name([])
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not ku.value.key_cert_sign
    assert not ku.value.crl_sign
    assert not ku.value.key_encipherment
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    oids = {e.oid for e in cert.extensions}
    assert ExtensionOID.SUBJECT_KEY_IDENTIFIER in oids
    assert ExtensionOID.AUTHORITY_KEY_IDENTIFIER in oids
    assert cert.serial_number > 0
    inter = x509.load_der_x509_certificate(svid.cert_chain[1])
    # Backdated, but never before the intermediate's own notBefore (validity nests).
    expect_nb = max(now - BACKDATE, int(inter.not_valid_before_utc.timestamp()))
    assert int(cert.not_valid_before_utc.timestamp()) == expect_nb
    assert int(cert.not_valid_after_utc.timestamp()) == svid.not_after == now + ttl
    key = load_der_private_key(svid.private_key, None)  # PKCS#8 DER
    fmt = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)
    return cert


def test_es256_svid_meets_the_spec_and_verifies_with_openssl(ready: tuple[Homes, Clock], tmp_path: Path) -> None:
    need_tool("openssl", "openssl")
    homes, clk = ready
    with issuer(homes, clk) as iss:
        (svid,) = iss.x509_svids(UID)
    assert svid.spiffe_id == WEB
    cert = _check_spiffe_shape(svid, clk.t, 3600)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    delegation = held(homes, "delegation")
    bundle = held(homes, "bundle")
    assert svid.cert_chain[1] in delegation.x509_cas
    assert svid.bundle == b"".join(bundle.x509_authorities)

    def pem(name: str, ders: list[bytes]) -> str:
        path = tmp_path / name
        path.write_bytes(
            b"".join(x509.load_der_x509_certificate(d).public_bytes(Encoding.PEM) for d in ders),
        )
        return str(path)

    ec_cas = [
        d
        for d in bundle.x509_authorities
        if isinstance(x509.load_der_x509_certificate(d).public_key(), ec.EllipticCurvePublicKey)
    ]
    ca, inter, leaf_pem = (
        pem("ca.pem", ec_cas),
        pem("inter.pem", svid.cert_chain[1:]),
        pem("leaf.pem", svid.cert_chain[:1]),
    )

    def openssl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["openssl", "verify", *args], capture_output=True, text=True, check=False, timeout=30)

    for purpose in ("sslclient", "sslserver"):
        ok = openssl("-x509_strict", "-purpose", purpose, "-CAfile", ca, "-untrusted", inter, leaf_pem)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert ok.stdout.strip().endswith(": OK")
    # Without the intermediate, or against another CA, the same leaf does not verify.
    assert openssl("-CAfile", ca, leaf_pem).returncode != 0
    assert openssl("-CAfile", inter, leaf_pem).returncode != 0  # the intermediate is not a trust anchor


def test_the_intermediate_name_constraint_binds_leaves_to_the_domain(
    ready: tuple[Homes, Clock], tmp_path: Path
) -> None:
    """A leaf the node CA signs for another trust domain fails openssl's name-constraint check."""
    need_tool("openssl", "openssl")
    import datetime as dt

    from cryptography.hazmat.primitives import hashes

    homes, clk = ready
    with issuer(homes, clk) as iss:
        (svid,) = iss.x509_svids(UID)
    n = node.Node(homes.node_home, PASSPHRASE.encode)
    try:
        ca_key = private_key_object(n.identity.ca_key(ES256))
    finally:
        n.close()
    inter = x509.load_der_x509_certificate(svid.cert_chain[1])
    good = leaf(svid)
    now = dt.datetime.fromtimestamp(clk.t, dt.UTC)
    evil = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(inter.subject)
        .public_key(good.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(seconds=30))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://evil.example/web")]), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    bundle = held(homes, "bundle")
    (tmp_path / "ca.pem").write_bytes(
        b"".join(x509.load_der_x509_certificate(d).public_bytes(Encoding.PEM) for d in bundle.x509_authorities)
    )
    (tmp_path / "inter.pem").write_bytes(inter.public_bytes(Encoding.PEM))
    for name, cert in (("good.pem", good), ("evil.pem", evil)):
        (tmp_path / name).write_bytes(cert.public_bytes(Encoding.PEM))
    args = ["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), "-untrusted", str(tmp_path / "inter.pem")]
    assert subprocess.run([*args, str(tmp_path / "good.pem")], capture_output=True, check=False).returncode == 0
    bad = subprocess.run([*args, str(tmp_path / "evil.pem")], capture_output=True, text=True, check=False)
    assert bad.returncode != 0
    assert "subtree" in (bad.stdout + bad.stderr).lower()


def test_mldsa_svid_for_a_post_quantum_namespace_chains_with_cryptography(ready: tuple[Homes, Clock]) -> None:
    homes, clk = ready
    with issuer(homes, clk) as iss:
        svids = iss.x509_svids(BOTH)
    assert [s.spiffe_id for s in svids] == [WEB, PQ]  # policy order, every matching identity
    pq = svids[1]
    cert = _check_spiffe_shape(pq, clk.t, 600)  # the registration's own TTL
    assert isinstance(cert.public_key(), mldsa.MLDSA65PublicKey)
    inter = x509.load_der_x509_certificate(pq.cert_chain[1])
    assert isinstance(inter.public_key(), mldsa.MLDSA65PublicKey)
    cert.verify_directly_issued_by(inter)
    roots = {c.subject: c for c in map(x509.load_der_x509_certificate, held(homes, "bundle").x509_authorities)}
    inter.verify_directly_issued_by(roots[inter.issuer])
    assert isinstance(roots[inter.issuer].public_key(), mldsa.MLDSA65PublicKey)
    # Name constraints hold: the intermediate permits exactly this domain, and the leaf's one URI is in it.
    nc = inter.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    assert nc.value == domain_name_constraints(DOMAIN)
    assert parse_spiffe_id(pq.spiffe_id)[0] == DOMAIN
    # A leaf under the ES256 intermediate would not verify as issued by the ML-DSA one.
    with pytest.raises((ValueError, TypeError)):
        leaf(svids[0]).verify_directly_issued_by(inter)
    assert isinstance(leaf(svids[0]).public_key(), ec.EllipticCurvePublicKey)


def test_stock_spiffe_library_accepts_both_svids(ready: tuple[Homes, Clock]) -> None:
    spiffe = need_module("spiffe", "the stock SPIFFE client (the dev extra)")
    homes, clk = ready
    with issuer(homes, clk) as iss:
        svids = iss.x509_svids(BOTH)
        jwks = iss.jwt_bundles()[DOMAIN]
    for s in svids:
        parsed = spiffe.X509Svid.parse_raw(b"".join(s.cert_chain), s.private_key)
        assert str(parsed.spiffe_id) == s.spiffe_id
    bundle = spiffe.JwtBundle.parse(spiffe.TrustDomain(DOMAIN), jwks)
    assert held(homes, "delegation").jwt_key["kid"] in bundle.jwt_authorities
    with issuer(homes, clk) as iss:
        (j,) = iss.jwt_svids(UID, ["db"], None)
    parsed_jwt = spiffe.JwtSvid.parse_and_validate(j.token, bundle, {"db"})
    assert str(parsed_jwt.spiffe_id) == WEB


# --- staleness, rollback, delegation ----------------------------------------------------------


def test_connected_then_degraded_ttl_shrinks_then_expired_refuses(ready: tuple[Homes, Clock]) -> None:
    homes, clk = ready
    t0 = clk.t
    budget = D.Staleness(**STALENESS)
    with issuer(homes, clk) as iss:
        clk.t = t0 + 600
        (s,) = iss.x509_svids(UID)
        assert s.not_after - clk.t == 3600  # connected: the policy TTL
        assert int(leaf(s).not_valid_before_utc.timestamp()) == clk.t - BACKDATE
        assert iss.status()["mode"] == "connected"
        ttls = []
        for age in (3600, 5400, 7200, 10800, 12600, 14000):
            clk.t = t0 + age
            (s,) = iss.x509_svids(UID)
            expect = staleness.mode(clk.t, t0, budget)
            assert expect.mode == "degraded"
            assert iss.status()["mode"] == "degraded"
            assert s.not_after - clk.t == expect.max_ttl
            assert s.not_after <= t0 + budget.hard
            ttls.append(s.not_after - clk.t)
        assert ttls == sorted(ttls, reverse=True)
        assert ttls[0] > ttls[-2] >= budget.ttl_floor
        assert ttls[-1] == t0 + budget.hard - (t0 + 14000)  # the last minutes: capped at issued_at + S2
        clk.t = t0 + budget.hard
        err = rejected("stale", iss.x509_svids, UID)
        assert "stale" in err.message
        rejected("stale", iss.jwt_svids, UID, ["db"], None)
        assert iss.status()["mode"] == "expired"
        assert iss.status()["max_ttl"] == 0


def test_clock_rollback_refuses(ready: tuple[Homes, Clock]) -> None:
    homes, clk = ready
    with issuer(homes, clk) as iss:
        clk.t -= 301  # the store's tolerance is 300 s behind the newest document
        rejected("clock-rollback", iss.x509_svids, UID)
        rejected("clock-rollback", iss.jwt_svids, UID, ["db"], None)
        assert iss.status()["clock"] == "rollback"
        clk.t += 2
        assert iss.x509_svids(UID)


def test_ttl_is_capped_by_the_delegation_and_ends_with_it(homes: Homes) -> None:
    clk = attested(homes, clock.now(), lifetime=1200)
    t0 = clk.t
    with issuer(homes, clk) as iss:
        (s,) = iss.x509_svids(UID)
        assert s.not_after == t0 + 1200
        assert s.not_after == int(x509.load_der_x509_certificate(s.cert_chain[1]).not_valid_after_utc.timestamp())
        clk.t = t0 + 1000
        svids = iss.x509_svids(BOTH)
        assert all(x.not_after == t0 + 1200 for x in svids)
        (j,) = iss.jwt_svids(UID, ["db"], None)
        assert j.expires == t0 + 1200
        assert iss.status()["max_ttl"] == 200
        n = node.Node(homes.node_home)
        try:
            st = n.status(clk.t)
        finally:
            n.close()
        assert st["delegation"]["present"]
        assert st["delegation"]["expires"] == t0 + 1200
        assert st["domains"][DOMAIN]["max_ttl"] == 200
        assert st["domains"][DOMAIN]["freshness_max_ttl"] == 3600
        clk.t = t0 + 1200
        err = rejected("stale", iss.x509_svids, UID)
        assert "not attested" in err.message
        assert "expired" in err.message


def test_without_a_delegation_nothing_is_issued(homes: Homes) -> None:
    now = clock.now()
    load(homes, homes.authority.publish_policy(policy_fields(POLICY), now), now)
    with Issuer(homes.node_home, PASSPHRASE.encode, now=Clock(now)) as iss:
        err = rejected("stale", iss.x509_svids, UID)
        assert "node not attested: no delegation" in err.message
        rejected("stale", iss.jwt_svids, UID, ["db"], None)
        assert iss.status()["delegation"] == {"present": False}
        assert iss.status()["max_ttl"] == 0
        assert set(iss.x509_bundles()) == {DOMAIN}  # bundles are served regardless


def test_property_no_svid_outlives_freshness_budget_or_delegation(tmp_path: Path) -> None:
    """For random budgets, ages, delegation lifetimes and registration TTLs: every issued
    certificate and token ends by ``staleness.issued_at + S2`` and by the delegation's end,
    and nothing is issued in expired mode."""
    homes = make_homes(tmp_path)
    state = {"t": clock.now()}
    clk = Clock(state["t"])
    iss = issuer(homes, clk)
    n = node.Node(homes.node_home)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        soft=st.integers(0, 5000),
        extra=st.integers(1, 5000),
        svid_ttl=st.integers(1, 8000),
        floor_frac=st.floats(0, 1),
        age=st.integers(0, 12000),
        lifetime=st.integers(60, 12000),
        reg_ttl=st.one_of(st.none(), st.integers(1, 9000)),
        pq=st.booleans(),
    )
    def check(
        soft: int,
        extra: int,
        svid_ttl: int,
        floor_frac: float,
        age: int,
        lifetime: int,
        reg_ttl: int | None,
        pq: bool,
    ) -> None:
        state["t"] += 1
        t0 = state["t"]
        hard = soft + extra
        floor = max(1, int(svid_ttl * floor_frac))
        sid = PQ if pq else WEB
        reg: dict[str, Any] = {"spiffe_id": sid, "selectors": ["unix:uid:1000"]}
        if reg_ttl is not None:
            reg["ttl"] = reg_ttl
        policy = {
            "staleness": {"soft": soft, "hard": hard, "svid_ttl": svid_ttl, "ttl_floor": floor},
            "algorithms": POLICY["algorithms"],
            "registrations": [reg],
        }
        docs = homes.authority.publish_policy(policy_fields(policy), t0)
        docs += delegate(homes, t0, lifetime=lifetime)
        n.import_pack(homes.authority.export_pack(docs, t0), t0)
        clk.t = t0 + age
        expired = age >= hard
        ended = age >= lifetime
        if expired or ended:
            rejected("stale", iss.x509_svids, UID)
            rejected("stale", iss.jwt_svids, UID, ["db"], None)
            return
        svids = iss.x509_svids(UID)
        jwts = iss.jwt_svids(UID, ["db"], None)
        for s in [*svids]:
            cert = leaf(s)
            not_after = int(cert.not_valid_after_utc.timestamp())
            assert not_after == s.not_after
            assert clk.t < not_after <= t0 + hard
            assert not_after <= t0 + lifetime
            assert not_after - clk.t <= (reg_ttl or svid_ttl)
        for j in jwts:
            assert clk.t < j.expires <= min(t0 + hard, t0 + lifetime, clk.t + JWT_MAX_TTL)

    try:
        check()
    finally:
        iss.close()
        n.close()


# --- rotation, caching, change notification ----------------------------------------------------


def test_rotation_at_half_life_and_the_change_token(ready: tuple[Homes, Clock]) -> None:
    homes, clk = ready
    t0 = clk.t
    with issuer(homes, clk) as iss:
        iss.poll_seconds = 10_000
        (a,) = iss.x509_svids(UID)
        token = iss.change_token()
        assert iss.refresh_in() == 1800  # half of the 3600 s TTL
        clk.t = t0 + 1799
        (b,) = iss.x509_svids(UID)
        assert leaf(b).serial_number == leaf(a).serial_number  # cached
        assert iss.change_token() == token
        assert iss.refresh_in() == 1
        clk.t = t0 + 1800
        assert iss.change_token() != token  # a stream must re-send
        token = iss.change_token()
        (c,) = iss.x509_svids(UID)
        assert leaf(c).serial_number != leaf(a).serial_number  # re-minted
        assert c.not_after == t0 + 1800 + 3600
        assert iss.change_token() == token  # stable once the stream has re-fetched
        (d,) = iss.x509_svids(UID)
        assert d is c
    issues = audit_issues(homes)
    assert len(issues) == 2  # cache hits are not new issuances


def test_rotation_by_one_stream_is_signalled_to_the_others(ready: tuple[Homes, Clock]) -> None:
    homes, clk = ready
    with issuer(homes, clk) as iss:
        iss.x509_svids(UID)
        token = iss.change_token()
        clk.t += 1800
        iss.x509_svids(UID)  # re-minted before anybody asked for the token
        assert iss.change_token() != token


def test_new_documents_and_mode_changes_invalidate_and_signal(ready: tuple[Homes, Clock]) -> None:
    homes, clk = ready
    t0 = clk.t
    with issuer(homes, clk) as iss:
        (a,) = iss.x509_svids(UID)
        token = iss.change_token()
        # A new bundle (the authority rotates its CA) imported by another process.
        clk.t = t0 + 10
        load(homes, homes.authority.rotate_ca(clk.t), clk.t)
        assert iss.change_token() != token
        (b,) = iss.x509_svids(UID)
        assert leaf(b).serial_number != leaf(a).serial_number
        assert b.bundle == b"".join(held(homes, "bundle").x509_authorities)
        assert b.bundle != a.bundle
        # Freshness alone (same mode) neither signals nor re-mints.
        token = iss.change_token()
        clk.t = t0 + 20
        load(homes, homes.authority.publish_freshness(clk.t), clk.t)
        assert iss.change_token() == token
        assert iss.x509_svids(UID)[0] is b
        # Connected -> degraded is a mode change.
        clk.t = t0 + 20 + 3600
        assert iss.change_token() != token
        (c,) = iss.x509_svids(UID)
        assert c is not b
        assert iss.status()["mode"] == "degraded"
        # A policy that drops the registration: the cached SVID is no longer handed out.
        token = iss.change_token()
        policy = dict(POLICY, registrations=POLICY["registrations"][1:])
        load(homes, homes.authority.publish_policy(policy_fields(policy), clk.t), clk.t)
        assert iss.change_token() != token
        rejected("policy-denied", iss.x509_svids, UID)


def test_refresh_in_is_capped_so_outside_imports_are_noticed(ready: tuple[Homes, Clock]) -> None:
    homes, clk = ready
    with issuer(homes, clk) as iss:
        assert 0 < iss.refresh_in() <= iss.poll_seconds
        iss.poll_seconds = 10_000
        assert iss.refresh_in() == STALENESS["soft"]  # nothing cached: the next event is degraded mode


def test_concurrent_first_requests_mint_once(ready: tuple[Homes, Clock]) -> None:
    homes, clk = ready
    results: list[int] = []
    errors: list[BaseException] = []
    with issuer(homes, clk) as iss:
        barrier = threading.Barrier(16)

        def fetch() -> None:
            try:
                barrier.wait()
                results.extend(leaf(s).serial_number for s in iss.x509_svids(BOTH))
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=fetch) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert len(results) == 32
    assert len(set(results)) == 2
    assert len(audit_issues(homes)) == 2


# --- policy: matching, algorithms ------------------------------------------------------------


def test_unregistered_selectors_get_no_identity(ready: tuple[Homes, Clock]) -> None:
    homes, clk = ready
    with issuer(homes, clk) as iss:
        for sel in (frozenset(), frozenset({"unix:uid:1001"}), frozenset({"unix:gid:5"}), frozenset({"unix:uid:10"})):
            err = rejected("policy-denied", iss.x509_svids, sel)
            assert "no identity" in err.message
            rejected("policy-denied", iss.jwt_svids, sel, ["db"], None)
        assert [s.spiffe_id for s in iss.x509_svids(frozenset({"unix:uid:2000"}))] == [API]
        rejected("policy-denied", iss.jwt_svids, UID, ["db"], API)  # registered, but not for this caller
    assert audit_issues(homes)[-1]["detail"].startswith(f"x509-svid {API} ")


def test_registrations_the_issuer_cannot_honour_never_match(homes: Homes) -> None:
    bad = {
        "staleness": STALENESS,
        "registrations": [
            {"spiffe_id": f"spiffe://{DOMAIN}/a/../b", "selectors": ["unix:uid:1000"]},
            {"spiffe_id": f"spiffe://{DOMAIN}/", "selectors": ["unix:uid:1000"]},
            {"spiffe_id": f"spiffe://{DOMAIN}/zero", "selectors": ["unix:uid:1000"], "ttl": 0},
            {"spiffe_id": f"spiffe://{DOMAIN}/zero", "selectors": ["unix:uid:1"]},
            {"spiffe_id": WEB, "selectors": ["unix:uid:1000"]},
        ],
    }
    clk = attested(homes, clock.now(), bad)
    with issuer(homes, clk) as iss:
        assert [s.spiffe_id for s in iss.x509_svids(UID)] == [WEB]
        rejected("policy-denied", iss.x509_svids, frozenset({"unix:uid:1"}))


def test_algorithm_by_longest_path_prefix() -> None:
    algs = {"/": "ES256", "/pq/": "ML-DSA-65", "/pq/legacy/": "ES256"}
    assert algorithm_for(WEB, algs) == "ES256"
    assert algorithm_for(PQ, algs) == "ML-DSA-65"
    assert algorithm_for(f"spiffe://{DOMAIN}/pq/legacy/x", algs) == "ES256"
    assert algorithm_for(f"spiffe://{DOMAIN}/pqx", algs) == "ES256"
    assert algorithm_for(PQ, {"/pq/": "ML-DSA-65"}) == "ML-DSA-65"
    assert algorithm_for(WEB, {}) == "ES256"
    for bad in ("spiffe://alpha.example", "spiffe://alpha.example/", "spiffe://Alpha/x", "http://a/b", "spiffe://a/b/"):
        with pytest.raises(QhxError):
            parse_spiffe_id(bad)


def test_a_namespace_without_a_delegated_ca_of_its_algorithm_is_denied(tmp_path: Path) -> None:
    homes = make_homes(tmp_path, suite="classical")
    clk = attested(homes, clock.now(), algs=(ES256,))
    with issuer(homes, clk) as iss:
        assert iss.x509_svids(UID)[0].spiffe_id == WEB
        err = rejected("policy-denied", iss.x509_svids, BOTH)
        assert "ML-DSA-65" in err.message


# --- JWT-SVIDs -------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_jwt_svid_round_trip_and_rejections(ready: tuple[Homes, Clock]) -> None:
    homes, clk = ready
    t0 = clk.t
    with issuer(homes, clk) as iss:
        svids = iss.jwt_svids(BOTH, ["db", "cache"], None)
        assert [s.spiffe_id for s in svids] == [WEB, PQ]
        (only,) = iss.jwt_svids(BOTH, ["db", "cache"], PQ)
        assert only is svids[1]  # cached per (SPIFFE ID, audience)
        token = svids[0].token
        head, body, sig = token.split(".")
        header, claims = json.loads(_unb64(head)), json.loads(_unb64(body))
        kid = held(homes, "delegation").jwt_key["kid"]
        assert header == {"alg": "ES256", "kid": kid, "typ": "JWT"}
        assert claims == {"sub": WEB, "aud": ["db", "cache"], "exp": t0 + JWT_MAX_TTL, "iat": t0}
        assert len(_unb64(sig)) == 64  # raw r || s
        assert svids[0].expires == t0 + JWT_MAX_TTL

        sub, got = iss.validate_jwt(token, "cache")
        assert sub == WEB
        assert got == claims

        # A stock JOSE library accepts the token under our JWKS.
        jwt = need_module("jwt", "PyJWT (the dev extra) is the stock JOSE library the token is checked with")
        jwks = jwt.PyJWKSet.from_json(iss.jwt_bundles()[DOMAIN].decode())
        key = next(k for k in jwks.keys if k.key_id == kid)
        assert jwt.decode(token, key.key, algorithms=["ES256"], audience="db")["sub"] == WEB

        rejected("policy-denied", iss.validate_jwt, token, "other")
        forged = _b64(json.dumps(dict(claims, sub=API)).encode())
        rejected("bad-signature", iss.validate_jwt, f"{head}.{forged}.{sig}", "db")
        wider = _b64(json.dumps(dict(claims, aud=["db", "other"])).encode())
        rejected("bad-signature", iss.validate_jwt, f"{head}.{wider}.{sig}", "other")
        flipped = bytearray(_unb64(sig))
        flipped[5] ^= 1
        rejected("bad-signature", iss.validate_jwt, f"{head}.{body}.{_b64(bytes(flipped))}", "db")
        none = _b64(json.dumps({"alg": "none", "kid": kid}).encode())
        rejected("bad-signature", iss.validate_jwt, f"{none}.{body}.", "db")
        unknown = _b64(json.dumps(dict(header, kid="someone-else")).encode())
        rejected("bad-signature", iss.validate_jwt, f"{unknown}.{body}.{sig}", "db")
        other = _b64(json.dumps(dict(claims, sub="spiffe://beta.example/web")).encode())
        rejected("unknown-domain", iss.validate_jwt, f"{head}.{other}.{sig}", "db")
        for junk in ("", "a.b", "a.b.c.d", f"{head}.{body}.{sig}=", f"{head}.!!.{sig}"):
            rejected("malformed", iss.validate_jwt, junk, "db")
        rejected("malformed", iss.jwt_svids, UID, [], None)

        clk.t = t0 + JWT_MAX_TTL
        rejected("expired", iss.validate_jwt, token, "db")
        (fresh,) = iss.jwt_svids(UID, ["db", "cache"], None)  # past half-life: re-minted
        assert fresh.token != token
        assert iss.validate_jwt(fresh.token, "db")[0] == WEB
        clk.t = t0 - 400
        rejected("clock-rollback", iss.validate_jwt, fresh.token, "db")


# --- audit -----------------------------------------------------------------------------------------


def test_every_issuance_is_audited_in_one_transaction_per_call(ready: tuple[Homes, Clock]) -> None:
    homes, clk = ready
    with issuer(homes, clk) as iss:
        svids = iss.x509_svids(BOTH)
        (j,) = iss.jwt_svids(UID, ["db"], None)
    issues = audit_issues(homes)
    assert len(issues) == 3
    x1, x2, jw = issues
    assert x2["seq"] == x1["seq"] + 1
    assert x1["at"] == x2["at"] == clk.t
    for entry, s, alg in ((x1, svids[0], "ES256"), (x2, svids[1], "ML-DSA-65")):
        cert = leaf(s)
        assert entry["kind"] is None
        assert entry["domain"] == DOMAIN
        assert entry["type"] == "x509-svid"
        assert bytes(entry["digest"]) == hashlib.sha256(s.cert_chain[0]).digest()
        assert entry["detail"] == (
            f"x509-svid {s.spiffe_id} serial {cert.serial_number:x} not_after {s.not_after} alg {alg} "
            f"mode connected ttl {s.not_after - clk.t}"
        )
    assert jw["type"] == "jwt-svid"
    assert jw["detail"].startswith(f"jwt-svid {WEB} aud sha256:{audience_digest(['db'])} kid ")
    assert f"not_after {j.expires} alg ES256 mode connected" in jw["detail"]
    assert j.token not in jw["detail"]  # a bearer token is never written to the log


def test_a_failed_audit_write_hands_nothing_out(ready: tuple[Homes, Clock], monkeypatch: pytest.MonkeyPatch) -> None:
    homes, clk = ready
    with issuer(homes, clk) as iss:

        def locked(*_: Any) -> None:
            raise StoreLocked("locked by a test")

        monkeypatch.setattr(iss._audit.store, "audit_batches", locked)
        rejected("store-locked", iss.x509_svids, UID)
        monkeypatch.undo()
        (s,) = iss.x509_svids(UID)
    assert len(audit_issues(homes)) == 1
    assert leaf(s).serial_number > 0


def _hold_commits(
    iss: Issuer, monkeypatch: pytest.MonkeyPatch, fail_second: bool = False
) -> tuple[Any, Any, list[int]]:
    """Make the issuer's first audit commit wait for a gate; record every commit's number of callers."""
    gate, entered = threading.Event(), threading.Event()
    groups: list[int] = []
    real = iss._audit.store.audit_batches

    def held(batches: Any) -> None:
        groups.append(len(batches))
        if len(groups) == 1:
            entered.set()
            assert gate.wait(60)
        elif fail_second and len(groups) == 2:
            raise StoreLocked("locked by a test")
        real(batches)

    monkeypatch.setattr(iss._audit.store, "audit_batches", held)
    return gate, entered, groups


def _queued(iss: Issuer, count: int) -> None:
    """Wait until ``count`` callers queue behind the commit in flight (synchronisation, not a timing)."""
    deadline = time.monotonic() + 60
    while len(iss._audit._queue) < count:
        assert time.monotonic() < deadline, "callers never queued"
        time.sleep(0.01)


def test_concurrent_callers_share_one_commit_and_wait_for_it(
    ready: tuple[Homes, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    homes, clk = ready
    results: dict[str, Any] = {}
    with issuer(homes, clk) as iss:
        gate, entered, groups = _hold_commits(iss, monkeypatch)
        calls = {
            "web": lambda: iss.x509_svids(UID),
            "api": lambda: iss.x509_svids(frozenset({"unix:uid:2000"})),
            "jwt": lambda: iss.jwt_svids(UID, ["db"], None),
        }
        threads = {name: threading.Thread(target=lambda n=name: results.update({n: calls[n]()})) for name in calls}
        threads["web"].start()
        assert entered.wait(60)  # the first caller's commit is in flight, held
        threads["api"].start()
        threads["jwt"].start()
        _queued(iss, 2)
        assert results == {}  # nobody has an SVID before the commit holding its entry
        assert len(audit_issues(homes)) == 0
        gate.set()
        for t in threads.values():
            t.join(60)
        assert groups == [1, 2]  # the two callers that waited shared one transaction
        assert iss.audit_commits == (2, 3)
    assert [s.spiffe_id for s in results["web"]] == [WEB]
    assert [s.spiffe_id for s in results["api"]] == [API]
    assert [s.spiffe_id for s in results["jwt"]] == [WEB]
    issues = audit_issues(homes)
    assert len(issues) == 3
    digests = {bytes(e["digest"]) for e in issues}
    assert hashlib.sha256(results["web"][0].cert_chain[0]).digest() in digests
    assert hashlib.sha256(results["api"][0].cert_chain[0]).digest() in digests
    assert hashlib.sha256(results["jwt"][0].token.encode()).digest() in digests


def test_a_failed_group_commit_fails_every_caller_in_it(
    ready: tuple[Homes, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    homes, clk = ready
    outcomes: dict[str, Any] = {}

    def call(name: str, fn: Any) -> None:
        try:
            outcomes[name] = fn()
        except QhxError as exc:
            outcomes[name] = exc

    with issuer(homes, clk) as iss:
        gate, entered, groups = _hold_commits(iss, monkeypatch, fail_second=True)
        first = threading.Thread(target=call, args=("web", lambda: iss.x509_svids(UID)))
        first.start()
        assert entered.wait(60)
        waiting = [
            threading.Thread(target=call, args=("api", lambda: iss.x509_svids(frozenset({"unix:uid:2000"})))),
            threading.Thread(target=call, args=("web-again", lambda: iss.x509_svids(UID))),  # waits on web's mint
            threading.Thread(target=call, args=("pq", lambda: iss.x509_svids(BOTH))),
        ]
        for t in waiting:
            t.start()
        _queued(iss, 2)  # api and pq queue for the commit; web-again waits for the SVID web is minting
        gate.set()
        for t in [first, *waiting]:
            t.join(60)
        assert groups == [1, 2]
        assert [s.spiffe_id for s in outcomes["web"]] == [WEB]
        assert [s.spiffe_id for s in outcomes["web-again"]] == [WEB]
        assert outcomes["web-again"][0] == outcomes["web"][0]  # minted once
        assert isinstance(outcomes["api"], QhxError)
        assert outcomes["api"].kind == "store-locked"
        assert isinstance(outcomes["pq"], QhxError)
        assert outcomes["pq"].kind == "store-locked"
        monkeypatch.undo()
        (api,) = iss.x509_svids(frozenset({"unix:uid:2000"}))  # nothing of the failed group was cached
    issues = audit_issues(homes)
    assert [e["detail"].split()[1] for e in issues] == [WEB, API]
    assert bytes(issues[1]["digest"]) == hashlib.sha256(api.cert_chain[0]).digest()


def test_bundles_per_domain(ready: tuple[Homes, Clock]) -> None:
    homes, clk = ready
    with issuer(homes, clk) as iss:
        assert iss.x509_bundles() == {DOMAIN: b"".join(held(homes, "bundle").x509_authorities)}
        jwks = json.loads(iss.jwt_bundles()[DOMAIN])
        (key,) = jwks["keys"]
        assert key["use"] == "jwt-svid"
        assert key["kty"] == "EC"
        assert key["crv"] == "P-256"
        assert key["kid"] == held(homes, "delegation").jwt_key["kid"]
        assert jwks["spiffe_sequence"] == held(homes, "bundle").version
