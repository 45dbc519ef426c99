"""Live mode (qhx_edge/homes/scenario_live.py, issue 12): a small scenario played for real, with
``qhx-edge serve`` in network namespaces the run creates and removes (as root), links cut on schedule,
and compared with the simulation of the same file; what it cannot play is refused before anything
starts; a live run that differs from its simulation fails (``live-mismatch``)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qhx_edge.core.errors import Malformed
from qhx_edge.homes import scenario_live
from qhx_edge.sim import engine, scenario
from tests.conftest import need, run_cli

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
LIVE = SCENARIOS / "live-relay.toml"


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("qhxl")]


def test_a_live_run_matches_its_simulation(tmp_path: Path) -> None:
    """Three minutes of real time: five serve processes, three links cut and restored on schedule, a node
    revoked while headquarters is cut off and a policy published with every link up.  The same documents
    reach the same nodes as in the simulation, each within 4 s (plus 10 %) of the simulated moment."""
    need(os.geteuid() == 0 and shutil.which("ip") is not None, "network namespaces need root and iproute2")
    before = _namespaces()
    r = run_cli("--json", "scenario", "run", LIVE, "--out", tmp_path / "out", "--live", timeout=600)
    assert r.code == 0, (r.stdout[-2000:], r.stderr[-2000:])
    live = r.json["live"]
    assert live["matches"] is True
    report = json.loads((tmp_path / "out" / "live.json").read_text())
    assert report["differences"] == []
    revocation = [d for d in report["deliveries"] if d["kind"] == "revocation"]
    assert {d["node"] for d in revocation} == {"r1", "r2", "r3", "spare"}
    got = {d["node"]: d["live_ms"] for d in revocation}
    assert got["spare"] is None  # never on the air: neither side delivers to it
    # Published at 55 s with headquarters cut off until 90 s: nothing arrives before the link is back.
    assert all(got[n] is not None and got[n] >= 30_000 for n in ("r1", "r2", "r3")), got
    assert report["delivered_both"] >= 10
    assert _namespaces() == before  # every namespace the run made is gone


def test_what_cannot_be_played_live_is_refused_first(tmp_path: Path) -> None:
    text = LIVE.read_text()
    courier = text + '\n[[courier]]\nname = "c"\nstops = [["hq", "10s"], ["r3", "20s"]]\n'
    with pytest.raises(Malformed, match="couriers"):
        scenario_live.check(scenario.load(courier, "courier.toml"))
    many = text + "".join(f'\n[[node]]\nname = "x{i}"\ndomain = "alpha.example"\n' for i in range(2))
    with pytest.raises(Malformed, match="7 nodes"):
        scenario_live.check(scenario.load(many, "many.toml"))
    long = text.replace('duration = "3m"', 'duration = "2h"').replace('"3m"]', '"2h"]')
    with pytest.raises(Malformed, match="duration"):
        scenario_live.check(scenario.load(long, "long.toml"))
    path = tmp_path / "courier.toml"
    path.write_text(courier)
    r = run_cli("--json", "scenario", "run", path, "--out", tmp_path / "out", "--live")
    assert r.code != 0
    assert r.json["error"]["kind"] == "malformed"
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_a_live_run_that_differs_from_its_simulation_is_said_to() -> None:
    """The comparison itself: the simulation's own deliveries match; one lost, or one late, does not."""
    sc = scenario.load(LIVE.read_text(), "live-relay.toml")
    sim = engine.Engine(sc).run()
    same = [
        scenario_live._Published(p.kind, p.at, dict(p.versions), {n: t - p.at for n, t in p.arrivals.items()})
        for p in sim.publications
    ]
    assert scenario_live.compare(sc, sim, same)["matches"]
    lost = copy.deepcopy(same)
    first = next(p for p in lost if "r1" in p.arrivals)
    first.arrivals.pop("r1")
    r = scenario_live.compare(sc, sim, lost)
    assert not r["matches"]
    assert "in the simulation only" in r["differences"][0]
    late = copy.deepcopy(same)
    first = next(p for p in late if "r1" in p.arrivals)
    first.arrivals["r1"] += 60_000
    assert "live" in scenario_live.compare(sc, sim, late)["differences"][0]
