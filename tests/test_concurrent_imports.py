"""One writer at the node: concurrent imports give what the same imports in sequence give.

Real ``qhx-edge pack import`` processes run at once against one node store,
round after round.  Before the import verified against the state read inside
its own write transaction's generation, two imports raced: both verified
against the same old state and both applied, so the older pack's marks could
land after the newer one's (a high-water mark fell), and the same pack twice
was applied twice.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from qhx_edge.store import clock
from tests.conftest import _cli_env, make_homes

pytestmark = pytest.mark.slow

ROUNDS = 6


def _marks(home: Path) -> dict[str, int]:
    conn = sqlite3.connect(home / "node.sqlite")
    try:
        return dict(conn.execute("SELECT type, version FROM high_water"))
    finally:
        conn.close()


def _digest(home: Path) -> str:
    """What the node believes: every held document by (domain, type, version, digest) and every mark.

    Not the store's trust digest, which also covers when each document was accepted (the rounds
    run at different times)."""
    conn = sqlite3.connect(home / "node.sqlite")
    try:
        held = sorted(conn.execute("SELECT domain, type, version, hex(digest) FROM documents"))
        marks = sorted(conn.execute("SELECT domain, type, version, hex(digest) FROM high_water"))
    finally:
        conn.close()
    return hashlib.sha256(repr((held, marks)).encode()).hexdigest()


def _import_at_once(home: Path, packs: list[Path]) -> list[tuple[int, dict[str, object]]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "qhx_edge", "--json", "--home", str(home), "pack", "import", str(p)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_cli_env(),
        )
        for p in packs
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert "Traceback" not in stderr, stderr
        assert p.returncode in (0, 1), stdout + stderr
        out.append((p.returncode, json.loads(stdout)))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """A pristine node home, an older pack (bundles to v150) and a newer one (to v300)."""
    tmp = tmp_path_factory.mktemp("concurrent")
    homes = make_homes(tmp)
    auth, now = homes.authority, clock.now()
    packs = []
    for upto in (150, 300):
        while int(auth.state["versions"]["bundle"]) < upto:
            auth.publish_bundle(now)
        bundles = [auth.published("bundle", v) for v in range(2, upto + 1)]
        path = tmp / f"to-{upto}.pack"
        path.write_bytes(auth.export_pack([*auth.export_documents()[:-3], *bundles, auth.current("policy"),
                                           auth.current("freshness")], now))  # fmt: skip
        packs.append(path)
    return homes.node_home, packs[0], packs[1], tmp


def test_an_older_and_a_newer_pack_at_once_end_as_in_sequence(world: tuple[Path, Path, Path, Path]) -> None:
    pristine, older, newer, tmp = world
    expected: dict[str, tuple[dict[str, int], str]] = {}  # one sequential result per order
    for name, order in (("older first", [older, newer]), ("newer first", [newer, older])):
        home = tmp / f"sequential-{len(expected)}"
        shutil.copytree(pristine, home)
        for p in order:
            _import_at_once(home, [p])
        expected[name] = (_marks(home), _digest(home))
    assert {m["bundle"] for m, _ in expected.values()} == {300}
    for i in range(ROUNDS):
        home = tmp / f"round-{i}"
        shutil.copytree(pristine, home)
        results = _import_at_once(home, [older, newer] if i % 2 else [newer, older])
        marks = _marks(home)
        assert marks["bundle"] == 300, f"round {i}: a high-water mark fell: {marks}"
        assert (marks, _digest(home)) in expected.values(), f"round {i}: not the result of either order"
        assert any(code == 0 for code, _ in results)


def test_the_same_pack_twice_at_once_is_applied_once(world: tuple[Path, Path, Path, Path]) -> None:
    pristine, _, newer, tmp = world
    for i in range(ROUNDS):
        home = tmp / f"twice-{i}"
        shutil.copytree(pristine, home)
        results = _import_at_once(home, [newer, newer])
        assert [code for code, _ in results] == [0, 0], results
        applied = [r for _, r in results if any(d["report"] == "applied" for d in r["documents"])]
        assert len(applied) == 1, f"round {i}: applied {len(applied)} times"
        again = [r for _, r in results if r not in applied]
        assert again[0]["pack_status"] == "already-imported", again[0]
        assert _marks(home)["bundle"] == 300
