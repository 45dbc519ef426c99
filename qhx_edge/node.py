"""A field node: the I/O around the pure trust core.

Each operation reads the clock once, loads the trust state from the store,
asks :mod:`qhx_edge.verify` for verdicts, and then either applies the whole
outcome in one transaction or applies nothing.  Either way the audit log
records what happened (the rejection in its own transaction after the
rollback, so the trust state stays unchanged).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qhx_edge import freshness, pack, verify
from qhx_edge.authority import fingerprint
from qhx_edge.documents import Freshness, Policy
from qhx_edge.errors import AlreadyInitialised, AnchorMismatch, ClockRollback, Rejected
from qhx_edge.store import STORE_FILE, AuditEntry, Store

DEFAULT_CLOCK_TOLERANCE = verify.DEFAULT_CLOCK_TOLERANCE


def init(
    home: Path, anchor: bytes, now: int, *, expect: str | None = None, tolerance: int = DEFAULT_CLOCK_TOLERANCE
) -> dict[str, Any]:
    """Create a node home anchored to ``anchor`` (a root document obtained out of band).

    A node never trusts on first use: the anchor must verify under its own
    root threshold, and when ``expect`` is given its fingerprint must match.
    """
    home = Path(home)
    if (home / STORE_FILE).exists():
        raise AlreadyInitialised(f"{home} already holds a node store")
    fp = fingerprint(anchor)
    if expect is not None and expect.lower() != fp:
        raise AnchorMismatch(f"anchor fingerprint {fp} does not match the expected {expect}")
    root = verify.verify_anchor(anchor, now, tolerance)
    node_id = secrets.token_hex(8)
    store = Store.create(home)
    try:
        store.initialise(node_id, root, fp, tolerance, now)
    finally:
        store.close()
    return {"node_id": node_id, "domain": root.payload.domain, "root_version": root.payload.version, "fingerprint": fp}


@dataclass
class ImportResult:
    outcome: verify.Outcome
    applied: bool

    def to_json(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for v in self.outcome.verdicts:
            key = v.status if v.error is None else f"rejected:{v.error.kind}"
            counts[key] = counts.get(key, 0) + 1
        return {
            "applied": self.applied,
            "changed": self.applied and self.outcome.changed,
            "counts": counts,
            "documents": [v.to_json() for v in self.outcome.verdicts],
        }


class Node:
    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.store = Store.open(self.home)
        self.info = self.store.node_info()

    def close(self) -> None:
        self.store.close()

    @property
    def tolerance(self) -> int:
        return int(self.info["clock_tolerance"])

    def _reject(self, now: int, exc: Rejected, what: str, doc: Any = None) -> None:
        p = doc.payload if doc is not None else None
        self.store.audit(
            now,
            [
                AuditEntry(
                    "reject",
                    f"{what}: {exc.message}",
                    exc.kind,
                    p.domain if p else None,
                    p.type if p else None,
                    p.version if p else None,
                    doc.digest if doc is not None else None,
                )
            ],
        )

    def import_pack(self, data: bytes, now: int, *, source: str = "pack") -> ImportResult:
        """Verify and apply a pack atomically: all of it or none of it."""
        try:
            verify.check_clock(now, self.store.clock_high_water(), self.tolerance)
            docs = pack.decode(data)
            outcome = verify.verify_batch(docs, self.store.trust_state(), now, verify.Limits(self.tolerance))
        except Rejected as exc:
            self._reject(now, exc, source)
            raise
        first = outcome.first_error()
        if first is not None:
            bad = next(v for v in outcome.rejected if v.error is first)
            self._reject(now, first, f"{source} (document {bad.index}; nothing applied)", bad.doc)
            raise first
        if outcome.changed:
            self.store.apply(outcome, now, source)
            return ImportResult(outcome, True)
        self.store.audit(now, [AuditEntry("noop", f"{source}: every document already held")])
        return ImportResult(outcome, False)

    def export_documents(self, *, history: bool = False) -> list[bytes]:
        return self.store.held_documents(history=history)

    def status(self, now: int) -> dict[str, Any]:
        hw = self.store.clock_high_water()
        try:
            verify.check_clock(now, hw, self.tolerance)
            clock_ok = True
        except ClockRollback:
            clock_ok = False
        out: dict[str, Any] = {
            "node_id": self.info["node_id"],
            "home_domain": self.info["home_domain"],
            "clock": "ok" if clock_ok else "rollback",
            "now": now,
            "clock_high_water": hw,
            "clock_tolerance": self.tolerance,
            "domains": {},
        }
        for d in self.store.domains():
            domain = d["domain"]
            marks = self.store.marks(domain)
            fresh = self.store.current(domain, "freshness")
            policy = self.store.current(domain, "policy")
            f = fresh.payload if fresh is not None and isinstance(fresh.payload, Freshness) else None
            pol = policy.payload if policy is not None and isinstance(policy.payload, Policy) else None
            m = freshness.mode(now, f.issued_at if f else None, pol.staleness if pol else None, clock_ok=clock_ok)
            out["domains"][domain] = {
                "relation": d["relation"],
                "anchor_fingerprint": d["anchor_fingerprint"],
                "versions": {
                    t: marks[t].version if t in marks else None for t in ("root", "bundle", "policy", "freshness")
                },
                "freshness_issued_at": f.issued_at if f else None,
                "freshness_expires": f.expires if f else None,
                "staleness": m.staleness,
                "mode": m.mode,
                "max_ttl": m.max_ttl,
                "budget": {"soft": pol.staleness.soft, "hard": pol.staleness.hard} if pol else None,
            }
        return out
