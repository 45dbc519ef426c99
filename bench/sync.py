"""Sync links: bytes on the wire, handshakes and documents per second, against limits measured in the
same run (docs/architecture.md "Sync links").

Run ``python bench/sync.py`` (``--quick`` for CI, ``--dir`` for where the homes go: a real disk) from
the repository root.  It prints one JSON object; rates are paired medians (bench/common.py).

* ``wire_over_payload``: one contact over TLS 1.3 (X25519MLKEM768) on TCP loopback in which one side
  sends N real hybrid-signed documents (Ed25519 + ML-DSA-65, as a hybrid domain signs) the other
  lacks: every byte both TCP streams carried (TLS handshake, records, frames, acknowledgements) over
  the documents' own bytes.  Target <= 1.05.
* ``in_sync_contact_bytes``: the application bytes, both ways, of a contact between two peers that
  hold the same (a node's six document types, 16-character node ids).  Target <= 256.
* ``handshake_bytes``: TCP bytes, both ways, of a TLS 1.3 handshake and close with ECDSA P-256
  certificates over X25519 (classical) and X25519MLKEM768 (pq), and with ML-DSA-65 certificates
  over X25519MLKEM768 (pq_strict); each ``_resumed``: the same handshake resuming the session the
  first one left (stateful tickets, psk_dhe_ke: X25519MLKEM768 runs again, no certificate crosses),
  and ``_in_sync_resumed``: a whole contact with nothing new on a resumed session.
  ``in_sync_resumed_pq_strict``: that contact's total bytes with ML-DSA-65 certificates.  Target
  < 4096 (a full pq_strict handshake alone is about 31 KB).
* ``handshakes_per_s``: mutually authenticated PQ handshakes (ECDSA SVIDs, X25519MLKEM768) over TCP
  loopback with :class:`qhx_edge.links.tls.TlsStream` (connect, handshake, SVID check, close) ÷ the
  same handshake between two pyOpenSSL connections in memory (no socket, no event loop, no check).
  Target >= 0.75.  ``tcp_only_per_s`` is the same three flights over trio TCP without TLS, and
  ``ceiling_over_trio_tcp`` the ratio a link would reach if its handshake cost nothing beyond the
  in-memory one and that bare TCP: the part of the gap that TCP and the event loop take.
* ``documents_per_s``: documents a behind node receives and applies by one sync contact over TLS
  on loopback (``homes.sync_session.contact`` on both sides; a root chain of K versions plus the
  epoch), timed from the dial to the documents applied with the listener already up, as under
  ``serve`` ÷ ``Node.import_documents`` of the same documents into the same behind store, already
  open (a fresh copy each round).  Target >= 0.8.  ``contact_ms_median``: the whole contact.  What
  the import does not share: the TCP connection and TLS handshake, the protocol's round trips, and
  opening and closing the store on both sides (each contact opens it, and the last connection to
  close checkpoints the WAL).
"""

from __future__ import annotations

import datetime as dt
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python bench/sync.py), as CI does
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from bench.common import figure, main, paired
from qhx_edge.core import documents as D  # noqa: N812
from qhx_edge.core import sync
from qhx_edge.core.suites import PrivateKey
from qhx_edge.homes import node
from qhx_edge.homes.authority import Authority
from qhx_edge.homes.sync_session import contact
from qhx_edge.links import tls

PASSPHRASE = b"bench"
DOMAIN = "alpha.example"
SVID_ID = f"spiffe://{DOMAIN}/qhx-edge/sync"


@dataclass(frozen=True)
class Sizes:
    documents: int  # for the wire overhead
    handshake_rounds: int
    handshakes: int  # per round
    doc_rounds: int
    root_versions: int  # the chain a behind node receives


FULL = Sizes(documents=1000, handshake_rounds=7, handshakes=40, doc_rounds=5, root_versions=40)
QUICK = Sizes(documents=200, handshake_rounds=3, handshakes=10, doc_rounds=3, root_versions=10)


# --- credentials: a CA and SVIDs (ECDSA P-256 or ML-DSA-65) ------------------------------------------


def _cert(subject: str, key: Any, issuer_key: Any, issuer: str, *, ca: bool, uri: str | None = None) -> bytes:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca, None), critical=True)
        .add_extension(x509.KeyUsage(not ca, False, False, False, False, ca, ca, False, False), critical=True)
    )
    if uri is not None:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
    algorithm = hashes.SHA256() if isinstance(issuer_key, ec.EllipticCurvePrivateKey) else None
    return b.sign(issuer_key, algorithm).public_bytes(serialization.Encoding.DER)


def credentials(kind: str) -> tuple[tls.Credential, tls.Credential, bytes]:
    """Two SVID credentials (server, client) under one CA, and the CA (DER)."""
    make = (lambda: ec.generate_private_key(ec.SECP256R1())) if kind == "ecdsa" else mldsa.MLDSA65PrivateKey.generate
    ca_key = make()
    ca = _cert("bench CA", ca_key, ca_key, "bench CA", ca=True)
    out = []
    for name in ("server", "client"):
        key = make()
        leaf = _cert(name, key, ca_key, "bench CA", ca=False, uri=SVID_ID)
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
        out.append(tls.Credential.from_der([leaf, ca], der))
    return out[0], out[1], ca


class Counting(trio.abc.Stream):
    """A stream that counts the bytes it carries both ways."""

    def __init__(self, inner: trio.abc.Stream, counter: list[int]) -> None:
        self.inner, self.counter = inner, counter

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.counter[0] += len(data)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.counter[0] += len(data)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


async def tls_pair(
    server: tls.Credential,
    client: tls.Credential,
    ca: bytes,
    groups: tuple[str, ...],
    handler: Any,
    counter: list[int],
    contexts: tuple[SSL.Context, SSL.Context] | None = None,
    session: SSL.Session | None = None,
) -> Any:
    """A TCP listener on loopback, one mutually authenticated TLS connection to it; ``handler(server_stream,
    client_stream)`` runs with both ends; the bytes the client's TCP stream carried are counted.  With
    ``contexts`` (server, client) and ``session``, the client offers to resume that session."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    verify = tls.spiffe_verifier([ca], SVID_ID)
    if contexts is None:
        contexts = (
            tls.make_context(server, server=True, groups=groups, require_client_certificate=True),
            tls.make_context(client, server=False, groups=groups),
        )
    server_ctx, client_ctx = contexts
    out: list[Any] = []
    async with trio.open_nursery() as nursery:
        accepted: trio.MemorySendChannel[Any]
        accepted, incoming = trio.open_memory_channel[Any](1)

        async def accept() -> None:
            tcp = await listeners[0].accept()
            await accepted.send(tls.TlsStream(tcp, server_ctx, server_side=True, verify_peer=verify))

        nursery.start_soon(accept)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        client_stream = tls.TlsStream(
            Counting(tcp, counter), client_ctx, server_side=False, verify_peer=verify, session=session
        )
        server_stream = await incoming.receive()
        out.append(await handler(server_stream, client_stream))
        await listeners[0].aclose()
    return out[0]


# --- figures ------------------------------------------------------------------------------------------


def wire_figure(sizes: Sizes) -> dict[str, Any]:
    signer = PrivateKey.generate("hybrid")
    docs = []
    for i in range(sizes.documents):
        payload = D.Freshness(domain=DOMAIN, version=i + 1, issued_at=1_800_000_000 + i, expires=1_900_000_000,
                              versions={"root": 1, "bundle": 1, "policy": 1}, agreements={})  # fmt: skip
        docs.append(D.sign(payload, [signer]))
    payload_bytes = sum(map(len, docs))
    server, client, ca = credentials("ecdsa")
    counter = [0]

    async def handler(server_stream: Any, client_stream: Any) -> int:
        received = [0]
        sender = sync.SyncConnection("sender0123456789", {(DOMAIN, "freshness"): len(docs)})
        receiver = sync.SyncConnection("receive012345678", {})

        async def drive(conn: sync.SyncConnection, stream: Any) -> None:
            async def writer() -> None:
                while not conn.finished:
                    data = conn.data_to_send()
                    if data:
                        await stream.send_all(data)
                    else:
                        await trio.sleep(0)
                data = conn.data_to_send()
                if data:
                    await stream.send_all(data)

            async def reader() -> None:
                while not conn.finished:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                    while (ev := conn.next_event()) is not sync.NEED_DATA:
                        if isinstance(ev, sync.PeerInventory):
                            conn.want([(d, t, 0) for d, t, _v in ev.newer])
                        elif isinstance(ev, sync.PeerWants):
                            outgoing = [sync.Outgoing(DOMAIN, "freshness", i + 1, raw) for i, raw in enumerate(docs)]
                            conn.send_documents(outgoing if ev.items else [])  # the receiver wants nothing
                        elif isinstance(ev, sync.DocumentReceived):
                            received[0] += 1

            async with trio.open_nursery() as n:
                n.start_soon(writer)
                n.start_soon(reader)

        async with trio.open_nursery() as n:
            n.start_soon(drive, sender, server_stream)
            n.start_soon(drive, receiver, client_stream)
        await client_stream.aclose()
        await server_stream.aclose()
        return received[0]

    got = trio.run(tls_pair, server, client, ca, tls.PQ_GROUPS, handler, counter)
    assert got == len(docs), got
    return figure(counter[0] / payload_bytes, 1.05, higher_is_better=False, documents=len(docs),
                  payload_bytes=payload_bytes, wire_bytes=counter[0])  # fmt: skip


def in_sync_figure() -> dict[str, Any]:
    inventory = {(DOMAIN, t): 3 for t in ("root", "bundle", "policy", "freshness", "revocation", "agreement/beta")}
    a = sync.SyncConnection("0123456789abcdef", inventory)
    b = sync.SyncConnection("fedcba9876543210", inventory)
    for _ in range(4):
        if data := a.data_to_send():
            b.receive_data(data)
        if data := b.data_to_send():
            a.receive_data(data)
        for c in (a, b):
            while c.next_event() is not sync.NEED_DATA:
                pass
    assert a.finished
    assert b.finished
    return figure(a.bytes_out + b.bytes_out, 256, higher_is_better=False, each_way=[a.bytes_out, b.bytes_out])


async def drive_in_sync(conn: sync.SyncConnection, stream: Any) -> None:
    """One side of a contact between in-sync peers over a trio stream, to its end."""
    while not conn.finished:
        if data := conn.data_to_send():
            await stream.send_all(data)
        if conn.finished:
            break
        conn.receive_data(bytes(await stream.receive_some(65536)))
        while conn.next_event() is not sync.NEED_DATA:
            pass
    if data := conn.data_to_send():
        await stream.send_all(data)


def handshake_bytes() -> dict[str, Any]:
    """Full handshakes (classical, pq, pq_strict), then a pq_strict session resumed: its handshake, and a
    whole in-sync contact on it (TLS, both ways, the close included)."""
    out: dict[str, Any] = {}
    inventory = {(DOMAIN, t): 3 for t in ("root", "bundle", "policy", "freshness", "revocation", "agreement/beta")}
    for name, kind, groups in (
        ("classical", "ecdsa", ("X25519",)),
        ("pq", "ecdsa", tls.PQ_GROUPS),
        ("pq_strict", "mldsa", tls.PQ_GROUPS),
    ):
        server, client, ca = credentials(kind)
        contexts = (
            tls.ServerContexts(groups=groups, require_client_certificate=True)(server),
            tls.make_context(client, server=False, groups=groups),
        )
        sessions: list[Any] = []

        def handler(in_sync: bool, sessions: list[Any] = sessions) -> Any:
            async def run(s: Any, c: Any) -> bool:
                async with trio.open_nursery() as n:
                    n.start_soon(s.do_handshake)
                    n.start_soon(c.do_handshake)
                if in_sync:
                    async with trio.open_nursery() as n:
                        n.start_soon(drive_in_sync, sync.SyncConnection("0123456789abcdef", inventory), s)
                        n.start_soon(drive_in_sync, sync.SyncConnection("fedcba9876543210", inventory), c)
                else:
                    await s.send_all(b"\0")  # the session tickets leave with the server's first send
                    await c.receive_some(1)
                await c.aclose()
                await s.aclose()
                sessions.append(c.session)
                return bool(c.resumed)

            return run

        for label, in_sync, resume in ((name, False, False), (f"{name}_resumed", False, True),
                                       (f"{name}_in_sync_resumed", True, True)):  # fmt: skip
            counter = [0]
            session = sessions[-1] if resume else None
            resumed = trio.run(tls_pair, server, client, ca, groups, handler(in_sync), counter, contexts, session)
            assert resumed == resume, label
            out[label] = counter[0]
    out["in_sync_resumed_pq_strict"] = figure(out["pq_strict_in_sync_resumed"], 4096, higher_is_better=False,
                                              full_handshake=out["pq_strict"])  # fmt: skip
    return out


def memory_handshake(server_ctx: SSL.Context, client_ctx: SSL.Context) -> None:
    s, c = SSL.Connection(server_ctx, None), SSL.Connection(client_ctx, None)
    s.set_accept_state()
    c.set_connect_state()
    for _ in range(20):
        done = 0
        for me, other in ((c, s), (s, c)):
            try:
                me.do_handshake()
                done += 1
            except SSL.WantReadError:
                pass
            try:
                data = me.bio_read(1 << 20)
            except SSL.WantReadError:
                data = b""
            if data:
                other.bio_write(data)
        if done == 2:
            return
    raise RuntimeError("the in-memory handshake did not finish")


def handshake_rate(sizes: Sizes) -> dict[str, Any]:
    server, client, ca = credentials("ecdsa")
    server_ctx = tls.make_context(server, server=True, groups=tls.PQ_GROUPS, require_client_certificate=True)
    client_ctx = tls.make_context(client, server=False, groups=tls.PQ_GROUPS)
    verify = tls.spiffe_verifier([ca], SVID_ID)
    n = sizes.handshakes

    def limit() -> float:
        t = time.perf_counter()
        for _ in range(n):
            memory_handshake(server_ctx, client_ctx)
        return n / (time.perf_counter() - t)

    async def loopback() -> float:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def serve(tcp: trio.SocketStream) -> None:
            stream = tls.TlsStream(tcp, server_ctx, server_side=True, verify_peer=verify)
            try:
                await stream.do_handshake()
            finally:
                await trio.aclose_forcefully(stream)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, serve, listeners)
            t = time.perf_counter()
            for _ in range(n):
                stream = await tls.connect("127.0.0.1", port, client_ctx, verify)
                await trio.aclose_forcefully(stream)
            rate = n / (time.perf_counter() - t)
            nursery.cancel_scope.cancel()
        return rate

    async def tcp_floor() -> float:
        """The same flights (ClientHello, the server's flight, the client's) over trio TCP, no TLS."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def serve(tcp: trio.SocketStream) -> None:
            await tcp.receive_some(65536)
            await tcp.send_all(bytes(2300))
            await tcp.receive_some(65536)
            await trio.aclose_forcefully(tcp)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, serve, listeners)
            t = time.perf_counter()
            for _ in range(n):
                tcp = await trio.open_tcp_stream("127.0.0.1", port)
                await tcp.send_all(bytes(1400))
                await tcp.receive_some(65536)
                await tcp.send_all(bytes(1000))
                await trio.aclose_forcefully(tcp)
            rate = n / (time.perf_counter() - t)
            nursery.cancel_scope.cancel()
        return rate

    result = paired(sizes.handshake_rounds, limit, lambda: trio.run(loopback))
    floor = paired(sizes.handshake_rounds, limit, lambda: trio.run(tcp_floor))
    # The best ratio any TLS over trio TCP could reach here: the in-memory handshake plus bare TCP.
    ceiling = 1 / (1 + floor["limit_median"] / floor["measured_median"])
    return figure(result["ratio"], 0.75, limit_per_s=round(result["limit_median"], 1),
                  measured_per_s=round(result["measured_median"], 1), rounds=result["rounds"],
                  tcp_only_per_s=round(floor["measured_median"], 1),
                  ceiling_over_trio_tcp=round(ceiling, 3))  # fmt: skip


def documents_rate(sizes: Sizes, tmp: Path) -> dict[str, Any]:
    """A behind node receives a root chain of K versions (and the epoch) by sync, against importing them."""
    now = int(time.time())
    auth = Authority.init(
        tmp / "A", DOMAIN, suite="classical", root_keys=1, root_threshold=1, passphrase=PASSPHRASE, now=now
    )
    template = tmp / "behind"
    node.init(template, auth.anchor(), now, passphrase=PASSPHRASE)
    with node.Node(template) as n:
        n.import_pack(auth.export_pack(auth.export_documents(), now), now)
    for _ in range(sizes.root_versions):
        auth.rotate_root(now, root_keys=None, root_threshold=None)
    ahead = tmp / "ahead"
    node.init(ahead, auth.published("root", 1), now, passphrase=PASSPHRASE)  # walks the whole chain
    with node.Node(ahead) as n:
        n.import_pack(auth.export_pack(auth.export_documents(), now), now)
        docs = [d for d in n.export_documents(history=True) if D.parse(d).type != "delegation"]
    server, client, ca = credentials("ecdsa")
    rounds = iter(range(10**6))

    def fresh() -> Path:
        home = tmp / f"behind-{next(rounds)}"
        shutil.copytree(template, home)
        return home

    applied: list[int] = []

    def limit() -> float:
        home = fresh()
        with node.Node(home) as n:
            t = time.perf_counter()
            result = n.import_documents(docs, int(time.time()), source="bench")
            rate = len(docs) / (time.perf_counter() - t)
        assert result.applied
        return rate

    server_ctx = tls.make_context(server, server=True, groups=tls.PQ_GROUPS, require_client_certificate=True)
    client_ctx = tls.make_context(client, server=False, groups=tls.PQ_GROUPS)
    verify = tls.spiffe_verifier([ca], SVID_ID)
    contact_ms: list[float] = []

    def measured() -> float:
        """One contact as a running node pays it: from the dial (TCP, TLS, the contact) to the behind
        node's documents applied; the listener is already up (as under serve) and not timed."""
        home = fresh()

        async def one() -> tuple[float, Any]:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]

            async def serve(tcp: trio.SocketStream) -> None:
                async with tls.TlsStream(tcp, server_ctx, server_side=True, verify_peer=verify) as stream:
                    await contact(ahead, stream)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, serve, listeners)
                t = time.perf_counter()
                async with await tls.connect("127.0.0.1", port, client_ctx, verify) as stream:
                    got = await contact(home, stream)
                elapsed = time.perf_counter() - t
                nursery.cancel_scope.cancel()
            return elapsed, got

        elapsed, result = trio.run(one)
        assert result.complete, result.error
        assert result.imported["applied"], result.imported
        applied.append(result.received)
        contact_ms.append(elapsed * 1000)
        return float(result.received / elapsed)

    result = paired(sizes.doc_rounds, limit, measured)
    return figure(result["ratio"], 0.8, documents=applied[0], limit_per_s=round(result["limit_median"], 1),
                  measured_per_s=round(result["measured_median"], 1), rounds=result["rounds"],
                  contact_ms_median=round(statistics.median(contact_ms), 1))  # fmt: skip


def run(quick: bool, tmp: Path) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    t0 = time.perf_counter()
    out: dict[str, Any] = {"mode": "quick" if quick else "full"}
    out["wire_over_payload"] = wire_figure(sizes)
    out["in_sync_contact_bytes"] = in_sync_figure()
    out["handshake_bytes"] = handshake_bytes()
    out["handshakes_per_s"] = handshake_rate(sizes)
    out["documents_per_s"] = documents_rate(sizes, tmp)
    out["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return out


if __name__ == "__main__":
    sys.exit(main(run, __doc__))
