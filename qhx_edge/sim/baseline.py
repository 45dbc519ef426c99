"""The baseline every report shows beside qhx-edge: a strategy modelled on SPIRE federation
(docs/simulation.md; issue 12).

* Each node (a SPIRE agent) polls its own server -- its domain's authority node -- every
  ``refresh / 4`` (a quarter of the bundle's refresh hint), at a phase of its own; a poll reaches the
  server only while a **direct** link between the two is up, and carries what the server published
  since (the round trip and the transmission at the link's rate must fit in the window).
* No relaying: a node without a direct link to its server never hears anything; couriers carry
  nothing (SPIRE has no store-and-forward path).
* Federation: each server polls each partner's bundle endpoint every ``refresh / 4``, only over a
  direct link between the two servers; a partner's node then hears of it by polling its own server.
  (SPIRE federates bundles only: a revocation reaches a partner as the bundle that drops the key.)
* Issuance: an agent serves the SVIDs it holds until they expire and needs its server for new ones,
  so a node can issue while its last successful poll is less than one SVID lifetime (``svid_ttl``,
  SPIRE's default one hour) ago.
* A restart (a ``restart`` event) loses what the agent held in memory: its SVIDs and the federated
  bundles it had; it issues again, and holds partner bundles again, only after its next poll of its
  server.

Pure, like the engine: the same contacts give the same figures.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from qhx_edge.sim import contacts
from qhx_edge.sim.scenario import Scenario

REFRESH_HINT = 300_000  # ms: the bundle's refresh hint (what qhx-edge's bundles and SPIRE's default say)
SVID_TTL = 3_600_000  # ms: SPIRE's default X509-SVID lifetime


class Baseline:
    def __init__(self, scenario: Scenario, plan: Sequence[contacts.Contact]) -> None:
        self.sc = scenario
        self.poll = REFRESH_HINT // 4
        server = {d.name: d.authority for d in scenario.domains}
        self.plan = plan
        self.windows: dict[str, list[contacts.Contact]] = {n.name: self._between(n.name, server[n.domain])
                                                            for n in scenario.nodes}  # fmt: skip
        self.server = {n.name: server[n.domain] for n in scenario.nodes}
        self.domain_of = {n.name: n.domain for n in scenario.nodes}
        self.of_domain = server
        self.restarts = {n.name: sorted(e.at for e in scenario.events if e.kind == "restart" and e.node == n.name)
                         for n in scenario.nodes}  # fmt: skip

    def _restarted(self, node: str, t: int) -> int:
        """The node's last restart at or before ``t`` (-1: none)."""
        return max((r for r in self.restarts[node] if r <= t), default=-1)

    def _between(self, a: str, b: str) -> list[contacts.Contact]:
        return sorted((c for c in self.plan if c.kind == "link" and c.a == a and c.b == b), key=lambda c: c.start)

    def federated_arrival(self, node: str, domain: str, published: int, size: int) -> int | None:
        """When a node of a partner of ``domain`` first holds what ``domain``'s server published: its own
        server polls that server's bundle endpoint over a direct link, then the node polls its server."""
        ours, theirs = self.server[node], self.of_domain[domain]
        t = self._poll(f"{ours}>{theirs}", self._between(ours, theirs), published, size)
        if t is None or node == ours:
            return t
        return self.arrival(node, t, size)

    def _phase(self, node: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{self.sc.seed}:{node}".encode()).digest()[:4], "big") % self.poll

    def arrival(self, node: str, published: int, size: int) -> int | None:
        """When ``node`` first holds a document of ``size`` bytes its server published at ``published``."""
        if node == self.server[node]:
            return published
        return self._poll(node, self.windows[node], published, size)

    def _poll(self, who: str, windows: Sequence[contacts.Contact], published: int, size: int) -> int | None:
        """The first poll by ``who`` (at its own phase) over ``windows`` that brings back what was published."""
        phase = self._phase(who)
        for w in windows:
            if w.end < published:
                continue
            first = max(published, w.start)
            k = -(-(first - phase) // self.poll)  # the first poll at or after ``first``
            t = phase + k * self.poll
            done = t + 2 * w.latency + w.transmission(size) + w.transmission(64)
            if t < w.end and done <= w.end:
                return done
        return None

    def available(self, node: str, t: int) -> bool:
        """Whether the node can issue at ``t``: its last poll whose round trip completed inside a window is
        under an SVID lifetime old (every agent starts provisioned, as qhx-edge's nodes do: a poll at 0;
        the server's own node always can)."""
        if node == self.server[node]:
            return True
        phase = self._phase(node)
        restarted = self._restarted(node, t)
        last = 0 if restarted < 0 else -SVID_TTL  # provisioned at 0; a restart forgets it all
        for w in self.windows[node]:
            if w.start > t:
                break
            rtt = 2 * w.latency + w.transmission(64)
            end = min(w.end - rtt, t - rtt)  # the poll must be back by the window's end and by t
            k = (end - phase) // self.poll  # the last poll at or before ``end``
            p = phase + k * self.poll
            if p >= w.start and p >= restarted:
                last = max(last, p + rtt)
        return t - last < SVID_TTL


def figures(scenario: Scenario, plan: Sequence[contacts.Contact], publications: Sequence[Any],
            samples: Sequence[int]) -> dict[str, Any]:  # fmt: skip
    """The baseline's delivery and issuance figures for the same publications and sample times."""
    b = Baseline(scenario, plan)
    domain_of = {n.name: n.domain for n in scenario.nodes}
    delivered = expected = 0
    delays: list[int] = []
    per_node: dict[str, dict[str, int | None]] = {}
    for i, p in enumerate(publications):
        for node in p.audience:
            expected += 1
            if domain_of[node] == p.domain:
                got = b.arrival(node, p.at, p.size)
            else:
                got = b.federated_arrival(node, p.domain, p.at, p.size)
            if got is not None:
                delivered += 1
                delays.append(got - p.at)
            if p.kind == "revocation":
                per_node.setdefault(f"{p.domain}/revocation/{p.version}#{i}", {})[node] = got
    available = {n: round(sum(b.available(n, t) for t in samples) / max(1, len(samples)), 4) for n in sorted(domain_of)}
    delays.sort()
    return {
        "strategy": "SPIRE-like: each node polls its own server, and each server its partners' bundle endpoints, "
        "every refresh/4 over a direct link; no relay",
        "delivery_ratio": round(delivered / expected, 4) if expected else None,
        "latency_ms_median": delays[len(delays) // 2] if delays else None,
        "issuance_available": available,
        "revocations": per_node,
    }
