"""``qhx-edge scenario run --live``: a small scenario with real ``qhx-edge serve`` processes in network
namespaces, compared with the simulation of the same file (docs/simulation.md, "Live mode"; issue 12).

The run, as root, in real time (a live scenario lasts minutes, not days):

* an authority home and a node home per scenario node, each node attested by join token; the policy
  registers the sync identity;
* a network namespace per node and a veth pair per link (``10.98.K.1`` / ``.2``), shaped to the link's
  rate by ``tbf`` (this kernel has no ``netem``: latency is not emulated), down outside its windows
  (``ip link set down``: what a radio out of range looks like to the node);
* ``qhx-edge serve`` in each namespace, listening for sync links, the lower-named end of each link
  dialling the other (live links, and diallers woken by the link coming up);
* the authority publishes what the scenario says when it says it (a freshness epoch every
  ``freshness_every``, the events), each time into its node's store, as a courier from the authority
  would bring it;
* every node's store is read every :data:`POLL` seconds (read-only) for the versions it holds.

Each publication's arrival at each node is compared with the simulation's, publication by publication
in order: the same deliveries, and each delay within :data:`TOLERANCE_MS` plus 10 % of the simulated
delay.  The namespaces and processes are removed whatever happens.  ``live.json`` holds both sides and
the verdict; a mismatch fails the run (``live-mismatch``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qhx_edge.core.errors import EnvironmentFault, Malformed, Rejected
from qhx_edge.sim import contacts, engine
from qhx_edge.sim.scenario import Scenario
from qhx_edge.store import clock
from qhx_edge.store.files import atomic_write

MAX_LIVE_NODES = 6
MAX_LIVE_DURATION_MS = 15 * 60_000
PORT = 7443
POLL = 0.2  # s between reads of every node's store
TOLERANCE_MS = 4_000  # a live delivery may differ from the simulated one by this, plus 10 % of it
SYNC_ID = "qhx-edge/sync"
SYNC_SELECTOR = "qhx-edge:sync"
LIVE_KINDS = ("revoke-node", "rotate-ca", "publish-policy")


class LiveMismatch(Rejected):
    """The live run did not deliver what the simulation of the same scenario delivered, or not in time."""

    kind = "live-mismatch"


def check(sc: Scenario) -> None:
    """What a live run can play (``malformed`` otherwise, saying what): up to six nodes of one domain, link
    windows and the authority's publications; no couriers, adversaries, agreements or clock skew."""
    why = []
    if len(sc.nodes) > MAX_LIVE_NODES:
        why.append(f"{len(sc.nodes)} nodes (at most {MAX_LIVE_NODES})")
    if len(sc.domains) != 1:
        why.append("more than one domain")
    if sc.duration > MAX_LIVE_DURATION_MS:
        why.append(f"a duration of {sc.duration // 1000} s (at most {MAX_LIVE_DURATION_MS // 1000} s in real time)")
    if sc.couriers or sc.adversaries or sc.agreements:
        why.append("couriers, adversaries or agreements")
    if any(n.clock_skew for n in sc.nodes):
        why.append("clock skew")
    if any(e.kind not in LIVE_KINDS for e in sc.events):
        why.append(f"events other than {', '.join(LIVE_KINDS)}")
    if any(link.detect != "carrier" for link in sc.links):
        why.append("links found by retrying (live links are seen coming up)")
    if why:
        raise Malformed(f"{sc.source or sc.name}: a live run cannot play " + "; ".join(why))


def preflight() -> None:
    if os.geteuid() != 0:
        raise EnvironmentFault("a live run creates network namespaces: run it as root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise EnvironmentFault(f"a live run needs {tool} (Debian package iproute2)")


@dataclass
class _Published:
    kind: str
    at: int  # ms since the start
    versions: dict[str, int]
    arrivals: dict[str, int] = field(default_factory=dict)  # node -> ms


def _tool(name: str, *args: str, check: bool = True) -> None:
    """Run iproute2's ``ip`` or ``tc`` (found on PATH by :func:`preflight`) with our own arguments."""
    subprocess.run([shutil.which(name) or name, *args], check=check, capture_output=True)  # noqa: S603


def _ip(*args: str) -> None:
    _tool("ip", *args)


class _Net:
    """The namespaces and veth pairs of one run; removed on exit, whatever happened."""

    def __init__(self, sc: Scenario) -> None:
        tag = f"{os.getpid() % 100000}"
        self.ns = {n.name: f"qhxl{tag}n{i}" for i, n in enumerate(sc.nodes)}
        self.links: list[tuple[str, str, str, str, str, str]] = []  # a, b, dev a, dev b, addr a, addr b
        for k, link in enumerate(sc.links):
            self.links.append((link.a, link.b, f"ql{tag}{k}a", f"ql{tag}{k}b", f"10.98.{k}.1", f"10.98.{k}.2"))
        self.sc = sc

    def __enter__(self) -> _Net:
        try:
            for ns in self.ns.values():
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            for (a, b, da, db, xa, xb), link in zip(self.links, self.sc.links, strict=True):
                _ip("link", "add", da, "type", "veth", "peer", "name", db)
                _ip("link", "set", da, "netns", self.ns[a])
                _ip("link", "set", db, "netns", self.ns[b])
                _ip("-n", self.ns[a], "addr", "add", f"{xa}/30", "dev", da)
                _ip("-n", self.ns[b], "addr", "add", f"{xb}/30", "dev", db)
                bits = max(8_000, int(link.bandwidth * 8))
                for ns, dev in ((self.ns[a], da), (self.ns[b], db)):
                    shape = ["rate", f"{bits}bit", "burst", "32kbit", "latency", "2s"]
                    _ip("netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", *shape)
        except BaseException:
            self.__exit__()
            raise
        return self

    def set(self, index: int, up: bool) -> None:
        a, b, da, db, _xa, _xb = self.links[index]
        for ns, dev in ((self.ns[a], da), (self.ns[b], db)):
            _ip("-n", ns, "link", "set", dev, "up" if up else "down")

    def __exit__(self, *exc: object) -> None:
        for ns in self.ns.values():
            _tool("ip", "netns", "del", ns, check=False)


def _policy(domain: str) -> dict[str, Any]:
    """The live run's policy: the sync identity registered, nothing else (the default budgets)."""
    from qhx_edge.core.policyfile import policy_fields

    sync = {"spiffe_id": f"spiffe://{domain}/{SYNC_ID}", "selectors": [SYNC_SELECTOR]}
    return policy_fields({"registrations": [sync], "algorithms": {"/": "ES256"}})


def _homes(sc: Scenario, where: Path, passphrase: bytes) -> tuple[Any, dict[str, Path], dict[str, str]]:
    """The authority, a home per node (attested), and each node's id."""
    from qhx_edge.homes import attestation, node
    from qhx_edge.homes.authority import Authority

    d = sc.domains[0]
    now = clock.now()
    auth = Authority.init(where / "authority", d.name, suite="hybrid", root_keys=1, root_threshold=1,
                          passphrase=passphrase, now=now)  # fmt: skip
    auth.publish_policy(_policy(d.name), now)
    homes, ids = {}, {}
    for n in sc.nodes:
        home = homes[n.name] = where / "nodes" / n.name
        node.init(home, auth.anchor(), now, passphrase=passphrase)
        with node.Node(home, lambda: passphrase) as nd:
            attestation.join_in_process(auth, nd, now)
            ids[n.name] = nd.node_id
    return auth, homes, ids


def _serve(ns: str, home: Path, log: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    import select

    cmd = [shutil.which("ip") or "ip", "netns", "exec", ns, sys.executable, "-m", "qhx_edge", "--json", "--home",
           str(home), "serve", "--socket", str(home / "workload.sock"), *args]  # fmt: skip
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)  # noqa: S603
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    if not ready or not proc.stdout.readline().strip():
        proc.kill()
        raise EnvironmentFault(f"serve in {ns} did not start: {log.read_text()[-500:]}")
    return proc


def _held(home: Path) -> dict[str, int]:
    """The newest version of each type of the home domain a node holds (its store read-only)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{home / 'node.sqlite'}?mode=ro", uri=True, timeout=1)
    try:
        rows = conn.execute("SELECT type, max(version) FROM documents GROUP BY domain, type").fetchall()
    finally:
        conn.close()
    return {str(t): int(v) for t, v in rows}


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def run_live(sc: Scenario, out: Path, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Play ``sc`` live (module docstring) and compare it with its simulation; what ``live.json`` holds."""
    check(sc)
    preflight()
    simulated = engine.Engine(sc).run()
    work = out / "live"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    passphrase = secrets.token_urlsafe(16)
    auth, homes, ids = _homes(sc, work, passphrase.encode())
    env = {k: v for k, v in os.environ.items() if not k.startswith("QHX_EDGE_")}
    env["QHX_EDGE_PASSPHRASE"] = passphrase
    d = sc.domains[0]
    hq = homes[d.authority]

    # The timeline, in ms from the start: link windows (as the simulation plans them) and publications.
    actions: list[tuple[int, int, str, Any]] = []
    plan = contacts.plan(sc)
    for k, link in enumerate(sc.links):
        for c in plan:
            if c.kind == "link" and (c.a, c.b) == (link.a, link.b) and c.start < sc.duration:
                actions.append((c.start, 0, "up", k))
                actions.append((c.end, 0, "down", k))
    t = d.freshness_every
    while t <= sc.duration:
        if not any(s <= t < e for s, e in d.outages):
            actions.append((t, 1, "freshness", None))
        t += d.freshness_every
    for e in sc.events:
        actions.append((e.at, 1, e.kind, e))
    actions.sort(key=lambda x: (x[0], x[1]))

    published: list[_Published] = []

    def publish(kind: str, docs: list[bytes], at: int) -> None:
        from qhx_edge.core import documents as D  # noqa: N812 -- as the rest of the package names it
        from qhx_edge.homes import node

        versions = {D.parse(raw).type: D.parse(raw).payload.version for raw in docs}
        published.append(_Published(kind, at, versions))
        now = clock.now()
        with node.Node(hq) as n:
            n.import_pack(auth.export_pack(auth.export_documents(), now), now)

    with _Net(sc) as net, _processes() as procs:
        peers: dict[str, list[str]] = {n.name: [] for n in sc.nodes}
        for a, b, _da, _db, xa, xb in net.links:
            if a < b:
                peers[a].append(f"{xb}:{PORT}")
            else:
                peers[b].append(f"{xa}:{PORT}")
        for n in sc.nodes:
            args = ["--sync-listen", f"0.0.0.0:{PORT}", "--sync-interval", "60s"]
            for p in peers[n.name]:
                args += ["--sync-peer", p]
            procs.append(_serve(net.ns[n.name], homes[n.name], work / f"{n.name}.log", args, env))
        for k in range(len(net.links)):
            net.set(k, False)
        stop = threading.Event()
        start = time.monotonic()
        seen: dict[str, dict[str, int]] = {n.name: {} for n in sc.nodes}
        first_seen: dict[str, list[tuple[int, dict[str, int]]]] = {n.name: [] for n in sc.nodes}

        def observe() -> None:
            while not stop.is_set():
                ms = int((time.monotonic() - start) * 1000)
                for name, home in homes.items():
                    with contextlib.suppress(Exception):  # a store busy for a moment: read it next time
                        held = _held(home)
                        if held != seen[name]:
                            seen[name] = held
                            first_seen[name].append((ms, held))
                stop.wait(POLL)

        watcher = threading.Thread(target=observe, name="qhx-live-observer", daemon=True)
        watcher.start()
        try:
            for at, _order, what, arg in actions:
                delay = start + at / 1000 - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if progress is not None:
                    progress(at, sc.duration)
                now = clock.now()
                if what in ("up", "down"):
                    net.set(arg, what == "up")
                elif what == "freshness":
                    publish("freshness", auth.publish_freshness(now), at)
                elif what == "revoke-node":
                    publish("revocation", auth.revoke(now, node_id=ids[arg.node]), at)
                elif what == "rotate-ca":
                    publish("bundle", auth.rotate_ca(now), at)
                else:  # publish-policy: the held policy again, a new version
                    publish("policy", auth.publish_policy(_policy(d.name), now), at)
            rest = start + sc.duration / 1000 - time.monotonic()
            if rest > 0:
                time.sleep(rest)
        finally:
            stop.set()
            watcher.join(timeout=10)
    if progress is not None:
        progress(sc.duration, sc.duration)
    for pub in published:
        for name, history in first_seen.items():
            if name == d.authority:
                continue
            got = next((ms for ms, held in history if all(held.get(t, 0) >= v for t, v in pub.versions.items())), None)
            if got is not None:
                pub.arrivals[name] = max(0, got - pub.at)
    result = compare(sc, simulated, published)
    atomic_write(out / "live.json", (json.dumps(result, sort_keys=True, indent=1) + "\n").encode())
    if not result["matches"]:
        raise LiveMismatch(f"{len(result['differences'])} difference(s) from the simulation, first: "
                           f"{result['differences'][0]} (see {out / 'live.json'})")  # fmt: skip
    return result


def compare(sc: Scenario, simulated: engine.Engine, live: list[_Published]) -> dict[str, Any]:
    """Publication by publication, in order: delivered to the same nodes, each delay (ms from publication)
    within :data:`TOLERANCE_MS` plus 10 % of the simulated one."""
    sim = simulated.publications
    differences: list[str] = []
    rows: list[dict[str, Any]] = []
    if [p.kind for p in sim] != [p.kind for p in live]:
        differences.append(f"published {[p.kind for p in live]}, simulated {[p.kind for p in sim]}")
    for i, (s, lv) in enumerate(zip(sim, live, strict=False)):
        for node in s.audience:
            want = s.arrivals.get(node)
            s_delay = None if want is None else want - s.at
            got = lv.arrivals.get(node)
            rows.append({"publication": i, "kind": s.kind, "at_ms": s.at, "node": node, "simulated_ms": s_delay,
                         "live_ms": got})  # fmt: skip
            if (s_delay is None) != (got is None):
                differences.append(f"{s.kind} #{i} at {s.at} ms reached {node} "
                                   f"{'live only' if s_delay is None else 'in the simulation only'}")  # fmt: skip
            elif s_delay is not None and got is not None and abs(got - s_delay) > TOLERANCE_MS + s_delay // 10:
                differences.append(f"{s.kind} #{i} at {s.at} ms reached {node} after {got} ms live, "
                                   f"{s_delay} ms simulated")  # fmt: skip
    both = [
        (r["live_ms"], r["simulated_ms"]) for r in rows if r["live_ms"] is not None and r["simulated_ms"] is not None
    ]
    return {
        "scenario": sc.name,
        "nodes": len(sc.nodes),
        "deliveries": rows,
        "delivered_both": len(both),
        "max_difference_ms": max((abs(a - b) for a, b in both), default=None),
        "tolerance_ms": f"{TOLERANCE_MS} + 10 % of the simulated delay",
        "differences": differences,
        "matches": not differences,
    }
