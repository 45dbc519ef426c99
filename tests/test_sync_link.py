"""Sync links (qhx_edge/homes/sync_link.py): two attested nodes of one domain over real TCP on
127.0.0.1 with mutual TLS 1.3, each presenting the sync X509-SVID its own issuer minted.

* They converge over X25519MLKEM768, and the listener records the contact.
* A classical-only client (X25519 alone) gets ``downgrade`` on both ends, audited by the listener;
  nothing is synced.
* A client presenting a valid SVID of our domain that the policy does not register for sync (a
  workload's) is refused (``scope-violation``), audited; nothing is synced.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from qhx_edge.core.policyfile import policy_fields
from qhx_edge.homes import node
from qhx_edge.homes.bundles import EndpointSvid
from qhx_edge.homes.sync_link import SYNC_SELECTOR, SyncCredential, dial, listen
from qhx_edge.links import tls
from qhx_edge.store import clock
from tests.conftest import PASSPHRASE, Homes, attest_node, make_homes, stop_process, wait_until

SYNC_ID = "spiffe://alpha.example/qhx-edge/sync"
WORKLOAD_ID = "spiffe://alpha.example/web"
REGISTRATIONS = [
    {"spiffe_id": SYNC_ID, "selectors": [SYNC_SELECTOR]},
    {"spiffe_id": WORKLOAD_ID, "selectors": ["qhx-edge:test-workload"]},
]


def _two_nodes(tmp: Path) -> tuple[Homes, Path]:
    h = make_homes(tmp, suite="hybrid")
    now = clock.now()
    h.authority.publish_policy(policy_fields({"registrations": REGISTRATIONS, "algorithms": {"/": "ES256"}}), now)
    other = tmp / "N2"
    node.init(other, h.authority.anchor(), now, passphrase=PASSPHRASE.encode())
    attest_node(h, h.node_home)
    attest_node(h, other)
    # The authority moves on; only the first node hears.
    h.authority.publish_bundle(now)
    h.authority.publish_freshness(now)
    with node.Node(h.node_home) as n:
        n.import_pack(h.authority.export_pack(h.authority.export_documents(), now), now)
    return h, other


def _held(home: Path) -> dict[str, Any]:
    """What a node holds, but its own delegations (each node's are its own: never synced)."""
    from qhx_edge.homes.sync_session import NOT_SYNCED

    with node.Node(home) as n:
        held = n.summary()["domains"].items()
    return {d: {t: v for t, v in types.items() if t not in NOT_SYNCED} for d, types in held}


def _audit(home: Path) -> list[dict[str, Any]]:
    with node.Node(home) as n:
        return n.store.audit_entries()


async def _run(listener: Path, dialer: Path, credential: tls.Credential, **dial_kw: Any) -> tuple[Any, Any]:
    seen: list[Any] = []
    server_credential = SyncCredential(listener, PASSPHRASE.encode)
    try:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(
                lambda task_status: listen(
                    listener, "127.0.0.1", 0, server_credential, contacts=1,
                    on_contact=lambda peer, r: seen.append(r), task_status=task_status,
                )
            )  # fmt: skip
            mine = await dial(dialer, host, port, credential, **dial_kw)
    finally:
        server_credential.close()
    return seen[0], mine


def _credential(home: Path, selector: str = SYNC_SELECTOR) -> tls.Credential:
    source = EndpointSvid(home, PASSPHRASE.encode, selector=selector, role="test")
    try:
        return source()
    finally:
        source.close()


def test_two_attested_nodes_sync_over_mutual_pq_tls(tmp_path: Path) -> None:
    h, other = _two_nodes(tmp_path)
    assert _held(h.node_home) != _held(other)
    theirs, mine = trio.run(_run, h.node_home, other, _credential(other))
    assert mine.error is None, mine.error
    assert theirs.complete
    assert mine.complete
    assert mine.imported["applied"]
    assert _held(h.node_home) == _held(other)


def test_a_classical_only_peer_gets_downgrade_audited(tmp_path: Path) -> None:
    h, other = _two_nodes(tmp_path)
    before = _held(other)
    theirs, mine = trio.run(functools.partial(_run, h.node_home, other, _credential(other), groups=("X25519",)))
    assert mine.error["kind"] == "downgrade", mine.error
    assert theirs.error["kind"] == "downgrade", theirs.error
    assert _held(other) == before
    refused = [e for e in _audit(h.node_home) if e["kind"] == "downgrade"]
    assert refused
    assert "sync link from 127.0.0.1" in refused[-1]["detail"]


def test_a_peer_that_is_not_a_sync_identity_is_refused(tmp_path: Path) -> None:
    h, other = _two_nodes(tmp_path)
    before = _held(other)
    workload = _credential(other, "qhx-edge:test-workload")  # a valid SVID of our domain, not for sync
    theirs, mine = trio.run(_run, h.node_home, other, workload)
    assert theirs.error["kind"] == "scope-violation", theirs.error
    assert mine.error is not None
    assert _held(other) == before
    assert any(e["kind"] == "scope-violation" and WORKLOAD_ID in e["detail"] for e in _audit(h.node_home))


def test_the_command_line_listens_and_dials(tmp_path: Path) -> None:
    """``sync listen`` (one contact) and ``sync dial`` as real processes; a dial to a closed port is
    ``unreachable`` (exit 3)."""
    import json
    import select
    import subprocess
    import sys

    from tests.conftest import _cli_env, run_cli

    h, other = _two_nodes(tmp_path)
    cmd = [sys.executable, "-m", "qhx_edge", "--json", "--home", str(h.node_home), "sync", "listen",
           "127.0.0.1:0", "--contacts", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, proc.stderr.read() if proc.stderr else ""
        where = json.loads(proc.stdout.readline())["listening"]
        got = run_cli("--home", str(other), "--json", "sync", "dial", where)
        assert got.code == 0, got.stdout
        assert got.json["received"] >= 2
        assert proc.wait(30) == 0
        contact_line = json.loads(proc.stdout.readline())
        assert contact_line["complete"]
        assert contact_line["sent"] == got.json["received"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert _held(h.node_home) == _held(other)
    closed = run_cli("--home", str(other), "--json", "sync", "dial", where)
    assert (closed.code, closed.json["error"]["kind"]) == (3, "unreachable"), closed.stdout


@pytest.mark.parametrize("live", [True, False], ids=["live", "contacts"])
def test_serve_keeps_nodes_in_sync_and_reports_it(tmp_path: Path, live: bool) -> None:
    """Two ``qhx-edge serve`` processes, one accepting sync links and one dialling it: the behind node
    catches up, then takes a revocation the other imported while both run, pushed over the live link;
    ``sync status`` shows the peer; with the listener gone, the dialler reports ``unreachable`` and backs
    off.  With ``--no-sync-live`` it takes a new contact every ``--sync-interval`` instead."""
    import json
    import select
    import subprocess
    import sys

    from tests.conftest import _cli_env, run_cli

    h, other = _two_nodes(tmp_path)

    def start(home: Path, name: str, *args: str) -> tuple[subprocess.Popen[str], dict[str, Any], Path]:
        log = tmp_path / f"{name}.log"
        cmd = [sys.executable, "-m", "qhx_edge", "--json", "--home", str(home), "serve", "--socket",
               str(tmp_path / f"{name}.sock"), *args]  # fmt: skip
        with log.open("w") as err:
            proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.PIPE, stderr=err, text=True)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, log.read_text()
        return proc, json.loads(proc.stdout.readline()), log

    listener, info, _log1 = start(h.node_home, "n1", "--sync-listen", "127.0.0.1:0")
    dialler = None
    try:
        where = info["sync"]["listening"]
        mode = [] if live else ["--no-sync-live"]
        dialler, info2, log2 = start(other, "n2", "--sync-peer", where, "--sync-interval", "1s", *mode)
        wait_until(lambda: _held(other) == _held(h.node_home), "the behind node never caught up")
        # The authority revokes a third node; only the listening node imports it: it reaches the other
        # by sync.  (A revoked node itself cannot sync at all: its issuer mints it no sync identity.)
        _revoke_a_third_node(h, tmp_path, h.node_home)
        wait_until(lambda: "revocation" in _held(other)["alpha.example"], "the revocation never reached the other node")
        status = run_cli("--home", str(other), "--json", "sync", "status").json
        (peer,) = status["peers"]
        assert peer["peer"] == where
        if live:  # the revocation was pushed over the link the first contact left open
            assert peer["contacts"] == 1
        else:
            assert peer["contacts"] >= 2
        assert info2["sync"]["live"] is live
        with node.Node(h.node_home) as n:
            assert peer["node_id"] == n.node_id
        assert stop_process(listener) == 0
        wait_until(lambda: "unreachable" in log2.read_text(), "the dialler never reported the lost peer")
        status = run_cli("--home", str(other), "--json", "sync", "status").json
        assert status["peers"][0]["failures"] >= 1
        assert status["peers"][0]["last_error"].startswith("unreachable")
    finally:
        stop_process(listener)
        if dialler is not None:
            assert stop_process(dialler) == 0


def test_a_proxy_that_cuts_a_large_transfer_costs_at_most_a_chunk_per_cut(tmp_path: Path) -> None:
    """A TCP proxy between two nodes cuts the TLS link three times in the middle of a large policy;
    the dialler keeps what arrived (its PeerMemory) and the fourth contact completes.  Document bytes
    received again are at most one chunk per cut."""
    from qhx_edge.core import sync
    from qhx_edge.homes.sync_session import PeerMemory, answer, catalog, inventory

    h, other = _two_nodes(tmp_path)
    regs = [*REGISTRATIONS, *({"spiffe_id": f"spiffe://alpha.example/w/{i:05d}", "selectors": [f"unix:uid:{i}"]}
                             for i in range(3000))]  # fmt: skip
    now = clock.now()
    h.authority.publish_policy(policy_fields({"registrations": regs, "algorithms": {"/": "ES256"}}), now)
    with node.Node(h.node_home) as n:
        n.import_pack(h.authority.export_pack(h.authority.export_documents(), now), now)
        cat = catalog(n.export_documents(history=True))
    with node.Node(other) as n:
        lacking = inventory(catalog(n.export_documents(history=True)))
    needed = sum(len(o.raw) for o in answer(cat, tuple((d, t, lacking.get((d, t), 0)) for d, t in cat)))
    assert needed > 8 * sync.CHUNK
    credential = _credential(other)
    memory = PeerMemory()

    async def main() -> list[Any]:
        results: list[Any] = []
        server_credential = SyncCredential(h.node_home, PASSPHRASE.encode)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(
                lambda task_status: listen(h.node_home, "127.0.0.1", 0, server_credential, task_status=task_status)
            )
            for budget in (3 * sync.CHUNK, 3 * sync.CHUNK, 3 * sync.CHUNK, 10**9):
                proxy = await trio.open_tcp_listeners(0, host="127.0.0.1")
                proxy_port = proxy[0].socket.getsockname()[1]

                async def relay(down: trio.SocketStream, budget: int = budget) -> None:
                    up = await trio.open_tcp_stream(host, port)
                    left = [budget]  # bytes the proxy passes towards the dialler before it cuts

                    async def pump(src: Any, dst: Any, counted: bool) -> None:
                        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                            while data := await src.receive_some(4096):
                                if counted:
                                    if left[0] <= 0:
                                        break
                                    data = data[: left[0]]
                                    left[0] -= len(data)
                                await dst.send_all(data)
                        nursery2.cancel_scope.cancel()

                    async with trio.open_nursery() as nursery2:
                        nursery2.start_soon(pump, up, down, True)
                        nursery2.start_soon(pump, down, up, False)
                    await trio.aclose_forcefully(up)
                    await trio.aclose_forcefully(down)

                async with trio.open_nursery() as pn:
                    pn.start_soon(functools.partial(trio.serve_listeners, relay, proxy))
                    results.append(await dial(other, "127.0.0.1", proxy_port, credential, memory=memory))
                    pn.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
        server_credential.close()
        return results

    results = trio.run(main)
    assert [r.complete for r in results] == [False, False, False, True], [r.error for r in results]
    assert _held(other) == _held(h.node_home)
    received = sum(r.bytes_in for r in results)  # sync-level bytes, inside TLS
    assert received <= needed + 3 * sync.CHUNK + 8 * 1024, (received, needed)


def test_two_hundred_concurrent_peers_against_one_node(tmp_path: Path) -> None:
    """200 sync links at once against one listening node (each dialled by the behind node, so all 200
    contacts also import concurrently into one store): every contact completes, the behind node
    converges, the listener's memory stays bounded and its descriptors are released afterwards."""
    import gc
    import resource

    h, other = _two_nodes(tmp_path)
    credential = _credential(other)
    peers = 200

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def main() -> tuple[list[Any], list[Any], int, int]:
        seen: list[Any] = []
        server_credential = SyncCredential(h.node_home, PASSPHRASE.encode)
        before = fds()
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(
                lambda task_status: listen(
                    h.node_home, "127.0.0.1", 0, server_credential, contacts=peers,
                    on_contact=lambda p, r: seen.append(r), task_status=task_status,
                )
            )  # fmt: skip
            mine: list[Any] = []

            async def one() -> None:
                mine.append(await dial(other, host, port, credential))

            async with trio.open_nursery() as dialers:
                for _ in range(peers):
                    dialers.start_soon(one)
        server_credential.close()
        gc.collect()
        return seen, mine, before, fds()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seen, mine, fds_before, fds_after = trio.run(main)
    rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert len(seen) == len(mine) == peers
    assert all(r.complete for r in seen), [r.error for r in seen if not r.complete][:3]
    assert all(r.complete for r in mine), [r.error for r in mine if not r.complete][:3]
    assert _held(other) == _held(h.node_home)
    assert fds_after <= fds_before + 2, (fds_before, fds_after)  # every socket and store closed
    assert rss_growth_mib < 400, rss_growth_mib  # both sides of 200 links in this one process


def test_a_listener_serves_a_bounded_number_of_links(tmp_path: Path, monkeypatch: Any) -> None:
    """Connections that never finish a handshake hold a slot until the handshake deadline; beyond the
    cap a connection is closed at once (no task, no TLS state, no store), so stalled peers cannot
    exhaust the listener's memory or descriptors."""
    from qhx_edge.homes import sync_link

    h, _other = _two_nodes(tmp_path)
    monkeypatch.setattr(sync_link, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(sync_link, "HANDSHAKE_TIMEOUT", 2.0)

    async def main() -> tuple[bytes, list[Any]]:
        seen: list[Any] = []
        server_credential = SyncCredential(h.node_home, PASSPHRASE.encode)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(
                lambda task_status: listen(
                    h.node_home, "127.0.0.1", 0, server_credential, contacts=2,
                    on_contact=lambda p, r: seen.append(r), task_status=task_status,
                )
            )  # fmt: skip
            stalled = [await trio.open_tcp_stream(host, port) for _ in range(2)]
            await trio.sleep(0.3)
            third = await trio.open_tcp_stream(host, port)
            with trio.fail_after(5):
                closed = await third.receive_some(100)  # closed at once: end of stream
            for s in [*stalled, third]:
                await s.aclose()
        server_credential.close()
        return bytes(closed), seen

    closed, seen = trio.run(main)
    assert closed == b""
    assert [r.error["kind"] for r in seen] == ["unreachable", "unreachable"]  # the two stalled, timed out


def _revoke(h: Homes, victim: Path, *into: Path) -> None:
    with node.Node(victim) as n:
        victim_id = n.node_id
    h.authority.revoke(clock.now(), node_id=victim_id)
    now = clock.now()
    for home in into:
        with node.Node(home) as n:
            n.import_pack(h.authority.export_pack(h.authority.export_documents(), now), now)


def test_a_revoked_node_cannot_sync_even_with_an_svid_minted_before(tmp_path: Path) -> None:
    """Review finding: the peer check did not consult the revocation list, so a revoked (compromised)
    node holding its sync SVID synced on.  Now it is refused as revoked, audited, and gets nothing."""
    h, other = _two_nodes(tmp_path)
    stolen = _credential(other)  # minted before the revocation
    _revoke(h, other, h.node_home)
    before = _held(other)
    theirs, mine = trio.run(_run, h.node_home, other, stolen)
    assert theirs.error["kind"] == "revoked", theirs.error
    assert mine.error is not None
    assert _held(other) == before
    assert any(e["kind"] == "revoked" for e in _audit(h.node_home))


def test_a_listener_that_cannot_serve_refuses_links_and_lives_on(tmp_path: Path) -> None:
    """Review finding: an error while setting up one link (here the listening node itself is revoked,
    so its issuer mints no sync identity) ended the whole listener and the service with it."""
    h, other = _two_nodes(tmp_path)
    credential = _credential(other)
    _revoke(h, h.node_home, h.node_home)

    async def main() -> list[Any]:
        seen: list[Any] = []
        server_credential = SyncCredential(h.node_home, PASSPHRASE.encode)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(
                lambda task_status: listen(
                    h.node_home, "127.0.0.1", 0, server_credential, contacts=2,
                    on_contact=lambda p, r: seen.append(r), task_status=task_status,
                )
            )  # fmt: skip
            for _ in range(2):  # the listener answers both (and ends after 2 contacts, as asked)
                await dial(other, host, port, credential)
        server_credential.close()
        return seen

    seen = trio.run(main)
    assert [r.error["kind"] for r in seen] == ["revoked", "revoked"]


class _Counting(trio.abc.Stream):
    """The bytes a TCP stream carries both ways (for what a resumed handshake saves)."""

    def __init__(self, inner: trio.abc.Stream, counter: list[int]) -> None:
        self.inner, self.counter = inner, counter

    async def send_all(self, data: Any) -> None:
        self.counter[0] += len(data)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> Any:
        data = await self.inner.receive_some(max_bytes)
        self.counter[0] += len(data)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_dialler_resumes_its_session_and_is_checked_again_each_time(tmp_path: Path, monkeypatch: Any) -> None:
    """The second contact resumes the first one's TLS session: no certificates cross the link (under a
    third of the bytes), X25519MLKEM768 still runs.  The peer's recorded chain is checked again on
    every resumption: once the dialler is revoked, its resumed handshake is refused as ``revoked``."""
    from qhx_edge.homes.sync_session import PeerMemory

    h, other = _two_nodes(tmp_path)
    credential = _credential(other)
    counted: list[list[int]] = []
    real_open = trio.open_tcp_stream

    async def counting_open(*args: Any, **kw: Any) -> Any:
        counted.append([0])
        return _Counting(await real_open(*args, **kw), counted[-1])

    monkeypatch.setattr(trio, "open_tcp_stream", counting_open)

    async def main(revoke_after: int) -> list[Any]:
        seen: list[Any] = []
        results = []
        memory = PeerMemory()
        server_credential = SyncCredential(h.node_home, PASSPHRASE.encode)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(
                lambda task_status: listen(
                    h.node_home, "127.0.0.1", 0, server_credential, contacts=3,
                    on_contact=lambda p, r: seen.append(r), task_status=task_status,
                )
            )  # fmt: skip
            for i in range(3):
                if i == revoke_after:
                    await trio.to_thread.run_sync(_revoke, h, other, h.node_home)
                results.append(await dial(other, host, port, credential, memory=memory))
        server_credential.close()
        return [results, seen]

    mine, theirs = trio.run(main, 2)
    assert [r.resumed for r in mine[:2]] == [False, True]
    assert all(r.complete for r in mine[:2]), [r.error for r in mine]
    assert [r.resumed for r in theirs[:2]] == [False, True]
    full, resumed = counted[0][0], counted[1][0]
    assert resumed < full / 3, (full, resumed)
    assert resumed < 4096, resumed  # an in-sync contact on a resumed PQ session (issue target)
    assert mine[2].error is not None
    assert theirs[2].error["kind"] == "revoked", theirs[2].error
    assert "revocation" in _held(h.node_home)["alpha.example"]
    assert "revocation" not in _held(other)["alpha.example"]  # the refused link gave it nothing


def test_a_partner_node_syncs_only_what_the_agreement_releases(tmp_path: Path) -> None:
    """An alpha node and a beta node under an agreement (alpha accepts beta's ns/logistics, beta
    accepts alpha's ns/ops; alpha releases its bundle and freshness): each presents its sync SVID
    inside what the other's agreement accepts, the link opens, and the beta node receives alpha's new
    bundle from the alpha node but never alpha's policy, which the agreement does not release.  A
    beta identity outside the accepted prefixes is refused (``scope-violation``), audited."""
    from tests.test_federation import ALPHA, BETA, TERMS, agree, ok

    sides = {}
    for name, domain, sync_id in ((
        "alpha", ALPHA, "spiffe://alpha.example/ns/ops/sync"), ("beta", BETA, "spiffe://beta.example/ns/logistics/sync"
    )):  # fmt: skip
        h = make_homes(tmp_path / name, suite="hybrid", domain=domain, import_first=False)
        regs = [{"spiffe_id": sync_id, "selectors": [SYNC_SELECTOR]},
                {"spiffe_id": f"spiffe://{domain}/other", "selectors": ["qhx-edge:test-workload"]}]  # fmt: skip
        h.authority.publish_policy(policy_fields({"registrations": regs, "algorithms": {"/": "ES256"}}), clock.now())
        anchor = tmp_path / f"{name}.anchor"
        fp = ok("--home", h.a, "--json", "authority", "anchor", "--to", anchor)["fingerprint"]
        sides[name] = (h, (h.a, anchor, fp))
    (ha, a), (hb, b) = sides["alpha"], sides["beta"]
    agree(tmp_path, a, b, BETA, *TERMS)
    for h, partner, their in ((ha, hb, BETA), (hb, ha, ALPHA)):
        attest_node(h, h.node_home)
        theirs = tmp_path / f"{their}.pack"
        ok("--home", partner.a, "--json", "pack", "export", "--partner", h.authority.domain, "--to", theirs)
        ok("--home", h.node_home, "--json", "pack", "import", theirs)
    # alpha moves on; only the alpha node hears.
    ha.authority.publish_bundle(clock.now())
    regs = [{"spiffe_id": "spiffe://alpha.example/ns/ops/sync", "selectors": [SYNC_SELECTOR]}]
    ha.authority.publish_policy(policy_fields({"registrations": regs, "algorithms": {"/": "ES256"}}), clock.now())
    now = clock.now()
    with node.Node(ha.node_home) as n:
        n.import_pack(ha.authority.export_pack(ha.authority.export_documents(), now), now)
    alpha_held = _held(ha.node_home)[ALPHA]
    assert _held(hb.node_home)[ALPHA]["bundle"] != alpha_held["bundle"]

    theirs, mine = trio.run(_run, ha.node_home, hb.node_home, _credential(hb.node_home))
    assert mine.error is None, mine.error
    assert theirs.error is None, theirs.error
    beta_sees = _held(hb.node_home)[ALPHA]
    assert beta_sees["bundle"] == alpha_held["bundle"]  # released: relayed by the alpha node
    assert "policy" not in beta_sees  # not released: never offered
    sent = {(d["domain"], d["type"]) for d in mine.imported["documents"]}
    assert (ALPHA, "policy") not in sent, sent  # not even offered (the beta node would refuse it)
    assert not [k for k in mine.imported["counts"] if k.startswith("rejected")], mine.imported["counts"]
    # A beta identity the agreement does not accept (not under ns/logistics) opens nothing.
    theirs, mine = trio.run(_run, ha.node_home, hb.node_home, _credential(hb.node_home, "qhx-edge:test-workload"))
    assert theirs.error["kind"] == "scope-violation", theirs.error
    assert any(e["kind"] == "scope-violation" and "beta.example/other" in e["detail"] for e in _audit(ha.node_home))


def test_under_a_pq_strict_policy_a_classical_certificate_is_a_downgrade(tmp_path: Path) -> None:
    """Once the policy gives sync identities ML-DSA-65 certificates, a peer presenting a classical
    (ECDSA) sync SVID, minted before, gets ``downgrade``, audited; with its new ML-DSA SVID it syncs."""
    h, other = _two_nodes(tmp_path)
    classical = _credential(other)
    h.authority.publish_policy(policy_fields({"registrations": REGISTRATIONS, "algorithms": {"/": "ML-DSA-65"}}),
                               clock.now())  # fmt: skip
    now = clock.now()
    for home in (h.node_home, other):
        with node.Node(home) as n:
            n.import_pack(h.authority.export_pack(h.authority.export_documents(), now), now)
    theirs, mine = trio.run(_run, h.node_home, other, classical)
    assert theirs.error["kind"] == "downgrade", theirs.error
    assert any(e["kind"] == "downgrade" and "classical certificate" in e["detail"] for e in _audit(h.node_home))
    pq = _credential(other)
    assert pq.chain != classical.chain
    theirs, mine = trio.run(_run, h.node_home, other, pq)
    assert mine.error is None, mine.error
    assert theirs.complete


def test_refused_links_from_one_address_are_audited_at_a_bounded_rate() -> None:
    """A peer hammering the listener with bad handshakes gets ten audit entries a minute, then none
    until the next minute, whose first entry says how many went unaudited."""
    from qhx_edge.homes.sync_link import RefusalLog

    log = RefusalLog(per_minute=10)
    got = [log.admit("10.0.0.9", t * 0.1) for t in range(50)]
    assert [a for a, _ in got] == [True] * 10 + [False] * 40
    assert log.admit("10.0.0.8", 5.0) == (True, 0)  # another address has its own budget
    assert log.admit("10.0.0.9", 60.0) == (True, 40)


def test_a_found_address_that_never_answers_leaves_no_status_row(tmp_path: Path) -> None:
    """Review finding: a forged mDNS advertisement could make a node write a sync_peers row for any
    address it names.  A dialler of a found peer records only contacts that passed the handshake; a
    configured peer's failures are still recorded (the operator asked for that peer)."""
    import socket

    from qhx_edge.homes.sync_link import keep_dialling

    _h, other = _two_nodes(tmp_path)
    credential = _credential(other)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def attempt(record_unheard: bool) -> None:
        with trio.move_on_after(1.5):
            await keep_dialling(other, "127.0.0.1", port, lambda: credential, interval=0.1,
                                record_unheard=record_unheard)  # fmt: skip

    trio.run(attempt, False)
    with node.Node(other) as n:
        assert n.store.sync_peers() == []
    trio.run(attempt, True)
    with node.Node(other) as n:
        (row,) = n.store.sync_peers()
    assert row["failures"] >= 1


def _revoke_a_third_node(h: Homes, tmp: Path, into: Path) -> None:
    """The authority revokes a third node; only ``into`` imports it."""
    third = tmp / "N3"
    node.init(third, h.authority.anchor(), clock.now(), passphrase=PASSPHRASE.encode())
    attest_node(h, third)
    with node.Node(third) as n:
        revoked_id = n.node_id
    h.authority.revoke(clock.now(), node_id=revoked_id)
    now = clock.now()
    with node.Node(into) as n:
        n.import_pack(h.authority.export_pack(h.authority.export_documents(), now), now)


def test_a_live_link_pushes_news_without_a_new_contact(tmp_path: Path) -> None:
    """Both ends live: after the contact the link stays open; a revocation the listener's node imports
    afterwards (a pack, in another thread: the store is looked at every LIVE_POLL s) reaches the dialler
    over the same connection, imported the moment it is whole.  When the listener goes, the dialler's
    result says the contact completed and the link was live; its memory keeps what the peer held."""
    from qhx_edge.homes.sync_session import LIVE_POLL, PeerMemory

    h, other = _two_nodes(tmp_path)
    settled: list[Any] = []
    results: list[Any] = []
    memory = PeerMemory()

    async def main() -> float:
        server_credential = SyncCredential(h.node_home, PASSPHRASE.encode)
        listener_scope = trio.CancelScope()
        ready = trio.Event()

        async def run_listener(task_status: Any) -> None:
            with listener_scope:
                await listen(h.node_home, "127.0.0.1", 0, server_credential, live=True, task_status=task_status)

        def on_settled(r: Any) -> None:
            settled.append(r.to_json())
            trio.from_thread.run_sync(ready.set)

        try:
            async with trio.open_nursery() as nursery:
                host, port = await nursery.start(run_listener)

                async def dialler() -> None:
                    results.append(await dial(other, host, port, _credential(other), live=True, memory=memory,
                                              on_settled=on_settled))  # fmt: skip

                nursery.start_soon(dialler)
                with trio.fail_after(60):
                    await ready.wait()
                assert _held(other) == _held(h.node_home)  # the contact itself caught up
                await trio.to_thread.run_sync(_revoke_a_third_node, h, tmp_path, h.node_home)
                t0 = trio.current_time()
                with trio.fail_after(60):
                    while "revocation" not in _held(other)["alpha.example"]:
                        await trio.sleep(0.05)
                took = trio.current_time() - t0
                assert not results  # the same connection: the dialler's contact has not returned
                listener_scope.cancel()
        finally:
            server_credential.close()
        return took

    took = trio.run(main)
    assert took < LIVE_POLL + 10, took
    (first,) = settled
    assert first["complete"]
    assert first["live"]
    assert first["received"] >= 1
    (mine,) = results
    assert mine.error is None, mine.error
    assert mine.complete
    assert mine.live
    assert mine.received > first["received"]  # the pushed revocation (with its bundle and freshness)
    assert mine.imported["changed"]
    assert memory.peer_live
    assert memory.peer_inventory is not None
    assert memory.peer_inventory[("alpha.example", "revocation")] >= 1
    assert _held(other) == _held(h.node_home)
    # sync status counts one contact, with everything it moved (the contact's record and the live rest).
    with node.Node(other) as n:
        n.store.record_sync("p", clock.now(), first)
        n.store.record_sync("p", clock.now(), mine.to_record())
        (row,) = n.store.sync_peers()
    assert row["contacts"] == 1
    assert row["failures"] == 0
    assert row["received"] == mine.received


def test_a_live_dialler_and_a_plain_listener_make_a_plain_contact(tmp_path: Path) -> None:
    h, other = _two_nodes(tmp_path)
    theirs, mine = trio.run(functools.partial(_run, h.node_home, other, _credential(other), live=True))
    assert mine.error is None, mine.error
    assert mine.complete
    assert theirs.complete
    assert not mine.live
    assert not theirs.live
    assert _held(h.node_home) == _held(other)
