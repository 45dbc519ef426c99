"""Contact plans and the earliest-arrival bound (docs/simulation.md; issue 12).

A scenario's links and couriers become **contacts**: directed opportunities to move bytes from one
node to another, each with a start, an end, a rate and a latency.  A link that is up from ``s`` to
``e`` gives one contact each way; a courier going from stop (n1, t1) to stop (n2, t2) gives a contact
n1 -> n2 that picks up at t1 what n1 then holds (at any size) and delivers it at t2.

:func:`earliest_arrival` is the bound the simulation is judged against: the earliest time a document
of a given size, created at one node at a given time, could reach every other node over any
time-respecting path of contacts, counting each contact's latency and the document's transmission
time at its rate -- a Dijkstra over contacts with arrival time as the cost, as Contact Graph Routing
computes routes (CCSDS 734.3-B Schedule-Aware Bundle Routing; NASA ION).  No protocol can beat it on
the same contacts.

Pure: a seeded ``random.Random`` expands Markov links; same scenario, same plan.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from qhx_edge.sim.scenario import Scenario

INFINITE = math.inf


@dataclass(frozen=True, order=True)
class Contact:
    start: int  # ms
    end: int  # ms: a transmission must end by then (a courier's pickup: start == end)
    a: str  # from
    b: str  # to
    rate: float  # bytes per second (INFINITE for a courier)
    latency: int  # ms from the end of sending to arrival (a courier's travel time)
    kind: str = "link"  # link | courier
    detect: str = "carrier"  # how the nodes learn a link window opened (scenario.DETECT)

    def transmission(self, size: int) -> int:
        """Milliseconds to send ``size`` bytes at this contact's rate (rounded up)."""
        return 0 if self.rate == INFINITE else math.ceil(size * 1000 / self.rate)


def markov_windows(up: int, down: int, duration: int, rng: random.Random) -> list[tuple[int, int]]:
    """Up windows of a two-state link with exponentially distributed up and down times (means ``up`` and
    ``down`` ms), starting up with the stationary probability up / (up + down)."""
    out: list[tuple[int, int]] = []
    t = 0
    is_up = rng.random() < up / (up + down)
    while t < duration:
        length = max(1, round(rng.expovariate(1 / (up if is_up else down))))
        if is_up:
            out.append((t, min(duration, t + length)))
        t += length
        is_up = not is_up
    return out


def plan(scenario: Scenario) -> list[Contact]:
    """Every contact of ``scenario``, sorted (by start, end, nodes)."""
    out: list[Contact] = []
    for link in scenario.links:
        if link.markov is not None:
            rng = random.Random(f"{scenario.seed}:{link.a}:{link.b}")  # noqa: S311 -- a seeded model, not a secret
            windows: Sequence[tuple[int, int]] = markov_windows(*link.markov, scenario.duration, rng)
        else:
            windows = [(s, min(e, scenario.duration)) for s, e in link.windows if s < scenario.duration]
        for s, e in windows:
            out.append(Contact(s, e, link.a, link.b, link.bandwidth, link.latency, "link", link.detect))
            out.append(Contact(s, e, link.b, link.a, link.bandwidth, link.latency, "link", link.detect))
    for courier in scenario.couriers:
        for (n1, t1), (n2, t2) in zip(courier.stops, courier.stops[1:], strict=False):
            if n1 != n2 and t1 < scenario.duration:
                out.append(Contact(t1, t1, n1, n2, INFINITE, t2 - t1, "courier"))
    out.sort()
    return out


class ContactGraph:
    """Contacts indexed by their sending node, each node's sorted by end (for the first usable one)."""

    def __init__(self, contacts: Iterable[Contact]) -> None:
        self.by_node: dict[str, list[Contact]] = {}
        for c in contacts:
            self.by_node.setdefault(c.a, []).append(c)
        self.ends: dict[str, list[int]] = {}
        for node, cs in self.by_node.items():
            cs.sort(key=lambda c: (c.end, c.start, c.b))
            self.ends[node] = [c.end for c in cs]

    def earliest_arrival(self, source: str, t0: int, size: int) -> dict[str, int]:
        """The earliest time (ms) a document of ``size`` bytes held by ``source`` at ``t0`` can be held by
        each node it can reach (Dijkstra: arrival times only grow along a path)."""
        best = {source: t0}
        heap = [(t0, source)]
        while heap:
            t, u = heapq.heappop(heap)
            if t > best.get(u, math.inf):
                continue
            cs = self.by_node.get(u, ())
            # Only contacts that end at or after t can still carry it (a courier's pickup: at t or later).
            for c in cs[bisect.bisect_left(self.ends.get(u, []), t) :]:
                if c.kind == "courier":
                    if c.start < t:
                        continue
                    arrive = c.start + c.latency
                else:
                    depart = max(t, c.start)
                    done = depart + c.transmission(size)
                    if done > c.end:
                        continue
                    arrive = done + c.latency
                if arrive < best.get(c.b, math.inf):
                    best[c.b] = arrive
                    heapq.heappush(heap, (arrive, c.b))
        return best


def earliest_arrival(contacts: Iterable[Contact], source: str, t0: int, size: int) -> dict[str, int]:
    """:meth:`ContactGraph.earliest_arrival` over ``contacts``."""
    return ContactGraph(contacts).earliest_arrival(source, t0, size)
