"""Staleness and issuance mode (docs/architecture.md "Freshness and modes").

Staleness of a domain = ``now - issued_at`` of its newest valid freshness
document.  With the policy's soft budget S1 and hard budget S2:

* staleness < S1: ``connected``, SVID TTL is the policy TTL;
* S1 <= staleness < S2: ``degraded``, TTL shrinks linearly towards the floor;
* staleness >= S2, no freshness, or a clock rollback: ``expired``, no new SVIDs;
* a held root, bundle or policy past its ``expires``: ``expired`` too, until
  newer material arrives (TUF 5.3.10: expiry holds after import, so a freeze
  attack that withholds new packs cannot keep the node on expired material).

The TTL is further capped so that no SVID outlives ``issued_at + S2`` nor the
held root, bundle or policy that vouches for it.
Pure functions: the caller passes ``now``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from qhx_edge.core.documents import Staleness

CONNECTED = "connected"
DEGRADED = "degraded"
EXPIRED = "expired"


@dataclass(frozen=True)
class Mode:
    mode: str
    staleness: int | None
    max_ttl: int
    expired: tuple[str, ...] = ()  # the held document types past their expiry, if any


def mode(
    now: int,
    fresh_issued_at: int | None,
    budget: Staleness | None,
    *,
    clock_ok: bool = True,
    expires: Mapping[str, int] | None = None,
) -> Mode:
    """The issuance mode of one domain at ``now``.

    ``expires``: the ``expires`` of the domain's held documents by type (root,
    bundle, policy); any of them past is ``expired``, whatever the freshness.
    """
    from qhx_edge.core.trust import DEFAULT_CLOCK_TOLERANCE

    ends = dict(expires or {})
    gone = tuple(sorted(t for t, end in ends.items() if now >= end))
    # A freshness time after now beyond the tolerance proves nothing about now (a clock that ran ahead
    # when it was stamped): as no freshness (see agreements.check_identity).
    ahead = fresh_issued_at is not None and fresh_issued_at > now + DEFAULT_CLOCK_TOLERANCE
    if fresh_issued_at is None or budget is None or not clock_ok or gone or ahead:
        return Mode(EXPIRED, None if fresh_issued_at is None else max(0, now - fresh_issued_at), 0, gone)
    staleness = max(0, now - fresh_issued_at)
    remaining = min([fresh_issued_at + budget.hard, *ends.values()]) - now
    if staleness >= budget.hard or remaining <= 0:
        return Mode(EXPIRED, staleness, 0)
    if staleness < budget.soft:
        return Mode(CONNECTED, staleness, min(budget.svid_ttl, remaining))
    span = budget.hard - budget.soft
    frac = (budget.hard - staleness) / span if span else 0.0
    ttl = budget.ttl_floor + int((budget.svid_ttl - budget.ttl_floor) * frac)
    return Mode(DEGRADED, staleness, max(0, min(ttl, remaining)))


def issuable_ttl(m: Mode, delegation_end: int | None, now: int) -> int:
    """The longest SVID a node may issue now: the mode's TTL, capped by its delegation (0 without one).

    The invariant of docs/architecture.md "Freshness and modes": no SVID
    outlives ``freshness.issued_at + S2`` (``m.max_ttl`` already holds that
    cap) nor the node's delegation.
    """
    if delegation_end is None:
        return 0
    return max(0, min(m.max_ttl, delegation_end - now))
