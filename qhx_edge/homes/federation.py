"""Agreements on an authority home: propose, show, accept, publish, list, revoke
(docs/architecture.md "Agreements"; the rules are :mod:`qhx_edge.core.agreements`).

The exchange, over files only (a USB stick is enough):

1. ``propose`` (domain A): the partner's root arrives out of band and is
   checked against the fingerprint its operator gave (``--expect-fingerprint``);
   A signs the agreement with a threshold of its federation role and writes a
   pack holding A's root and the proposal.
2. ``show``: what a proposal or agreement grants, both ways, and who signed it.
3. ``accept`` (domain B): B checks A's root against the fingerprint A's operator
   gave, A's federation threshold, that the agreement is about B and pins one
   of B's roots; B adds its federation signatures to the same envelope
   (:func:`~qhx_edge.core.documents.countersign`) and writes a pack holding
   both roots and the doubly signed agreement.
4. ``publish`` (each side): both thresholds verified; the agreement joins the
   domain's documents (``published/agreement/PARTNER/N.cbor``) and a new
   freshness epoch names it (``Freshness.agreements``: partner -> version).
5. ``revoke --partner TD``: a ``terminated`` version signed by our federation
   role alone, and a freshness that no longer names the partner: our nodes stop
   trusting the partner with the pack that carries them.

Rotating our federation role (``rotate-root --rotate-role federation``) marks
every active agreement ``renew``: signed with the retired key, it is no longer
named by our epoch nor exported, until negotiated again.

Home layout added: ``federation/PARTNER/FINGERPRINT.cbor`` (the partner roots
agreements pin) and ``authority.json`` ``federation``: per partner the
published version, its status and the pinned root's fingerprint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qhx_edge.core import agreements as A  # noqa: N812 - the rules
from qhx_edge.core import documents as D  # noqa: N812
from qhx_edge.core import trust
from qhx_edge.core.errors import AnchorMismatch, DomainMismatch, Malformed, NoAgreement, Rejected, Rollback
from qhx_edge.core.spiffe import check_trust_domain
from qhx_edge.homes.authority import Authority
from qhx_edge.store.files import atomic_write

PROPOSED = "proposed"
ACTIVE = "active"
TERMINATED = "terminated"
RENEW = "renew"  # active, but signed by a federation key we have since rotated: negotiate it again


def _federation(auth: Authority) -> dict[str, dict[str, Any]]:
    fed: dict[str, dict[str, Any]] = auth.state.setdefault("federation", {})
    return fed


def _anchor_path(auth: Authority, partner: str, fp: str) -> Path:
    return auth.home / "federation" / partner / f"{fp}.cbor"


def _save_anchor(auth: Authority, partner: str, root: D.Signed[D.Root]) -> str:
    fp = A.fingerprint(root.raw)
    path = _anchor_path(auth, partner, fp)
    if not path.exists():
        atomic_write(path, root.raw)
    return fp


def _partner_root(auth: Authority, partner: str, fp: str, supplied: list[D.Signed[Any]]) -> D.Signed[D.Root] | None:
    for doc in supplied:
        if isinstance(doc.payload, D.Root) and doc.payload.domain == partner and A.fingerprint(doc.raw) == fp:
            return doc
    path = _anchor_path(auth, partner, fp)
    if path.exists():
        doc = D.parse(path.read_bytes())
        if isinstance(doc.payload, D.Root):
            return doc  # type: ignore[return-value]
    return None


def _own_roots(auth: Authority) -> dict[str, D.Signed[Any]]:
    out: dict[str, D.Signed[Any]] = {}
    for v in range(1, int(auth.state["versions"]["root"]) + 1):
        raw = auth.published("root", v)
        doc = D.parse(raw)
        assert isinstance(doc.payload, D.Root)
        out[A.fingerprint(raw)] = doc
    return out


def read_agreement(data: bytes) -> tuple[D.Signed[D.Agreement], list[D.Signed[Any]]]:
    """The agreement in ``data`` (a pack from propose or accept, or the document itself) and the roots beside it."""
    from qhx_edge.packs import pack

    docs = [data] if data[:1] == b"\xd8" else pack.parse(data).documents  # a COSE_Sign (tag 98): the document
    parsed = [D.parse(raw) for raw in docs]
    found = [d for d in parsed if isinstance(d.payload, D.Agreement)]
    if len(found) != 1:
        raise Malformed(f"expected exactly one agreement, found {len(found)}")
    return found[0], [d for d in parsed if isinstance(d.payload, D.Root)]  # type: ignore[return-value]


def terms(
    *, accept: tuple[str, ...], release: tuple[str, ...], max_staleness: int, allow_spiffe_bundles: bool, other: str
) -> D.Terms:
    """One side's terms, checked as a document would be (``malformed`` for a prefix of the wrong domain)."""
    return D.Terms.from_dict(
        "this side",
        other,
        {
            "accept": list(accept),
            "release": list(release),
            "max_staleness": max_staleness,
            "allow_spiffe_bundles": allow_spiffe_bundles,
        },
    )


def check_limits(auth: Authority, ours: D.Terms) -> None:
    """Our side's terms within what our own published policy allows any partner (``[federation]``):
    ``scope-violation`` for a budget above its ``max_partner_staleness``, or SPIFFE bundles it forbids."""
    from qhx_edge.core.errors import ScopeViolation

    policy = D.parse(auth.current("policy")).payload
    limits = policy.federation if isinstance(policy, D.Policy) else D.PartnerLimits()
    if limits.max_staleness is not None and ours.max_staleness > limits.max_staleness:
        raise ScopeViolation(
            f"a staleness budget of {ours.max_staleness} s for a partner is over what the policy of {auth.domain} "
            f"allows any partner ({limits.max_staleness} s, federation.max_partner_staleness)"
        )
    if ours.allow_spiffe_bundles and not limits.spiffe_bundles:
        raise ScopeViolation(f"the policy of {auth.domain} takes no partner trust from SPIFFE bundles")


def propose(
    auth: Authority,
    *,
    partner: str,
    partner_anchor: bytes,
    expect_fingerprint: str,
    ours: D.Terms,
    theirs: D.Terms,
    lifetime: int,
    now: int,
) -> tuple[bytes, D.Signed[D.Agreement]]:
    """Sign a proposal with our federation role; return the pack (our root + proposal) and the proposal."""
    check_trust_domain(partner)
    if partner == auth.domain:
        raise Malformed("an agreement is with another domain")
    fp = A.fingerprint(partner_anchor)
    if expect_fingerprint.lower() != fp:
        raise AnchorMismatch(f"partner anchor fingerprint {fp} does not match the expected {expect_fingerprint}")
    root = trust.verify_anchor(partner_anchor, now)
    if root.payload.domain != partner:
        raise DomainMismatch(f"the partner anchor is a root of {root.payload.domain}, not of {partner}")
    check_limits(auth, ours)
    with auth.locked():
        fed = _federation(auth)
        entry = fed.get(partner, {})
        version = max(int(entry.get("version", 0)), int(entry.get("proposed", 0))) + 1
        own_root = auth.current("root")
        payload = D.Agreement(
            domain=auth.domain,
            partner=partner,
            version=version,
            issued_at=now,
            expires=now + lifetime,
            status="active",
            roots={auth.domain: A.fingerprint(own_root), partner: fp},
            terms={auth.domain: ours, partner: theirs},
        )
        data = D.sign(payload, auth._signers("federation"))
        doc = D.parse(data)
        _save_anchor(auth, partner, root)
        fed[partner] = {**entry, "proposed": version, "anchor": entry.get("anchor", fp)}
        fed[partner].setdefault("status", PROPOSED)
        fed[partner].setdefault("version", 0)
        auth._save()
        out = auth.export_pack([own_root, data], now)
    return out, doc  # type: ignore[return-value]


def accept(auth: Authority, data: bytes, *, expect_fingerprint: str, now: int) -> tuple[bytes, D.Signed[D.Agreement]]:
    """Countersign a partner's proposal; return the pack (both roots + the agreement) and the agreement."""
    doc, roots = read_agreement(data)
    a = doc.payload
    if a.partner != auth.domain:
        raise DomainMismatch(f"this proposal is for {a.partner}, not for {auth.domain}")
    if a.status != "active":
        raise Malformed("only an active agreement can be accepted")
    proposer = a.domain
    if expect_fingerprint.lower() != a.roots[proposer]:
        raise AnchorMismatch(
            f"the proposal pins root {a.roots[proposer]} of {proposer}, not the expected {expect_fingerprint}"
        )
    proposer_root = _partner_root(auth, proposer, a.roots[proposer], roots)
    if proposer_root is None:
        raise AnchorMismatch(f"the root of {proposer} the proposal pins is not in it")
    trust.verify_anchor(proposer_root.raw, now)
    own = _own_roots(auth)
    if a.roots[auth.domain] not in own:
        raise AnchorMismatch(f"the proposal pins a root of {auth.domain} this authority never published")
    trust.check_role(doc, proposer_root.payload, "federation")
    A.check_times(doc, now, trust.DEFAULT_CLOCK_TOLERANCE)
    check_limits(auth, a.terms[auth.domain])
    with auth.locked():
        fed = _federation(auth)
        entry = fed.get(proposer, {})
        if a.version <= int(entry.get("version", 0)):
            raise Rollback(f"{doc.describe()} is not newer than the published agreement v{entry['version']}")
        signed = D.countersign(doc.raw, auth._signers("federation"))
        both = D.parse(signed)
        _save_anchor(auth, proposer, proposer_root)
        fed[proposer] = {
            **entry,
            "proposed": max(a.version, int(entry.get("proposed", 0))),
            "anchor": entry.get("anchor", a.roots[proposer]),
        }
        fed[proposer].setdefault("status", PROPOSED)
        fed[proposer].setdefault("version", 0)
        auth._save()
        out = auth.export_pack([own[a.roots[auth.domain]].raw, proposer_root.raw, signed], now)
    return out, both  # type: ignore[return-value]


def publish(auth: Authority, data: bytes, now: int) -> list[bytes]:
    """Add a doubly signed agreement to the domain's documents and a freshness epoch naming it."""
    doc, roots = read_agreement(data)
    a = doc.payload
    if auth.domain not in a.parties:
        raise DomainMismatch(f"{doc.describe()} is between {a.domain} and {a.partner}, not {auth.domain}")
    if a.status != "active":
        raise Malformed("publish takes an active agreement; use 'federation revoke' to end one")
    partner = a.other(auth.domain)
    with auth.locked():
        partner_root = _partner_root(auth, partner, a.roots[partner], roots)
        if partner_root is None:
            raise AnchorMismatch(f"the root of {partner} the agreement pins is neither in the file nor pinned here")
        A.check_pinned_root(a, partner, partner_root)
        own_root = D.parse(auth.current("root")).payload
        assert isinstance(own_root, D.Root)
        A.check_signatures(doc, own_root, partner_root.payload)
        A.check_times(doc, now, trust.DEFAULT_CLOCK_TOLERANCE)
        fed = _federation(auth)
        entry = fed.get(partner, {})
        if a.version <= int(entry.get("version", 0)):
            raise Rollback(f"{doc.describe()} is not newer than the published agreement v{entry['version']}")
        atomic_write(auth.home / "published" / "agreement" / partner / f"{a.version}.cbor", doc.raw)
        fp = _save_anchor(auth, partner, partner_root)
        fed[partner] = {
            "version": a.version,
            "proposed": max(a.version, int(entry.get("proposed", 0))),
            "status": ACTIVE,
            "anchor": fp,
        }
        auth._save()
        return [doc.raw, auth._publish_freshness(now)]


def revoke(auth: Authority, partner: str, now: int) -> list[bytes]:
    """End the agreement with ``partner``: a terminated version by our federation role, and a freshness without it."""
    with auth.locked():
        fed = _federation(auth)
        entry = fed.get(partner)
        if entry is None or not entry.get("version") or entry.get("status") not in (ACTIVE, RENEW):
            raise NoAgreement(f"{auth.domain} has no active agreement with {partner}")
        held = current(auth, partner)
        assert held is not None
        old = held.payload
        version = max(int(entry["version"]), int(entry.get("proposed", 0))) + 1
        fields = {**old.to_dict(), "version": version, "issued_at": now, "status": "terminated"}
        fields["expires"] = max(old.expires, now + 1)
        payload = D.Agreement.from_dict(fields)
        data = D.sign(payload, auth._signers("federation"))
        atomic_write(auth.home / "published" / "agreement" / partner / f"{version}.cbor", data)
        fed[partner] = {**entry, "version": version, "proposed": version, "status": TERMINATED}
        auth._save()
        return [data, auth._publish_freshness(now)]


def current(auth: Authority, partner: str) -> D.Signed[D.Agreement] | None:
    return auth.current_agreement(partner)


def listing(auth: Authority, now: int) -> list[dict[str, Any]]:
    out = []
    for partner, entry in sorted(auth.state.get("federation", {}).items()):
        doc = current(auth, partner)
        item: dict[str, Any] = {
            "partner": partner,
            "status": entry.get("status"),
            "version": entry.get("version") or None,
            "proposed": entry.get("proposed"),
            "partner_root": entry.get("anchor"),
        }
        if doc is not None:
            item["expires"] = doc.payload.expires
            item["expired"] = now >= doc.payload.expires
            item["grants"] = A.describe(doc.payload)["grants"]
        out.append(item)
    return out


def show(data: bytes, now: int) -> dict[str, Any]:
    """What the agreement in ``data`` grants, both ways, and whose thresholds its signatures meet
    (against the roots beside it in the file; a bare document shows only what it says)."""
    doc, roots = read_agreement(data)
    a = doc.payload
    out = A.describe(a)
    out["digest"] = doc.digest.hex()
    out["expired"] = now >= a.expires
    signed: dict[str, Any] = {}
    for side in a.parties:
        root = next((r for r in roots if r.payload.domain == side and A.fingerprint(r.raw) == a.roots[side]), None)
        if root is None:
            signed[side] = "unknown (the root it pins is not in the file)"
            continue
        try:
            trust.check_role(doc, root.payload, "federation")
            signed[side] = "yes"
        except Rejected as exc:  # reported, not raised: show describes
            signed[side] = f"no ({exc.kind})"
    out["signed_by"] = signed
    return out


def released_to(auth: Authority, partner: str, now: int) -> list[bytes]:
    """What we export to a partner's nodes: our root chain, the agreement, and only what it releases;
    after a revocation, the terminated agreement alone."""
    doc = current(auth, partner)
    if doc is not None and doc.payload.status == "terminated":
        return [doc.raw]  # the partner's nodes learn that we ended it (one side's threshold suffices)
    entry = auth.state.get("federation", {}).get(partner, {})
    if doc is None or now >= doc.payload.expires or entry.get("status") != ACTIVE:
        raise NoAgreement(f"{auth.domain} has no live agreement with {partner}")
    release = doc.payload.terms[auth.domain].release
    roots = [auth.published("root", v) for v in range(1, int(auth.state["versions"]["root"]) + 1)]
    out = [*roots, doc.raw]
    if "revocation" in release and int(auth.state["versions"].get("revocation", 0)):
        out.append(auth.current("revocation"))  # first after the roots and agreement: the most urgent
    for t in ("bundle", "freshness"):
        if t in release:
            out.append(auth.current(t))
    if "policy" in release:  # the whole policy; "policy:authorization" alone releases no document yet
        out.append(auth.current("policy"))
    return out
