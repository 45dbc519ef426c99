"""Chain verification reuses parsed certificates and issuer keys (qhx_edge/core/svid.py ``_read``,
``_anchors``, ``_signed_by``) and must stay exactly as strict as ``verify_directly_issued_by``.

Review findings on the cached version, each failing before its fix:
* a legal name cryptography does not decode (a T61String CN of byte 0xff) raised an untyped
  ``ValueError`` from the cache, for the leaf and for any odd authority in the bundle (the old
  code, and OpenSSL, accept them);
* the signature algorithm inside the signed part was no longer compared with the outer one;
* every certificate that parsed stayed cached whatever its size.
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from qhx_edge.core import svid
from qhx_edge.core.errors import BadSignature

SID = "spiffe://beta.example/w"
NOW = int(dt.datetime(2026, 6, 1, tzinfo=dt.UTC).timestamp())
ECDSA_SHA256, ECDSA_SHA384, COMMON_NAME = "1.2.840.10045.4.3.2", "1.2.840.10045.4.3.3", "2.5.4.3"


# --- just enough DER to rewrite a certificate's fields and sign it again ----------------------------


def _tlv(b: bytes, i: int = 0) -> tuple[int, bytes, int]:
    length, j = b[i + 1], i + 2
    if length & 0x80:
        n = length & 0x7F
        length, j = int.from_bytes(b[j : j + n], "big"), j + n
    return b[i], b[j : j + length], j + length


def _enc(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _children(content: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(content):
        _, _, end = _tlv(content, i)
        out.append(content[i:end])
        i = end
    return out


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytes([40 * parts[0] + parts[1]])
    for part in parts[2:]:
        seven, rest = [part & 0x7F], part >> 7
        while rest:
            seven.append(0x80 | (rest & 0x7F))
            rest >>= 7
        body += bytes(reversed(seven))
    return _enc(0x06, body)


def _alg(dotted: str) -> bytes:
    return _enc(0x30, _oid(dotted))


def _resign(
    der: bytes, key: ec.EllipticCurvePrivateKey, *, inner: bytes | None = None, outer: bytes | None = None,
    subject: bytes | None = None,
) -> bytes:  # fmt: skip
    _, content, _ = _tlv(der)
    tbs, _alg_field, _sig = _children(content)
    parts = _children(_tlv(tbs)[1])  # [version], serial, signature alg, issuer, validity, subject, ...
    if inner is not None:
        parts[2] = inner
    if subject is not None:
        parts[5] = subject
    tbs = _enc(0x30, b"".join(parts))
    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _enc(0x30, tbs + (outer or parts[2]) + _enc(0x03, b"\x00" + signature))


def _t61_name() -> bytes:
    """A Name whose CN is a T61String of 0xff: legal DER that cryptography will not decode."""
    return _enc(0x30, _enc(0x31, _enc(0x30, _oid(COMMON_NAME) + _enc(0x14, b"\xff"))))


def _cert(key: ec.EllipticCurvePrivateKey, subject: str, public: object, *, ca: bool) -> bytes:
    b = (
        x509.CertificateBuilder()
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CA")]))
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(public)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2027, 1, 1, tzinfo=dt.UTC))
        .add_extension(x509.BasicConstraints(ca, None), critical=True)
        .add_extension(x509.KeyUsage(not ca, False, False, False, False, ca, ca, False, False), critical=True)
    )
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SID)]), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


@pytest.fixture(scope="module")
def pki() -> tuple[ec.EllipticCurvePrivateKey, bytes, bytes]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(ca_key, "CA", ca_key.public_key(), ca=True)
    leaf = _cert(ca_key, "leaf", ec.generate_private_key(ec.SECP256R1()).public_key(), ca=False)
    return ca_key, ca, leaf


def test_names_cryptography_does_not_decode_are_compared_as_before(
    pki: tuple[ec.EllipticCurvePrivateKey, bytes, bytes],
) -> None:
    ca_key, ca, leaf = pki
    odd_leaf = _resign(leaf, ca_key, subject=_t61_name())
    assert svid.leaf_spiffe_id(odd_leaf) == SID
    assert svid.verify_x509_svid([odd_leaf], [ca], NOW) == SID
    odd_root = _resign(_cert(ca_key, "X", ca_key.public_key(), ca=True), ca_key, subject=_t61_name())
    assert svid.verify_x509_svid([leaf], [odd_root, ca], NOW) == SID  # an odd extra authority harms nothing
    with pytest.raises(BadSignature):
        svid.verify_x509_svid([leaf], [odd_root], NOW)


def test_the_inner_signature_algorithm_must_be_the_outer_one_even_when_warm(
    pki: tuple[ec.EllipticCurvePrivateKey, bytes, bytes],
) -> None:
    ca_key, ca, leaf = pki
    for _ in range(3):  # warm: the leaf, the CA and its key are cached
        assert svid.verify_x509_svid([leaf], [ca], NOW) == SID
    mixed = _resign(leaf, ca_key, inner=_alg(ECDSA_SHA384), outer=_alg(ECDSA_SHA256))  # signed with SHA-256
    for _ in range(2):
        with pytest.raises(BadSignature):
            svid.verify_x509_svid([mixed], [ca], NOW)


def test_every_call_checks_the_signature_and_big_certificates_are_not_kept(
    pki: tuple[ec.EllipticCurvePrivateKey, bytes, bytes],
) -> None:
    ca_key, ca, leaf = pki
    assert svid.verify_x509_svid([leaf], [ca], NOW) == SID
    other_key = ec.generate_private_key(ec.SECP256R1())
    impostor_ca = _cert(other_key, "CA", other_key.public_key(), ca=True)  # same name, another key
    with pytest.raises(BadSignature):
        svid.verify_x509_svid([leaf], [impostor_ca], NOW)  # the cached leaf proves nothing by itself
    big = _resign(
        leaf, ca_key, subject=_enc(0x30, _enc(0x31, _enc(0x30, _oid(COMMON_NAME) + _enc(0x0C, b"x" * 20000))))
    )
    assert len(big) > svid.MAX_CACHED_DER
    before = svid._read_cached.cache_info().currsize
    assert svid.verify_x509_svid([big], [ca], NOW) == SID
    assert svid._read_cached.cache_info().currsize == before
