"""A sync contact between two real node homes (qhx_edge/homes/sync_session.py): over an in-memory
stream pair and over real TCP on 127.0.0.1, through the real trust core and SQLite stores.

* Two nodes of one domain, one a bundle, a policy and a root rotation ahead: after one contact both
  hold the same documents; a second contact finds them in sync in a few hundred bytes.
* A peer that offers a forged bundle gets nothing applied: the trust core refuses it and the store
  is unchanged, as for a pack.
* A link cut in the middle of a large document keeps what arrived; the next contact resumes there
  and completes (the bytes received again are at most one chunk per cut).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import trio
import trio.testing

from qhx_edge.core import documents as D  # noqa: N812
from qhx_edge.core import sync
from qhx_edge.homes import node
from qhx_edge.homes.sync_session import PeerMemory, answer, catalog, contact, inventory
from qhx_edge.store import clock
from tests.conftest import PASSPHRASE, Homes, make_homes


def _second_node(h: Homes) -> Path:
    """Another node of the same domain, holding what the first held at the start."""
    now = clock.now()
    home = h.tmp / "N2"
    node.init(home, h.authority.anchor(), now, passphrase=PASSPHRASE.encode())
    with node.Node(home) as n:
        n.import_pack(h.authority.export_pack(h.authority.export_documents(), now), now)
    return home


def _ahead(h: Homes, policy: dict[str, Any] | None = None) -> None:
    """The authority moves on (bundle, policy, root rotation, freshness) and only the first node hears."""
    now = clock.now()
    h.authority.publish_bundle(now)
    from qhx_edge.core.policyfile import policy_fields

    h.authority.publish_policy({**policy_fields({}), **(policy or {})}, now)
    h.authority.publish_freshness(now)
    with node.Node(h.node_home) as n:
        n.import_pack(h.authority.export_pack(h.authority.export_documents(), now), now)


def _held(home: Path) -> dict[str, Any]:
    with node.Node(home) as n:
        return n.summary()["domains"]


def _trust(home: Path) -> str:
    with node.Node(home) as n:
        return n.store.trust_digest()


async def _pair(a: Path, b: Path, **kw: Any) -> tuple[Any, Any]:
    left, right = trio.testing.memory_stream_pair()
    out: list[Any] = [None, None]

    async def run(i: int, home: Path, stream: Any) -> None:
        out[i] = await contact(home, stream, **kw)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, 0, a, left)
        nursery.start_soon(run, 1, b, right)
    return out[0], out[1]


def test_two_nodes_converge_then_find_themselves_in_sync(tmp_path: Path) -> None:
    h = make_homes(tmp_path, suite="classical")
    other = _second_node(h)
    _ahead(h)
    assert _held(h.node_home) != _held(other)
    first, second = trio.run(_pair, h.node_home, other)
    assert first.complete, first
    assert second.complete, second
    assert first.sent >= 3
    assert second.received == first.sent
    assert second.imported["applied"], second.imported
    assert _held(h.node_home) == _held(other)
    again = trio.run(_pair, h.node_home, other)
    assert all(r.in_sync and r.complete and r.received == 0 for r in again)
    assert max(r.bytes_out for r in again) <= 256, [r.bytes_out for r in again]


def test_a_forged_document_from_a_peer_changes_nothing(tmp_path: Path) -> None:
    """A peer (anyone on the link) offers a bundle of our domain at a high version, signed by a key of
    its own: it is refused by the trust core and the store is unchanged."""
    from qhx_edge.core.suites import PrivateKey

    h = make_homes(tmp_path, suite="classical")
    held = _held(h.node_home)["alpha.example"]["bundle"]["version"]
    with node.Node(h.node_home) as n:
        current = n.store.current("alpha.example", "bundle")
    assert current is not None
    forged_payload = dataclasses.replace(current.payload, version=held + 5)
    forged = D.sign(forged_payload, [PrivateKey.generate("classical")])
    before = _trust(h.node_home)

    async def hostile(stream: Any) -> None:
        conn = sync.SyncConnection("mallory", {("alpha.example", "bundle"): held + 5})
        await stream.send_all(conn.data_to_send())
        while not conn.finished:
            conn.receive_data(bytes(await stream.receive_some(65536)))
            while (ev := conn.next_event()) is not sync.NEED_DATA:
                if isinstance(ev, sync.PeerInventory):
                    conn.want([])
                elif isinstance(ev, sync.PeerWants):
                    conn.send_documents([sync.Outgoing("alpha.example", "bundle", held + 5, forged)])
            await stream.send_all(conn.data_to_send())

    async def main() -> Any:
        left, right = trio.testing.memory_stream_pair()
        out: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hostile, right)

            async def ours() -> None:
                out.append(await contact(h.node_home, left))

            nursery.start_soon(ours)
        return out[0]

    got = trio.run(main)
    assert got.received == 1
    kinds = {d["report"] for d in got.imported["documents"]}
    assert kinds == {"rejected:threshold"}, got.imported  # no key of the pki role signed it
    assert _trust(h.node_home) == before


class Cutting(trio.abc.Stream):
    """A stream that delivers at most ``budget`` bytes from the peer, then behaves as a cut link."""

    def __init__(self, inner: trio.abc.Stream, budget: int) -> None:
        self.inner, self.budget = inner, budget

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.budget <= 0:
            raise trio.BrokenResourceError("cut")
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.budget <= 0:
            return b""
        data = await self.inner.receive_some(min(max_bytes or 65536, self.budget))
        self.budget -= len(data)
        return bytes(data)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_cut_transfer_resumes_where_it_stopped(tmp_path: Path) -> None:
    h = make_homes(tmp_path, suite="classical")
    other = _second_node(h)
    # A large policy (many registrations): several chunks.
    regs = [{"spiffe_id": f"spiffe://alpha.example/w/{i:05d}", "selectors": [f"unix:uid:{i}"]} for i in range(3000)]
    _ahead(h, {"registrations": regs})
    docs = catalog(_export(h.node_home))
    size = max(len(raw) for versions in docs.values() for _, _, raw in versions)
    assert size > 7 * sync.CHUNK, size
    lacking = inventory(catalog(_export(other)))
    needed = sum(
        len(raw) for o in answer(docs, tuple((d, t, lacking.get((d, t), 0)) for d, t in docs)) for raw in [o.raw]
    )
    memory = PeerMemory()
    received_total, cuts = 0, 0
    for budget in (3 * sync.CHUNK, 3 * sync.CHUNK, 10**9):  # the document needs more than 6 chunks
        got = trio.run(_cut_pair, h.node_home, other, memory, budget)
        received_total += got.bytes_in
        if not got.complete:
            cuts += 1
            assert got.error["kind"] in ("protocol", "unreachable"), got.error
            assert memory.partials, "what arrived of the large document is kept"
    assert got.complete
    assert cuts == 2
    assert _held(h.node_home) == _held(other)
    # What the receiver lacked arrived once, plus at most one chunk per cut, plus framing (hello,
    # summaries, inventories, chunk headers: a few KiB).
    assert received_total <= needed + cuts * sync.CHUNK + 8 * 1024, (received_total, needed)


def _export(home: Path) -> list[bytes]:
    with node.Node(home) as n:
        return n.export_documents(history=True)


async def _cut_pair(sender: Path, receiver: Path, memory: PeerMemory, budget: int) -> Any:
    left, right = trio.testing.memory_stream_pair()
    out: list[Any] = [None, None]

    async def run(i: int, home: Path, stream: Any, memory: PeerMemory | None) -> None:
        out[i] = await contact(home, stream, timeout=20, memory=memory)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, 0, sender, left, None)
        nursery.start_soon(run, 1, receiver, Cutting(right, budget), memory)
    return out[1]


def test_a_contact_over_real_tcp(tmp_path: Path) -> None:
    h = make_homes(tmp_path, suite="classical")
    other = _second_node(h)
    _ahead(h)

    async def main() -> tuple[Any, Any]:
        out: list[Any] = []
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        done = trio.Event()

        async def serve(stream: trio.SocketStream) -> None:
            out.append(await contact(h.node_home, stream))
            await stream.aclose()
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, serve, listeners)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            mine = await contact(other, stream)
            await stream.aclose()
            await done.wait()
            nursery.cancel_scope.cancel()
        return out[0], mine

    theirs, mine = trio.run(main)
    assert theirs.complete
    assert mine.complete
    assert mine.imported["applied"]
    assert _held(h.node_home) == _held(other)


def test_the_stores_index_gives_the_catalog_parsing_every_document_would(tmp_path: Path) -> None:
    """A contact chooses what to offer from the store's columns (Store.held_index), not by parsing
    every held document on every contact: the same catalog, agreements (keyed under their proposer,
    per pair) and a root chain included, delegations left out."""
    from qhx_edge.homes import node
    from qhx_edge.homes.sync_session import held_catalog
    from tests.test_federation import _connected

    _a, _b, n = _connected(tmp_path)
    with node.Node(n) as nd:
        parsed = catalog(nd.export_documents(history=True))
        indexed = held_catalog(nd.store.held_index())
    assert any(t.startswith("agreement/") for _d, t in indexed)
    assert indexed == parsed


class _SmallReads(trio.abc.Stream):
    """A slow radio link as the reader sees it: one byte per read, so a document can complete with nothing
    else under way (where a live link imports)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(1)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_root_rotation_pushed_over_a_live_link_arrives_whole(tmp_path: Path) -> None:
    """Review finding: a live link imported each document as it completed, and pushed the freshness
    (signed by a rotated freshness key) before the root that holds that key: the freshness was refused
    and never sent again, and the node was left with no freshness at all.  Now roots travel first."""
    import trio.testing

    from qhx_edge.homes.sync_session import News

    h = make_homes(tmp_path, suite="classical")
    other = _second_node(h)

    def held(home: Path) -> dict[str, int]:
        with node.Node(home) as n:
            return {t: v["version"] for t, v in n.summary()["domains"]["alpha.example"].items()}

    def rotate() -> None:
        now = clock.now()
        h.authority.rotate_root(now, root_keys=None, root_threshold=None, roles=("freshness",))
        with node.Node(h.node_home) as n:
            n.import_pack(h.authority.export_pack(h.authority.export_documents(), now), now)

    async def main() -> None:
        left, right = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(contact, h.node_home, left, live=True, news=News(), poll=0.2))
            nursery.start_soon(functools.partial(contact, other, _SmallReads(right), live=True, news=News(), poll=0.2))
            with trio.fail_after(30):
                while held(other) != held(h.node_home):
                    await trio.sleep(0.1)
            await trio.to_thread.run_sync(rotate)
            with trio.fail_after(30):
                while held(other) != held(h.node_home):
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert held(other)["root"] == 2
    assert "freshness" in held(other)


def test_a_live_link_reloads_its_catalog_only_when_the_trust_generation_moves(tmp_path: Path, monkeypatch: Any) -> None:
    """Review finding: every live link loaded the node's whole catalog every 2 s.  Now it reads the store's
    trust generation (one small query) and loads the catalog only when an import moved it."""
    import trio.testing

    from qhx_edge.homes import sync_session
    from qhx_edge.store.trust_store import trust_generation

    h = make_homes(tmp_path, suite="classical")
    other = _second_node(h)
    loads: list[Path] = []
    real = sync_session._load

    def counting(home: Path, peer_domain: str | None) -> Any:
        loads.append(home)
        return real(home, peer_domain)

    monkeypatch.setattr(sync_session, "_load", counting)
    before = trust_generation(h.node_home)

    async def main() -> None:
        left, right = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(contact, h.node_home, left, live=True, poll=0.05))
            nursery.start_soon(functools.partial(contact, other, right, live=True, poll=0.05))
            await trio.sleep(1.5)  # thirty looks each: the catalog loaded at the start and at the first look
            quiet = loads.count(h.node_home)
            _ahead(h)  # an import on the first node moves its generation ...
            with trio.fail_after(30):
                while loads.count(h.node_home) == quiet:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert quiet <= 2, quiet

    trio.run(main)
    assert trust_generation(h.node_home) > before
