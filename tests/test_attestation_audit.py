"""The authority's attestation attempts: an audit log that needs the authority's key to rewrite (issue 8, point 8).

The attempts of ``attestation.sqlite`` are hash-chained and checkpointed with the authority's own
signing key (its card's) in the transaction of each attempt, and ``qhx-edge audit verify`` on an
authority home checks them.  The attestations run through the real CLI (join tokens); each tamper
is done on the real file with sqlite3, as someone with the files but not the passphrase would.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qhx_edge.core import checkpoint
from qhx_edge.core.suites import PrivateKey
from qhx_edge.homes import attestation
from qhx_edge.store import audit as audit_log
from tests.conftest import Result, make_homes, run_cli

COLUMNS = "at, node_id, step, outcome, detail"


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


def ok(*args: str | Path) -> dict[str, Any]:
    r = run_cli(args[0], args[1], "--json", *args[2:])  # --home HOME --json COMMAND...
    assert r.code == 0, (r.stdout, r.stderr)
    out: dict[str, Any] = r.json
    return out


def refused(*args: str | Path) -> None:
    r = run_cli(args[0], args[1], "--json", *args[2:])
    assert (r.code, r.json["error"]["kind"]) == (1, "attestation-failed"), (r.stdout, r.stderr)


@dataclass(frozen=True)
class Pair:
    """An authority home and a node home anchored to it."""

    a: Path
    n: Path
    work: Path

    @property
    def store(self) -> Path:
        return self.a / attestation.DB


def attest(p: Pair, name: str) -> tuple[Path, Path]:
    """One join-token attestation through the CLI (attempts: challenge ok, finish ok); its request and evidence."""
    token = str(ok("--home", p.a, "authority", "join-token", "create", "--ttl", "10m")["token"])
    card = p.work / "a.card"
    if not card.exists():
        ok("--home", p.a, "node", "card", "--to", card)
    req, chal, ev = (p.work / f"{name}-{what}.pack" for what in ("req", "chal", "ev"))
    _request(p, token, card, req)
    ok("--home", p.a, "authority", "attest", "challenge", req, "--to", chal)
    ok("--home", p.n, "node", "attest", "respond", chal, "--to", ev)
    ok("--home", p.a, "authority", "attest", "finish", ev, "--to", p.work / f"{name}-deleg.pack")
    return req, ev


def _request(p: Pair, token: str, card: Path, to: Path) -> None:
    ok(
        "--home", p.n, "node", "attest", "request", "--method", "join-token", "--token", token,
        "--authority-card", card, "--to", to,
    )  # fmt: skip


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """Attempts 1-4, each checkpointed (checkpoints 1-4): challenge ok, finish ok, then the spent
    token's request refused at the challenge, and the same evidence replayed refused at the finish."""
    tmp = tmp_path_factory.mktemp("attest")
    homes = make_homes(tmp)
    p = Pair(homes.a, homes.node_home, tmp)
    token = str(ok("--home", p.a, "authority", "join-token", "create", "--ttl", "10m")["token"])
    card = tmp / "a.card"
    ok("--home", p.a, "node", "card", "--to", card)
    _request(p, token, card, tmp / "req.pack")
    ok("--home", p.a, "authority", "attest", "challenge", tmp / "req.pack", "--to", tmp / "chal.pack")
    ok("--home", p.n, "node", "attest", "respond", tmp / "chal.pack", "--to", tmp / "ev.pack")
    ok("--home", p.a, "authority", "attest", "finish", tmp / "ev.pack", "--to", tmp / "deleg.pack")
    _request(p, token, card, tmp / "req2.pack")
    refused("--home", p.a, "authority", "attest", "challenge", tmp / "req2.pack", "--to", tmp / "chal2.pack")
    refused("--home", p.a, "authority", "attest", "finish", tmp / "ev.pack", "--to", tmp / "deleg2.pack")
    return p


@pytest.fixture
def p(template: Pair, tmp_path: Path) -> Pair:
    """A copy of the template's homes, for one test to tamper with."""
    shutil.copytree(template.a, tmp_path / "A", symlinks=True)
    shutil.copytree(template.n, tmp_path / "N", symlinks=True)
    return Pair(tmp_path / "A", tmp_path / "N", template.work)


def verify(home: Path, *args: str) -> Result:
    return run_cli("--home", home, "--json", "audit", "verify", *args)


def broken(home: Path, reason: str, *args: str) -> dict[str, Any]:
    r = verify(home, *args)
    assert r.code == 1, (r.stdout, r.stderr)
    out: dict[str, Any] = r.json
    assert out["ok"] is False
    assert out["error"]["kind"] == "audit-broken"
    assert out["error"]["reason"] == reason, out["error"]
    assert out["audit"]["log"] == "attestation", out["audit"]
    return out


def rows(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(f"SELECT seq, {COLUMNS} FROM attempts ORDER BY seq").fetchall()


def rechain(conn: sqlite3.Connection) -> None:
    """What an attacker without the key can do: recompute every hash of the chain, end to end."""
    prev = checkpoint.ZERO
    for row in rows(conn):
        h = checkpoint.row_hash(prev, list(row))
        conn.execute("UPDATE attempts SET prev = ?, hash = ? WHERE seq = ?", (prev, h, row[0]))
        prev = h


# --- a clean log ----------------------------------------------------------------------------


def test_every_attempt_is_chained_and_checkpointed_with_the_authoritys_key(p: Pair) -> None:
    r = verify(p.a, "--max-unprotected", "0")
    assert r.code == 0, (r.stdout, r.stderr)
    log = r.json["logs"]["attestation"]
    assert log["present"] is True
    assert (log["entries"], log["checkpoints"], log["unprotected"]) == (4, 4, 0)
    assert log["last_checkpoint"]["seq"] == 4
    assert log["latest_record"] == "ok"
    assert log["node_id"] == attestation.AUTHORITY_NODE_ID
    with db(p.store) as conn:
        assert [s for (s,) in conn.execute("SELECT seq FROM audit_checkpoints ORDER BY n")] == [1, 2, 3, 4]
        steps = conn.execute("SELECT step, outcome FROM attempts ORDER BY seq").fetchall()
    assert steps == [
        ("challenge", "ok"),
        ("finish", "ok"),
        ("challenge", "attestation-failed"),
        ("finish", "attestation-failed"),
    ]
    text = run_cli("--home", p.a, "audit", "verify")
    assert text.code == 0
    assert "attestation: 4 rows verified, 4 checkpoints" in text.stdout


def test_an_attempt_without_the_key_is_unprotected_until_audit_checkpoint(p: Pair) -> None:
    store = attestation.AttestationStore(p.a)  # no signer here: the row stays beyond the last checkpoint
    try:
        store.attempt(1, "n1", "challenge", "ok", "written without the key")
    finally:
        store.close()
    assert verify(p.a).json["logs"]["attestation"]["unprotected"] == 1
    assert broken(p.a, "unprotected", "--max-unprotected", "0")["error"]["seq"] == 5
    c = run_cli("--home", p.a, "--json", "audit", "checkpoint")
    assert c.code == 0, c.stderr
    assert c.json["logs"]["attestation"]["n"] == 5
    assert c.json["logs"]["attestation"]["seq"] == 5
    assert verify(p.a, "--max-unprotected", "0").json["logs"]["attestation"]["unprotected"] == 0


# --- each tamper ------------------------------------------------------------------------------


def test_edited_attempt(p: Pair) -> None:
    with db(p.store) as conn:
        conn.execute("UPDATE attempts SET outcome = 'ok', detail = 'fine' WHERE seq = 3")
    assert broken(p.a, "row-altered")["error"]["seq"] == 3


def test_removed_attempt(p: Pair) -> None:
    with db(p.store) as conn:
        conn.execute("DELETE FROM attempts WHERE seq = 2")
    assert broken(p.a, "row-missing")["error"]["seq"] == 2


def test_reordered_attempts(p: Pair) -> None:
    with db(p.store) as conn:
        a, b = conn.execute(f"SELECT {COLUMNS}, prev, hash FROM attempts WHERE seq IN (2, 3) ORDER BY seq").fetchall()
        for seq, values in ((2, b), (3, a)):
            conn.execute(f"UPDATE attempts SET ({COLUMNS}, prev, hash) = (?,?,?,?,?,?,?) WHERE seq = ?", (*values, seq))
    assert broken(p.a, "row-altered")["error"]["seq"] == 2


def test_truncated_attempts(p: Pair) -> None:
    with db(p.store) as conn:
        conn.execute("DELETE FROM attempts WHERE seq = 4")  # checkpoint 4 covers it
    assert broken(p.a, "truncated")["error"]["seq"] == 4


def test_chain_recomputed_without_the_key(p: Pair) -> None:
    """A refused attempt made to look like a success, and the chain recomputed: the signed heads differ."""
    with db(p.store) as conn:
        conn.execute("UPDATE attempts SET outcome = 'ok', detail = 'fine' WHERE seq = 3")
        rechain(conn)
    assert broken(p.a, "chain-rewritten")["error"]["seq"] == 3


def test_removed_attempt_renumbered_and_recomputed(p: Pair) -> None:
    with db(p.store) as conn:
        conn.execute("DELETE FROM attempts WHERE seq = 3")
        conn.execute("UPDATE attempts SET seq = seq - 1 WHERE seq > 3")
        rechain(conn)
    broken(p.a, "chain-rewritten")


def test_checkpoints_resigned_with_another_key(p: Pair) -> None:
    mine = PrivateKey.generate("hybrid")
    with db(p.store) as conn:
        conn.execute("UPDATE attempts SET outcome = 'ok', detail = 'fine' WHERE seq = 3")
        rechain(conn)
        conn.execute("DELETE FROM audit_checkpoints")
        prev = checkpoint.ZERO
        for seq in (1, 2, 3, 4):
            head = conn.execute("SELECT hash FROM attempts WHERE seq = ?", (seq,)).fetchone()[0]
            body = checkpoint.make(
                mine, log="attestation", node_id="authority", domain="alpha.example",
                n=seq, seq=seq, count=seq, head=head, prev=prev, at=1,
            )  # fmt: skip
            digest = hashlib.sha256(body).digest()
            conn.execute("INSERT INTO audit_checkpoints VALUES (?,?,?,?,?,?)", (seq, seq, head, 1, digest, body))
            prev = digest
    audit_log.record_path(p.store).write_bytes(body)
    broken(p.a, "checkpoint-forged")


def test_every_checkpoint_removed(p: Pair) -> None:
    with db(p.store) as conn:
        conn.execute("DELETE FROM audit_checkpoints")
    broken(p.a, "checkpoints-removed")


# --- an old store ---------------------------------------------------------------------------


def _old_store(home: Path) -> None:
    """``attestation.sqlite`` as the version before the chain left it: schema v2, two attempts."""
    with db(home / attestation.DB) as conn:
        for migration in attestation.MIGRATIONS[:2]:
            for statement in migration.split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.executemany(
            f"INSERT INTO attempts ({COLUMNS}) VALUES (?,?,?,?,?)",
            [(1, "old", "challenge", "ok", "before"), (2, "old", "finish", "attestation-failed", "before")],
        )
        conn.execute("PRAGMA user_version = 2")


def test_old_attestation_store_migrates_and_its_attempts_stay_outside_the_chain(tmp_path: Path) -> None:
    homes = make_homes(tmp_path)
    p = Pair(homes.a, homes.node_home, tmp_path)
    _old_store(p.a)
    r = verify(p.a)  # opening migrates
    assert r.code == 0, (r.stdout, r.stderr)
    log = r.json["logs"]["attestation"]
    assert (log["entries"], log["checkpoints"], log["unprotected"]) == (0, 0, 0)
    with db(p.store) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(attestation.MIGRATIONS)
        assert conn.execute("SELECT base FROM audit_base").fetchone()[0] == 2
    attest(p, "new")
    log = verify(p.a, "--max-unprotected", "0").json["logs"]["attestation"]
    assert (log["first_seq"], log["last_seq"], log["checkpoints"]) == (3, 4, 2)
    assert log["last_checkpoint"]["count"] == 2  # the rows that predate the chain are not counted
    with db(p.store) as conn:
        assert len(rows(conn)) == 4
        conn.execute("UPDATE attempts SET detail = 'edited' WHERE seq = 4")
    assert broken(p.a, "row-altered")["error"]["seq"] == 4
