"""The deterministic discrete-event engine (docs/simulation.md; issue 12).

A virtual clock in milliseconds; an event queue ordered by (time, sequence number), so two runs of one
scenario take the same steps.  What moves and what is believed is the product's own:

* each domain's authority (:class:`qhx_edge.sim.state.Authority`) signs real documents: a freshness
  epoch every ``freshness_every`` outside its outages, and the scenario's events (a revocation, a CA
  rotation, a policy), published at its own node;
* a link window is a series of sync contacts with the real sans-IO protocol (``core.sync``): every
  frame crosses the link at its rate and latency, one direction at a time in order; a window that
  closes cuts what is in flight (the receiver keeps what arrived, as ``sync_session`` does); a new
  contact starts when a contact ends with either side holding something the other lacks, or the
  moment either side learns something new while the link is up;
* a courier picks up at one stop everything that node then holds and delivers it at the next;
* what arrives goes through the real trust core at the receiving node's own clock (its skew), and is
  applied as the node store applies it (:class:`qhx_edge.sim.state.NodeState`);
* issuance follows the real staleness rules (``core.staleness``), sampled every ``sample``.

Every publication's arrival at every node of its domain is recorded beside the earliest-arrival bound
(:mod:`qhx_edge.sim.contacts`) for a document of its size, published where and when it was.
"""

from __future__ import annotations

import heapq
import itertools
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qhx_edge.core import documents as D  # noqa: N812 -- as the rest of the package names it
from qhx_edge.core import sync, trust
from qhx_edge.core.errors import QhxError
from qhx_edge.core.staleness import EXPIRED
from qhx_edge.sim import baseline, contacts
from qhx_edge.sim.scenario import Scenario
from qhx_edge.sim.state import Authority, MemoChecker, NodeState, agreement

EPOCH = 1_800_000_000  # the simulated start, Unix seconds (2027-01-15): documents carry real-looking times
# serve's dialler (homes/sync_link.py: FIRST_RETRY, MAX_RETRY), without its jitter (the longest waits):
# on a link whose nodes cannot see it come up (``detect = "retry"``) a window is found by the next attempt.
FIRST_RETRY_MS = 5_000
MAX_RETRY_MS = 300_000
PIECE = 1024  # bytes: what a link carries as one unit of timing (a window that closes cuts between pieces)
# A live link as serve runs it (homes/sync_session.py): the refusals a later document may cure, how many
# documents wait and how often each is tried again; the link's renewal, and how long after its contact a
# change of the dialler's network (a link of its going up or down) leaves it alone.
RETRY = frozenset({"mix-and-match", "unknown-domain", "anchor-mismatch", "no-agreement"})
MAX_PENDING = 16
MAX_RETRIES = 4
LIVE_LIFETIME_MS = 600_000
LIVE_SETTLE_MS = 5_000
Key = tuple[str, str, int, int, float, int]  # a link window: its ends, start, end, rate, latency


@dataclass
class Publication:
    """What one authority action publishes at one instant (a revocation with the bundle and freshness that
    name it; a freshness epoch alone): one unit, as ``authority revoke-node`` publishes it and a node's
    trust core accepts it (a freshness is refused without the versions it names).  It reaches a node when
    the node holds every document of it; its bound is that of all its bytes."""

    domain: str
    kind: str  # the type of its first (most urgent) document
    versions: dict[str, int]  # type -> version
    at: int  # ms
    node: str
    size: int
    arrivals: dict[str, int] = field(default_factory=dict)  # node -> ms
    bound: dict[str, int] = field(default_factory=dict)
    keys: list[bytes] = field(default_factory=list)  # what a revocation revokes
    audience: tuple[str, ...] = ()  # the nodes it is for: its domain's, and partners' it is released to

    @property
    def version(self) -> int:
        return self.versions[self.kind]

    def held_by(self, inventory: dict[tuple[str, str], int]) -> bool:
        return all(inventory.get((self.domain, t), 0) >= v for t, v in self.versions.items())


@dataclass
class _Contact:
    """One sync connection over one link window: both ends' protocol state.  Both ends speak ``live``,
    so after its contact the connection stays open until the window closes, and each end pushes what it
    learns (core/sync.py, "live links")."""

    window: contacts.Contact
    ends: dict[str, sync.SyncConnection]
    pending: dict[str, list[tuple[bytes, int]]]  # arrived, refused only for lack of a document to come; tries
    busy: dict[str, int]  # sender -> ms its direction is busy until
    alive: bool = True
    arrived: dict[str, list[bytes]] = field(default_factory=dict)  # whole, not yet imported (a transfer under way)
    settled_at: int | None = None  # ms: when its contact finished (the live time began)
    caught_up: set[str] = field(default_factory=set)  # ends that pushed what the exchange showed the peer lacks


class Engine:
    def __init__(self, scenario: Scenario, progress: Callable[[int, int], None] | None = None) -> None:
        self.sc = scenario
        self.now = 0
        self.queue: list[tuple[int, int, int, str, Any]] = []
        self.seq = itertools.count()
        self.checker = MemoChecker()
        self.progress = progress
        self.plan = contacts.plan(scenario)
        self.graph = contacts.ContactGraph(self.plan)
        t0 = EPOCH
        self.authorities = {
            d.name: Authority(d.name, scenario.seed, t0, soft=d.soft // 1000, hard=d.hard // 1000, lifetime=30 * 86400)
            for d in scenario.domains
        }
        self.domain_of = {n.name: n.domain for n in scenario.nodes}
        self.skew = {n.name: n.clock_skew for n in scenario.nodes}
        self.nodes: dict[str, NodeState] = {}
        for n in scenario.nodes:
            state = NodeState(n.name, n.domain)
            auth = self.authorities[n.domain]
            state.anchor(auth.anchor(), t0)
            state.import_documents(auth.current(), t0, self.checker)
            self.nodes[n.name] = state
        self.publications: list[Publication] = []
        self.samples: list[dict[str, Any]] = []
        self.contacts_run = 0
        self.bytes_moved = 0
        self.document_bytes = 0
        self.events_run = 0
        self.invariant_failures: list[str] = []
        self.forged: set[bytes] = set()
        self._active: dict[Key, _Contact] = {}
        self._memory: dict[tuple[str, str], dict[tuple[str, str], int]] = {}  # (node, peer) -> peer's inventory
        self._dialler: dict[tuple[str, str], tuple[int, int]] = {}  # retry links: (next attempt, failures so far)
        self._pair_version: dict[frozenset[str], int] = {}  # agreement versions count per pair of domains
        self._partners: dict[str, dict[str, tuple[str, ...]]] = {}  # domain -> partner -> what it releases to it
        self._graphs: dict[str, contacts.ContactGraph] = {}  # per publishing domain: the contacts that may carry it
        self._windows_of: dict[str, set[Key]] = {}  # node -> its link windows now open (see _learned)
        self._schedule()

    # --- time -----------------------------------------------------------------------------------

    def clock(self, node: str) -> int:
        """The node's own clock, Unix seconds (its skew included)."""
        return EPOCH + (self.now + self.skew[node]) // 1000

    # At one instant: what arrives (deliveries, frames) before what leaves (a courier's pickup), so a
    # courier chain carries on what its previous leg brought; then everything else in the order pushed.
    _ORDER: ClassVar[dict[str, int]] = {"delivery": 0, "frames": 0, "pickup": 2}

    def push(self, at: int, kind: str, payload: Any) -> None:
        if at <= self.sc.duration:
            heapq.heappush(self.queue, (at, self._ORDER.get(kind, 1), next(self.seq), kind, payload))

    def _schedule(self) -> None:
        for d in self.sc.domains:
            t = d.freshness_every
            while t <= self.sc.duration:
                if not any(s <= t < e for s, e in d.outages):
                    self.push(t, "freshness", d.name)
                t += d.freshness_every
        for g in self.sc.agreements:
            self.push(g.at, "agreement", g)
        for e in self.sc.events:
            self.push(e.at, "event", e)
        for a in self.sc.adversaries:
            if a.kind != "withhold-revocations":
                self.push(a.at, "adversary", a)
        seen: set[tuple[int, int, str, str, float, int]] = set()
        for c in self.plan:
            if c.kind == "courier":
                self.push(c.start, "pickup", c)
            else:
                lo, hi = sorted((c.a, c.b))
                key = (c.start, c.end, lo, hi, c.rate, c.latency)
                if key not in seen:  # one contact series per window, both directions
                    seen.add(key)
                    self.push(c.start, "window", c)
        t = 0
        while t <= self.sc.duration:
            self.push(t, "sample", None)
            t += self.sc.sample

    # --- the run --------------------------------------------------------------------------------

    def run(self) -> Engine:
        total = self.sc.duration
        while self.queue:
            at, _, _, kind, payload = heapq.heappop(self.queue)
            self.now = at
            self.events_run += 1
            getattr(self, f"_on_{kind}")(payload)
            if self.progress is not None and self.events_run % 256 == 0:
                self.progress(at, total)
        if self.progress is not None:
            self.progress(total, total)
        return self

    def _learned(self, node: str, raw: list[bytes]) -> trust.Outcome | None:
        """``node`` imports ``raw`` at its own clock; arrivals are recorded, links that are up sync again."""
        before = self.nodes[node].inventory()
        try:
            outcome = self.nodes[node].import_documents(raw, self.clock(node), self.checker)
        except QhxError as exc:  # a whole batch refused (clock-rollback): counted, nothing applied
            rejected = self.nodes[node].rejected
            rejected[exc.kind] = rejected.get(exc.kind, 0) + 1
            return None
        after = self.nodes[node].inventory()
        # Invariants: a mark never goes back but by a role rotation's reset; nothing forged is held.
        for (domain, kind), v in before.items():
            if after.get((domain, kind), 0) < v and (domain, kind) not in outcome.resets:
                self._broken(f"{node} accepted a rollback of {domain}/{kind} from v{v}")
        for doc in outcome.accepted:
            if doc.digest in self.forged:
                self._broken(f"{node} accepted a forged {doc.describe()}")
        if after == before:
            return outcome
        for p in self.publications:
            if node not in p.arrivals and p.held_by(after):
                p.arrivals[node] = self.now
        for key in sorted(self._windows_of.get(node, ())):  # sorted: the same order on every run
            c = self._active[key]
            if not c.alive:
                self._start_contact(c.window, key)
            elif c.ends[node].peer is not None and c.ends[node].live:
                self._push(c, key, node)
        return outcome

    def _publish(self, domain: str, docs: list[bytes]) -> None:
        home = self._authority_node(domain)
        payloads = [D.parse(raw).payload for raw in docs]
        size = sum(map(len, docs))
        pub = Publication(domain, payloads[0].type, {p.type: p.version for p in payloads}, self.now, home, size)
        for p in payloads:
            if isinstance(p, D.Revocation):
                pub.keys = [r.key for r in p.revoked]
        pub.audience = self._audience(domain, set(pub.versions))
        pub.bound = self._graph(domain).earliest_arrival(home, self.now, size)
        self.publications.append(pub)
        self.document_bytes += size
        self._learned(home, docs)

    def _audience(self, domain: str, types: set[str]) -> tuple[str, ...]:
        """The nodes a publication of ``domain`` is for: its domain's (but the authority's own), and those of
        every partner that ``domain`` releases all its types to under an agreement in force now."""
        open_to = {p for p, release in self._partners.get(domain, {}).items() if types <= set(release)}
        return tuple(n for n, d in sorted(self.domain_of.items())
                     if (d == domain or d in open_to) and n != self._authority_node(domain))  # fmt: skip

    def _graph(self, domain: str) -> contacts.ContactGraph:
        """The contacts that may carry a document of ``domain`` (``sync_session.offer``): between its own nodes;
        from its node to a partner's; between two nodes of one partner (a relay forwards what it holds).
        A node never passes a domain's documents to a third domain, nor back to the domain itself."""
        if not self.sc.agreements:
            return self.graph
        if domain not in self._graphs:
            partners = {x.b if x.a == domain else x.a for x in self.sc.agreements if domain in (x.a, x.b)}

            def carries(c: contacts.Contact) -> bool:
                da, db = self.domain_of[c.a], self.domain_of[c.b]
                return (da == domain and (db == domain or db in partners)) or (da == db and da in partners)

            self._graphs[domain] = contacts.ContactGraph([c for c in self.plan if carries(c)])
        return self._graphs[domain]

    def _on_agreement(self, g: Any) -> None:
        """Both authorities sign an agreement (the proposer, then the partner countersigns) and publish a
        freshness epoch naming it, each at its own node: ``federation propose`` / ``accept``."""
        pair = frozenset((g.a, g.b))
        version = self._pair_version[pair] = self._pair_version.get(pair, 0) + 1
        a, b = self.authorities[g.a], self.authorities[g.b]
        raw = agreement(a, b, version, self.clock(self._authority_node(g.a)), release=g.release,
                        max_staleness=g.max_staleness // 1000)  # fmt: skip
        for auth, partner in ((a, g.b), (b, g.a)):
            auth.agreements[partner] = version
            self._partners.setdefault(auth.domain, {})[partner] = g.release
            fresh = auth.publish_freshness(self.clock(self._authority_node(auth.domain)))
            theirs = [r for r in self.authorities[partner].published if D.parse(r).type == "root"]
            self._learned(self._authority_node(auth.domain), [*theirs, raw, fresh])  # accept takes their root

    def _terminate(self, domain: str, partner: str) -> list[bytes]:
        """``domain`` ends its agreement with ``partner``: a terminated version signed by its side alone, and
        a freshness that no longer names it."""
        pair = frozenset((domain, partner))
        version = self._pair_version[pair] = self._pair_version[pair] + 1
        auth = self.authorities[domain]
        now = self.clock(self._authority_node(domain))
        raw = agreement(auth, self.authorities[partner], version, now, release=(), max_staleness=1,
                        status="terminated")  # fmt: skip
        auth.agreements.pop(partner, None)
        for x, y in ((domain, partner), (partner, domain)):
            self._partners.get(x, {}).pop(y, None)
        return [raw, auth.publish_freshness(now)]

    def _restart(self, node: str) -> None:
        """The node's process restarts: its live links drop (what arrived whole is kept, as a cut keeps it)
        and what it remembered of its peers is gone; its store, and so its trust, stays.  Its diallers
        start again at once: the links that are still up are contacted anew."""
        for key in sorted(self._windows_of.get(node, ())):
            c = self._active[key]
            c.alive = False
            self._start_contact(c.window, key)
        for pair in [p for p in self._memory if node in p]:
            del self._memory[pair]

    def _authority_node(self, domain: str) -> str:
        return next(d.authority for d in self.sc.domains if d.name == domain)

    def _on_freshness(self, domain: str) -> None:
        auth = self.authorities[domain]
        self._publish(domain, [auth.publish_freshness(self.clock(self._authority_node(domain)))])

    def _on_event(self, e: Any) -> None:
        auth = self.authorities[e.domain]
        now = self.clock(self._authority_node(e.domain))
        if e.kind == "revoke-node":
            docs = auth.revoke(e.node, now)
        elif e.kind == "rotate-ca":
            docs = auth.rotate_ca(now)
        elif e.kind == "restart":
            self._restart(e.node)
            return
        elif e.kind == "terminate-agreement":
            docs = self._terminate(e.domain, e.partner)
            self._learned(self._authority_node(e.domain), docs)
            return
        else:  # publish-policy
            docs = [auth.publish_policy(now), auth.publish_freshness(now)]
        self._publish(e.domain, docs)

    def _on_pickup(self, c: contacts.Contact) -> None:
        docs = self.nodes[c.a].pack(self.domain_of[c.b])  # what `pack export --for` the next stop writes
        if self._withholding(c.a):
            docs = [raw for raw in docs if D.parse(raw).type != "revocation"]
        self.bytes_moved += sum(map(len, docs))
        self.push(c.start + c.latency, "delivery", (c.b, docs))

    def _on_delivery(self, payload: tuple[str, list[bytes]]) -> None:
        node, docs = payload
        self._learned(node, docs)

    # --- links ------------------------------------------------------------------------------------

    def _on_window(self, c: contacts.Contact) -> None:
        if c.detect == "retry":  # the window is found by the dialler's next attempt, if one falls in it
            at = self._next_attempt((c.a, c.b), c.start)
            if at >= c.end:
                return
            if at > self.now:
                self.push(at, "dial", c)
                return
        self._on_dial(c)

    def _next_attempt(self, pair: tuple[str, str], at: int) -> int:
        """The dialler's first attempt at or after ``at``: every failed one waits 5 s, doubling, at most 300 s."""
        t, failures = self._dialler.get(pair, (0, 0))
        while t < at:
            failures += 1
            t += min(MAX_RETRY_MS, FIRST_RETRY_MS * 2 ** (failures - 1))
        self._dialler[pair] = (t, failures)
        return t

    def _on_dial(self, c: contacts.Contact) -> None:
        key = (c.a, c.b, c.start, c.end, c.rate, c.latency)
        if c.detect == "carrier":  # the link coming up is a network change at both ends
            for n in (c.a, c.b):
                self._network_changed(n)
        self._start_contact(c, key)
        self.push(c.end, "window_end", key)

    def _on_window_end(self, key: Key) -> None:
        contact = self._active.pop(key, None)
        if contact is None:
            return
        for n in contact.ends:
            self._windows_of[n].discard(key)
        contact.alive = False
        self._remember(contact)
        for node in list(contact.arrived):  # whole documents that arrived before the cut are kept
            if contact.arrived[node]:
                self._arrived(contact, node)
        if contact.window.detect == "carrier":
            for n in contact.ends:
                self._network_changed(n)
        if contact.window.detect == "retry":  # the live link's end is redialled at once, then backs off
            self._dialler[(contact.window.a, contact.window.b)] = (self.now, 0)

    def _remember(self, c: _Contact) -> None:
        """What each end believes its peer holds, for the next contact over this pair (``PeerMemory``)."""
        a, b = c.window.a, c.window.b
        for x, y in ((a, b), (b, a)):
            held = c.ends[x].peer_inventory()
            if held is not None and c.ends[x].peer is not None:
                self._memory[(x, y)] = held

    def _start_contact(self, window: contacts.Contact, key: Key) -> None:
        if self.now >= window.end:
            return
        a, b = window.a, window.b
        ends = {}
        for x, y in ((a, b), (b, a)):
            held = self._memory.get((x, y))
            ends[x] = sync.SyncConnection(x, self.nodes[x].offered(self.domain_of[y]), caps=[sync.LIVE],
                                          peer_live=held is not None, peer_inventory=held)  # fmt: skip
        c = _Contact(window, ends, {a: [], b: []}, {a: self.now, b: self.now})
        self._active[key] = c
        for n in (a, b):
            self._windows_of.setdefault(n, set()).add(key)
        self.contacts_run += 1
        for n in (a, b):
            if self._memory.get((n, b if n == a else a)) is not None:
                self._push(c, key, n, send=False)  # news from the first flight, behind hello and summary
            self._send(c, key, n)

    def _push(self, c: _Contact, key: Key, node: str, *, send: bool = True) -> None:
        """Push what ``node`` believes its peer lacks (core/sync.py, live links)."""
        conn, state = c.ends[node], self.nodes[node]
        peer = c.window.b if node == c.window.a else c.window.a
        lacking = conn.lacking(state.offered(self.domain_of[peer]))
        out = [sync.Outgoing(d, D.parse(raw).type, D.parse(raw).payload.version, raw, t) for d, t, since in lacking
               for raw in state.newer(d, t, since)
               if not (t == "revocation" and self._withholding(node))]  # fmt: skip
        if out:
            conn.push(out)
            if send:
                self._send(c, key, node)

    def _send(self, c: _Contact, key: Key, sender: str) -> None:
        """Put what the sender's protocol state has to send on the link, piece by piece: each piece
        arrives a latency after its last byte left; a piece the window's end cuts, and all after it, are
        lost (the receiver keeps the whole documents that arrived before)."""
        data = c.ends[sender].data_to_send()
        receiver = c.window.b if sender == c.window.a else c.window.a
        for i in range(0, len(data), PIECE):
            piece = data[i : i + PIECE]
            done = max(self.now, c.busy[sender]) + c.window.transmission(len(piece))
            c.busy[sender] = done
            if done > c.window.end:  # the window closes under it: nothing more crosses
                return
            self.bytes_moved += len(piece)
            self.push(done + c.window.latency, "frames", (key, id(c), receiver, piece))

    def _on_frames(self, payload: tuple[Key, int, str, bytes]) -> None:
        key, ident, receiver, data = payload
        c = self._active.get(key)
        if c is None or id(c) != ident or not c.alive:
            return
        conn = c.ends[receiver]
        node = self.nodes[receiver]
        try:
            conn.receive_data(data)
            while True:
                ev = conn.next_event()
                if ev is sync.NEED_DATA:
                    break
                if isinstance(ev, sync.PeerInventory):
                    trusted = {d for d, _ in node.marks}
                    conn.want(sync.wants(node.inventory(), ev.newer, trusted))
                elif isinstance(ev, sync.PeerWants):
                    out = [sync.Outgoing(d, D.parse(raw).type, D.parse(raw).payload.version, raw, t)
                           for d, t, since in ev.items for raw in node.newer(d, t, since)
                           if not (t == "revocation" and self._withholding(receiver))]  # fmt: skip
                    conn.send_documents(out)
                elif isinstance(ev, sync.DocumentReceived):
                    c.arrived.setdefault(receiver, []).append(ev.raw)
        except QhxError:
            c.alive = False
            self._remember(c)
            return
        if c.arrived.get(receiver) and conn.live and conn.quiescent:  # as serve imports: nothing half received
            self._arrived(c, receiver)
        if conn.finished and c.settled_at is None and all(e.finished for e in c.ends.values()):
            c.settled_at = self.now
            if self.now + LIVE_LIFETIME_MS < c.window.end:
                self.push(self.now + LIVE_LIFETIME_MS, "renew", (key, id(c)))
        if conn.finished and conn.live and receiver not in c.caught_up:
            c.caught_up.add(receiver)  # push what the exchange showed the peer lacks and could not want
            self._push(c, key, receiver, send=False)
        self._send(c, key, receiver)

    def _arrived(self, c: _Contact, node: str) -> None:
        """Import what is whole, with what arrived before and was refused only for lack of a document still to
        come (a freshness naming a bundle on its way), each of those tried at most MAX_RETRIES times more."""
        new = c.arrived.pop(node)
        batch = [raw for raw, _n in c.pending[node]] + new
        tries = [n for _raw, n in c.pending[node]] + [0] * len(new)
        outcome = self._learned(node, batch)
        if outcome is None:
            c.pending[node] = []
            return
        c.pending[node] = [(batch[v.index], tries[v.index] + 1) for v in outcome.rejected
                           if v.error is not None and v.error.kind in RETRY
                           and tries[v.index] < MAX_RETRIES][:MAX_PENDING]  # fmt: skip

    def _on_renew(self, payload: tuple[Key, int]) -> None:
        """A live link's renewal: it ends, and its dialler dials again at once (a new contact)."""
        key, ident = payload
        c = self._active.get(key)
        if c is not None and id(c) == ident and c.alive:
            self._redial(c, key)

    def _redial(self, c: _Contact, key: Key) -> None:
        c.alive = False
        self._remember(c)
        for node, docs in list(c.arrived.items()):  # whole documents are kept, as a cut keeps them
            if docs:
                self._arrived(c, node)
        self._start_contact(c.window, key)

    def _network_changed(self, node: str) -> None:
        """A link of ``node`` went up or down: its live links that it dialled (the lower-named end dials),
        settled for LIVE_SETTLE, end and are dialled again at once."""
        for key in sorted(self._windows_of.get(node, ())):
            c = self._active[key]
            dialler = min(c.window.a, c.window.b)
            if (c.alive and dialler == node and c.settled_at is not None
                    and self.now - c.settled_at >= LIVE_SETTLE_MS):  # fmt: skip
                self._redial(c, key)

    # --- sampling and the report -----------------------------------------------------------------------

    def _on_sample(self, _: Any) -> None:
        row: dict[str, Any] = {"t": self.now, "nodes": {}}
        for name, state in self.nodes.items():
            budget = state.budget()  # the held policy's, as the node's issuer reads it
            now = self.clock(name)
            m = state.mode(now, budget)
            row["nodes"][name] = {"mode": m.mode, "staleness": m.staleness, "ttl": m.max_ttl}
            fresh = state.current(state.home, "freshness")
            # Invariant: no SVID could outlive its bound, the held freshness epoch's issue time plus the hard
            # budget of the authority's policy (computed here apart from core.staleness, which the mode uses).
            bound = self.authorities[state.home].staleness.hard
            if m.mode != EXPIRED and (fresh is None or now + m.max_ttl > fresh.payload.issued_at + bound):
                self._broken(f"{name} would issue an SVID past its bound at {now}")
            # Invariant: once a revocation reached the node, the revoked identity is refused there.
            for p in self.publications:
                if p.kind == "revocation" and name in p.arrivals:
                    held = state.current(p.domain, "revocation")
                    keys = held.payload.index() if held is not None else {}
                    if not all(k in keys for k in p.keys):
                        self._broken(f"{name} holds revocation v{p.version} but would accept what it revokes")
        self.samples.append(row)

    def _broken(self, what: str) -> None:
        if len(self.invariant_failures) < 100:
            self.invariant_failures.append(f"{self.now} ms: {what}")

    # --- adversaries ------------------------------------------------------------------------------

    def _on_adversary(self, a: Any) -> None:
        """``replay``: the node is handed its domain's first freshness again (a pack replayed);
        ``forge``: a bundle and a freshness signed by a key no role holds; ``withhold-revocations`` is a
        relay that drops revocations it carries (see :meth:`_on_pickup` and the sync answer)."""
        node = self.nodes[a.node]
        auth = self.authorities[node.home]
        if a.kind == "replay":
            first = next(raw for raw in auth.published if D.parse(raw).type == "freshness")
            self._learned(a.node, [first])
        elif a.kind == "forge":
            docs = auth.forged(self.clock(a.node))
            self.forged.update(D.parse(raw).digest for raw in docs)
            self._learned(a.node, docs)

    def _withholding(self, node: str) -> bool:
        return any(a.kind == "withhold-revocations" and a.node == node and a.at <= self.now
                   and (a.until is None or self.now < a.until) for a in self.sc.adversaries)  # fmt: skip

    def report(self) -> dict[str, Any]:
        """The run's figures: per publication kind, delivery and delay against the bound; per node,
        availability of issuance; the DTN metrics (delivery ratio, latency mean and median, overhead)."""
        delays, ratios, delivered, expected, reachable = [], [], 0, 0, 0
        per_kind: dict[str, dict[str, Any]] = {}
        for p in self.publications:
            for node in p.audience:
                expected += 1
                got = p.arrivals.get(node)
                bound = p.bound.get(node)
                reachable += bound is not None and bound <= self.sc.duration
                k = per_kind.setdefault(p.kind, {"published": 0, "deliveries": 0, "expected": 0, "ratios": []})
                k["expected"] += 1
                if got is None:
                    continue
                delivered += 1
                k["deliveries"] += 1
                delays.append(got - p.at)
                if bound is not None and bound > p.at:
                    r = (got - p.at) / (bound - p.at)
                    ratios.append(r)
                    k["ratios"].append(r)
        for p in self.publications:
            per_kind.setdefault(p.kind, {"published": 0, "deliveries": 0, "expected": 0, "ratios": []})
            per_kind[p.kind]["published"] += 1
        available = {}
        for name in self.nodes:
            modes = [s["nodes"][name]["mode"] for s in self.samples]
            available[name] = round(sum(m != EXPIRED for m in modes) / max(1, len(modes)), 4)
        kinds = {}
        for kind, k in sorted(per_kind.items()):
            rs: list[float] = sorted(k.pop("ratios"))
            kinds[kind] = {**k, "over_bound_median": _q(rs, 0.5), "over_bound_p99": _q(rs, 0.99)}
        base = baseline.figures(self.sc, self.plan, self.publications, [s["t"] for s in self.samples])
        return {
            "scenario": self.sc.name,
            "seed": self.sc.seed,
            "duration_ms": self.sc.duration,
            "nodes": len(self.nodes),
            "contacts": len(self.plan),
            "events": self.events_run,
            "sync_contacts": self.contacts_run,
            "delivery_ratio": round(delivered / expected, 4) if expected else None,
            # of the deliveries any protocol could make on these contacts (the bound reaches the node)
            "delivery_ratio_reachable": round(delivered / reachable, 4) if reachable else None,
            "latency_ms": {
                "mean": round(statistics.fmean(delays), 1) if delays else None,
                "median": _q(sorted(delays), 0.5),
            },
            "overhead_ratio": round(self.bytes_moved / self.document_bytes, 4) if self.document_bytes else None,
            "publications": kinds,
            "over_bound": {"median": _q(sorted(ratios), 0.5), "p99": _q(sorted(ratios), 0.99)},
            "issuance_available": available,
            "requests": self._requests(available, base),
            "rejected": {n: dict(sorted(s.rejected.items())) for n, s in self.nodes.items() if s.rejected},
            "signatures": {"verified": self.checker.verified, "remembered": self.checker.remembered},
            "revocations": {
                f"{p.domain}/revocation/{p.version}#{i}": {
                    "published_ms": p.at,
                    "arrivals_ms": {n: p.arrivals.get(n) for n in p.audience},
                    "bound_ms": {n: p.bound.get(n) for n in p.audience},
                }
                for i, p in enumerate(self.publications)
                if p.kind == "revocation"
            },
            "invariants": {"held": not self.invariant_failures, "broken": list(self.invariant_failures)},
            "baseline": base,
        }

    def _requests(self, available: dict[str, float], base: dict[str, Any]) -> dict[str, Any]:
        """Per node with a request rate: the SVID requests its workloads made over the run, and how many
        were refused (made while the node could not issue, by the sampled availability), by qhx-edge and by
        the baseline."""
        hours = self.sc.duration / 3_600_000
        out = {}
        for n in self.sc.nodes:
            if n.requests_per_hour:
                made = n.requests_per_hour * hours
                out[n.name] = {"made": round(made), "refused": round(made * (1 - available[n.name])),
                               "refused_baseline": round(made * (1 - base["issuance_available"][n.name]))}  # fmt: skip
        return out

    def series(self, limit: int = 32) -> dict[str, Any]:
        """What the plots draw: sample times (hours) and, per node (at most ``limit``; the quantiles of all
        nodes beyond), staleness in hours; the count of nodes in each mode per sample."""
        hours = [round(s["t"] / 3_600_000, 4) for s in self.samples]
        names = sorted(self.nodes)

        def stale(s: dict[str, Any], n: str) -> float | None:
            v = s["nodes"][n]["staleness"]
            return None if v is None else round(v / 3600, 4)

        out: dict[str, Any] = {"hours": hours, "modes": {}}
        for m in ("connected", "degraded", "expired"):
            out["modes"][m] = [sum(s["nodes"][n]["mode"] == m for n in names) for s in self.samples]
        if len(names) <= limit:
            out["staleness_h"] = {n: [stale(s, n) for s in self.samples] for n in names}
        else:
            qs: dict[str, list[Any]] = {"min": [], "median": [], "p90": [], "max": []}
            for s in self.samples:
                vals = sorted(v for n in names if (v := stale(s, n)) is not None)
                for k, q in (("min", 0.0), ("median", 0.5), ("p90", 0.9), ("max", 1.0)):
                    qs[k].append(_q(vals, q))
            out["staleness_h_quantiles"] = qs
        return out


def _q(values: list[Any], q: float) -> Any:
    """The q-quantile of sorted ``values`` (nearest rank), rounded; None if empty."""
    if not values:
        return None
    v = values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]
    return round(v, 4) if isinstance(v, float) else v


def run(scenario: Scenario, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The report of one run, with the series its plots draw (``series``)."""
    engine = Engine(scenario, progress).run()
    return {**engine.report(), "series": engine.series()}
