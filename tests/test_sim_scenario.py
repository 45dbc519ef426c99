"""Scenario files and the earliest-arrival bound (qhx_edge/sim/scenario.py, qhx_edge/sim/contacts.py;
issue 12): a scenario parses to exactly what it says, a bad one is refused naming its line and key, and
the bound is the earliest time over any time-respecting path of contacts, checked by hand and against
an exhaustive search of small random plans."""

from __future__ import annotations

import math
import random

import pytest

from qhx_edge.core.errors import Malformed
from qhx_edge.sim import contacts, scenario

GOOD = """
[scenario]
name = "tiny"
duration = "24h"
seed = 3

[[domain]]
name = "alpha.example"
authority = "hq"
freshness_every = "1h"
staleness = { soft = "6h", hard = "72h" }
outages = [["10h", "12h"]]

[[node]]
name = "hq"
domain = "alpha.example"

[[node]]
name = "a1"
domain = "alpha.example"
clock_skew = "-90s"

[[link]]
between = ["hq", "a1"]
bandwidth = "9600bit/s"
latency = "200ms"
windows = [["6h", "8h"], ["0h", "2h"]]

[[courier]]
name = "jeep"
stops = [["hq", "3h"], ["a1", "5h"]]

[[event]]
at = "30m"
kind = "revoke-node"
domain = "alpha.example"
node = "a1"
"""


def test_a_scenario_parses_to_what_it_says() -> None:
    s = scenario.load(GOOD, "tiny.toml")
    assert (s.name, s.duration, s.seed, s.sample) == ("tiny", 86_400_000, 3, 300_000)
    (d,) = s.domains
    assert (d.authority, d.freshness_every, d.soft, d.hard, d.outages) == (
        "hq", 3_600_000, 6 * 3_600_000, 72 * 3_600_000, ((36_000_000, 43_200_000),))  # fmt: skip
    assert s.node("a1").clock_skew == -90_000
    (link,) = s.links
    assert (link.bandwidth, link.latency, link.windows) == (1200.0, 200, ((0, 7_200_000), (21_600_000, 28_800_000)))
    assert link.detect == "carrier"  # the default: the nodes see the link come up
    assert s.couriers[0].stops == (("hq", 10_800_000), ("a1", 18_000_000))
    assert s.events[0].node == "a1"


@pytest.mark.parametrize(
    ("change", "line", "what"),
    [
        (('bandwidth = "9600bit/s"', 'bandwidth = "fast"'), 25, "link[0].bandwidth"),
        (('between = ["hq", "a1"]', 'between = ["hq", "b9"]'), 24, "link[0].between"),
        (('domain = "alpha.example"\nclock_skew', 'domain = "beta.example"\nclock_skew'), 20, "node[1].domain"),
        (('windows = [["6h", "8h"], ["0h", "2h"]]', 'windows = [["6h", "8h"], ["7h", "9h"]]'), 27, "link[0].windows"),
        (('stops = [["hq", "3h"], ["a1", "5h"]]', 'stops = [["hq", "3h"], ["a1", "2h"]]'), 31, "courier[0].stops"),
        (('kind = "revoke-node"', 'kind = "explode"'), 35, "event[0].kind"),
        (('clock_skew = "-90s"', 'clock_skew = "-90s"\ncolour = "red"'), 22, "node[1].colour"),
        (('bandwidth = "9600bit/s"', 'bandwidth = "9600bit/s"\ndetect = "psychic"'), 26, "link[0].detect"),
        (('clock_skew = "-90s"', 'clock_skew = "-90s"\nrequests_per_hour = -1'), 22, "node[1].requests_per_hour"),
    ],
)
def test_a_bad_scenario_names_the_line_and_the_key(change: tuple[str, str], line: int, what: str) -> None:
    text = GOOD.replace(*change)
    assert text != GOOD
    with pytest.raises(Malformed) as exc:
        scenario.load(text, "tiny.toml")
    assert exc.value.message.startswith(f"tiny.toml:{line}: {what}:"), exc.value.message


def test_a_syntax_error_names_the_line() -> None:
    with pytest.raises(Malformed) as exc:
        scenario.load(GOOD.replace("seed = 3", "seed = = 3"), "tiny.toml")
    assert "line 5" in exc.value.message


def test_times_and_rates() -> None:
    assert [scenario.time_ms(v) for v in ("200ms", "1.5s", "2m", "3h", "1d", 7, "-90s")] == [
        200, 1500, 120_000, 10_800_000, 86_400_000, 7000, -90_000]  # fmt: skip
    assert [scenario.rate(v) for v in ("9600bit/s", "1Mbit/s", "250kB/s")] == [1200.0, 125_000.0, 250_000.0]
    for bad in ("fast", "1 year", "", "5x"):
        with pytest.raises(ValueError):
            scenario.time_ms(bad)


def test_the_bound_by_hand() -> None:
    c = contacts.Contact
    plan = [
        c(0, 10_000, "a", "b", 1000.0, 100),  # 1 kB/s, 100 ms
        c(20_000, 30_000, "b", "c", 1000.0, 0),
        c(5_000, 5_000, "a", "c", contacts.INFINITE, 60_000, "courier"),  # picks up at 5 s, there at 65 s
    ]
    got = contacts.earliest_arrival(plan, "a", 1_000, 2_000)  # 2 kB: 2 s on each link
    assert got == {"a": 1_000, "b": 3_100, "c": 22_000}
    late = contacts.earliest_arrival(plan, "a", 9_000, 2_000)  # too late for a->b (ends at 10 s)
    assert late == {"a": 9_000}
    courier = contacts.earliest_arrival(plan[2:], "a", 1_000, 10**9)  # a courier carries any size
    assert courier["c"] == 65_000


def test_markov_links_are_seeded() -> None:
    s = scenario.load(GOOD.replace('windows = [["6h", "8h"], ["0h", "2h"]]', 'markov = { up = "20m", down = "40m" }'))
    one, two = contacts.plan(s), contacts.plan(s)
    assert one == two
    up = sum(x.end - x.start for x in one if x.kind == "link" and x.a == "hq")
    assert 0.15 < up / s.duration < 0.55  # about a third of the time, for these means
    other = contacts.plan(scenario.load(GOOD.replace("seed = 3", "seed = 4").replace(
        'windows = [["6h", "8h"], ["0h", "2h"]]', 'markov = { up = "20m", down = "40m" }')))  # fmt: skip
    assert other != one


def _brute(plan: list[contacts.Contact], source: str, t0: int, size: int) -> dict[str, float]:
    """Every time-respecting path, tried by repeated relaxation (Bellman-Ford style) until nothing improves."""
    best: dict[str, float] = {source: t0}
    changed = True
    while changed:
        changed = False
        for c in plan:
            t = best.get(c.a, math.inf)
            if t == math.inf:
                continue
            if c.kind == "courier":
                arrive: float = c.start + c.latency if t <= c.start else math.inf
            else:
                done = max(t, c.start) + c.transmission(size)
                arrive = done + c.latency if done <= c.end else math.inf
            if arrive < best.get(c.b, math.inf):
                best[c.b], changed = arrive, True
    return best


def test_the_bound_matches_an_exhaustive_search_on_random_plans() -> None:
    rng = random.Random(11)
    nodes = ["n0", "n1", "n2", "n3", "n4"]
    for _ in range(300):
        plan = []
        for _ in range(rng.randrange(1, 14)):
            a, b = rng.sample(nodes, 2)
            start = rng.randrange(0, 100_000)
            if rng.random() < 0.2:
                plan.append(
                    contacts.Contact(start, start, a, b, contacts.INFINITE, rng.randrange(0, 50_000), "courier")
                )
            else:
                plan.append(contacts.Contact(start, start + rng.randrange(1, 40_000), a, b,
                                             rng.choice([100.0, 1000.0, 1e6]), rng.randrange(0, 2_000)))  # fmt: skip
        size, t0 = rng.choice([10, 1_000, 20_000]), rng.randrange(0, 50_000)
        assert contacts.earliest_arrival(plan, "n0", t0, size) == _brute(plan, "n0", t0, size), plan


def test_a_cluster_is_a_tree_with_staggered_windows() -> None:
    text = (
        GOOD.split("[[link]]", maxsplit=1)[0]
        + """
[[cluster]]
prefix = "c"
count = 11
domain = "alpha.example"
root = "hq"
fanout = 3
bandwidth = "1Mbit/s"
latency = "10ms"
windows = [["0h", "1h"]]
stagger = "10m"
"""
    )
    s = scenario.load(text)
    parents = {link.b: (link.a, link.windows[0][0]) for link in s.links}
    assert parents["c0"] == ("hq", 0)
    assert parents["c2"] == ("hq", 0)
    assert parents["c3"] == ("c0", 600_000)  # c3, c4, c5 under c0, one level down
    assert parents["c5"] == ("c0", 600_000)
    assert parents["c6"] == ("c1", 600_000)
    assert parents["c10"] == ("c2", 600_000)
    with pytest.raises(Malformed) as exc:
        scenario.load(text.replace('root = "hq"', 'root = "nowhere"'), "c.toml")
    assert "cluster[0].root" in exc.value.message


def test_review_findings_in_scenario_files_are_refused() -> None:
    """Values that made a run wrong or endless are refused, each naming its key (review of issue 12)."""
    cluster = (
        GOOD.split("[[link]]", maxsplit=1)[0]
        + """
[[cluster]]
prefix = "c"
count = 3
domain = "alpha.example"
root = "hq"
bandwidth = "1Mbit/s"
latency = "10ms"
windows = [["0h", "1h"]]
"""
    )
    bad = {
        "cluster[0].latency": cluster.replace('latency = "10ms"', 'latency = "-10ms"'),
        "cluster[0].stagger": cluster + 'stagger = "-5m"\n',
        "event[0].at": GOOD.replace('at = "30m"', 'at = "-5h"'),
        "domain[0].staleness": GOOD.replace('staleness = { soft = "6h", hard = "72h" }', 'staleness = "6h"'),
        "scenario.sample": GOOD.replace("seed = 3", 'seed = 3\nsample = "1ms"'),
        "domain[0].freshness_every": GOOD.replace('freshness_every = "1h"', 'freshness_every = "1s"'),
        "link[0].markov": GOOD.replace('windows = [["6h", "8h"], ["0h", "2h"]]',
                                       'markov = { up = "1ms", down = "1ms" }'),
    }  # fmt: skip
    for key, text in bad.items():
        with pytest.raises(Malformed) as exc:
            scenario.load(text, "bad.toml")
        assert f": {key}:" in exc.value.message, (key, exc.value.message)


def test_a_fault_after_a_multi_line_array_names_its_own_line() -> None:
    text = GOOD.replace('windows = [["6h", "8h"], ["0h", "2h"]]', 'windows = [\n  ["6h", "8h"],\n  ["0h", "2h"],\n]')
    text = text.replace('latency = "200ms"\n', "").replace("[[courier]]", 'latency = "soon"\n\n[[courier]]')
    with pytest.raises(Malformed) as exc:
        scenario.load(text, "multi.toml")
    line = next(i for i, s in enumerate(text.splitlines(), 1) if s.startswith("latency ="))
    assert exc.value.message.startswith(f"multi.toml:{line}: link[0].latency:"), exc.value.message
