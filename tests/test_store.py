"""The node store: migrations, audit chain, trust digest."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from qhx_edge.core.errors import StoreCorrupt
from qhx_edge.store.trust_store import MIGRATIONS, AuditEntry, Store
from tests.conftest import Homes


def test_store_pragmas_and_schema_version(homes: Homes) -> None:
    s = Store.open(homes.node_home)
    try:
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert s.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert s.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert s.integrity_check() == "ok"
        s.migrate()  # idempotent
        assert s.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        s.close()


def test_newer_schema_is_refused(homes: Homes) -> None:
    conn = sqlite3.connect(homes.node_home / "node.sqlite")
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreCorrupt, match="newer"):
        Store.open(homes.node_home)


def test_audit_chain_detects_edits_deletions_and_reordering(homes: Homes) -> None:
    s = Store.open(homes.node_home)
    s.audit(1, [AuditEntry("test", f"entry {i}") for i in range(3)])
    n = s.verify_audit_chain()
    assert n >= 5
    before = s.trust_digest()
    s.conn.execute("UPDATE audit SET detail = 'rewritten' WHERE seq = 2")
    with pytest.raises(StoreCorrupt, match="entry 2"):
        s.verify_audit_chain()
    assert s.trust_digest() == before  # the audit log is not trust state
    s.close()


def test_audit_chain_detects_deleted_entry(homes: Homes) -> None:
    s = Store.open(homes.node_home)
    s.audit(1, [AuditEntry("test", f"entry {i}") for i in range(3)])
    s.conn.execute("DELETE FROM audit WHERE seq = 3")
    with pytest.raises(StoreCorrupt, match="broken"):
        s.verify_audit_chain()
    s.close()


def test_trust_digest_sees_every_trust_table(homes: Homes) -> None:
    s = Store.open(homes.node_home)
    base = s.trust_digest()
    s.conn.execute("UPDATE clock SET high_water = high_water + 1")
    assert s.trust_digest() != base
    s.conn.execute("UPDATE clock SET high_water = high_water - 1")
    assert s.trust_digest() == base
    s.conn.execute("UPDATE high_water SET version = version + 1 WHERE type = 'bundle'")
    assert s.trust_digest() != base
    s.close()


def test_corrupt_current_document_is_detected(homes: Homes) -> None:
    s = Store.open(homes.node_home)
    s.conn.execute("UPDATE documents SET body = X'00' WHERE type = 'freshness'")
    with pytest.raises(StoreCorrupt):
        s.trust_state()
    s.close()


def test_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "node.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreCorrupt):
        Store.open(tmp_path)


def test_a_migration_another_process_ran_meanwhile_is_not_run_again(tmp_path: Path) -> None:
    """Review finding: the schema version was read outside the migration's transaction, so a process
    that lost the race to open a store ran a migration again (here: a duplicate row, before the fix)."""
    from collections.abc import Iterator
    from contextlib import contextmanager

    from qhx_edge.store.sqlitefile import SqliteFile

    class Two(SqliteFile):
        MIGRATIONS = ("CREATE TABLE t (x INTEGER PRIMARY KEY)", "INSERT INTO t VALUES (1)")

    path = tmp_path / "two.sqlite"
    first = Two(Two.connect(path), path)
    winner = Two(Two.connect(path), path)

    class Racing(Two):
        raced = False

        @contextmanager
        def transaction(self) -> Iterator[sqlite3.Connection]:
            if not Racing.raced:  # the other process migrates between our read and our transaction
                Racing.raced = True
                winner.migrate()
            with super().transaction() as conn:
                yield conn

    loser = Racing(first.conn, path)
    loser.migrate()
    assert loser.conn.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    assert loser.conn.execute("PRAGMA user_version").fetchone()[0] == 2
    winner.close()
    loser.close()


def test_the_read_memo_follows_every_commit(tmp_path: Path) -> None:
    """``SqliteFile.memo`` reuses a read until anything commits to the file: another connection's
    commit, this connection's, and (review finding) this connection's schema changes, which
    ``total_changes`` does not count."""
    from qhx_edge.store.sqlitefile import SqliteFile

    class One(SqliteFile):
        MIGRATIONS = ("CREATE TABLE t (x INTEGER)",)

    path = tmp_path / "one.sqlite"
    mine, other = One(One.connect(path), path), One(One.connect(path), path)
    mine.migrate()

    def count() -> int:
        return int(mine.conn.execute("SELECT count(*) FROM t").fetchone()[0])

    assert mine.memo("n", count) == 0
    other.conn.execute("INSERT INTO t VALUES (1)")
    assert mine.memo("n", count) == 1
    with mine.transaction() as conn:
        conn.execute("INSERT INTO t VALUES (2)")
    assert mine.memo("n", count) == 2
    with mine.transaction() as conn:  # DDL only: no row changes counted
        conn.execute("CREATE TABLE u AS SELECT * FROM t")
        conn.execute("DROP TABLE t")
        conn.execute("CREATE TABLE t (x INTEGER)")
    assert mine.memo("n", count) == 0
    mine.close()
    other.close()
