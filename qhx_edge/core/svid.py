"""X.509-SVID chain verification against a trust bundle (SPIFFE X509-SVID §4, §5; RFC 5280 §6).

What a relying party checks before it believes a peer's SPIFFE ID:

* the leaf (X509-SVID §4): exactly one URI SAN, a workload SPIFFE ID; not a
  CA; key usage digitalSignature and not keyCertSign / cRLSign; valid now;
* the path: each certificate signed by the next (the node's delegated
  intermediate below the domain CA), each issuer a CA whose path length
  allows what is below it and valid now, the last one issued by an X.509
  authority of the bundle (which is valid now too);
* name constraints (RFC 5280 §4.2.1.10) on every CA of the path, the bundle's
  authority included: a permitted URI subtree is a host, so the SPIFFE ID's
  trust domain must be one of them (X509-SVID §4.3 places the domain CA's
  constraint there).

Whether the ID's domain may be trusted at all (our own, or a partner under a
live agreement, in scope and fresh) is the caller's question
(:func:`qhx_edge.core.agreements.check_identity`).  Pure: the caller passes
``now``; ``cryptography`` checks the signatures (ECDSA P-256, ML-DSA-65).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding

from qhx_edge.core.errors import BadSignature, Expired, Malformed, NotYetValid, ScopeViolation
from qhx_edge.core.spiffe import parse_spiffe_id

MAX_CHAIN = 8
MAX_PEM = 256 * 1024


def load_chain(data: bytes) -> list[bytes]:
    """DER certificates from a PEM file (leaf first) or one DER certificate (``malformed`` otherwise)."""
    if len(data) > MAX_PEM:
        raise Malformed("certificate chain file too large")
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise Malformed(f"not an X.509 certificate chain: {exc}") from exc
    if not 1 <= len(certs) <= MAX_CHAIN:
        raise Malformed(f"a chain holds 1 to {MAX_CHAIN} certificates")
    return [c.public_bytes(Encoding.DER) for c in certs]


def _valid_now(cert: x509.Certificate, now: int, what: str) -> None:
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    if when < cert.not_valid_before_utc:
        raise NotYetValid(f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}")
    if when >= cert.not_valid_after_utc:
        raise Expired(f"{what} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}")


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        # A repeated extension, an unknown name type, bytes that are no name: not an SVID we can read.
        raise Malformed(f"the certificate's extensions cannot be read: {exc}") from None


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _check_ca(cert: x509.Certificate, below: int, what: str, domain: str) -> None:
    bc = _ext(cert, x509.BasicConstraints)
    if not isinstance(bc, x509.BasicConstraints) or not bc.ca:
        raise BadSignature(f"{what} is not a CA")
    if bc.path_length is not None and below > bc.path_length:
        raise BadSignature(f"{what} allows {bc.path_length} intermediate CAs below it, the chain has {below}")
    nc = _ext(cert, x509.NameConstraints)
    if isinstance(nc, x509.NameConstraints) and nc.permitted_subtrees is not None:
        hosts = [g.value for g in nc.permitted_subtrees if isinstance(g, x509.UniformResourceIdentifier)]
        if domain not in hosts:
            raise ScopeViolation(f"{what} may not vouch for identities of {domain} (name constraints)")


def leaf_spiffe_id(der: bytes) -> str:
    """The SPIFFE ID an X.509-SVID claims (its one URI SAN), unverified: to choose the bundle to verify it with."""
    try:
        leaf = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise Malformed(f"not an X.509 certificate: {exc}") from exc
    san = _ext(leaf, x509.SubjectAlternativeName)
    uris = (
        san.get_values_for_type(x509.UniformResourceIdentifier) if isinstance(san, x509.SubjectAlternativeName) else []
    )
    if len(uris) != 1:
        raise Malformed("an X509-SVID carries exactly one URI SAN (X509-SVID §2)")
    parse_spiffe_id(uris[0])
    return str(uris[0])


def verify_x509_svid(chain: Sequence[bytes], authorities: Sequence[bytes], now: int) -> str:
    """The SPIFFE ID of a verified X.509-SVID ``chain`` (DER, leaf first) under ``authorities`` (DER)."""
    try:
        certs = [x509.load_der_x509_certificate(c) for c in chain]
        roots = [x509.load_der_x509_certificate(c) for c in authorities]
    except ValueError as exc:
        raise Malformed(f"not an X.509 certificate: {exc}") from exc
    if not 1 <= len(certs) <= MAX_CHAIN:
        raise Malformed(f"a chain holds 1 to {MAX_CHAIN} certificates")
    leaf = certs[0]
    san = _ext(leaf, x509.SubjectAlternativeName)
    uris = (
        san.get_values_for_type(x509.UniformResourceIdentifier) if isinstance(san, x509.SubjectAlternativeName) else []
    )
    if len(uris) != 1:
        raise Malformed("an X509-SVID carries exactly one URI SAN (X509-SVID §2)")
    spiffe_id = uris[0]
    domain, _ = parse_spiffe_id(spiffe_id)
    bc = _ext(leaf, x509.BasicConstraints)
    if isinstance(bc, x509.BasicConstraints) and bc.ca:
        raise Malformed("an X509-SVID leaf must not be a CA (X509-SVID §4.1)")
    ku = _ext(leaf, x509.KeyUsage)
    if not isinstance(ku, x509.KeyUsage) or not ku.digital_signature or ku.key_cert_sign or ku.crl_sign:
        raise Malformed("an X509-SVID leaf needs key usage digitalSignature and no keyCertSign or cRLSign (§4.3)")
    _valid_now(leaf, now, f"SVID {spiffe_id}")
    for i in range(1, len(certs)):
        what = f"intermediate {i} of {spiffe_id}"
        if not _signed_by(certs[i - 1], certs[i]):
            raise BadSignature(f"certificate {i - 1} of the chain is not signed by certificate {i}")
        _check_ca(certs[i], i - 1, what, domain)
        _valid_now(certs[i], now, what)
    top = certs[-1]
    anchors = [r for r in roots if _signed_by(top, r)]
    if not anchors:
        raise BadSignature(f"the chain of {spiffe_id} does not lead to an X.509 authority of the bundle of {domain}")
    anchor = anchors[0]
    _check_ca(anchor, len(certs) - 1, f"the bundle's authority {anchor.subject.rfc4514_string()}", domain)
    _valid_now(anchor, now, "the bundle's authority")
    return spiffe_id
