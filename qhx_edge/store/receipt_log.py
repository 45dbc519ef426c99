"""The node's receipt log: ``receipts.sqlite`` in the node home (docs/architecture.md, "Notary").

An append-only list of receipts (the leaves of an RFC 9162 §2.1 Merkle tree, :mod:`qhx_edge.core.merkle`),
the certificates they name (stored once), and the signed tree heads.  A receipt's index is assigned
inside the ``BEGIN IMMEDIATE`` transaction that writes it, so notaries in several processes append to one
log and their receipts are numbered as if they had written in sequence; a receipt is committed (fsynced)
before the notary releases the response it covers.

Tree heads are computed from every leaf hash (O(n) at each head: a node's log of a million receipts
reads 32 MB; heads are signed at most every few seconds).  Nothing here deletes or rewrites a leaf: a
log changed behind the node's back can no longer prove consistency with the heads it sent its authority
(``pack export --evidence``), which is how the authority detects it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path

from qhx_edge.core import merkle
from qhx_edge.core.errors import Malformed
from qhx_edge.store.sqlitefile import SqliteFile

RECEIPTS_FILE = "receipts.sqlite"

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE leaves (
        seq INTEGER PRIMARY KEY,   -- 0, 1, 2 ... without gap
        hash BLOB NOT NULL,        -- RFC 9162 leaf hash of the receipt
        receipt BLOB NOT NULL,     -- the receipt's deterministic CBOR
        signature BLOB,            -- its own COSE_Sign (sign-request)
        at INTEGER NOT NULL
    );
    CREATE TABLE certs (digest BLOB PRIMARY KEY, der BLOB NOT NULL);
    CREATE TABLE heads (
        size INTEGER PRIMARY KEY,
        root BLOB NOT NULL,
        at INTEGER NOT NULL,
        signed BLOB NOT NULL
    );
    CREATE TABLE exported_head (one INTEGER PRIMARY KEY CHECK (one = 1), size INTEGER NOT NULL);
    -- every notary delegation this log was written under: a receipt file names the one in force when its
    -- head was signed, which the node store drops once the notary role rotates (TUF 5.3.11)
    CREATE TABLE delegations (digest BLOB PRIMARY KEY, raw BLOB NOT NULL)
    """,
)


class ReceiptLog(SqliteFile):
    """``receipts.sqlite``.  Use :meth:`open`."""

    MIGRATIONS = MIGRATIONS
    WHAT = "receipt log"

    @classmethod
    def open(cls, home: Path, *, create: bool = True, any_thread: bool = False) -> ReceiptLog | None:
        """The log (made if absent, with ``create``); ``any_thread``: see :meth:`SqliteFile.connect`."""
        path = Path(home) / RECEIPTS_FILE
        if not create and not path.exists():
            return None
        log = cls(cls.connect(path, any_thread=any_thread), path)
        try:
            log.migrate()
        except BaseException:
            log.close()
            raise
        return log

    def append(self, make: Callable[[int], tuple[bytes, bytes | None, int]], certs: Mapping[bytes, bytes]) -> int:
        """Append the receipt ``make(seq)`` returns (its bytes, its own signature or None, its time) under
        the next index, with the certificates it names; the index."""
        with self.transaction() as c:
            seq = int(c.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM leaves").fetchone()[0])
            receipt, signature, at = make(seq)
            c.executemany("INSERT OR IGNORE INTO certs VALUES (?, ?)", list(certs.items()))
            c.execute("INSERT INTO leaves VALUES (?, ?, ?, ?, ?)",
                      (seq, merkle.leaf_hash(receipt), receipt, signature, at))  # fmt: skip
        return seq

    def keep_delegation(self, raw: bytes) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO delegations VALUES (?, ?)", (hashlib.sha256(raw).digest(), raw))

    def delegations(self) -> list[bytes]:
        return [bytes(r[0]) for r in self.conn.execute("SELECT raw FROM delegations")]

    def size(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM leaves").fetchone()[0])

    def leaf_hashes(self, size: int | None = None) -> list[bytes]:
        rows = self.conn.execute(
            "SELECT hash FROM leaves WHERE seq < ? ORDER BY seq", (size if size is not None else 1 << 62,)
        )
        return [bytes(r[0]) for r in rows]

    def leaf(self, seq: int) -> tuple[bytes, bytes | None]:
        row = self.conn.execute("SELECT receipt, signature FROM leaves WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            raise Malformed(f"this node's receipt log holds no receipt {seq} (it holds {self.size()})")
        return bytes(row[0]), bytes(row[1]) if row[1] is not None else None

    def certs(self, digests: list[bytes]) -> list[bytes]:
        out = []
        for d in digests:
            row = self.conn.execute("SELECT der FROM certs WHERE digest = ?", (d,)).fetchone()
            if row is None:
                raise Malformed("the receipt log lacks a certificate a receipt names")
            out.append(bytes(row[0]))
        return out

    def newest_head(self) -> tuple[int, bytes, int, bytes] | None:
        row = self.conn.execute("SELECT size, root, at, signed FROM heads ORDER BY size DESC LIMIT 1").fetchone()
        return (int(row[0]), bytes(row[1]), int(row[2]), bytes(row[3])) if row is not None else None

    def add_head(self, sign: Callable[[int, bytes], tuple[bytes, int]]) -> tuple[int, bytes] | None:
        """Sign a tree head over the whole log if it grew since the newest head (``sign(size, root)`` returns
        the signed head and its time); the new head's size and bytes, or None if none was needed."""
        with self.transaction() as c:
            size = self.size()
            newest = self.newest_head()
            if size == 0 or (newest is not None and newest[0] >= size):
                return None
            root = merkle.root(self.leaf_hashes(size))
            signed, at = sign(size, root)
            c.execute("INSERT INTO heads VALUES (?, ?, ?, ?)", (size, root, at, signed))
        return size, signed

    def head_covering(self, seq: int) -> tuple[int, bytes] | None:
        """The first signed head whose tree holds receipt ``seq``: (size, signed bytes)."""
        row = self.conn.execute(
            "SELECT size, signed FROM heads WHERE size > ? ORDER BY size LIMIT 1", (seq,)
        ).fetchone()
        return (int(row[0]), bytes(row[1])) if row is not None else None

    def heads_after(self, size: int) -> list[tuple[int, bytes, bytes]]:
        """Signed heads of larger trees than ``size``, smallest first: (size, root, signed bytes)."""
        rows = self.conn.execute("SELECT size, root, signed FROM heads WHERE size > ? ORDER BY size", (size,))
        return [(int(r[0]), bytes(r[1]), bytes(r[2])) for r in rows]

    def exported_size(self) -> int:
        row = self.conn.execute("SELECT size FROM exported_head").fetchone()
        return int(row[0]) if row is not None else 0

    def mark_exported(self, size: int) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO exported_head VALUES (1, ?) ON CONFLICT (one) DO UPDATE SET size = "
                      "MAX(size, excluded.size)", (size,))  # fmt: skip
