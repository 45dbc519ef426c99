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

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qhx_edge.core import spiffe_bundle
from qhx_edge.core.documents import Bundle, Signed, parse
from qhx_edge.core.errors import NoAgreement, PolicyDenied, Stale, UnknownDomain
from qhx_edge.homes.layout import is_authority

if TYPE_CHECKING:
    from qhx_edge.issue.issuer import Issuer
    from qhx_edge.links.tls import Credential


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
            if doc is not None and name != n.domain:
                _check_partner_connected(n, name)
        finally:
            n.close()
    if doc is None or not isinstance(doc.payload, Bundle):
        raise UnknownDomain(f"this home holds no bundle for {name}")
    return name, doc.payload


def _check_partner_connected(n: Any, partner: str) -> None:
    """A partner's bundle leaves a node only while the node trusts it: ``connected`` under the agreement."""
    from qhx_edge.store import clock

    mode = n.status(clock.now()).get("domains", {}).get(partner, {}).get("mode")
    if mode == "connected":
        return
    if mode in (None, "no-agreement"):
        raise NoAgreement(f"no live agreement with {partner}: its bundle is not exported")
    raise Stale(f"{partner} is {mode} on this node: its bundle is not exported")


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


# --- the bundle endpoint's sources (qhx_edge/links/bundle_endpoint.py) -------------------------------

ENDPOINT_SELECTOR = "qhx-edge:bundle-endpoint"
"""The selector of the registration that gives the bundle endpoint its X509-SVID (``https_spiffe``).

No workload presents it (workloads are attested by ``unix:`` selectors), so only the node's own
endpoint gets that identity, and the authority decides which SPIFFE ID it is, its algorithm and
its TTL in the policy, as for any workload (docs/architecture.md, "Bundle endpoint")."""


class LiveBundle:
    """The home domain's SPIFFE bundle as the bundle endpoint serves it: written again only when the
    held bundle document changed (its high-water mark), read from the store at every call."""

    def __init__(self, home: Path, *, classical: bool) -> None:
        self.home = home
        self.classical = classical
        self._lock = threading.Lock()
        self._held: tuple[Any, bytes] | None = None

    def __call__(self) -> bytes:
        from qhx_edge.store.trust_store import Store

        with self._lock:
            store = Store.open(self.home)
            try:
                domain = store.node_info()["home_domain"]
                mark = store.marks(domain).get("bundle")
                if mark is None:
                    raise UnknownDomain(f"this node holds no bundle for {domain}")
                if self._held is not None and self._held[0] == mark:
                    return self._held[1]
                doc = store.current(domain, "bundle")
            finally:
                store.close()
            assert doc is not None
            assert isinstance(doc.payload, Bundle)
            data, _ = spiffe_bundle.to_json(spiffe_bundle.from_document(doc.payload), classical=self.classical)
            self._held = (mark, data)
            return data


class EndpointSvid:
    """The bundle endpoint's X509-SVID from the node's issuer (registration :data:`ENDPOINT_SELECTOR`):
    cached by the issuer and minted again at half its lifetime, audited like every SVID."""

    def __init__(
        self,
        home: Path,
        get_passphrase: Callable[[], bytes],
        spiffe_id: str | None = None,
        *,
        selector: str = ENDPOINT_SELECTOR,
        role: str = "the bundle endpoint",
    ) -> None:
        self.home = home
        self.spiffe_id = spiffe_id
        self.selector, self.role = selector, role
        self._get_passphrase = get_passphrase
        self._lock = threading.Lock()
        self._issuer: Issuer | None = None

    def __call__(self) -> Credential:
        from qhx_edge.issue.issuer import Issuer
        from qhx_edge.links.tls import Credential

        with self._lock:
            if self._issuer is None:
                self._issuer = Issuer(self.home, self._get_passphrase)
            issuer = self._issuer
        which = self.spiffe_id or "one SPIFFE ID"
        try:
            issued = issuer.x509_svids(frozenset({self.selector}))
        except PolicyDenied as exc:
            raise PolicyDenied(
                f"{self.role} has no identity: the policy must register {which} for the selector "
                f"{self.selector} ({exc.message})"
            ) from exc
        svids = [s for s in issued if self.spiffe_id is None or s.spiffe_id == self.spiffe_id]
        if len(svids) != 1:
            raise PolicyDenied(
                f"the policy must register {which} for the selector {self.selector} ({self.role}'s "
                f"identity); it registers {len(svids)} matching ones"
            )
        return Credential.from_der(svids[0].cert_chain, svids[0].private_key)

    def close(self) -> None:
        with self._lock:
            if self._issuer is not None:
                self._issuer.close()
                self._issuer = None
