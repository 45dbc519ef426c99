"""The notary: an HTTP-aware inbound tunnel that records the exchanges it carries (docs/architecture.md,
"Notary"; issue 11).

``qhx-edge tunnel inbound --notary`` verifies and authorizes each caller as every inbound tunnel does
(:mod:`qhx_edge.homes.tunnel`), then reads the HTTP/1.1 it carries (``h11``, only to find where each
message begins and ends: the bytes are forwarded as they came).  For each request, the policy's
``notary`` routes give a level (:func:`qhx_edge.core.authz.notary_level`); at any level the exchange
becomes a receipt (:mod:`qhx_edge.core.receipts`) in the node's receipt log
(:mod:`qhx_edge.store.receipt_log`), committed before the last bytes of the response are released to
the caller, so a caller never holds a recorded route's answer that the log lacks.  At ``sign-request``
the receipt is also signed on its own first.  A tree head over the log is signed every few seconds while
it grows, and when the tunnel stops.

A notary signs with its card's key, which the domain's notary role delegated to it (the ``notary``
document its authority makes at attestation): a node without a current notary delegation does not
start a notary.  What the notary does not carry: protocol switches (``Upgrade``, ``CONNECT``) are
refused, since what follows is not HTTP.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio

from qhx_edge.core import merkle
from qhx_edge.core.authz import notary_level
from qhx_edge.core.documents import NotaryDelegation
from qhx_edge.core.errors import Expired, Malformed, NotInitialised, QhxError
from qhx_edge.core.receipts import (
    MAX_TARGET,
    Party,
    Receipt,
    ReceiptFile,
    TreeHead,
    message_digest,
    sign_receipt,
    sign_tree_head,
)
from qhx_edge.core.suites import PrivateKey
from qhx_edge.store import clock
from qhx_edge.store.receipt_log import ReceiptLog

HEAD_INTERVAL = 5.0  # seconds between tree heads while the log grows
MAX_METHOD = 32
MAX_PENDING = 64  # pipelined requests awaiting their responses, per connection
BUFFER = 256 << 10


class Notary:
    """A node's notary: its key, card and notary delegation, and its receipt log (one connection per
    thread: the log is written from trio's worker threads)."""

    def __init__(self, home: Path, key: PrivateKey, domain: str, node_id: str, card: bytes, delegation: bytes,
                 expires: int) -> None:  # fmt: skip
        self.home, self.key, self.domain, self.node_id = Path(home), key, domain, node_id
        self.card, self.delegation, self.expires = card, delegation, expires
        self._local = threading.local()
        self._logs: list[ReceiptLog] = []
        self._lock = threading.Lock()

    @classmethod
    def open(cls, home: Path, passphrase: Callable[[], bytes], now: int) -> Notary:
        """The node's notary; ``not-initialised`` without a notary delegation, ``expired`` past it."""
        from qhx_edge.homes.node import Node

        with Node(home, passphrase) as n:
            held = n.store.current(n.domain, "notary")
            if held is None or not isinstance(held.payload, NotaryDelegation):
                raise NotInitialised(
                    f"node {n.node_id} holds no notary delegation: its authority makes one when it attests the node "
                    "(with a notary role); import the authority's export"
                )
            card = n.card()
            if hashlib.sha256(card).hexdigest() != held.payload.card_fingerprint:
                raise Malformed("the held notary delegation names another card than this node's")
            if now >= held.payload.expires:
                raise Expired(
                    f"this node's notary delegation v{held.payload.version} expired at {held.payload.expires}"
                )
            key = n.identity.signer
        log = ReceiptLog.open(home)
        assert log is not None
        try:
            log.keep_delegation(held.raw)  # what receipt files will name, after the store has moved on
        finally:
            log.close()
        return cls(home, key, n.domain, n.node_id, card, held.raw, held.payload.expires)

    @property
    def log(self) -> ReceiptLog:
        log: ReceiptLog | None = getattr(self._local, "log", None)
        if log is None:
            log = ReceiptLog.open(self.home, any_thread=True)  # used by its thread only, closed by close()
            assert log is not None
            self._local.log = log
            with self._lock:
                self._logs.append(log)
        return log

    def close(self) -> None:
        with self._lock:
            for log in self._logs:
                log.close()
            self._logs.clear()

    def record(self, ctx: Connection, level: str, exchange: Exchange | None, at: int) -> int:
        """Append the receipt of one exchange (``exchange`` None at ``workload-only``); its index."""
        if at >= self.expires:
            raise Expired(f"this node's notary delegation expired at {self.expires}: it records nothing")

        def make(seq: int) -> tuple[bytes, bytes | None, int]:
            http: dict[str, Any] = {}
            if level != "workload-only":
                assert exchange is not None
                http = {"method": exchange.method, "target": exchange.target, "status": exchange.status,
                        "request": exchange.request, "response": exchange.response}  # fmt: skip
                if len(exchange.method) > MAX_METHOD or len(exchange.target) > MAX_TARGET:
                    raise Malformed("a receipt cannot hold this method or target")
            receipt = Receipt(
                domain=self.domain, node_id=self.node_id, seq=seq, at=at, level=level, caller=ctx.caller,
                callee=ctx.callee, versions=ctx.versions, **http,
            ).to_bytes()  # fmt: skip
            return receipt, sign_receipt(receipt, self.key) if level == "sign-request" else None, at

        return self.log.append(make, ctx.certs)

    def sign_head(self, now: int) -> int | None:
        """Sign a tree head if the log grew since the newest; its size, or None."""

        def sign(size: int, root: bytes) -> tuple[bytes, int]:
            return sign_tree_head(TreeHead(self.domain, self.node_id, size, root, now), self.key), now

        made = self.log.add_head(sign)
        return made[0] if made is not None else None


def export(home: Path, seq: int, *, key: Callable[[], PrivateKey] | None = None, now: int | None = None) -> bytes:
    """The receipt file of receipt ``seq`` (``receipt export``): the receipt, the first signed tree head
    that holds it with the inclusion proof, the card, the notary delegation in force when they were
    signed, and the certificates.  A receipt no head holds yet gets a new head, signed with ``key()``
    (the node's signing key)."""
    from qhx_edge.core.documents import parse
    from qhx_edge.core.receipts import parse_tree_head
    from qhx_edge.homes.node import Node

    with Node(home) as n:
        card = n.card()
        domain, node_id = n.domain, n.node_id
        held = [raw for raw in n.store.held_documents(history=True) if parse(raw).type == "notary"]
    log = ReceiptLog.open(home, create=False)
    if log is None:
        raise Malformed("this node has recorded no receipt")
    try:
        delegations = [d for d in map(parse, {*held, *log.delegations()})
                       if d.type == "notary" and d.payload.domain == domain]  # fmt: skip
        if not delegations:
            raise NotInitialised("this node holds no notary delegation")
        receipt, signature = log.leaf(seq)
        covering = log.head_covering(seq)
        if covering is None:
            if key is None:
                raise NotInitialised(f"no signed tree head holds receipt {seq} yet, and no key was given to sign one")
            signer, at = key(), now if now is not None else clock.now()
            log.add_head(lambda size, root: (sign_tree_head(TreeHead(domain, node_id, size, root, at), signer), at))
            covering = log.head_covering(seq)
            assert covering is not None
        size, head = covering
        proof = merkle.inclusion_proof(log.leaf_hashes(size), seq)
        parsed = Receipt.from_bytes(receipt)
        certs = log.certs([*parsed.caller.certs, *(c for c in parsed.callee.certs if c not in parsed.caller.certs)])
    finally:
        log.close()
    from qhx_edge.core.cards import parse_card

    signed_at = [parse_tree_head(head, parse_card(card).signing_key).at, *([parsed.at] if signature else [])]
    # The delegation in force when the head (and the receipt) were signed: a later one, re-signed by a
    # rotated notary role or after a re-attestation, is issued after them and would not cover them.
    fits = [d for d in delegations if all(d.payload.issued_at <= t < d.payload.expires for t in signed_at)]
    chosen = max(fits or delegations, key=lambda d: d.payload.version)
    return ReceiptFile(receipt, signature, head, tuple(proof), card, chosen.raw, tuple(certs)).to_bytes()


def listing(home: Path, *, since: int = 0, limit: int = 100) -> dict[str, Any]:
    """``receipt list``: the receipts from index ``since``, and the newest signed tree head."""
    log = ReceiptLog.open(home, create=False)
    if log is None:
        return {"size": 0, "receipts": [], "tree_head": None}
    try:
        rows = log.conn.execute(
            "SELECT seq, receipt, signature IS NOT NULL FROM leaves WHERE seq >= ? ORDER BY seq LIMIT ?",
            (since, limit),
        ).fetchall()
        out = []
        for seq, raw, signed in rows:
            r = Receipt.from_bytes(bytes(raw))
            item = {"seq": seq, "at": r.at, "level": r.level, "caller": r.caller.spiffe_id,
                    "callee": r.callee.spiffe_id, "signed": bool(signed)}  # fmt: skip
            if r.level != "workload-only":
                item.update(method=r.method, target=r.target, status=r.status)
            out.append(item)
        newest = log.newest_head()
        head = {"size": newest[0], "root": newest[1].hex(), "at": newest[2]} if newest else None
        return {"size": log.size(), "receipts": out, "tree_head": head}
    finally:
        log.close()


# --- one connection -----------------------------------------------------------------------------------


@dataclass
class Connection:
    """What every receipt of one tunnel connection shares: both parties, the versions, the certificates."""

    service: str
    caller: Party
    callee: Party
    versions: dict[str, dict[str, int]]
    certs: dict[bytes, bytes]
    routes: tuple[Any, ...]

    @classmethod
    def make(cls, service: str, callee_chain: list[bytes], record: dict[str, Any]) -> Connection:
        got, chain = record["result"], record["chain"]
        caller_domain = str(got["domain"])
        versions: dict[str, dict[str, int]] = {record["home_domain"]: dict(record["home_versions"])}
        if caller_domain != record["home_domain"]:
            v = (
                {"spiffe": int(got["spiffe_sequence"])}
                if "spiffe_sequence" in got
                else {"bundle": int(got["bundle_version"])}
            )
            if got.get("revocation_version") is not None:
                v["revocation"] = int(got["revocation_version"])
            versions[caller_domain] = v
        certs = {hashlib.sha256(c).digest(): c for c in [*chain, *callee_chain]}
        return cls(service, Party.of_chain(str(got["spiffe_id"]), chain), Party.of_chain(service, callee_chain),
                   versions, certs, record["routes"])  # fmt: skip


@dataclass
class Exchange:
    """One request as the notary read it, and then its response (each with its own headers and body)."""

    method: str
    target: str
    level: str | None
    req_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    req_body: Any = field(default_factory=hashlib.sha256)
    request: bytes | None = None
    status: int | None = None
    resp_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    resp_body: Any = field(default_factory=hashlib.sha256)
    response: bytes | None = None
    close_delimited: bool = False  # the response ends when the service closes (RFC 9112 §6.3 rule 8)
    done: trio.Event = field(default_factory=trio.Event)


class NotaryRefused(Malformed):
    """What the notary will not carry: HTTP it cannot read as the service would, or cannot record."""


def _protocol_switch(ev: h11.Request) -> bool:
    return ev.method.upper() == b"CONNECT" or any(name == b"upgrade" for name, _ in ev.headers)


def _check_framing(headers: list[tuple[bytes, bytes]], what: str) -> None:
    """Refuse framing a service could read otherwise than h11 does (RFC 9112 §6.3: request smuggling):
    both Transfer-Encoding and Content-Length, or Content-Length repeated or not a plain number."""
    te = [v for n, v in headers if n == b"transfer-encoding"]
    cl = [v for n, v in headers if n == b"content-length"]
    if te and cl:
        raise NotaryRefused(f"{what} carries both Transfer-Encoding and Content-Length: refused (RFC 9112 §6.3)")
    if len(cl) > 1 or (cl and not cl[0].isdigit()):
        raise NotaryRefused(f"{what} carries an ambiguous Content-Length: refused")


def _close_delimited(exchange: Exchange) -> bool:
    headers = {n for n, _ in exchange.resp_headers}
    status = exchange.status or 0
    no_body = exchange.method == "HEAD" or status in (204, 304) or 100 <= status < 200
    return not no_body and b"transfer-encoding" not in headers and b"content-length" not in headers


async def splice(
    remote: trio.abc.Stream,
    local: trio.abc.HalfCloseableStream,
    notary: Any,
    ctx: Connection,
    report: Callable[[dict[str, Any]], None],
) -> tuple[int, int]:
    """Carry one authorized connection between the caller (``remote``) and the service (``local``),
    recording each exchange as its route's level says; bytes caller->service, service->caller.

    A refusal (:class:`NotaryRefused`, a receipt that cannot be committed) ends the connection abruptly
    (no TLS close_notify), so the caller sees a truncated response, never a complete unrecorded one."""
    send, receive = trio.open_memory_channel[Exchange](MAX_PENDING)
    up, down = [0], [0]

    async def requests() -> None:
        parser = h11.Connection(h11.SERVER)
        current: Exchange | None = None
        try:
            while True:
                data = bytes(await remote.receive_some(BUFFER))
                parser.receive_data(data)
                while True:
                    ev = parser.next_event()
                    if ev is h11.NEED_DATA:
                        break
                    if ev is h11.PAUSED:  # a whole request read: the next one starts a new cycle
                        leftover, closed = parser.trailing_data
                        parser = h11.Connection(h11.SERVER)
                        parser.receive_data(leftover)
                        if closed:
                            parser.receive_data(b"")
                        continue
                    if isinstance(ev, h11.Request):
                        current = _read_request(ev, ctx)
                        try:
                            send.send_nowait(current)
                        except trio.WouldBlock:
                            raise NotaryRefused(f"more than {MAX_PENDING} pipelined requests") from None
                    elif isinstance(ev, h11.Data) and current is not None:
                        current.req_body.update(ev.data)
                    elif isinstance(ev, h11.EndOfMessage) and current is not None:
                        current.request = message_digest(
                            [current.method, current.target], current.req_headers, current.req_body.digest(),
                            list(ev.headers),
                        )  # fmt: skip
                        current.done.set()
                        current = None
                    elif isinstance(ev, h11.ConnectionClosed):
                        break
                if not data:
                    break
                up[0] += len(data)  # forwarded only once read: a refused request goes no further
                await local.send_all(data)
            await local.send_eof()
        finally:
            if current is not None:
                current.done.set()  # the caller ended mid-request: its response gets no receipt (below)
            send.close()

    def next_parser(feed: bytes, eof: bool) -> tuple[h11.Connection, Exchange] | None:
        """A parser for the response to the oldest request still waiting for one, fed ``feed``."""
        try:
            exchange = receive.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            if feed.strip():
                raise NotaryRefused("the service sent a response to no request") from None
            return None
        parser = h11.Connection(h11.CLIENT)
        parser.send(h11.Request(method=exchange.method, target=exchange.target or "/", headers=[("host", "notary")]))
        parser.send(h11.EndOfMessage())
        parser.receive_data(feed)
        if eof:
            parser.receive_data(b"")
        return parser, exchange

    async def responses() -> None:
        current: tuple[h11.Connection, Exchange] | None = None
        held = b""  # the newest bytes of a recorded response that ends at close: released after its commit
        while True:
            data = bytes(await local.receive_some(BUFFER))
            eof = not data
            finished: list[Exchange] = []
            if current is not None:
                current[0].receive_data(data)  # b"" tells h11 the service closed
                feed = b""
            else:
                feed = data
            while True:
                if current is None:
                    if not feed or (current := next_parser(feed, eof)) is None:
                        break
                    feed = b""
                parser, exchange = current
                ev = parser.next_event()
                if ev is h11.NEED_DATA:
                    break
                if isinstance(ev, h11.InformationalResponse):
                    if ev.status_code == 101:
                        raise NotaryRefused("the service switched protocols; the notary carries HTTP/1.1 only")
                elif isinstance(ev, h11.Response):
                    exchange.status, exchange.resp_headers = ev.status_code, list(ev.headers)
                    _check_framing(exchange.resp_headers, f"the response to {exchange.method} {exchange.target}")
                    exchange.close_delimited = _close_delimited(exchange)
                elif isinstance(ev, h11.Data):
                    exchange.resp_body.update(ev.data)
                elif isinstance(ev, h11.EndOfMessage):
                    assert exchange.status is not None
                    exchange.response = message_digest(
                        [exchange.status], exchange.resp_headers, exchange.resp_body.digest(), list(ev.headers)
                    )
                    finished.append(exchange)
                elif ev is h11.PAUSED:  # a whole response read: what follows answers the next request
                    feed, _ = parser.trailing_data
                    current = None
                elif isinstance(ev, h11.ConnectionClosed):
                    current = None
                    break
            for ex in finished:  # committed before the bytes that end the response are released
                if ex.level is None:
                    continue
                await ex.done.wait()
                if ex.request is None:
                    raise NotaryRefused("the caller ended its request before the response came: not recorded")
                content = ex if ex.level != "workload-only" else None
                seq = await trio.to_thread.run_sync(notary.record, ctx, ex.level, content, clock.now())
                report({"event": "receipt", "seq": seq, "level": ex.level, "caller": ctx.caller.spiffe_id,
                        "method": ex.method, "target": ex.target, "status": ex.status})  # fmt: skip
            if current is not None and current[1].level is not None and current[1].close_delimited and not eof:
                # Its end is the close: nothing tells this chunk is not the last, so it waits for the next.
                out, held = held, data
            else:
                out, held = held + data, b""
            if out:
                down[0] += len(out)
                await remote.send_all(out)
            if eof:
                break
        if isinstance(remote, trio.abc.HalfCloseableStream):
            await remote.send_eof()

    refused: list[QhxError] = []

    async def guarded(fn: Callable[[], Any]) -> None:
        try:
            await fn()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            nursery.cancel_scope.cancel()
        except (QhxError, h11.ProtocolError) as exc:
            error = exc if isinstance(exc, QhxError) else NotaryRefused(f"the notary cannot read this HTTP: {exc}")
            refused.append(error)
            report({"event": "notary-refused", "caller": ctx.caller.spiffe_id, "error": error.to_json()})
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guarded, requests)
        nursery.start_soon(guarded, responses)
    if refused:
        await trio.aclose_forcefully(remote)  # no close_notify: the caller sees a truncation
    return up[0], down[0]


def _read_request(ev: h11.Request, ctx: Connection) -> Exchange:
    """The exchange a request head starts, or :class:`NotaryRefused` before any of its bytes go on."""
    if _protocol_switch(ev):
        raise NotaryRefused("the notary carries HTTP/1.1 exchanges only: no Upgrade or CONNECT")
    method, target = ev.method.decode("ascii", "replace"), ev.target.decode("ascii", "replace")
    if len(method) > MAX_METHOD or len(target) > MAX_TARGET:
        raise NotaryRefused(f"a request method over {MAX_METHOD} or target over {MAX_TARGET} characters")
    headers = list(ev.headers)
    _check_framing(headers, f"the request {method} {target[:64]}")
    try:
        level = notary_level(ctx.routes, ctx.service, method, target)
    except Malformed as exc:
        raise NotaryRefused(f"the request target cannot be matched to a route unambiguously: {exc.message}") from exc
    return Exchange(method, target, level, req_headers=headers)


async def sign_heads(notary: Notary, interval: float = HEAD_INTERVAL) -> None:
    """Sign a tree head every ``interval`` seconds while the log grows, and once more when cancelled."""
    try:
        while True:
            await trio.sleep(interval)
            await trio.to_thread.run_sync(notary.sign_head, clock.now())
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(notary.sign_head, clock.now())


# --- the log in evidence packs ------------------------------------------------------------------------

LOG_CONTENT_TYPE = "application/qhx-edge-receipt-log+cbor"
MAX_LOG_EVIDENCE = 1 << 20
MAX_LOG_HEADS = 64


def log_evidence(home: Path, signer: PrivateKey, node_id: str, domain: str) -> tuple[bytes, int] | None:
    """The receipt log's part of an evidence pack (``pack export --evidence``), signed by the node: the
    tree head exported last (``from``), the newest signed head, and an RFC 9162 §2.1.4 consistency proof
    from the one to the other; and the size to mark exported once the pack is written.  None when no
    head is newer than the one exported last.  One head and one proof, however long since the last
    export: the authority needs to tie the newest head to the one it holds, nothing between."""
    log = ReceiptLog.open(home, create=False)
    if log is None:
        return None
    try:
        start = log.exported_size()
        newest = log.newest_head()
        if newest is None or newest[0] <= start:
            return None
        first = None
        if start:
            row = log.conn.execute("SELECT signed FROM heads WHERE size = ?", (start,)).fetchone()
            first = bytes(row[0]) if row is not None else None  # lost: the authority will see the log start over
        proof = merkle.consistency_proof(log.leaf_hashes(newest[0]), start) if first is not None else []
    finally:
        log.close()
    from qhx_edge.core import cbor, cose

    body = {"type": "receipt-log", "node_id": node_id, "domain": domain, "from": first, "heads": [newest[3]],
            "proofs": [proof]}  # fmt: skip
    return cose.sign(cbor.encode(body), [signer], content_type=LOG_CONTENT_TYPE), newest[0]


def mark_exported(home: Path, size: int) -> None:
    """The tree head of ``size`` reached an evidence pack that was written: the next export starts there."""
    log = ReceiptLog.open(home, create=False)
    if log is not None:
        try:
            log.mark_exported(size)
        finally:
            log.close()


@dataclass(frozen=True)
class LogEvidence:
    start: tuple[TreeHead, bytes] | None  # the head exported before, as the node still signs it
    heads: list[tuple[TreeHead, bytes]]
    proofs: list[list[bytes]]


def is_log_evidence(raw: bytes) -> bool:
    from qhx_edge.core import cose

    try:
        return cose.Envelope.parse(raw, max_size=MAX_LOG_EVIDENCE).headers.get(cose.H_CONTENT_TYPE) == LOG_CONTENT_TYPE
    except QhxError:
        return False


def parse_log_evidence(raw: bytes, key: Any, node_id: str, domain: str) -> LogEvidence:
    """A receipt-log evidence item signed by ``key`` about ``node_id``'s log; every head signed by it too."""
    from qhx_edge.core import cose
    from qhx_edge.core.receipts import parse_tree_head

    body = cose.parse_signed(raw, content_type=LOG_CONTENT_TYPE, max_size=MAX_LOG_EVIDENCE, what="receipt-log evidence",
                             types=frozenset({"receipt-log"}), signer=key).body  # fmt: skip
    if set(body) != {"type", "node_id", "domain", "from", "heads", "proofs"}:
        raise Malformed("receipt-log evidence has type, node_id, domain, from, heads and proofs")
    if (body["node_id"], body["domain"]) != (node_id, domain):
        raise Malformed("receipt-log evidence about another node")
    heads, proofs = body["heads"], body["proofs"]
    if not isinstance(heads, list) or not isinstance(proofs, list) or not 1 <= len(heads) <= MAX_LOG_HEADS:
        raise Malformed(f"receipt-log evidence carries 1 to {MAX_LOG_HEADS} heads")
    if len(proofs) != len(heads) or not all(
        isinstance(p, list) and all(isinstance(h, bytes) for h in p) for p in proofs
    ):
        raise Malformed("receipt-log evidence carries one consistency proof per head")

    def head(item: Any) -> tuple[TreeHead, bytes]:
        if not isinstance(item, bytes):
            raise Malformed("a tree head is a signed message")
        h = parse_tree_head(item, key)
        if (h.node_id, h.domain) != (node_id, domain):
            raise Malformed("a tree head of another node's log")
        return h, item

    start = head(body["from"]) if body["from"] is not None else None
    parsed = [head(h) for h in heads]
    sizes = [h.size for h, _ in parsed]
    if sizes != sorted(set(sizes)) or (start is not None and sizes[0] <= start[0].size):
        raise Malformed("receipt-log evidence lists heads of growing trees")
    return LogEvidence(start, parsed, [list(p) for p in proofs])


def load_history(path: Path, anchors: list[str]) -> Any:
    """The bundle history at ``path`` (``receipt verify --history``): a node home (its documents with their
    history; the roots it holds are trusted, having been verified when imported), an authority home (what
    it published; its first root and the partner roots it pinned are trusted), or an unsealed pack
    (its documents; trusted only from a root named by ``anchors``)."""
    from qhx_edge.core.documents import MAX_DOCUMENT_SIZE, Root, parse
    from qhx_edge.core.receipts import History
    from qhx_edge.homes.layout import is_authority
    from qhx_edge.packs import pack
    from qhx_edge.store.files import read_capped

    path = Path(path)
    trusted = set(anchors)
    docs: list[bytes] = []
    if path.is_dir():
        if is_authority(path):
            for f in sorted((path / "published").glob("*/*.cbor")):
                docs.append(read_capped(f, MAX_DOCUMENT_SIZE, "published document"))
            first = path / "published" / "root" / "1.cbor"
            if first.exists():
                trusted.add(hashlib.sha256(first.read_bytes()).hexdigest())
            for f in sorted((path / "federation").glob("*/*.cbor")):  # partner roots pinned by fingerprint
                raw = read_capped(f, MAX_DOCUMENT_SIZE, "partner root")
                docs.append(raw)
                trusted.add(hashlib.sha256(raw).hexdigest())
        elif (path / "node.sqlite").exists():
            from qhx_edge.homes.node import Node

            with Node(path) as n:
                docs = n.store.held_documents(history=True)
            for raw in docs:
                try:
                    if isinstance(parse(raw).payload, Root):
                        trusted.add(hashlib.sha256(raw).hexdigest())
                except QhxError:
                    continue
        else:
            raise NotInitialised(f"{path} is neither a node home nor an authority home")
    else:
        data = read_capped(path, pack.MAX_PACK_SIZE, "pack")
        from qhx_edge.packs.seal import is_sealed

        if is_sealed(data):
            raise Malformed("a sealed pack: import it into a home first, and give the home as --history")
        docs = list(pack.parse(data).documents)
        if not anchors:
            raise Malformed("a pack as history needs --anchor FINGERPRINT: the root its chain is trusted from")
    return History(docs, trusted)
