"""Fetching a partner's SPIFFE bundle from its bundle endpoint: ``federation fetch`` on a node
(docs/architecture.md, "Fetching a partner's bundle endpoint"; SPIFFE Federation §4, §5).

A partner that runs SPIRE publishes its bundle on a SPIFFE bundle endpoint, not as signed documents.
A node that holds an agreement allowing SPIFFE-format bundles fetches it over TLS and passes the bytes
to :meth:`qhx_edge.homes.node.Node.import_spiffe_bundle`, so a fetched bundle obeys exactly the rules
of an imported file, and then some; unlike SPIRE's bundle client:

* a fetched bundle enters only with a higher ``spiffe_sequence`` than the held one: an older one, or
  the same sequence with other content, is ``rollback`` (SPIRE takes whatever it fetches next);
* fetched bundles are rows of the node's store, kept across restarts (SPIRE keeps none in its agent);
* their age counts against our side's staleness budget in the agreement: the held bundle's freshness
  time is its import, or the last fetch that returned it unchanged over an authenticated channel
  (``confirmed``), so a partner whose endpoint is out of reach goes ``stale`` once the budget runs out;
* no fetch at all without a live agreement that allows SPIFFE bundles (checked before connecting).

``https_spiffe`` authenticates the endpoint with the partner bundle the node already holds (the signed
bundle, else the last SPIFFE bundle taken: the first one comes from ``bundle import-spiffe``, as
SPIRE's ``bundle set`` bootstraps it), and the endpoint's SPIFFE ID must be in the partner's trust
domain; ``https_web`` with the operator's CA certificates and the URL's host.

:func:`poll` fetches at the bundle's refresh hint while the link exists, and retries a failed
fetch sooner (5 s, doubling up to the refresh hint); every attempt is reported.  What an endpoint
served is audited, taken or refused; a link that is down (``unreachable``) and a fetch refused
before connecting are reported, not audited.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qhx_edge.core import agreements
from qhx_edge.core.errors import (
    Malformed,
    NotInitialised,
    QhxError,
    ScopeViolation,
    StoreLocked,
    UnknownDomain,
    Unreachable,
)
from qhx_edge.core.spiffe import check_trust_domain, parse_spiffe_id
from qhx_edge.links import bundle_endpoint
from qhx_edge.store import clock
from qhx_edge.store.trust_store import AuditEntry

MAX_CA_PEM = 256 * 1024
DEFAULT_INTERVAL = 300  # seconds, for a bundle without a refresh hint
MIN_INTERVAL = 5  # an operator's --interval
MIN_HINT_INTERVAL = 60  # a partner's refresh hint: the partner does not set how often our store is written
MAX_INTERVAL = 86400
FIRST_RETRY = 5


def _check_ca_pem(ca_pem: bytes) -> bytes:
    """The CA certificates of ``ca_pem`` written again as PEM: only certificates are kept (a private key
    or anything else in the file never reaches the store)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    if len(ca_pem) > MAX_CA_PEM:
        raise Malformed(f"the https_web CA certificates are over {MAX_CA_PEM} bytes")
    try:
        certs = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        raise Malformed(f"the https_web CA certificates are not PEM certificates: {exc}") from exc
    if not certs:
        raise Malformed("no CA certificate given for https_web")
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def _check_gate(n: Any, domain: str, now: int) -> None:
    """A partner the node holds, under a live agreement whose terms allow SPIFFE bundles, or a typed refusal."""
    if not n._trusts(domain):
        raise UnknownDomain(f"{domain} is not a partner this node holds (no pinned root)")
    held = n.store.agreement(domain)
    agreement = held.payload if held is not None else None
    agreements.check_spiffe_bundle_allowed(n.domain, domain, agreement, n._epoch(), now, n._limits())


def configure(
    home: Path,
    domain: str,
    url: str,
    profile: str,
    *,
    endpoint_id: str | None = None,
    ca_pem: bytes | None = None,
    now: int | None = None,
) -> dict[str, Any]:
    """Record where ``domain``'s bundle endpoint is and how it is authenticated (audited)."""
    from qhx_edge.homes.node import Node

    check_trust_domain(domain)
    bundle_endpoint.check_url(url)
    if profile == bundle_endpoint.HTTPS_SPIFFE:
        if endpoint_id is None or ca_pem is not None:
            raise Malformed("https_spiffe takes the endpoint's SPIFFE ID (--endpoint-id) and no CA certificates")
        endpoint_domain, _ = parse_spiffe_id(endpoint_id)
        if endpoint_domain != domain:
            raise ScopeViolation(
                f"the endpoint SPIFFE ID {endpoint_id} is not in {domain}: a partner's endpoint is "
                "authenticated by the partner's own bundle"
            )
    elif profile == bundle_endpoint.HTTPS_WEB:
        if ca_pem is None or endpoint_id is not None:
            raise Malformed("https_web takes the CA certificates that vouch for the endpoint (--ca) and no SPIFFE ID")
        ca_pem = _check_ca_pem(ca_pem)
    else:
        raise Malformed(f"unknown bundle endpoint profile {profile!r} (https_web or https_spiffe)")
    t = clock.now() if now is None else now
    with Node(home) as n:
        if domain == n.domain:
            raise ScopeViolation(f"{domain} is this node's own domain: its trust comes only as signed documents")
        _check_gate(n, domain, t)  # nothing is recorded for a partner the node may not fetch from
        detail = f"bundle endpoint of {domain}: {url} ({profile}{', ' + endpoint_id if endpoint_id else ''})"
        n.store.set_bundle_endpoint(
            domain, url, profile, endpoint_id, ca_pem, t, [AuditEntry("configure", detail, None, domain)]
        )
        ep = n.store.bundle_endpoint(domain)
    assert ep is not None
    return _public(ep)


def _public(ep: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ep.items() if k != "ca_pem"} | {"ca_certificates": ep["ca_pem"] is not None}


def endpoint(home: Path, domain: str) -> dict[str, Any] | None:
    """The recorded bundle endpoint of ``domain``, if any (without the CA certificates' bytes)."""
    from qhx_edge.homes.node import Node

    with Node(home) as n:
        ep = n.store.bundle_endpoint(domain)
    return None if ep is None else _public(ep)


def _prepare(n: Any, domain: str, now: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The endpoint and the fetch options, after the gate: a live agreement allowing SPIFFE bundles."""
    from qhx_edge.core.documents import Bundle

    ep = n.store.bundle_endpoint(domain)
    if ep is None:
        raise NotInitialised(f"no bundle endpoint recorded for {domain}: give --url and --profile once")
    _check_gate(n, domain, now)
    options: dict[str, Any] = {}
    if ep["profile"] == bundle_endpoint.HTTPS_WEB:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        pems = x509.load_pem_x509_certificates(ep["ca_pem"])
        options["ca_certs"] = [c.public_bytes(Encoding.DER) for c in pems]
    else:
        from qhx_edge.core import spiffe_bundle

        signed = n.store.current(domain, "bundle")
        if signed is not None and isinstance(signed.payload, Bundle):
            authorities = signed.payload.x509_authorities
        else:
            sb = n.store.spiffe_bundle(domain)
            if sb is None:
                raise NotInitialised(
                    f"this node holds no bundle of {domain} to authenticate its endpoint: bootstrap with "
                    f"'bundle import-spiffe FILE --domain {domain}' (the partner's bundle, obtained out of band)"
                )
            authorities = sb.bundle.x509_authorities
        options["endpoint_bundle"] = spiffe_bundle.SpiffeBundle(tuple(authorities), (), None, None)
        options["endpoint_id"] = ep["endpoint_id"]
    return ep, options


class _BasisChanged(Exception):
    """What authenticated the endpoint (its record, the partner bundle, the CA certificates) changed while
    the fetch was under way: what it served is not taken on the old basis."""


FETCH_ATTEMPTS = 3


def fetch_once(
    home: Path,
    domain: str,
    *,
    now: Callable[[], int] = clock.now,
    fetch: Callable[..., bundle_endpoint.Fetched] = bundle_endpoint.fetch,
) -> dict[str, Any]:
    """Fetch ``domain``'s bundle from its recorded endpoint and take it (``new``, ``confirmed``), or a
    typed error: ``unreachable`` (exit 3) for a link that is down, a rejection for what it served.

    The bundle is taken only if what authenticated the endpoint is still what the store holds, checked
    in the import's own snapshot (its write is refused if the trust state moves after that check); if it
    changed during the fetch (a partner bundle replaced, the endpoint reconfigured), the fetch is made
    again on the new basis, up to three times."""
    from qhx_edge.homes.node import Node

    for _attempt in range(FETCH_ATTEMPTS):
        with Node(home) as n:
            basis = _prepare(n, domain, now())
        ep, options = basis
        try:
            fetched = fetch(ep["url"], ep["profile"], now=now, **options)
        except QhxError as exc:
            if not isinstance(exc, Unreachable):
                with Node(home) as n:  # what the endpoint did is recorded; the trust state does not move
                    entry = AuditEntry(
                        "reject", f"fetch of {domain}'s bundle from {ep['url']}: {exc.message}", exc.kind, domain,
                        "spiffe-bundle",
                    )  # fmt: skip
                    n.store.audit(now(), [entry])
            raise
        with Node(home) as n:

            def still(n: Any = n, basis: tuple[dict[str, Any], dict[str, Any]] = basis) -> None:
                if _prepare(n, domain, now()) != basis:
                    raise _BasisChanged

            try:
                out = n.import_spiffe_bundle(fetched.data, domain, now(), source=ep["url"], fetched=True, still=still)
            except _BasisChanged:
                continue
        return {
            **out,
            "url": ep["url"],
            "profile": ep["profile"],
            "tls_group": fetched.group,
            "refresh_hint": fetched.bundle.refresh_hint,
        }
    raise StoreLocked(
        f"what authenticates {domain}'s endpoint kept changing during the fetch ({FETCH_ATTEMPTS} attempts)"
    )


def next_interval(refresh_hint: int | None, interval: int | None) -> int:
    """Seconds until the next fetch: ``interval`` if given (at least 5 s), else the bundle's refresh hint
    (at least 60 s: every fetch writes a confirmation and an audit entry, and the hint is the partner's
    word), at most a day."""
    if interval is not None:
        return max(MIN_INTERVAL, min(MAX_INTERVAL, interval))
    return max(MIN_HINT_INTERVAL, min(MAX_INTERVAL, refresh_hint or DEFAULT_INTERVAL))


def poll(
    home: Path,
    domain: str,
    report: Callable[[dict[str, Any]], None],
    stop: threading.Event,
    *,
    interval: int | None = None,
    now: Callable[[], int] = clock.now,
    fetch: Callable[..., bundle_endpoint.Fetched] = bundle_endpoint.fetch,
) -> None:
    """Fetch, report each attempt (a result, or ``{"error": {...}}``), wait, until ``stop`` is set."""
    retry = FIRST_RETRY
    hint: int | None = None
    while not stop.is_set():
        try:
            out = fetch_once(home, domain, now=now, fetch=fetch)
        except Exception as exc:
            error = exc.to_json() if isinstance(exc, QhxError) else {"kind": "internal", "message": repr(exc)}
            wait = min(retry, next_interval(hint, interval))
            retry = min(retry * 2, MAX_INTERVAL)
            report({"domain": domain, "error": error, "retry_in": wait})
        else:
            hint = out["refresh_hint"]
            wait = next_interval(hint, interval)
            retry = FIRST_RETRY
            report({**out, "next_in": wait})
        stop.wait(wait)
