"""One sync contact between two nodes over any byte stream (docs/architecture.md, "Sync protocol").

:mod:`qhx_edge.core.sync` is the protocol without I/O; this module gives it a node's store and a trio
stream (TCP, TLS over TCP, an in-memory pair in tests) and runs one contact to its end:

* what we offer is what the node holds (:func:`catalog`): per (domain, type) the newest version in
  the inventory, and on a want every root newer than the peer's (a root chain is walked one version
  at a time) but only the newest of every other type.  Agreements are keyed per pair of domains
  (``agreement/PARTNER``), as their versions count per pair; delegations are not synced (each
  reaches its own node in a pack);
* we want only what is newer than what we hold, of domains the node trusts (its own and partners it
  holds a root of);
* what arrives goes through :meth:`Node.import_documents`: the same trust core and one-writer store
  as a pack, nothing trusted because it arrived;
* sending and receiving run side by side (a TCP link whose buffers are smaller than the window
  would otherwise stall both peers in ``send_all``);
* a cut keeps what was half received (:class:`PeerMemory`, handed to the next contact with the same
  peer, which resumes at that offset) and applies what arrived whole;
* a *live* contact (``live=True`` on both sides, as ``serve`` runs them) stays open after the exchange
  until the link ends: each document is imported the moment it is whole (with any that arrived before it
  and were refused only for lack of it: a freshness naming a bundle still on its way), and what the node
  learns -- from another link (:class:`News`), or from a pack or an authority in another process (the
  store is looked at every ``poll`` seconds) -- is pushed to the peer at once.  The next contact with the
  same peer pushes what the peer lacked when the last one ended, from its first flight.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from qhx_edge.core import sync
from qhx_edge.core.documents import Agreement, parse
from qhx_edge.core.errors import QhxError, Rejected, Unreachable
from qhx_edge.store import clock
from qhx_edge.store.trust_store import trust_generation

RECEIVE_SIZE = 64 << 10
LIVE_POLL = 2.0  # seconds between looks at the store for news from another process, on a live link
# Refusals a later document of the same live link may cure (a freshness naming a bundle on its way; a
# partner's root before the agreement that pins it): such documents are tried again with the next arrival.
RETRY = frozenset(f"rejected:{k}" for k in ("mix-and-match", "unknown-domain", "anchor-mismatch", "no-agreement"))
MAX_PENDING = 16  # documents held for another try, at most ...
MAX_RETRIES = 4  # ... each tried again with at most this many later imports
LIVE_SETTLE = 5.0  # s a live link is left alone after its contact before a network change ends it
LIVE_LIFETIME = 600.0  # s a live link lasts before it is renewed (a new handshake and a full exchange)
NOT_SYNCED = frozenset({"delegation", "notary"})


@dataclass
class PeerMemory:
    """What one contact with a peer leaves for the next: the transfers it did not finish, and the
    link's own state to resume with (for TLS: the credential, the client context and the session;
    opaque here)."""

    partials: dict[bytes, sync.Partial] = field(default_factory=dict)
    link: Any = None
    identity: bytes | None = None  # the peer node's CA (its certificate's digest) these memories are of
    peer_live: bool = False  # the peer spoke ``live`` in the last contact
    peer_inventory: dict[sync.Key, int] | None = None  # what we believed it held when that contact ended


class News:
    """What the contacts of one ``serve`` tell each other: a node that imported something wakes every
    live link, which pushes what its peer lacks (trio; one per event loop)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def publish(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._event.wait()


@dataclass
class ContactResult:
    peer: str | None = None
    complete: bool = False
    in_sync: bool = False
    offered: int = 0  # (domain, type) pairs in our inventory
    sent: int = 0  # documents queued for the peer
    received: int = 0  # whole documents received
    bytes_in: int = 0
    bytes_out: int = 0
    resumed: bool | None = None  # whether the link resumed an earlier TLS session (None: no TLS link)
    live: bool = False  # the link stayed open after the contact, pushing news both ways
    pushed: int = 0  # documents pushed to the peer unasked
    ended: str | None = None  # why a live link ended, when it was not the link itself (network-change)
    imported: dict[str, Any] | None = None  # the import report (ImportResult.to_json), if any arrived
    error: dict[str, Any] | None = None  # what ended an incomplete contact (its to_json)
    failure: QhxError | None = field(default=None, repr=False)  # ... and the typed error itself
    recorded: dict[str, int] | None = field(default=None, repr=False)  # counters already recorded (live)

    def fail(self, exc: QhxError) -> None:
        self.failure, self.error = exc, exc.to_json()

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("failure", "recorded")}

    def to_record(self) -> dict[str, Any]:
        """What ``sync status`` adds for this result: a live link whose contact was recorded when it
        finished adds only what moved since, as the same contact (``continued``)."""
        out = self.to_json()
        if self.recorded is not None:
            for k, v in self.recorded.items():
                out[k] = out.get(k, 0) - v
            out["continued"] = True
        return out


Catalog = dict[sync.Key, list[tuple[int, str, bytes]]]  # key -> [(version, document type, bytes)], ascending


def catalog(docs: list[bytes]) -> Catalog:
    """What a node can offer, by sync key (see the module docstring)."""
    out: Catalog = {}
    for raw in docs:
        d = parse(raw)
        if d.type in NOT_SYNCED:
            continue
        key_type = f"agreement/{d.payload.partner}" if isinstance(d.payload, Agreement) else d.type
        out.setdefault((d.payload.domain, key_type), []).append((d.payload.version, d.type, raw))
    for versions in out.values():
        versions.sort(key=lambda v: v[0])
    return out


def held_catalog(index: list[tuple[str, str, int, bytes]]) -> Catalog:
    """:func:`catalog` from the store's index (``Store.held_index``), without parsing a document: what a
    contact offers is chosen by the columns the store wrote when it accepted each document."""
    out: Catalog = {}
    for domain, key_type, version, raw in index:
        if key_type in NOT_SYNCED:
            continue
        doc_type = "agreement" if key_type.startswith("agreement/") else key_type
        out.setdefault((domain, key_type), []).append((version, doc_type, raw))
    for versions in out.values():
        versions.sort(key=lambda v: v[0])
    return out


def inventory(cat: Catalog) -> dict[sync.Key, int]:
    return {key: versions[-1][0] for key, versions in cat.items()}


def answer(cat: Catalog, items: tuple[tuple[str, str, int], ...]) -> list[sync.Outgoing]:
    """The documents for a peer's want: every root newer than ``since``, the newest of anything else."""
    out: list[sync.Outgoing] = []
    for domain, key_type, since in items:
        newer = [v for v in cat.get((domain, key_type), []) if v[0] > since]
        if key_type != "root":
            newer = newer[-1:]
        out.extend(sync.Outgoing(domain, doc_type, version, raw, key_type) for version, doc_type, raw in newer)
    return out


wants = sync.wants


def peer_inventory(summary: dict[str, Any]) -> dict[sync.Key, int]:
    """What a peer holds, by sync key, from its ``doc summary`` JSON (``malformed`` if it is not one).
    A summary names agreements by type alone, not by partner: the peer counts as holding none."""
    from qhx_edge.core.errors import Malformed

    if summary.get("format") != "qhx-edge-summary" or not isinstance(summary.get("domains"), dict):
        raise Malformed("not a summary made by 'doc summary'")
    out: dict[sync.Key, int] = {}
    for domain, types in summary["domains"].items():
        if not isinstance(domain, str) or not isinstance(types, dict):
            raise Malformed("a summary's domains map names to types")
        for type_, held in types.items():
            version = held.get("version") if isinstance(held, dict) else None
            if not isinstance(type_, str) or type(version) is not int or version < 0:
                raise Malformed(f"a summary entry of {domain} is not a type and a version")
            if type_ != "agreement":
                out[(domain, type_)] = version
    return out


def offer(cat: Catalog, *, our_domain: str, peer_domain: str) -> Catalog:
    """What we may give a peer of ``peer_domain``: everything to a node of our own domain (a relay
    store-and-forwards what it holds); to a partner's node only our root chain, the agreement between
    the two domains and what our side of it releases.  What other domains hold is theirs to release."""
    from qhx_edge.core.agreements import released

    if peer_domain == our_domain:
        return cat
    # The agreement between the two domains, keyed under whichever side proposed it (versions count
    # per pair): the newest decides what we release; a terminated one releases nothing but itself.
    pair = {(our_domain, f"agreement/{peer_domain}"), (peer_domain, f"agreement/{our_domain}")}
    newest = max((v[-1] for k, v in cat.items() if k in pair), default=None, key=lambda v: v[0])
    payload = parse(newest[2]).payload if newest is not None else None
    live = payload if isinstance(payload, Agreement) and payload.status == "active" else None

    def releases(domain: str, key_type: str) -> bool:
        if (domain, key_type) in pair:
            return True
        return domain == our_domain and live is not None and (key_type == "root" or released(live, domain, key_type))

    return {key: versions for key, versions in cat.items() if releases(*key)}


def one_way(everything: Catalog, *, our_domain: str, peer_domain: str, held: dict[sync.Key, int]) -> list[bytes]:
    """A pack as a contact would send it (``pack export --for``): what a peer of ``peer_domain`` that
    holds ``held`` would want of what we may :func:`offer` it, urgent first."""
    cat = offer(everything, our_domain=our_domain, peer_domain=peer_domain)
    ours = inventory(cat)
    newer = tuple((d, t, v) for (d, t), v in ours.items())
    chosen = answer(cat, tuple(wants(held, newer, {d for d, _t in ours})))
    order = sorted(range(len(chosen)), key=lambda i: sync.URGENCY.get(chosen[i].type, sync.BULK))
    return [chosen[i].raw for i in order]


async def contact(
    home: Path,
    stream: trio.abc.Stream,
    *,
    memory: PeerMemory | None = None,
    now: Callable[[], int] = clock.now,
    source: str = "sync",
    timeout: float = math.inf,
    peer_domain: str | None = None,
    live: bool = False,
    news: News | None = None,
    poll: float = LIVE_POLL,
    on_settled: Callable[[ContactResult], None] | None = None,
    network: News | None = None,
) -> ContactResult:
    """Run one contact over ``stream`` (both peers call this; the protocol has no client or server)
    and apply what arrived.  A peer of another domain (``peer_domain``, which the link authenticated)
    is offered only what :func:`offer` allows.  With ``live`` and a peer that says the same, the link
    then stays open, pushing news both ways, until it ends (module docstring); ``timeout`` bounds the
    contact, not the live time after it.  Never raises for what the peer or the link did: the result
    says."""

    # Read off the event loop: a listener's other links go on while this one opens the store.
    cat, node_id, trusted = await trio.to_thread.run_sync(_load, home, peer_domain)
    ours = inventory(cat)
    memory = memory if memory is not None else PeerMemory()
    conn = sync.SyncConnection(
        node_id, ours, partials=memory.partials, caps=[sync.LIVE] if live else [],
        peer_live=live and memory.peer_live, peer_inventory=memory.peer_inventory if live else None,
    )  # fmt: skip
    result = ContactResult(offered=len(ours))

    def label() -> str:  # the import's source, for the audit log: the link and the peer's node
        return f"{source} {result.peer}"

    arrived: list[bytes] = []
    pending: list[tuple[bytes, int]] = []  # live: refused only for lack of a document still to come; tries
    reports: list[dict[str, Any]] = []
    wake = trio.Event()
    contact_over = trio.Event()

    def push(catalog: Catalog) -> None:
        docs = answer(catalog, tuple(conn.lacking(inventory(catalog))))
        if docs:
            conn.push(docs)
            result.pushed += len(docs)

    if live and memory.peer_live and memory.peer_inventory is not None:
        push(cat)  # from the first flight, behind hello and summary

    async def writer() -> None:
        nonlocal wake
        while True:
            data = conn.data_to_send()
            if data:
                await stream.send_all(data)
                continue
            if conn.finished and not conn.live:
                return
            await wake.wait()
            wake = trio.Event()

    def handle() -> None:
        while True:
            ev = conn.next_event()
            if ev is sync.NEED_DATA:
                return
            if isinstance(ev, sync.PeerHello):
                result.peer = ev.node
            elif isinstance(ev, sync.InSync):
                result.in_sync = True
            elif isinstance(ev, sync.PeerInventory):
                conn.want(wants(ours, ev.newer, trusted))
            elif isinstance(ev, sync.PeerWants):
                docs = answer(cat, ev.items)
                result.sent = len(docs)
                conn.send_documents(docs)
            elif isinstance(ev, sync.DocumentReceived):
                arrived.append(ev.raw)

    async def import_arrived() -> None:
        """Live: import what is whole now, with what waited for it (module docstring).  A document waits
        for at most MAX_RETRIES later imports, and at most MAX_PENDING wait: a peer cannot make one
        document cost many imports."""
        nonlocal pending
        batch = [*(raw for raw, _n in pending), *arrived]
        tries = [n for _raw, n in pending] + [0] * len(arrived)
        result.received += len(arrived)
        arrived.clear()
        with trio.CancelScope(shield=True):  # an import, once begun, is reported and its news told
            report = await trio.to_thread.run_sync(_apply, home, batch, now(), label())
            reports.append(report)
            pending = [(batch[d["index"]], tries[d["index"]] + 1) for d in report.get("documents", [])
                       if d.get("report") in RETRY and tries[d["index"]] < MAX_RETRIES][:MAX_PENDING]  # fmt: skip
            if report.get("changed") and news is not None:
                news.publish()

    async def reader() -> None:
        handle()
        wake.set()
        while not conn.finished or conn.live:
            data = await stream.receive_some(RECEIVE_SIZE)
            conn.receive_data(bytes(data))
            handle()
            wake.set()
            if conn.finished:
                contact_over.set()
            if not data:
                return  # the link ended (after the contact: a live link closing)
            if conn.live and arrived and conn.quiescent:
                await import_arrived()

    async def watch_news() -> None:
        """Live, after the contact: push what the node learned since, woken by ``news`` or every ``poll`` s."""
        nonlocal cat
        await contact_over.wait()
        if conn.live:  # what the exchange showed the peer lacks and could not want (a partner domain it opened)
            push(cat)
            wake.set()
        if conn.live and on_settled is not None:  # the contact is over: sync status counts it now
            result.complete = result.live = True
            result.bytes_in, result.bytes_out = conn.bytes_in, conn.bytes_out
            counted = {k: getattr(result, k) for k in ("received", "sent", "bytes_in", "bytes_out")}
            await trio.to_thread.run_sync(on_settled, dataclasses.replace(result))
            result.recorded = counted
        generation = -1  # the first look loads the catalog whole: the store may have moved since the contact began
        while conn.live:
            await (news.wait(poll) if news is not None else trio.sleep(poll))
            now_at = await trio.to_thread.run_sync(trust_generation, home)  # one small query, not the catalog
            if now_at == generation:
                continue
            generation = now_at
            fresh, _node, _trusted = await trio.to_thread.run_sync(_load, home, peer_domain)
            if inventory(fresh) != inventory(cat):
                cat = fresh
                push(cat)
                wake.set()

    failure: list[BaseException] = []
    late: list[QhxError] = []

    async def guarded(task: Callable[[], Any], scope: trio.CancelScope) -> None:
        # The first failure of either side ends the contact (a cut, the peer's protocol error); the
        # writer otherwise ends by itself once the contact finished and its last frame left; the reader
        # ends a live link when the link ends.
        try:
            await task()
        except (QhxError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if not (conn.finished and conn.live):
                failure.append(exc)
            elif isinstance(exc, QhxError):  # a live link ended by an error after its contact: said, not hidden
                late.append(exc)
            scope.cancel()
        else:
            if task is reader and conn.live:  # a live link ended: the writer and the watcher with it
                scope.cancel()

    async with trio.open_nursery() as nursery:

        async def contact_timer() -> None:
            with trio.move_on_after(timeout):
                await contact_over.wait()
                return
            failure.append(Unreachable(f"the contact took longer than {timeout} s"))
            nursery.cancel_scope.cancel()

        async def renew() -> None:
            """Live: the link ends after LIVE_LIFETIME s and its dialler dials again at once: a new handshake
            checks the peer's identity and authorization afresh, and a full exchange repairs what either side
            believed of the other."""
            await contact_over.wait()
            if conn.live:
                await trio.sleep(LIVE_LIFETIME)
                result.ended = "renewal"
                nursery.cancel_scope.cancel()

        async def network_changed() -> None:
            """Live: the node's network changed (``network``): the path this link took may be gone or new,
            so the link ends and its dialler dials afresh (after LIVE_SETTLE s, so a link's own coming up,
            announced in a burst, does not end the contact it brought)."""
            assert network is not None
            await contact_over.wait()
            opened = trio.current_time()
            while conn.live:
                await network.wait(math.inf)
                if trio.current_time() - opened >= LIVE_SETTLE:
                    result.ended = "network-change"
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(guarded, writer, nursery.cancel_scope)
        nursery.start_soon(guarded, reader, nursery.cancel_scope)
        nursery.start_soon(contact_timer)
        if live:
            nursery.start_soon(renew)
        if live and network is not None:
            nursery.start_soon(network_changed)
        if live:
            nursery.start_soon(guarded, watch_news, nursery.cancel_scope)
    if failure:
        exc = failure[0]
        result.fail(exc if isinstance(exc, QhxError) else Unreachable(f"the link broke: {exc}"))
    result.complete = conn.finished and not failure
    result.live = conn.live
    if late and not failure:
        result.fail(late[0])  # the contact completed; the live link after it ended with this
    memory.partials = conn.partials()
    memory.peer_live = conn.live
    memory.peer_inventory = conn.peer_inventory() if conn.live else None
    result.bytes_in, result.bytes_out = conn.bytes_in, conn.bytes_out
    if arrived:
        if live and conn.live:
            with trio.CancelScope(shield=True):
                await import_arrived()
        else:
            result.received += len(arrived)
            reports.append(await trio.to_thread.run_sync(_apply, home, arrived, now(), label()))
    if reports:
        result.imported = _merged(reports)
    return result


def _merged(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One import report for a contact that imported several times (a live link): applied or changed if
    any was, counts summed, every document's verdict (indexes per import)."""
    if len(reports) == 1:
        return reports[0]
    out: dict[str, Any] = {"applied": False, "changed": False, "counts": {}, "documents": [], "imports": len(reports)}
    for r in reports:
        if "error" in r:
            out.setdefault("errors", []).append(r["error"])
            continue
        out["applied"] = out["applied"] or bool(r.get("applied"))
        out["changed"] = out["changed"] or bool(r.get("changed"))
        for k, v in r.get("counts", {}).items():
            out["counts"][k] = out["counts"].get(k, 0) + v
        out["documents"] += r.get("documents", [])
    return out


def _load(home: Path, peer_domain: str | None) -> tuple[Catalog, str, set[str]]:
    """What a contact offers this peer, our node id, and the domains we trust (one store read)."""
    from qhx_edge.homes.node import Node

    with Node(home) as n:
        cat = offer(held_catalog(n.store.held_index()), our_domain=n.domain, peer_domain=peer_domain or n.domain)
        return cat, n.node_id, {d["domain"] for d in n.store.domains()}


def _apply(home: Path, docs: list[bytes], now: int, source: str) -> dict[str, Any]:
    from qhx_edge.homes.node import ImportRejected, Node

    with Node(home) as n:
        try:
            report: dict[str, Any] = n.import_documents(docs, now, source=source).to_json()
        except ImportRejected as exc:  # some documents refused, the rest applied: the report says which
            report = exc.result.to_json()
        except Rejected as exc:
            report = {"error": exc.to_json()}
    return report
