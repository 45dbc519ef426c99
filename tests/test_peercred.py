"""Workload attestation from Unix peer credentials (qhx_edge.issue.peercred)."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from qhx_edge.core.errors import AttestationFailed
from qhx_edge.issue import peercred
from qhx_edge.issue.peercred import PeerCred

NOBODY = 65534
EXE = os.path.realpath(sys.executable)


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    d = tempfile.mkdtemp(prefix="qhx-pc-")
    os.chmod(d, 0o711)  # other uids may connect
    path = os.path.join(d, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o666)
    sock.listen(8)
    sock.settimeout(30)
    yield sock, path
    sock.close()
    shutil.rmtree(d, ignore_errors=True)


def _accept_own(listener: tuple[socket.socket, str]) -> tuple[socket.socket, socket.socket]:
    sock, path = listener
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    conn, _ = sock.accept()
    return client, conn


def _own_selectors() -> frozenset[str]:
    return frozenset(
        {
            f"unix:uid:{os.geteuid()}",
            f"unix:gid:{os.getegid()}",
            f"unix:user:{pwd.getpwuid(os.geteuid()).pw_name}",
            f"unix:path:{EXE}",
            f"unix:sha256:{_sha256(EXE)}",
        }
    )


def test_selectors_of_this_process(listener: tuple[socket.socket, str]) -> None:
    client, conn = _accept_own(listener)
    with client, conn:
        att = peercred.attest(conn)
    assert att.cred == PeerCred(os.getpid(), os.geteuid(), os.getegid())
    assert att.selectors == _own_selectors()
    assert att.exe == EXE


def test_attest_if_cached_hashes_nothing_and_otherwise_agrees(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peercred, "_digests", type(peercred._digests)())  # nothing hashed yet
    client, conn = _accept_own(listener)
    with client, conn:
        assert peercred.attest_if_cached(conn) is None  # would have to hash the executable: left to a thread
        full = peercred.attest(conn)  # hashes it, and caches the digest (the interpreter is not racily new)
        assert peercred.attest_if_cached(conn) == full
    assert full.selectors == _own_selectors()


def test_without_so_peerpidfd_the_pid_is_pinned_by_pidfd_open(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peercred, "SO_PEERPIDFD", 0x7FFF)  # an option no kernel knows: ENOPROTOOPT
    client, conn = _accept_own(listener)
    with client, conn:
        att = peercred.attest(conn)
    assert not att.pinned
    assert att.selectors == _own_selectors()


def test_peer_pidfd_is_used_where_the_kernel_has_it(listener: tuple[socket.socket, str]) -> None:
    client, conn = _accept_own(listener)
    with client, conn:
        try:
            os.close(conn.getsockopt(socket.SOL_SOCKET, peercred.SO_PEERPIDFD))
        except OSError:
            pytest.skip("this kernel has no SO_PEERPIDFD (Linux < 6.5): the pidfd_open fallback applies")
        assert peercred.attest(conn).pinned


CONNECT_AS = textwrap.dedent(
    """
    import os, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    uid = int(sys.argv[2])
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    s.connect(sys.argv[1])
    print(os.getpid(), flush=True)
    if sys.argv[3] == "wait":
        sys.stdin.read()
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root (tests run as root in CI)")
def test_another_uid_has_its_own_selectors(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    # This interpreter lives under /root (0700): the child starts as root and drops to nobody itself.
    child = subprocess.Popen(
        [sys.executable, "-c", CONNECT_AS, path, str(NOBODY), "wait"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        conn, _ = sock.accept()
        assert child.stdout is not None
        pid = int(child.stdout.readline())
        with conn:
            att = peercred.attest(conn)
    finally:
        child.communicate("", timeout=30)
    assert att.cred == PeerCred(pid, NOBODY, NOBODY)
    assert att.selectors == {
        f"unix:uid:{NOBODY}",
        f"unix:gid:{NOBODY}",
        f"unix:user:{pwd.getpwuid(NOBODY).pw_name}",
        f"unix:path:{EXE}",
        f"unix:sha256:{_sha256(EXE)}",
    }
    assert att.selectors != _own_selectors()


@pytest.mark.parametrize("pin", ["SO_PEERPIDFD", "pidfd_open"])
def test_a_caller_that_exited_is_refused(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch, pin: str
) -> None:
    """The pid of an exited caller may name another process by now: nothing is read from /proc."""
    if pin == "pidfd_open":
        monkeypatch.setattr(peercred, "SO_PEERPIDFD", 0x7FFF)
    sock, path = listener
    child = subprocess.run(
        [sys.executable, "-c", CONNECT_AS, path, "-1", "exit"], capture_output=True, text=True, check=True
    )
    conn, _ = sock.accept()  # queued by a process that has exited and been reaped
    with conn:
        assert peercred.peer_cred(conn).pid == int(child.stdout)
        with pytest.raises(AttestationFailed, match="exited"):
            peercred.attest(conn)


def test_selectors_only_shrink_with_missing_information() -> None:
    cred = PeerCred(0, 1000, 1000)
    assert peercred.selectors(cred, user=None, exe=None, sha256=None) == {"unix:uid:1000", "unix:gid:1000"}
    full = peercred.selectors(cred, user="alice", exe="/bin/x", sha256="ab")
    assert full == {"unix:uid:1000", "unix:gid:1000", "unix:user:alice", "unix:path:/bin/x", "unix:sha256:ab"}


def test_a_socketpair_from_another_pid_namespace_gives_uid_and_gid_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peercred, "peer_cred", lambda sock: PeerCred(0, 1234, 5678))
    a, b = socket.socketpair()
    with a, b:
        att = peercred.attest(a)
    assert att.selectors == {"unix:uid:1234", "unix:gid:5678"}  # uid 1234 has no passwd entry here


def test_peer_credentials_need_a_unix_socket() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(AttestationFailed):
        peercred.peer_cred(s)


def test_digest_cap_cache_and_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "prog"
    path.write_bytes(b"#!/bin/sh\necho one\n")

    def digest() -> str | None:
        fd = os.open(path, os.O_RDONLY)
        try:
            return peercred._digest(fd, os.fstat(fd))
        finally:
            os.close(fd)

    peercred._digests.clear()
    assert digest() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not peercred._digests  # just written: racily clean, so not cached
    monkeypatch.setattr(peercred, "RACY_SECONDS", -1.0)
    assert digest() is not None
    assert len(peercred._digests) == 1
    path.write_bytes(b"#!/bin/sh\necho two\n")  # a new mtime and ctime: a new key
    assert digest() == hashlib.sha256(b"#!/bin/sh\necho two\n").hexdigest()
    monkeypatch.setattr(peercred, "MAX_EXECUTABLE_SIZE", 4)
    peercred._digests.clear()
    assert digest() is None  # too large to hash: no sha256 selector
    peercred._digests.clear()
