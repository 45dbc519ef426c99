"""One SQLite file, used the same way everywhere it holds state.

WAL journal, ``synchronous=FULL`` (a commit is fsynced before it returns),
foreign keys on, numbered migrations recorded in ``PRAGMA user_version``, and
``BEGIN IMMEDIATE`` transactions that either commit whole or roll back.  The
file and its WAL and shared-memory files are mode 0600: another local user
reads nothing of the trust state or the audit chain.  The node store, the
authority's evidence store and its attestation store are all this, with their
own migrations.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import ClassVar, TypeVar

from qhx_edge.core.errors import StoreCorrupt, StoreLocked

T = TypeVar("T")


def _private_file(path: Path, *, create: bool = True) -> None:
    """Make ``path`` a regular file only its owner may read or write (mode 0600), never through a link.

    A file that exists is never opened here, only checked with ``lstat`` and
    changed with ``chmod``: closing any descriptor of a SQLite file releases
    every POSIX lock this process holds on it, including another connection's,
    and another process would then reset the shared-memory index under it.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise
        try:  # a new file: no connection can hold a lock on it yet
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        except FileExistsError:  # made meanwhile by another process: check it as it is
            _private_file(path, create=False)
        return
    if stat.S_ISLNK(st.st_mode):
        raise StoreCorrupt(f"{path} is a symbolic link, not a store file")
    if not stat.S_ISREG(st.st_mode):
        raise StoreCorrupt(f"{path} is not a regular file")
    if stat.S_IMODE(st.st_mode) != 0o600:
        os.chmod(path, 0o600)


class SqliteFile:
    # SQL scripts, or functions run in the migration's transaction.
    MIGRATIONS: ClassVar[tuple[str | Callable[[sqlite3.Connection], None], ...]] = ()
    WHAT: ClassVar[str] = "store"

    MEMO_ENTRIES: ClassVar[int] = 256  # keys may come from what a peer presents (a domain): bounded

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self._memo: dict[Hashable, object] = {}
        self._memo_token: tuple[int, int] | None = None

    def _state_token(self) -> tuple[int, int]:
        """Changes whenever a commit reaches the file: ``PRAGMA data_version`` moves with another
        connection's (any process), ``total_changes`` with this connection's own."""
        return self.conn.execute("PRAGMA data_version").fetchone()[0], self.conn.total_changes

    def memo(self, key: Hashable, compute: Callable[[], T]) -> T:
        """``compute()`` (reads only), read as one snapshot and reused until anything commits to the file.

        For hot read paths (verifying a peer's SVID re-reads the same agreement, epoch and bundle): one
        ``PRAGMA`` instead of parsing signed documents again.  Inside a transaction nothing is reused,
        and a value whose reads raced a commit is returned but not kept."""
        if self.conn.in_transaction:
            return compute()
        before = self._state_token()
        if before != self._memo_token:
            self._memo.clear()
            self._memo_token = before
        if key in self._memo:
            return self._memo[key]  # type: ignore[return-value]
        self.conn.execute("BEGIN")  # a read transaction: one snapshot for every read of compute()
        try:
            value = compute()
        finally:
            self.conn.execute("COMMIT")
        if self._state_token() == before:
            if len(self._memo) >= self.MEMO_ENTRIES:
                self._memo.clear()
            self._memo[key] = value
        return value

    @staticmethod
    def connect(path: Path, *, any_thread: bool = False) -> sqlite3.Connection:
        """``any_thread``: the connection may be closed by another thread than the one that opened it (the
        caller still uses it from one thread at a time)."""
        _private_file(path)  # before SQLite creates it: its -wal and -shm files take the same mode
        conn = sqlite3.connect(path, isolation_level=None, timeout=2.0, check_same_thread=not any_thread)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.OperationalError as exc:
            conn.close()
            raise StoreLocked(f"{path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreCorrupt(f"{path} is not a usable SQLite store: {exc}") from exc
        for suffix in ("-wal", "-shm"):  # made by an older version with a wider mode: tighten them
            with suppress(FileNotFoundError):
                _private_file(Path(f"{path}{suffix}"), create=False)
        return conn

    def close(self) -> None:
        self.conn.close()

    def migrate(self) -> None:
        """Run the migrations this file lacks, each in its own transaction.  The schema version is read
        again inside each one (under the write lock): another process opening the same store at the same
        moment may have run it already, and a migration must never run twice."""
        while True:
            current = self._schema_version()
            if current >= len(self.MIGRATIONS):
                break
            with self.transaction():
                number = self._schema_version()
                if number >= len(self.MIGRATIONS):
                    break
                migration = self.MIGRATIONS[number]
                if callable(migration):  # a migration that must compute (parse stored bodies)
                    migration(self.conn)
                else:
                    for statement in migration.split(";"):
                        if statement.strip():
                            self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {number + 1}")

    def _schema_version(self) -> int:
        current = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
        if current > len(self.MIGRATIONS):
            raise StoreCorrupt(f"{self.WHAT} schema v{current} is newer than this qhx-edge (v{len(self.MIGRATIONS)})")
        return current

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreLocked(f"{self.path} is locked by another process: {exc}") from exc
        self._memo_token = None  # whatever this transaction writes (DDL too, which total_changes misses)
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")
        finally:
            self._memo_token = None
