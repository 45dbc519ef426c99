"""SPIRE, the reference SPIFFE implementation, as a real peer: a smoke test of the peer itself.

A SPIRE server and agent for ``beta.example`` (tests/interop/, docs/architecture.md "Interop
peers"): the agent attests with a join token, a registration entry gives this uid an identity,
and go-spiffe's ``spiffeprobe`` fetches it from SPIRE's Workload API and verifies it. SPIRE's
``bundle show -format spiffe`` is a SPIFFE bundle (SPIFFE Trust Domain and Bundle §4) with a
``spiffe_sequence``, and go-spiffe's ``federation.FetchBundle`` gets the same bundle from SPIRE's
bundle endpoint over both profiles (SPIFFE Federation §5.2 ``https_web``, §5.3 ``https_spiffe``):
what later federation tests exchange with our node.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.interop import SPIRE_TD, Spire, probe, probe_ok, spire, wait_until

WORKLOAD = f"spiffe://{SPIRE_TD}/workload"
AUDIENCE = "spiffe://alpha.example/api"


@dataclass
class Served:
    spire: Spire
    x509: dict[str, Any]  # spiffeprobe x509 against the agent's Workload API
    bundle: dict[str, Any]  # spire-server bundle show -format spiffe


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with spire([(WORKLOAD, [f"unix:uid:{os.getuid()}"])], bundle_profile="https_spiffe") as s:

        def fetched() -> dict[str, Any] | None:
            # "no identity issued" (PermissionDenied) until the agent's first sync brings the entry.
            r = probe("x509", "-socket", s.workload_socket, "-timeout", "5s")
            return r.out if r.code == 0 else None

        x509 = wait_until("an X.509-SVID from the SPIRE agent", fetched, timeout=30, step=0.5)
        bundle = json.loads(s.server("bundle", "show", "-format", "spiffe").stdout)
        yield Served(s, x509, bundle)


def test_go_spiffe_fetches_an_x509_svid_from_spire_that_verifies(served: Served) -> None:
    (svid,) = served.x509["svids"]
    assert svid["spiffe_id"] == WORKLOAD
    assert svid["verified_id"] == WORKLOAD  # x509svid.Verify against the agent's bundle
    assert set(served.x509["bundles"]) == {SPIRE_TD}


def test_spire_bundle_show_is_a_spiffe_bundle_with_a_sequence(served: Served, tmp_path: Path) -> None:
    bundle = served.bundle
    assert isinstance(bundle["spiffe_sequence"], int)
    assert bundle["spiffe_sequence"] >= 1
    x509_keys = [k for k in bundle["keys"] if k["use"] == "x509-svid"]
    assert [k for k in bundle["keys"] if k["use"] == "jwt-svid"]
    # The server's X.509 authorities are the ones its agent hands to workloads.
    assert {der for k in x509_keys for der in k["x5c"]} == set(served.x509["bundles"][SPIRE_TD]["der"])
    for k in x509_keys:
        base64.b64decode(k["x5c"][0], validate=True)

    # go-spiffe reads it as a SPIFFE bundle, and the SVID verifies against it.
    (tmp_path / "beta.json").write_text(json.dumps(bundle))
    (tmp_path / "svid.pem").write_text(served.x509["svids"][0]["chain_pem"])
    out = probe_ok(
        "verify", "-chain", tmp_path / "svid.pem", "-bundle", tmp_path / "beta.json", "-trust-domain", SPIRE_TD
    )
    assert out["spiffe_id"] == WORKLOAD


def test_go_spiffe_validates_a_spire_jwt_svid(served: Served, tmp_path: Path) -> None:
    out = probe_ok("jwt", "-socket", served.spire.workload_socket, "-audience", AUDIENCE)
    assert out["spiffe_id"] == out["validated_id"] == out["parsed_id"] == WORKLOAD
    # ... and against the server's SPIFFE bundle, as a federated peer would check it.
    (tmp_path / "beta.json").write_text(json.dumps(served.bundle))
    args = ("verify-jwt", "-token", out["token"], "-bundle", tmp_path / "beta.json", "-trust-domain", SPIRE_TD)
    assert probe_ok(*args, "-audience", AUDIENCE)["spiffe_id"] == WORKLOAD


def _same_bundle(fetched: dict[str, Any], shown: dict[str, Any]) -> None:
    """A bundle go-spiffe fetched (spiffeprobe fetch-bundle) is the one ``bundle show`` printed."""
    assert fetched["trust_domain"] == SPIRE_TD
    assert fetched["sequence_number"] == shown["spiffe_sequence"]
    assert fetched["refresh_hint_seconds"] == 60  # refresh_hint = "1m" in the endpoint's config
    got = {der for k in fetched["bundle"]["keys"] if k["use"] == "x509-svid" for der in k["x5c"]}
    assert got == {der for k in shown["keys"] if k["use"] == "x509-svid" for der in k["x5c"]}
    assert fetched["jwt_authorities"] == len([k for k in shown["keys"] if k["use"] == "jwt-svid"])


def test_go_spiffe_fetches_spires_bundle_over_https_spiffe(served: Served, tmp_path: Path) -> None:
    s = served.spire
    (tmp_path / "beta.json").write_text(json.dumps(served.bundle))
    args = ("fetch-bundle", "-trust-domain", SPIRE_TD, "-url", s.bundle_url, "-endpoint-bundle", tmp_path / "beta.json")
    out = probe_ok(*args, "-endpoint-id", s.server_id)
    assert out["profile"] == "https_spiffe"
    _same_bundle(out, served.bundle)
    # The endpoint must present the SPIFFE ID we expect, not just any SVID of the domain.
    wrong = probe(*args, "-endpoint-id", f"spiffe://{SPIRE_TD}/not-the-server")
    assert wrong.code == 1
    assert "unexpected ID" in wrong.out["error"]


def _web_cert(tmp: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files (an https_web server's)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tmp / f"{name}.pem", tmp / f"{name}.key"


def test_go_spiffe_fetches_spires_bundle_over_https_web(tmp_path: Path) -> None:
    cert, key = _web_cert(tmp_path, "endpoint")
    other, _ = _web_cert(tmp_path, "other")
    with spire(agent=False, bundle_profile="https_web", web_cert=(cert, key)) as s:
        shown = json.loads(s.server("bundle", "show", "-format", "spiffe").stdout)
        args = ("fetch-bundle", "-trust-domain", SPIRE_TD, "-url", s.bundle_url)
        out = probe_ok(*args, "-web-roots", cert)
        assert out["profile"] == "https_web"
        _same_bundle(out, shown)
        wrong = probe(*args, "-web-roots", other)  # a server certificate we do not trust
        assert wrong.code == 1
        assert "certificate" in wrong.out["error"]
