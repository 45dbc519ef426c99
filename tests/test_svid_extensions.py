"""An X.509-SVID whose extensions cannot be read is ``malformed``, never an untyped error
(qhx_edge/core/svid.py): a repeated SAN extension, or a SAN entry of an unknown name type."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from qhx_edge.core import svid
from qhx_edge.core.errors import Malformed

SID = "spiffe://beta.example/ns/logistics/api"


def _leaf() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ca")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SID)]), critical=True)
        .add_extension(x509.IssuerAlternativeName([x509.UniformResourceIdentifier(SID + "x")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


def test_a_readable_leaf_names_its_id() -> None:
    assert svid.leaf_spiffe_id(_leaf()) == SID


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"\x06\x03\x55\x1d\x12", b"\x06\x03\x55\x1d\x11"),  # the issuer-alt-name OID made a second SAN
        (b"\x86\x26" + SID.encode(), b"\xa9\x26" + SID.encode()),  # a URI entry turned into an unknown tag
    ],
)
def test_unreadable_extensions_are_malformed(old: bytes, new: bytes) -> None:
    raw = _leaf()
    assert old in raw
    with pytest.raises(Malformed):
        svid.leaf_spiffe_id(raw.replace(old, new))
    with pytest.raises(Malformed):
        svid.verify_x509_svid([raw.replace(old, new)], [], 0)
