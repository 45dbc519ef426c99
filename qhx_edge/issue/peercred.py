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

Executable.  ``path`` and ``sha256`` name a program as *this server* sees the
file system, so they are attested only for a caller that shares the server's
mount namespace and root directory (``/proc/PID/ns/mnt`` and ``/proc/PID/root``
against our own, read through the pinned ``/proc/PID`` directory): in a
mount namespace of its own (a user namespace lets any user make one) a bind
mount can put any program at ``/usr/bin/sleep``, and a chroot gives paths
another meaning.  Such a caller gets no ``path`` or ``sha256``, as a caller in
another pid namespace gets none.

The executable is pinned at accept time by :func:`probe` (a few system calls,
fit for an event loop): ``/proc/PID/exe`` is opened and its stat recorded, so
what is attested is the program the caller ran *then*, however long hashing it
waits for a thread.  The digest is of that open file (renaming or replacing the
path on disk changes nothing), read up to :data:`MAX_EXECUTABLE_SIZE` (a
larger program gets no ``sha256`` selector) by :meth:`Probe.finish`.  Digests
are cached by (device, inode, size, mtime, ctime), but only when the file's
stat did not change while it was read and its ctime is older than
:data:`RACY_SECONDS` -- git's "racily clean" rule: a change within the same
timestamp tick would not show in the key.

Exec before the first call.  :func:`recheck` is called when a connection's
first call arrives: the caller must still run the executable pinned at accept
(same stat), else :class:`~qhx_edge.core.errors.AttestationFailed`.  A program
that connects and then execs another before calling cannot pass the first one's
selectors to the second.

Residual risks, shared with every ``SO_PEERCRED`` attestor (SPIRE's unix
attestor included): a process that execs another program *after* its first
call, or passes its connected socket to another process (``SCM_RIGHTS``, or
inheritance by a child), lends its identity to that program; root and the
server's own uid are trusted.  Missing information (a pid from another pid
namespace, another mount namespace or root, an unreadable ``/proc`` entry, an
unknown uid) only *removes* selectors: a registration matches when all its
selectors are present, so less information can only match less.
"""

from __future__ import annotations

import dataclasses
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
    """What is known about one caller, read at accept time."""

    cred: PeerCred
    user: str | None
    exe: str | None
    sha256: str | None
    pinned: bool  # the pid was pinned by SO_PEERPIDFD (not by a later pidfd_open)
    exe_key: tuple[int, ...] | None = None  # the pinned executable's stat key (see recheck)

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


class Probe:
    """What :func:`probe` read at accept time: a complete attestation, or one whose executable (already
    opened and pinned) still has to be hashed by :meth:`finish`, which may block.

    A probe that is never finished must be closed (it holds the executable open)."""

    __slots__ = ("_fd", "_partial", "_st")

    def __init__(self, partial: Attestation, fd: int | None = None, st: os.stat_result | None = None) -> None:
        self._partial = partial
        self._fd = fd
        self._st = st

    @property
    def done(self) -> Attestation | None:
        """The attestation, if nothing is left to hash."""
        return self._partial if self._fd is None else None

    @property
    def partial(self) -> Attestation:
        """The attestation without the digest still to be computed (its executable already pinned)."""
        return self._partial

    @property
    def uid(self) -> int:
        return self._partial.cred.uid

    def finish(self) -> Attestation:
        """The attestation, hashing the pinned executable if its digest is not cached (blocking)."""
        fd, st = self._fd, self._st
        if fd is None or st is None:
            return self._partial
        self._fd = None
        try:
            digest = _digest(fd, st)
        finally:
            os.close(fd)
        return dataclasses.replace(self._partial, sha256=digest)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def attest(sock: socket.socket) -> Attestation:
    """Attest the process that connected ``sock``; blocking (reads /proc and hashes a file).

    Raises :class:`AttestationFailed` when the caller is gone before its
    attestation is complete.
    """
    return probe(sock).finish()


def attest_if_cached(sock: socket.socket) -> Attestation | None:
    """:func:`attest`, but None instead of hashing an executable whose digest is not cached."""
    p = probe(sock)
    done = p.done
    if done is None:
        p.close()
    return done


def probe(sock: socket.socket) -> Probe:
    """Everything about the caller of ``sock`` but the hashing of an executable whose digest is not
    cached: a few system calls on the socket, the pidfd and ``/proc`` (and the passwd lookup of the
    uid), so an event loop may call it at accept time and hand only :meth:`Probe.finish` to a thread.
    The executable is opened here: what is hashed later is the program the caller ran now."""
    cred = peer_cred(sock)
    user = _user_name(cred.uid)
    bare = Attestation(cred, user, None, None, pinned=False)
    if cred.pid <= 0:  # connected from another pid namespace: uid and gid only
        return Probe(bare)
    pidfd, pinned = _pidfd(sock, cred.pid)
    if pidfd is None:  # no pidfd support: the pid cannot be pinned, so nothing is read from /proc
        return Probe(bare)
    fd: int | None = None
    try:
        try:
            proc = os.open(f"/proc/{cred.pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise AttestationFailed("the caller exited before attestation") from exc
        try:
            _require_running(pidfd)  # from here on, `proc` is the caller's directory
            if not pinned:
                _require_ids(proc, cred)
            path: str | None = None
            st: os.stat_result | None = None
            if _shares_our_view(proc):
                path, fd, st = _executable(proc)
            _require_running(pidfd)
        finally:
            os.close(proc)
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    finally:
        os.close(pidfd)
    att = Attestation(cred, user, path, None, pinned=pinned, exe_key=_stat_key(st) if st is not None else None)
    if fd is None or st is None:
        return Probe(att)
    cached = _cached_digest(st)
    if cached is not None or not _hashable(st):
        os.close(fd)
        return Probe(dataclasses.replace(att, sha256=cached))
    return Probe(att, fd, st)


def recheck(sock: socket.socket, attestation: Attestation) -> None:
    """At a connection's first call: the caller must still run the executable pinned at accept.

    Raises :class:`AttestationFailed` if it exec'd another program meanwhile (or exited).  A caller
    whose executable was not attested (another pid, mount namespace or root; no pidfd) has no program
    selectors to lend, and is not checked."""
    if attestation.exe_key is None:
        return
    cred = peer_cred(sock)
    pidfd, _ = _pidfd(sock, cred.pid)
    if pidfd is None:
        raise AttestationFailed("the caller can no longer be pinned")
    try:
        try:
            proc = os.open(f"/proc/{cred.pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise AttestationFailed("the caller exited before its first call was served") from exc
        try:
            _require_running(pidfd)
            if not attestation.pinned:
                _require_ids(proc, cred)
            try:
                now = _stat_key(os.stat("exe", dir_fd=proc))
            except OSError as exc:
                raise AttestationFailed("the caller's executable cannot be read again") from exc
            _require_running(pidfd)
        finally:
            os.close(proc)
    finally:
        os.close(pidfd)
    if now != attestation.exe_key:
        raise AttestationFailed("the caller runs another executable than when it connected")


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


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _shares_our_view(proc: int) -> bool:
    """Whether the process of ``proc`` sees the file system as we do: our mount namespace, our root."""
    try:
        mnt, root = os.stat("ns/mnt", dir_fd=proc), os.stat("root", dir_fd=proc)
        own_mnt, own_root = os.stat("/proc/self/ns/mnt"), os.stat("/")
    except OSError:  # no permission (ptrace access mode), or the caller is gone (checked after)
        return False
    return _same_file(mnt, own_mnt) and _same_file(root, own_root)


def _executable(proc: int) -> tuple[str | None, int | None, os.stat_result | None]:
    """(absolute path, an open descriptor, its stat) of the program running in ``proc``; None where unknown."""
    try:
        target = os.readlink("exe", dir_fd=proc)
        fd = os.open("exe", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
    except OSError:  # a kernel thread, no permission, or the caller is gone (checked after)
        return None, None, None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None, None, None
    path: str | None = target if target.startswith("/") else None
    if path is not None and st.st_nlink == 0 and path.endswith(" (deleted)"):
        path = None  # the file was unlinked: the kernel's marker is not part of any path
    return path, fd, st


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _hashable(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_size <= MAX_EXECUTABLE_SIZE


def _cached_digest(st: os.stat_result) -> str | None:
    key = _stat_key(st)
    with _digests_lock:
        hit = _digests.get(key)
        if hit is not None:
            _digests.move_to_end(key)
        return hit


def _digest(fd: int, st: os.stat_result) -> str | None:
    if not _hashable(st):
        return None
    hit = _cached_digest(st)
    if hit is not None:
        return hit
    key = _stat_key(st)
    h = hashlib.sha256()
    total = 0
    while chunk := os.pread(fd, _CHUNK, total):
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
