"""Name constraints that bind (issue: a compromised node must not mint web-server certificates).

A node's delegated CA is permitted its domain's URIs and nothing a TLS client
would accept for a host: leaves under it with a DNS name, an IP address or an
e-mail address (in the SAN, or a host name as subject common name) fail path
validation in OpenSSL, while a SPIFFE X509-SVID passes.  Before the
constraints excluded those names, the DNS and IP leaves verified.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qhx_edge.core import x509ca
from qhx_edge.core.cards import spki
from qhx_edge.core.suites import ES256, MLDSA65, PrivateKey
from tests.conftest import need_tool

DOMAIN = "alpha.example"
NOW = int(dt.datetime(2026, 12, 1, tzinfo=dt.UTC).timestamp())


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, PrivateKey]:
    root_key = PrivateKey.generate_algs([ES256])
    root = x509ca.make_ca(DOMAIN, root_key, 1, NOW - 3600, 86400)
    node_key = PrivateKey.generate_algs([ES256])
    inter = x509ca.make_intermediate(DOMAIN, root_key, root.der, spki(node_key), "n1", NOW - 3600, 86400)
    folder = tmp_path_factory.mktemp("nc")
    (folder / "root.pem").write_bytes(_pem(root.der))
    (folder / "inter.pem").write_bytes(_pem(inter.der))
    return folder / "root.pem", folder / "inter.pem", node_key


def _leaf(node_key: PrivateKey, names: list[x509.GeneralName], cn: str | None = None) -> bytes:
    signer = x509ca.private_key_object(node_key)
    inter_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, DOMAIN),
            x509.NameAttribute(NameOID.COMMON_NAME, f"qhx-edge {DOMAIN} node n1 ES256"),
        ]
    )
    key = ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime.fromtimestamp(NOW - 60, dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]) if cn else x509.Name([]))
        .issuer_name(inter_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=cn is None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    return builder.sign(signer, hashes.SHA256()).public_bytes(Encoding.PEM)


def _verify(chain: tuple[Path, Path, PrivateKey], leaf: bytes, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    root, inter, _ = chain
    path = tmp_path / "leaf.pem"
    path.write_bytes(leaf)
    return subprocess.run(
        ["openssl", "verify", "-attime", str(NOW), "-CAfile", str(root), "-untrusted", str(inter), str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def test_a_spiffe_svid_under_the_node_ca_verifies(chain: tuple[Path, Path, PrivateKey], tmp_path: Path) -> None:
    need_tool("openssl", "openssl")
    leaf = _leaf(chain[2], [x509.UniformResourceIdentifier(f"spiffe://{DOMAIN}/web")])
    r = _verify(chain, leaf, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    ("label", "names", "cn"),
    [
        ("dns", [x509.DNSName("www.bank.example")], None),
        (
            "dns-beside-spiffe",
            [x509.UniformResourceIdentifier(f"spiffe://{DOMAIN}/web"), x509.DNSName("bank.com")],
            None,
        ),
        ("ipv4", [x509.IPAddress(ipaddress.IPv4Address("192.0.2.10"))], None),
        ("ipv6", [x509.IPAddress(ipaddress.IPv6Address("2001:db8::1"))], None),
        ("email", [x509.RFC822Name("ceo@bank.example")], None),
        ("common-name-host", [], "www.bank.example"),
        ("other-domain-uri", [x509.UniformResourceIdentifier("spiffe://bravo.example/web")], None),
    ],
)
def test_a_node_ca_cannot_mint_a_certificate_for_a_host(
    chain: tuple[Path, Path, PrivateKey], tmp_path: Path, label: str, names: list[x509.GeneralName], cn: str | None
) -> None:
    need_tool("openssl", "openssl")
    r = _verify(chain, _leaf(chain[2], names, cn), tmp_path)
    assert r.returncode != 0, f"{label}: a leaf for a host verified under the node CA"
    assert "subtree violation" in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("alg", [ES256, MLDSA65])
def test_every_ca_carries_the_same_binding_constraints(alg: int) -> None:
    # OpenSSL 3.0 cannot validate ML-DSA chains: the ML-DSA CAs carry the same extension, checked here.
    root_key = PrivateKey.generate_algs([alg])
    root = x509ca.make_ca(DOMAIN, root_key, 1, NOW, 86400)
    inter = x509ca.make_intermediate(
        DOMAIN, root_key, root.der, spki(PrivateKey.generate_algs([alg])), "n1", NOW, 86400
    )
    for der in (root.der, inter.der):
        ext = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.NameConstraints)
        assert ext.critical
        assert ext.value == x509ca.domain_name_constraints(DOMAIN)
        assert x509.DNSName("") in (ext.value.excluded_subtrees or [])
