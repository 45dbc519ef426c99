"""The partition simulation end to end (qhx_edge/sim, qhx_edge/homes/scenario.py, issue 12): every
shipped scenario runs through ``qhx-edge scenario run``, writes its report and real PNG plots, and holds
every invariant; two runs give the same report bytes; adversaries are refused by the real trust core;
a broken invariant fails the run; propagation is measured against the earliest-arrival bound and the
SPIRE-like baseline beside it."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from qhx_edge.homes import scenario as runner
from qhx_edge.sim import engine, scenario
from tests.conftest import run_cli

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
STRESS = "stress-10000.toml"  # run reduced: test_the_stress_case_reduced
SHIPPED = sorted(p.name for p in SCENARIOS.glob("*.toml") if p.name != STRESS)


def _png_size(path: Path) -> tuple[int, int]:
    """A PNG's width and height from its IHDR chunk (and proof it is one: signature and chunk type)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82"), path
    return width, height


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_scenario_runs_holds_its_invariants_and_plots(name: str, tmp_path: Path) -> None:
    """In process (what ``scenario run`` calls); the command line itself runs in the determinism test."""
    out = tmp_path / "report"
    result = runner.run(SCENARIOS / name, out)
    assert result["figures"]["invariants_held"] is True
    report = json.loads((out / "report.json").read_text())
    assert report["invariants"] == {"held": True, "broken": []}
    assert report["delivery_ratio_reachable"] == 1.0  # everything the contacts allow arrives
    for plot in runner.PLOTS:
        assert _png_size(out / plot) == (800, 450), plot
    assert (out / "summary.md").read_text().startswith(f"# Scenario {report['scenario']}")


def test_the_stress_case_reduced(tmp_path: Path) -> None:
    """The 10,000-node scenario with its cluster cut to 400 nodes (bench/simulation.py runs 10,000)."""
    text = (SCENARIOS / STRESS).read_text()
    assert "count = 9999" in text
    small = tmp_path / "stress-400.toml"
    small.write_text(text.replace("count = 9999", "count = 399").replace('node = "n9998"', 'node = "n398"'))
    result = runner.run(small, tmp_path / "out")
    assert result["figures"]["invariants_held"] is True
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["nodes"] == 400
    assert report["delivery_ratio_reachable"] == 1.0
    assert report["over_bound"]["p99"] <= 1.10
    assert "staleness_h_quantiles" in report["series"]  # too many nodes for a line each
    for plot in runner.PLOTS:
        assert _png_size(tmp_path / "out" / plot) == (800, 450), plot
    full = scenario.load(text, STRESS)
    assert len(full.nodes) == 10_000
    assert len(full.links) == 9_999


def test_two_runs_give_the_same_report_bytes(tmp_path: Path) -> None:
    name = SCENARIOS / "ca-compromise.toml"
    for out in ("one", "two"):
        r = run_cli("--json", "scenario", "run", name, "--out", tmp_path / out, timeout=600)
        assert r.code == 0, r.stderr
    assert (tmp_path / "one" / "report.json").read_bytes() == (tmp_path / "two" / "report.json").read_bytes()


def _run(name: str) -> dict[str, Any]:
    return engine.run(scenario.load((SCENARIOS / name).read_text(), name))


def test_adversaries_are_refused_by_the_trust_core() -> None:
    r = _run("ca-compromise.toml")
    assert r["rejected"]["f1"].get("rollback", 0) >= 1  # the replayed pack
    forged = r["rejected"]["f2"]
    assert sum(forged.get(k, 0) for k in ("bad-signature", "threshold", "wrong-role")) >= 2  # bundle and freshness
    rev = next(iter(r["revocations"].values()))
    arrivals = rev["arrivals_ms"]
    # relay-b held revocations back until hour 24: f2 and the compromised node waited for f1's net or
    # for relay-b to let go; the revocation still reached every node.
    assert all(v is not None for v in arrivals.values())
    assert arrivals["f2"] - rev["published_ms"] > rev["bound_ms"]["f2"] - rev["published_ms"]


@pytest.mark.parametrize("name", ["courier-patrol.toml", "tactical-radio.toml", "flapping-satellite.toml"])
def test_propagation_sits_on_the_bound(name: str) -> None:
    """The issue's figures: at most 1.05 of the bound at the median and 1.10 at p99.  Before live links
    (push on news, import on arrival) the radio's p99 was 3.4 and the satellite's 5.2: the pull
    protocol's three flights, and the import at the end of a contact, on a link up at publication."""
    r = _run(name)
    assert r["over_bound"]["median"] <= 1.05, r["over_bound"]
    assert r["over_bound"]["p99"] <= 1.10, r["over_bound"]
    revocation = next(iter(r["revocations"].values()))
    t0 = revocation["published_ms"]
    for node, got in revocation["arrivals_ms"].items():
        bound = revocation["bound_ms"][node]
        assert got is not None
        assert got >= bound  # never before the best any protocol could do
        assert (got - t0) <= 1.10 * (bound - t0), (node, got - t0, bound - t0)


def test_qhx_edge_outlasts_the_baseline_when_the_server_is_out_of_reach() -> None:
    r = _run("dark-patrol.toml")
    ours, theirs = r["issuance_available"], r["baseline"]["issuance_available"]
    for node in ("lead", "scout", "medic"):
        assert ours[node] > 0.95
        assert theirs[node] < 0.4  # a SPIRE agent needs its server within an SVID lifetime
    assert r["baseline"]["delivery_ratio"] < r["delivery_ratio"]
    # The workloads' requests over 96 hours: the baseline refuses most, qhx-edge almost none.
    lead = r["requests"]["lead"]
    assert lead["made"] == 120 * 96
    assert lead["refused"] < 0.02 * lead["made"] < 0.5 * lead["made"] < lead["refused_baseline"]


def test_a_broken_invariant_fails_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that accepts whatever it is handed (the trust core bypassed) takes the replayed pack and the
    forged documents: the run says so and fails, after writing its report."""
    from qhx_edge.core import documents, trust
    from qhx_edge.sim import state

    def gullible(self: state.NodeState, raw: Any, now: int, checker: Any) -> trust.Outcome:
        docs = [documents.parse(r) for r in raw]
        for doc in docs:
            self._keep(doc)
            self.marks[(doc.payload.domain, doc.type)] = trust.Mark(doc.payload.version, doc.digest)
        return trust.Outcome([trust.Verdict(i, "applied", d) for i, d in enumerate(docs)])

    monkeypatch.setattr(state.NodeState, "import_documents", gullible)
    with pytest.raises(runner.InvariantBroken) as exc:
        runner.run(SCENARIOS / "ca-compromise.toml", tmp_path / "out")
    assert "invariant(s) broken" in exc.value.message
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["invariants"]["held"] is False
    broken = " ".join(report["invariants"]["broken"])
    assert "f1 accepted a rollback" in broken  # the replayed pack
    assert "f2 accepted a forged" in broken


def test_a_file_that_is_not_a_scenario_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    for name, data in (("binary.toml", b"\xff\xfe[scenario]"), ("empty.toml", b""), ("other.toml", b"[x]\ny = 1\n")):
        path = tmp_path / name
        path.write_bytes(data)
        r = run_cli("--json", "scenario", "run", path, "--out", tmp_path / "out")
        assert r.code == 1, (name, r.stdout, r.stderr)
        assert json.loads(r.stdout)["error"]["kind"] == "malformed", name
        assert "Traceback" not in r.stderr


def _tiny(links: str, couriers: str = "", duration: str = "12h", events: str = "") -> scenario.Scenario:
    head = f"""[scenario]
name = "tiny"
duration = "{duration}"
seed = 1
sample = "30m"

[[domain]]
name = "alpha.example"
authority = "hq"
freshness_every = "10m"
"""
    nodes = "".join(f'[[node]]\nname = "{n}"\ndomain = "alpha.example"\n\n' for n in ("hq", "b", "c"))
    return scenario.load(head + nodes + links + couriers + events, "tiny.toml")


REVOKE = '[[event]]\nat = "30m"\nkind = "revoke-node"\ndomain = "alpha.example"\nnode = "c"\n'


def test_a_sync_answer_sends_the_newest_version_only() -> None:
    """After a long cut, a peer gets the newest freshness, not every one in between (sync_session.answer)."""
    sc = _tiny('[[link]]\nbetween = ["hq", "b"]\nbandwidth = "9600bit/s"\nlatency = "100ms"\n'
               'windows = [["0h", "5m"], ["10h", "10h3m"]]\n')  # fmt: skip
    e = engine.Engine(sc).run()
    fresh = [p for p in e.publications if p.kind == "freshness" and p.at < 10 * 3_600_000]
    assert fresh[-1].arrivals.get("b") is not None  # it arrived inside the 3-minute window
    assert e.bytes_moved < 30_000  # a few documents, not sixty


def test_a_courier_chain_carries_what_its_previous_leg_brought() -> None:
    sc = _tiny("", '[[courier]]\nname = "jeep"\nstops = [["hq", "1h"], ["b", "2h"], ["c", "3h"]]\n', events=REVOKE)
    r = engine.run(sc)
    (rev,) = r["revocations"].values()
    assert rev["arrivals_ms"] == rev["bound_ms"] == {"b": 7_200_000, "c": 10_800_000}


def test_a_window_that_closes_keeps_what_crossed_before_it() -> None:
    """At 9600 bit/s a revocation (~3.7 kB) crosses in about 4 s: a 12-second window carries it, even though
    the rest of the contact (a bundle, a freshness) is cut."""
    sc = _tiny('[[link]]\nbetween = ["hq", "b"]\nbandwidth = "9600bit/s"\nlatency = "100ms"\n'
               'windows = [["0h", "1m"], ["10h", "10h12s"]]\n', events=REVOKE)  # fmt: skip
    r = engine.run(sc)
    (rev,) = r["revocations"].values()
    assert rev["arrivals_ms"]["b"] is not None


def test_parallel_links_each_carry() -> None:
    fast = '[[link]]\nbetween = ["hq", "b"]\nbandwidth = "1Mbit/s"\nlatency = "10ms"\nwindows = [["2h", "3h"]]\n'
    slow = fast.replace("1Mbit/s", "9600bit/s").replace("10ms", "900ms")
    alone = engine.run(_tiny(fast, events=REVOKE))
    both = engine.run(_tiny(slow + fast, events=REVOKE))
    (a,) = alone["revocations"].values()
    (b,) = both["revocations"].values()
    assert b["arrivals_ms"]["b"] <= a["arrivals_ms"]["b"] + 1_000


def test_the_svid_bound_invariant_fires_when_the_rule_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    from qhx_edge.core.staleness import Mode
    from qhx_edge.sim import state

    monkeypatch.setattr(state, "mode", lambda *a, **k: Mode("connected", 0, 10**9))
    r = engine.run(_tiny('[[link]]\nbetween = ["hq", "b"]\nbandwidth = "1Mbit/s"\nwindows = [["0h", "1h"]]\n'))
    assert any("past its bound" in b for b in r["invariants"]["broken"])


def test_a_link_found_by_retrying_is_found_at_the_dialler_s_next_attempt() -> None:
    """``detect = "retry"``: the nodes cannot see the satellite come up and find it by dialling with
    serve's backoff (5 s doubling to 300 s, without jitter).  Contacts then start at those attempts:
    later than the bound, by as much as the backoff had grown; nothing arrives before the bound."""
    text = (SCENARIOS / "flapping-satellite.toml").read_text()
    retry = text.replace(
        'markov = { up = "15m", down = "45m" }', 'markov = { up = "15m", down = "45m" }\ndetect = "retry"'
    )
    assert retry != text
    sc = scenario.load(retry, "retry.toml")
    e = engine.Engine(sc)
    assert [e._next_attempt(("x", "y"), at) for at in (0, 1, 5_000, 12_000, 16_000)] == [
        0,
        5_000,
        5_000,
        15_000,
        35_000,
    ]
    slow = engine.run(sc)
    fast = _run("flapping-satellite.toml")
    assert slow["invariants"]["held"]
    assert slow["over_bound"]["p99"] > 1.10 > fast["over_bound"]["p99"]
    for rev in slow["revocations"].values():
        for node, got in rev["arrivals_ms"].items():
            assert got is None or got >= rev["bound_ms"][node]


def test_a_coalition_joined_by_a_courier_federates_under_its_agreements() -> None:
    """Three domains, three agreements, one liaison between the headquarters: a beta node's revocation
    and alpha's CA rotation reach every node of the partners, never before the bound (computed on the
    contacts that may carry them: no domain relays another's documents to a third), and SPIRE's
    servers, which never meet, federate nothing."""
    r = _run("coalition-courier.toml")
    assert r["invariants"]["held"]
    assert r["delivery_ratio_reachable"] == 1.0
    (name, rev), *_ = r["revocations"].items()
    assert name.startswith("beta.example/revocation/")
    partners = [n for n in rev["arrivals_ms"] if not n.startswith("beta-")]
    assert len(partners) == 6  # alpha's and gamma's three each
    for node, got in rev["arrivals_ms"].items():
        assert got is not None, node
        assert got >= rev["bound_ms"][node], node
    assert r["publications"]["bundle"]["deliveries"] == r["publications"]["bundle"]["expected"] == 8
    assert all(r["baseline"]["revocations"][name][n] is None for n in partners)
    assert r["baseline"]["delivery_ratio"] < 0.2 < 0.8 < r["delivery_ratio"]


def test_what_a_simulated_node_offers_a_partner_is_what_a_real_contact_offers() -> None:
    """``NodeState.offered`` stands for ``sync_session.offer`` in the simulation: the same keys for every
    node of the coalition towards every domain."""
    from qhx_edge.homes import sync_session

    sc = scenario.load((SCENARIOS / "coalition-courier.toml").read_text(), "coalition")
    e = engine.Engine(sc).run()
    for name, state in e.nodes.items():
        held = [state.raw[k] for k in sorted(state.raw)]
        cat = sync_session.catalog(held)
        for peer in ("alpha.example", "beta.example", "gamma.example"):
            real = sync_session.inventory(sync_session.offer(cat, our_domain=state.home, peer_domain=peer))
            assert state.offered(peer) == real, (name, peer)
        assert any(d != state.home for d, _t in state.offered(state.home)), name  # partners' documents relayed home


def test_a_terminated_agreement_closes_the_partner_and_its_publications_are_no_longer_its() -> None:
    text = (SCENARIOS / "coalition-courier.toml").read_text()
    text += (
        '\n[[event]]\nat = "40h"\nkind = "terminate-agreement"\ndomain = "gamma.example"\npartner = "beta.example"\n'
    )
    sc = scenario.load(text, "terminated.toml")
    e = engine.Engine(sc).run()
    r = e.report()
    assert r["invariants"]["held"]
    late = [p for p in e.publications if p.domain == "beta.example" and p.at > 40 * 3_600_000]
    assert late
    assert all(not n.startswith("gamma-") for p in late for n in p.audience)
    # Every gamma node that heard of the termination holds no beta epoch newer than those before it.
    before = max(p.version for p in e.publications if p.domain == "beta.example" and p.kind == "freshness"
                 and p.at <= 40 * 3_600_000)  # fmt: skip
    for name in ("gamma-hq", "gamma-f1", "gamma-f2"):
        assert e.nodes[name].inventory().get(("beta.example", "freshness"), 0) <= before, name
    with pytest.raises(Exception, match="partner"):
        scenario.load(text.replace('partner = "beta.example"', 'partner = "gamma.example"'), "bad.toml")


RESTART = """
[scenario]
name = "restart"
duration = "4h"
seed = 9
sample = "10m"

[[domain]]
name = "alpha.example"
authority = "hq"
freshness_every = "30m"
staleness = { soft = "6h", hard = "24h" }

[[node]]
name = "hq"
domain = "alpha.example"

[[node]]
name = "a1"
domain = "alpha.example"

[[link]]
between = ["hq", "a1"]
bandwidth = "1Mbit/s"
latency = "50ms"
windows = [["0h", "1h"]]
"""


def test_a_restart_costs_the_baseline_its_issuance_and_qhx_edge_nothing() -> None:
    """A node restarts a second before its link to the server goes for good.  qhx-edge's node
    keeps its store, so it issues on (and its live link is contacted anew); the SPIRE-like agent lost its
    SVIDs and cannot get new ones: it stops issuing at once instead of an hour after its last poll."""
    plain = engine.run(scenario.load(RESTART, "plain.toml"))
    event = '\n[[event]]\nat = "59m59s"\nkind = "restart"\ndomain = "alpha.example"\nnode = "a1"\n'
    restarted = engine.run(scenario.load(RESTART + event, "restart.toml"))
    assert restarted["invariants"]["held"]
    assert restarted["issuance_available"]["a1"] == plain["issuance_available"]["a1"] == 1.0
    assert restarted["sync_contacts"] == plain["sync_contacts"] + 1  # the link contacted anew
    theirs, before = restarted["baseline"]["issuance_available"]["a1"], plain["baseline"]["issuance_available"]["a1"]
    assert theirs < before
    with pytest.raises(Exception, match="names its 'node'"):
        scenario.load(RESTART + '\n[[event]]\nat = "1h"\nkind = "restart"\ndomain = "alpha.example"\n', "bad.toml")
