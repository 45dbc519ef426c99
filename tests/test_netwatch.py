"""Network changes wake serve's diallers (qhx_edge/links/netwatch.py, homes/sync_link.py).

* In a network namespace this test creates and removes (as root), a link change (``lo`` set up) wakes
  :func:`netwatch.watch` within its settle time.
* A dialler backing off from a failed attempt dials again at once when the network changes, not at its
  next retry.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from qhx_edge.homes.sync_link import keep_dialling
from qhx_edge.homes.sync_session import News
from tests.conftest import ROOT, need

WATCHER = """
import sys, trio
from qhx_edge.links import netwatch

async def main():
    changed = trio.Event()
    async with trio.open_nursery() as nursery:
        ok = await nursery.start(netwatch.watch, changed.set)
        print("watching" if ok else "cannot", flush=True)
        with trio.fail_after(30):
            await changed.wait()
        print("changed", flush=True)
        nursery.cancel_scope.cancel()

trio.run(main)
"""


def test_a_link_change_in_the_nodes_namespace_wakes_the_watch(tmp_path: Path) -> None:
    need(os.geteuid() == 0 and shutil.which("ip") is not None, "network namespaces need root and iproute2")
    ns = f"qhxnw{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        script = tmp_path / "watch.py"
        script.write_text(WATCHER)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(script)], stdout=subprocess.PIPE,
                              text=True, env=env) as proc:  # fmt: skip
            assert proc.stdout is not None
            try:
                assert proc.stdout.readline().strip() == "watching"
                time.sleep(0.5)
                assert proc.poll() is None  # nothing changed yet: still waiting
                t0 = time.monotonic()
                subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
                assert proc.stdout.readline().strip() == "changed"
                assert time.monotonic() - t0 < 5
                assert proc.wait(timeout=10) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


def test_a_dialler_backing_off_dials_again_when_the_network_changes(tmp_path: Path) -> None:
    """Nothing listens on the port: every attempt fails and the dialler backs off (2.5 to 5 s after the
    first failure).  A network change 1.2 s in brings the second attempt at once (a storm of changes
    brings at most one attempt a second)."""
    attempts: list[float] = []

    async def main() -> None:
        network = News()
        with trio.socket.socket() as s:  # a port nothing listens on
            await s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]

        def no_credential() -> Any:  # the link fails before TLS: no credential is needed
            return None

        def report(peer: str, result: Any) -> None:
            assert result.error is not None
            attempts.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(
                keep_dialling, tmp_path, "127.0.0.1", port, no_credential, report=report, record_unheard=False,
                network=network,
            ))  # fmt: skip
            with trio.fail_after(10):
                while not attempts:
                    await trio.sleep(0.01)
            await trio.sleep(0.5)
            assert len(attempts) == 1  # backing off
            network.publish()
            woke = trio.current_time()
            with trio.fail_after(2):
                while len(attempts) < 2:
                    await trio.sleep(0.01)
            assert attempts[1] - woke < 1.0
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_an_overflow_of_the_watch_socket_is_news_not_the_end_of_sync() -> None:
    """Review finding: a burst of routes overflowed the netlink socket (ENOBUFS), the error ended the
    watch and, with it, the listener and every dialler of serve.  Now an overflow counts as a change."""
    import errno

    from qhx_edge.links import netwatch

    class Overflowing:
        def __init__(self) -> None:
            self.calls = 0

        async def recv(self, size: int) -> bytes:
            self.calls += 1
            if self.calls == 1:
                raise OSError(errno.ENOBUFS, "No buffer space available")
            return b"msg"

    async def main() -> None:
        sock = Overflowing()
        await netwatch._message(sock)  # type: ignore[arg-type]  # returns: the overflow is news
        await netwatch._message(sock)  # type: ignore[arg-type]
        assert sock.calls == 2

    trio.run(main)


def test_memories_of_an_address_are_of_one_node() -> None:
    """Review finding: what a listener remembered of one node (that it speaks live, what it holds) was
    keyed by address, and applied to another node at the same address.  Now it is keyed by the peer's
    node, and a dialler's memory is emptied when another node answers its address."""
    from qhx_edge.core import sync
    from qhx_edge.homes.sync_link import remembered
    from qhx_edge.homes.sync_session import PeerMemory

    memory = PeerMemory(identity=b"a" * 32, peer_live=True, peer_inventory={("alpha.example", "root"): 1},
                        partials={b"x" * 32: sync.Partial(10, b"12345")})  # fmt: skip
    assert remembered(memory, b"a" * 32).peer_live  # the same node: kept
    other = remembered(memory, b"b" * 32)
    assert (other.peer_live, other.peer_inventory, other.partials, other.identity) == (False, None, {}, b"b" * 32)
