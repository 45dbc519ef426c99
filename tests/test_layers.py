"""The layers of docs/architecture.md hold: import-linter's contracts, and what they cannot see.

import-linter checks imports (``.ci/test`` runs ``lint-imports``); this test runs
the same contracts, so ``pytest`` alone also fails on a broken layer, and adds
what an import graph does not show: the pure layer never calls ``open()`` or a
clock through a module it may import (``datetime.now``, ``date.today``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

CORE = ROOT / "qhx_edge" / "core"
# Calls that do I/O or read the clock without an import the contracts would catch.
FORBIDDEN_CALLS = re.compile(r"\bopen\(|\.now\(|\.utcnow\(|\.today\(|\bperf_counter\(|\bmonotonic\(")


def test_import_linter_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_the_pure_layer_calls_no_open_and_reads_no_clock() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted(CORE.rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if FORBIDDEN_CALLS.search(line.split("#", 1)[0]) and not line.lstrip().startswith(('"', "'"))
    ]
    assert found == []


def test_the_scan_would_see_a_clock_read() -> None:
    # The pattern is not vacuous: it matches the calls it exists to find.
    for call in ("open(path)", "dt.datetime.now(dt.UTC)", "time.monotonic()", "date.today()"):
        assert FORBIDDEN_CALLS.search(call), call
