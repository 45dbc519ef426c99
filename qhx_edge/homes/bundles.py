"""SPIFFE bundles out of a home: our bundle document in SPIRE's bundle format (docs/architecture.md,
"SPIFFE bundles"; SPIFFE Trust Domain and Bundle §4).

An authority exports its own domain's current bundle; a node exports the bundle
it holds for its own domain or for a partner domain.  The bundle *document* is
what we trust (signed, versioned); the SPIFFE bundle written from it is an
unsigned view of it for SPIFFE software, with ``spiffe_sequence`` = the
document's version, so a consumer that orders by sequence (as ours does) never
takes an older one for a newer one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qhx_edge.core import spiffe_bundle
from qhx_edge.core.documents import Bundle, Signed, parse
from qhx_edge.core.errors import UnknownDomain
from qhx_edge.homes.layout import is_authority


def _held_bundle(home: Path, domain: str | None) -> tuple[str, Bundle]:
    if is_authority(home):
        from qhx_edge.homes.authority import Authority

        def no_passphrase() -> bytes:  # reading published documents needs no private key
            raise AssertionError("bundle export asked for a passphrase")

        auth = Authority.open(home, no_passphrase)
        if domain not in (None, auth.domain):
            raise UnknownDomain(f"an authority home exports only its own domain's bundle ({auth.domain}), not {domain}")
        doc: Signed[Any] | None = parse(auth.current("bundle"))
        name = auth.domain
    else:
        from qhx_edge.homes.node import Node

        n = Node(home)
        try:
            name = domain or n.domain
            doc = n.store.current(name, "bundle")
        finally:
            n.close()
    if doc is None or not isinstance(doc.payload, Bundle):
        raise UnknownDomain(f"this home holds no bundle for {name}")
    return name, doc.payload


def export_spiffe(home: Path, domain: str | None, *, classical: bool) -> tuple[bytes, dict[str, Any]]:
    """The SPIFFE bundle (JWK Set bytes) of ``domain`` (default: the home's own), and what to report."""
    name, bundle = _held_bundle(home, domain)
    data, left_out = spiffe_bundle.to_json(spiffe_bundle.from_document(bundle), classical=classical)
    return data, {
        "domain": name,
        "sequence": bundle.version,
        "refresh_hint": bundle.refresh_hint,
        "expires": bundle.expires,
        "x509_authorities": len(bundle.x509_authorities),
        "jwt_authorities": len(bundle.jwt_authorities),
        "left_out": left_out,
    }
