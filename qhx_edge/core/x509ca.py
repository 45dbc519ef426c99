"""The domain's X.509 certificate authorities (SPIFFE X509-SVID §3, signing certificates).

Each generation of CAs is one ECDSA P-256 CA and, for the ``pq`` and
``hybrid`` suites, one ML-DSA-65 CA.  Each is self-signed, ``cA`` true with
path length 1 (the node's delegated intermediate, path length 0, sits below
it), key usage keyCertSign and cRLSign, the trust domain's SPIFFE ID as URI
SAN, and name constraints (RFC 5280 §4.2.1.10) that bind it to the trust
domain: URIs in the domain only (a URI constraint is a host name, so
``alpha.example`` permits exactly ``spiffe://alpha.example/...``), and no DNS
name, IP address or e-mail address at all, so a compromised node cannot mint a
certificate that a TLS client would accept for a web host (see
:func:`domain_name_constraints`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.hazmat.primitives.serialization import Encoding, load_der_public_key
from cryptography.x509.oid import NameOID

from qhx_edge.core.errors import Malformed
from qhx_edge.core.suites import ES256, MLDSA65, PrivateKey


def private_key_object(key: PrivateKey) -> ec.EllipticCurvePrivateKey | mldsa.MLDSA65PrivateKey:
    """The ``cryptography`` private key for a one-algorithm CA key."""
    ((alg, raw),) = key.parts
    if alg == ES256:
        return ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
    if alg == MLDSA65:
        return mldsa.MLDSA65PrivateKey.from_seed_bytes(raw)
    raise ValueError(f"no CA support for algorithm {alg}")


# A reserved host (RFC 6761 §6.4): no real mailbox is in it.
_NO_MAILBOX = "invalid"


def domain_name_constraints(domain: str) -> x509.NameConstraints:
    """The name constraints of every CA of ``domain`` (RFC 5280 §4.2.1.10).

    * permitted: URIs whose host is the trust domain (the SPIFFE IDs);
    * excluded: every DNS name (the empty dNSName constraint matches all of
      them) and every IPv4 and IPv6 address (``0.0.0.0/0``, ``::/0``);
    * e-mail: RFC 5280 has no "every mailbox" constraint, but a permitted
      subtree of a name type forbids every name of that type outside it, so
      the only permitted mailboxes are those on the reserved host ``invalid``.

    Validators check subject common names that look like host names against
    the DNS constraints too, so a node CA cannot issue a web server
    certificate by either route.
    """
    return x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier(domain), x509.RFC822Name(_NO_MAILBOX)],
        excluded_subtrees=[
            x509.DNSName(""),
            x509.IPAddress(ipaddress.IPv4Network("0.0.0.0/0")),
            x509.IPAddress(ipaddress.IPv6Network("::/0")),
        ],
    )


def _ca_extensions(builder: x509.CertificateBuilder, domain: str, *, path_length: int) -> x509.CertificateBuilder:
    """What every CA of a trust domain carries: ``cA`` with ``path_length``, keyCertSign and
    cRLSign, the domain's SPIFFE ID, and the domain's name constraints (:func:`domain_name_constraints`)."""
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{domain}")]), critical=False
        )
        .add_extension(domain_name_constraints(domain), critical=True)
    )


@dataclass(frozen=True)
class CaCert:
    alg: int
    der: bytes


def make_ca(domain: str, key: PrivateKey, generation: int, not_before: int, lifetime: int) -> CaCert:
    ((alg, _),) = key.parts
    priv = private_key_object(key)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, domain),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"qhx-edge {domain} CA g{generation} {'ES256' if alg == ES256 else 'ML-DSA-65'}"
            ),
        ]
    )
    start = dt.datetime.fromtimestamp(not_before, dt.UTC)
    builder = _ca_extensions(
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(priv.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(seconds=lifetime)),
        domain,
        path_length=1,
    ).add_extension(x509.SubjectKeyIdentifier.from_public_key(priv.public_key()), critical=False)
    # ML-DSA signs the certificate itself; it takes no separate digest.
    cert = builder.sign(priv, hashes.SHA256() if alg == ES256 else None)
    return CaCert(alg, cert.public_bytes(Encoding.DER))


def load_spki(spki_der: bytes) -> ec.EllipticCurvePublicKey | mldsa.MLDSA65PublicKey:
    """A node's CA public key from SubjectPublicKeyInfo DER (ECDSA P-256 or ML-DSA-65 only)."""
    try:
        key = load_der_public_key(spki_der)
    except (ValueError, TypeError) as exc:
        raise Malformed(f"not a public key: {exc}") from exc
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    if isinstance(key, mldsa.MLDSA65PublicKey):
        return key
    raise Malformed("a node CA key must be ECDSA P-256 or ML-DSA-65")


def make_intermediate(
    domain: str,
    issuer_key: PrivateKey,
    issuer_cert_der: bytes,
    subject_spki: bytes,
    node_id: str,
    not_before: int,
    lifetime: int,
) -> CaCert:
    """A node's delegated intermediate CA: ``cA`` true, path length 0, name-constrained
    to the trust domain (SPIFFE X509-SVID §3), issued by the domain CA of the same algorithm."""
    ((alg, _),) = issuer_key.parts
    issuer = x509.load_der_x509_certificate(issuer_cert_der)
    subject_key = load_spki(subject_spki)
    if (alg == ES256) != isinstance(subject_key, ec.EllipticCurvePublicKey):
        raise Malformed("a node CA key must use the algorithm of the domain CA that certifies it")
    start = dt.datetime.fromtimestamp(not_before, dt.UTC)
    end = min(start + dt.timedelta(seconds=lifetime), issuer.not_valid_after_utc)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, domain),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"qhx-edge {domain} node {node_id} {'ES256' if alg == ES256 else 'ML-DSA-65'}"
            ),
        ]
    )
    builder = _ca_extensions(
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end),
        domain,
        path_length=0,
    )
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        ),
        critical=False,
    )
    priv = private_key_object(issuer_key)
    cert = builder.sign(priv, hashes.SHA256() if alg == ES256 else None)
    return CaCert(alg, cert.public_bytes(Encoding.DER))
