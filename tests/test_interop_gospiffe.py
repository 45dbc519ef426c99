"""go-spiffe v2, the stock Go client, against our real ``qhx-edge serve`` Workload API, unchanged.

``spiffeprobe`` (tests/interop/, docs/architecture.md "Interop peers") fetches X.509-SVIDs and
checks each with ``x509svid.Verify`` against the fetched bundles (X509-SVID §5.2), fetches a
JWT-SVID and validates it both with the Workload API's ``ValidateJWTSVID`` and with
``jwtsvid.ParseAndValidate`` against our JWT bundles (JWT-SVID §7), and fetches both kinds of
bundle (SPIFFE Workload API §5, §6). The node is attested with a join token, as in
tests/test_end_to_end.py.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import WorkloadApiClient

from tests.interop import probe, probe_ok, spiffeprobe
from tests.test_end_to_end import _attested, serving
from tests.test_workload_api import _ca

DOMAIN = "alpha.example"
WEB = f"spiffe://{DOMAIN}/web"
DB = f"spiffe://{DOMAIN}/db"
PQ = f"spiffe://{DOMAIN}/pq/ledger"
AUDIENCE = "spiffe://beta.example/api"
ML_DSA_65 = "2.16.840.1.101.3.4.3.18"


@contextlib.contextmanager
def _serve(tmp: Path, ids: list[str]) -> Iterator[Path]:
    spiffeprobe()  # skip (or fail) before making homes when the peer cannot be built
    me = os.getuid()
    registrations: list[dict[str, object]] = [{"spiffe_id": i, "selectors": [f"unix:uid:{me}"]} for i in ids]
    registrations.append({"spiffe_id": f"spiffe://{DOMAIN}/someone-else", "selectors": [f"unix:uid:{me + 4242}"]})
    homes = _attested(tmp, registrations)
    with serving(homes.node_home, tmp / "w.sock") as sock:
        yield sock


@pytest.fixture(scope="module")
def classical(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A node serving two ES256 identities to this uid (policy ``/`` = ES256)."""
    with _serve(tmp_path_factory.mktemp("gospiffe"), [WEB, DB]) as sock:
        yield sock


def _x509_jwks(ders: list[str]) -> dict[str, Any]:
    """A SPIFFE bundle (SPIFFE Trust Domain and Bundle §4) of the EC authorities among ``ders``."""
    keys = []
    for der in ders:
        cert = x509.load_der_x509_certificate(base64.b64decode(der))
        pub = cert.public_key()
        if isinstance(pub, ec.EllipticCurvePublicKey):
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(pub))
            keys.append({**jwk, "use": "x509-svid", "x5c": [der]})
    return {"keys": keys, "spiffe_sequence": 1}


def test_gospiffe_fetches_x509_svids_that_verify(classical: Path, tmp_path: Path) -> None:
    out = probe_ok("x509", "-socket", classical)
    by_id = {s["spiffe_id"]: s for s in out["svids"]}
    assert set(by_id) == {WEB, DB}  # not someone-else's
    for sid, svid in by_id.items():
        assert svid["verified_id"] == sid  # x509svid.Verify against the fetched bundle set
        assert len(svid["chain_der"]) == 2  # leaf, the node's delegated intermediate
        assert svid["verified_chain_length"] == 3  # ... up to a root of our bundle
    assert set(out["bundles"]) == {DOMAIN}

    # The same chain against a SPIFFE bundle file, with go-spiffe's spiffebundle.
    (tmp_path / "web.pem").write_text(by_id[WEB]["chain_pem"])
    (tmp_path / "alpha.json").write_text(json.dumps(_x509_jwks(out["bundles"][DOMAIN]["der"])))
    ok = probe_ok("verify", "-chain", tmp_path / "web.pem", "-bundle", tmp_path / "alpha.json", "-trust-domain", DOMAIN)
    assert ok == {"spiffe_id": WEB, "verified_chain_length": 3}

    # ... and not against another CA that claims the same trust domain.
    _, other = _ca(DOMAIN)
    other_der = base64.b64encode(other.public_bytes(Encoding.DER)).decode()
    (tmp_path / "other.json").write_text(json.dumps(_x509_jwks([other_der])))
    bad = probe("verify", "-chain", tmp_path / "web.pem", "-bundle", tmp_path / "other.json", "-trust-domain", DOMAIN)
    assert bad.code == 1
    assert "could not verify leaf certificate" in bad.out["verify_error"]


def test_gospiffe_fetches_and_validates_a_jwt_svid(classical: Path, tmp_path: Path) -> None:
    out = probe_ok("jwt", "-socket", classical, "-audience", AUDIENCE, "-spiffe-id", DB)
    assert out["spiffe_id"] == DB
    assert out["audience"] == [AUDIENCE]
    assert out["validated_id"] == DB  # workloadapi.ValidateJWTSVID: our server's own check
    assert out["validated_claims"]["sub"] == DB
    assert out["parsed_id"] == DB  # jwtsvid.ParseAndValidate against our JWT bundles
    kid = jwt.get_unverified_header(out["token"])["kid"]
    bundles = probe_ok("jwt-bundles", "-socket", classical)["bundles"]
    assert kid in bundles[DOMAIN]["kids"]

    # The JWKS we serve, as a SPIFFE bundle file: the token verifies for its audience only.
    jwks = bundles[DOMAIN]["jwks"]
    jwks["keys"] = [{**k, "use": "jwt-svid"} for k in jwks["keys"]]
    (tmp_path / "alpha.json").write_text(json.dumps(jwks))
    args = ("verify-jwt", "-token", out["token"], "-bundle", tmp_path / "alpha.json", "-trust-domain", DOMAIN)
    assert probe_ok(*args, "-audience", AUDIENCE)["spiffe_id"] == DB
    wrong = probe(*args, "-audience", "spiffe://beta.example/other")
    assert wrong.code == 1
    assert "audience" in wrong.out["parse_and_validate_error"]


def test_gospiffe_fetches_the_bundles_the_python_client_fetches(classical: Path) -> None:
    x509_bundles = probe_ok("x509-bundles", "-socket", classical)["bundles"]
    jwt_bundles = probe_ok("jwt-bundles", "-socket", classical)["bundles"]
    with WorkloadApiClient(socket_path=f"unix:{classical}", default_timeout=20) as client:
        py_x509 = {str(b.trust_domain): b for b in client.fetch_x509_bundles().bundles}
        py_jwt = {str(b.trust_domain): b for b in client.fetch_jwt_bundles().bundles}
    assert set(x509_bundles) == set(py_x509) == {DOMAIN}
    go_ders = {base64.b64decode(d) for d in x509_bundles[DOMAIN]["der"]}
    py_ders = {c.public_bytes(Encoding.DER) for c in py_x509[DOMAIN].x509_authorities}
    assert go_ders == py_ders
    assert len(go_ders) == 2  # the ES256 and the ML-DSA-65 CA of the hybrid suite
    assert set(jwt_bundles) == set(py_jwt) == {DOMAIN}
    assert set(jwt_bundles[DOMAIN]["kids"]) == set(py_jwt[DOMAIN].jwt_authorities)


def test_gospiffe_refuses_a_response_that_holds_an_ml_dsa_svid(tmp_path: Path) -> None:
    """What a stock Go workload sees today when one of its identities is ML-DSA-65.

    Go's crypto/x509 cannot parse an ML-DSA private key, and go-spiffe parses every SVID of a
    response, so the whole X.509 fetch fails even though the ES256 SVID in it is fine: Go
    workloads need ES256-only registrations (the classical-interop profile). The bundles, with
    the ML-DSA-65 CA in them, and JWT-SVIDs still work. When this test starts failing, go-spiffe
    has learnt ML-DSA: say so in docs/architecture.md.
    """
    with _serve(tmp_path, [WEB, PQ]) as sock:
        r = probe("x509", "-socket", sock)
        assert r.code == 1
        assert "cannot parse DER encoded private key" in r.out["error"]
        assert ML_DSA_65 in r.out["error"]
        assert len(probe_ok("x509-bundles", "-socket", sock)["bundles"][DOMAIN]["der"]) == 2
        assert probe_ok("jwt", "-socket", sock, "-audience", AUDIENCE, "-spiffe-id", WEB)["parsed_id"] == WEB


def test_gospiffe_cannot_read_a_spiffe_bundle_that_lists_an_ml_dsa_authority(classical: Path, tmp_path: Path) -> None:
    """A constraint on ``bundle export --format spiffe`` for Go peers (SPIRE, go-spiffe).

    go-spiffe parses a SPIFFE bundle with go-jose, which knows no JWK key type for ML-DSA (``AKP``,
    nor a key without ``kty``), and refuses the whole bundle, so the ES256 authority in it is lost
    too. A bundle for Go peers must list only the authorities they can parse.
    """
    out = probe_ok("x509", "-socket", classical)
    ders = out["bundles"][DOMAIN]["der"]
    ml_dsa = [
        d
        for d in ders
        if x509.load_der_x509_certificate(base64.b64decode(d)).signature_algorithm_oid.dotted_string == ML_DSA_65
    ]
    assert len(ml_dsa) == 1
    (tmp_path / "web.pem").write_text(out["svids"][0]["chain_pem"])
    jwks = _x509_jwks(ders)
    for extra, why in (
        ({"kty": "AKP", "alg": "ML-DSA-65"}, "unsupported key type"),
        ({}, "missing json web key type"),
    ):
        bundle = {**jwks, "keys": [*jwks["keys"], {**extra, "use": "x509-svid", "x5c": ml_dsa}]}
        (tmp_path / "alpha.json").write_text(json.dumps(bundle))
        r = probe("verify", "-chain", tmp_path / "web.pem", "-bundle", tmp_path / "alpha.json", "-trust-domain", DOMAIN)
        assert r.code == 1
        assert why in r.out["error"]
