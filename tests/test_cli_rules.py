"""Rules that used to live in the command line, now operations of qhx_edge.homes (issue 7).

The command line only parses options, calls an operation and renders its
result; these tests hold the operations to what the commands did: TPM
manufacturer CA certificates (``authority tpm-ca``), peer summaries
(``pack export --since``), the challenge pack's shape (``node attest
respond``), the authority card an attestation request is sealed to, and which
kind of home a directory is.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from qhx_edge.core.cards import parse_card
from qhx_edge.core.errors import Malformed, Rejected
from qhx_edge.homes import attestation, layout, node
from qhx_edge.homes.authority import Authority
from qhx_edge.homes.node import Node
from qhx_edge.store import clock
from tests.conftest import PASSPHRASE, Homes, make_homes, run_cli


def _ca_certificate(name: str = "Test TPM Manufacturer Root") -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


# --- TPM manufacturer CAs -------------------------------------------------------------------


def test_a_manufacturer_ca_loads_from_pem_and_der_alike() -> None:
    cert = _ca_certificate()
    der = cert.public_bytes(Encoding.DER)
    assert attestation.load_manufacturer_ca(der, "ca.der") == cert
    assert attestation.load_manufacturer_ca(b"\n  " + cert.public_bytes(Encoding.PEM), "ca.pem") == cert


@pytest.mark.parametrize(
    "data", [b"", b"not a certificate", b"-----BEGIN CERTIFICATE-----\nAAAA\n", b"\x30\x03\x02\x01"]
)
def test_what_is_not_a_certificate_is_malformed(data: bytes) -> None:
    with pytest.raises(Malformed, match=r"^ca\.pem: not an X\.509 certificate"):
        attestation.load_manufacturer_ca(data, "ca.pem")


def test_a_trusted_manufacturer_ca_is_kept_as_der_named_by_its_digest(homes: Homes) -> None:
    assert attestation.manufacturer_cas(homes.authority) == []
    first, second = _ca_certificate("B root"), _ca_certificate("A root")
    infos = [attestation.trust_manufacturer_ca(homes.authority, c) for c in (first, second)]
    ders = [c.public_bytes(Encoding.DER) for c in (first, second)]
    assert infos == [
        {"tpm_ca": hashlib.sha256(d).hexdigest()[:16], "subject": c.subject.rfc4514_string()}
        for d, c in zip(ders, (first, second), strict=True)
    ]
    for info, der in zip(infos, ders, strict=True):
        assert (homes.a / "tpm-cas" / f"{info['tpm_ca']}.der").read_bytes() == der
    # Sorted by file name, so the order is stable whatever order they were added in.
    by_name = sorted(zip([i["tpm_ca"] for i in infos], ders, strict=True))
    assert attestation.manufacturer_cas(homes.authority) == [der for _, der in by_name]
    # Trusting the same certificate again changes nothing.
    assert attestation.trust_manufacturer_ca(homes.authority, first) == infos[0]
    assert len(attestation.manufacturer_cas(homes.authority)) == 2


def test_cli_tpm_ca_reports_and_refuses_as_before(homes: Homes, tmp_path: Path) -> None:
    cert = _ca_certificate()
    pem = tmp_path / "ca.pem"
    pem.write_bytes(cert.public_bytes(Encoding.PEM))
    r = run_cli("--home", homes.a, "--json", "authority", "tpm-ca", pem)
    assert r.code == 0, r.stderr
    der = cert.public_bytes(Encoding.DER)
    assert r.json == {
        "ok": True,
        "tpm_ca": hashlib.sha256(der).hexdigest()[:16],
        "subject": "CN=Test TPM Manufacturer Root",
    }
    text = run_cli("--home", homes.a, "authority", "tpm-ca", pem)
    assert (text.code, text.stdout) == (0, "trusting TPM manufacturer CA CN=Test TPM Manufacturer Root\n")
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"garbage")
    r = run_cli("--home", homes.a, "--json", "authority", "tpm-ca", bad)
    assert r.code == 1
    assert r.json["error"]["kind"] == "malformed"
    assert r.json["error"]["message"].startswith(f"{bad}: not an X.509 certificate")


# --- summaries for --since ---------------------------------------------------------------------


def test_a_summary_file_must_be_a_json_object(tmp_path: Path) -> None:
    f = tmp_path / "peer.json"
    for content, message in (
        (b"{not json", r"not a JSON summary \("),
        (b"\xff\xfe", r"not a JSON summary \("),
        (b"[1, 2]", r"not a JSON summary$"),
        (b'"text"', r"not a JSON summary$"),
    ):
        f.write_bytes(content)
        with pytest.raises(Malformed, match=rf"^{f}: {message}"):
            node.load_summary(str(f))
    summary = {"format": "qhx-edge-summary", "domains": {}}
    f.write_text(json.dumps(summary))
    assert node.load_summary(str(f)) == summary


def test_the_summary_message_names_the_path_as_given(
    homes: Homes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "peer.json").write_text("[]")
    monkeypatch.chdir(tmp_path)
    r = run_cli("--home", homes.a, "--json", "pack", "export", "--since", "./peer.json", "--to", tmp_path / "p")
    assert r.code == 1
    assert r.json["error"] == {"kind": "malformed", "message": "./peer.json: not a JSON summary"}


# --- attestation packs on the node side ---------------------------------------------------------


def test_a_request_is_sealed_only_to_an_authority_of_the_nodes_domain(homes: Homes, tmp_path: Path) -> None:
    other = make_homes(tmp_path / "other", domain="beta.example", import_first=False)
    foreign = parse_card(other.authority.card())
    with Node(homes.node_home, PASSPHRASE.encode) as n:
        with pytest.raises(Rejected) as refused:
            attestation.request_pack(n, foreign, "join-token", clock.now(), token="qhx1-x")
        assert "beta.example" in refused.value.message
        own = parse_card(homes.authority.card())
        data = attestation.request_pack(n, own, "join-token", clock.now(), token="qhx1-x")
    assert data != b""


def test_a_challenge_pack_holds_the_challenge_and_one_card(homes: Homes) -> None:
    auth = homes.authority
    signer = auth._signers("freshness")[0]
    now = clock.now()
    card = auth.card()
    for documents in ([], [card, card]):
        data = attestation.wrap(
            b"challenge", signer, domain=auth.domain, node="authority", now=now, documents=documents
        )
        with pytest.raises(Malformed, match="a challenge pack holds the challenge and the authority's card"):
            attestation.challenge_card(data)
    data = attestation.wrap(b"challenge", signer, domain=auth.domain, node="authority", now=now, documents=[card])
    raw, got = attestation.challenge_card(data)
    assert raw == b"challenge"
    assert got.raw == card


def test_evidence_is_sealed_only_to_the_domains_authority(homes: Homes) -> None:
    with Node(homes.node_home, PASSPHRASE.encode) as n:
        node_card = parse_card(n.card())  # this domain, but not its authority
        with pytest.raises(Rejected, match="authority"):
            attestation.evidence_pack(n, b"challenge", node_card, clock.now())


# --- which home ----------------------------------------------------------------------------------


def test_the_kind_of_home_is_told_by_the_authority_state_file(homes: Homes, tmp_path: Path) -> None:
    assert layout.is_authority(homes.a)
    assert Authority.exists(homes.a)
    assert not layout.is_authority(homes.node_home)
    assert not layout.is_authority(tmp_path / "nothing-here")
