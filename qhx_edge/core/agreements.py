"""Agreements: the pure rules of coalition federation (docs/architecture.md "Agreements").

An ``agreement`` document (:class:`~qhx_edge.core.documents.Agreement`) is
one COSE_Sign envelope whose signatures come from the federation role of both
domains: the one reader of signed messages (:func:`~qhx_edge.core.cose.parse_signed`)
reads it like every document, and thresholds are counted here twice over the
same signatures, once against each side's root (distinct key ids per root, as
everywhere).  A signature by the other domain's keys is neither a fault nor a
vote for this side: :func:`~qhx_edge.core.trust.check_role` only counts keys of
the root it is given.

The rules a node applies, each a typed error with a stable kind:

* an agreement is about this node's domain (``not-mine`` otherwise: relayed,
  not judged, not stored);
* ``active``: a threshold of our federation role under the held root **and** of
  the partner's federation role under the partner root the agreement pins by
  fingerprint (``threshold`` / ``bad-signature`` / ``anchor-mismatch`` when
  the pinned root is not the one supplied or held);
* ``terminated``: a threshold of either side is enough (either may end it);
* versions per pair of domains never go back (``rollback``,
  ``equal-version-conflict``), not issued in the future, not expired;
* the gate (:func:`gate`): trust in a partner exists only while the home
  domain's current freshness epoch names the agreement version held, that
  version is active and unexpired; otherwise ``no-agreement``, at once;
* identities (:func:`check_identity`): a partner SPIFFE ID must match one of
  the prefixes our side accepts (``scope-violation``) and the partner's
  freshness must be within our side's budget (``stale``).

No I/O and no clock: the caller passes ``now``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qhx_edge.core import trust
from qhx_edge.core.documents import Agreement, Freshness, PartnerLimits, Root, Signed
from qhx_edge.core.errors import (
    AnchorMismatch,
    EqualVersionConflict,
    Expired,
    Malformed,
    NoAgreement,
    NotYetValid,
    Rejected,
    Rollback,
    ScopeViolation,
    Stale,
    UnknownDomain,
)
from qhx_edge.core.spiffe import parse_spiffe_id, trust_domain_id
from qhx_edge.core.trust import Checker, Limits, Mark, Outcome, TrustState, Verdict, check_role

# Which release term lets each document type of a partner in (the root chain always may).
RELEASE_OF_TYPE = {
    "bundle": ("bundle",),
    "freshness": ("freshness",),
    "policy": ("policy", "policy:authorization"),
    "revocation": ("revocation",),
}


def fingerprint(raw: bytes) -> str:
    """A root's fingerprint: SHA-256 of its signed bytes (as ``authority anchor`` prints it)."""
    return hashlib.sha256(raw).hexdigest()


def check_times(doc: Signed[Agreement], now: int, tolerance: int) -> None:
    p = doc.payload
    if p.issued_at > now + tolerance:
        raise NotYetValid(f"{doc.describe()} is issued at {p.issued_at}, {p.issued_at - now} s in the future")
    if now >= p.expires:
        raise Expired(f"{doc.describe()} expired at {p.expires}")


def check_pinned_root(agreement: Agreement, domain: str, root: Signed[Root]) -> None:
    """``root`` is the root of ``domain`` the agreement pins (its fingerprint), else ``anchor-mismatch``."""
    if root.payload.domain != domain:
        raise Malformed(f"a root of {root.payload.domain} is not a root of {domain}")
    fp = fingerprint(root.raw)
    if agreement.roots[domain] != fp:
        raise AnchorMismatch(
            f"agreement v{agreement.version} pins root {agreement.roots[domain][:16]} of {domain}, not {fp[:16]}"
        )


def check_signatures(
    doc: Signed[Agreement],
    home_root: Root,
    partner_root: Root | None,
    cache: dict[int, bool] | None = None,
) -> None:
    """The signatures an agreement needs (see the module docstring).

    ``home_root``: this node's held root; ``partner_root``: the partner root the
    agreement pins (already checked with :func:`check_pinned_root`), or
    ``None`` when it is neither held nor supplied.
    """
    a = doc.payload
    if a.status == "terminated":
        try:
            check_role(doc, home_root, "federation", cache)
        except Rejected:
            if partner_root is None:
                raise
            check_role(doc, partner_root, "federation", cache)
        return
    check_role(doc, home_root, "federation", cache)
    if partner_root is None:
        partner = a.other(home_root.domain)
        raise AnchorMismatch(f"{doc.describe()}: the root of {partner} it pins is neither held nor supplied")
    check_role(doc, partner_root, "federation", cache)


def gate(home: str, partner: str, agreement: Agreement | None, epoch: Freshness | None, now: int) -> Rejected | None:
    """Why trust in ``partner`` is closed now (a :class:`NoAgreement`), or ``None`` when it is open.

    Open only while the home epoch names the held agreement's version, and that
    version is active and unexpired: a revocation (a terminated version, or a
    freshness that no longer names the partner) closes it with the pack that
    carries it, and an expired agreement closes it with no pack at all.
    """
    if agreement is None:
        return NoAgreement(f"{home} holds no agreement with {partner}")
    named = epoch.agreements.get(partner) if epoch is not None else None
    if named is None:
        return NoAgreement(f"the current freshness epoch of {home} names no agreement with {partner}")
    if agreement.version != named:
        return NoAgreement(
            f"the freshness epoch of {home} names agreement v{named} with {partner}; v{agreement.version} is held"
        )
    if agreement.status != "active":
        return NoAgreement(f"the agreement with {partner} was terminated (v{agreement.version})")
    if now >= agreement.expires:
        return NoAgreement(f"the agreement with {partner} expired at {agreement.expires}")
    return None


def released(agreement: Agreement, partner: str, type_: str) -> bool:
    """Whether ``partner`` releases documents of ``type_`` to the other side under ``agreement``."""
    if type_ == "root":
        return True
    return any(r in agreement.terms[partner].release for r in RELEASE_OF_TYPE.get(type_, ()))


def in_scope(spiffe_id: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``spiffe_id`` matches an accepted prefix on a path-segment boundary."""
    return any(spiffe_id == p or spiffe_id.startswith(p + "/") for p in prefixes)


def check_identity(
    spiffe_id: str,
    home: str,
    agreement: Agreement | None,
    epoch: Freshness | None,
    partner_fresh_issued_at: int | None,
    now: int,
    limits: PartnerLimits | None = None,
    expires: Mapping[str, int] | None = None,
) -> str:
    """Whether a partner workload identity may be trusted now; returns its trust domain.

    ``no-agreement`` unless the gate is open; ``scope-violation`` unless our
    side accepts the ID; ``stale`` when the partner's freshness is older than our
    side's budget (or absent; capped by our policy's ``limits``), or our own epoch naming the
    agreement has expired.  An identity of our own domain is not a partner's.  ``expires``: the
    ``expires`` of the partner's held documents by type (its pinned root, its bundle): one past is
    ``expired``, whatever the freshness (as :func:`partner_mode` says ``expired``).
    """
    domain, _ = parse_spiffe_id(spiffe_id)
    if domain == home:
        raise ScopeViolation(f"{spiffe_id} is an identity of {home} itself, not of a partner")
    closed = gate(home, domain, agreement, epoch, now)
    if closed is not None:
        raise closed
    assert agreement is not None
    ours = agreement.terms[home]
    if not in_scope(spiffe_id, ours.accept):
        raise ScopeViolation(f"{spiffe_id} is outside what {home} accepts from {domain} ({', '.join(ours.accept)})")
    if epoch is not None and now >= epoch.expires:
        raise Stale(f"the freshness epoch of {home} that names the agreement expired at {epoch.expires}")
    for kind, end in sorted((expires or {}).items()):
        if now >= end:
            raise Expired(
                f"the held {kind} of {domain} expired at {end}: nothing of {domain} is trusted until a newer one"
            )
    if partner_fresh_issued_at is None:
        raise Stale(f"no freshness of {domain} is held")
    if _from_the_future(partner_fresh_issued_at, now):
        raise Stale(
            f"the freshness of {domain} is dated {partner_fresh_issued_at}, after now ({now}): a clock ran ahead"
        )
    age = now - partner_fresh_issued_at
    allowed = budget(agreement, home, limits)
    if age >= allowed:
        raise Stale(f"the freshness of {domain} is {age} s old; {_budget_source(agreement, home, limits)} {allowed} s")
    return domain


def budget(agreement: Agreement, home: str, limits: PartnerLimits | None = None) -> int:
    """Our side's staleness budget for the partner: the agreement's, capped by our policy's limit."""
    ours = agreement.terms[home].max_staleness
    cap = limits.max_staleness if limits is not None else None
    return ours if cap is None else min(ours, cap)


def _budget_source(agreement: Agreement, home: str, limits: PartnerLimits | None) -> str:
    capped = budget(agreement, home, limits) < agreement.terms[home].max_staleness
    return "our policy allows any partner" if capped else "the agreement allows"


def _from_the_future(fresh_at: int, now: int) -> bool:
    """A freshness time later than now beyond the clock tolerance proves nothing about now: a clock that
    ran ahead when it was stamped (a partner's epoch, or our own fetch of a SPIFFE bundle) and was set
    right since would otherwise keep the partner fresh until that future time."""
    return fresh_at > now + trust.DEFAULT_CLOCK_TOLERANCE


@dataclass(frozen=True)
class PartnerMode:
    mode: str  # connected | expired | no-agreement
    staleness: int | None
    budget: int | None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "staleness": self.staleness, "budget": self.budget, "reason": self.reason}


def partner_mode(
    home: str,
    partner: str,
    agreement: Agreement | None,
    epoch: Freshness | None,
    fresh_issued_at: int | None,
    now: int,
    *,
    clock_ok: bool = True,
    expires: Mapping[str, int] | None = None,
    limits: PartnerLimits | None = None,
) -> PartnerMode:
    """A partner domain's mode for ``status``: under the agreement's budget, not the partner's policy."""
    closed = gate(home, partner, agreement, epoch, now)
    if closed is not None:
        return PartnerMode("no-agreement", None, None, closed.message)
    assert agreement is not None
    allowed = budget(agreement, home, limits)
    age = None if fresh_issued_at is None else max(0, now - fresh_issued_at)
    gone = sorted(t for t, end in (expires or {}).items() if now >= end)
    why = next(
        (
            reason
            for failed, reason in (
                (age is None, f"no freshness of {partner} is held"),
                (fresh_issued_at is not None and _from_the_future(fresh_issued_at, now), "freshness dated after now"),
                (not clock_ok, "clock rollback"),
                (epoch is not None and now >= epoch.expires, f"the freshness epoch of {home} expired"),
                (bool(gone), f"held {', '.join(gone)} of {partner} expired"),
                (age is not None and age >= allowed, f"freshness older than the budget ({allowed} s)"),
            )
            if failed
        ),
        None,
    )
    if why is not None:
        return PartnerMode("expired", age, allowed, why)
    return PartnerMode("connected", age, allowed)


def serves_bundle(
    home: str,
    partner: str,
    agreement: Agreement | None,
    epoch: Freshness | None,
    fresh_issued_at: int | None,
    now: int,
    *,
    clock_ok: bool = True,
    expires: Mapping[str, int] | None = None,
    limits: PartnerLimits | None = None,
) -> bool:
    """Whether a node may hand the partner's bundle to its workloads now (the Workload API's federated
    bundles): the partner is ``connected`` under the agreement.  For the issuer, which still applies
    the partner's own policy budget."""
    m = partner_mode(
        home, partner, agreement, epoch, fresh_issued_at, now, clock_ok=clock_ok, expires=expires, limits=limits
    )
    return m.mode == "connected"


def check_spiffe_bundle_allowed(
    home: str,
    partner: str,
    agreement: Agreement | None,
    epoch: Freshness | None,
    now: int,
    limits: PartnerLimits | None = None,
) -> None:
    """Whether the partner's trust bundle may come in the plain SPIFFE format (unsigned, e.g. from a
    partner that runs SPIRE: ``bundle import-spiffe``) rather than only as its signed documents:
    ``no-agreement`` unless the gate is open, ``scope-violation`` unless our side's terms say
    ``allow_spiffe_bundles`` and our policy's ``limits`` do not forbid them."""
    closed = gate(home, partner, agreement, epoch, now)
    if closed is not None:
        raise closed
    assert agreement is not None
    if limits is not None and not limits.spiffe_bundles:
        raise ScopeViolation(f"the policy of {home} takes partner trust only as signed documents, not SPIFFE bundles")
    if not agreement.terms[home].allow_spiffe_bundles:
        raise ScopeViolation(
            f"the agreement with {partner} takes its trust only as signed documents, not SPIFFE bundles"
        )


ALREADY_IMPORTED = "already-imported"
NEW = "new"


def decide_spiffe_import(
    home: str,
    partner: str,
    agreement: Agreement | None,
    epoch: Freshness | None,
    now: int,
    sequence: int | None,
    digest: bytes,
    held: tuple[int, bytes] | None,
    limits: PartnerLimits | None = None,
) -> str:
    """Whether a partner's SPIFFE bundle (``bundle import-spiffe``; later ``federation fetch``) enters
    the node: :data:`NEW`, or :data:`ALREADY_IMPORTED` for the held one again; else a typed rejection.

    Unlike SPIRE, which replaces a federated bundle with whatever it fetched, bundles are ordered by
    ``spiffe_sequence`` (SPIFFE Trust Domain and Bundle §4.1.1): a bundle without one is
    ``malformed``, one below the held sequence, or equal to it with other content (``digest``:
    :func:`~qhx_edge.core.spiffe_bundle.content_digest`), is ``rollback``.  Only under a live
    agreement whose terms on our side allow SPIFFE bundles (:func:`check_spiffe_bundle_allowed`:
    ``no-agreement``, ``scope-violation``); never for our own domain (``scope-violation``).
    ``held``: the sequence and digest of the newest bundle of ``partner`` held, if any.
    """
    if partner == home:
        raise ScopeViolation(f"{home} is this node's own domain: its trust comes only as signed documents")
    check_spiffe_bundle_allowed(home, partner, agreement, epoch, now, limits)
    if sequence is None:
        raise Malformed(
            f"the SPIFFE bundle of {partner} has no spiffe_sequence: without one an older bundle "
            "could not be told from a newer one"
        )
    if held is not None:
        held_seq, held_digest = held
        if sequence == held_seq and digest == held_digest:
            return ALREADY_IMPORTED
        if sequence == held_seq:
            raise Rollback(f"the SPIFFE bundle of {partner} has the held sequence {held_seq} but other content")
        if sequence < held_seq:
            raise Rollback(f"the SPIFFE bundle of {partner} has sequence {sequence}; {held_seq} is held")
    return NEW


def describe(agreement: Agreement) -> dict[str, Any]:
    """What an agreement grants, both ways (``federation show``)."""
    a = agreement
    out: dict[str, Any] = {
        "proposer": a.domain,
        "partner": a.partner,
        "version": a.version,
        "status": a.status,
        "issued_at": a.issued_at,
        "expires": a.expires,
        "roots": dict(a.roots),
        "grants": {},
    }
    for side in a.parties:
        other = a.other(side)
        t = a.terms[side]
        out["grants"][side] = {
            "to": other,
            "accepts_from_partner": list(t.accept),
            "releases_to_partner": ["root", *t.release],
            "max_staleness": t.max_staleness,
            "allow_spiffe_bundles": t.allow_spiffe_bundles,
        }
    return out


def trust_domain_prefix(domain: str) -> str:
    """The prefix accepting every identity of ``domain``."""
    return trust_domain_id(domain)


_LIMITS = Limits()


# --- a node's batch: agreements first, then the partners they open -----------------------------


@dataclass(frozen=True)
class Federation:
    """What a node holds about its partners, beside :class:`~qhx_edge.core.trust.TrustState`.

    ``agreements``: the current (newest) agreement held per partner; ``roots``:
    every held root of a partner by fingerprint (an agreement may pin any of
    them); ``floors``: the lowest root version held per partner domain (its
    pinned root: older ones in a pack are ``not-mine``, never a rollback).
    """

    home: str
    agreements: Mapping[str, Signed[Agreement]] = field(default_factory=dict)
    roots: Mapping[str, Signed[Root]] = field(default_factory=dict)
    floors: Mapping[str, int] = field(default_factory=dict)


@dataclass
class FederatedOutcome(Outcome):
    """:class:`~qhx_edge.core.trust.Outcome` with agreements to store and partner domains to add."""

    agreements: list[Signed[Agreement]] = field(default_factory=list)
    new_domains: dict[str, str] = field(default_factory=dict)  # partner -> fingerprint of its pinned root

    @property
    def accepted(self) -> list[Signed[Any]]:
        """Documents to store in the domain documents (agreements are kept apart)."""
        return [d for d in super().accepted if d.type != "agreement"]

    @property
    def changed(self) -> bool:
        return super().changed or bool(self.agreements) or bool(self.new_domains)


def _sub(
    items: Sequence[tuple[int, Signed[Any]]],
    docs: Sequence[bytes],
    state: TrustState,
    now: int,
    limits: Limits,
    checker: Checker,
) -> Outcome:
    """:func:`trust.verify_batch` over some of a batch's documents, verdicts re-indexed to the batch."""
    out = trust.verify_batch(
        [docs[i] for i, _ in items], state, now, limits, parsed=[d for _, d in items], checker=checker
    )
    for v in out.verdicts:
        v.index = items[v.index][0]
    return out


def _self_signed_root(doc: Signed[Root], now: int, tolerance: int, cache: dict[int, bool]) -> None:
    """A partner root pinned by fingerprint must still be signed by its own root threshold and not be
    issued in the future.  Its expiry is not checked here: the chain is walked from it and expiry holds
    on the final root (TUF 5.3.10), so a partner that rotated since the agreement pinned an old root
    is still followed; a lone expired root opens nothing (the trust core refuses what would rest on it)."""
    check_role(doc, doc.payload, "root", cache)
    p = doc.payload
    if p.issued_at > now + tolerance:
        raise NotYetValid(f"{doc.describe()} is issued at {p.issued_at}, in the future")


def verify_batch(
    docs: Sequence[bytes],
    state: TrustState,
    fed: Federation,
    now: int,
    limits: Limits = _LIMITS,
    *,
    parsed: Sequence[Signed[Any] | Rejected] | None = None,
    checker: Checker = trust.check_signatures,
) -> FederatedOutcome:
    """Verify a node's batch: its own domain by :func:`trust.verify_batch`, then agreements, then partners.

    1. Every document not of a partner domain (its own domain's, and those of
       domains nobody agreed on: ``unknown-domain``) goes through the trust
       core as before; that gives the home root and freshness epoch after the
       batch.
    2. Agreements naming this domain are verified against that root and the
       partner root they pin (held, or supplied in the batch); others are
       ``not-mine``.  The newest valid one per partner becomes current.
    3. Each partner domain's documents pass only while :func:`gate` is open
       (else ``no-agreement``, every one of them), only the types the partner
       releases (else ``scope-violation``), and are verified by the trust core
       against the partner's own root chain from its pinned root, its
       thresholds, freshness and rollback marks, in its own namespace.
    """
    trust.check_clock(now, state.clock_high_water, limits.clock_tolerance)
    items = trust.parse_batch(docs, limits) if parsed is None else parsed
    if len(items) != len(docs):
        raise ValueError("one parsed item per document")
    home = fed.home
    verdicts: dict[int, Verdict] = {}
    agreement_items: list[tuple[int, Signed[Agreement]]] = []
    partner_candidates = set(fed.agreements) | {d for d in state.domains if d != home}
    for doc in items:
        if isinstance(doc, Signed) and isinstance(doc.payload, Agreement) and home in doc.payload.parties:
            partner_candidates.add(doc.payload.other(home))
    own: list[tuple[int, Signed[Any]]] = []
    by_partner: dict[str, list[tuple[int, Signed[Any]]]] = {}
    for i, doc in enumerate(items):
        if isinstance(doc, Rejected):
            verdicts[i] = Verdict(i, "rejected", None, doc)
        elif isinstance(doc.payload, Agreement):
            agreement_items.append((i, doc))
        elif doc.payload.domain != home and doc.payload.domain in partner_candidates:
            by_partner.setdefault(doc.payload.domain, []).append((i, doc))
        else:
            own.append((i, doc))
    home_state = dataclasses.replace(state, domains={d: v for d, v in state.domains.items() if d == home})
    first = _sub(own, docs, home_state, now, limits, checker)
    for v in first.verdicts:
        verdicts[v.index] = v
    out = FederatedOutcome(
        [], dict(first.marks), set(first.resets), max(state.clock_high_water, first.clock_high_water)
    )
    home_view = state.domains.get(home)
    home_root = home_view.root.payload if home_view is not None else None
    epoch = home_view.freshness.payload if home_view is not None and home_view.freshness is not None else None
    if (home, "freshness") in first.resets:
        epoch = None
    for v in first.verdicts:
        if v.status == "applied" and v.doc is not None and v.doc.payload.domain == home:
            if isinstance(v.doc.payload, Root):
                home_root = v.doc.payload
            elif isinstance(v.doc.payload, Freshness):
                epoch = v.doc.payload

    # 2. agreements.
    supplied_roots: dict[str, Signed[Root]] = {}
    for _, doc in (x for xs in by_partner.values() for x in xs):
        if isinstance(doc.payload, Root):
            supplied_roots.setdefault(fingerprint(doc.raw), doc)
    current: dict[str, Signed[Agreement]] = dict(fed.agreements)
    valid: dict[str, list[Verdict]] = {}
    for i, doc in sorted(agreement_items, key=lambda x: (x[1].payload.version, x[0])):
        v = Verdict(i, "pending", doc)
        verdicts[i] = v
        a = doc.payload
        if home not in a.parties:
            v.status = "not-mine"  # another pair's agreement, relayed beside ours: not ours to judge or store
            continue
        partner = a.other(home)
        try:
            if home_root is None:
                raise UnknownDomain(f"{doc.describe()}: this node holds no root of {home}")
            held = fed.agreements.get(partner)
            if held is not None and a.version <= held.payload.version:
                if a.version == held.payload.version and doc.digest == held.digest:
                    v.status = "already-held"
                    continue
                if a.version == held.payload.version:
                    raise EqualVersionConflict(f"{doc.describe()} differs from the held agreement of that version")
                raise Rollback(f"{doc.describe()} is older than the held agreement v{held.payload.version}")
            held_pin = fed.roots.get(a.roots[partner])
            # A termination may carry the partner's signatures alone, so it needs the partner root this
            # node already holds (chain-verified): a root supplied beside it is anyone's, and a courier
            # with a self-made root must not end, or forestall, a federation.
            pinned = held_pin if a.status == "terminated" else held_pin or supplied_roots.get(a.roots[partner])
            if pinned is not None:
                check_pinned_root(a, partner, pinned)
            check_signatures(doc, home_root, pinned.payload if pinned is not None else None, v.checked)
            check_times(doc, now, limits.clock_tolerance)
        except Rejected as exc:
            v.status, v.error = "rejected", exc
            continue
        valid.setdefault(partner, []).append(v)
    for partner, vs in valid.items():
        kept = trust._dedupe(vs)  # one agreement per version, as for every document
        for k, v in enumerate(kept):
            assert v.doc is not None
            v.status = "applied" if k == len(kept) - 1 else "history"
            v.doc = v.doc.canonical(sorted(j for j, ok in v.checked.items() if ok))
            out.agreements.append(v.doc)
            out.clock_high_water = max(out.clock_high_water, v.doc.payload.issued_at)
            if v.status == "applied":
                current[partner] = v.doc

    # 3. partners.
    partner_views = {}
    anchors: dict[str, Verdict] = {}  # the pinned root of a partner first seen, per partner
    for partner, pitems in sorted(by_partner.items()):
        held_a = current.get(partner)
        agreement = held_a.payload if held_a is not None else None
        closed = gate(home, partner, agreement, epoch, now)
        if closed is not None:
            for i, doc in pitems:
                verdicts[i] = Verdict(i, "rejected", doc, closed)
            continue
        assert agreement is not None
        rest: list[tuple[int, Signed[Any]]] = []
        for i, doc in pitems:
            if not released(agreement, partner, doc.type):
                verdicts[i] = Verdict(
                    i, "rejected", doc, ScopeViolation(f"{doc.describe()}: {partner} does not release its {doc.type}")
                )
            else:
                rest.append((i, doc))
        view = state.domains.get(partner)
        floor = fed.floors.get(partner)
        if view is None:
            pin = agreement.roots[partner]
            anchor = next(((i, d) for i, d in rest if isinstance(d.payload, Root) and fingerprint(d.raw) == pin), None)
            if anchor is None:
                for i, doc in rest:
                    verdicts[i] = Verdict(
                        i,
                        "rejected",
                        doc,
                        UnknownDomain(f"{doc.describe()}: the root of {partner} the agreement pins is not supplied"),
                    )
                continue
            ai, adoc = anchor
            av = Verdict(ai, "pending", adoc)
            verdicts[ai] = av
            try:
                _self_signed_root(adoc, now, limits.clock_tolerance, av.checked)
            except Rejected as exc:
                av.status, av.error = "rejected", exc
                for i, doc in rest:
                    if i != ai:
                        verdicts[i] = Verdict(i, "rejected", doc, exc)
                continue
            av.status = "applied"
            av.doc = adoc.canonical(sorted(j for j, ok in av.checked.items() if ok))
            out.new_domains[partner] = pin
            out.marks[(partner, "root")] = Mark(adoc.payload.version, av.doc.digest)
            out.clock_high_water = max(out.clock_high_water, adoc.payload.issued_at)
            view = trust.DomainView(root=av.doc, history={("root", adoc.payload.version): av.doc.digest})
            floor = adoc.payload.version
            rest = [(i, d) for i, d in rest if i != ai]
            anchors[partner] = av
        # A partner's epoch must find its bundle; its revocation list too where the partner releases it
        # (then a relay cannot pass the partner's freshness on and hold its revocations back).
        wanted = ("bundle", "revocation") if released(agreement, partner, "revocation") else ("bundle",)
        view = dataclasses.replace(view, epoch_types=wanted)
        todo = []
        for i, doc in rest:
            if isinstance(doc.payload, Root) and floor is not None and doc.payload.version < floor:
                verdicts[i] = Verdict(i, "not-mine", doc)  # before the pinned root: not needed, not stored
            else:
                todo.append((i, doc))
        partner_views[partner] = (view, todo)
    for partner, (view, todo) in partner_views.items():
        sub_state = dataclasses.replace(state, domains={partner: view})
        res = _sub(todo, docs, sub_state, now, limits, checker)
        for v in res.verdicts:
            verdicts[v.index] = v
        out.marks.update(res.marks)
        if (partner, "root") in res.marks and partner in anchors:
            anchors[partner].status = "history"  # the chain went on from the pinned root
        out.resets |= res.resets
        out.clock_high_water = max(out.clock_high_water, res.clock_high_water)
    out.verdicts = [verdicts[i] for i in range(len(items))]
    return out
