"""Evidence out: a node's audit log, carried to its authority in evidence packs.

Node side (``pack export --evidence``)
--------------------------------------
The node exports the audit entries after its evidence mark
(:meth:`Store.evidence_mark`) as one or more **segments**.  A segment is a
COSE_Sign by the node's signing key (content type :data:`CONTENT_TYPE`) over::

    {"type": "evidence", "node_id": tstr, "domain": tstr,
     "from_seq": uint, "to_seq": uint,      # inclusive, contiguous
     "prev": bstr(32),                      # hash of entry from_seq - 1 (zeros for seq 1)
     "head": bstr(32),                      # hash of entry to_seq
     "created_at": uint,
     "entries": [{"seq", "at", "event", "kind", "domain", "type", "version",
                  "digest", "detail", "prev", "hash"}, ...],   # every audit column
     "checkpoints": [bstr, ...]}            # optional: the node's signed audit checkpoints
                                            # (core/checkpoint.py) whose last row is in the segment

Before exporting, the node checkpoints its whole log (it holds its key then), so
every exported entry is covered by a checkpoint the segment or a later one carries.

A segment holds at most :data:`SEGMENT_ENTRIES` entries and about
:data:`SEGMENT_BYTES`; a pack at most :data:`PACK_BUDGET` bytes of segments
(the rest waits for the next export, which says how much remains).  The pack
is ``[card, *segments]`` of kind ``evidence``, signed like every pack by the
node's key; the card comes first so the authority can pin that key.  The mark
moves only after the pack file was written (atomically), so a failed write
re-exports the same entries next time, which the authority recognises as
already held.  With nothing new the node still writes a valid pack holding
only its card (a heartbeat that also introduces the node).

Authority side (``pack import`` on an authority home)
-----------------------------------------------------
Evidence is kept in ``evidence.sqlite`` in the authority home (WAL,
``synchronous=FULL``, numbered migrations, one ``BEGIN IMMEDIATE``
transaction per import).  Rules, in order; each failure is a typed error:

* the pack manifest verifies (:func:`pack.parse`), its kind is ``evidence``
  (a documents pack: ``malformed``), and it starts with a card whose node,
  domain and signing key are the manifest's exporter (``bad-signature``);
* the card's domain is the authority's (``domain-mismatch``);
* the first evidence from a node id pins its card (trust on first use,
  reported with the card fingerprint for an out-of-band check); later
  evidence must carry the pinned key (else ``bad-signature``: a node
  impersonating another node id with its own key);
* each segment: signed by every algorithm of the pinned key, names the same
  node (``bad-signature``) and domain (``domain-mismatch``), is well formed
  with contiguous sequence numbers (``malformed``, ``oversize`` beyond
  :data:`SEGMENT_ENTRIES`), and its hash chain recomputes from ``prev`` with
  the node's own :func:`qhx_edge.store.trust_store._entry_hash`, ending in ``head``
  (``bad-signature``: the hash chain is the node's seal over its log, so an
  altered entry or hash is a broken seal, like a pack document that does not
  match its manifest);
* each checkpoint a segment carries is signed by the pinned key and names
  the node's log (``bad-signature``), its numbers run without gap, and it
  names the hash of the segment's entry with its number (``audit-broken``:
  a chain recomputed on the node after the checkpoint was signed).  A
  checkpoint with the number of a held one but other bytes makes the segment a
  fork.  Held checkpoints are kept per node in ``node_checkpoints``.

The authority's own log of rejected imports (``rejections``) is hash-chained
and checkpointed with the authority's signing key (the key of its card), like
a node's audit log: ``audit verify`` on an authority home checks it, every
node's held chain and the node checkpoints that cover it.

A rejected segment changes nothing; the other segments of the pack still
apply (as a node applies the valid documents of a pack), unless ``--strict``.
Every rejection is also written to the ``rejections`` table in its own
transaction after the rollback, so an attempted forgery leaves a trace while
the evidence itself stays unchanged.

Across segments, per node:

* **gap**: a segment starting after the last held entry + 1 is kept and the
  missing range is reported until a segment fills it;
* **fork**: a segment whose entries differ from held ones at the same
  sequence numbers, whose ``prev`` differs from the held entry before it,
  whose ``head`` is not the ``prev`` of the held entry after it, or which
  continues a previously found fork.  Two validly signed, different histories
  are proof that the node's log was cloned or rewritten: the segment is kept
  (status ``fork``) as that proof, the held chain is not changed, and the fork
  is reported.  Gaps and forks are findings, not rejections (exit code 0).

Re-importing the same pack, or segments whose entries are all held with equal
hashes, changes nothing and says so.

Limits: pinning is trust on first use until node delegations vouch for node
keys (the next issue); the operator compares the reported card fingerprint
with the one ``node init`` printed.  Card expiry is not enforced for evidence
(old evidence stays evidence).  A node whose whole home is copied holds the
same key, so a fork proves *that* two histories exist, not which one is true.
"""

from __future__ import annotations

import hashlib
import itertools
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qhx_edge.core import cbor, checkpoint, cose, merkle
from qhx_edge.core.cards import Card, EncryptionPublicKey, parse_card
from qhx_edge.core.errors import (
    BadSignature,
    DomainMismatch,
    Malformed,
    Oversize,
    Rejected,
    StoreCorrupt,
)
from qhx_edge.core.limits import is_uint
from qhx_edge.core.spiffe import check_trust_domain
from qhx_edge.core.suites import PrivateKey, PublicKey
from qhx_edge.homes import notary
from qhx_edge.homes.authority import AUTHORITY_NODE
from qhx_edge.packs import pack, seal
from qhx_edge.store import audit as audit_log
from qhx_edge.store.sqlitefile import SqliteFile
from qhx_edge.store.trust_store import GENESIS, AuditEntry, Store, _entry_hash

if TYPE_CHECKING:
    from qhx_edge.homes.authority import Authority
    from qhx_edge.homes.node import Node

CONTENT_TYPE = "application/qhx-edge-evidence+cbor"
EVIDENCE_FILE = "evidence.sqlite"
SEGMENT_ENTRIES = 5_000
SEGMENT_BYTES = 4 << 20
MAX_SEGMENT_SIZE = 8 << 20
PACK_BUDGET = pack.MAX_PACK_SIZE - (8 << 20)
COLUMNS = ("seq", "at", "event", "kind", "domain", "type", "version", "digest", "detail", "prev", "hash")
SEGMENT_FIELDS = frozenset({"type", "node_id", "domain", "from_seq", "to_seq", "prev", "head", "created_at", "entries"})
OPTIONAL_FIELDS = frozenset({"checkpoints"})
MAX_SEGMENT_CHECKPOINTS = SEGMENT_ENTRIES


# --- segments ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A verified evidence segment: signature, structure and hash chain checked."""

    raw: bytes
    node_id: str
    domain: str
    from_seq: int
    to_seq: int
    prev: bytes
    head: bytes
    created_at: int
    entries: tuple[dict[str, Any], ...]
    checkpoints: tuple[checkpoint.Checkpoint, ...] = ()

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.raw).digest()


def make_segment(
    signer: PrivateKey,
    node_id: str,
    domain: str,
    entries: Sequence[dict[str, Any]],
    prev: bytes,
    now: int,
    checkpoints: Sequence[bytes] = (),
) -> bytes:
    """Sign ``entries`` (consecutive audit rows as maps of :data:`COLUMNS`) as one segment,
    with the signed ``checkpoints`` that cover them."""
    if not entries:
        raise Malformed("an evidence segment holds at least one entry")
    payload = {
        "type": "evidence",
        "node_id": node_id,
        "domain": domain,
        "from_seq": entries[0]["seq"],
        "to_seq": entries[-1]["seq"],
        "prev": prev,
        "head": entries[-1]["hash"],
        "created_at": now,
        "entries": list(entries),
    }
    if checkpoints:
        payload["checkpoints"] = list(checkpoints)
    return cose.sign(cbor.encode(payload), [signer], content_type=CONTENT_TYPE)


def _uint(d: dict[str, Any], key: str, what: str) -> int:
    v = d.get(key)
    if not is_uint(v):
        raise Malformed(f"{what} {key} must be an unsigned integer (at most 2^63 - 1)")
    assert isinstance(v, int)
    return v


def _hash32(d: dict[str, Any], key: str, what: str) -> bytes:
    v = d.get(key)
    if not isinstance(v, bytes) or len(v) != 32:
        raise Malformed(f"{what} {key} must be a 32-byte hash")
    return v


def _optional(d: dict[str, Any], key: str, types: type | tuple[type, ...], what: str) -> Any:
    v = d.get(key)
    if v is not None and (not isinstance(v, types) or isinstance(v, bool)):
        raise Malformed(f"{what} {key} has the wrong type")
    if isinstance(v, int) and not is_uint(v):
        raise Malformed(f"{what} {key} must be an unsigned integer (at most 2^63 - 1)")
    return v


def _audit_entry(e: dict[str, Any], what: str) -> AuditEntry:
    if set(e) != set(COLUMNS):
        raise Malformed(f"{what} must have exactly the audit columns")
    event, detail = e["event"], e["detail"]
    if not isinstance(event, str) or not isinstance(detail, str):
        raise Malformed(f"{what} event and detail must be text")
    _uint(e, "at", what)
    return AuditEntry(
        event,
        detail,
        _optional(e, "kind", str, what),
        _optional(e, "domain", str, what),
        _optional(e, "type", str, what),
        _optional(e, "version", int, what),
        _optional(e, "digest", bytes, what),
    )


def parse_segment(raw: bytes, key: PublicKey) -> Segment:
    """Verify one segment against the node's pinned ``key``: signature first, then shape, then chain."""
    d = cose.parse_signed(
        raw,
        content_type=CONTENT_TYPE,
        max_size=MAX_SEGMENT_SIZE,
        what="evidence segment",
        types=frozenset({"evidence"}),
        signer=key,
    ).body
    if not SEGMENT_FIELDS <= set(d) <= SEGMENT_FIELDS | OPTIONAL_FIELDS:
        raise Malformed("not an evidence segment: unexpected fields")
    node_id = d["node_id"]
    if not isinstance(node_id, str) or not node_id:
        raise Malformed("evidence segment must name its node")
    domain = check_trust_domain(d["domain"])
    first, last = _uint(d, "from_seq", "segment"), _uint(d, "to_seq", "segment")
    prev, head = _hash32(d, "prev", "segment"), _hash32(d, "head", "segment")
    entries = d["entries"]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise Malformed("segment entries must be a list of maps")
    if len(entries) > SEGMENT_ENTRIES:
        raise Oversize(f"an evidence segment holds at most {SEGMENT_ENTRIES} entries")
    if first < 1 or not entries or last - first + 1 != len(entries):
        raise Malformed(f"segment {first}-{last} does not hold {max(last - first + 1, 0)} entries")
    if first == 1 and prev != GENESIS:
        raise BadSignature("segment starting at entry 1 does not start from the genesis hash")
    link = prev
    for i, e in enumerate(entries):
        seq = first + i
        what = f"entry {seq}"
        if e.get("seq") != seq:
            raise Malformed(f"segment {first}-{last}: sequence numbers are not contiguous at {what}")
        entry = _audit_entry(e, what)
        if _hash32(e, "prev", what) != link:
            raise BadSignature(f"{what} does not link to the hash before it (hash chain broken)")
        h = _hash32(e, "hash", what)
        if _entry_hash(link, seq, e["at"], entry) != h:
            raise BadSignature(f"{what} does not match its hash (altered)")
        link = h
    if link != head:
        raise BadSignature(f"segment {first}-{last}: head is not the hash of its last entry")
    cps = _segment_checkpoints(d.get("checkpoints", []), key, node_id, domain, first, entries)
    return Segment(
        bytes(raw), node_id, domain, first, last, prev, head, _uint(d, "created_at", "segment"), tuple(entries), cps
    )


def _segment_checkpoints(
    raws: Any, key: PublicKey, node_id: str, domain: str, first: int, entries: list[dict[str, Any]]
) -> tuple[checkpoint.Checkpoint, ...]:
    """The node's checkpoints a segment carries: signed by its key, in a run, naming the segment's own heads."""
    if not isinstance(raws, list) or not all(isinstance(r, bytes) for r in raws):
        raise Malformed("segment checkpoints must be a list of signed checkpoints")
    if len(raws) > MAX_SEGMENT_CHECKPOINTS:
        raise Oversize(f"an evidence segment carries at most {MAX_SEGMENT_CHECKPOINTS} checkpoints")
    try:
        cps = checkpoint.check_chain(raws, key, log="node", node_id=node_id, domain=domain, first=None)
    except checkpoint.AuditBroken as exc:
        if exc.reason == checkpoint.CHECKPOINT_FORGED:
            raise BadSignature(f"segment {first}-{first + len(entries) - 1}: {exc.message}") from exc
        raise
    for c in cps:
        i = c.seq - first
        if not 0 <= i < len(entries) or c.count != c.seq:
            raise Malformed(f"audit checkpoint {c.n} (row {c.seq}) is not about the rows of this segment")
        if entries[i]["hash"] != c.head:
            raise checkpoint.AuditBroken(
                checkpoint.CHAIN_REWRITTEN,
                f"entry {c.seq} is not the head node checkpoint {c.n} signed: the node's chain was recomputed",
                seq=c.seq,
            )
    return tuple(cps)


# --- node side ---------------------------------------------------------------------------


@dataclass
class EvidenceExport:
    data: bytes
    node_id: str
    domain: str
    segments: list[tuple[int, int]]
    mark: int  # the evidence mark before this export
    to_seq: int  # the last entry exported (== mark when nothing was new)
    head: bytes  # the hash of entry to_seq (zeros for an empty log)
    remaining: int  # entries left for the next export (pack budget)
    receipt_heads: int | None = None  # the size of the newest receipt-log tree head exported, if any

    @property
    def entries(self) -> int:
        return self.to_seq - self.mark

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "domain": self.domain,
            "from_seq": self.mark + 1 if self.segments else None,
            "to_seq": self.to_seq if self.segments else None,
            "entries": self.entries,
            "segments": [{"from_seq": a, "to_seq": b} for a, b in self.segments],
            "head": self.head.hex(),
            "remaining": self.remaining,
            "receipt_log_size": self.receipt_heads,
        }


def _rows(store: Store, after: int, limit: int) -> list[dict[str, Any]]:
    cols = ", ".join(COLUMNS)
    cur = store.conn.execute(f"SELECT {cols} FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))  # noqa: S608
    return [{k: bytes(v) if isinstance(v, memoryview) else v for k, v in zip(COLUMNS, r, strict=True)} for r in cur]


def _hash_at(store: Store, seq: int) -> bytes:
    if seq == 0:
        return GENESIS
    row = store.conn.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()
    if row is None:
        raise StoreCorrupt(f"audit entry {seq} (the evidence mark) is missing")
    return bytes(row[0])


def export_evidence(
    n: Node,
    now: int,
    *,
    segment_entries: int = SEGMENT_ENTRIES,
    segment_bytes: int = SEGMENT_BYTES,
    pack_budget: int = PACK_BUDGET,
) -> EvidenceExport:
    """Build the evidence pack of the audit entries after the mark (the mark is not moved)."""
    if not 1 <= segment_entries <= SEGMENT_ENTRIES:
        raise Malformed(f"segment_entries must be between 1 and {SEGMENT_ENTRIES}")
    store = n.store
    store.checkpoint_audit(now, n.identity.signer)  # every exported entry is then covered by a checkpoint
    mark = store.evidence_mark()
    last, prev = mark, _hash_at(store, mark)
    segments: list[bytes] = []
    ranges: list[tuple[int, int]] = []
    total = 0
    while total < pack_budget and len(segments) < pack.MAX_PACK_DOCUMENTS - 1:  # the card is one document
        rows = _rows(store, last, segment_entries)
        if not rows:
            break
        chunk: list[dict[str, Any]] = []
        size, link = 0, prev
        for r in rows:
            # The node never exports a chain it cannot verify itself.
            e = AuditEntry(r["event"], r["detail"], r["kind"], r["domain"], r["type"], r["version"], r["digest"])
            seq = last + len(chunk) + 1
            if r["seq"] != seq or r["prev"] != link or _entry_hash(link, seq, r["at"], e) != r["hash"]:
                raise StoreCorrupt(f"audit entry {r['seq']} breaks the hash chain; not exported")
            n_bytes = len(cbor.encode(r))
            if chunk and size + n_bytes > segment_bytes:
                break
            chunk.append(r)
            size += n_bytes
            link = r["hash"]
        cps = store.audit_checkpoints(chunk[0]["seq"], chunk[-1]["seq"])
        seg = make_segment(n.identity.signer, n.node_id, n.domain, chunk, prev, now, cps)
        if len(seg) > MAX_SEGMENT_SIZE:
            raise Oversize(f"audit entry {chunk[0]['seq']} is too large for an evidence segment")
        if segments and total + len(seg) > pack_budget:
            break
        segments.append(seg)
        ranges.append((chunk[0]["seq"], chunk[-1]["seq"]))
        total += len(seg)
        last, prev = chunk[-1]["seq"], link
    remaining = int(store.conn.execute("SELECT COUNT(*) FROM audit WHERE seq > ?", (last,)).fetchone()[0])
    log = notary.log_evidence(n.home, n.identity.signer, n.node_id, n.domain)
    items = [n.card(), *segments, *([log[0]] if log is not None else [])]
    data = n.export_pack(items, now, kind="evidence")
    return EvidenceExport(data, n.node_id, n.domain, ranges, mark, last, prev, remaining,
                          log[1] if log is not None else None)  # fmt: skip


def write_evidence(
    n: Node,
    path: Path,
    now: int,
    *,
    recipients: Sequence[EncryptionPublicKey] = (),
    segment_entries: int = SEGMENT_ENTRIES,
) -> dict[str, Any]:
    """Export, optionally seal, write atomically, and only then move the evidence mark."""
    ex = export_evidence(n, now, segment_entries=segment_entries)
    data = seal.seal(ex.data, recipients) if recipients else ex.data
    size = pack.write(Path(path), data)
    if ex.segments:
        n.store.set_evidence_mark(ex.to_seq)
    if ex.receipt_heads is not None:
        notary.mark_exported(n.home, ex.receipt_heads)
    return {"pack": str(path), "bytes": size, **ex.to_json()}


def export_text(info: dict[str, Any]) -> str:
    """One-line summary of :func:`write_evidence` for the command line."""
    segs = info["segments"]
    if not segs:
        line = (
            f"no new audit entries since the last evidence export: wrote an evidence pack holding only "
            f"the card of node {info['node_id']} ({info['bytes']} bytes) to {info['pack']}"
        )
    else:
        line = (
            f"wrote evidence of node {info['node_id']}: audit entries {info['from_seq']}-{info['to_seq']} "
            f"in {len(segs)} segment{'s' if len(segs) != 1 else ''} ({info['bytes']} bytes) to {info['pack']}"
        )
    if info.get("sealed_to"):
        line += f", sealed to {', '.join(info['sealed_to'])}"
    if info["remaining"]:
        line += f"\n{info['remaining']} more entries remain: export again"
    return line


def node_status(n: Node) -> dict[str, Any]:
    """A node's own view: how much of its audit log is not yet exported as evidence."""
    row = n.store.conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    last, head = (int(row[0]), bytes(row[1])) if row else (0, GENESIS)
    mark = n.store.evidence_mark()
    return {
        "node_id": n.node_id,
        "domain": n.domain,
        "audit_entries": last,
        "head": head.hex(),
        "evidence_mark": mark,
        "pending": last - mark,
    }


# --- authority side: the evidence store -------------------------------------------------------

MIGRATIONS: tuple[str, ...] = (
    # 1: per-node chains, the segments that carried them, forks, packs seen, rejections.
    """
    CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY,
        domain TEXT NOT NULL,
        keyid TEXT NOT NULL,
        card_fingerprint TEXT NOT NULL,
        card BLOB NOT NULL,
        first_seen INTEGER NOT NULL
    );
    CREATE TABLE packs (
        digest BLOB PRIMARY KEY,
        pack_id BLOB NOT NULL,
        node_id TEXT NOT NULL REFERENCES nodes(node_id),
        sequence INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        imported_at INTEGER NOT NULL
    );
    CREATE TABLE segments (
        id INTEGER PRIMARY KEY,
        node_id TEXT NOT NULL REFERENCES nodes(node_id),
        from_seq INTEGER NOT NULL,
        to_seq INTEGER NOT NULL,
        prev BLOB NOT NULL,
        head BLOB NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('chain', 'fork')),
        digest BLOB NOT NULL,
        imported_at INTEGER NOT NULL,
        body BLOB NOT NULL,
        UNIQUE (node_id, digest)
    );
    CREATE INDEX segments_range ON segments(node_id, status, from_seq);
    CREATE INDEX segments_head ON segments(node_id, status, head);
    CREATE TABLE entries (
        node_id TEXT NOT NULL REFERENCES nodes(node_id),
        seq INTEGER NOT NULL,
        at INTEGER NOT NULL,
        event TEXT NOT NULL,
        kind TEXT,
        domain TEXT,
        type TEXT,
        version INTEGER,
        digest BLOB,
        detail TEXT NOT NULL,
        prev BLOB NOT NULL,
        hash BLOB NOT NULL,
        segment INTEGER NOT NULL REFERENCES segments(id),
        PRIMARY KEY (node_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE forks (
        id INTEGER PRIMARY KEY,
        node_id TEXT NOT NULL REFERENCES nodes(node_id),
        seq INTEGER NOT NULL,
        reason TEXT NOT NULL,
        held BLOB NOT NULL,
        other BLOB NOT NULL,
        segment INTEGER NOT NULL REFERENCES segments(id),
        found_at INTEGER NOT NULL
    );
    CREATE TABLE rejections (
        id INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        node_id TEXT,
        pack_digest BLOB,
        segment INTEGER,
        kind TEXT NOT NULL,
        message TEXT NOT NULL
    );
    """,
    # 2: audit checkpoints.  The nodes' checkpoints carried by their segments; the rejections log
    # hash-chained from the first rejection after this migration (those before predate the chain:
    # audit_base) and checkpointed with the authority's own signing key.
    """
    CREATE TABLE node_checkpoints (
        node_id TEXT NOT NULL REFERENCES nodes(node_id),
        n INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        head BLOB NOT NULL,
        at INTEGER NOT NULL,
        digest BLOB NOT NULL,
        body BLOB NOT NULL,
        imported_at INTEGER NOT NULL,
        PRIMARY KEY (node_id, n)
    );
    """
    + audit_log.chain_existing_log("rejections", "id"),
    # 3: each node's receipt log (docs/architecture.md, "Notary"): the tree heads it exported, each
    # consistent with the one before, and the heads that were not (the log was rewritten).
    """
    CREATE TABLE receipt_heads (
        node_id TEXT NOT NULL REFERENCES nodes(node_id),
        size INTEGER NOT NULL,
        root BLOB NOT NULL,
        at INTEGER NOT NULL,
        body BLOB NOT NULL,
        imported_at INTEGER NOT NULL,
        linked INTEGER NOT NULL,  -- 1: proven consistent with the next smaller head held
        PRIMARY KEY (node_id, size)
    );
    CREATE TABLE receipt_log_forks (
        id INTEGER PRIMARY KEY,
        node_id TEXT NOT NULL REFERENCES nodes(node_id),
        held_size INTEGER NOT NULL,
        size INTEGER NOT NULL,
        reason TEXT NOT NULL,
        body BLOB NOT NULL,
        at INTEGER NOT NULL
    );
    """,
)
REJECTION_COLUMNS = ("at", "node_id", "pack_digest", "segment", "kind", "message")


class EvidenceStore(SqliteFile):
    """The authority's ``evidence.sqlite``.  Use :meth:`open`."""

    MIGRATIONS = MIGRATIONS
    WHAT = "evidence"
    # The authority's signing key and its card's (node id, domain), for checkpoints of the rejections
    # log; looked up only when a rejection is written.  None: rejections stay beyond the last checkpoint.
    signer_source: Callable[[], tuple[PrivateKey, str, str] | None] | None = None

    @property
    def log(self) -> audit_log.Log:
        """The rejections log as :mod:`qhx_edge.store.audit` sees it."""
        row = self.conn.execute("SELECT base FROM audit_base").fetchone()
        return audit_log.Log(
            "evidence", "rejections", "id", REJECTION_COLUMNS, "audit_checkpoints", int(row[0]) if row else 0
        )

    @classmethod
    def open(cls, home: Path, *, create: bool = True) -> EvidenceStore | None:
        """Open (and with ``create`` make) the evidence store; ``None`` if absent and not created."""
        path = Path(home) / EVIDENCE_FILE
        if not create and not path.exists():
            return None
        store = cls(cls.connect(path), path)
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
        return store

    # --- reading -------------------------------------------------------------------------

    def node(self, node_id: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT node_id, domain, keyid, card_fingerprint, first_seen FROM nodes WHERE node_id = ?", (node_id,)
        ).fetchone()
        keys = ("node_id", "domain", "keyid", "card_fingerprint", "first_seen")
        return None if row is None else dict(zip(keys, row, strict=True))

    def pack_seen(self, digest: bytes) -> bool:
        return self.conn.execute("SELECT 1 FROM packs WHERE digest = ?", (digest,)).fetchone() is not None

    def gaps(self, node_id: str) -> list[list[int]]:
        """Missing ranges ``[first, last]`` below the last held entry.

        Held entries are exactly the union of the ``chain`` segments' ranges
        (a chain segment is stored only when its whole range is then held).
        """
        out: list[list[int]] = []
        covered = 0
        for a, b in self.conn.execute(
            "SELECT from_seq, to_seq FROM segments WHERE node_id = ? AND status = 'chain' ORDER BY from_seq",
            (node_id,),
        ):
            if a > covered + 1:
                out.append([covered + 1, a - 1])
            covered = max(covered, b)
        return out

    def forks(self, node_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT f.seq, f.reason, f.held, f.other, f.found_at, s.from_seq, s.to_seq FROM forks f "
            "JOIN segments s ON s.id = f.segment WHERE f.node_id = ? ORDER BY f.id",
            (node_id,),
        )
        return [_fork_json(seq, reason, held, other, at, a, b) for seq, reason, held, other, at, a, b in rows]

    def chain(self, node_id: str) -> dict[str, Any]:
        count, last = self.conn.execute(
            "SELECT COUNT(*), MAX(seq) FROM entries WHERE node_id = ?", (node_id,)
        ).fetchone()
        head = None
        if last is not None:
            row = self.conn.execute(
                "SELECT hash FROM entries WHERE node_id = ? AND seq = ?", (node_id, last)
            ).fetchone()
            head = bytes(row[0]).hex()
        return {"entries": int(count), "last_seq": last, "head": head, "gaps": self.gaps(node_id)}

    def receipt_log(self, node_id: str) -> dict[str, Any]:
        """The newest tree head held of the node's receipt log, and the heads that broke it."""
        row = self.conn.execute(
            "SELECT size, root, at FROM receipt_heads WHERE node_id = ? ORDER BY size DESC LIMIT 1", (node_id,)
        ).fetchone()
        forks = [
            {"held_size": a, "size": b, "reason": r, "at": t}
            for a, b, r, t in self.conn.execute(
                "SELECT held_size, size, reason, at FROM receipt_log_forks WHERE node_id = ? ORDER BY id", (node_id,)
            )
        ]
        head = {"size": row[0], "root": bytes(row[1]).hex(), "at": row[2]} if row else None
        sizes = [(int(s), int(k)) for s, k in self.conn.execute(
            "SELECT size, linked FROM receipt_heads WHERE node_id = ? ORDER BY size", (node_id,))]  # fmt: skip
        gaps = [[sizes[i - 1][0], s] for i, (s, k) in enumerate(sizes) if i and not k]
        return {"head": head, "gaps": gaps, "forks": forks}

    def status(self) -> dict[str, Any]:
        nodes: dict[str, Any] = {}
        for node_id, domain, keyid, fp, first in self.conn.execute(
            "SELECT node_id, domain, keyid, card_fingerprint, first_seen FROM nodes ORDER BY node_id"
        ).fetchall():
            segs = dict(
                self.conn.execute(
                    "SELECT status, COUNT(*) FROM segments WHERE node_id = ? GROUP BY status", (node_id,)
                ).fetchall()
            )
            last_import = self.conn.execute("SELECT MAX(imported_at) FROM packs WHERE node_id = ?", (node_id,))
            rejected = self.conn.execute("SELECT COUNT(*) FROM rejections WHERE node_id = ?", (node_id,)).fetchone()
            nodes[node_id] = {
                "domain": domain,
                "signing_keyid": keyid,
                "card_fingerprint": fp,
                "first_seen": first,
                "last_import": last_import.fetchone()[0],
                **self.chain(node_id),
                "segments": int(segs.get("chain", 0)),
                "fork_segments": int(segs.get("fork", 0)),
                "forks": self.forks(node_id),
                "rejections": int(rejected[0]),
                "receipt_log": self.receipt_log(node_id),
            }
        total = self.conn.execute("SELECT COUNT(*) FROM rejections").fetchone()[0]
        return {"nodes": nodes, "rejections": int(total)}

    def digest(self) -> str:
        """SHA-256 over every table but ``rejections``: equal digests, equal evidence."""
        h = hashlib.sha256()
        for table in ("nodes", "packs", "segments", "entries", "forks", "receipt_heads", "receipt_log_forks"):
            cols = [r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")]
            order = ", ".join(cols)
            h.update(cbor.encode([table, cols]))
            for row in self.conn.execute(f"SELECT * FROM {table} ORDER BY {order}"):  # noqa: S608 - fixed names
                h.update(cbor.encode(list(row)))
        return h.hexdigest()

    # --- writing -------------------------------------------------------------------------

    def log_rejections(self, at: int, items: Sequence[tuple[str | None, bytes | None, int | None, Rejected]]) -> None:
        """Record rejections in their own transaction (after the rejected change was rolled back)."""
        if not items:
            return
        signer = self.signer_source() if self.signer_source is not None else None
        record = None
        with self.transaction() as conn:
            log = self.log
            audit_log.append(
                conn,
                log,
                [(at, node_id, digest, index, exc.kind, exc.message) for node_id, digest, index, exc in items],
            )
            if signer is not None:
                record = audit_log.write_checkpoint(conn, log, signer[0], signer[1], signer[2], at)
        if record is not None:
            audit_log.write_record(self.path, record)


def _fork_json(seq: int, reason: str, held: bytes, other: bytes, at: int, a: int, b: int) -> dict[str, Any]:
    return {
        "seq": seq,
        "reason": reason,
        "held": bytes(held).hex(),
        "other": bytes(other).hex(),
        "found_at": at,
        "segment": [a, b],
    }


def status(home: Path) -> dict[str, Any]:
    """``evidence status`` of an authority home (no passphrase needed; creates nothing)."""
    store = EvidenceStore.open(home, create=False)
    if store is None:
        return {"nodes": {}, "rejections": 0}
    try:
        return store.status()
    finally:
        store.close()


# --- authority side: import -----------------------------------------------------------------


@dataclass
class EvidenceReport:
    """What one evidence import did, per node (one pack carries one node's evidence)."""

    manifest: pack.Manifest
    card: Card
    sealed: bool
    pack_status: str  # new | already-imported
    new_node: bool
    applied: bool = False
    changed: bool = False  # a node pinned or a segment stored (the pack record alone does not count)
    segments: list[dict[str, Any]] = field(default_factory=list)
    chain: dict[str, Any] = field(default_factory=dict)
    forks_held: int = 0
    receipt_log: list[dict[str, Any]] = field(default_factory=list)

    def _count(self, status: str) -> int:
        return sum(1 for s in self.segments if s["status"] == status)

    def node_json(self) -> dict[str, Any]:
        return {
            "domain": self.card.domain,
            "card_fingerprint": self.card.fingerprint,
            "signing_keyid": self.card.signing_key.keyid,
            "new_node": self.new_node,
            "segments_accepted": self._count("accepted"),
            "segments_already_held": self._count("already-held"),
            "entries_added": sum(s.get("entries_added", 0) for s in self.segments if s["status"] == "accepted"),
            "gaps": self.chain.get("gaps", []),
            "forks": [s["fork"] for s in self.segments if s["status"] == "fork"],
            "forks_held": self.forks_held,
            "rejected": [
                {k: s[k] for k in ("index", "from_seq", "to_seq", "kind", "message") if k in s}
                for s in self.segments
                if s["status"].startswith("rejected:")
            ],
            "segments": self.segments,
            "entries": self.chain.get("entries", 0),
            "last_seq": self.chain.get("last_seq"),
            "head": self.chain.get("head"),
            "receipt_log": self.receipt_log,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "evidence",
            "applied": self.applied,
            "changed": self.changed,
            "pack": self.manifest.to_json(),
            "pack_status": self.pack_status,
            "sealed": self.sealed,
            "nodes": {self.card.node_id: self.node_json()},
        }

    def summary(self) -> str:
        n = self.node_json()
        head = f"evidence from node {self.card.node_id} ({self.card.domain})"
        if self.new_node:
            head += f": new node, key pinned: {self.card.fingerprint}"
        if not self.applied:
            head += " -- nothing applied (strict)"
        elif not self.changed:
            seen = self.pack_status == "already-imported"
            why = "this evidence pack was imported before" if seen else "no new audit entries"
            head += f" -- nothing new: {why}"
        lines = [head]
        for s in self.segments:
            where = f"  segment {s.get('from_seq', '?')}-{s.get('to_seq', '?')}"
            if s["status"] == "accepted":
                added = s["entries_added"]
                text = f"accepted, {added} {'entry' if added == 1 else 'entries'} added"
                if s.get("gap_before"):
                    text += " after a gap (missing {}-{})".format(*s["gap_before"])
            elif s["status"] == "fork":
                text = f"FORK at entry {s['fork']['seq']}: {s['fork']['reason']}"
            elif s["status"].startswith("rejected:"):
                text = f"{s['status']}: {s['message']}"
            else:
                text = s["status"]
            lines.append(f"{where}: {text}")
        for r in self.receipt_log:
            text = f"  receipt log: {r['status']}, tree size {r.get('size', '-')}"
            if r.get("reason"):
                text += f": {r['reason']}"
            lines.append(text)
        gaps = ", ".join(f"{a}-{b}" for a, b in n["gaps"]) or "none"
        last = n["last_seq"] if n["last_seq"] is not None else "-"
        lines.append(
            f"  chain: {n['entries']} entries, last seq {last}, head {(n['head'] or '-')[:16]}; "
            f"gaps: {gaps}; forks: {self.forks_held}"
        )
        return "\n".join(lines)


class EvidenceRejected(Rejected):
    """An evidence import in which segments were rejected; carries the full report."""

    def __init__(self, cause: Rejected, report: EvidenceReport) -> None:
        super().__init__(cause.message)
        self.kind = cause.kind  # type: ignore[misc]
        self.report = report


class _StrictRollback(Exception):
    pass


def _exporter_card(p: pack.Pack, domain: str) -> Card:
    """The card an evidence pack starts with, bound to the manifest's exporter."""
    if not p.documents:
        raise Malformed("an evidence pack starts with the exporting node's card")
    card = parse_card(p.documents[0])
    m = p.manifest
    if (
        card.node_id != m.exporter_node
        or card.domain != m.exporter_domain
        or card.signing_key.keyid != m.exporter_key.keyid
    ):
        raise BadSignature("evidence pack is not signed by the key of the node card it carries")
    if card.node_id == AUTHORITY_NODE:
        raise Malformed("an authority's own card cannot carry node evidence")
    if card.domain != domain:
        raise DomainMismatch(f"evidence from node {card.node_id} of {card.domain}; this authority is {domain}")
    return card


def _verify_segment(raw: bytes, card: Card) -> Segment:
    seg = parse_segment(raw, card.signing_key)
    if seg.node_id != card.node_id:
        raise BadSignature(f"segment names node {seg.node_id} but is signed by the key of node {card.node_id}")
    if seg.domain != card.domain:
        raise DomainMismatch(f"segment names domain {seg.domain}, its node belongs to {card.domain}")
    return seg


def import_evidence(auth: Authority, data: bytes, now: int, *, strict: bool = False) -> EvidenceReport:
    """Verify an evidence pack and keep what it proves, in one transaction.

    Raises a typed :class:`Rejected` when the pack as a whole is refused
    (nothing stored), and :class:`EvidenceRejected` (carrying the report) when
    some segments were rejected (the others applied, unless ``strict``).
    """
    store = EvidenceStore.open(auth.home)
    assert store is not None
    store.signer_source = lambda: authority_signer(auth.home, auth.domain)
    try:
        return _import(store, auth, data, now, strict)
    finally:
        store.close()


def _import(store: EvidenceStore, auth: Authority, data: bytes, now: int, strict: bool) -> EvidenceReport:
    claimed: tuple[str | None, bytes | None] = (None, None)
    try:
        my_kid = parse_card(auth.card()).encryption_key.kid
        data, sealed = pack.unseal_if_sealed(data, my_kid, lambda: auth.identity.encryption)
        p = pack.parse(data)
        claimed = (p.manifest.exporter_node, p.digest)
        if p.manifest.kind != "evidence":
            raise Malformed(f"authorities import evidence only; this is a {p.manifest.kind} pack")
        card = _exporter_card(p, auth.domain)
        pinned = _check_pinned(store, card)
    except Rejected as exc:
        store.log_rejections(now, [(*claimed, None, exc)])
        raise
    node_id = card.node_id
    report = EvidenceReport(
        p.manifest, card, sealed, "already-imported" if store.pack_seen(p.digest) else "new", pinned is None
    )
    verified: list[tuple[int, Segment | Rejected]] = []
    logs: list[tuple[int, Any]] = []
    for index, raw in enumerate(p.documents[1:], 1):
        try:
            if notary.is_log_evidence(raw):
                logs.append((index, notary.parse_log_evidence(raw, card.signing_key, card.node_id, card.domain)))
                continue
            verified.append((index, _verify_segment(raw, card)))
        except Rejected as exc:
            verified.append((index, exc))
    rejected = [(i, item) for i, item in verified if isinstance(item, Rejected)]
    try:
        with store.transaction() as conn:
            changed = False
            # Checked again inside the transaction: another import may have pinned this node meanwhile.
            report.new_node = _check_pinned(store, card) is None
            if report.new_node:
                conn.execute(
                    "INSERT INTO nodes VALUES (?,?,?,?,?,?)",
                    (node_id, card.domain, card.signing_key.keyid, card.fingerprint, card.raw, now),
                )
                changed = True
            for index, item in verified:
                if isinstance(item, Rejected):
                    report.segments.append(_rejected_json(index, p.documents[index], item))
                    continue
                result = _apply_segment(conn, node_id, item, now)
                report.segments.append({"index": index, **result})
                changed = changed or result["status"] in ("accepted", "fork")
            for index, item in logs:
                result = _apply_log(conn, node_id, item, now)
                report.receipt_log.append({"index": index, **result})
                changed = changed or result["status"] in ("accepted", "fork", "first")
            m = p.manifest
            conn.execute(
                "INSERT OR IGNORE INTO packs VALUES (?,?,?,?,?,?)",
                (p.digest, m.pack_id, node_id, m.sequence, m.created_at, now),
            )
            if strict and rejected:
                raise _StrictRollback  # noqa: TRY301 - the transaction rolls back on any exception
            report.applied, report.changed = True, changed
    except Rejected as exc:
        store.log_rejections(now, [(node_id, p.digest, None, exc)])
        raise
    except _StrictRollback:
        for s in report.segments:
            if not s["status"].startswith("rejected:"):
                s["status"] = "not-applied"
    if store.node(node_id) is not None:
        report.chain = store.chain(node_id)
        report.forks_held = len(store.forks(node_id))
    if rejected:
        store.log_rejections(now, [(node_id, p.digest, i, exc) for i, exc in rejected])
        raise EvidenceRejected(rejected[0][1], report)
    return report


def authority_signer(home: Path, domain: str) -> tuple[PrivateKey, str, str] | None:
    """The authority's signing key (its card's) for its own logs' checkpoints, if it opens without asking."""
    key = audit_log.quiet_signer(home)
    return None if key is None else (key, AUTHORITY_NODE, domain)


def _check_pinned(store: EvidenceStore, card: Card) -> dict[str, Any] | None:
    """The node's pinned record, if any; evidence must carry the pinned key."""
    pinned = store.node(card.node_id)
    if pinned is not None and pinned["keyid"] != card.signing_key.keyid:
        raise BadSignature(
            f"node {card.node_id} is pinned to key {pinned['keyid'][:16]}; this evidence is signed by another key"
        )
    return pinned


def _rejected_json(index: int, raw: bytes, exc: Rejected) -> dict[str, Any]:
    out: dict[str, Any] = {"index": index, "status": f"rejected:{exc.kind}", "kind": exc.kind, "message": exc.message}
    # The claimed range, for the operator, read without trusting it.
    try:
        d = cbor.decode(cose.Envelope.parse(raw, max_size=MAX_SEGMENT_SIZE).payload, max_size=MAX_SEGMENT_SIZE)
    except Rejected:
        return out
    if isinstance(d, dict):
        for k in ("from_seq", "to_seq"):
            if isinstance(d.get(k), int) and not isinstance(d.get(k), bool):
                out[k] = d[k]
    return out


def _apply_segment(conn: sqlite3.Connection, node_id: str, seg: Segment, now: int) -> dict[str, Any]:
    """Place one verified segment in the node's chain: accepted, already held, or a fork."""
    out: dict[str, Any] = {"from_seq": seg.from_seq, "to_seq": seg.to_seq, "digest": seg.digest.hex()}
    if conn.execute("SELECT 1 FROM segments WHERE node_id = ? AND digest = ?", (node_id, seg.digest)).fetchone():
        return {**out, "status": "already-held"}
    held = {
        seq: (bytes(prev), bytes(h))
        for seq, prev, h in conn.execute(
            "SELECT seq, prev, hash FROM entries WHERE node_id = ? AND seq BETWEEN ? AND ?",
            (node_id, seg.from_seq - 1, seg.to_seq + 1),
        )
    }
    fork: tuple[int, str, bytes, bytes] | None = None
    for e in seg.entries:
        h = held.get(e["seq"])
        if h is not None and h[1] != e["hash"]:
            fork = (e["seq"], "entry differs from the held entry with the same number", h[1], e["hash"])
            break
    before, after = held.get(seg.from_seq - 1), held.get(seg.to_seq + 1)
    if fork is None and before is not None and before[1] != seg.prev:
        fork = (seg.from_seq, "its prev differs from the held entry before it", before[1], seg.prev)
    if fork is None and after is not None and after[0] != seg.head:
        fork = (seg.to_seq + 1, "the held entry after it does not link to its head", after[0], seg.head)
    if fork is None and seg.from_seq > 1:
        row = conn.execute(
            "SELECT from_seq, to_seq FROM segments WHERE node_id = ? AND status = 'fork' AND head = ?",
            (node_id, seg.prev),
        ).fetchone()
        if row is not None:
            held_prev = before[1] if before is not None else b""
            fork = (seg.from_seq, f"continues the forked history of segment {row[0]}-{row[1]}", held_prev, seg.prev)
    if fork is None:
        fork = _checkpoint_fork(conn, node_id, seg)
    status = "fork" if fork is not None else "chain"
    new = [e for e in seg.entries if e["seq"] not in held]
    if fork is None:
        conn.executemany(
            "INSERT OR IGNORE INTO node_checkpoints VALUES (?,?,?,?,?,?,?,?)",
            [(node_id, c.n, c.seq, c.head, c.at, c.digest, c.raw, now) for c in seg.checkpoints],
        )
    if fork is None and not new:
        return {**out, "status": "already-held"}
    last = conn.execute("SELECT MAX(seq) FROM entries WHERE node_id = ?", (node_id,)).fetchone()[0] or 0
    cur = conn.execute(
        "INSERT INTO segments (node_id, from_seq, to_seq, prev, head, status, digest, imported_at, body) "
        "VALUES (?,?,?,?,?,?,?,?,?)",
        (node_id, seg.from_seq, seg.to_seq, seg.prev, seg.head, status, seg.digest, now, seg.raw),
    )
    segment_id = cur.lastrowid
    if fork is not None:
        seq, reason, held_hash, other = fork
        conn.execute(
            "INSERT INTO forks (node_id, seq, reason, held, other, segment, found_at) VALUES (?,?,?,?,?,?,?)",
            (node_id, seq, reason, held_hash, other, segment_id, now),
        )
        info = _fork_json(seq, reason, held_hash, other, now, seg.from_seq, seg.to_seq)
        return {**out, "status": "fork", "fork": info}
    conn.executemany(
        "INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        [(node_id, *(e[c] for c in COLUMNS), segment_id) for e in new],
    )
    result: dict[str, Any] = {**out, "status": "accepted", "entries_added": len(new)}
    if seg.from_seq > last + 1:
        result["gap_before"] = [last + 1, seg.from_seq - 1]
    elif any(e["seq"] < last for e in new):
        result["fills_gap"] = True
    return result


def _apply_log(conn: sqlite3.Connection, node_id: str, ev: Any, now: int) -> dict[str, Any]:
    """Take a node's receipt-log evidence: tree heads, each proven consistent with the one before it in
    the pack (RFC 9162 §2.1.4.2), starting from the head the node exported last.

    A **fork** (kept as a finding; nothing of the pack is taken): a head the pack proves consistent
    contradicts a held head of the same size, or the pack passes over a held head it does not contain
    (a node exports every head after the one it starts from, and a pack without a start claims the log
    from its beginning): the node's log no longer holds what a head it had exported committed to.
    Otherwise the heads are kept, and each held head records whether it is proven consistent with the
    next smaller one (``linked``): consistency is a prefix relation, so two heads of one proven chain,
    or two prefixes of one head, are consistent.  A held head not so proven is a **gap** (an evidence
    pack that never arrived, or arrived out of order) until a pack proves it.
    """
    held = {int(s): (bytes(r), int(k)) for s, r, k in conn.execute(
        "SELECT size, root, linked FROM receipt_heads WHERE node_id = ?", (node_id,))}  # fmt: skip
    chain = ([ev.start] if ev.start is not None else []) + list(ev.heads)

    def fork(size: int, reason: str, body: bytes) -> dict[str, Any]:
        conn.execute(
            "INSERT INTO receipt_log_forks (node_id, held_size, size, reason, body, at) VALUES (?,?,?,?,?,?)",
            (node_id, max(held, default=0), size, reason, body, now),
        )
        return {"status": "fork", "size": size, "reason": reason}

    prev = ev.start[0] if ev.start is not None else None
    for (head, body), proof in zip(ev.heads, ev.proofs, strict=True):
        if prev is not None:
            try:
                merkle.verify_consistency(prev.size, head.size, proof, prev.root, head.root)
            except Rejected:
                return fork(head.size, f"tree head {head.size} is not consistent with tree head {prev.size}: the log "
                            "dropped or changed a receipt it had committed to", body)  # fmt: skip
        prev = head
    for head, body in chain:
        if head.size in held and held[head.size][0] != head.root:
            return fork(head.size, f"the node now signs another tree of size {head.size} than it exported", body)
    sizes = {head.size for head, _ in chain}
    low, high = (chain[0][0].size if ev.start is not None else 0), chain[-1][0].size
    passed = sorted(s for s in held if low <= s <= high and s not in sizes)
    if passed:
        return fork(high, f"the node's log no longer holds tree head {passed[0]}, which it exported", chain[-1][1])
    before = sorted(held)
    after = sorted(set(held) | sizes)
    old_next = dict(itertools.pairwise(before))
    linked: dict[int, int] = {}
    for i, size in enumerate(after):
        p = after[i - 1] if i else None
        if p is None:
            linked[size] = held[size][1] if size in held else 1
        elif size in sizes and p in sizes:
            linked[size] = 1
        elif size in held and p in held and old_next.get(p) == size:
            linked[size] = held[size][1]
        elif size in sizes and p in held:
            # p and the held head after it were proven consistent, and that head is in this chain with
            # ``size``: both are its prefixes, so p is a prefix of ``size`` too.
            q = old_next.get(p)
            linked[size] = int(q is not None and q in sizes and held[q][1] == 1)
        else:
            linked[size] = 0
    new = [(head, body) for head, body in chain if head.size not in held]
    changed = bool(new) or any(linked[s] != held[s][1] for s in held)
    for head, body in new:
        conn.execute("INSERT INTO receipt_heads VALUES (?,?,?,?,?,?,?)",
                     (node_id, head.size, head.root, head.at, body, now, linked[head.size]))  # fmt: skip
    for s in held:
        if linked[s] != held[s][1]:
            conn.execute("UPDATE receipt_heads SET linked = ? WHERE node_id = ? AND size = ?", (linked[s], node_id, s))
    gaps = [[after[i - 1], s] for i, s in enumerate(after) if i and not linked[s]]
    status = "first" if not held else "already-held" if not changed else "gap" if gaps else "accepted"
    out: dict[str, Any] = {"status": status, "size": high}
    if gaps:
        out["gaps"] = gaps
        out["reason"] = "unproven between tree sizes " + ", ".join(f"{a} and {b}" for a, b in gaps)
    return out


def _checkpoint_fork(conn: sqlite3.Connection, node_id: str, seg: Segment) -> tuple[int, str, bytes, bytes] | None:
    """A checkpoint of the segment that contradicts a held one: same number, other bytes, or out of line."""
    for c in seg.checkpoints:
        held = conn.execute(
            "SELECT digest FROM node_checkpoints WHERE node_id = ? AND n = ?", (node_id, c.n)
        ).fetchone()
        if held is not None and bytes(held[0]) != c.digest:
            return (c.seq, f"node checkpoint {c.n} differs from the held one", bytes(held[0]), c.digest)
        before = conn.execute(
            "SELECT digest FROM node_checkpoints WHERE node_id = ? AND n = ?", (node_id, c.n - 1)
        ).fetchone()
        if before is not None and bytes(before[0]) != c.prev:
            return (
                c.seq,
                f"node checkpoint {c.n} does not follow the held checkpoint {c.n - 1}",
                bytes(before[0]),
                c.prev,
            )
    return None


def verify_store(home: Path, key: PublicKey, node_id: str, domain: str) -> dict[str, Any]:
    """``audit verify`` of an authority's evidence store: its own rejections log against the
    authority's checkpoints (``key``), and every node's held chain against the node's checkpoints.

    Raises :class:`~qhx_edge.core.checkpoint.AuditBroken` at the first finding.
    """
    store = EvidenceStore.open(home, create=False)
    if store is None:
        return {"log": "evidence", "present": False, "nodes": {}}
    try:
        own = audit_log.verify(store.conn, store.log, key, node_id, domain, store.path)
        nodes = {}
        for nid, card in store.conn.execute("SELECT node_id, card FROM nodes ORDER BY node_id").fetchall():
            nodes[nid] = _verify_node_chain(store.conn, nid, parse_card(bytes(card)))
        return {**own, "present": True, "nodes": nodes}
    finally:
        store.close()


def checkpoint_store(home: Path, signer: PrivateKey, card: Card, now: int) -> dict[str, Any] | None:
    """Checkpoint the evidence store's rejections log now with the authority's key (``audit checkpoint``)."""
    store = EvidenceStore.open(home)
    assert store is not None
    return audit_log.checkpoint_now(store, store.log, signer, card.node_id, card.domain, now)


def _verify_node_chain(conn: sqlite3.Connection, node_id: str, card: Card) -> dict[str, Any]:
    """One node's held entries (each run between gaps recomputes) against its held checkpoints."""
    try:
        cps = _held_checkpoints(conn, node_id, card)
        count, last = _check_entries(conn, node_id, {c.seq: c for c in cps})
    except checkpoint.AuditBroken as exc:
        exc.message = f"node {node_id}: {exc.message}"
        exc.args = (exc.message,)
        exc.report = {"log": "evidence", "node_id": node_id, "finding": exc.finding()}
        raise
    covered = max((c.seq for c in cps if c.seq <= last), default=0)
    return {
        "entries": count,
        "last_seq": last or None,
        "checkpoints": len(cps),
        "last_checkpoint": cps[-1].to_json() if cps else None,
        "unprotected": last - covered,
    }


def _held_checkpoints(conn: sqlite3.Connection, node_id: str, card: Card) -> list[checkpoint.Checkpoint]:
    """A node's held checkpoints, each signed by its pinned key; linked where both neighbours are held."""
    rows = conn.execute("SELECT body FROM node_checkpoints WHERE node_id = ? ORDER BY n", (node_id,)).fetchall()
    cps: list[checkpoint.Checkpoint] = []
    for (raw,) in rows:  # evidence may have gaps: each checked on its own
        (c,) = checkpoint.check_chain(
            [bytes(raw)], card.signing_key, log="node", node_id=node_id, domain=card.domain, first=None
        )
        if cps and cps[-1].n == c.n - 1 and cps[-1].digest != c.prev:
            raise checkpoint.AuditBroken(
                checkpoint.CHECKPOINT_MISSING, f"node checkpoint {c.n} does not follow checkpoint {c.n - 1}"
            )
        cps.append(c)
    return cps


def _check_entries(conn: sqlite3.Connection, node_id: str, heads: dict[int, checkpoint.Checkpoint]) -> tuple[int, int]:
    """(entries, last seq) of a node's held chain, every entry matching its hash and every signed head."""
    link: bytes | None = None
    last = count = 0
    cols = ", ".join(COLUMNS)
    for r in conn.execute(f"SELECT {cols} FROM entries WHERE node_id = ? ORDER BY seq", (node_id,)):  # noqa: S608
        e: dict[str, Any] = {k: bytes(v) if isinstance(v, memoryview) else v for k, v in zip(COLUMNS, r, strict=True)}
        seq = int(e["seq"])
        if seq != last + 1:
            link = None  # a gap: the next run starts from the prev it claims
        entry = AuditEntry(e["event"], e["detail"], e["kind"], e["domain"], e["type"], e["version"], e["digest"])
        if (link is not None and e["prev"] != link) or _entry_hash(e["prev"], seq, e["at"], entry) != e["hash"]:
            raise checkpoint.AuditBroken(checkpoint.ROW_ALTERED, f"entry {seq} does not match its hash chain", seq=seq)
        signed = heads.get(seq)
        if signed is not None and signed.head != e["hash"]:
            raise checkpoint.AuditBroken(
                checkpoint.CHAIN_REWRITTEN, f"entry {seq} is not the head node checkpoint {signed.n} signed", seq=seq
            )
        link, last, count = e["hash"], seq, count + 1
    return count, last


def status_text(st: dict[str, Any]) -> str:
    """``evidence status`` of an authority home as text."""
    if not st["nodes"]:
        return "no evidence imported yet" + (f" ({st['rejections']} rejected imports)" if st["rejections"] else "")
    lines = []
    for node_id, n in st["nodes"].items():
        gaps = ", ".join(f"{a}-{b}" for a, b in n["gaps"]) or "none"
        last = n["last_seq"] if n["last_seq"] is not None else "-"
        lines.append(
            f"{node_id} ({n['domain']}): {n['entries']} entries, last seq {last}, head {(n['head'] or '-')[:16]}, "
            f"gaps: {gaps}, forks: {len(n['forks'])}, rejected: {n['rejections']}"
        )
        lines.extend(f"  FORK at entry {f['seq']}: {f['reason']}" for f in n["forks"])
        log = n.get("receipt_log") or {}
        if log.get("head"):
            lines.append(f"  receipt log: tree size {log['head']['size']}, root {log['head']['root'][:16]}")
        lines.extend(f"  receipt log unproven between tree sizes {a} and {b}" for a, b in log.get("gaps", []))
        lines.extend(f"  RECEIPT LOG FORK at tree size {f['size']}: {f['reason']}" for f in log.get("forks", []))
    return "\n".join(lines)
