"""One writer at the authority: concurrent commands never sign two documents with one version.

Before the authority home had a lock, two ``authority publish bundle`` at once
both read version N from ``authority.json`` and both signed a bundle N+1: two
different documents with one version, signed by our own authority
(equivocation), the second file silently replacing the first.  Here real CLI
processes publish in parallel, several rounds, and the result must be what the
same publishes one after the other give: every version once, contiguous, each
reported digest the digest of the file published under that version.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qhx_edge.core import documents as D  # noqa: N812 - the package's own alias
from tests.conftest import _cli_env, make_homes

pytestmark = pytest.mark.slow

WRITERS = 4
ROUNDS = 3


def _publish_all_at_once(home: Path, what: list[str]) -> list[dict[str, object]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "qhx_edge", "--json", "--home", str(home), "authority", "publish", *what],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_cli_env(),
        )
        for _ in range(WRITERS)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stdout + stderr
        out.append(json.loads(stdout))
    return out


def test_parallel_publishes_give_what_the_same_publishes_in_sequence_give(tmp_path: Path) -> None:
    homes = make_homes(tmp_path, import_first=False)
    home = homes.authority.home
    reported: dict[tuple[str, int], str] = {}
    for _ in range(ROUNDS):
        for result in _publish_all_at_once(home, ["bundle"]):
            for doc in result["published"]:  # type: ignore[attr-defined]
                key = (doc["type"], doc["version"])
                assert key not in reported, f"{key} signed twice: equivocation"
                reported[key] = doc["digest"]
    publishes = WRITERS * ROUNDS
    for type_ in ("bundle", "freshness"):
        versions = sorted(v for t, v in reported if t == type_)
        assert versions == list(range(2, 2 + publishes)), (type_, versions)  # v1 came with init
        for v in versions:
            held = (home / "published" / type_ / f"{v}.cbor").read_bytes()
            assert D.parse(held).digest.hex() == reported[(type_, v)]  # a document's digest: its signed content
    state = json.loads((home / "authority.json").read_text())
    assert state["versions"]["bundle"] == 1 + publishes
