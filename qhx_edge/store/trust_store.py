"""The node store: one SQLite file holding everything a node believes.

* the exact signed bytes of every accepted document and its history;
* persisted high-water marks per (domain, type) -- the rollback guard;
* the persisted clock high-water mark (trusted time);
* a hash-chained audit log of every accept and reject.

Durability: WAL journal, ``synchronous=FULL`` (every commit is fsynced before
it is acknowledged), foreign keys on.  Every change of trust state happens in
one ``BEGIN IMMEDIATE`` transaction, so a crash leaves the old or the new
state and nothing between.  Rejections are written to the audit log in their
own transaction *after* the rejected change has been rolled back, so the
audit log grows while the trust state (every other table) stays unchanged.

Schema changes are numbered migrations applied in order and recorded in
``PRAGMA user_version``.
"""

from __future__ import annotations

import functools
import hashlib
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qhx_edge.core import cbor
from qhx_edge.core.agreements import FederatedOutcome, Federation, fingerprint
from qhx_edge.core.documents import Agreement, Freshness, Root, Signed, parse
from qhx_edge.core.errors import EnvironmentFault, NotInitialised, QhxError, StoreCorrupt
from qhx_edge.core.trust import DomainView, Mark, Outcome, TrustState
from qhx_edge.store import audit as audit_log
from qhx_edge.store.files import private_dir
from qhx_edge.store.sqlitefile import SqliteFile

if TYPE_CHECKING:
    from qhx_edge.core.spiffe_bundle import SpiffeBundle
    from qhx_edge.core.suites import PrivateKey, PublicKey

STORE_FILE = "node.sqlite"
GENESIS = b"\x00" * 32


def _content_digests(conn: sqlite3.Connection) -> None:
    """Migration 6: re-key documents and marks by :attr:`Signed.digest`, the signed content's digest.

    Earlier versions keyed them by the SHA-256 of the exact bytes, so a copy a
    relay had altered in unsigned parts (an extra signature, an unprotected
    header) counted as another document and blocked the genuine one.  Bodies
    are kept as stored; the marks point at the same rows.  The audit log is
    history and keeps the digests it recorded.
    """
    rows = conn.execute("SELECT id, domain, type, version, digest, body FROM documents").fetchall()
    for row_id, domain, type_, version, old, body in rows:
        try:
            new = parse(bytes(body)).digest
        except QhxError as exc:
            raise StoreCorrupt(f"held {type_} v{version} of {domain} does not parse: {exc}") from exc
        conn.execute("UPDATE documents SET digest = ? WHERE id = ?", (new, row_id))
        conn.execute(
            "UPDATE high_water SET digest = ? WHERE domain = ? AND type = ? AND version = ? AND digest = ?",
            (new, domain, type_, version, old),
        )


def _bundle_endpoints(conn: sqlite3.Connection) -> None:
    """Migration 10 (see its comment in :data:`MIGRATIONS`), and the SPIFFE bundles' digests again: the
    content digest no longer covers ``spiffe_refresh_hint``, a serving parameter (SPIRE's ``bundle show``
    leaves it out where its endpoint puts it in, for the same keys and sequence)."""
    from qhx_edge.core import spiffe_bundle

    # Idempotent whatever number it runs as (as migration 9): a column or table already there is kept.
    columns = {row[1] for row in conn.execute("PRAGMA table_info(spiffe_bundles)")}
    if "confirmed_at" not in columns:
        conn.execute("ALTER TABLE spiffe_bundles ADD COLUMN confirmed_at INTEGER")
    conn.execute(
        """
        CREATE TABLE IF NOT EXISTS bundle_endpoints (
            domain TEXT PRIMARY KEY,
            url TEXT NOT NULL,
            profile TEXT NOT NULL CHECK (profile IN ('https_spiffe', 'https_web')),
            endpoint_id TEXT,
            ca_pem BLOB,
            set_at INTEGER NOT NULL
        )
        """
    )
    for domain, sequence, body in conn.execute("SELECT domain, sequence, body FROM spiffe_bundles").fetchall():
        try:
            digest = spiffe_bundle.content_digest(spiffe_bundle.parse(bytes(body)))
        except QhxError as exc:
            raise StoreCorrupt(f"held SPIFFE bundle {sequence} of {domain} does not parse: {exc}") from exc
        conn.execute(
            "UPDATE spiffe_bundles SET digest = ? WHERE domain = ? AND sequence = ?", (digest, domain, sequence)
        )


MIGRATIONS: tuple[str | Callable[[sqlite3.Connection], None], ...] = (
    # 1: the trust core.
    """
    CREATE TABLE node (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        node_id TEXT NOT NULL,
        home_domain TEXT NOT NULL,
        clock_tolerance INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE domains (
        domain TEXT PRIMARY KEY,
        relation TEXT NOT NULL CHECK (relation IN ('home', 'partner')),
        anchor_fingerprint TEXT NOT NULL,
        added_at INTEGER NOT NULL
    );
    CREATE TABLE documents (
        id INTEGER PRIMARY KEY,
        domain TEXT NOT NULL REFERENCES domains(domain),
        type TEXT NOT NULL,
        version INTEGER NOT NULL,
        digest BLOB NOT NULL,
        issued_at INTEGER NOT NULL,
        expires INTEGER NOT NULL,
        accepted_at INTEGER NOT NULL,
        body BLOB NOT NULL,
        UNIQUE (domain, type, version)
    );
    CREATE INDEX documents_digest ON documents(digest);
    CREATE TABLE high_water (
        domain TEXT NOT NULL REFERENCES domains(domain),
        type TEXT NOT NULL,
        version INTEGER NOT NULL,
        digest BLOB NOT NULL,
        PRIMARY KEY (domain, type)
    );
    CREATE TABLE clock (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        high_water INTEGER NOT NULL
    );
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        event TEXT NOT NULL,
        kind TEXT,
        domain TEXT,
        type TEXT,
        version INTEGER,
        digest BLOB,
        detail TEXT NOT NULL,
        prev BLOB NOT NULL,
        hash BLOB NOT NULL
    );
    """,
    # 2: node identity, export counters, packs seen, peer cards (sneakernet).
    """
    CREATE TABLE identity (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        card BLOB NOT NULL
    );
    CREATE TABLE exports (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        sequence INTEGER NOT NULL,
        evidence_seq INTEGER NOT NULL
    );
    CREATE TABLE packs_seen (
        pack_id BLOB PRIMARY KEY,
        digest BLOB NOT NULL,
        exporter_domain TEXT NOT NULL,
        exporter_node TEXT NOT NULL,
        exporter_keyid TEXT NOT NULL,
        sequence INTEGER NOT NULL,
        imported_at INTEGER NOT NULL
    );
    CREATE INDEX packs_seen_digest ON packs_seen(digest);
    CREATE TABLE cards (
        node_id TEXT PRIMARY KEY,
        domain TEXT NOT NULL,
        keyid TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        body BLOB NOT NULL,
        pinned_at INTEGER NOT NULL
    );
    """,
    # 3: files handled by 'pack watch', by SHA-256 of the file's bytes (a sealed
    # pack's outer bytes differ from the pack packs_seen records).  Bookkeeping,
    # not trust state: trust_digest() leaves it out, like the audit log.
    """
    CREATE TABLE watched_files (
        digest BLOB PRIMARY KEY,
        name TEXT NOT NULL,
        outcome TEXT NOT NULL,
        at INTEGER NOT NULL
    );
    """,
    # 4: the latest time this node itself observed (every audited import and issuance), beside the
    # trusted-time mark: a clock set back behind it issues nothing (clock-rollback).  Re-anchored only
    # when a newly verified freshness epoch is applied (the authority's word on the time), so a clock
    # pushed forward and then corrected fails closed until the next fresh pack, never for ever.
    """
    CREATE TABLE observed (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        high_water INTEGER NOT NULL
    );
    INSERT INTO observed VALUES (1, 0);
    """,
    # 5: the trust generation, raised by every import that changes trust state.  An import verifies
    # against the state read with its generation and applies only if the generation is unchanged
    # inside its write transaction (else it verifies again): concurrent imports give what the same
    # imports in sequence give, and no high-water mark ever falls.
    """
    CREATE TABLE generation (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        n INTEGER NOT NULL
    );
    INSERT INTO generation VALUES (1, 0);
    """,
    # 6: a document's digest is the digest of its signed content, not of its bytes (see below).
    _content_digests,
    # Signed checkpoints of the audit chain (docs/architecture.md, "Audit checkpoints"): each one a
    # COSE_Sign by the node's key over (node, number, last row, head, count, time, previous
    # checkpoint), written in the transaction of the rows it covers.  An existing store's rows are
    # covered by its first checkpoint.  IF NOT EXISTS: idempotent whatever number it runs as.
    audit_log.checkpoint_table("audit_checkpoints"),
    # 8: agreements (docs/architecture.md "Agreements"): every accepted version per partner domain, the
    # newest being current (its version the rollback mark of the pair).  Kept apart from `documents`,
    # whose domain column is a document's own domain: an agreement belongs to a pair of domains.
    # IF NOT EXISTS: idempotent whatever number it runs as, like migration 7.
    """
    CREATE TABLE IF NOT EXISTS agreements (
        partner TEXT NOT NULL,
        version INTEGER NOT NULL,
        digest BLOB NOT NULL,
        proposer TEXT NOT NULL,
        status TEXT NOT NULL,
        issued_at INTEGER NOT NULL,
        expires INTEGER NOT NULL,
        accepted_at INTEGER NOT NULL,
        body BLOB NOT NULL,
        PRIMARY KEY (partner, version)
    );
    """,
    # 9: partners' SPIFFE bundles (docs/architecture.md "SPIFFE bundles"): unsigned JWK Sets taken under
    # an agreement that allows them (`bundle import-spiffe`), every imported sequence per partner domain,
    # the newest being current (its sequence the rollback mark).  `digest` is the content digest
    # (core/spiffe_bundle.content_digest), `body` the exact bytes read, `imported_at` the node's time of
    # import: the partner bundle's freshness time under the agreement's budget.  Apart from `documents`,
    # which holds only signed documents.  IF NOT EXISTS: idempotent whatever number it runs as.
    """
    CREATE TABLE IF NOT EXISTS spiffe_bundles (
        domain TEXT NOT NULL,
        sequence INTEGER NOT NULL,
        digest BLOB NOT NULL,
        imported_at INTEGER NOT NULL,
        agreement_version INTEGER NOT NULL,
        body BLOB NOT NULL,
        PRIMARY KEY (domain, sequence)
    );
    """,
    # 10: partners' bundle endpoints (`federation fetch`, docs/architecture.md "Fetching a partner's
    # bundle endpoint"): where each partner's SPIFFE bundle is fetched from and how the endpoint is
    # authenticated (`endpoint_id` for https_spiffe, `ca_pem` for https_web); and `confirmed_at`, the
    # last time an authenticated fetch returned the held bundle unchanged, which then counts as its
    # freshness time (a replayed *file* never does: only a fetch over an authenticated channel).
    _bundle_endpoints,
    # 11: sync peers (docs/architecture.md "Sync links"): per peer (the address dialled, or the address a
    # peer dialled from), its node id, the last attempt and contact, the last error, and running
    # counts.  Bookkeeping for `sync status`, not trust state.
    """
    CREATE TABLE IF NOT EXISTS sync_peers (
        peer TEXT PRIMARY KEY,
        node_id TEXT,
        last_attempt INTEGER NOT NULL,
        last_contact INTEGER,
        last_error TEXT,
        contacts INTEGER NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0,
        received INTEGER NOT NULL DEFAULT 0,
        sent INTEGER NOT NULL DEFAULT 0,
        bytes_in INTEGER NOT NULL DEFAULT 0,
        bytes_out INTEGER NOT NULL DEFAULT 0
    );
    """,
)

# Bookkeeping, not belief: the audit log, which packs and files were seen, and
# export counters.  A no-op import may record a pack; it must not look like a
# change of trust.
NOT_TRUST_STATE = frozenset(
    {"audit", "audit_checkpoints", "watched_files", "packs_seen", "exports", "observed", "generation", "sync_peers"}
)


@dataclass(frozen=True)
class HeldSpiffeBundle:
    """A partner's SPIFFE bundle as held (migration 9)."""

    domain: str
    sequence: int
    digest: bytes
    imported_at: int
    agreement_version: int
    bundle: SpiffeBundle
    confirmed_at: int | None = None  # the last authenticated fetch that returned it unchanged (migration 10)

    @property
    def fresh_at(self) -> int:
        """Its freshness time under the agreement's budget: when it was imported or last confirmed."""
        return max(self.imported_at, self.confirmed_at or 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "sequence": self.sequence,
            "digest": self.digest.hex(),
            "imported_at": self.imported_at,
            "confirmed_at": self.confirmed_at,
            "fresh_at": self.fresh_at,
            "agreement_version": self.agreement_version,
            "x509_authorities": len(self.bundle.x509_authorities),
            "jwt_authorities": len(self.bundle.jwt_authorities),
            "refresh_hint": self.bundle.refresh_hint,
        }


class StateChanged(Exception):
    """The trust state changed since the import read it: verify again against the new one."""


@dataclass(frozen=True)
class AuditEntry:
    event: str  # init | accept | reject | reset | ...
    detail: str
    kind: str | None = None
    domain: str | None = None
    type: str | None = None
    version: int | None = None
    digest: bytes | None = None


def _entry_hash(prev: bytes, seq: int, at: int, e: AuditEntry) -> bytes:
    body = cbor.encode([seq, at, e.event, e.kind, e.domain, e.type, e.version, e.digest, e.detail])
    return hashlib.sha256(prev + body).digest()


# The node's audit log as store.audit sees it: the same hash as _entry_hash, over the same columns.
AUDIT_LOG = audit_log.Log(
    "node",
    "audit",
    "seq",
    ("at", "event", "kind", "domain", "type", "version", "digest", "detail"),
    "audit_checkpoints",
)
# Issuance checkpoints once per this many rows or seconds (whichever comes first, at a commit):
# signing costs about as much as minting an SVID (ML-DSA-65 + Ed25519 for a hybrid node), so not per
# commit; nor is the confirmation of a partner's SPIFFE bundle by a poll.  Every other write (imports,
# pins, rejections) checkpoints at its commit.
CHECKPOINT_ROWS = 256
CHECKPOINT_SECONDS = 60


# Held documents are read again and again (the current agreement, epoch and policy on every import and
# every status): parsed once per distinct bytes.  Parsing is pure and the parsed documents are never
# changed by their readers; the digest is still checked against the store's mark on every read.
_parse_held = functools.lru_cache(maxsize=256)(parse)


class Store(SqliteFile):
    """A node's SQLite store.  Use :meth:`create` or :meth:`open`."""

    MIGRATIONS = MIGRATIONS
    WHAT = "store"

    @functools.cached_property
    def db(self) -> Any:
        """sqlite-utils' view of the file, made on first use: only :meth:`trust_digest` needs it,
        and importing sqlite-utils (with its plugins and date parser) would cost every command."""
        import sqlite_utils

        return sqlite_utils.Database(self.conn)

    # --- lifecycle ---------------------------------------------------------------

    @classmethod
    def open(cls, home: Path) -> Store:
        path = Path(home) / STORE_FILE
        if not path.exists():
            raise NotInitialised(f"{home} is not a node home (no {STORE_FILE}); run 'node init'")
        store = cls(cls.connect(path), path)
        store.migrate()
        return store

    @classmethod
    def create(cls, home: Path) -> Store:
        private_dir(Path(home))
        path = Path(home) / STORE_FILE
        store = cls(cls.connect(path), path)
        store.migrate()
        return store

    # --- reading -------------------------------------------------------------------

    def node_info(self) -> dict[str, Any]:
        row = self.conn.execute("SELECT node_id, home_domain, clock_tolerance, created_at FROM node").fetchone()
        if row is None:
            raise NotInitialised(f"{self.path} holds no node (interrupted 'node init'?)")
        return {"node_id": row[0], "home_domain": row[1], "clock_tolerance": row[2], "created_at": row[3]}

    def observed_time(self) -> int:
        """The latest time this node itself observed (issuance, imports); see migration 4."""
        row = self.conn.execute("SELECT high_water FROM observed").fetchone()
        return int(row[0]) if row else 0

    def clock_high_water(self) -> int:
        row = self.conn.execute("SELECT high_water FROM clock").fetchone()
        return int(row[0]) if row else 0

    def domains(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT domain, relation, anchor_fingerprint, added_at FROM domains ORDER BY domain")
        return [dict(zip(("domain", "relation", "anchor_fingerprint", "added_at"), r, strict=True)) for r in rows]

    def marks(self, domain: str) -> dict[str, Mark]:
        rows = self.conn.execute("SELECT type, version, digest FROM high_water WHERE domain = ?", (domain,))
        return {t: Mark(v, bytes(d)) for t, v, d in rows}

    def held_expiries(self, domain: str) -> dict[str, int]:
        """``expires`` of the current root, bundle and policy of ``domain`` (what issuance rests on)."""
        rows = self.conn.execute(
            "SELECT h.type, d.expires FROM high_water h JOIN documents d ON d.domain = h.domain "
            "AND d.type = h.type AND d.version = h.version "
            "WHERE h.domain = ? AND h.type IN ('root', 'bundle', 'policy')",
            (domain,),
        )
        return {t: int(e) for t, e in rows}

    def document(self, domain: str, type_: str, version: int) -> bytes | None:
        row = self.conn.execute(
            "SELECT body FROM documents WHERE domain = ? AND type = ? AND version = ?", (domain, type_, version)
        ).fetchone()
        return bytes(row[0]) if row else None

    def current(self, domain: str, type_: str) -> Signed[Any] | None:
        mark = self.marks(domain).get(type_)
        if mark is None:
            return None
        body = self.document(domain, type_, mark.version)
        try:
            doc = _parse_held(body) if body is not None else None
        except QhxError as exc:
            raise StoreCorrupt(f"held {type_} v{mark.version} of {domain} does not parse: {exc}") from exc
        if doc is None or doc.digest != mark.digest:
            raise StoreCorrupt(f"held {type_} v{mark.version} of {domain} is missing or does not match its mark")
        return doc

    def read_trust_state(self, digests: Sequence[bytes] | None = None) -> tuple[TrustState, int]:
        """:meth:`trust_state` and the trust generation it belongs to, read as one snapshot."""
        state, _, generation = self.read_federated_state(digests)
        return state, generation

    def read_federated_state(self, digests: Sequence[bytes] | None = None) -> tuple[TrustState, Federation, int]:
        """:meth:`trust_state`, :meth:`federation` and the trust generation, read as one snapshot."""
        self.conn.execute("BEGIN")  # a read transaction: every read below sees one state
        try:
            state = self.trust_state(digests)
            return state, self.federation(), self._generation(self.conn)
        finally:
            self.conn.execute("COMMIT")

    def agreement(self, partner: str) -> Signed[Agreement] | None:
        """The current (newest) agreement held with ``partner``."""
        row = self.conn.execute(
            "SELECT body, digest FROM agreements WHERE partner = ? ORDER BY version DESC LIMIT 1", (partner,)
        ).fetchone()
        if row is None:
            return None
        try:
            doc: Signed[Any] = _parse_held(bytes(row[0]))
        except QhxError as exc:
            raise StoreCorrupt(f"held agreement with {partner} does not parse: {exc}") from exc
        if not isinstance(doc.payload, Agreement) or doc.digest != bytes(row[1]):
            raise StoreCorrupt(f"held agreement with {partner} does not match its digest")
        return doc

    def spiffe_bundle(self, domain: str) -> HeldSpiffeBundle | None:
        """The newest SPIFFE bundle imported for ``domain`` (migration 9), re-read and checked."""
        from qhx_edge.core import spiffe_bundle

        row = self.conn.execute(
            "SELECT sequence, digest, imported_at, agreement_version, body, confirmed_at FROM spiffe_bundles "
            "WHERE domain = ? ORDER BY sequence DESC LIMIT 1",
            (domain,),
        ).fetchone()
        if row is None:
            return None
        seq, digest, imported_at, agreement_version, body, confirmed_at = row
        try:
            parsed = spiffe_bundle.parse(bytes(body))
        except QhxError as exc:
            raise StoreCorrupt(f"held SPIFFE bundle {seq} of {domain} does not parse: {exc}") from exc
        if parsed.sequence != seq or spiffe_bundle.content_digest(parsed) != bytes(digest):
            raise StoreCorrupt(f"held SPIFFE bundle {seq} of {domain} does not match its digest")
        return HeldSpiffeBundle(
            domain,
            int(seq),
            bytes(digest),
            int(imported_at),
            int(agreement_version),
            parsed,
            None if confirmed_at is None else int(confirmed_at),
        )

    def spiffe_bundle_mark(self, domain: str) -> tuple[tuple[int, bytes] | None, int]:
        """The newest held SPIFFE bundle's (sequence, digest) of ``domain`` and the trust generation, as one read."""
        self.conn.execute("BEGIN")
        try:
            row = self.conn.execute(
                "SELECT sequence, digest FROM spiffe_bundles WHERE domain = ? ORDER BY sequence DESC LIMIT 1",
                (domain,),
            ).fetchone()
            return (None if row is None else (int(row[0]), bytes(row[1]))), self._generation(self.conn)
        finally:
            self.conn.execute("COMMIT")

    def add_spiffe_bundle(
        self,
        domain: str,
        sequence: int,
        digest: bytes,
        body: bytes,
        agreement_version: int,
        now: int,
        entries: Sequence[AuditEntry],
        *,
        generation: int,
        confirmed: bool = False,
        replace: bool = False,
    ) -> None:
        """Store a partner's SPIFFE bundle and its audit entries in one transaction (:class:`StateChanged`
        if the trust state moved on since ``generation`` was read); ``confirmed``: it came from an
        authenticated fetch; ``replace``: every held bundle of ``domain`` goes first (an operator's reset)."""
        with self._write(generation) as conn:
            conn.execute("UPDATE generation SET n = n + 1")
            if replace:
                conn.execute("DELETE FROM spiffe_bundles WHERE domain = ?", (domain,))
            conn.execute(
                "INSERT INTO spiffe_bundles (domain, sequence, digest, imported_at, agreement_version, body, "
                "confirmed_at) VALUES (?,?,?,?,?,?,?)",
                (domain, sequence, digest, now, agreement_version, body, now if confirmed else None),
            )
            self._audit(conn, now, entries)

    def confirm_spiffe_bundle(
        self, domain: str, sequence: int, digest: bytes, now: int, entries: Sequence[AuditEntry], *, generation: int
    ) -> None:
        """An authenticated fetch returned the held bundle unchanged: ``now`` becomes its confirmation time
        (never moved back), with the audit entries, in one transaction."""
        with self._write(generation) as conn:
            conn.execute("UPDATE generation SET n = n + 1")
            conn.execute(
                "UPDATE spiffe_bundles SET confirmed_at = max(coalesce(confirmed_at, 0), ?) "
                "WHERE domain = ? AND sequence = ? AND digest = ?",
                (now, domain, sequence, digest),
            )
            # Routine (every poll of a partner's endpoint): checkpointed as issuance is, when due.
            self._audit_many(conn, [(now, entries)], hot=True)

    def bundle_endpoint(self, domain: str) -> dict[str, Any] | None:
        """Where ``domain``'s bundle endpoint is and how it is authenticated (migration 10), if set."""
        row = self.conn.execute(
            "SELECT url, profile, endpoint_id, ca_pem, set_at FROM bundle_endpoints WHERE domain = ?", (domain,)
        ).fetchone()
        if row is None:
            return None
        url, profile, endpoint_id, ca_pem, set_at = row
        return {
            "domain": domain,
            "url": url,
            "profile": profile,
            "endpoint_id": endpoint_id,
            "ca_pem": None if ca_pem is None else bytes(ca_pem),
            "set_at": int(set_at),
        }

    def record_sync(self, peer: str, at: int, result: dict[str, Any]) -> None:
        """One contact's outcome for ``sync status`` (``ContactResult.to_json``), in its own transaction."""
        ok = result.get("complete") and result.get("error") is None
        error = result.get("error") or {}
        # A live link's later record (``continued``): what it moved since its contact was recorded, no new contact.
        once = 0 if result.get("continued") else 1
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO sync_peers (peer, last_attempt) VALUES (?, ?) "
                "ON CONFLICT (peer) DO UPDATE SET last_attempt = excluded.last_attempt",
                (peer, at),
            )
            conn.execute(
                "UPDATE sync_peers SET node_id = coalesce(?, node_id), last_contact = CASE WHEN ? THEN ? "
                "ELSE last_contact END, last_error = ?, contacts = contacts + ?, failures = failures + ?, "
                "received = received + ?, sent = sent + ?, bytes_in = bytes_in + ?, bytes_out = bytes_out + ? "
                "WHERE peer = ?",
                (
                    result.get("peer"), ok, at, None if ok else f"{error.get('kind')}: {error.get('message')}",
                    once if ok else 0, 0 if ok else once, result.get("received", 0), result.get("sent", 0),
                    result.get("bytes_in", 0), result.get("bytes_out", 0), peer,
                ),
            )  # fmt: skip

    def sync_peers(self) -> list[dict[str, Any]]:
        cols = ("peer", "node_id", "last_attempt", "last_contact", "last_error", "contacts", "failures",
                "received", "sent", "bytes_in", "bytes_out")  # fmt: skip
        rows = self.conn.execute(f"SELECT {', '.join(cols)} FROM sync_peers ORDER BY peer")  # noqa: S608
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def bundle_endpoint_domains(self) -> list[str]:
        """The partners whose bundle endpoint is recorded (``serve --fetch-partners`` polls each)."""
        return [str(r[0]) for r in self.conn.execute("SELECT domain FROM bundle_endpoints ORDER BY domain")]

    def set_bundle_endpoint(
        self,
        domain: str,
        url: str,
        profile: str,
        endpoint_id: str | None,
        ca_pem: bytes | None,
        now: int,
        entries: Sequence[AuditEntry],
    ) -> None:
        """Record (or replace) ``domain``'s bundle endpoint, with its audit entries, in one transaction."""
        with self._write(None) as conn:
            conn.execute("UPDATE generation SET n = n + 1")
            conn.execute(
                "INSERT OR REPLACE INTO bundle_endpoints VALUES (?,?,?,?,?,?)",
                (domain, url, profile, endpoint_id, ca_pem, now),
            )
            self._audit(conn, now, entries)

    def federation(self) -> Federation:
        """What the agreement rules need: current agreements, partner roots by fingerprint, root floors."""
        home = self.node_info()["home_domain"]
        partners = [r[0] for r in self.conn.execute("SELECT DISTINCT partner FROM agreements ORDER BY partner")]
        agreements = {}
        for p in partners:
            doc = self.agreement(p)
            if doc is not None:
                agreements[p] = doc
        roots: dict[str, Signed[Any]] = {}
        floors: dict[str, int] = {}
        rows = self.conn.execute(
            "SELECT d.domain, d.version, d.body FROM documents d JOIN domains m ON m.domain = d.domain "
            "WHERE d.type = 'root' AND m.relation = 'partner' ORDER BY d.domain, d.version"
        )
        for domain, version, body in rows:
            raw = bytes(body)
            root = parse(raw)
            if isinstance(root.payload, Root):
                roots[fingerprint(raw)] = root
            floors.setdefault(domain, int(version))
        return Federation(home, agreements, roots, floors)

    @staticmethod
    def _generation(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT n FROM generation").fetchone()
        return int(row[0]) if row else 0

    @contextmanager
    def _write(self, generation: int | None) -> Iterator[sqlite3.Connection]:
        """A write transaction, refused with :class:`StateChanged` if the trust generation moved on."""
        with self.transaction() as conn:
            if generation is not None and self._generation(conn) != generation:
                raise StateChanged
            yield conn

    def trust_state(self, digests: Sequence[bytes] | None = None) -> TrustState:
        """What the trust core needs to verify a batch.

        ``digests``: the digests (:attr:`Signed.digest`) of the batch's documents.
        History is then read only for held documents with one of those
        digests -- the only entries a rule can match, since a held version
        counts only with the same content -- instead of every held document, so
        an import does not slow down as the store grows.
        """
        views = {}
        for d in self.domains():
            domain = d["domain"]
            root = self.current(domain, "root")
            if root is None or not isinstance(root.payload, Root):
                raise StoreCorrupt(f"no root held for {domain}")
            fresh = self.current(domain, "freshness")
            history = self._history(domain, digests)
            views[domain] = DomainView(
                root=root,
                marks=self.marks(domain),
                freshness=fresh if fresh is not None and isinstance(fresh.payload, Freshness) else None,
                history=history,
                expires=self.held_expiries(domain),
            )
        info = self.conn.execute("SELECT node_id FROM node").fetchone()
        card = self.conn.execute("SELECT card FROM identity").fetchone()
        return TrustState(
            views,
            self.clock_high_water(),
            info[0] if info else None,
            hashlib.sha256(bytes(card[0])).hexdigest() if card else None,
        )

    def _history(self, domain: str, digests: Sequence[bytes] | None) -> dict[tuple[str, int], bytes]:
        """(type, version) -> digest of the held documents of ``domain`` (those with ``digests`` only)."""
        if digests is None:
            rows = self.conn.execute("SELECT type, version, digest FROM documents WHERE domain = ?", (domain,))
            return {(t, v): bytes(dg) for t, v, dg in rows}
        out: dict[tuple[str, int], bytes] = {}
        wanted = list(dict.fromkeys(bytes(x) for x in digests))
        for i in range(0, len(wanted), 500):  # below SQLite's limit on bound parameters
            chunk = wanted[i : i + 500]
            marks = ",".join("?" * len(chunk))
            # "+domain": look rows up by the digest index, not by scanning the domain's every row.
            sql = f"SELECT type, version, digest FROM documents WHERE +domain = ? AND digest IN ({marks})"  # noqa: S608 - placeholders only
            for t, v, dg in self.conn.execute(sql, (domain, *chunk)):
                out[(t, v)] = bytes(dg)
        return out

    def list_documents(self) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT d.domain, d.type, d.version, d.digest, d.issued_at, d.expires, "
            "h.version IS NOT NULL AS current FROM documents d LEFT JOIN high_water h "
            "ON h.domain = d.domain AND h.type = d.type AND h.version = d.version "
            "ORDER BY d.domain, d.type, d.version"
        )
        keys = ("domain", "type", "version", "digest", "issued_at", "expires", "current")
        out = []
        for r in rows:
            item = dict(zip(keys, r, strict=True))
            item["digest"] = bytes(item["digest"]).hex()
            item["current"] = bool(item["current"])
            out.append(item)
        # Agreements (migration 8), under their proposer's domain like the document says, with the partner.
        for partner, version, digest, proposer, status, issued_at, expires, newest in self.conn.execute(
            "SELECT partner, version, digest, proposer, status, issued_at, expires, "
            "version = MAX(version) OVER (PARTITION BY partner) FROM agreements ORDER BY partner, version"
        ):
            out.append(
                {
                    "domain": proposer,
                    "type": "agreement",
                    "version": version,
                    "digest": bytes(digest).hex(),
                    "issued_at": issued_at,
                    "expires": expires,
                    "current": bool(newest),
                    "partner": partner,
                    "status": status,
                }
            )
        return out

    def held_documents(self, *, history: bool = False) -> list[bytes]:
        """Current documents (and with ``history`` all versions), roots first in version order."""
        if history:
            sql = "SELECT body FROM documents ORDER BY domain, type != 'root', type, version"
        else:
            sql = (
                "SELECT d.body FROM documents d JOIN high_water h ON h.domain = d.domain AND h.type = d.type "
                "AND (h.version = d.version OR d.type = 'root') ORDER BY d.domain, d.type != 'root', d.type, d.version"
            )
        return [bytes(r[0]) for r in self.conn.execute(sql)]

    def held_index(self) -> list[tuple[str, str, int, bytes]]:
        """``(domain, type, version, body)`` of every held version of every document, and the current
        agreement with each partner as ``(proposer, "agreement/ACCEPTOR", version, body)``: what a sync
        catalog needs, read from the columns without parsing a document (docs/architecture.md, "Sync links")."""
        home = self.node_info()["home_domain"]
        rows = [
            (str(d), str(t), int(v), bytes(b))
            for d, t, v, b in self.conn.execute(
                "SELECT domain, type, version, body FROM documents ORDER BY domain, type, version"
            )
        ]
        current = self.conn.execute(
            "SELECT a.partner, a.proposer, a.version, a.body FROM agreements a JOIN "
            "(SELECT partner, MAX(version) AS version FROM agreements GROUP BY partner) c "
            "ON c.partner = a.partner AND c.version = a.version ORDER BY a.partner"
        )
        for partner, proposer, version, body in current:
            acceptor = partner if proposer == home else home
            rows.append((str(proposer), f"agreement/{acceptor}", int(version), bytes(body)))
        return rows

    # --- writing -------------------------------------------------------------------

    def _audit(self, conn: sqlite3.Connection, at: int, entries: Sequence[AuditEntry]) -> None:
        self._audit_many(conn, [(at, entries)])

    def _audit_many(
        self, conn: sqlite3.Connection, batches: Sequence[tuple[int, Sequence[AuditEntry]]], *, hot: bool = False
    ) -> None:
        row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (row[0], bytes(row[1])) if row else (0, GENESIS)
        rows = []
        for at, entries in batches:
            for e in entries:
                seq += 1
                h = _entry_hash(prev, seq, at, e)
                rows.append((seq, at, e.event, e.kind, e.domain, e.type, e.version, e.digest, e.detail, prev, h))
                prev = h
        conn.executemany("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        if batches:  # every audited event is a time this node observed
            conn.execute("UPDATE observed SET high_water = MAX(high_water, ?)", (max(at for at, _ in batches),))
        if rows:
            self._checkpoint(conn, max(at for at, _ in batches), hot=hot, head=(seq, prev))

    # --- audit checkpoints (store/audit.py) ------------------------------------------------

    signer_source: Callable[[], PrivateKey | None] | None = None  # else store.audit.quiet_signer
    _signer_cache: list[PrivateKey | None] | None = None
    _node_row: tuple[str, str] | None = None  # (node_id, home_domain): the node row never changes once written
    _record: bytes | None = None

    def checkpoint_signer(self) -> PrivateKey | None:
        """The node's signing key for checkpoints, looked up once (never prompted for)."""
        if self._signer_cache is None:
            source = self.signer_source or (lambda: audit_log.quiet_signer(self.path.parent))
            self._signer_cache = [source()]
        return self._signer_cache[0]

    def _checkpoint(
        self,
        conn: sqlite3.Connection,
        at: int,
        *,
        hot: bool = False,
        force: bool = True,
        head: tuple[int, bytes] | None = None,
    ) -> None:
        """Sign the chain's head inside this transaction: always, or when ``hot`` (issuance) only when due.
        ``head``: the chain's head as this transaction has just appended it."""
        signer = self.checkpoint_signer()
        if signer is None:
            return  # the rows stay beyond the last checkpoint until a write with the key covers them
        row = self._node_row
        if row is None:
            row = conn.execute("SELECT node_id, home_domain FROM node").fetchone()
            if row is None:
                return
            self._node_row = (str(row[0]), str(row[1]))  # written once, at init, never changed
        if hot:
            body = audit_log.write_checkpoint(
                conn,
                AUDIT_LOG,
                signer,
                row[0],
                row[1],
                at,
                min_rows=CHECKPOINT_ROWS,
                min_seconds=CHECKPOINT_SECONDS,
                known_head=head,
            )
        else:
            body = audit_log.write_checkpoint(conn, AUDIT_LOG, signer, row[0], row[1], at, known_head=head)
        if body is not None:
            self._record = body  # kept beside the store once the transaction commits

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The file's transaction; a checkpoint written in it is recorded beside the store after the commit."""
        self._record = None
        try:
            with super().transaction() as conn:
                yield conn
        except BaseException:
            self._record = None
            raise
        record, self._record = self._record, None
        if record is not None:
            audit_log.write_record(self.path, record)

    def checkpoint_audit(self, at: int, signer: PrivateKey | None = None) -> dict[str, Any] | None:
        """Checkpoint the rows beyond the last checkpoint now (``audit checkpoint``, evidence export)."""
        if signer is not None:  # the caller has unlocked the key: use it for this store's checkpoints
            self._signer_cache = [signer]
        if self.checkpoint_signer() is None:
            return None
        with self.transaction() as conn:
            self._checkpoint(conn, at)
        last = audit_log.last_checkpoint(self.conn, AUDIT_LOG)
        return None if last is None else {"n": last[0], "seq": last[1], "at": last[2]}

    def audit_checkpoints(self, first: int, last: int) -> list[bytes]:
        """The signed checkpoints whose last row is in ``first..last``."""
        return audit_log.checkpoints_between(self.conn, AUDIT_LOG, first, last)

    def verify_audit(self, key: PublicKey) -> dict[str, Any]:
        """The audit chain against its checkpoints signed by ``key`` and the record beside the store.

        Raises :class:`~qhx_edge.core.checkpoint.AuditBroken` (kind ``audit-broken``) at the first finding.
        """
        info = self.node_info()
        return audit_log.verify(self.conn, AUDIT_LOG, key, info["node_id"], info["home_domain"], self.path)

    def audit(self, at: int, entries: Sequence[AuditEntry], *, generation: int | None = None) -> None:
        """Append entries to the audit log in their own transaction (if the trust generation is still this)."""
        with self._write(generation) as conn:
            self._audit(conn, at, entries)

    def audit_batches(self, batches: Sequence[tuple[int, Sequence[AuditEntry]]]) -> None:
        """Append the entries of several callers, each with its own time, in one transaction (one fsync)."""
        self.checkpoint_signer()  # looked up before the transaction: a keystore is slow to open
        with self.transaction() as conn:
            self._audit_many(conn, batches, hot=True)

    def initialise(
        self, node_id: str, anchor: Signed[Root], fingerprint: str, tolerance: int, now: int, card: bytes
    ) -> None:
        p = anchor.payload
        with self.transaction() as conn:
            conn.execute("INSERT INTO node VALUES (1, ?, ?, ?, ?)", (node_id, p.domain, tolerance, now))
            conn.execute("INSERT INTO identity VALUES (1, ?)", (card,))
            conn.execute("INSERT INTO exports VALUES (1, 0, 0)")
            conn.execute("INSERT INTO domains VALUES (?, 'home', ?, ?)", (p.domain, fingerprint, now))
            self._insert_docs(conn, [anchor], now)
            conn.execute("INSERT INTO high_water VALUES (?, 'root', ?, ?)", (p.domain, p.version, anchor.digest))
            conn.execute("INSERT INTO clock VALUES (1, ?)", (p.issued_at,))
            self._audit(
                conn,
                now,
                [
                    AuditEntry(
                        "init",
                        f"node {node_id} anchored to {p.domain} root v{p.version} fingerprint {fingerprint}",
                        None,
                        p.domain,
                        "root",
                        p.version,
                        anchor.digest,
                    )
                ],
            )

    @staticmethod
    def _insert_docs(conn: sqlite3.Connection, docs: Sequence[Signed[Any]], now: int) -> None:
        conn.executemany(
            "INSERT INTO documents (domain, type, version, digest, issued_at, expires, accepted_at, body) "
            "VALUES (?,?,?,?,?,?,?,?)",
            [
                (
                    d.payload.domain,
                    d.type,
                    d.payload.version,
                    d.digest,
                    d.payload.issued_at,
                    d.payload.expires,
                    now,
                    d.raw,
                )
                for d in docs
            ],
        )

    # --- identity, exports, packs, cards -----------------------------------------------

    def card(self) -> bytes:
        row = self.conn.execute("SELECT card FROM identity").fetchone()
        if row is None:
            raise NotInitialised(f"{self.path} holds no node identity")
        return bytes(row[0])

    def next_export_sequence(self) -> int:
        with self.transaction() as conn:
            conn.execute("UPDATE exports SET sequence = sequence + 1")
            return int(conn.execute("SELECT sequence FROM exports").fetchone()[0])

    def evidence_mark(self) -> int:
        """The last audit sequence number already exported as evidence."""
        return int(self.conn.execute("SELECT evidence_seq FROM exports").fetchone()[0])

    def set_evidence_mark(self, seq: int) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE exports SET evidence_seq = MAX(evidence_seq, ?)", (seq,))

    def pack_seen(self, pack_id: bytes) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT exporter_domain, exporter_node, sequence, imported_at FROM packs_seen WHERE pack_id = ?", (pack_id,)
        ).fetchone()
        if row is None:
            return None
        return dict(zip(("exporter_domain", "exporter_node", "sequence", "imported_at"), row, strict=True))

    def pack_digest_seen(self, digest: bytes) -> bool:
        """Whether a pack with these exact bytes was imported (and changed something)."""
        row = self.conn.execute("SELECT 1 FROM packs_seen WHERE digest = ? LIMIT 1", (digest,)).fetchone()
        return row is not None

    def watched_file(self, digest: bytes) -> dict[str, Any] | None:
        """What 'pack watch' did with a file of these bytes, if it handled one."""
        row = self.conn.execute("SELECT name, outcome, at FROM watched_files WHERE digest = ?", (digest,)).fetchone()
        return None if row is None else dict(zip(("name", "outcome", "at"), row, strict=True))

    def record_watched(self, digest: bytes, name: str, outcome: str, at: int) -> None:
        """Remember a file 'pack watch' handled; only a rejected outcome is ever replaced by a later one."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO watched_files VALUES (?,?,?,?) ON CONFLICT (digest) DO UPDATE SET "
                "name = excluded.name, outcome = excluded.outcome, at = excluded.at "
                "WHERE watched_files.outcome = 'rejected'",
                (digest, name, outcome, at),
            )

    def pinned_card(self, node_id: str) -> bytes | None:
        row = self.conn.execute("SELECT body FROM cards WHERE node_id = ?", (node_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def pin_card(self, node_id: str, domain: str, keyid: str, fingerprint: str, body: bytes, now: int) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO cards VALUES (?,?,?,?,?,?) ON CONFLICT (node_id) DO UPDATE SET domain = excluded.domain, "
                "keyid = excluded.keyid, fingerprint = excluded.fingerprint, body = excluded.body",
                (node_id, domain, keyid, fingerprint, body, now),
            )
            self._audit(conn, now, [AuditEntry("pin-card", f"card of node {node_id} ({domain}) pinned: {fingerprint}")])

    def record_noop(
        self,
        now: int,
        entries: Sequence[AuditEntry],
        pack_record: tuple[bytes, bytes, str, str, str, int] | None,
        *,
        generation: int | None = None,
    ) -> None:
        """An import that changed nothing: remember the pack (re-import says so) and audit it."""
        with self._write(generation) as conn:
            if pack_record is not None:
                conn.execute("INSERT OR IGNORE INTO packs_seen VALUES (?,?,?,?,?,?,?)", (*pack_record, now))
            self._audit(conn, now, entries)

    def apply(
        self,
        outcome: Outcome,
        now: int,
        detail: str,
        *,
        rejections: Sequence[AuditEntry] = (),
        pack_record: tuple[bytes, bytes, str, str, str, int] | None = None,
        generation: int | None = None,
    ) -> None:
        """Persist an outcome in one transaction: accepted documents, marks, the
        pack record and every audit entry (accepts and per-document rejects).

        With ``generation`` (what :meth:`read_trust_state` gave), refused with
        :class:`StateChanged` if another import changed the trust state since.
        """
        entries: list[AuditEntry] = []
        with self._write(generation) as conn:
            conn.execute("UPDATE generation SET n = n + 1")
            if pack_record is not None:
                conn.execute("INSERT OR IGNORE INTO packs_seen VALUES (?,?,?,?,?,?,?)", (*pack_record, now))
            for domain, type_ in sorted(outcome.resets):
                # TUF 5.3.11: the role's keys changed, so its old versions no longer bind us.
                conn.execute("DELETE FROM high_water WHERE domain = ? AND type = ?", (domain, type_))
                conn.execute("DELETE FROM documents WHERE domain = ? AND type = ?", (domain, type_))
                entries.append(
                    AuditEntry("reset", f"{type_} keys rotated: high-water mark reset ({detail})", None, domain, type_)
                )
            if isinstance(outcome, FederatedOutcome):
                for partner, fp in sorted(outcome.new_domains.items()):
                    conn.execute("INSERT INTO domains VALUES (?, 'partner', ?, ?)", (partner, fp, now))
                    entries.append(AuditEntry("partner", f"partner {partner} anchored to root {fp} by agreement"))
                home = self.node_info()["home_domain"]
                conn.executemany(
                    "INSERT INTO agreements VALUES (?,?,?,?,?,?,?,?,?)",
                    [
                        (
                            a.payload.other(home),
                            a.payload.version,
                            a.digest,
                            a.payload.domain,
                            a.payload.status,
                            a.payload.issued_at,
                            a.payload.expires,
                            now,
                            a.raw,
                        )
                        for a in outcome.agreements
                    ],
                )
            docs = outcome.accepted
            self._insert_docs(conn, docs, now)
            for (domain, type_), mark in sorted(outcome.marks.items()):
                conn.execute(
                    "INSERT INTO high_water VALUES (?,?,?,?) ON CONFLICT (domain, type) "
                    "DO UPDATE SET version = excluded.version, digest = excluded.digest",
                    (domain, type_, mark.version, mark.digest),
                )
            conn.execute("UPDATE clock SET high_water = MAX(high_water, ?)", (outcome.clock_high_water,))
            for v in outcome.verdicts:
                if v.doc is not None and v.status in ("applied", "history"):  # agreements too
                    p = v.doc.payload
                    entries.append(
                        AuditEntry("accept", f"{v.status}: {detail}", None, p.domain, p.type, p.version, v.doc.digest)
                    )
            self._audit(conn, now, [*entries, *rejections])
            if any(d.payload.type == "freshness" for d in docs):
                # A newly verified epoch re-anchors the observed time (see migration 4).
                conn.execute("UPDATE observed SET high_water = ?", (now,))

    # --- integrity -------------------------------------------------------------------

    def trust_digest(self) -> str:
        """SHA-256 over every table but the audit log and other bookkeeping: equal digests, equal trust state."""
        h = hashlib.sha256()
        for table in sorted(self.db.table_names()):
            if table in NOT_TRUST_STATE or table.startswith("sqlite_"):
                continue
            cols = [c.name for c in self.db[table].columns]
            h.update(cbor.encode([table, cols]))
            order = ", ".join(f'"{c}"' for c in cols)
            # Table and column names come from sqlite_master, not from input.
            for row in self.conn.execute(f'SELECT * FROM "{table}" ORDER BY {order}'):  # noqa: S608
                h.update(cbor.encode([bytes(x) if isinstance(x, memoryview) else x for x in row]))
        return h.hexdigest()

    def audit_entries(self) -> list[dict[str, Any]]:
        keys = ("seq", "at", "event", "kind", "domain", "type", "version", "digest", "detail", "prev", "hash")
        return [dict(zip(keys, r, strict=True)) for r in self.conn.execute("SELECT * FROM audit ORDER BY seq")]

    def verify_audit_chain(self) -> int:
        """Check every link of the audit chain; return its length or raise StoreCorrupt."""
        prev = GENESIS
        n = 0
        for row in self.conn.execute("SELECT * FROM audit ORDER BY seq"):
            seq, at, event, kind, domain, type_, version, digest, detail, rprev, rhash = row
            n += 1
            if seq != n or bytes(rprev) != prev:
                raise StoreCorrupt(f"audit chain broken at entry {seq}")
            entry = AuditEntry(
                event, detail, kind, domain, type_, version, bytes(digest) if digest is not None else None
            )
            if _entry_hash(prev, seq, at, entry) != bytes(rhash):
                raise StoreCorrupt(f"audit entry {seq} does not match its hash")
            prev = bytes(rhash)
        return n

    def integrity_check(self) -> str:
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])


# --- group commit of audit entries -------------------------------------------------------------


class _Waiter:
    __slots__ = ("at", "done", "entries", "error", "event", "lead")

    def __init__(self, at: int, entries: Sequence[AuditEntry]) -> None:
        self.at = at
        self.entries = entries
        # Held until this caller's commit is done or the lead is handed to it: released once per wait.
        self.event = threading.Lock()
        self.event.acquire()
        self.done = False
        self.lead = False
        self.error: BaseException | None = None


class GroupCommit:
    """Durable audit appends from many threads, one transaction and one fsync per group.

    :meth:`append` returns only once a commit holding the caller's entries has
    been fsynced (``synchronous=FULL``), or raises; so whoever hands something
    out after it returns has it on record (docs/issuance.md §4).  Callers that
    arrive while a commit is in flight queue up; when it ends, the first of them
    commits every queued caller's entries in one transaction (leader/follower
    group commit), while the others only wait for their own commit.  A lone
    caller commits at once, on its own thread, with no hand-off.

    A failed commit fails every caller in it (none of them may hand anything
    out); the next group starts afresh.  ``store`` must be used by nothing else
    (its own connection; it may be used from any thread).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._mutex = threading.Lock()
        self._queue: list[_Waiter] = []
        self._busy = False
        self.commits = 0  # transactions committed (for benchmarks and tests)
        self.appended = 0  # calls of append() those transactions held

    def append(self, at: int, entries: Sequence[AuditEntry]) -> None:
        me = _Waiter(at, entries)
        with self._mutex:
            self._queue.append(me)
            lead = not self._busy
            self._busy = True
        if not lead:
            me.event.acquire()
            lead = not me.done  # the previous leader handed the next commit to this caller
        if lead:
            self._lead()
        if me.error is not None:
            raise copy_error(me.error)

    def _lead(self) -> None:
        with self._mutex:
            group, self._queue = self._queue, []
        error: BaseException | None = None
        try:
            self.store.audit_batches([(w.at, w.entries) for w in group])
        except BaseException as exc:
            error = exc
        else:
            self.commits += 1
            self.appended += len(group)
        for w in group:
            w.error = error
            w.done = True
            w.event.release()
        with self._mutex:
            nxt = self._queue[0] if self._queue else None
            if nxt is None:
                self._busy = False
            else:
                nxt.lead = True
        if nxt is not None:
            nxt.event.release()


def trust_generation(home: Path) -> int:
    """The node store's trust generation (migration 5: raised by every import that changes trust state),
    read without opening the store for use: one read-only query, for a watcher that only needs to know
    whether anything changed (a live sync link, docs/architecture.md "Sync links")."""
    path = Path(home) / STORE_FILE
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT n FROM generation").fetchone()
    finally:
        conn.close()
    return int(row[0]) if row else 0


def copy_error(exc: BaseException) -> BaseException:
    """One exception object per raising thread: typed errors keep their kind, the rest become one."""
    if isinstance(exc, QhxError):
        return type(exc)(exc.message)
    if isinstance(exc, sqlite3.Error):
        return EnvironmentFault(f"the audit log could not be written: {exc}")
    return exc
