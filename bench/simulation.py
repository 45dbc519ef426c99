"""The partition simulation at scale: wall time and simulated events per second, and how the cost grows
(docs/simulation.md; issue 12).

Run ``python bench/simulation.py`` (``--quick`` for CI) from the repository root.  It prints one JSON
object.  Each size is ``scenarios/stress-10000.toml`` with its cluster cut to that many nodes: a domain
whose authority node is the root of a tree of field nodes (eight children each), every tree link up
one hour in six with the windows staggered by depth, a freshness epoch every two hours and one
revocation, for twelve simulated hours.  Per size: wall seconds of ``sim.engine.run`` (the real sync
protocol, trust core and signatures, verified once per distinct check), simulated events per second,
contacts, and signature checks made and remembered.  ``growth_exponent``: the slope of log(wall time)
against log(nodes x contacts) between the smallest and the largest size; target <= 1.15 (work that
grows with what is simulated, not with its square).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import figure, main

FULL = (100, 1_000, 10_000)
QUICK = (100, 1_000)


STRESS = Path(__file__).resolve().parent.parent / "scenarios" / "stress-10000.toml"


def scenario_of(nodes: int) -> Any:
    """``scenarios/stress-10000.toml`` with its cluster cut to ``nodes`` nodes in all."""
    from qhx_edge.sim import scenario

    text = STRESS.read_text()
    assert "count = 9999" in text
    assert 'node = "n9998"' in text
    text = text.replace("count = 9999", f"count = {nodes - 1}").replace('node = "n9998"', f'node = "n{nodes - 2}"')
    return scenario.load(text, f"stress-{nodes}")


def run(quick: bool, tmp: Path) -> dict[str, Any]:
    from qhx_edge.sim import engine

    t0 = time.perf_counter()
    sizes: dict[str, Any] = {}
    points = []
    for n in QUICK if quick else FULL:
        sc = scenario_of(n)
        start = time.perf_counter()
        e = engine.Engine(sc).run()
        wall = time.perf_counter() - start
        r = e.report()
        sizes[str(n)] = {
            "wall_s": round(wall, 3),
            "events": e.events_run,
            "events_per_s": round(e.events_run / wall, 1),
            "contacts": len(e.plan),
            "sync_contacts": e.contacts_run,
            "signatures_verified": e.checker.verified,
            "signatures_remembered": e.checker.remembered,
            "delivery_ratio_reachable": r["delivery_ratio_reachable"],
            "over_bound": r["over_bound"],
            "invariants_held": r["invariants"]["held"],
        }
        points.append((n * len(e.plan), wall))
    (x0, y0), (x1, y1) = points[0], points[-1]
    slope = math.log(y1 / y0) / math.log(x1 / x0)
    n0, n1 = (QUICK if quick else FULL)[0], (QUICK if quick else FULL)[-1]
    return {
        "mode": "quick" if quick else "full",
        "sizes": sizes,
        "growth_exponent": figure(slope, 1.15, higher_is_better=False, between=[points[0][0], points[-1][0]]),
        # The same growth in nodes alone (contacts grow with nodes here, so nodes x contacts grows as n^2).
        "growth_exponent_in_nodes": round(math.log(y1 / y0) / math.log(n1 / n0), 4),
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }


if __name__ == "__main__":
    sys.exit(main(run, __doc__))
