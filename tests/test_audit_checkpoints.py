"""An audit chain that needs a key to rewrite (issue 8, point 8).

Each tamper is done on the real ``node.sqlite`` (or ``evidence.sqlite``) with sqlite3, as someone
with the files but not the passphrase would, and found by the real ``qhx-edge audit verify``:
an edited, removed or reordered row, a truncated tail, a chain recomputed end to end without the
key, checkpoints removed or forged, the card swapped.  Plus: the window a checkpoint policy leaves
(rows beyond the last checkpoint, reported), an old store upgraded, evidence packs carrying the
node's checkpoints verified by the authority (a forged one refused), and the authority's own
rejections log checkpointed with its key.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from qhx_edge.core import cbor, checkpoint, cose
from qhx_edge.core.cards import make_card, parse_card
from qhx_edge.core.errors import BadSignature
from qhx_edge.core.suites import PrivateKey
from qhx_edge.homes import evidence, node
from qhx_edge.store import audit as audit_log
from qhx_edge.store import clock
from qhx_edge.store.trust_store import MIGRATIONS, STORE_FILE, AuditEntry, Store, _entry_hash
from tests.conftest import PASSPHRASE, Homes, Result, make_homes, run_cli


@pytest.fixture(autouse=True)
def _no_passphrase_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process no key opens without asking: only the CLI (which has the passphrase) checkpoints."""
    monkeypatch.delenv("QHX_EDGE_PASSPHRASE", raising=False)
    monkeypatch.delenv("QHX_EDGE_PASSPHRASE_FILE", raising=False)


@contextmanager
def db(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def verify(home: Path, *args: str) -> Result:
    return run_cli("--home", home, "--json", "audit", "verify", *args)


def broken(home: Path, reason: str, *args: str) -> dict[str, Any]:
    r = verify(home, *args)
    assert r.code == 1, (r.stdout, r.stderr)
    out = r.json
    assert out["ok"] is False
    assert out["error"]["kind"] == "audit-broken"
    assert out["error"]["reason"] == reason, out["error"]
    return dict(out)


@pytest.fixture
def h(tmp_path: Path) -> Homes:
    """A node whose log has rows 1-7 covered by checkpoints 1 (row 5), 2 (row 6) and 3 (row 7),
    and row 8 written by a process without the key (beyond the last checkpoint)."""
    homes = make_homes(tmp_path)  # rows 1-4, in this process: no checkpoint
    p = homes.export()
    for _ in range(3):
        r = run_cli("--home", homes.node_home, "pack", "import", p)
        assert r.code == 0, r.stderr
    with node.Node(homes.node_home) as n:
        n.import_pack(p.read_bytes(), clock.now())  # no key here: row 8 stays unprotected
    return homes


def node_db(h: Homes) -> Path:
    return h.node_home / STORE_FILE


def rows(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT * FROM audit ORDER BY seq").fetchall()


def rechain(conn: sqlite3.Connection) -> None:
    """What an attacker without the key can do: recompute every hash of the chain, end to end."""
    prev = b"\x00" * 32
    for seq, at, event, kind, domain, type_, version, digest, detail, _, _ in rows(conn):
        h = _entry_hash(prev, seq, at, AuditEntry(event, detail, kind, domain, type_, version, digest))
        conn.execute("UPDATE audit SET prev = ?, hash = ? WHERE seq = ?", (prev, h, seq))
        prev = h


# --- a clean log ----------------------------------------------------------------------------


def test_clean_log_verifies_and_reports_the_unprotected_tail(h: Homes) -> None:
    r = verify(h.node_home)
    assert r.code == 0, r.stderr
    log = r.json["logs"]["node"]
    assert log["entries"] == 8
    assert log["checkpoints"] == 3
    assert log["last_checkpoint"]["seq"] == 7
    assert log["unprotected"] == 1  # row 8: written without the key
    assert log["latest_record"] == "ok"
    assert set(r.json["key"]["checked_against"]) >= {"card", "keystore"}
    text = run_cli("--home", h.node_home, "audit", "verify")
    assert text.code == 0
    assert "1 rows beyond the last checkpoint" in text.stdout
    # The window can be made a failure, and closed by a checkpoint with the key.
    assert broken(h.node_home, "unprotected", "--max-unprotected", "0")["error"]["seq"] == 8
    c = run_cli("--home", h.node_home, "--json", "audit", "checkpoint")
    assert c.code == 0, c.stderr
    assert c.json["logs"]["node"] == {"n": 4, "seq": 8, "at": c.json["logs"]["node"]["at"]}
    assert verify(h.node_home, "--max-unprotected", "0").json["logs"]["node"]["unprotected"] == 0


def test_issuance_checkpoints_once_per_window_not_per_commit(tmp_path: Path) -> None:
    homes = make_homes(tmp_path)
    signer = PrivateKey.generate("hybrid")
    store = Store.open(homes.node_home)
    store.signer_source = lambda: signer
    try:
        base = store.verify_audit_chain()
        t = clock.now()
        for i in range(300):  # 300 one-row issuance commits within a minute
            store.audit_batches([(t + i // 10, [AuditEntry("issue", f"svid {i}")])])
        with db(node_db(homes)) as conn:
            cps = conn.execute("SELECT seq FROM audit_checkpoints ORDER BY n").fetchall()
        assert [s for (s,) in cps] == [base + 1, base + 1 + 256]  # the first, then every 256 rows
        store.audit_batches([(t + 120, [AuditEntry("issue", "later")])])  # a minute after: due by age
        with db(node_db(homes)) as conn:
            assert conn.execute("SELECT MAX(seq) FROM audit_checkpoints").fetchone()[0] == base + 301
    finally:
        store.close()


# --- each tamper ------------------------------------------------------------------------------


def test_edited_row(h: Homes) -> None:
    with db(node_db(h)) as conn:
        conn.execute("UPDATE audit SET detail = 'nothing happened' WHERE seq = 3")
    assert broken(h.node_home, "row-altered")["error"]["seq"] == 3


def test_removed_row(h: Homes) -> None:
    with db(node_db(h)) as conn:
        conn.execute("DELETE FROM audit WHERE seq = 3")
    assert broken(h.node_home, "row-missing")["error"]["seq"] == 3


def test_reordered_rows(h: Homes) -> None:
    with db(node_db(h)) as conn:
        a, b = conn.execute("SELECT * FROM audit WHERE seq IN (3, 4) ORDER BY seq").fetchall()
        cols = "at, event, kind, domain, type, version, digest, detail, prev, hash"
        conn.execute(f"UPDATE audit SET ({cols}) = (?,?,?,?,?,?,?,?,?,?) WHERE seq = 3", b[1:])
        conn.execute(f"UPDATE audit SET ({cols}) = (?,?,?,?,?,?,?,?,?,?) WHERE seq = 4", a[1:])
    assert broken(h.node_home, "row-altered")["error"]["seq"] == 3


def test_truncated_tail_beyond_a_checkpoint(h: Homes) -> None:
    with db(node_db(h)) as conn:
        conn.execute("DELETE FROM audit WHERE seq >= 7")  # checkpoint 3 covers row 7
    out = broken(h.node_home, "truncated")
    assert out["error"]["seq"] == 7


def test_truncating_only_unprotected_rows_is_the_stated_window(h: Homes) -> None:
    """Rows after the last checkpoint are the window the policy leaves: gone unseen, as documented."""
    with db(node_db(h)) as conn:
        conn.execute("DELETE FROM audit WHERE seq = 8")
    r = verify(h.node_home)
    assert r.code == 0
    assert r.json["logs"]["node"]["unprotected"] == 0


def test_chain_recomputed_without_the_key(h: Homes) -> None:
    with db(node_db(h)) as conn:
        conn.execute("UPDATE audit SET detail = 'nothing happened' WHERE seq = 3")
        rechain(conn)
    # The chain alone is consistent again: the check before this change passed it.
    with _store(h.node_home) as store:
        assert store.verify_audit_chain() == 8
    assert broken(h.node_home, "chain-rewritten")["error"]["seq"] == 5  # the first signed head after row 3


@contextmanager
def _store(home: Path) -> Iterator[Store]:
    s = Store.open(home)
    try:
        yield s
    finally:
        s.close()


def test_removed_and_recomputed_row(h: Homes) -> None:
    """A row deleted and the rest renumbered and rechained: no gap left, but the signed heads differ."""
    with db(node_db(h)) as conn:
        conn.execute("DELETE FROM audit WHERE seq = 3")
        conn.execute("UPDATE audit SET seq = seq - 1 WHERE seq > 3")
        rechain(conn)
    broken(h.node_home, "chain-rewritten")


def test_checkpoint_removed_from_the_middle(h: Homes) -> None:
    with db(node_db(h)) as conn:
        conn.execute("DELETE FROM audit_checkpoints WHERE n = 2")
    broken(h.node_home, "checkpoint-missing")


def test_latest_checkpoints_removed(h: Homes) -> None:
    """Rows and their newest checkpoint removed together: the record beside the store still names it."""
    with db(node_db(h)) as conn:
        conn.execute("DELETE FROM audit WHERE seq >= 7")
        conn.execute("DELETE FROM audit_checkpoints WHERE n = 3")
    broken(h.node_home, "checkpoints-removed")
    (h.node_home / f"{STORE_FILE}{audit_log.RECORD_SUFFIX}").unlink()  # and the record too
    broken(h.node_home, "checkpoints-removed")


def test_every_checkpoint_removed_and_chain_recomputed(h: Homes) -> None:
    with db(node_db(h)) as conn:
        conn.execute("UPDATE audit SET detail = 'nothing happened' WHERE seq = 3")
        rechain(conn)
        conn.execute("DELETE FROM audit_checkpoints")
    broken(h.node_home, "checkpoints-removed")


def test_forged_checkpoints(h: Homes) -> None:
    """Chain recomputed and checkpoints re-signed with a key of the attacker's own."""
    mine = PrivateKey.generate("hybrid")
    with db(node_db(h)) as conn:
        conn.execute("UPDATE audit SET detail = 'nothing happened' WHERE seq = 3")
        rechain(conn)
        node_id, domain = conn.execute("SELECT node_id, home_domain FROM node").fetchone()
        conn.execute("DELETE FROM audit_checkpoints")
        prev = checkpoint.ZERO
        for n, seq in ((1, 5), (2, 6), (3, 7)):
            head = conn.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()[0]
            body = checkpoint.make(
                mine, log="node", node_id=node_id, domain=domain, n=n, seq=seq, count=seq, head=head, prev=prev, at=1
            )
            digest = hashlib.sha256(body).digest()
            conn.execute("INSERT INTO audit_checkpoints VALUES (?,?,?,?,?,?)", (n, seq, head, 1, digest, body))
            prev = digest
    (h.node_home / f"{STORE_FILE}{audit_log.RECORD_SUFFIX}").write_bytes(body)
    broken(h.node_home, "checkpoint-forged")
    # ... and the card swapped for one with the attacker's key: the keystore's key is not the card's.
    with db(node_db(h)) as conn:
        held = parse_card(conn.execute("SELECT card FROM identity").fetchone()[0])
        card = make_card(domain, node_id, mine, held.encryption_key, 1)
        conn.execute("UPDATE identity SET card = ?", (card,))
    broken(h.node_home, "key-mismatch")
    # Without the keystore, an out-of-band fingerprint still catches it.
    r = verify(h.node_home, "--no-keystore")
    assert r.code == 0
    assert r.json["key"]["checked_against"] == ["card"]
    broken(h.node_home, "key-mismatch", "--no-keystore", "--expect-fingerprint", "00" * 32)


def test_each_tamper_passed_the_chain_check_alone_where_recomputed(h: Homes) -> None:
    """The point of the checkpoints: the hash chain alone accepts a recomputed log."""
    with db(node_db(h)) as conn:
        conn.execute("DELETE FROM audit WHERE seq >= 7")
    with _store(h.node_home) as store:
        assert store.verify_audit_chain() == 6  # the truncation is invisible to the chain


# --- an old store -----------------------------------------------------------------------------


def test_old_store_upgrades_and_its_rows_are_covered_by_the_first_checkpoint(tmp_path: Path) -> None:
    homes = make_homes(tmp_path)
    mine = MIGRATIONS.index(audit_log.checkpoint_table("audit_checkpoints"))
    with db(node_db(homes)) as conn:  # back to the schema before this migration, with rows
        conn.execute("DROP TABLE audit_checkpoints")
        conn.execute(f"PRAGMA user_version = {mine}")
        before = len(rows(conn))
    assert before > 0
    r = verify(homes.node_home)  # opening migrates
    assert r.code == 0, r.stderr
    assert r.json["logs"]["node"]["checkpoints"] == 0
    assert r.json["logs"]["node"]["unprotected"] == before
    with db(node_db(homes)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert run_cli("--home", homes.node_home, "pack", "import", homes.export()).code == 0
    log = verify(homes.node_home).json["logs"]["node"]
    assert log["checkpoints"] == 1
    assert log["last_checkpoint"]["seq"] == before + 1
    assert log["unprotected"] == 0


# --- evidence carries the checkpoints ---------------------------------------------------------


def export_evidence(h: Homes, path: Path) -> Result:
    return run_cli("--home", h.node_home, "--json", "pack", "export", "--evidence", "--to", path)


def test_evidence_carries_checkpoints_and_the_authority_checks_them(h: Homes, tmp_path: Path) -> None:
    ev = tmp_path / "ev.cbor"
    assert export_evidence(h, ev).code == 0
    r = run_cli("--home", h.a, "--json", "pack", "import", ev)
    assert r.code == 0, r.stderr
    v = run_cli("--home", h.a, "--json", "audit", "verify")
    assert v.code == 0, v.stdout
    (nr,) = v.json["logs"]["evidence"]["nodes"].values()
    assert nr["entries"] == 8
    assert nr["checkpoints"] == 4  # the export checkpointed row 8 first
    assert nr["unprotected"] == 0
    # Tampered at the authority: an edited held entry, then a rechained one.
    with db(h.a / evidence.EVIDENCE_FILE) as conn:
        conn.execute("UPDATE entries SET detail = 'x' WHERE seq = 2")
    assert broken(h.a, "row-altered")["error"]["seq"] == 2


def segments_of(data: bytes) -> list[bytes]:
    from qhx_edge.packs import pack

    return pack.parse(data).documents[1:]


def repack(n: node.Node, segments: list[bytes]) -> bytes:
    return n.export_pack([n.card(), *segments], clock.now(), kind="evidence")


def resign(n: node.Node, seg: bytes, change: Any) -> bytes:
    body = cbor.decode(cose.Envelope.parse(seg, max_size=evidence.MAX_SEGMENT_SIZE).payload, max_size=1 << 24)
    change(body)
    return cose.sign(cbor.encode(body), [n.identity.signer], content_type=evidence.CONTENT_TYPE)


def test_forged_checkpoint_in_evidence_is_refused(h: Homes) -> None:
    with node.Node(h.node_home, PASSPHRASE.encode) as n:
        ex = evidence.export_evidence(n, clock.now(), segment_entries=100)
        (seg,) = segments_of(ex.data)
        node_id, domain = n.node_id, n.domain
        key = parse_card(n.card()).signing_key
        other = PrivateKey.generate("hybrid")
        forged = checkpoint.make(
            other,
            log="node",
            node_id=node_id,
            domain=domain,
            n=9,
            seq=8,
            count=8,
            head=b"\x01" * 32,
            prev=b"\x00" * 32,
            at=1,
        )
        bad = resign(n, seg, lambda b: b["checkpoints"].append(forged))
        data = repack(n, [bad])
    with pytest.raises(BadSignature, match="checkpoint"):
        evidence.parse_segment(bad, key)
    r = run_cli("--home", h.a, "--json", "pack", "import", _write(h, data))
    assert r.code == 1
    assert r.json["error"]["kind"] == "bad-signature"


def _write(h: Homes, data: bytes) -> Path:
    p = h.tmp / f"ev-{hashlib.sha256(data).hexdigest()[:8]}.cbor"
    p.write_bytes(data)
    return p


def test_chain_recomputed_on_the_node_is_refused_by_the_authority(h: Homes) -> None:
    """The node's log rewritten (without the key) before export: the node signs the segment at
    export, but the checkpoints it carries were signed before and name other heads."""
    with db(node_db(h)) as conn:
        conn.execute("UPDATE audit SET detail = 'nothing happened' WHERE seq = 3")
        rechain(conn)
    ev = h.tmp / "ev.cbor"
    assert export_evidence(h, ev).code == 0
    r = run_cli("--home", h.a, "--json", "pack", "import", ev)
    assert r.code == 1
    assert r.json["error"]["kind"] == "audit-broken"


def test_authority_rejections_log_is_checkpointed_with_its_key(h: Homes) -> None:
    junk = h.tmp / "junk.cbor"
    junk.write_bytes(b"not a pack")
    for _ in range(2):
        assert run_cli("--home", h.a, "pack", "import", junk).code == 1
    v = run_cli("--home", h.a, "--json", "audit", "verify")
    assert v.code == 0, v.stdout
    own = v.json["logs"]["evidence"]
    assert own["entries"] == 2
    assert own["checkpoints"] == 2
    assert own["unprotected"] == 0
    with db(h.a / evidence.EVIDENCE_FILE) as conn:
        conn.execute("UPDATE rejections SET message = 'fine' WHERE id = 1")
    broken(h.a, "row-altered")


def test_evidence_store_upgrades_from_v1(tmp_path: Path) -> None:
    home = tmp_path / "A"
    home.mkdir()
    path = home / evidence.EVIDENCE_FILE
    with db(path) as conn:
        for statement in evidence.MIGRATIONS[0].split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO rejections (at, kind, message) VALUES (1, 'malformed', 'old')")
        conn.execute("PRAGMA user_version = 1")
    store = evidence.EvidenceStore.open(home)
    assert store is not None
    try:
        assert store.log.base == 1  # the old rejection predates the chain
        store.log_rejections(2, [(None, None, None, BadSignature("new"))])
        signer = PrivateKey.generate("classical")
        report = audit_log.verify(store.conn, store.log, signer.public, "authority", "x.example", None)
        assert report["entries"] == 1
        assert report["first_seq"] == 2
    finally:
        store.close()


def test_the_issuer_checkpoints_with_the_key_it_unlocked(tmp_path: Path) -> None:
    """A serving node whose passphrase was given interactively (nothing in the environment) still
    checkpoints its issuance rows: the issuer hands its unlocked identity to its audit store."""
    from qhx_edge.issue.issuer import Issuer
    from tests.test_issuance import UID, attested

    homes = make_homes(tmp_path)
    clk = attested(homes, clock.now())
    with db(node_db(homes)) as conn:
        before = conn.execute("SELECT COUNT(*) FROM audit_checkpoints").fetchone()[0]
    with Issuer(homes.node_home, PASSPHRASE.encode, now=clk) as iss:
        assert iss.x509_svids(UID)
    with db(node_db(homes)) as conn:
        last_cp = conn.execute("SELECT MAX(seq) FROM audit_checkpoints").fetchone()[0]
        last_row = conn.execute("SELECT MAX(seq) FROM audit").fetchone()[0]
        after = conn.execute("SELECT COUNT(*) FROM audit_checkpoints").fetchone()[0]
    assert after > before
    assert last_cp == last_row  # the issuance row is covered (the first hot commit is always due)
