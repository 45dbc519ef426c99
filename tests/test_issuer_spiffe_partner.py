"""The Workload API serves a partner's SPIFFE-format bundle (issue 9 point 2; docs/architecture.md
"Agreements", "SPIFFE-format partner bundles").

alpha's node holds beta's trust only as a SPIFFE bundle (``bundle import-spiffe``, as a partner running
SPIRE would hand it over), under an agreement whose terms on alpha's side allow SPIFFE bundles.  Its
X.509 and JWT authorities reach workloads over the real socket and the stock ``spiffe`` client, and a
beta JWT-SVID inside alpha's accepted prefixes validates (SPIFFE Workload API §5, JWT-SVID §6); past
alpha's budget, counted from the import, after alpha revokes the agreement, or while the terms do not
allow SPIFFE bundles, beta's bundle is gone from the streams; a signed beta bundle, once held, takes
precedence (as in ``svid verify``).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from spiffe import TrustDomain, WorkloadApiClient
from spiffe.workloadapi.errors import ValidateJwtSvidError

from qhx_edge.core import spiffe_bundle
from qhx_edge.core.errors import QhxError
from qhx_edge.core.spiffe_bundle import JwtAuthority, SpiffeBundle
from qhx_edge.core.suites import ES256
from qhx_edge.homes.node import Node
from qhx_edge.issue.issuer import Issuer
from qhx_edge.issue.workload_api import WorkloadApiServer
from qhx_edge.store import clock
from qhx_edge.store.trust_store import AuditEntry
from tests.conftest import PASSPHRASE, Homes, faketime_prefix, find_libfaketime, make_homes, need
from tests.pki import Ca, make_ca, make_leaf
from tests.test_federation import ALPHA, BETA, TERMS, agree, authority, fails, ok
from tests.test_issuance import STALENESS, Clock, attested

ALLOW = "--allow-spiffe-bundles"
INSIDE = "spiffe://beta.example/ns/logistics/api"  # TERMS: alpha accepts spiffe://beta.example/ns/logistics
OUTSIDE = "spiffe://beta.example/ns/other/api"
AUDIENCE = "spiffe://alpha.example/ns/ops/db"
BUDGET = 3600  # TERMS: --max-staleness 1h


def _spki(key: Any) -> bytes:
    """The SubjectPublicKeyInfo DER of a key (the public half of a private one)."""
    public = key.public_key() if hasattr(key, "public_key") else key
    return bytes(public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


class Beta:
    """What a partner running SPIRE would hold: a CA and a JWT key, and its SPIFFE bundle."""

    def __init__(self, kid: str) -> None:
        self.ca: Ca = make_ca("beta.example CA")
        self.jwt_key = ec.generate_private_key(ec.SECP256R1())
        self.kid = kid

    def bundle(
        self, tmp: Path, sequence: int, *, extra_x509: tuple[bytes, ...] = (), extra_jwt: tuple[Any, ...] = ()
    ) -> Path:
        sb = SpiffeBundle(
            (self.ca.der, *extra_x509),
            (JwtAuthority(self.kid, _spki(self.jwt_key)), *extra_jwt),
            sequence,
            300,
        )
        data, left_out = spiffe_bundle.to_json(sb)
        assert left_out == []
        path = tmp / f"beta-{sequence}.json"
        path.write_bytes(data)
        return path

    def token(self, sub: str, exp: int, *, audience: str = AUDIENCE) -> str:
        claims = {"sub": sub, "aud": [audience], "exp": exp, "iat": exp - 600}
        return jwt.encode(claims, self.jwt_key, algorithm="ES256", headers={"kid": self.kid})


def _alpha(tmp: Path, *terms: str, attest: bool = True) -> tuple[Homes, tuple[Path, Path, str], tuple[Path, Path, str]]:
    """alpha (authority and node, attested with a registration for this process's uid when ``attest``)
    and beta's authority, agreed under TERMS plus ``terms``; alpha's node holds the agreement and beta's
    root, but none of beta's signed documents."""
    now = clock.now()
    alpha = make_homes(tmp / "alpha", suite="classical")
    if attest:
        policy = {
            "staleness": STALENESS,
            "algorithms": {"/": "ES256"},
            "registrations": [
                {"spiffe_id": "spiffe://alpha.example/ns/ops/db", "selectors": [f"unix:uid:{os.getuid()}"]}
            ],
        }
        attested(alpha, now, policy, algs=(ES256,))
    anchor = tmp / "alpha-root.cbor"
    a = (alpha.a, anchor, ok("--home", alpha.a, "--json", "authority", "anchor", "--to", anchor)["fingerprint"])
    b = authority(tmp, "B", BETA)
    agree(tmp, a, b, BETA, *TERMS, *terms)
    _alpha_pack(tmp, alpha)
    return alpha, a, b


def _alpha_pack(tmp: Path, alpha: Homes, prefix: list[str] | None = None) -> None:
    """alpha's authority's documents (agreements, the epoch naming them) into alpha's node."""
    pack_file = tmp / "alpha.pack"
    ok("--home", alpha.a, "--json", "pack", "export", "--to", pack_file, prefix=prefix)
    ok("--home", alpha.node_home, "--json", "pack", "import", pack_file, prefix=prefix)


def _kind(issuer: Issuer, token: str) -> str:
    try:
        issuer.validate_jwt(token, AUDIENCE)
    except QhxError as exc:
        return exc.kind
    return "ok"


# --- over the real socket, with the stock client ----------------------------------------------------


class Updates:
    """What a client stream delivered, in order."""

    def __init__(self) -> None:
        self.items: queue.Queue[Any] = queue.Queue()

    def put(self, item: Any) -> None:
        self.items.put(item)

    def until(self, wanted: Callable[[Any], bool], timeout: float = 30) -> Any:
        """The first update from now on that is ``wanted`` (earlier ones are passed over)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "the stream did not send the update"
            try:
                item = self.items.get(timeout=left)
            except queue.Empty:
                continue
            if wanted(item):
                return item


def _beta_cas(context_or_set: Any) -> set[x509.Certificate] | None:
    bundles = getattr(context_or_set, "x509_bundle_set", context_or_set)
    bundle = bundles.get_bundle_for_trust_domain(TrustDomain(BETA))
    return None if bundle is None else set(bundle.x509_authorities)


def _beta_kids(jwt_bundles: Any) -> set[str] | None:
    bundle = jwt_bundles.get_bundle_for_trust_domain(TrustDomain(BETA))
    return None if bundle is None else set(bundle.jwt_authorities)


class Skewed:
    """The issuer's clock: real time, moved on by ``skew`` seconds (the CLI follows with faketime)."""

    def __init__(self) -> None:
        self.skew = 0

    def __call__(self) -> int:
        return clock.now() + self.skew


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="qhx-sp-"))  # Unix socket paths are short
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_workload_api_serves_a_partners_spiffe_bundle_until_stale_or_revoked(tmp_path: Path, sock_dir: Path) -> None:
    need(find_libfaketime() is not None, "libfaketime is not installed (Debian package faketime)")
    alpha, _a, _b = _alpha(tmp_path, ALLOW)
    node = alpha.node_home
    beta = Beta("beta-jwt-1")
    clk = Skewed()
    later = faketime_prefix("+2h")  # where the issuer's clock goes below (2 * BUDGET)

    def make_issuer() -> Issuer:
        return Issuer(node, PASSPHRASE.encode, now=clk)

    with (
        WorkloadApiServer(make_issuer, sock_dir / "workload.sock", poll_interval=0.1, grace=0.1) as server,
        WorkloadApiClient(socket_path=f"unix:{server.socket_path}", default_timeout=20) as client,
    ):
        contexts, jwt_sets, errors = Updates(), Updates(), Updates()
        streams = [
            client.stream_x509_contexts(contexts.put, errors.put),
            client.stream_jwt_bundles(jwt_sets.put, errors.put),
        ]
        try:
            # Before the import: alpha's own bundle only.
            first = contexts.until(lambda c: True)
            assert first.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(ALPHA)) is not None
            assert _beta_cas(first) is None
            assert _beta_kids(jwt_sets.until(lambda s: True)) is None
            with pytest.raises(ValidateJwtSvidError, match="unknown-domain"):
                client.validate_jwt_svid(beta.token(INSIDE, clk() + 600), AUDIENCE)

            # The import reaches both streams (the change token moves), and a one-shot fetch.
            got = ok("--home", node, "--json", "bundle", "import-spiffe", beta.bundle(tmp_path, 1), "--domain", BETA)
            assert (got["status"], got["assurance"]) == ("new", "spiffe-bundle")
            assert _beta_cas(contexts.until(lambda c: _beta_cas(c) is not None)) == {beta.ca.cert}
            assert _beta_kids(jwt_sets.until(lambda s: _beta_kids(s) is not None)) == {beta.kid}
            assert _beta_cas(client.fetch_x509_bundles()) == {beta.ca.cert}
            jwks = client.fetch_jwt_bundles().get_bundle_for_trust_domain(TrustDomain(BETA))
            assert jwks is not None
            assert _spki(jwks.get_jwt_authority(beta.kid)) == _spki(beta.jwt_key)

            # ValidateJWTSVID: a beta JWT-SVID inside alpha's accepted prefixes, and one outside them.
            valid = client.validate_jwt_svid(beta.token(INSIDE, clk() + 600), AUDIENCE)
            assert str(valid.spiffe_id) == INSIDE
            with pytest.raises(ValidateJwtSvidError, match="scope-violation"):
                client.validate_jwt_svid(beta.token(OUTSIDE, clk() + 600), AUDIENCE)
            with pytest.raises(ValidateJwtSvidError, match="INVALID_ARGUMENT"):
                client.validate_jwt_svid(beta.token(INSIDE, clk() + 600), "spiffe://alpha.example/ns/ops/other")

            # Past alpha's budget, counted from the import: gone from both streams; validation is stale.
            clk.skew = 2 * BUDGET
            contexts.until(lambda c: _beta_cas(c) is None)
            jwt_sets.until(lambda s: _beta_kids(s) is None)
            assert _beta_cas(client.fetch_x509_bundles()) is None
            with pytest.raises(ValidateJwtSvidError, match="stale"):
                client.validate_jwt_svid(beta.token(INSIDE, clk() + 600), AUDIENCE)

            # A newer bundle (another CA), imported then: fresh again, and the streams follow it.
            old_ca, beta.ca = beta.ca, make_ca("beta.example CA 2")
            ok("--home", node, "--json", "bundle", "import-spiffe", beta.bundle(tmp_path, 2), "--domain", BETA,
               prefix=later)  # fmt: skip
            assert _beta_cas(contexts.until(lambda c: _beta_cas(c) is not None)) == {beta.ca.cert} != {old_ca.cert}
            assert str(client.validate_jwt_svid(beta.token(INSIDE, clk() + 600), AUDIENCE).spiffe_id) == INSIDE

            # alpha revokes the agreement: beta's bundle is gone at once, and its JWT-SVIDs no longer validate.
            ok("--home", alpha.a, "--json", "federation", "revoke", "--partner", BETA, prefix=later)
            _alpha_pack(tmp_path, alpha, prefix=later)
            contexts.until(lambda c: _beta_cas(c) is None)
            jwt_sets.until(lambda s: _beta_kids(s) is None)
            with pytest.raises(ValidateJwtSvidError, match="no-agreement"):
                client.validate_jwt_svid(beta.token(INSIDE, clk() + 600), AUDIENCE)
        finally:
            for stream in streams:
                stream.cancel()
        assert errors.items.empty(), errors.items.get()


# --- the issuer itself -------------------------------------------------------------------------------


def test_terms_decide_and_a_signed_bundle_takes_precedence(tmp_path: Path) -> None:
    """The terms on alpha's side are read at every change: a renegotiation that stops allowing SPIFFE bundles
    stops serving the one held (``scope-violation`` for its JWT-SVIDs), one that allows them again serves it
    again; unreadable authorities in it are left out; a signed beta bundle, once held, is served instead."""
    alpha, a, b = _alpha(tmp_path, ALLOW, attest=False)
    node = alpha.node_home
    beta = Beta("beta-jwt-1")
    not_ca = make_leaf(beta.ca, uri=INSIDE).der_chain[0]  # an end-entity certificate is no authority
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # not ES256: left out
    ed_key = ed25519.Ed25519PrivateKey.generate()
    extras = (JwtAuthority("beta-rsa", _spki(rsa_key)), JwtAuthority("beta-ed", _spki(ed_key)))
    bundle_file = beta.bundle(tmp_path, 7, extra_x509=(not_ca,), extra_jwt=extras)
    clk = Clock(clock.now())
    with Issuer(node, PASSPHRASE.encode, now=clk) as iss:
        before = iss.change_token()
        assert BETA not in iss.x509_bundles()
        ok("--home", node, "--json", "bundle", "import-spiffe", bundle_file, "--domain", BETA)
        clk.t = clock.now()
        imported = iss.change_token()
        assert imported != before
        assert iss.x509_bundles()[BETA] == beta.ca.der  # the end-entity certificate left out
        served = json.loads(iss.jwt_bundles()[BETA])
        assert [k["kid"] for k in served["keys"]] == [beta.kid]  # RSA and Ed25519 keys left out
        assert (served["spiffe_sequence"], served["spiffe_refresh_hint"]) == (7, 300)
        token = beta.token(INSIDE, clk.t + 600)
        assert iss.validate_jwt(token, AUDIENCE)[0] == INSIDE
        assert _kind(iss, beta.token(OUTSIDE, clk.t + 600)) == "scope-violation"
        with Node(node) as n:
            assert n.check_partner_identity(INSIDE, clk.t)["assurance"] == "spiffe-bundle"

        # Renegotiated without the term: the held bundle stays held but is no longer served.
        agree(tmp_path, a, b, BETA, *TERMS, name="v2")
        _alpha_pack(tmp_path, alpha)
        clk.t = clock.now()
        refused = iss.change_token()
        assert refused != imported
        assert BETA not in iss.x509_bundles()
        assert BETA not in iss.jwt_bundles()
        assert _kind(iss, token) == "scope-violation"

        # Allowed again (v3): served again.
        agree(tmp_path, a, b, BETA, *TERMS, ALLOW, name="v3")
        _alpha_pack(tmp_path, alpha)
        clk.t = clock.now()
        assert iss.change_token() != refused
        assert iss.x509_bundles()[BETA] == beta.ca.der
        assert _kind(iss, token) == "ok"

        # beta's signed documents arrive: the signed bundle is what is served, and beta's SPIFFE-only JWT
        # key no longer counts.
        released = tmp_path / "beta.pack"
        ok("--home", b[0], "--json", "pack", "export", "--partner", ALPHA, "--to", released)
        ok("--home", node, "--json", "pack", "import", released)
        clk.t = clock.now()
        with Node(node) as n:
            signed = n.store.current(BETA, "bundle")
            assert signed is not None
        assert iss.x509_bundles()[BETA] == b"".join(signed.payload.x509_authorities)
        assert iss.x509_bundles()[BETA] != beta.ca.der
        assert json.loads(iss.jwt_bundles()[BETA])["spiffe_sequence"] == signed.payload.version
        assert _kind(iss, token) == "bad-signature"


def test_a_confirmed_spiffe_bundle_stays_fresh_from_its_confirmation(tmp_path: Path) -> None:
    """Freshness is the import time, moved on by a confirmation (an authenticated fetch that returned the
    held bundle unchanged: store migration 10 ``confirmed_at``); the change token moves with the
    partner going stale and with the confirmation."""
    alpha, _a, _b = _alpha(tmp_path, ALLOW, attest=False)
    node = alpha.node_home
    beta = Beta("beta-jwt-1")
    ok("--home", node, "--json", "bundle", "import-spiffe", beta.bundle(tmp_path, 1), "--domain", BETA)
    now = clock.now()
    token = beta.token(INSIDE, now + 4 * BUDGET)
    clk = Clock(now)
    with Issuer(node, PASSPHRASE.encode, now=clk) as iss:
        fresh = iss.change_token()
        assert iss.x509_bundles()[BETA] == beta.ca.der
        clk.t = now + BUDGET + 60  # past the budget, counted from the import
        stale = iss.change_token()
        assert stale != fresh
        assert BETA not in iss.x509_bundles()
        assert _kind(iss, token) == "stale"
        confirm(node, now + BUDGET)  # an authenticated fetch returned it unchanged an hour after the import
        confirmed = iss.change_token()
        assert confirmed != stale  # the store fingerprint sees the confirmation
        assert iss.x509_bundles()[BETA] == beta.ca.der
        assert _kind(iss, token) == "ok"
        confirm(node, clk.t)  # confirmed again while connected: the streams re-send (same bundle)
        assert iss.change_token() != confirmed
        clk.t = now + 2 * BUDGET + 120
        assert BETA not in iss.x509_bundles()
        assert _kind(iss, token) == "stale"


def confirm(node: Path, at: int) -> None:
    """What ``federation fetch`` writes when the partner's endpoint returns the held bundle unchanged."""
    with Node(node) as n:
        held = n.store.spiffe_bundle(BETA)
        assert held is not None
        _, generation = n.store.spiffe_bundle_mark(BETA)
        entry = AuditEntry("test", "confirmed by an authenticated fetch")
        n.store.confirm_spiffe_bundle(BETA, held.sequence, held.digest, at, [entry], generation=generation)


def test_without_the_term_a_spiffe_bundle_is_never_served(tmp_path: Path) -> None:
    """Under terms that never allowed SPIFFE bundles the import is refused; and a SPIFFE bundle put into
    the store beside the node's own rules is still not served by the issuer (``scope-violation``)."""
    alpha, _a, _b = _alpha(tmp_path, attest=False)
    node = alpha.node_home
    beta = Beta("beta-jwt-1")
    bundle_file = beta.bundle(tmp_path, 1)
    fails("scope-violation", "--home", node, "--json", "bundle", "import-spiffe", bundle_file, "--domain", BETA)
    now = clock.now()
    data = bundle_file.read_bytes()
    with Node(node) as n:
        _, generation = n.store.spiffe_bundle_mark(BETA)
        digest = spiffe_bundle.content_digest(spiffe_bundle.parse(data))
        n.store.add_spiffe_bundle(
            BETA, 1, digest, data, 1, now, [AuditEntry("test", "placed beside the node's rules")], generation=generation
        )
    with Issuer(node, PASSPHRASE.encode, now=Clock(now)) as iss:
        assert set(iss.x509_bundles()) == {ALPHA}
        assert set(iss.jwt_bundles()) == {ALPHA}
        assert _kind(iss, beta.token(INSIDE, now + 600)) == "scope-violation"
