"""A field node: the I/O around the pure trust core.

Each operation reads the clock once, loads the trust state from the store,
asks :mod:`qhx_edge.core.trust` for verdicts, and applies what it accepted in one
transaction.  Import order for a pack (issue: sneakernet):

1. the clock against trusted time (``clock-rollback`` stops everything);
2. a sealed pack is opened with this node's encryption key (``not-recipient``);
3. the outer structure, the manifest signature and every document digest are
   checked before any document is parsed (a tampered pack is refused whole);
4. every document is verified by the trust-core rules; valid newer documents
   apply in one transaction, each rejected one is reported with its kind and
   changes nothing (``strict`` applies nothing unless all are acceptable);
5. the audit log records every accept and reject, in the same transaction as
   the change, or on its own when nothing changed.
"""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qhx_edge.core import agreements, staleness, svid, trust
from qhx_edge.core.cards import make_card, parse_card
from qhx_edge.core.delegations import delegation_end, delegation_status
from qhx_edge.core.documents import Bundle, Delegation, Freshness, PartnerLimits, Policy, Root, Signed, parse
from qhx_edge.core.errors import (
    AlreadyInitialised,
    AnchorMismatch,
    BadSignature,
    ClockRollback,
    Expired,
    Malformed,
    QhxError,
    Rejected,
    Rollback,
    StoreLocked,
    UnknownDomain,
)
from qhx_edge.core.spiffe import trust_domain_of
from qhx_edge.store.files import private_dir, read_capped
from qhx_edge.store.identity import NodeIdentity
from qhx_edge.store.keystore import Keystore
from qhx_edge.store.trust_store import STORE_FILE, AuditEntry, StateChanged, Store

if TYPE_CHECKING:
    from qhx_edge.packs import pack

DEFAULT_CLOCK_TOLERANCE = trust.DEFAULT_CLOCK_TOLERANCE
PassphraseSource = Callable[[], bytes]
# Below this many signatures a batch is checked on the calling thread: starting
# workers would cost more than they save.
PARALLEL_MIN_CHECKS = 8


def spread_checks(checks: Sequence[trust.SignatureCheck], workers: int | None = None) -> list[bool]:
    """A :data:`~qhx_edge.core.trust.Checker` that spreads signature checks over the machine's cores.

    ``cryptography`` releases the GIL while it verifies, so threads verify in
    parallel; each worker takes one contiguous share of the checks (a hybrid
    batch alternates Ed25519 and ML-DSA-65, so every n-th check would give one
    worker all the cheap Ed25519 checks and another all the dearer ML-DSA
    ones) and the results come back in input order.  The trust core decides
    every verdict afterwards, on one thread, from these results: the schedule
    never changes a verdict.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    if workers is None:
        affinity = getattr(os, "sched_getaffinity", None)  # the cores this process may use (Linux)
        workers = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
    n = workers
    n = max(1, min(n, len(checks) // max(1, PARALLEL_MIN_CHECKS // 2)))
    if n < 2:
        return trust.check_signatures(checks)
    bounds = [len(checks) * i // n for i in range(n + 1)]
    with ThreadPoolExecutor(n, thread_name_prefix="qhx-verify") as pool:
        shares = pool.map(trust.check_signatures, [checks[bounds[i] : bounds[i + 1]] for i in range(n)])
        return [ok for share in shares for ok in share]


def _no_passphrase() -> bytes:
    from qhx_edge.core.errors import PassphraseError

    raise PassphraseError("this operation needs the node's private keys: set QHX_EDGE_PASSPHRASE(_FILE)")


def init(
    home: Path,
    anchor: bytes,
    now: int,
    *,
    passphrase: bytes | None = None,
    expect: str | None = None,
    tolerance: int = DEFAULT_CLOCK_TOLERANCE,
) -> dict[str, Any]:
    """Create a node home anchored to ``anchor`` (a root document obtained out of band).

    A node never trusts on first use: the anchor must verify under its own
    root threshold, and when ``expect`` is given its fingerprint must match.
    The node's signing and encryption keys are made here and sealed under
    ``passphrase`` (``None``: stored unencrypted, loudly).
    """
    from qhx_edge.homes.authority import fingerprint

    home = Path(home)
    if (home / STORE_FILE).exists():
        raise AlreadyInitialised(f"{home} already holds a node store")
    fp = fingerprint(anchor)
    if expect is not None and expect.lower() != fp:
        raise AnchorMismatch(f"anchor fingerprint {fp} does not match the expected {expect}")
    root = trust.verify_anchor(anchor, now, tolerance)
    node_id = secrets.token_hex(8)
    private_dir(home)
    ident = NodeIdentity.create(Keystore.create(home, passphrase), root.payload.suite)
    card = make_card(root.payload.domain, node_id, ident.signer, ident.encryption.public, now)
    store = Store.create(home)
    try:
        store.initialise(node_id, root, fp, tolerance, now, card)
    finally:
        store.close()
    return {
        "node_id": node_id,
        "domain": root.payload.domain,
        "root_version": root.payload.version,
        "fingerprint": fp,
        "card_fingerprint": parse_card(card).fingerprint,
    }


@dataclass
class ImportResult:
    outcome: trust.Outcome
    applied: bool
    manifest: pack.Manifest | None = None
    exporter: dict[str, Any] = field(default_factory=dict)
    sealed: bool = False
    pack_status: str = "new"  # new | already-imported
    refused: bool = False  # a strict import that applied nothing because of a rejection

    @property
    def error(self) -> Rejected | None:
        return self.outcome.first_error()

    def to_json(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for v in self.outcome.verdicts:
            key = v.status if v.error is None else f"rejected:{v.error.kind}"
            counts[key] = counts.get(key, 0) + 1
        return {
            "applied": self.applied,
            "changed": self.applied and self.outcome.changed,
            "pack": self.manifest.to_json() if self.manifest else None,
            "pack_status": self.pack_status,
            "sealed": self.sealed,
            "exporter": self.exporter,
            "counts": counts,
            "documents": [_report(v, refused=self.refused) for v in self.outcome.verdicts],
        }

    def summary(self) -> str:
        counts = self.to_json()["counts"]
        head = "applied" if self.applied else "nothing applied"
        if self.pack_status == "already-imported":
            head += " (this pack was imported before)"
        return f"{head}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _report(v: trust.Verdict, *, refused: bool = False) -> dict[str, Any]:
    out = v.to_json()
    # The stable per-document report: applied | already-held | rejected:KIND
    # (history versions stored below the current one count as applied), and
    # not-applied for acceptable documents of a strict import that was refused.
    status = out["status"]
    report = "applied" if status == "history" else "already-held" if status == "duplicate" else status
    out["report"] = "not-applied" if refused and report == "applied" else report
    return out


class ImportRejected(Rejected):
    """An import in which documents were rejected; carries the full report."""

    def __init__(self, cause: Rejected, result: ImportResult) -> None:
        super().__init__(cause.message)
        self.kind = cause.kind  # type: ignore[misc]
        self.result = result

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message}


class Node:
    def __init__(self, home: Path, get_passphrase: PassphraseSource = _no_passphrase) -> None:
        self.home = Path(home)
        self.store = Store.open(self.home)
        self.info = self.store.node_info()
        self._get_passphrase = get_passphrase
        self._identity: NodeIdentity | None = None

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def node_id(self) -> str:
        return str(self.info["node_id"])

    @property
    def domain(self) -> str:
        return str(self.info["home_domain"])

    @property
    def tolerance(self) -> int:
        return int(self.info["clock_tolerance"])

    @property
    def identity(self) -> NodeIdentity:
        if self._identity is None:
            self._identity = NodeIdentity(Keystore.open(self.home, self._get_passphrase))
        return self._identity

    def card(self) -> bytes:
        return self.store.card()

    @property
    def encryption_kid(self) -> bytes:
        """This node's HPKE key id, from its public card (no private key needed)."""
        return parse_card(self.store.card()).encryption_key.kid

    # --- import ------------------------------------------------------------------------

    def _reject(self, now: int, exc: Rejected, what: str, doc: Any = None) -> None:
        p = doc.payload if doc is not None else None
        self.store.audit(now, [_reject_entry(exc, what, doc, p)])

    def import_pack(self, data: bytes, now: int, *, source: str = "pack", strict: bool = False) -> ImportResult:
        """Verify a pack and apply every acceptable document in one transaction.

        Raises :class:`ImportRejected` (carrying the report) when any document
        was rejected; with ``strict`` nothing is applied in that case.
        """
        from qhx_edge.packs import pack  # local, as below: status and doc commands need no pack code

        sealed = False
        try:
            trust.check_clock(now, self.store.clock_high_water(), self.tolerance)
            data, sealed = pack.unseal_if_sealed(data, self.encryption_kid, lambda: self.identity.encryption)
            p = pack.parse(data)
            if p.manifest.kind != "documents":
                raise Malformed(f"a {p.manifest.kind} pack is for an authority home, not a node")
            parsed = trust.parse_batch(p.documents, trust.Limits(self.tolerance))  # once, whatever the retries
        except Rejected as exc:
            self._reject(now, exc, source)
            raise
        # One writer, optimistically: verify against the state as read with its generation, and
        # apply only if no other import changed it meanwhile (else verify again against the new
        # state).  Concurrent imports then give what the same imports in sequence give.
        for _attempt in range(MAX_IMPORT_ATTEMPTS):
            try:
                return self._import_once(p.documents, parsed, now, source, strict, p, sealed)
            except StateChanged:
                continue
        raise StoreLocked(f"the trust state kept changing under this import ({MAX_IMPORT_ATTEMPTS} attempts)")

    def import_documents(
        self, documents: Sequence[bytes], now: int, *, source: str, strict: bool = False
    ) -> ImportResult:
        """Verify signed documents that came without a pack (a sync link: docs/architecture.md "Sync
        protocol") and apply every acceptable one in one transaction: the same trust core, the same
        one-writer store and the same report as :meth:`import_pack`, with no manifest to record."""
        try:
            trust.check_clock(now, self.store.clock_high_water(), self.tolerance)
            parsed = trust.parse_batch(list(documents), trust.Limits(self.tolerance))
        except Rejected as exc:
            self._reject(now, exc, source)
            raise
        for _attempt in range(MAX_IMPORT_ATTEMPTS):
            try:
                return self._import_once(list(documents), parsed, now, source, strict, None, False)
            except StateChanged:
                continue
        raise StoreLocked(f"the trust state kept changing under this import ({MAX_IMPORT_ATTEMPTS} attempts)")

    def _import_once(
        self,
        documents: list[bytes],
        parsed: Sequence[Signed[Any] | Rejected],
        now: int,
        source: str,
        strict: bool,
        p: pack.Pack | None,
        sealed: bool,
    ) -> ImportResult:
        try:
            limits = trust.Limits(self.tolerance)
            digests = [d.digest for d in parsed if not isinstance(d, Rejected)]
            state, fed, generation = self.store.read_federated_state(digests)
            trust.check_clock(now, state.clock_high_water, self.tolerance)
            exporter = self._check_exporter(p.manifest) if p is not None else {}
            # Our own domain by the trust core, then agreements and the partner domains they open.
            outcome = agreements.verify_batch(documents, state, fed, now, limits, parsed=parsed, checker=spread_checks)
        except Rejected as exc:
            self._reject(now, exc, source)
            raise
        seen = p is not None and self.store.pack_seen(p.manifest.pack_id)
        manifest = p.manifest if p is not None else None
        result = ImportResult(outcome, False, manifest, exporter, sealed, "already-imported" if seen else "new")
        first = outcome.first_error()
        rejections = [
            _reject_entry(v.error, f"{source} document {v.index}", v.doc, v.doc.payload if v.doc else None)
            for v in outcome.rejected
            if v.error is not None
        ]
        if first is not None and strict:
            self.store.audit(
                now,
                [*rejections, AuditEntry("reject", f"{source}: strict import, nothing applied", first.kind)],
                generation=generation,
            )
            result.refused = True
            raise ImportRejected(first, result)
        record = None
        if p is not None:
            m = p.manifest
            record = (m.pack_id, p.digest, m.exporter_domain, m.exporter_node, m.exporter_key.keyid, m.sequence)
        if outcome.changed:
            self.store.apply(outcome, now, source, rejections=rejections, pack_record=record, generation=generation)
            result.applied = True
        elif first is None:
            entries = [AuditEntry("noop", f"{source}: every document already held")]
            self.store.record_noop(now, entries, record, generation=generation)
        else:
            self.store.audit(
                now, [*rejections, AuditEntry("noop", f"{source}: nothing applied")], generation=generation
            )
        if first is not None:
            raise ImportRejected(first, result)
        return result

    def _check_exporter(self, m: pack.Manifest) -> dict[str, Any]:
        """Who exported this pack, as far as this node can tell.

        An authority's manifest is verified against the freshness role of the
        held root; a node's against its pinned card.  A pinned node id signed by
        another key is impersonation and refused; an unknown exporter is only
        unverified, since every document authenticates itself.
        """
        out: dict[str, Any] = {"domain": m.exporter_domain, "node": m.exporter_node, "keyid": m.exporter_key.keyid}
        if m.exporter_node == "authority":
            root = self.store.current(m.exporter_domain, "root") if self._trusts(m.exporter_domain) else None
            ok = (
                root is not None
                and isinstance(root.payload, Root)
                and m.exporter_key.keyid in root.payload.roles["freshness"].keyids
            )
            out["verified"] = ok
            out["basis"] = "freshness role of the held root" if ok else "key not in the held root"
            return out
        pinned = self.store.pinned_card(m.exporter_node)
        if pinned is None:
            out["verified"] = False
            out["basis"] = "no pinned card for this node"
            return out
        card = parse_card(pinned)
        if card.signing_key.keyid != m.exporter_key.keyid or card.domain != m.exporter_domain:
            raise BadSignature(f"pack claims to come from node {m.exporter_node}, but is not signed by its pinned key")
        out["verified"] = True
        out["basis"] = f"pinned card {card.fingerprint[:16]}"
        return out

    def _trusts(self, domain: str) -> bool:
        return any(d["domain"] == domain for d in self.store.domains())

    # --- cards -------------------------------------------------------------------------

    def pin_card(self, data: bytes, now: int, *, expect: str | None = None) -> dict[str, Any]:
        card = parse_card(data)
        if expect is not None and expect.lower() != card.fingerprint:
            raise AnchorMismatch(f"card fingerprint {card.fingerprint} does not match the expected {expect}")
        self.store.pin_card(card.node_id, card.domain, card.signing_key.keyid, card.fingerprint, card.raw, now)
        return card.to_json()

    # --- export ------------------------------------------------------------------------

    def export_documents(
        self, *, history: bool = False, domain: str | None = None, since: dict[str, Any] | None = None
    ) -> list[bytes]:
        docs = self.store.held_documents(history=history)
        # Agreements travel too (relayed by anyone: they authenticate themselves), after the roots they pin.
        held = [a.raw for a in self.store.federation().agreements.values()]
        return select(docs, domain=domain, since=since) + (select(held, since=since) if domain is None else [])

    def export_pack(self, docs: list[bytes], now: int, *, kind: str = "documents") -> bytes:
        from qhx_edge.packs import pack

        return pack.build(
            docs,
            self.identity.signer,
            domain=self.domain,
            node=self.node_id,
            sequence=self.store.next_export_sequence(),
            now=now,
            kind=kind,
        )

    def summary(self) -> dict[str, Any]:
        return summary_of(self.store.held_documents(), node=self.node_id, domain=self.domain)

    # --- status ------------------------------------------------------------------------

    def status(self, now: int) -> dict[str, Any]:
        hw, observed = self.store.clock_high_water(), self.store.observed_time()
        clock_reason = None
        try:
            trust.check_clock(now, hw, self.tolerance)
            trust.check_observed(now, observed, self.tolerance)
        except ClockRollback as exc:
            clock_reason = exc.message
        clock_ok = clock_reason is None
        out: dict[str, Any] = {
            "node_id": self.info["node_id"],
            "home_domain": self.info["home_domain"],
            "clock": "ok" if clock_ok else "rollback",
            "now": now,
            "clock_high_water": hw,
            "observed_high_water": observed,
            "clock_tolerance": self.tolerance,
            "domains": {},
        }
        if clock_reason is not None:
            out["clock_reason"] = clock_reason
        held = self.store.current(self.domain, "delegation")
        delegation = held.payload if held is not None and isinstance(held.payload, Delegation) else None
        out["delegation"] = delegation_status(delegation, now)
        home_fresh = self.store.current(self.domain, "freshness")
        home_epoch = (
            home_fresh.payload if home_fresh is not None and isinstance(home_fresh.payload, Freshness) else None
        )
        limits = self._limits()
        for d in self.store.domains():
            domain = d["domain"]
            marks = self.store.marks(domain)
            fresh = self.store.current(domain, "freshness")
            policy = self.store.current(domain, "policy")
            f = fresh.payload if fresh is not None and isinstance(fresh.payload, Freshness) else None
            pol = policy.payload if policy is not None and isinstance(policy.payload, Policy) else None
            ends = self.store.held_expiries(domain)
            m = staleness.mode(
                now, f.issued_at if f else None, pol.staleness if pol else None, clock_ok=clock_ok, expires=ends
            )
            versions = {t: marks[t].version if t in marks else None for t in ("root", "bundle", "policy", "freshness")}
            partner: dict[str, Any] = {}
            if d["relation"] == "partner":
                # A partner's mode is under our agreement's budget, not its own policy; with only a
                # SPIFFE bundle, its import or last authenticated fetch is the freshness time (lower assurance).
                held_agreement = self.store.agreement(domain)
                assurance, fresh_at, source = self._partner_source(domain)
                partner["assurance"] = assurance
                if assurance == "spiffe-bundle":
                    partner["spiffe_bundle"] = source.to_json()
                pm = agreements.partner_mode(
                    self.domain,
                    domain,
                    held_agreement.payload if held_agreement is not None else None,
                    home_epoch,
                    fresh_at,
                    now,
                    clock_ok=clock_ok,
                    expires=ends,
                    limits=limits,
                )
                m = staleness.Mode(pm.mode, pm.staleness, 0, m.expired)
                partner = {
                    **partner,
                    "agreement": {
                        "version": held_agreement.payload.version if held_agreement else None,
                        "status": held_agreement.payload.status if held_agreement else None,
                        "expires": held_agreement.payload.expires if held_agreement else None,
                        "max_staleness": pm.budget,
                        "accepts": list(held_agreement.payload.terms[self.domain].accept) if held_agreement else [],
                        "reason": pm.reason,
                    },
                }
            out["domains"][domain] = {
                **partner,
                "relation": d["relation"],
                "anchor_fingerprint": d["anchor_fingerprint"],
                "versions": versions,
                "freshness_issued_at": f.issued_at if f else None,
                "freshness_expires": f.expires if f else None,
                "staleness": m.staleness,
                "mode": m.mode,
                # Held documents past their expiry: the domain is expired until newer ones arrive.
                "expired_documents": {t: ends[t] for t in m.expired},
                # The home domain's issuable TTL: the freshness mode's, capped by the delegation (0 without one).
                "max_ttl": staleness.issuable_ttl(m, delegation_end(delegation), now)
                if domain == self.domain
                else m.max_ttl,
                "freshness_max_ttl": m.max_ttl,
                "budget": {"soft": pol.staleness.soft, "hard": pol.staleness.hard} if pol else None,
            }
        return out

    # --- SPIFFE bundles of partners ----------------------------------------------------

    def _epoch(self) -> Freshness | None:
        f = self.store.current(self.domain, "freshness")
        return f.payload if f is not None and isinstance(f.payload, Freshness) else None

    def _limits(self) -> PartnerLimits | None:
        """What our own policy allows any partner (its ``[federation]``), if a policy is held."""
        p = self.store.current(self.domain, "policy")
        return p.payload.federation if p is not None and isinstance(p.payload, Policy) else None

    def import_spiffe_bundle(
        self,
        data: bytes,
        domain: str,
        now: int,
        *,
        source: str = "file",
        fetched: bool = False,
        still: Callable[[], None] | None = None,
        reset: bool = False,
    ) -> dict[str, Any]:
        """Take a partner's unsigned SPIFFE bundle (the one way one enters a node: docs/architecture.md
        "SPIFFE bundles"): parsed strictly, under a live agreement allowing SPIFFE bundles, ordered by
        ``spiffe_sequence`` (``rollback``; the same one again is ``already-imported``), stored in the
        partner's namespace with the time of import as its freshness time, audited.  Every rejection
        is typed, audited, and changes no trust state.

        ``fetched``: the bytes came from the partner's bundle endpoint over an authenticated channel
        (``federation fetch``), so the held bundle fetched again unchanged is ``confirmed``: its
        freshness time moves to ``now``.  A file read again never refreshes anything (a replayed file
        keeps no stale trust alive).

        ``still``: called after each read of the trust state, before deciding; it raises if what the
        caller relied on (for a fetch, what authenticated the endpoint) no longer holds.  The write that
        follows is refused if the trust state moves after that read, so the check holds for the write.

        ``reset``: the operator says the partner restarted its sequence (a SPIRE server rebuilt on an
        empty datastore counts from 1 again): a bundle that would be ``rollback`` replaces every held
        one of the partner instead (status ``reset``, audited with what was dropped).  Files only; the
        agreement gate and every other check still apply."""
        from qhx_edge.core import spiffe_bundle
        from qhx_edge.core.errors import UnknownDomain
        from qhx_edge.core.spiffe import check_trust_domain

        what = f"SPIFFE bundle of {domain} ({source})"
        try:
            check_trust_domain(domain)
            trust.check_clock(now, self.store.clock_high_water(), self.tolerance)
            trust.check_observed(now, self.store.observed_time(), self.tolerance)
            parsed = spiffe_bundle.parse(data)
            digest = spiffe_bundle.content_digest(parsed)
        except Rejected as exc:
            self.store.audit(now, [AuditEntry("reject", f"{what}: {exc.message}", exc.kind, domain, "spiffe-bundle")])
            raise
        for _attempt in range(MAX_IMPORT_ATTEMPTS):
            held, generation = self.store.spiffe_bundle_mark(domain)
            # Read after the generation: the write below is refused if anything commits after that.
            trusted, agreement, epoch, limits = self.store.memo(
                ("spiffe-import", domain),
                lambda: (self._trusts(domain), self.store.agreement(domain), self._epoch(), self._limits()),
            )
            if still is not None:
                still()
            try:
                if domain != self.domain and not trusted:
                    raise UnknownDomain(f"{domain} is not a partner this node holds (no pinned root)")
                decide = functools.partial(
                    agreements.decide_spiffe_import,
                    self.domain,
                    domain,
                    agreement.payload if agreement is not None else None,
                    epoch,
                    now,
                    parsed.sequence,
                    digest,
                    limits=limits,
                )
                try:
                    status = decide(held)
                except Rollback:
                    if not reset or fetched:
                        raise
                    decide(None)  # every rule but the order against what is held
                    status = "reset"
            except Rejected as exc:
                entry = AuditEntry(
                    "reject", f"{what}: {exc.message}", exc.kind, domain, "spiffe-bundle", parsed.sequence
                )
                self.store.audit(now, [entry])
                raise
            assert agreement is not None
            assert parsed.sequence is not None
            out = {
                "domain": domain,
                "status": status,
                "sequence": parsed.sequence,
                "digest": digest.hex(),
                "assurance": "spiffe-bundle",
                "agreement_version": agreement.payload.version,
                "x509_authorities": len(parsed.x509_authorities),
                "jwt_authorities": len(parsed.jwt_authorities),
                "ignored": list(parsed.ignored),
            }
            confirm = fetched and status == agreements.ALREADY_IMPORTED
            if confirm:
                out["status"] = "confirmed"
            dropped = f" (operator reset: held sequence {held[0]}, {held[1].hex()}, dropped)" if held and reset else ""
            entry = AuditEntry(
                "noop" if status == agreements.ALREADY_IMPORTED and not confirm else "accept",
                f"{what}: sequence {parsed.sequence} {out['status']}{dropped} (unsigned, lower assurance)",
                None,
                domain,
                "spiffe-bundle",
                parsed.sequence,
                digest,
            )
            try:
                if confirm:
                    self.store.confirm_spiffe_bundle(
                        domain, parsed.sequence, digest, now, [entry], generation=generation
                    )
                elif status == agreements.ALREADY_IMPORTED:
                    self.store.audit(now, [entry], generation=generation)
                else:
                    self.store.add_spiffe_bundle(
                        domain, parsed.sequence, digest, data, agreement.payload.version, now, [entry],
                        generation=generation, confirmed=fetched, replace=status == "reset",
                    )  # fmt: skip
            except StateChanged:
                continue
            return out
        raise StoreLocked(f"the trust state kept changing under this import ({MAX_IMPORT_ATTEMPTS} attempts)")

    def _partner_source(self, partner: str) -> tuple[str | None, int | None, Any]:
        """Where trust in a partner's SVIDs comes from: ``("signed", freshness issued_at, Bundle)`` while a
        signed bundle is held, else ``("spiffe-bundle", imported_at, HeldSpiffeBundle)`` for an imported
        SPIFFE bundle the agreement still allows (``scope-violation`` when it no longer does), else Nones."""
        if not self._trusts(partner):
            return None, None, None
        held = self.store.current(partner, "bundle")
        if held is not None and isinstance(held.payload, Bundle):
            fresh = self.store.current(partner, "freshness")
            return "signed", fresh.payload.issued_at if fresh is not None else None, held.payload
        sb = self.store.spiffe_bundle(partner)
        if sb is None:
            fresh = self.store.current(partner, "freshness")
            return None, fresh.payload.issued_at if fresh is not None else None, None
        return "spiffe-bundle", sb.fresh_at, sb

    def _basis(self, domain: str) -> _Basis:
        """What verifying an identity of ``domain`` reads from the store, read as one snapshot and
        reused until anything commits to the store (:meth:`Store.memo`): the clock marks, the held
        agreement and our epoch, where trust in the domain comes from, and the bundle to verify with."""

        def read() -> _Basis:
            held_agreement = epoch = limits = None
            expires: dict[str, int] = {}
            if domain == self.domain:
                assurance, fresh_at = None, None
                held = self.store.current(domain, "bundle") if self._trusts(domain) else None
                source: Any = held.payload if held is not None and isinstance(held.payload, Bundle) else None
            else:
                held_agreement, epoch, limits = self.store.agreement(domain), self._epoch(), self._limits()
                assurance, fresh_at, source = self._partner_source(domain)
                expires = self.store.held_expiries(domain)
            held_revocation = self.store.current(domain, "revocation") if self._trusts(domain) else None
            revoked = held_revocation.payload.index() if held_revocation is not None else {}
            return _Basis(
                self.store.clock_high_water(),
                self.store.observed_time(),
                held_agreement.payload if held_agreement is not None else None,
                epoch,
                assurance,
                fresh_at,
                source,
                limits,
                expires,
                revoked,
                held_revocation.payload.version if held_revocation is not None else None,
            )

        return self.store.memo(("verify-basis", domain), read)

    def _check_partner(self, spiffe_id: str, partner: str, basis: _Basis, now: int) -> dict[str, Any]:
        agreements.check_identity(
            spiffe_id, self.domain, basis.agreement, basis.epoch, basis.fresh_at, now, basis.limits, basis.expires
        )
        assert basis.agreement is not None
        if basis.assurance == "spiffe-bundle":
            agreements.check_spiffe_bundle_allowed(
                self.domain, partner, basis.agreement, basis.epoch, now, basis.limits
            )
        return {
            "spiffe_id": spiffe_id,
            "domain": partner,
            "agreement_version": basis.agreement.version,
            "assurance": basis.assurance,
        }

    def _check_clock(self, basis: _Basis, now: int) -> None:
        trust.check_clock(now, basis.clock_high_water, self.tolerance)
        trust.check_observed(now, basis.observed, self.tolerance)  # a clock wound back

    def check_partner_identity(self, spiffe_id: str, now: int) -> dict[str, Any]:
        """Whether this node may trust a partner workload's SPIFFE ID now (``no-agreement``,
        ``scope-violation`` or ``stale`` otherwise): the agreement gate, our side's accepted
        prefixes, and the partner's freshness within our side's budget."""
        from qhx_edge.core.spiffe import trust_domain_of

        partner = trust_domain_of(spiffe_id)
        basis = self._basis(partner)
        self._check_clock(basis, now)
        return self._check_partner(spiffe_id, partner, basis, now)

    def verify_svid(self, chain: list[bytes], now: int) -> dict[str, Any]:
        """Verify an X.509-SVID chain (DER, leaf first) of our own domain or of a partner.

        A partner's identity must pass :meth:`check_partner_identity` first (the
        agreement gate, our accepted prefixes, the partner's freshness within our
        budget); then the chain is verified against the held bundle of its domain.
        """
        try:
            spiffe_id = svid.leaf_spiffe_id(chain[0] if chain else b"")
            domain = trust_domain_of(spiffe_id)
        except Malformed:
            self._check_clock(self._basis(self.domain), now)  # a clock wound back is said first
            raise
        basis = self._basis(domain)
        self._check_clock(basis, now)
        out: dict[str, Any] = {"spiffe_id": spiffe_id, "domain": domain}
        if domain == self.domain:
            out["relation"] = "home"
        else:
            out.update(self._check_partner(spiffe_id, domain, basis, now), relation="partner")
            if out["assurance"] == "spiffe-bundle":
                # Lower assurance: an unsigned bundle, believed because the agreement allows it.
                svid.verify_x509_svid(chain, basis.source.bundle.x509_authorities, now, basis.revoked)
                out["spiffe_sequence"] = basis.source.sequence
                return out
        held = basis.source
        if not isinstance(held, Bundle):
            raise UnknownDomain(f"this node holds no bundle of {domain}")
        if now >= held.expires:
            raise Expired(f"the held bundle of {domain} expired at {held.expires}")
        svid.verify_x509_svid(chain, held.x509_authorities, now, basis.revoked)
        out["bundle_version"] = held.version
        if basis.revocation_version is not None:
            out["revocation_version"] = basis.revocation_version
        if basis.revoked:
            out["revocations_checked"] = len(basis.revoked)
        out["assurance"] = "signed"
        return out


@dataclass(frozen=True)
class _Basis:
    """What verifying one domain's identities reads from the store (:meth:`Node._basis`)."""

    clock_high_water: int
    observed: int
    agreement: Any  # the held Agreement with a partner, or None
    epoch: Freshness | None  # our own freshness epoch (partners only)
    assurance: str | None  # "signed" | "spiffe-bundle" | None (partners only)
    fresh_at: int | None  # the partner's freshness time (partners only)
    source: Any  # the Bundle to verify with, or a HeldSpiffeBundle (assurance "spiffe-bundle"), or None
    limits: PartnerLimits | None  # our policy's limits on every partner (partners only)
    expires: dict[str, int]  # the partner's held root, bundle and policy: their expiries (partners only)
    revoked: dict[bytes, int]  # the domain's held revocation list: key digest -> revoked from
    revocation_version: int | None  # its version (None: the domain revoked nothing we hold)


def _reject_entry(exc: QhxError, what: str, doc: Any, p: Any) -> AuditEntry:
    return AuditEntry(
        "reject",
        f"{what}: {exc.message}",
        exc.kind,
        p.domain if p else None,
        p.type if p else None,
        p.version if p else None,
        doc.digest if doc is not None else None,
    )


# --- selection and summaries (shared by node and authority exports) ---------------------------


def summary_of(docs: Iterable[bytes], **about: Any) -> dict[str, Any]:
    """``{domain: {type: {"version", "digest"}}}`` of the newest of each held type."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for raw in docs:
        d = parse(raw)
        entry = out.setdefault(d.payload.domain, {})
        held = entry.get(d.type)
        if held is None or held["version"] < d.payload.version:
            entry[d.type] = {"version": d.payload.version, "digest": d.digest.hex()}
    return {"format": "qhx-edge-summary", **about, "domains": out}


MAX_SUMMARY_FILE = 16 << 20
MAX_IMPORT_ATTEMPTS = 20  # verifications of one pack while other imports keep changing the state


def load_summary(path: str | Path) -> dict[str, Any]:
    """A peer's ``doc summary`` JSON from a file, for ``--since`` (``malformed`` unless it is a JSON object)."""
    try:
        value = json.loads(read_capped(Path(path), MAX_SUMMARY_FILE, "summary file"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Malformed(f"{path}: not a JSON summary ({exc})") from exc
    if not isinstance(value, dict):
        raise Malformed(f"{path}: not a JSON summary")
    return value


def select(docs: list[bytes], *, domain: str | None = None, since: dict[str, Any] | None = None) -> list[bytes]:
    """The documents of ``domain`` (or all) that a peer with summary ``since`` lacks."""
    if since is not None and (not isinstance(since, dict) or since.get("format") != "qhx-edge-summary"):
        raise Malformed("--since needs a summary made by 'doc summary'")
    peer = since.get("domains", {}) if since else {}
    out = []
    for raw in docs:
        d = parse(raw)
        if domain is not None and d.payload.domain != domain:
            continue
        held = peer.get(d.payload.domain, {}).get(d.type) if isinstance(peer, dict) else None
        if isinstance(held, dict) and isinstance(held.get("version"), int) and held["version"] >= d.payload.version:
            continue
        out.append(raw)
    return out
