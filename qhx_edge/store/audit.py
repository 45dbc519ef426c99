"""Signed checkpoints of the hash-chained audit logs in a home's SQLite files.

:mod:`qhx_edge.core.checkpoint` defines the checkpoint and the rules; this
module keeps checkpoints beside the rows they cover:

* a checkpoint table per log (:func:`checkpoint_table`), written in the same
  transaction as the rows it covers (:func:`write_checkpoint`), so a crash
  leaves both or neither;
* the latest checkpoint also in a file beside the store, ``<store>.checkpoint``
  (:func:`write_record`, after the commit), so removing the newest checkpoints
  from the table is seen unless that file is rolled back too (a record that
  lags the table is fine: a crash between commit and file write);
* the signing key, taken without prompting (:func:`quiet_signer`): a write
  whose process cannot unlock the key leaves its rows unprotected until the
  next checkpoint covers them, which ``audit verify`` reports.

Which writes checkpoint is the caller's policy (the node: every import and
every ``CHECKPOINT_ROWS`` issued rows or ``CHECKPOINT_SECONDS``).
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qhx_edge.core import cbor, cose
from qhx_edge.core import checkpoint as cp
from qhx_edge.core.errors import MissingFile, PassphraseError, QhxError, Rejected, StoreCorrupt
from qhx_edge.core.suites import PrivateKey, PublicKey
from qhx_edge.store.files import atomic_write, read_capped
from qhx_edge.store.sqlitefile import SqliteFile

RECORD_SUFFIX = ".checkpoint"


@dataclass(frozen=True)
class Log:
    """One hash-chained log: its table, sequence column, hashed columns and checkpoint table."""

    name: str  # the checkpoint's "log"
    table: str
    seq: str
    columns: tuple[str, ...]  # hashed after the sequence number, in this order
    checkpoints: str
    base: int = 0  # rows up to this number predate the chain (legacy rows of an upgraded store)


def checkpoint_table(name: str) -> str:
    """The SQL of a checkpoint table (idempotent, for a migration)."""
    return f"""
    CREATE TABLE IF NOT EXISTS {name} (
        n INTEGER PRIMARY KEY,
        seq INTEGER NOT NULL,
        head BLOB NOT NULL,
        at INTEGER NOT NULL,
        digest BLOB NOT NULL,
        body BLOB NOT NULL
    )
    """


def chain_existing_log(table: str, seq: str) -> str:
    """The SQL that makes an existing table an audit log: chain columns, the base row before which
    rows predate the chain (``audit_base``), and the checkpoint table (for a migration)."""
    return f"""
    ALTER TABLE {table} ADD COLUMN prev BLOB;
    ALTER TABLE {table} ADD COLUMN hash BLOB;
    CREATE TABLE audit_base (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        base INTEGER NOT NULL
    );
    INSERT INTO audit_base SELECT 1, COALESCE(MAX({seq}), 0) FROM {table};
    """ + checkpoint_table("audit_checkpoints")  # noqa: S608 - fixed names


def _b(v: Any) -> Any:
    return bytes(v) if isinstance(v, memoryview) else v


def head(conn: sqlite3.Connection, log: Log) -> tuple[int, bytes]:
    """The last chained row: (seq, hash), or (base, zeros) for an empty chain."""
    sql = f"SELECT {log.seq}, hash FROM {log.table} WHERE {log.seq} > ? ORDER BY {log.seq} DESC LIMIT 1"  # noqa: S608
    row = conn.execute(sql, (log.base,)).fetchone()
    return (int(row[0]), bytes(row[1])) if row else (log.base, cp.ZERO)


def last_checkpoint(conn: sqlite3.Connection, log: Log) -> tuple[int, int, int, bytes] | None:
    """(n, seq, at, digest) of the newest checkpoint, if any."""
    row = conn.execute(f"SELECT n, seq, at, digest FROM {log.checkpoints} ORDER BY n DESC LIMIT 1").fetchone()  # noqa: S608
    return None if row is None else (int(row[0]), int(row[1]), int(row[2]), bytes(row[3]))


def append(conn: sqlite3.Connection, log: Log, rows: Sequence[Sequence[Any]]) -> tuple[int, bytes]:
    """Append rows (values of ``log.columns``) to a generic log, chained; return the new head."""
    seq, prev = head(conn, log)
    out = []
    for values in rows:
        seq += 1
        h = cp.row_hash(prev, [seq, *values])
        out.append((seq, *values, prev, h))
        prev = h
    cols = ", ".join((log.seq, *log.columns, "prev", "hash"))
    marks = ",".join("?" * (len(log.columns) + 3))
    conn.executemany(f"INSERT INTO {log.table} ({cols}) VALUES ({marks})", out)  # noqa: S608
    return seq, prev


def write_checkpoint(
    conn: sqlite3.Connection,
    log: Log,
    signer: PrivateKey,
    node_id: str,
    domain: str,
    at: int,
    *,
    min_rows: int = 1,
    min_seconds: int | None = None,
    known_head: tuple[int, bytes] | None = None,
) -> bytes | None:
    """Sign and insert a checkpoint over the log's head, inside the caller's transaction.

    Written when at least ``min_rows`` rows are beyond the last checkpoint, or
    (with ``min_seconds``) when at least one is and the last checkpoint is that
    old.  Returns the checkpoint's bytes, or ``None`` when none was due.
    ``known_head``: the head the caller has just appended in this transaction
    (spares a read on the issuance path).
    """
    seq, h = known_head if known_head is not None else head(conn, log)
    last = last_checkpoint(conn, log)
    covered, last_at = (last[1], last[2]) if last else (log.base, None)
    fresh = seq - covered
    if fresh < 1:
        return None
    aged = min_seconds is not None and (last_at is None or at - last_at >= min_seconds)
    if fresh < min_rows and not aged:
        return None
    n = last[0] + 1 if last else 1
    body = cp.make(
        signer,
        log=log.name,
        node_id=node_id,
        domain=domain,
        n=n,
        seq=seq,
        count=seq - log.base,
        head=h,
        prev=last[3] if last else cp.ZERO,
        at=at,
    )
    conn.execute(
        f"INSERT INTO {log.checkpoints} VALUES (?,?,?,?,?,?)",  # noqa: S608
        (n, seq, h, at, hashlib.sha256(body).digest(), body),
    )
    return body


def checkpoint_now(
    store: SqliteFile, log: Log, signer: PrivateKey, node_id: str, domain: str, now: int
) -> dict[str, Any] | None:
    """Checkpoint ``store``'s ``log`` now (``audit checkpoint``), record it beside the store, close the
    store; the newest checkpoint's ``{"n", "seq", "at"}``, or None when the log has none."""
    try:
        with store.transaction() as conn:
            body = write_checkpoint(conn, log, signer, node_id, domain, now)
        if body is not None:
            write_record(store.path, body)
        last = last_checkpoint(store.conn, log)
    finally:
        store.close()
    return None if last is None else {"n": last[0], "seq": last[1], "at": last[2]}


def checkpoints_between(conn: sqlite3.Connection, log: Log, first: int, last: int) -> list[bytes]:
    """The checkpoints whose last row is in ``first..last``, in order."""
    sql = f"SELECT body FROM {log.checkpoints} WHERE seq BETWEEN ? AND ? ORDER BY n"  # noqa: S608
    return [bytes(r[0]) for r in conn.execute(sql, (first, last))]


def record_path(store_path: Path) -> Path:
    return Path(f"{store_path}{RECORD_SUFFIX}")


def write_record(store_path: Path, body: bytes) -> None:
    """Keep the latest checkpoint beside the store (after its commit); never replace a newer one."""
    path = record_path(store_path)
    with suppress(QhxError, OSError):
        held = read_capped(path, cp.MAX_CHECKPOINT, "checkpoint record")
        if _number(held) >= _number(body):  # another process recorded a newer one meanwhile
            return
    atomic_write(path, body, mode=0o600)


def _number(raw: bytes) -> int:
    """A checkpoint's number read without verifying it (only to order two records)."""
    body = cbor.decode(cose.Envelope.parse(raw, max_size=cp.MAX_CHECKPOINT).payload, max_size=cp.MAX_CHECKPOINT)
    n = body.get("n") if isinstance(body, dict) else None
    return n if isinstance(n, int) else -1


def read_record(store_path: Path) -> bytes | None:
    try:
        return read_capped(record_path(store_path), cp.MAX_CHECKPOINT, "checkpoint record")
    except MissingFile:
        return None


def rows(conn: sqlite3.Connection, log: Log) -> Iterator[tuple[int, bytes, bytes, list[Any]]]:
    cols = ", ".join((log.seq, *log.columns, "prev", "hash"))
    for r in conn.execute(f"SELECT {cols} FROM {log.table} ORDER BY {log.seq}"):  # noqa: S608
        seq, values, prev, h = r[0], [_b(v) for v in r[1:-2]], r[-2], r[-1]
        if seq <= log.base:
            continue
        if prev is None or h is None:
            yield int(seq), b"", b"", [seq, *values]
            continue
        yield int(seq), bytes(prev), bytes(h), [seq, *values]


def verify(
    conn: sqlite3.Connection, log: Log, key: PublicKey, node_id: str, domain: str, store_path: Path | None
) -> dict[str, Any]:
    """Check a log, its checkpoints and (with ``store_path``) the record beside the store.

    One read transaction, so a concurrent writer cannot make a half-written
    state look tampered.  Raises :class:`~qhx_edge.core.checkpoint.AuditBroken`.
    """
    conn.execute("BEGIN")
    try:
        table = conn.execute(f"SELECT n, seq, head, digest, body FROM {log.checkpoints} ORDER BY n").fetchall()  # noqa: S608
        report: dict[str, Any] = {"log": log.name, "node_id": node_id, "domain": domain}
        try:
            chain = cp.check_chain([bytes(r[4]) for r in table], key, log=log.name, node_id=node_id, domain=domain)
            _same_columns(table, chain)
            latest = None
            if store_path is not None:
                raw = read_record(store_path)
                if raw is not None:
                    try:
                        latest = cp.parse(raw, key)
                    except Rejected as exc:
                        raise cp.AuditBroken(
                            cp.CHECKPOINT_FORGED, f"the recorded latest checkpoint: {exc.message}"
                        ) from exc
            found = cp.verify_log(
                rows(conn, log), chain, base=log.base, latest=latest, latest_required=store_path is not None
            )
        except cp.AuditBroken as exc:
            exc.report = {**report, **exc.report, "finding": exc.finding()}
            raise
        return {**report, **found}
    finally:
        conn.execute("COMMIT")


def _same_columns(table: Sequence[Sequence[Any]], chain: Sequence[cp.Checkpoint]) -> None:
    """The columns the writer reads (number, last row, head, digest) are those of the signed bodies."""
    for (n, seq, h, digest, _), c in zip(table, chain, strict=True):
        if (n, seq, bytes(h), bytes(digest)) != (c.n, c.seq, c.head, c.digest):
            raise cp.AuditBroken(cp.CHECKPOINT_FORGED, f"the checkpoint table's row {n} does not match its checkpoint")


def quiet_signer(home: Path) -> PrivateKey | None:
    """The home's signing key if it can be had without asking: an unencrypted keystore, or the
    passphrase in the environment.  ``None`` otherwise (no prompt, no error)."""
    from qhx_edge.store.identity import SIGNING_KEY
    from qhx_edge.store.keystore import KEYSTORE, Keystore, passphrase_from_env

    try:
        doc = cbor.decode(read_capped(Path(home) / KEYSTORE, 1 << 16, "keystore"), max_size=1 << 16)
        if isinstance(doc, dict) and doc.get("encrypted") is False:
            return Keystore(Path(home), None).load(SIGNING_KEY)  # the open warning is not repeated per write
        passphrase = passphrase_from_env(None)
        return Keystore.open(Path(home), lambda: passphrase).load(SIGNING_KEY)
    except (PassphraseError, MissingFile, StoreCorrupt, Rejected):
        return None
