"""The sync protocol, sans-IO: bytes in, events out, bytes to send (docs/architecture.md, "Sync protocol").

Like h11, this module owns no socket, no clock and no store: a link (TCP and
TLS, a pack file, the simulator) feeds it what it read with
:meth:`SyncConnection.receive_data`, takes :meth:`SyncConnection.next_event`
until :data:`NEED_DATA`, answers the events that ask for a decision
(:class:`PeerInventory` with :meth:`~SyncConnection.want`,
:class:`PeerWants` with :meth:`~SyncConnection.send_documents`), and writes
what :meth:`SyncConnection.data_to_send` returns.  Received documents are only
bytes here: the caller verifies and stores them through the same trust core
and one-writer store as a pack (homes/), so nothing this module passes on is
trusted because it arrived.

A contact, each side doing the same (full duplex, no client or server role)::

    hello     {"m": "hello", "versions": [1], "node": ID, "caps": [...]}
    summary   {"m": "summary", "digest": H(inventory), "count": N}
      -- equal digests: nothing new either way --------------------> done
    inventory {"m": "inventory", "items": [[domain, type, version], ...]}   newest held per (domain, type)
    want      {"m": "want", "items": [[domain, type, since], ...], "partial": [[id, offset], ...]}
    chunk     {"m": "chunk", "id": sha256(doc), "total": n, "offset": o, "data": bytes}   urgent first
    ack       {"m": "ack", "id": id, "upto": o}
    done      {"m": "done"}            I have sent (and had acknowledged) all you wanted
    push      {"m": "push", "items": [[domain, type, version, id], ...]}   live links only, see below

Rules:

* Frames are a 4-byte big-endian length and one deterministic CBOR map
  (RFC 8949 §4.2.1) of at most :data:`MAX_FRAME` bytes; a frame that is
  larger, not deterministic, of an unknown message, in the wrong phase, or
  that breaks a cap is the peer's protocol error (:class:`SyncProtocolError`
  with ``by_peer=True``); a call out of order is ours (``by_peer=False``).
* Versions: each side lists the protocol versions it speaks; the highest
  common one is used, none in common ends the contact.
* Two peers whose summaries are equal exchange hello, summary and done and
  nothing else (a few hundred bytes), as tailnet lock compares heads.
* Otherwise each side says what it holds (newest version per domain and
  type, not every version), the other asks for what it lacks
  (``since`` = its newest), and the holder sends those documents in
  urgency order: roots (a rotation's keys sign what follows: on a live link each document is
  imported as it completes), revocations, freshness, then bundles, policy and
  agreements, then the rest (:data:`URGENCY`).
* Documents travel in chunks of at most :data:`CHUNK` bytes, each
  acknowledged; at most ``window`` bytes are unacknowledged at once
  (back-pressure on slow links).  A cut loses at most the unacknowledged
  chunks: the receiver keeps what it got (:meth:`~SyncConnection.partials`)
  and names it in its next ``want`` so the sender resumes at that offset.
* A live link (both hellos list the ``live`` capability, :data:`LIVE`) stays open after the
  contact: either side then *pushes* what it learns the moment it learns it (:meth:`~SyncConnection.push`),
  announcing each document by ``push`` before its chunks, and the receiver passes each on as it
  completes.  A side that remembers its peer spoke ``live`` may push from the first flight, before
  the pull exchange, what it believes the peer lacks (:meth:`~SyncConnection.lacking`); one pull
  exchange still follows, so a wrong belief costs bytes, never a document.  Pushed bytes count
  against the same ``max_receive`` cap as pulled ones, over the life of the connection.
* A reassembled document must hash to its id (SHA-256 of its bytes), and an
  inventory must hash to the summary sent before it: a relay can cut a
  transfer, not splice it.  The protocol does not authenticate the rest of
  its metadata (a want's ``since``, a ``done``): the link does (TLS), and
  every document authenticates itself to the trust core.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from qhx_edge.core import cbor
from qhx_edge.core.documents import MAX_DOCUMENT_SIZE
from qhx_edge.core.errors import QhxError, Rejected

PROTOCOL_VERSIONS: Final = (1,)
MAX_FRAME: Final = 64 << 10  # a message's CBOR, chunk data included
CHUNK: Final = 16 << 10  # document bytes per chunk
DEFAULT_WINDOW: Final = 256 << 10  # unacknowledged document bytes in flight
MAX_ITEMS: Final = 4096  # entries of an inventory or a want
MAX_PARTIALS: Final = 256  # resumable transfers named in a want, and kept by a receiver
MAX_NODE_ID: Final = 256
MAX_CAPS: Final = 32
MAX_NAME: Final = 255  # a domain or document type name in an item
MAX_CONTACT_BYTES: Final = 64 << 20  # document bytes one contact may bring (a peer sending what we never wanted)
LIVE: Final = "live"  # the capability of a link that stays open and pushes news (module docstring)
_HEADER = struct.Struct(">I")

# Who goes first on a link: lower is sooner (docs/architecture.md, "Sync protocol").
URGENCY: Final[Mapping[str, int]] = {
    "root": 0,
    "revocation": 1,
    "freshness": 2,
    "bundle": 3,
    "policy": 3,
    "agreement": 3,
    "delegation": 4,
    "notary": 4,
}
BULK: Final = 5


class SyncProtocolError(Rejected):
    """The sync protocol was broken: by the peer (``by_peer``, its bytes are refused) or by us."""

    kind: ClassVar[str] = "protocol"

    def __init__(self, message: str, *, by_peer: bool = True) -> None:
        super().__init__(message)
        self.by_peer = by_peer

    def to_json(self) -> dict[str, str]:
        return {**super().to_json(), "by": "peer" if self.by_peer else "us"}


def _local(message: str) -> SyncProtocolError:
    return SyncProtocolError(message, by_peer=False)


# --- what is synced ---------------------------------------------------------------------


Key = tuple[str, str]  # (domain, type)


@dataclass(frozen=True)
class Outgoing:
    """One document the caller sends in answer to a want."""

    domain: str
    type: str
    version: int
    raw: bytes
    sync_type: str = ""  # the inventory's name for it when not its type (an agreement: agreement/PARTNER)

    @property
    def key(self) -> Key:
        return (self.domain, self.sync_type or self.type)

    @property
    def id(self) -> bytes:
        return hashlib.sha256(self.raw).digest()


def wants(
    ours: Mapping[Key, int], newer: Iterable[tuple[str, str, int]], trusted: Container[str]
) -> list[tuple[str, str, int]]:
    """What a node asks for of what its peer holds newer (:class:`PeerInventory`), from its own newest on:
    documents of domains it trusts; an agreement between another domain and one it trusts (keyed by its
    proposer, ``agreement/PARTNER``), which its own root verifies; and with such an agreement, the other
    party's root chain, which the agreement pins (the trust core takes the two together, or neither)."""
    newer = list(newer)
    opening: set[str] = set()  # the other party of an agreement with a domain we trust
    for d, t, _v in newer:
        if t.startswith("agreement/"):
            x = t.removeprefix("agreement/")
            opening |= {d} if x in trusted else {x} if d in trusted else set()

    def wanted(d: str, t: str) -> bool:
        return d in trusted or (d in opening and (t == "root" or t.startswith("agreement/")))

    return [(d, t, ours.get((d, t), 0)) for d, t, v in newer if wanted(d, t) and v > ours.get((d, t), 0)]


def summary_digest(inventory: Mapping[Key, int]) -> bytes:
    """The digest two peers compare: the inventory in a canonical order, hashed (domain-separated)."""
    items = sorted([d, t, v] for (d, t), v in inventory.items())
    return hashlib.sha256(cbor.encode(["qhx-edge sync summary", items])).digest()


# --- events -------------------------------------------------------------------------------


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


@dataclass(frozen=True)
class PeerHello:
    node: str
    version: int
    caps: tuple[str, ...]


@dataclass(frozen=True)
class InSync:
    """The summaries are equal: neither side has anything new for the other."""


@dataclass(frozen=True)
class PeerInventory:
    """The peer holds newer versions than we do of these; answer with :meth:`SyncConnection.want`."""

    newer: tuple[tuple[str, str, int], ...]  # (domain, type, the peer's newest version)


@dataclass(frozen=True)
class PeerWants:
    """The peer asks for documents newer than ``since``; answer with :meth:`SyncConnection.send_documents`."""

    items: tuple[tuple[str, str, int], ...]  # (domain, type, since)


@dataclass(frozen=True)
class DocumentReceived:
    """A whole document, its bytes matching its id; still to be verified by the caller."""

    raw: bytes


@dataclass(frozen=True)
class PeerDone:
    """The peer has sent all we wanted, and we acknowledged it."""


@dataclass(frozen=True)
class Finished:
    """Both sides are done: the contact is over (a link may close)."""


Event = PeerHello | InSync | PeerInventory | PeerWants | DocumentReceived | PeerDone | Finished


# --- the connection -------------------------------------------------------------------------


@dataclass
class _Out:
    id: bytes
    raw: bytes
    urgency: int
    sent: int = 0  # bytes handed to data_to_send
    acked: int = 0
    announce: list[Any] | None = None  # a pushed document's push item, sent just before its first chunk


@dataclass
class _In:
    total: int
    data: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class Partial:
    """What a receiver holds of a document it did not finish: kept across contacts to resume."""

    total: int
    data: bytes


class SyncConnection:
    """One contact with one peer (see the module docstring).

    ``inventory``: the newest version we hold per (domain, type) that this
    peer may receive and that we compare (the caller filters by agreements).
    ``partials``: what an earlier contact with this peer left unfinished
    (:meth:`partials` of that contact).
    """

    def __init__(
        self,
        node: str,
        inventory: Mapping[Key, int],
        *,
        partials: Mapping[bytes, Partial] | None = None,
        window: int = DEFAULT_WINDOW,
        versions: Sequence[int] = PROTOCOL_VERSIONS,
        caps: Sequence[str] = (),
        max_receive: int = MAX_CONTACT_BYTES,
        peer_live: bool = False,
        peer_inventory: Mapping[Key, int] | None = None,
    ) -> None:
        if window < CHUNK:
            raise _local(f"the window ({window}) must hold at least one chunk ({CHUNK})")
        self.node = node
        self.inventory = dict(inventory)
        self.window = window
        self.version: int | None = None
        self.peer: PeerHello | None = None
        self._versions = tuple(versions)
        self._in_buf = bytearray()
        self._events: deque[Event] = deque()
        self._out_frames: list[bytes] = []
        self._digest = summary_digest(self.inventory)
        self._peer_summary: bytes | None = None
        self._sent_inventory = False
        self._got_inventory = False
        self._sent_want = False
        self._got_want = False
        self._answered_want = False
        self._sent_done = False
        self._got_done = False
        self._finished = False
        self._eof = False
        self._offered: set[Key] = set()  # what the peer's inventory made us allowed to want
        self._wanted: set[Key] = set()
        self._queue: list[_Out] = []
        self._resume: dict[bytes, int] = {}  # id -> offset the peer already holds
        self._partial: dict[bytes, _In] = {
            i: _In(p.total, bytearray(p.data)) for i, p in (partials or {}).items() if 0 < len(p.data) < p.total
        }
        self._touched: set[bytes] = set()  # transfers a chunk of this contact added to
        self._carried: set[bytes] = set(self._partial)  # transfers resumed from an earlier contact's partials
        self._received = 0  # document bytes received in this contact
        self._caps = tuple(caps)
        self._peer_live = peer_live and LIVE in self._caps  # remembered from an earlier contact
        self._announced: dict[bytes, int] = {}  # pushed ids we were told of and have not completed -> total
        self._completed: set[bytes] = set()  # ids received whole on this connection: never taken twice
        self._acks: dict[bytes, int] = {}  # the acknowledgement owed per id (its latest offset), sent next
        self._given: dict[Key, int] = {}  # the newest we queued for the peer, per key (it holds it or refused it)
        self._peer_held: dict[Key, int] | None = dict(peer_inventory) if peer_inventory is not None else None
        self._queued: set[bytes] = set()  # ids sent or queued in this connection: each at most once
        self.max_receive = max_receive
        self.bytes_in = 0  # wire bytes received and sent, for link statistics
        self.bytes_out = 0
        self._frame({"m": "hello", "versions": list(self._versions), "node": node, "caps": list(caps)})
        self._frame({"m": "summary", "digest": self._digest, "count": len(self.inventory)})

    # --- the caller's side ---------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def quiescent(self) -> bool:
        """No transfer is half received: what arrived may be imported now (a live link imports at these points)."""
        return not self._announced and not any(i in self._partial for i in self._touched)

    @property
    def live(self) -> bool:
        """Both sides speak ``live``: the link stays open after the contact and either side may push."""
        return LIVE in self._caps and self.peer is not None and LIVE in self.peer.caps

    def peer_inventory(self) -> dict[Key, int] | None:
        """What we believe the peer holds: its inventory (or ours, when the summaries were equal), or what
        an earlier contact left, raised by what it announced and by what we sent it; None if unknown."""
        if self._peer_held is None:
            return None
        out = dict(self._peer_held)
        for key, v in self._given.items():
            out[key] = max(out.get(key, 0), v)
        return out

    def lacking(self, ours: Mapping[Key, int]) -> list[tuple[str, str, int]]:
        """Of ``ours``, what the peer lacks as far as we know, as want items ``(domain, type, since)``:
        only domains the peer holds something of (it trusts nothing else); none if we know nothing of it."""
        held = self.peer_inventory()
        if held is None:
            return []
        domains = {d for d, _t in held}
        return [(d, t, held.get((d, t), 0)) for (d, t), v in sorted(ours.items())
                if d in domains and v > held.get((d, t), 0)]  # fmt: skip

    def push(self, docs: Iterable[Outgoing]) -> None:
        """Send these documents unasked, urgent first, on a live link (after the contact, or from the
        first flight when the peer was remembered to speak ``live``); documents this connection already
        sent or queued are skipped."""
        if LIVE not in self._caps:
            raise _local("push() on a connection that did not offer the live capability")
        if self.peer is not None and not self.live:
            raise _local("push() to a peer that does not speak live")
        if self.peer is None and not self._peer_live:
            raise _local("push() before the peer's hello, to a peer not known to speak live")
        self._enqueue(docs, push=True)

    def _enqueue(self, docs: Iterable[Outgoing], *, push: bool = False) -> list[Outgoing]:
        fresh: list[Outgoing] = []
        for doc in docs:
            if len(doc.raw) > MAX_DOCUMENT_SIZE or not doc.raw:
                raise _local(f"a document of {len(doc.raw)} bytes cannot be sent (1..{MAX_DOCUMENT_SIZE})")
            i = doc.id
            if i in self._queued:
                continue
            self._queued.add(i)
            fresh.append(doc)
            self._given[doc.key] = max(self._given.get(doc.key, 0), doc.version)
            start = self._resume.get(i, 0)
            start = start if 0 <= start < len(doc.raw) else 0
            announce = [*doc.key, doc.version, i] if push else None
            if push:
                start = 0  # a pushed document goes whole: the receiver drops what it held of it
            self._queue.append(_Out(i, doc.raw, URGENCY.get(doc.type, BULK), sent=start, acked=start,
                                    announce=announce))  # fmt: skip
        self._queue.sort(key=lambda o: o.urgency)  # stable: the caller's order within an urgency
        return fresh

    def partials(self) -> dict[bytes, Partial]:
        """Unfinished incoming transfers, to hand to the next contact with this peer."""
        return {i: Partial(p.total, bytes(p.data)) for i, p in self._partial.items() if p.data}

    def want(self, items: Iterable[tuple[str, str, int]]) -> None:
        """Ask for documents newer than ``since`` of each (domain, type, since): once, after
        :class:`PeerInventory`, only for what the peer said it holds newer (any subset, or none)."""
        if not self._got_inventory or self._sent_want:
            raise _local("want() answers the peer's inventory, once")
        chosen = []
        for d, t, since in items:
            if (d, t) not in self._offered:
                raise _local(f"want() of {d}/{t}, which the peer did not offer")
            self._wanted.add((d, t))
            chosen.append([d, t, since])
        if len(chosen) > MAX_ITEMS:
            raise _local(f"want() of {len(chosen)} items, over the cap of {MAX_ITEMS}")
        parts = sorted([i, len(p.data)] for i, p in self._partial.items() if p.data)[:MAX_PARTIALS]
        self._sent_want = True
        self._frame({"m": "want", "items": chosen, "partial": parts})
        self._maybe_done()

    def send_documents(self, docs: Iterable[Outgoing]) -> None:
        """Send these documents (the caller chose them for :class:`PeerWants`), once, urgent first."""
        if not self._got_want or self._answered_want:
            raise _local("send_documents() answers the peer's want, once")
        self._enqueue(docs)
        self._answered_want = True
        self._maybe_done()

    def data_to_send(self) -> bytes:
        """Every frame that may leave now: messages, then chunks as far as the window allows."""
        for i, upto in self._acks.items():
            self._frame({"m": "ack", "id": i, "upto": upto})
        self._acks.clear()
        in_flight = sum(o.sent - o.acked for o in self._queue)
        for o in self._queue:
            if o.announce is not None and o.sent < len(o.raw) and in_flight < self.window:
                # Announced just before its first chunk: the receiver holds at most the transfers in flight.
                self._frame({"m": "push", "items": [o.announce]})
                o.announce = None
            while o.sent < len(o.raw) and in_flight < self.window:
                n = min(CHUNK, len(o.raw) - o.sent, self.window - in_flight)
                self._frame(
                    {
                        "m": "chunk",
                        "id": o.id,
                        "total": len(o.raw),
                        "offset": o.sent,
                        "data": o.raw[o.sent : o.sent + n],
                    }
                )
                o.sent += n
                in_flight += n
        out = b"".join(self._out_frames)
        self._out_frames.clear()
        self.bytes_out += len(out)
        return out

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the link; ``b""`` is its end (a cut, unless the contact had finished)."""
        if self._eof:
            raise _local("receive_data() after the end of the link")
        if not data:
            self._eof = True
            return
        self.bytes_in += len(data)
        self._in_buf += data
        while len(self._in_buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._in_buf)
            if size > MAX_FRAME:
                raise SyncProtocolError(f"a frame of {size} bytes, over the cap of {MAX_FRAME}")
            if len(self._in_buf) < _HEADER.size + size:
                break
            body = bytes(self._in_buf[_HEADER.size : _HEADER.size + size])
            del self._in_buf[: _HEADER.size + size]
            self._handle(body)

    def next_event(self) -> Event | _NeedData:
        """The next event, or :data:`NEED_DATA` (raises :class:`SyncProtocolError` on a cut mid-contact)."""
        if self._events:
            return self._events.popleft()
        if self._eof and not self._finished:
            raise SyncProtocolError("the link ended before the contact finished (resume with partials())")
        return NEED_DATA

    # --- frames ------------------------------------------------------------------------------

    def _frame(self, message: dict[str, Any]) -> None:
        body = cbor.encode(message)
        assert len(body) <= MAX_FRAME, message["m"]
        self._out_frames.append(_HEADER.pack(len(body)) + body)

    def _handle(self, body: bytes) -> None:
        try:
            msg = cbor.decode(body, max_size=MAX_FRAME)
        except QhxError as exc:
            raise SyncProtocolError(f"a frame is not one deterministic CBOR item: {exc.message}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("m"), str):
            raise SyncProtocolError("a frame must be a map naming its message ('m')")
        handler = _HANDLERS.get(msg["m"])
        if handler is None:
            raise SyncProtocolError(f"unknown message {msg['m']!r}")
        if msg["m"] != "hello" and self.version is None:
            raise SyncProtocolError(f"{msg['m']!r} before hello")
        handler(self, msg)

    def _on_hello(self, msg: dict[str, Any]) -> None:
        if self.version is not None:
            raise SyncProtocolError("a second hello")
        versions = _list(msg, "versions", 16)
        node = msg.get("node")
        caps = _list(msg, "caps", MAX_CAPS)
        if not isinstance(node, str) or not 0 < len(node) <= MAX_NODE_ID:
            raise SyncProtocolError("hello must name the peer's node")
        if not all(type(v) is int for v in versions) or not all(isinstance(c, str) and len(c) <= 64 for c in caps):
            raise SyncProtocolError("hello versions must be integers and its capabilities short texts")
        common = set(versions) & set(self._versions)
        if not common:
            raise SyncProtocolError(f"no protocol version in common (peer {sorted(versions)}, ours {self._versions})")
        self.version = max(common)
        self.peer = PeerHello(node, self.version, tuple(caps))
        self._events.append(self.peer)

    def _on_summary(self, msg: dict[str, Any]) -> None:
        if self._peer_summary is not None:
            raise SyncProtocolError("a second summary")
        digest = msg.get("digest")
        if not isinstance(digest, bytes) or len(digest) != 32 or type(msg.get("count")) is not int:
            raise SyncProtocolError("summary must carry a 32-byte digest and a count")
        self._peer_summary = digest
        if digest == self._digest:
            # Nothing new either way: no inventory, no want; the peer concludes the same.
            self._sent_inventory = self._got_inventory = self._sent_want = self._got_want = True
            self._answered_want = True
            self._peer_held = dict(self.inventory)
            self._events.append(InSync())
            self._maybe_done()
            return
        items = sorted([d, t, v] for (d, t), v in self.inventory.items())
        if len(items) > MAX_ITEMS:
            raise _local(f"an inventory of {len(items)} items, over the cap of {MAX_ITEMS}")
        self._sent_inventory = True
        self._frame({"m": "inventory", "items": items})

    def _on_inventory(self, msg: dict[str, Any]) -> None:
        if self._peer_summary is None or self._got_inventory or self._peer_summary == self._digest:
            raise SyncProtocolError("an inventory out of turn")
        newer = []
        listed: dict[Key, int] = {}
        for d, t, v in _items(msg, "items"):
            if (d, t) in listed:
                raise SyncProtocolError(f"the inventory names {d}/{t} twice")
            listed[d, t] = v
            if v > self.inventory.get((d, t), -1):
                self._offered.add((d, t))
                newer.append((d, t, v))
        if summary_digest(listed) != self._peer_summary:
            raise SyncProtocolError("the inventory does not match the peer's summary")
        self._peer_held = listed
        self._got_inventory = True
        self._events.append(PeerInventory(tuple(newer)))

    def _on_want(self, msg: dict[str, Any]) -> None:
        if not self._sent_inventory or self._got_want:
            raise SyncProtocolError("a want out of turn")
        items = tuple(_items(msg, "items"))
        for d, t, _since in items:
            if (d, t) not in self.inventory:
                raise SyncProtocolError(f"a want of {d}/{t}, which our inventory did not offer")
        for entry in _list(msg, "partial", MAX_PARTIALS):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], bytes)):
                raise SyncProtocolError("a want's partial entries are [id, offset]")
            if len(entry[0]) != 32 or type(entry[1]) is not int or entry[1] < 0:
                raise SyncProtocolError("a want's partial entries are [32-byte id, offset]")
            self._resume[entry[0]] = entry[1]
        self._got_want = True
        self._events.append(PeerWants(items))

    def _on_push(self, msg: dict[str, Any]) -> None:
        if LIVE not in self._caps:
            raise SyncProtocolError("a push, but we did not offer the live capability")
        entries = _list(msg, "items", MAX_ITEMS)
        for entry in entries:
            if not (
                isinstance(entry, list) and len(entry) == 4 and isinstance(entry[3], bytes) and len(entry[3]) == 32
            ):
                raise SyncProtocolError("push items are [domain, type, version, 32-byte id]")
        for d, t, v in _items({"m": "push", "items": [e[:3] for e in entries]}, "items"):
            held = self._peer_held if self._peer_held is not None else {}
            held[(d, t)] = max(held.get((d, t), 0), v)
            self._peer_held = held
        for entry in entries:
            if entry[3] in self._completed:
                raise SyncProtocolError("a push of a document this link already delivered")
            if entry[3] not in self._announced and len(self._announced) >= MAX_PARTIALS:
                raise SyncProtocolError(f"more than {MAX_PARTIALS} pushed documents announced at once")
            self._announced[entry[3]] = 0

    def _on_chunk(self, msg: dict[str, Any]) -> None:
        i, total, offset, data = msg.get("id"), msg.get("total"), msg.get("offset"), msg.get("data")
        if not (isinstance(i, bytes) and len(i) == 32 and isinstance(data, bytes) and data):
            raise SyncProtocolError("a chunk carries a 32-byte id and some data")
        if i in self._completed:
            raise SyncProtocolError("a chunk of a document this link already delivered")
        if i not in self._announced:
            if self._got_done:
                raise SyncProtocolError("a chunk after done of a document that was not pushed")
            if not self._sent_want:
                raise SyncProtocolError("a chunk before we asked for anything (or than was pushed)")
            if not self._wanted:
                raise SyncProtocolError("a chunk, but we asked for nothing (and nothing was pushed)")
        if type(total) is not int or type(offset) is not int or not 0 < total <= MAX_DOCUMENT_SIZE:
            raise SyncProtocolError(f"a chunk's total must be 1..{MAX_DOCUMENT_SIZE}")
        if len(data) > CHUNK or offset < 0 or offset + len(data) > total:
            raise SyncProtocolError("a chunk out of its document's bounds")
        held = self._partial.get(i)
        if held is not None and offset == 0 and i in self._announced:
            held = None  # pushed from the start: what an earlier contact left of it is dropped
        if held is None or held.total != total:
            if offset != 0:
                raise SyncProtocolError("a chunk resumes a transfer we do not hold")
            if len(self._partial) >= MAX_PARTIALS:
                raise SyncProtocolError(f"more than {MAX_PARTIALS} transfers at once")
            held = self._partial[i] = _In(total)
            self._carried.discard(i)  # begun afresh in this contact: all of it is this peer's
        if offset != len(held.data):
            raise SyncProtocolError(f"a chunk at {offset}, expected at {len(held.data)}")
        held.data += data
        self._received += len(data)
        if self._received > self.max_receive:
            raise SyncProtocolError(f"more than {self.max_receive} document bytes in one contact")
        self._touched.add(i)
        self._acks[i] = len(held.data)  # one acknowledgement per id, however many chunks came
        if len(held.data) == total:
            del self._partial[i]
            self._announced.pop(i, None)
            self._completed.add(i)
            raw = bytes(held.data)
            if hashlib.sha256(raw).digest() != i:
                if i in self._carried:
                    # Completed on a prefix an earlier contact left us: that prefix may have been planted
                    # (a hostile contact from the same peer), so it is dropped, not held against this peer;
                    # the next contact asks for the document whole.
                    self._carried.discard(i)
                    return
                raise SyncProtocolError("a reassembled document does not match its id")
            self._events.append(DocumentReceived(raw))

    def _on_ack(self, msg: dict[str, Any]) -> None:
        i, upto = msg.get("id"), msg.get("upto")
        out = next((o for o in self._queue if o.id == i), None)
        if out is None or type(upto) is not int or not out.acked < upto <= out.sent:
            raise SyncProtocolError("an acknowledgement of nothing we sent")
        out.acked = upto
        if out.acked == len(out.raw):
            self._queue.remove(out)
        self._maybe_done()

    def _on_done(self, msg: dict[str, Any]) -> None:
        if self._got_done or not self._sent_want or any(i in self._partial for i in self._touched):
            raise SyncProtocolError("done in the middle of a transfer it started")
        # Transfers an earlier contact left that the peer chose not to resume are stale: forget them.
        self._partial.clear()
        self._got_done = True
        self._events.append(PeerDone())
        self._maybe_finished()

    def _maybe_done(self) -> None:
        if self._sent_done or not self._answered_want or self._queue:
            return
        self._sent_done = True
        self._frame({"m": "done"})
        self._maybe_finished()

    def _maybe_finished(self) -> None:
        if self._sent_done and self._got_done and not self._finished:
            self._finished = True
            self._events.append(Finished())


def _list(msg: dict[str, Any], name: str, cap: int) -> list[Any]:
    value = msg.get(name, [])
    if not isinstance(value, list) or len(value) > cap:
        raise SyncProtocolError(f"{msg['m']}.{name} must be a list of at most {cap}")
    return value


def _items(msg: dict[str, Any], name: str) -> Iterable[tuple[str, str, int]]:
    for entry in _list(msg, name, MAX_ITEMS):
        if not (isinstance(entry, list) and len(entry) == 3):
            raise SyncProtocolError(f"{msg['m']} items are [domain, type, version]")
        d, t, v = entry
        if not (isinstance(d, str) and isinstance(t, str) and 0 < len(d) <= MAX_NAME and 0 < len(t) <= MAX_NAME):
            raise SyncProtocolError(f"{msg['m']} items name a domain and a type")
        if type(v) is not int or v < 0:
            raise SyncProtocolError(f"{msg['m']} item versions are integers >= 0")
        yield d, t, v


_HANDLERS = {
    "hello": SyncConnection._on_hello,
    "summary": SyncConnection._on_summary,
    "inventory": SyncConnection._on_inventory,
    "want": SyncConnection._on_want,
    "chunk": SyncConnection._on_chunk,
    "ack": SyncConnection._on_ack,
    "done": SyncConnection._on_done,
    "push": SyncConnection._on_push,
}
