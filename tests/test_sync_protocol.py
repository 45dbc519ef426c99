"""The sans-IO sync protocol (qhx_edge/core/sync.py): two peers converge, in few bytes, urgent first,
resuming after every cut without receiving anything twice, and a relay that drops, duplicates or
alters frames is caught (the contact ends with a protocol error) and never gets a document accepted
that was not sent.

The peers here keep their documents in memory, as (domain, type, version) -> bytes, and accept a
received document only if it is one they asked for (the link-level stand-in for the trust core; the
real trust core and store take over in homes/, as for packs).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from qhx_edge.core import cbor, sync
from qhx_edge.core.sync import (
    CHUNK,
    NEED_DATA,
    DocumentReceived,
    Finished,
    InSync,
    Outgoing,
    Partial,
    PeerHello,
    PeerInventory,
    PeerWants,
    SyncConnection,
    SyncProtocolError,
)

DocKey = tuple[str, str, int]


def make_doc(domain: str, type_: str, version: int, size: int) -> bytes:
    return cbor2.dumps([domain, type_, version, bytes(random.Random(f"{domain}{type_}{version}").randbytes(size))])


@dataclass
class Peer:
    name: str
    docs: dict[DocKey, bytes] = field(default_factory=dict)
    partials: dict[bytes, Partial] = field(default_factory=dict)
    asked: dict[tuple[str, str], int] = field(default_factory=dict)
    received: list[DocKey] = field(default_factory=list)
    conn: SyncConnection | None = None

    def inventory(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for d, t, v in self.docs:
            out[d, t] = max(v, out.get((d, t), 0))
        return out

    def open(self, window: int = sync.DEFAULT_WINDOW) -> SyncConnection:
        self.conn = SyncConnection(self.name, self.inventory(), partials=self.partials, window=window)
        self.asked = {}
        return self.conn

    def step(self) -> list[Any]:
        """Handle every pending event, as a link would."""
        assert self.conn is not None
        seen = []
        while True:
            ev = self.conn.next_event()
            if ev is NEED_DATA:
                return seen
            seen.append(ev)
            if isinstance(ev, PeerInventory):
                mine = self.inventory()
                wants = [(d, t, mine.get((d, t), 0)) for d, t, _v in ev.newer]
                self.asked = {(d, t): since for d, t, since in wants}
                self.conn.want(wants)
            elif isinstance(ev, PeerWants):
                out = [
                    Outgoing(d, t, v, raw)
                    for (d, t, v), raw in sorted(self.docs.items())
                    if any(d == wd and t == wt and v > since for wd, wt, since in ev.items)
                ]
                self.conn.send_documents(out)
            elif isinstance(ev, DocumentReceived):
                d, t, v, _payload = cbor2.loads(ev.raw)
                assert (d, t) in self.asked, "only what we asked for"  # the trust core's stand-in
                assert v > self.asked[d, t]
                self.docs[d, t, v] = ev.raw
                self.received.append((d, t, v))

    def close(self) -> None:
        assert self.conn is not None
        self.partials = self.conn.partials()
        self.conn = None


def contact(a: Peer, b: Peer, *, cut_at: int | None = None, window: int = sync.DEFAULT_WINDOW) -> bool:
    """One contact; ``cut_at``: cut the link once that many bytes went either way (part of the frame in
    flight arrives, the rest is lost). True when both finished."""
    ca, cb = a.open(window), b.open(window)
    moved = 0
    for _ in range(10_000):
        for src, dst, peer in ((ca, cb, b), (cb, ca, a)):
            data = src.data_to_send()
            if cut_at is not None and moved + len(data) >= cut_at:
                keep = cut_at - moved
                if keep:
                    dst.receive_data(data[:keep])
                a.step() if peer is a else b.step()
                a.close()
                b.close()
                return False
            moved += len(data)
            if data:
                dst.receive_data(data)
            peer.step()
        if ca.finished and cb.finished and not ca.data_to_send() and not cb.data_to_send():
            a.close()
            b.close()
            return True
    raise AssertionError("the contact did not finish")


def newest(p: Peer) -> dict[tuple[str, str], int]:
    return p.inventory()


def test_peers_in_sync_finish_after_one_exchange_of_digests() -> None:
    docs = {("alpha.example", "root", 1): make_doc("alpha.example", "root", 1, 100)}
    a, b = Peer("a", dict(docs)), Peer("b", dict(docs))
    ca, cb = a.open(), b.open()
    ab, ba = ca.data_to_send(), cb.data_to_send()
    cb.receive_data(ab)
    ca.receive_data(ba)
    assert isinstance(a.step()[0], PeerHello)
    assert any(isinstance(e, InSync) for e in b.step())
    ab2, ba2 = ca.data_to_send(), cb.data_to_send()
    cb.receive_data(ab2)
    ca.receive_data(ba2)
    assert isinstance(a.step()[-1], Finished)
    assert isinstance(b.step()[-1], Finished)
    per_side = len(ab) + len(ab2)
    assert per_side == len(ba) + len(ba2)
    assert per_side <= 128, per_side  # hello, summary and done: the whole contact, each way
    assert ca.data_to_send() == cb.data_to_send() == b""


def test_urgent_documents_travel_first() -> None:
    a = Peer("a")
    for t in ("policy", "bundle", "delegation", "freshness", "root", "revocation", "receipt"):
        a.docs["alpha.example", t, 1] = make_doc("alpha.example", t, 1, 3000)
    b = Peer("b")
    assert contact(a, b)
    assert [t for _d, t, _v in b.received][:3] == ["root", "revocation", "freshness"]
    assert b.received[-1][1] == "receipt"
    assert newest(a) == newest(b)


def test_history_above_the_peers_newest_is_sent_and_nothing_below() -> None:
    a = Peer("a", {("alpha.example", "root", v): make_doc("alpha.example", "root", v, 200) for v in range(1, 6)})
    b = Peer("b", {("alpha.example", "root", v): make_doc("alpha.example", "root", v, 200) for v in range(1, 3)})
    assert contact(a, b)
    assert b.received == [("alpha.example", "root", v) for v in (3, 4, 5)]
    assert a.received == []


def test_window_bounds_what_is_in_flight() -> None:
    a = Peer("a", {("alpha.example", "bundle", 1): make_doc("alpha.example", "bundle", 1, 200_000)})
    b = Peer("b")
    ca, cb = a.open(window=CHUNK), b.open(window=CHUNK)
    biggest = 0
    for _ in range(200):
        data = ca.data_to_send()
        chunks = 0
        if data:
            cb.receive_data(data)
            chunks = sum(isinstance(e, DocumentReceived) for e in b.step())
        biggest = max(biggest, len(data))
        reply = cb.data_to_send()
        if reply:
            ca.receive_data(reply)
        a.step()
        del chunks
        if ca.finished and cb.finished:
            break
    assert ca.finished
    assert cb.finished
    assert biggest <= CHUNK + 200  # never more than one window of document bytes (plus its framing)


def test_a_cut_transfer_resumes_without_receiving_anything_twice() -> None:
    """Cut a 1 MiB transfer many times, each part-way through a frame: it completes, and what
    crosses the link again per cut is at most the one frame that was cut."""
    size = 1 << 20
    a = Peer("a", {("alpha.example", "bundle", 7): make_doc("alpha.example", "bundle", 7, size - 64)})
    b = Peer("b")
    rng = random.Random(5)
    cuts = 0
    wire = 0
    while True:
        cut = rng.randrange(20_000, 300_000)
        finished = contact(a, b, cut_at=cut)
        wire += cut if not finished else 0
        if finished:
            break
        cuts += 1
        assert cuts < 100
    assert cuts >= 3
    assert b.received == [("alpha.example", "bundle", 7)]
    assert b.docs == a.docs


def test_resent_bytes_per_cut_at_most_one_chunk() -> None:
    """Counted at the receiver: every chunk byte that arrived is kept (never asked for again), so the
    sender only ever resends what never arrived in a whole frame: at most the cut frame's chunk."""
    raw = make_doc("alpha.example", "bundle", 1, 700_000)
    a = Peer("a", {("alpha.example", "bundle", 1): raw})
    b = Peer("b")
    arrived_chunk_bytes = 0
    original = sync._HANDLERS["chunk"]

    def counting(self: SyncConnection, msg: dict[str, Any]) -> None:
        nonlocal arrived_chunk_bytes
        if self.node == "b":
            arrived_chunk_bytes += len(msg["data"])
        original(self, msg)

    sync._HANDLERS["chunk"] = counting
    try:
        cuts = 0
        rng = random.Random(9)
        while not contact(a, b, cut_at=rng.randrange(50_000, 200_000)):
            cuts += 1
    finally:
        sync._HANDLERS["chunk"] = original
    assert cuts >= 2
    assert arrived_chunk_bytes == len(raw)  # whole frames: each byte arrived once


def test_protocol_errors_say_who_broke_it() -> None:
    c = SyncConnection("a", {})
    with pytest.raises(SyncProtocolError) as exc:
        c.want([])
    assert exc.value.by_peer is False
    assert exc.value.to_json()["by"] == "us"
    c = SyncConnection("a", {})
    with pytest.raises(SyncProtocolError, match="over the cap") as exc:
        c.receive_data((sync.MAX_FRAME + 1).to_bytes(4, "big"))
    assert exc.value.by_peer is True
    for bad in (
        cbor.encode({"m": "summary", "digest": b"x" * 32, "count": 0}),  # before hello
        cbor.encode({"m": "nope"}),
        cbor2.dumps([1, 2]),
        b"\xa1\x61m\x78\x01d",  # "m": a text with a non-shortest head: not deterministic
    ):
        c = SyncConnection("a", {})
        with pytest.raises(SyncProtocolError) as exc:
            c.receive_data(len(bad).to_bytes(4, "big") + bad)
        assert exc.value.by_peer is True
    c = SyncConnection("a", {}, versions=(1,))
    hello = cbor.encode({"m": "hello", "versions": [2, 3], "node": "b", "caps": []})
    with pytest.raises(SyncProtocolError, match="no protocol version in common"):
        c.receive_data(len(hello).to_bytes(4, "big") + hello)


def test_a_cut_mid_contact_is_reported() -> None:
    a, b = Peer("a", {("alpha.example", "root", 1): make_doc("alpha.example", "root", 1, 10)}), Peer("b")
    ca, _cb = a.open(), b.open()
    ca.receive_data(b"")
    with pytest.raises(SyncProtocolError, match="ended before the contact finished"):
        ca.next_event()


# --- random stores, random cuts, a faulty relay --------------------------------------------------

domains = st.sampled_from(["alpha.example", "beta.example"])
types = st.sampled_from(["root", "bundle", "policy", "freshness", "revocation", "receipt"])
entries = st.tuples(domains, types, st.integers(min_value=1, max_value=4), st.integers(min_value=1, max_value=40_000))


def _store(items: list[tuple[str, str, int, int]]) -> dict[DocKey, bytes]:
    return {(d, t, v): make_doc(d, t, v, size) for d, t, v, size in items}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(entries, max_size=8),
    st.lists(entries, max_size=8),
    st.lists(st.integers(min_value=1, max_value=120_000), max_size=6),
    st.sampled_from([CHUNK, 2 * CHUNK, sync.DEFAULT_WINDOW]),
)
def test_two_honest_peers_converge_after_any_cuts(
    a_items: list[tuple[str, str, int, int]],
    b_items: list[tuple[str, str, int, int]],
    cuts: list[int],
    window: int,
) -> None:
    a, b = Peer("a", _store(a_items)), Peer("b", _store(b_items))
    for (d, t, v), raw in list(a.docs.items()):  # one history: the same (domain, type, version) is the same bytes
        b.docs.pop((d, t, v), None)
        if (d, t, v) in {(x[0], x[1], x[2]) for x in b_items}:
            b.docs[d, t, v] = raw
    for cut in cuts:
        contact(a, b, cut_at=cut, window=window)
    assert contact(a, b, window=window)
    assert newest(a) == newest(b)
    for key in set(a.docs) & set(b.docs):
        assert a.docs[key] == b.docs[key]
    again = [contact(a, b, window=window) for _ in range(1)]
    assert again == [True]


def _relay(data: bytes, rng: random.Random, mode: str) -> bytes:
    """Frames of ``data`` with one dropped, duplicated or altered (a faulty or hostile relay)."""
    frames = []
    i = 0
    while i < len(data):
        size = int.from_bytes(data[i : i + 4], "big")
        frames.append(data[i : i + 4 + size])
        i += 4 + size
    if not frames:
        return data
    k = rng.randrange(len(frames))
    if mode == "drop":
        del frames[k]
    elif mode == "dup":
        frames.insert(k, frames[k])
    else:
        f = bytearray(frames[k])
        f[rng.randrange(4, len(f))] ^= 1 + rng.randrange(255)
        frames[k] = bytes(f)
    return b"".join(frames)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(entries, min_size=1, max_size=6),
    st.sampled_from(["drop", "dup", "alter"]),
    st.integers(min_value=0, max_value=40),
    st.integers(min_value=0, max_value=2**32),
)
def test_a_faulty_relay_is_caught_and_never_gets_a_forgery_accepted(
    items: list[tuple[str, str, int, int]], mode: str, at_round: int, seed: int
) -> None:
    a, b = Peer("a", _store(items)), Peer("b")
    rng = random.Random(seed)
    ca, cb = a.open(), b.open()
    caught: SyncProtocolError | None = None
    try:
        for r in range(10_000):
            for src, dst, peer in ((ca, cb, b), (cb, ca, a)):
                data = src.data_to_send()
                if r == at_round and data:
                    data = _relay(data, rng, mode)
                if data:
                    dst.receive_data(data)
                peer.step()
            if ca.finished and cb.finished:
                break
    except SyncProtocolError as exc:
        caught = exc
    assert caught is None or caught.by_peer
    # Whatever b accepted is exactly what a holds under that key: an altered document never passes.
    for key in b.received:
        assert b.docs[key] == a.docs[key]
    if ca.finished and cb.finished and mode != "alter":  # else caught, or stalled on a lost frame
        assert newest(b) == newest(a)  # (an altered want or done may end a contact early: TLS guards those)
    # After the faulty contact, a clean one converges.
    b.close() if b.conn else None
    a.close() if a.conn else None
    assert contact(a, b)
    assert newest(a) == newest(b)


def test_an_altered_chunk_is_refused_when_its_document_completes() -> None:
    raw = make_doc("alpha.example", "bundle", 1, 3 * CHUNK)
    a, b = Peer("a", {("alpha.example", "bundle", 1): raw}), Peer("b")
    ca, cb = a.open(), b.open()

    def run() -> None:
        for _ in range(20):
            data = ca.data_to_send()
            i = data.find(raw[CHUNK + 10 : CHUNK + 40])
            if i >= 0:
                data = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
            if data:
                cb.receive_data(data)
            b.step()
            reply = cb.data_to_send()
            if reply:
                ca.receive_data(reply)
            a.step()

    with pytest.raises(SyncProtocolError, match="does not match its id") as exc:
        run()
    assert exc.value.by_peer
    assert b.received == []


def _pump(a: SyncConnection, b: SyncConnection, on: Any) -> None:
    for _ in range(50):
        moved = False
        for x, y in ((a, b), (b, a)):
            if data := x.data_to_send():
                y.receive_data(data)
                moved = True
            while (ev := x.next_event()) is not NEED_DATA:
                on(x, ev)
        if not moved:
            return


def test_documents_nobody_asked_for_are_the_peers_protocol_error() -> None:
    """Review finding: after an empty want a peer could still send any number of whole documents,
    each kept in memory until the contact ended.  Now the first such chunk ends the contact."""
    doc = make_doc("alpha.example", "bundle", 2, 100)
    a = SyncConnection("a", {("alpha.example", "bundle"): 2})
    b = SyncConnection("b", {("alpha.example", "bundle"): 2, ("alpha.example", "policy"): 1})

    def on(x: SyncConnection, ev: Any) -> None:
        if isinstance(ev, PeerInventory):
            x.want([])
        elif isinstance(ev, PeerWants):
            x.send_documents([Outgoing("alpha.example", "bundle", 2, doc)] if x is a else [])

    with pytest.raises(SyncProtocolError, match="asked for nothing") as caught:
        _pump(a, b, on)
    assert caught.value.by_peer


def test_a_contact_brings_at_most_its_byte_budget() -> None:
    doc = make_doc("alpha.example", "policy", 2, 3 * CHUNK)
    a = SyncConnection("a", {("alpha.example", "policy"): 2})
    b = SyncConnection("b", {("alpha.example", "policy"): 1}, max_receive=2 * CHUNK)

    def on(x: SyncConnection, ev: Any) -> None:
        if isinstance(ev, PeerInventory):
            x.want([(d, t, 1) for d, t, _v in ev.newer])
        elif isinstance(ev, PeerWants):
            x.send_documents([Outgoing("alpha.example", "policy", 2, doc)] if ev.items else [])

    with pytest.raises(SyncProtocolError, match="document bytes in one contact"):
        _pump(a, b, on)


def test_a_planted_partial_costs_a_refetch_not_the_contact() -> None:
    """Review finding: a prefix left under a document's id by an earlier (hostile) contact from the same
    address made every honest contact resuming it fail.  Now the bad transfer is dropped and the next
    contact fetches the document whole."""
    doc = make_doc("alpha.example", "policy", 2, 3 * CHUNK)
    ident = Outgoing("alpha.example", "policy", 2, doc).id
    planted = {ident: Partial(len(doc), b"\x00" * CHUNK)}

    def contact(partials: dict[bytes, Partial]) -> list[bytes]:
        a = SyncConnection("a", {("alpha.example", "policy"): 2})
        b = SyncConnection("b", {("alpha.example", "policy"): 1}, partials=partials)
        got: list[bytes] = []

        def on(x: SyncConnection, ev: Any) -> None:
            if isinstance(ev, PeerInventory):
                x.want([(d, t, 1) for d, t, _v in ev.newer])
            elif isinstance(ev, PeerWants):
                x.send_documents([Outgoing("alpha.example", "policy", 2, doc)] if ev.items else [])
            elif isinstance(ev, DocumentReceived):
                got.append(ev.raw)

        _pump(a, b, on)
        assert a.finished
        assert b.finished
        return got

    assert contact(planted) == []  # the poisoned transfer is dropped, the contact ends cleanly
    assert contact({}) == [doc]  # and the next one gets the document whole


# --- stateful: peers that publish, meet over cut, faulty and reordered links, and meet again ---------


class SyncMachine(RuleBasedStateMachine):
    """Three peers gain documents and meet in any order over links that cut at any byte, drop,
    duplicate or alter a frame, or deliver in random splits.  Invariants after every step: nobody holds
    a document that nobody published (no forgery, no splice), the same key always means the same
    bytes, and any two peers that then meet over a clean link converge."""

    def __init__(self) -> None:
        super().__init__()
        self.peers = [Peer("p0"), Peer("p1"), Peer("p2")]
        self.published: dict[DocKey, bytes] = {}
        self.rng = random.Random(0)

    @rule(
        who=st.integers(0, 2),
        domain=st.sampled_from(["alpha.example", "beta.example"]),
        type_=st.sampled_from(["root", "bundle", "revocation", "policy"]),
        size=st.sampled_from([10, 300, CHUNK + 7, 3 * CHUNK]),
    )
    def publish(self, who: int, domain: str, type_: str, size: int) -> None:
        version = 1 + max([v for d, t, v in self.published if (d, t) == (domain, type_)], default=0)
        raw = make_doc(domain, type_, version, size)
        self.published[domain, type_, version] = raw
        self.peers[who].docs[domain, type_, version] = raw

    @rule(a=st.integers(0, 2), b=st.integers(0, 2), cut=st.integers(1, 200_000))
    def cut_contact(self, a: int, b: int, cut: int) -> None:
        if a != b:
            contact(self.peers[a], self.peers[b], cut_at=cut)

    @rule(a=st.integers(0, 2), b=st.integers(0, 2), mode=st.sampled_from(["drop", "dup", "alter"]),
          at_round=st.integers(0, 12), seed=st.integers(0, 2**32))  # fmt: skip
    def faulty_contact(self, a: int, b: int, mode: str, at_round: int, seed: int) -> None:
        if a == b:
            return
        pa, pb = self.peers[a], self.peers[b]
        ca, cb = pa.open(), pb.open()
        rng = random.Random(seed)
        try:
            for r in range(2_000):
                for src, dst, peer in ((ca, cb, pb), (cb, ca, pa)):
                    data = src.data_to_send()
                    if r == at_round and data:
                        data = _relay(data, rng, mode)
                    if data:
                        dst.receive_data(data)
                    peer.step()
                if ca.finished and cb.finished:
                    break
        except SyncProtocolError as exc:
            caught: SyncProtocolError | None = exc
        else:
            caught = None
        assert caught is None or caught.by_peer  # never our own fault
        pa.close()
        pb.close()

    @rule(a=st.integers(0, 2), b=st.integers(0, 2), seed=st.integers(0, 2**32))
    def reordered_contact(self, a: int, b: int, seed: int) -> None:
        """A clean link that delivers in random splits and alternates directions at random."""
        if a == b:
            return
        pa, pb = self.peers[a], self.peers[b]
        ca, cb = pa.open(), pb.open()
        rng = random.Random(seed)
        pending = {id(ca): bytearray(), id(cb): bytearray()}
        for _ in range(20_000):
            src, dst, peer = rng.choice([(ca, cb, pb), (cb, ca, pa)])
            pending[id(dst)] += src.data_to_send()
            buf = pending[id(dst)]
            if buf:
                n = rng.randint(1, len(buf))
                dst.receive_data(bytes(buf[:n]))
                del buf[:n]
            peer.step()
            if ca.finished and cb.finished and not any(pending.values()):
                break
        assert ca.finished
        assert cb.finished
        pa.close()
        pb.close()

    @invariant()
    def nothing_unpublished_and_one_history(self) -> None:
        for p in self.peers:
            for key, raw in p.docs.items():
                assert self.published.get(key) == raw, (p.name, key)

    @invariant()
    def a_clean_contact_converges(self) -> None:
        a, b = self.rng.sample(self.peers, 2)
        assert contact(a, b)
        assert newest(a) == newest(b)


SyncMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=12, deadline=None)
test_sync_machine = SyncMachine.TestCase


# --- live links: push after the contact, and from the first flight -----------------------------------

ALPHA = "alpha.example"


def _live_pair(
    a_inv: dict[tuple[str, str], int], b_inv: dict[tuple[str, str], int], **b_kw: Any
) -> tuple[SyncConnection, SyncConnection, dict[str, list[bytes]], Any]:
    a = SyncConnection("a", a_inv, caps=[sync.LIVE])
    b = SyncConnection("b", b_inv, caps=[sync.LIVE], **b_kw)
    got: dict[str, list[bytes]] = {"a": [], "b": []}

    def on(x: SyncConnection, ev: Any) -> None:
        if isinstance(ev, PeerInventory):
            x.want([(d, t, x.inventory.get((d, t), 0)) for d, t, _v in ev.newer])
        elif isinstance(ev, PeerWants):
            x.send_documents([])
        elif isinstance(ev, DocumentReceived):
            got[x.node].append(ev.raw)

    return a, b, got, on


def test_a_live_link_stays_open_and_a_push_arrives_whole() -> None:
    a, b, got, on = _live_pair({(ALPHA, "root"): 1}, {(ALPHA, "root"): 1})
    _pump(a, b, on)
    assert a.finished
    assert b.finished
    assert a.live
    assert b.live
    assert a.peer_inventory() == {(ALPHA, "root"): 1}  # equal summaries: the peer holds what we hold
    doc = make_doc(ALPHA, "revocation", 1, 2 * CHUNK + 5)
    ours = {(ALPHA, "root"): 1, (ALPHA, "revocation"): 1}
    assert a.lacking(ours) == [(ALPHA, "revocation", 0)]
    a.push([Outgoing(ALPHA, "revocation", 1, doc)])
    _pump(a, b, on)
    assert got["b"] == [doc]
    assert a.lacking(ours) == []  # sent: not pushed again
    assert b.peer_inventory() == ours  # the announcement told b what a holds
    a.push([Outgoing(ALPHA, "revocation", 1, doc)])  # the same bytes again: skipped
    assert a.data_to_send() == b""


def test_a_push_is_refused_where_live_was_not_agreed() -> None:
    a = SyncConnection("a", {}, caps=[sync.LIVE])
    b = SyncConnection("b", {})
    _pump(a, b, lambda x, ev: None)
    assert a.finished
    assert not a.live
    with pytest.raises(SyncProtocolError, match="does not speak live") as caught:
        a.push([Outgoing(ALPHA, "bundle", 1, b"x")])
    assert not caught.value.by_peer
    with pytest.raises(SyncProtocolError, match="did not offer the live"):
        b.push([Outgoing(ALPHA, "bundle", 1, b"x")])
    with pytest.raises(SyncProtocolError, match="not known to speak live"):
        SyncConnection("c", {}, caps=[sync.LIVE]).push([Outgoing(ALPHA, "bundle", 1, b"x")])
    # A peer pushing to a side that never offered live breaks the protocol.
    rogue = SyncConnection("r", {}, caps=[sync.LIVE], peer_live=True)
    rogue.push([Outgoing(ALPHA, "bundle", 1, b"x")])
    plain = SyncConnection("p", {})
    with pytest.raises(SyncProtocolError, match="did not offer the live capability") as caught:
        plain.receive_data(rogue.data_to_send())
    assert caught.value.by_peer


def test_a_remembered_live_peer_gets_news_in_the_first_flight() -> None:
    """The pull exchange takes three flights before a document moves; a side that remembers its peer's
    inventory pushes what it lacks at once, so the document arrives one flight after the link is up."""
    doc = make_doc(ALPHA, "freshness", 7, 300)
    remembered = {(ALPHA, "root"): 1, (ALPHA, "freshness"): 6}
    a = SyncConnection("a", {(ALPHA, "root"): 1, (ALPHA, "freshness"): 7}, caps=[sync.LIVE], peer_live=True,
                       peer_inventory=remembered)  # fmt: skip
    b = SyncConnection("b", remembered, caps=[sync.LIVE])
    a.push([Outgoing(ALPHA, "freshness", 7, doc)])
    b.receive_data(a.data_to_send())  # the first flight alone
    events = []
    while (ev := b.next_event()) is not NEED_DATA:
        events.append(ev)
    assert DocumentReceived(doc) in events
    # The pull exchange that follows does not send it twice, and both sides finish.
    got: list[bytes] = []

    def on(x: SyncConnection, ev: Any) -> None:
        if isinstance(ev, PeerInventory):
            x.want([(d, t, x.inventory.get((d, t), 0)) for d, t, _v in ev.newer])
        elif isinstance(ev, PeerWants):
            x.send_documents([Outgoing(ALPHA, "freshness", 7, doc)] if x is a and ev.items else [])
        elif isinstance(ev, DocumentReceived):
            got.append(ev.raw)

    _pump(a, b, on)
    assert a.finished
    assert b.finished
    assert got == []


def test_pushed_bytes_count_against_the_receive_cap() -> None:
    a, b, _got, on = _live_pair({}, {}, max_receive=2 * CHUNK)
    _pump(a, b, on)
    a.push([Outgoing(ALPHA, "policy", 1, make_doc(ALPHA, "policy", 1, CHUNK + 10))])
    _pump(a, b, on)
    a.push([Outgoing(ALPHA, "policy", 2, make_doc(ALPHA, "policy", 2, CHUNK + 10))])
    with pytest.raises(SyncProtocolError, match="document bytes in one contact"):
        _pump(a, b, on)


def test_chunks_of_a_document_never_announced_are_refused_after_the_contact() -> None:
    a, b, _got, on = _live_pair({}, {})
    _pump(a, b, on)
    doc = make_doc(ALPHA, "policy", 1, 50)
    body = cbor.encode({"m": "chunk", "id": Outgoing(ALPHA, "policy", 1, doc).id, "total": len(doc), "offset": 0,
                        "data": doc})  # fmt: skip
    with pytest.raises(SyncProtocolError, match="after done"):
        b.receive_data(len(body).to_bytes(4, "big") + body)


@pytest.mark.parametrize(
    "items",
    [
        [[ALPHA, "policy", 1]],  # no id
        [[ALPHA, "policy", 1, b"short"]],
        [[ALPHA, "policy", -1, b"\x00" * 32]],
        [["", "policy", 1, b"\x00" * 32]],
        "not a list",
    ],
)
def test_malformed_push_announcements_are_the_peers_protocol_error(items: Any) -> None:
    a, b, _got, on = _live_pair({}, {})
    _pump(a, b, on)
    body = cbor.encode({"m": "push", "items": items})
    with pytest.raises(SyncProtocolError) as caught:
        b.receive_data(len(body).to_bytes(4, "big") + body)
    assert caught.value.by_peer


def test_announcing_more_than_the_cap_at_once_is_refused() -> None:
    a, b, _got, on = _live_pair({}, {})
    _pump(a, b, on)
    body = cbor.encode({"m": "push", "items": [[ALPHA, "t", i, i.to_bytes(32, "big")]
                                               for i in range(sync.MAX_PARTIALS + 1)]})  # fmt: skip
    with pytest.raises(SyncProtocolError, match="announced at once"):
        b.receive_data(len(body).to_bytes(4, "big") + body)


def test_an_agreement_with_a_trusted_domain_opens_the_other_partys_root_chain() -> None:
    """A node of alpha, syncing with another alpha node that federated with beta, wants the agreement
    (whichever side proposed it: its key names the proposer) and beta's roots, which the agreement pins
    and without which the trust core refuses it; nothing else of beta until it trusts beta, and nothing of
    a domain no agreement it could verify names."""
    newer = [("beta.example", "agreement/alpha.example", 1), ("beta.example", "root", 2),
             ("beta.example", "bundle", 3), ("gamma.example", "root", 1),
             ("gamma.example", "agreement/delta.example", 1)]  # fmt: skip
    got = sync.wants({("alpha.example", "root"): 1}, newer, {"alpha.example"})
    assert got == [("beta.example", "agreement/alpha.example", 0), ("beta.example", "root", 0)]
    proposed_by_us = [("alpha.example", "agreement/beta.example", 1), ("beta.example", "root", 2)]
    got = sync.wants({("alpha.example", "root"): 1}, proposed_by_us, {"alpha.example"})
    assert got == [("alpha.example", "agreement/beta.example", 0), ("beta.example", "root", 0)]


def test_a_document_crosses_a_live_link_once_and_acks_do_not_pile_up() -> None:
    """Review findings: a peer could re-announce and re-send one document without end (one import and one
    audit row each time), and a peer that sends tiny chunks and never reads made us queue an ack frame
    per chunk.  Now a delivered document cannot come again on the same link, and we owe one ack per id."""
    a, b, got, on = _live_pair({}, {})
    _pump(a, b, on)
    doc = make_doc(ALPHA, "policy", 1, 40)
    a.push([Outgoing(ALPHA, "policy", 1, doc)])
    _pump(a, b, on)
    assert got["b"] == [doc]
    ident = Outgoing(ALPHA, "policy", 1, doc).id
    again = cbor.encode({"m": "push", "items": [[ALPHA, "policy", 1, ident]]})
    with pytest.raises(SyncProtocolError, match="already delivered"):
        b.receive_data(len(again).to_bytes(4, "big") + again)
    # Acks: 100 one-byte chunks of one announced document owe one ack frame, not 100.
    c, d, _got2, on2 = _live_pair({}, {})
    _pump(c, d, on2)
    big = make_doc(ALPHA, "bundle", 1, 200)
    big_id = Outgoing(ALPHA, "bundle", 1, big).id
    frames = [cbor.encode({"m": "push", "items": [[ALPHA, "bundle", 1, big_id]]})]
    frames += [cbor.encode({"m": "chunk", "id": big_id, "total": len(big), "offset": k, "data": big[k : k + 1]})
               for k in range(100)]  # fmt: skip
    d.receive_data(b"".join(len(f).to_bytes(4, "big") + f for f in frames))
    out = d.data_to_send()
    assert out.count(b"ack") == 1


def test_an_honest_push_of_many_documents_stays_under_the_receivers_cap() -> None:
    """Review finding: push() announced every document at once, and a push of 300 was refused by an
    honest receiver (more than 256 announced).  Now each is announced just before its first chunk."""
    a, b, got, on = _live_pair({}, {})
    _pump(a, b, on)
    docs = [Outgoing(ALPHA, f"t{k}", 1, make_doc(ALPHA, f"t{k}", 1, 30)) for k in range(300)]
    a.push(docs)
    for _ in range(20):
        _pump(a, b, on)
    assert len(got["b"]) == 300
