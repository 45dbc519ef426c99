"""A node's delegation as the issuer and ``status`` read it: its intermediates and when it ends.

Pure (docs/architecture.md, "Layers"): certificates parsed from the
delegation's bytes, no store and no clock (the caller passes ``now``).  Kept
apart from :mod:`qhx_edge.issue.issuer` so that ``qhx-edge status`` reads a
delegation without importing the issuer (bench/startup.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from qhx_edge.core import suites
from qhx_edge.core.documents import Delegation
from qhx_edge.core.suites import ES256, MLDSA65


@dataclass(frozen=True)
class NodeCa:
    """One delegated intermediate of this node."""

    alg: int
    der: bytes
    cert: x509.Certificate
    spki: bytes
    not_before: int
    not_after: int
    aki: x509.AuthorityKeyIdentifier


def node_cas(delegation: Delegation) -> dict[int, NodeCa]:
    """The delegation's intermediates by algorithm (one it cannot read certifies nothing)."""
    out: dict[int, NodeCa] = {}
    for der in delegation.x509_cas:
        try:
            cert = x509.load_der_x509_certificate(der)
            pub = cert.public_key()
        except ValueError:
            continue
        if isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(pub.curve, ec.SECP256R1):
            alg = ES256
        elif isinstance(pub, mldsa.MLDSA65PublicKey):
            alg = MLDSA65
        else:
            continue
        try:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            ski = x509.SubjectKeyIdentifier.from_public_key(pub)
        out[alg] = NodeCa(
            alg,
            der,
            cert,
            pub.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
            int(cert.not_valid_before_utc.timestamp()),
            int(cert.not_valid_after_utc.timestamp()),
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
        )
    return out


def delegation_end(delegation: Delegation | None) -> int | None:
    """When the node stops being able to issue: the delegation's expiry or its earliest CA notAfter."""
    if delegation is None:
        return None
    ends = [delegation.expires, *(ca.not_after for ca in node_cas(delegation).values())]
    return min(ends)


def delegation_status(delegation: Delegation | None, now: int) -> dict[str, Any]:
    """What ``status`` shows about the node's delegation."""
    if delegation is None:
        return {"present": False}
    end = delegation_end(delegation)
    assert end is not None
    return {
        "present": True,
        "version": delegation.version,
        "issued_at": delegation.issued_at,
        "expires": end,
        "expired": now >= end,
        "remaining": max(0, end - now),
        "method": delegation.attestation.get("method"),
        "algorithms": [suites.name_of(a) for a in sorted(node_cas(delegation), reverse=True)],
        "jwt_kid": delegation.jwt_key.get("kid"),
    }


def revocable_keys(delegation: Delegation) -> list[tuple[str, bytes]]:
    """How a ``revocation`` names the keys of a delegation: (use, SHA-256 of its SubjectPublicKeyInfo)
    for each delegated CA (``x509-ca``) and for the JWT-SVID key (``jwt``)."""
    out = [
        ("x509-ca", hashlib.sha256(
            x509.load_der_x509_certificate(der).public_key().public_bytes(
                Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest())
        for der in delegation.x509_cas
    ]  # fmt: skip
    return [*out, ("jwt", hashlib.sha256(bytes(delegation.jwt_key["spki"])).digest())]
