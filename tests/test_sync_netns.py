"""Three nodes in network namespaces this test creates and removes (as root), syncing with real
``qhx-edge serve`` processes over links that go down and up (issue 10 acceptance).

Topology, a line: ``n1 ─(10.77.1.0/24, 1 Mbit/s by tbf)─ n2 ─(10.77.2.0/24)─ n3``; n2 is .2 on the
first link and .1 on the second.  n2 accepts sync links; n1 and n3 dial it every second.  The
authority's documents reach n1 alone (a courier); n2 and n3 get them by sync, store and forward.
Then the n2-n3 link goes down, the authority revokes a node during the partition, and n1 and n2
take the revocation; when the link comes back up, n3 applies it at its first contact.

Lossy links: this machine's kernel has no ``sch_netem`` (``tc`` answers "Specified qdisc kind is
unknown"), nor any classifier or action (no ``gact`` random drop).  The n2-n3 link is made lossy
with what it has: ``tbf`` at 512 kbit/s with a queue of 3,000 bytes (two full frames), so every
burst larger than that loses packets at the queue's tail, and TCP retransmits.  The test reads the
kernel's drop counters and asserts the link did drop packets while the nodes converged over it.

``test_discovery_finds_a_peer_on_the_link_and_syncs`` runs two nodes in one namespace of its own
(only its loopback: no multicast leaves it), each advertising ``_qhx-sync._tcp`` over mDNS and
browsing for it, with no peer address given: they find each other and converge.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from qhx_edge.core.policyfile import policy_fields
from qhx_edge.homes import node
from qhx_edge.homes.sync_link import SYNC_SELECTOR
from qhx_edge.store import clock
from tests.conftest import PASSPHRASE, _cli_env, attest_node, make_homes, need, stop_process, wait_until
from tests.test_sync_link import _held

NS = ("qhxsync1", "qhxsync2", "qhxsync3")
LOSSY = ["rate", "512kbit", "burst", "1600", "limit", "3000"]  # burst: one full frame (bytes)
SYNC_ID = "spiffe://alpha.example/qhx-edge/sync"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def _line_topology() -> Iterator[None]:
    """n1 - n2 - n3 on two veth pairs; every namespace removed afterwards, whatever happened."""
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)  # left by an interrupted run
    try:
        for ns in NS:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for a, b, net in ((0, 1, "10.77.1"), (1, 2, "10.77.2")):
            left, right = f"qs{a + 1}{b + 1}a", f"qs{a + 1}{b + 1}b"
            _ip("link", "add", left, "type", "veth", "peer", "name", right)
            _ip("link", "set", left, "netns", NS[a])
            _ip("link", "set", right, "netns", NS[b])
            _ip("-n", NS[a], "addr", "add", f"{net}.1/24", "dev", left)
            _ip("-n", NS[b], "addr", "add", f"{net}.2/24", "dev", right)
            _ip("-n", NS[a], "link", "set", left, "up")
            _ip("-n", NS[b], "link", "set", right, "up")
        # The n1-n2 link is slow: 1 Mbit/s each way.  The n2-n3 link is slower and lossy: a queue of
        # two frames, so bursts lose packets (see the module docstring).
        for ns, dev, shape in (
            (NS[0], "qs12a", ["rate", "1mbit", "burst", "32kbit", "latency", "400ms"]),
            (NS[1], "qs12b", ["rate", "1mbit", "burst", "32kbit", "latency", "400ms"]),
            (NS[1], "qs23a", LOSSY),
            (NS[2], "qs23b", LOSSY),
        ):
            subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", *shape],
                check=True,
                capture_output=True,
            )
        yield
    finally:
        for ns in NS:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def _dropped(ns: str, dev: str) -> int:
    """Packets the kernel dropped on ``dev``'s queue (tc -s)."""
    out = subprocess.run(["ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", dev],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return sum(int(m) for m in re.findall(r"dropped (\d+)", out))


def _serve(ns: str, home: Path, log: Path, *args: str) -> subprocess.Popen[str]:
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "qhx_edge", "--json", "--home", str(home), "serve",
           "--socket", str(home / "w.sock"), *args]  # fmt: skip
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready, log.read_text()
    json.loads(proc.stdout.readline())
    return proc


def test_three_nodes_converge_across_partitions(tmp_path: Path) -> None:
    need(os.geteuid() == 0 and shutil.which("ip") is not None, "network namespaces need root and iproute2")
    h = make_homes(tmp_path, suite="hybrid")
    now = clock.now()
    h.authority.publish_policy(
        policy_fields({"registrations": [{"spiffe_id": SYNC_ID, "selectors": [SYNC_SELECTOR]}],
                       "algorithms": {"/": "ES256"}}),
        now,
    )  # fmt: skip
    homes = [h.node_home, tmp_path / "N2", tmp_path / "N3"]
    for home in homes[1:]:
        node.init(home, h.authority.anchor(), now, passphrase=PASSPHRASE.encode())
    for home in homes:
        attest_node(h, home)
    victim = tmp_path / "N4"  # a node to revoke later; it never syncs
    node.init(victim, h.authority.anchor(), now, passphrase=PASSPHRASE.encode())
    attest_node(h, victim)

    def courier_to_n1() -> None:
        t = clock.now()
        with node.Node(homes[0]) as n:
            n.import_pack(h.authority.export_pack(h.authority.export_documents(), t), t)

    procs: list[subprocess.Popen[str]] = []
    with _line_topology():
        try:
            procs.append(_serve(NS[1], homes[1], tmp_path / "n2.log", "--sync-listen", "0.0.0.0:7443"))
            procs.append(_serve(NS[0], homes[0], tmp_path / "n1.log", "--sync-peer", "10.77.1.2:7443",
                                "--sync-interval", "1s"))  # fmt: skip
            procs.append(_serve(NS[2], homes[2], tmp_path / "n3.log", "--sync-peer", "10.77.2.1:7443",
                                "--sync-interval", "1s"))  # fmt: skip
            # The authority moves on; only n1 hears (a courier): n2 and n3 get it by sync.
            h.authority.publish_bundle(clock.now())
            courier_to_n1()
            wait_until(lambda: _held(homes[2]) == _held(homes[0]), "n3 never caught up through n2", 60)

            # Partition: the n2-n3 link goes down; a revocation is published and reaches n1 and n2.
            _ip("-n", NS[2], "link", "set", "qs23b", "down")
            with node.Node(victim) as n:
                victim_id = n.node_id
            h.authority.revoke(clock.now(), node_id=victim_id)
            courier_to_n1()
            wait_until(lambda: "revocation" in _held(homes[1])["alpha.example"], "n2 never got the revocation", 60)
            time.sleep(3)  # several of n3's attempts fail meanwhile
            assert "revocation" not in _held(homes[2])["alpha.example"]
            # Heal: n3 applies it at its first contact (within its backoff, at most 5 min; here seconds).
            _ip("-n", NS[2], "link", "set", "qs23b", "up")
            wait_until(lambda: _held(homes[2]) == _held(homes[0]), "n3 did not converge after the heal", 120)
            assert "revocation" in _held(homes[2])["alpha.example"]
            lost = _dropped(NS[1], "qs23a") + _dropped(NS[2], "qs23b")
            assert lost > 0, "the lossy link lost nothing: the test did not test loss"
        finally:
            codes = [stop_process(p) for p in procs]
        assert codes == [0, 0, 0], [(tmp_path / f"n{i}.log").read_text()[-2000:] for i in (2, 1, 3)]
    with node.Node(homes[2]) as n:
        peers = n.store.sync_peers()
    # The partition was felt: the live link ended when n3's link went down (a network change), and either
    # a redial failed while it was down or the next link was a new contact.
    assert peers[0]["failures"] >= 1 or peers[0]["contacts"] >= 2, peers


def test_discovery_finds_a_peer_on_the_link_and_syncs(tmp_path: Path) -> None:
    """Two ``serve --sync-discover`` processes, given no peer address, in a namespace of their own:
    each advertises its listener over mDNS and browses; the one with the smaller node id dials the
    other, and the behind node catches up."""
    need(os.geteuid() == 0 and shutil.which("ip") is not None, "network namespaces need root and iproute2")
    ns = "qhxsyncdisc"
    h = make_homes(tmp_path, suite="hybrid")
    now = clock.now()
    h.authority.publish_policy(
        policy_fields({"registrations": [{"spiffe_id": SYNC_ID, "selectors": [SYNC_SELECTOR]}],
                       "algorithms": {"/": "ES256"}}),
        now,
    )  # fmt: skip
    other = tmp_path / "N2"
    node.init(other, h.authority.anchor(), now, passphrase=PASSPHRASE.encode())
    for home in (h.node_home, other):
        attest_node(h, home)
    h.authority.publish_bundle(clock.now())
    t = clock.now()
    with node.Node(h.node_home) as n:  # only the first node hears the authority
        n.import_pack(h.authority.export_pack(h.authority.export_documents(), t), t)
    assert _held(other) != _held(h.node_home)
    subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
    procs: list[subprocess.Popen[str]] = []
    try:
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        for i, home in enumerate((h.node_home, other)):
            procs.append(_serve(ns, home, tmp_path / f"d{i}.log", "--sync-listen", "127.0.0.1:0",
                                "--sync-discover", "--sync-interval", "1s"))  # fmt: skip
        wait_until(lambda: _held(other) == _held(h.node_home), "discovery never brought the nodes together", 60)
    finally:
        codes = [stop_process(p) for p in procs]
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
    assert codes == [0, 0], [(tmp_path / f"d{i}.log").read_text()[-2000:] for i in (0, 1)]
