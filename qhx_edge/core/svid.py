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

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import SignatureAlgorithmOID

from qhx_edge.core.errors import BadSignature, Expired, Malformed, NotYetValid, Revoked, ScopeViolation
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


class _Unreadable:
    """An extension that could not be read: raised as ``malformed`` only when a check needs it."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | _Unreadable | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        # A repeated extension, an unknown name type, bytes that are no name: not an SVID we can read.
        return _Unreadable(f"the certificate's extensions cannot be read: {exc}")


def _readable(value: Any) -> Any:
    if isinstance(value, _Unreadable):
        raise Malformed(value.message)
    return value


class _Cert:
    """One parsed certificate and what the checks read of it, computed once per distinct DER
    (:func:`_read`): the parse is memoised, never a signature check."""

    __slots__ = (
        "_bc",
        "_framed",
        "_hosts",
        "_key",
        "_ku",
        "_nc",
        "_san",
        "_spki",
        "_uris",
        "cert",
        "der",
        "issuer",
        "not_after",
        "not_before",
        "signature",
        "signature_oid",
        "subject",
        "tbs",
    )  # fmt: skip

    def __init__(self, der: bytes) -> None:
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise Malformed(f"not an X.509 certificate: {exc}") from exc
        self.cert, self.der = cert, der
        self.tbs = cert.tbs_certificate_bytes
        # The names exactly as encoded, to choose candidate issuers (verify_directly_issued_by compares
        # the same structures); None if they cannot be found, and then only that function decides.
        self.issuer, self.subject = _raw_names(self.tbs)
        self.not_before = int(cert.not_valid_before_utc.timestamp())
        self.not_after = int(cert.not_valid_after_utc.timestamp())
        self._san = _ext(cert, x509.SubjectAlternativeName)
        self._bc = _ext(cert, x509.BasicConstraints)
        self._ku = _ext(cert, x509.KeyUsage)
        self._nc = _ext(cert, x509.NameConstraints)
        self.signature = cert.signature
        self.signature_oid = cert.signature_algorithm_oid
        self._key: Any = None
        self._spki: bytes | None = None
        self._framed = False  # set once verify_directly_issued_by accepted its structure (_signed_by)
        self._uris: tuple[str, ...] | None = None
        self._hosts: tuple[frozenset[str] | None] | None = None

    def public_key(self) -> Any:
        """The certificate's public key, loaded once (an EC point's validation costs as much as a check)."""
        if self._key is None:
            try:
                self._key = self.cert.public_key()
            except (ValueError, UnsupportedAlgorithm):
                self._key = False  # checked by verify_directly_issued_by, which says no
        return self._key

    def uris(self) -> tuple[str, ...]:
        if self._uris is None:
            san = _readable(self._san)
            self._uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier)) if san is not None else ()
        return self._uris

    def basic_constraints(self) -> x509.BasicConstraints | None:
        bc: x509.BasicConstraints | None = _readable(self._bc)
        return bc

    def key_usage(self) -> x509.KeyUsage | None:
        ku: x509.KeyUsage | None = _readable(self._ku)
        return ku

    def permitted_hosts(self) -> frozenset[str] | None:
        """The URI hosts of the permitted subtrees, or None when the CA carries no such constraint."""
        if self._hosts is None:
            nc = _readable(self._nc)
            if not isinstance(nc, x509.NameConstraints) or nc.permitted_subtrees is None:
                self._hosts = (None,)
            else:
                uris = (g.value for g in nc.permitted_subtrees if isinstance(g, x509.UniformResourceIdentifier))
                self._hosts = (frozenset(uris),)
        return self._hosts[0]

    def valid_at(self, now: int, *what: str) -> None:
        """``expired`` or ``not-yet-valid`` unless ``now`` lies in the validity (``what`` names it, lazily)."""
        if self.not_before <= now < self.not_after:
            return
        if now < self.not_before:
            when = self.cert.not_valid_before_utc
            raise NotYetValid(f"{' '.join(what)} is not valid before {when:%Y-%m-%d %H:%M:%SZ}")
        raise Expired(f"{' '.join(what)} expired at {self.cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}")


def _tlv(data: bytes, at: int) -> tuple[int, int]:
    """(start of the contents, end) of the DER element at ``at``."""
    length, start = data[at + 1], at + 2
    if length & 0x80:
        size = length & 0x7F
        length, start = int.from_bytes(data[start : start + size], "big"), start + size
    return start, start + length


def _raw_names(tbs: bytes) -> tuple[bytes | None, bytes | None]:
    """The issuer and subject Name elements of a TBSCertificate (RFC 5280 §4.1) as encoded, read
    without decoding them (cryptography refuses or warns about some legal names, e.g. a T61String
    or a long CN).  The bytes already passed cryptography's strict DER parser."""
    try:
        at, end = _tlv(tbs, 0)
        fields: list[bytes] = []
        while at < end and len(fields) < 6:
            start = at
            at = _tlv(tbs, at)[1]
            fields.append(tbs[start:at])
        if fields and fields[0][0] == 0xA0:  # [0] version
            fields = fields[1:]
        # serialNumber, signature, issuer, validity, subject
        return fields[2], fields[4]
    except IndexError:
        return None, None


# Parsed certificates by their DER bytes, bounded in count and in size: a peer presenting ever new
# certificates only churns it, and one over MAX_CACHED_DER (an SVID is ~1 KiB, ML-DSA-87 ~8 KiB) is
# parsed every time instead (at most ~512 x 16 KiB of DER held, with what parsing adds).
MAX_CACHED_DER = 16 * 1024
_read_cached = functools.lru_cache(maxsize=512)(_Cert)


def _read(der: bytes) -> _Cert:
    try:
        return _read_cached(der) if len(der) <= MAX_CACHED_DER else _Cert(der)
    except ValueError as exc:  # a field cryptography parsed but will not hand over
        raise Malformed(f"the certificate cannot be read: {exc}") from exc


@functools.lru_cache(maxsize=32)
def _anchors(authorities: tuple[bytes, ...]) -> dict[bytes | None, list[_Cert]]:
    """A bundle's X.509 authorities by subject (DER; None: a name cryptography does not decode),
    parsed once per distinct bundle."""
    out: dict[bytes | None, list[_Cert]] = {}
    for der in authorities:
        c = _read(der)
        out.setdefault(c.subject, []).append(c)
    return out


def _candidates(roots: dict[bytes | None, list[_Cert]], cert: _Cert) -> list[_Cert]:
    """The authorities that may have issued ``cert``: those of its issuer's name, and those whose name
    only verify_directly_issued_by can compare (all of them when ``cert``'s own issuer name is such)."""
    if cert.issuer is None:
        return [r for group in roots.values() for r in group]
    return [*roots.get(cert.issuer, ()), *roots.get(None, ())]


_ECDSA: dict[x509.ObjectIdentifier, ec.ECDSA] = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: ec.ECDSA(hashes.SHA256()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: ec.ECDSA(hashes.SHA384()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: ec.ECDSA(hashes.SHA512()),
}
_PLAIN: dict[x509.ObjectIdentifier, type] = {  # signature algorithms without parameters, by their key type
    SignatureAlgorithmOID.ED25519: ed25519.Ed25519PublicKey,
    SignatureAlgorithmOID.ML_DSA_44: mldsa.MLDSA44PublicKey,
    SignatureAlgorithmOID.ML_DSA_65: mldsa.MLDSA65PublicKey,
    SignatureAlgorithmOID.ML_DSA_87: mldsa.MLDSA87PublicKey,
}
_MLDSA_OIDS = frozenset(
    {SignatureAlgorithmOID.ML_DSA_44, SignatureAlgorithmOID.ML_DSA_65, SignatureAlgorithmOID.ML_DSA_87}
)
_MLDSA_KEYS = (mldsa.MLDSA44PublicKey, mldsa.MLDSA65PublicKey, mldsa.MLDSA87PublicKey)


def _signed_by(cert: _Cert, issuer: _Cert) -> bool:
    """Whether ``issuer`` names and signed ``cert``, as ``verify_directly_issued_by`` says.  The first
    time a certificate is checked that function itself decides (it also requires the signature
    algorithm inside the signed part to be the outer one); afterwards the same bytes' signature is
    checked again, every call, with the issuer's key loaded once for the common algorithms (anything
    else, RSA included, always goes to that function)."""
    if cert.issuer is not None and issuer.subject is not None and cert.issuer != issuer.subject:
        return False
    key, oid = issuer.public_key(), cert.signature_oid
    try:
        if not cert._framed or cert.issuer is None or issuer.subject is None:
            cert.cert.verify_directly_issued_by(issuer.cert)
            cert._framed = True
        elif oid in _ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs, _ECDSA[oid])
        elif oid in _PLAIN and isinstance(key, _PLAIN[oid]):
            plain: Any = key
            plain.verify(cert.signature, cert.tbs)
        else:
            cert.cert.verify_directly_issued_by(issuer.cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _check_ca(cert: _Cert, below: int, what: Callable[[], str], domain: str) -> None:
    bc = cert.basic_constraints()
    if bc is None or not bc.ca:
        raise BadSignature(f"{what()} is not a CA")
    if bc.path_length is not None and below > bc.path_length:
        raise BadSignature(f"{what()} allows {bc.path_length} intermediate CAs below it, the chain has {below}")
    hosts = cert.permitted_hosts()
    if hosts is not None and domain not in hosts:
        raise ScopeViolation(f"{what()} may not vouch for identities of {domain} (name constraints)")


def _shown(cert: _Cert) -> str:
    try:
        return cert.cert.subject.rfc4514_string()
    except ValueError:
        return "(a subject name that does not decode)"


def _one_uri(leaf: _Cert) -> str:
    uris = leaf.uris()
    if len(uris) != 1:
        raise Malformed("an X509-SVID carries exactly one URI SAN (X509-SVID §2)")
    return str(uris[0])


def not_after(der: bytes) -> int:
    """When a certificate expires (seconds since the epoch), read from its DER."""
    return _read(der).not_after


def leaf_spiffe_id(der: bytes) -> str:
    """The SPIFFE ID an X.509-SVID claims (its one URI SAN), unverified: to choose the bundle to verify it with."""
    spiffe_id = _one_uri(_read(der))
    parse_spiffe_id(spiffe_id)
    return spiffe_id


def spki_digest(cert: _Cert) -> bytes | None:
    """SHA-256 of the certificate's SubjectPublicKeyInfo (DER): how a ``revocation`` names a key."""
    if cert._spki is None:
        key = cert.public_key()
        if not key:
            return None
        cert._spki = hashlib.sha256(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest()
    return cert._spki


def split_der(data: bytes, *, limit: int = MAX_CHAIN) -> list[bytes]:
    """Concatenated DER certificates (the Workload API's ``x509_svid`` and ``bundle`` fields) as a list:
    each a SEQUENCE with a definite length (X.690 §8.1.3); ``malformed`` otherwise or past ``limit``."""
    out: list[bytes] = []
    i = 0
    while i < len(data):
        if len(out) >= limit:
            raise Malformed(f"more than {limit} certificates")
        if data[i] != 0x30 or i + 2 > len(data):
            raise Malformed("not a DER certificate (a SEQUENCE)")
        first = data[i + 1]
        if first < 0x80:
            length, head = first, 2
        else:
            count = first & 0x7F
            if not 1 <= count <= 4 or i + 2 + count > len(data):
                raise Malformed("a DER length this reader does not take")
            length, head = int.from_bytes(data[i + 2 : i + 2 + count], "big"), 2 + count
        end = i + head + length
        if end > len(data):
            raise Malformed("a DER certificate runs past the end of its field")
        out.append(bytes(data[i:end]))
        i = end
    return out


def post_quantum(chain: Sequence[bytes]) -> bool:
    """Whether every signature that vouches for this chain is ML-DSA: the leaf's key (it signs the TLS
    handshake) and the signature on every certificate (X509-SVID chains under a policy that names ML-DSA)."""
    for i, der in enumerate(chain):
        cert = _read(der)
        if cert.signature_oid not in _MLDSA_OIDS:
            return False
        if i == 0 and not isinstance(cert.public_key(), _MLDSA_KEYS):
            return False
    return bool(chain)


def verify_x509_svid(
    chain: Sequence[bytes], authorities: Sequence[bytes], now: int, revoked: Mapping[bytes, int] | None = None
) -> str:
    """The SPIFFE ID of a verified X.509-SVID ``chain`` (DER, leaf first) under ``authorities`` (DER).

    ``revoked``: the domain's revocation list (key digest -> from when): a chain through a CA whose
    key is revoked at ``now`` is ``revoked``, however well it verifies.

    Every signature of the path is checked on every call; only the parsing of
    certificates already seen is reused (:func:`_read`, :func:`_anchors`)."""
    if not 1 <= len(chain) <= MAX_CHAIN:
        raise Malformed(f"a chain holds 1 to {MAX_CHAIN} certificates")
    certs = [_read(c) for c in chain]
    roots = _anchors(tuple(authorities))
    leaf = certs[0]
    spiffe_id = _one_uri(leaf)
    domain, _ = parse_spiffe_id(spiffe_id)
    bc = leaf.basic_constraints()
    if bc is not None and bc.ca:
        raise Malformed("an X509-SVID leaf must not be a CA (X509-SVID §4.1)")
    ku = leaf.key_usage()
    if ku is None or not ku.digital_signature or ku.key_cert_sign or ku.crl_sign:
        raise Malformed("an X509-SVID leaf needs key usage digitalSignature and no keyCertSign or cRLSign (§4.3)")
    leaf.valid_at(now, "SVID", spiffe_id)
    for i in range(1, len(certs)):
        if not _signed_by(certs[i - 1], certs[i]):
            raise BadSignature(f"certificate {i - 1} of the chain is not signed by certificate {i}")
        _check_ca(certs[i], i - 1, functools.partial("intermediate {} of {}".format, i, spiffe_id), domain)
        certs[i].valid_at(now, f"intermediate {i} of", spiffe_id)
    if revoked:
        for i, cert in enumerate(certs[1:], 1):
            since = revoked.get(spki_digest(cert) or b"")
            if since is not None and now >= since:
                raise Revoked(f"intermediate {i} of {spiffe_id} is a CA key its domain revoked at {since}")
    top = certs[-1]
    anchor = next((r for r in _candidates(roots, top) if _signed_by(top, r)), None)
    if anchor is None:
        raise BadSignature(f"the chain of {spiffe_id} does not lead to an X.509 authority of the bundle of {domain}")
    _check_ca(anchor, len(certs) - 1, lambda: f"the bundle's authority {_shown(anchor)}", domain)
    anchor.valid_at(now, "the bundle's authority")
    return spiffe_id
