"""Workload attestation from Unix peer credentials (issue 4, point 3; docs/issuance.md §3).

The kernel records who connected a Unix stream socket: ``SO_PEERCRED`` gives the
pid, effective uid and effective gid of the process that called ``connect()``,
as they were when it did.  From those this module derives the caller's selectors::

    unix:uid:N   unix:gid:N   unix:user:NAME   unix:path:/abs/exe   unix:sha256:HEX

uid and gid come from the kernel and cannot be forged by the caller; ``user`` is
the passwd name of that uid.  ``path`` and ``sha256`` describe the program the
caller runs and are read from ``/proc/PID``, which is where the care goes.

Pid reuse.  A pid names a process only while it lives: once the caller exits
and its pid is recycled, ``/proc/PID`` describes a stranger.  So:

1. the caller's pidfd is taken from the socket itself (``SO_PEERPIDFD``, Linux
   6.5+): it refers to the connecting process, not to a number;
2. ``/proc/PID`` is opened as a directory, and only *then* is the pidfd checked
   to be still running.  A running process keeps its pid, so the directory
   opened before the check is the caller's, and every later read goes through
   that directory fd, which fails (rather than follows the number) once the
   caller is gone;
3. after reading, the pidfd is checked again: a caller that exited meanwhile
   is refused with :class:`~qhx_edge.core.errors.AttestationFailed`.

Without ``SO_PEERPIDFD`` (older kernels) the pidfd comes from ``pidfd_open(pid)``
right after accept and ``/proc/PID/status`` must show the socket's uid and gid:
a short window remains between the caller's exit and that call, the same one
SPIRE's unix attestor has.

Executable.  The digest is of the file the process executes, opened through
``/proc/PID/exe`` (renaming or replacing the path on disk changes nothing), read
up to :data:`MAX_EXECUTABLE_SIZE` (a larger program gets no ``sha256``
selector).  Digests are cached by (device, inode, size, mtime, ctime), but only
when the file's stat did not change while it was read and its ctime is older
than :data:`RACY_SECONDS` -- git's "racily clean" rule: a change within the
same timestamp tick would not show in the key.

Residual risks, shared with every ``SO_PEERCRED`` attestor (SPIRE's unix
attestor included): a process can connect and then ``execve`` another program
before ``/proc/PID/exe`` is read (attestation runs at accept time to keep that
window short); a process can pass its connected socket to another one; root and
the server's own uid are trusted.  Missing information (a pid from another pid
namespace, an unreadable ``/proc`` entry, an unknown uid) only *removes*
selectors: a registration matches when all its selectors are present, so less
information can only match less.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pwd
import select
import socket
import stat
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from qhx_edge.core.errors import AttestationFailed

SO_PEERPIDFD: int = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5+; Python names it from 3.14 only
MAX_EXECUTABLE_SIZE = 256 << 20
RACY_SECONDS = 2.0
_CHUNK = 1 << 20
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_CACHE_SIZE = 512

_digests: OrderedDict[tuple[int, ...], str] = OrderedDict()
_digests_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class PeerCred:
    """What ``SO_PEERCRED`` reports: the caller as of its ``connect()``."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Attestation:
    """What is known about one caller, read once at accept time."""

    cred: PeerCred
    user: str | None
    exe: str | None
    sha256: str | None
    pinned: bool  # the pid was pinned by SO_PEERPIDFD (not by a later pidfd_open)

    @property
    def selectors(self) -> frozenset[str]:
        return selectors(self.cred, user=self.user, exe=self.exe, sha256=self.sha256)


def selectors(cred: PeerCred, *, user: str | None, exe: str | None, sha256: str | None) -> frozenset[str]:
    out = {f"unix:uid:{cred.uid}", f"unix:gid:{cred.gid}"}
    if user is not None:
        out.add(f"unix:user:{user}")
    if exe is not None:
        out.add(f"unix:path:{exe}")
    if sha256 is not None:
        out.add(f"unix:sha256:{sha256}")
    return frozenset(out)


def peer_cred(sock: socket.socket) -> PeerCred:
    """The kernel's record of who connected ``sock`` (a connected AF_UNIX stream socket)."""
    if sock.family != socket.AF_UNIX:
        raise AttestationFailed("peer credentials need a Unix socket")
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid, uid, gid)


class _NotCached(Exception):
    """The executable's digest is not cached: hashing it may take long (see attest_if_cached)."""


def attest(sock: socket.socket) -> Attestation:
    """Attest the process that connected ``sock``; blocking (reads /proc and hashes a file).

    Raises :class:`AttestationFailed` when the caller is gone before its
    attestation is complete.
    """
    return _attest(sock, cached_only=False)


def attest_if_cached(sock: socket.socket) -> Attestation | None:
    """:func:`attest`, but None instead of hashing an executable whose digest is not cached.

    What is left is a few system calls on the socket, the pidfd and ``/proc``
    (and the passwd lookup of the uid), so an event loop may call it at accept
    time and hand only the rest to a thread.
    """
    try:
        return _attest(sock, cached_only=True)
    except _NotCached:
        return None


def _attest(sock: socket.socket, *, cached_only: bool) -> Attestation:
    cred = peer_cred(sock)
    user = _user_name(cred.uid)
    if cred.pid <= 0:  # connected from another pid namespace: uid and gid only
        return Attestation(cred, user, None, None, pinned=False)
    pidfd, pinned = _pidfd(sock, cred.pid)
    if pidfd is None:  # no pidfd support: the pid cannot be pinned, so nothing is read from /proc
        return Attestation(cred, user, None, None, pinned=False)
    try:
        try:
            proc = os.open(f"/proc/{cred.pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise AttestationFailed("the caller exited before attestation") from exc
        try:
            _require_running(pidfd)  # from here on, `proc` is the caller's directory
            if not pinned:
                _require_ids(proc, cred)
            exe, digest = _executable(proc, cached_only)
            _require_running(pidfd)
        finally:
            os.close(proc)
    finally:
        os.close(pidfd)
    return Attestation(cred, user, exe, digest, pinned=pinned)


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _pidfd(sock: socket.socket, pid: int) -> tuple[int | None, bool]:
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD), True
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise AttestationFailed("the caller exited before attestation") from exc
        if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    try:
        return os.pidfd_open(pid), False
    except ProcessLookupError as exc:
        raise AttestationFailed("the caller exited before attestation") from exc
    except OSError:
        return None, False


def _require_running(pidfd: int) -> None:
    # A pidfd polls readable once its process has exited (pidfd_open(2)).
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    if poller.poll(0):
        raise AttestationFailed("the caller exited during attestation")


def _require_ids(proc: int, cred: PeerCred) -> None:
    """Fallback pinning: the process at this pid must have the socket's effective uid and gid."""
    try:
        fd = os.open("status", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
        try:
            text = os.read(fd, 1 << 16).decode("utf-8", "replace")
        finally:
            os.close(fd)
    except OSError as exc:
        raise AttestationFailed("cannot read the caller's process status") from exc
    ids = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid"):
            fields = value.split()
            ids[key] = int(fields[1]) if len(fields) > 1 else -1  # effective id
    if ids.get("Uid") != cred.uid or ids.get("Gid") != cred.gid:
        raise AttestationFailed("the process at the caller's pid is not the caller")


def _executable(proc: int, cached_only: bool = False) -> tuple[str | None, str | None]:
    """(absolute path, SHA-256 hex) of the program running in ``proc``; None where unknown."""
    try:
        target = os.readlink("exe", dir_fd=proc)
        fd = os.open("exe", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
    except OSError:  # a kernel thread, no permission, or the caller is gone (checked after)
        return None, None
    try:
        st = os.fstat(fd)
        path: str | None = target if target.startswith("/") else None
        if path is not None and st.st_nlink == 0 and path.endswith(" (deleted)"):
            path = None  # the file was unlinked: the kernel's marker is not part of any path
        return path, _digest(fd, st, cached_only)
    finally:
        os.close(fd)


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _digest(fd: int, st: os.stat_result, cached_only: bool = False) -> str | None:
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_EXECUTABLE_SIZE:
        return None
    key = _stat_key(st)
    with _digests_lock:
        hit = _digests.get(key)
        if hit is not None:
            _digests.move_to_end(key)
            return hit
    if cached_only:
        raise _NotCached
    h = hashlib.sha256()
    total = 0
    while chunk := os.read(fd, _CHUNK):
        total += len(chunk)
        if total > MAX_EXECUTABLE_SIZE:
            return None
        h.update(chunk)
    if _stat_key(os.fstat(fd)) != key:
        return None  # changed while being read: no trustworthy digest
    digest = h.hexdigest()
    if time.time_ns() - st.st_ctime_ns > RACY_SECONDS * 1e9:
        with _digests_lock:
            _digests[key] = digest
            while len(_digests) > _CACHE_SIZE:
                _digests.popitem(last=False)
    return digest
