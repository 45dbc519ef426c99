"""``pack watch``: import the packs that appear in a drop folder or on a USB stick.

The watcher polls one directory (no inotify: it has to work on any mount, and
a stick may come and go) and looks at the regular files directly in it, except
hidden and temporary names (``.NAME.xxxx.tmp`` is what our own atomic writer
uses; ``*.part``, ``*.tmp``, ``*~`` and the like are what copy tools and
browsers use) and except the ``imported/`` and ``rejected/`` folders it fills
itself.  Symbolic links, FIFOs and devices are never read.

A file is considered only once it is *stable*: its size and modification time
unchanged for ``settle`` seconds of the watcher's own observation.  Then:

* its SHA-256 equals a pack already imported (``packs_seen.digest`` in the
  store, or a file this node's watcher handled before, which covers sealed
  packs whose outer bytes differ from the inner pack): it is a **duplicate**,
  moved to ``imported/`` without importing again;
* it ends early (:class:`~qhx_edge.core.errors.Incomplete`) but begins as a pack or
  a sealed pack does: its writer may still be writing, so it stays where it
  is until it changes, or is **rejected** as incomplete once it has not
  changed for ``incomplete_timeout`` seconds.  Bytes that end early but do not
  begin like a pack are garbage and rejected at once;
* otherwise it is imported with :meth:`Node.import_pack`.  Anything applied:
  moved to ``imported/`` (with the rejected documents, if any, listed);
  nothing applied because of a rejection: moved to ``rejected/``; every
  document already held: ``imported/``.  An environment error (a locked
  store, an I/O error on the stick) leaves the file in place to be retried.

Every move writes ``NAME.reason`` first (atomically), then renames the pack
within the same filesystem (``os.replace``) and fsyncs both directories; an
existing name in ``imported/`` or ``rejected/`` is never overwritten (a
``-N`` suffix is added).  So a file in those folders always has its reason,
and a pulled stick holds each file in exactly one place.

Whoever can write to the folder (the courier who carried the stick) must not
be able to make the watcher read, write or move anything elsewhere, nor hang
it (docs/architecture.md "Packs, cards and sealing"):

* everything is done relative to a descriptor of the watched folder, opened
  anew at every poll (holding it would keep a pulled stick's mount busy);
* ``imported/`` and ``rejected/`` must be real directories of the watched
  folder: opened with ``O_NOFOLLOW`` and on the same device, else the file
  stays in place and the watcher says ``unsafe-path`` (once);
* a pack file is opened ``O_NOFOLLOW | O_NONBLOCK`` and checked with
  ``fstat`` against what the scan saw: a link or a FIFO swapped in after the
  scan is never followed or waited on, so SIGTERM always stops the watcher;
* a move that fails (another file system, a read-only stick) removes the
  reason file it wrote, is reported once, and is retried only every
  ``move_retry`` seconds.

Time, sleeping and the wall clock are injected, so the stability and
incomplete-timeout rules are tested without waiting.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import signal
import sqlite3
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from qhx_edge.core import cbor
from qhx_edge.core.errors import (
    EnvironmentFault,
    Incomplete,
    Malformed,
    MissingFile,
    Oversize,
    Rejected,
    UnsafePath,
    printable,
)
from qhx_edge.homes.node import ImportRejected, ImportResult, Node
from qhx_edge.packs import pack, seal
from qhx_edge.store import clock

IMPORTED = "imported"
REJECTED = "rejected"
REASON_SUFFIX = ".reason"
TEMPORARY_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".download", "~")
FINAL = ("imported", "duplicate", "rejected")
_SLEEP_SLICE = 0.1


# --- telling a pack still being written from garbage --------------------------------------

# How every pack and sealed pack begins: a pack's outer map header and first
# key (deterministic CBOR), a sealed pack's magic text item.
_PACK_HEAD: tuple[int | None, ...] = (0xA4, *cbor.encode("format"), *cbor.encode(pack.FORMAT))
_SEALED_HEAD: tuple[int | None, ...] = tuple(seal.MAGIC)


def could_be_pack(data: bytes) -> bool:
    """Whether ``data`` begins as a pack or a sealed pack does (as far as it goes).

    Only this makes a file that ends early worth waiting for: random bytes
    often "end early" too (a header announcing a long string), and those are
    garbage to reject at once, not a writer to wait for.
    """
    for head in (_PACK_HEAD, _SEALED_HEAD):
        n = min(len(data), len(head))
        if all(h is None or h == b for h, b in zip(head[:n], data[:n], strict=True)):
            return True
    return False


def ignored(name: str) -> bool:
    """Hidden and temporary names: never read, never moved."""
    return name.startswith(".") or name.endswith(TEMPORARY_SUFFIXES)


_printable = printable


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One line of the watcher's log.

    ``event`` is one of: ``watching`` (start), ``imported``, ``duplicate``,
    ``rejected`` (the three final outcomes of a file), ``incomplete`` (a file
    that ends early, waited for), ``deferred`` (an environment error; the
    file stays and is retried), ``unavailable``/``available`` (the directory
    went away or came back), ``stopped`` (the final line).
    """

    event: str
    file: str | None = None
    message: str = ""
    kind: str | None = None
    moved_to: str | None = None
    sha256: str | None = None
    report: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.event not in ("rejected", "deferred", "unavailable")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "event": self.event, "message": self.message, **self.extra}
        if self.file is not None:
            out["file"] = self.file
        if self.moved_to is not None:
            out["moved_to"] = self.moved_to
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        if self.kind is not None and not self.ok:
            out["error"] = {"kind": self.kind, "message": self.message}
        elif self.kind is not None:
            out["kind"] = self.kind
        if self.report is not None:
            out["report"] = self.report
        return out

    def text(self) -> str:
        where = f" {_printable(self.file)}" if self.file is not None else ""
        to = f" -> {_printable(self.moved_to)}" if self.moved_to is not None else ""
        return f"{self.event}{where}{to}: {_printable(self.message)}"


# --- the watcher -------------------------------------------------------------------------------


Signature = tuple[int, int, int]  # size, mtime in ns, inode


@dataclass
class _Tracked:
    sig: Signature
    since: float  # monotonic time the file was last seen to change (or first seen)
    waiting: bool = False  # ends early at this signature: wait for a change or the timeout
    announced: str | None = None  # the last incomplete/deferred message logged (log once, not every poll)
    retry_at: float = 0.0  # a failed move is tried again no sooner than this


@dataclass(frozen=True)
class _Outcome:
    event: str  # imported | duplicate | rejected
    folder: str
    message: str  # the event's message
    reason: str  # the reason file's text
    kind: str | None = None
    report: dict[str, Any] | None = None


class Watcher:
    """Poll ``directory`` and import what settles there into ``node``."""

    def __init__(
        self,
        directory: Path,
        node: Node,
        *,
        settle: float = 2.0,
        interval: float = 1.0,
        incomplete_timeout: float = 600.0,
        emit: Callable[[Event], None] = lambda _event: None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        wall: Callable[[], int] = clock.now,
        move_retry: float = 60.0,
    ) -> None:
        self.dir = Path(directory)
        self.move_retry = move_retry
        self.node = node
        self.settle = settle
        self.interval = interval
        self.incomplete_timeout = incomplete_timeout
        self._emit = emit
        self._monotonic = monotonic
        self._sleep = sleep
        self._wall = wall
        self._files: dict[str, _Tracked] = {}
        self._unmoved: dict[tuple[str, bytes], _Outcome] = {}  # handled, but the move failed: retry it alone
        self._dfd: int | None = None  # the watched folder, open during one poll
        self._unavailable = False
        self.counts: Counter[str] = Counter()

    # --- the loop ----------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool]) -> None:
        """Poll every ``interval`` seconds until ``should_stop()``."""
        while not should_stop():
            self.poll()
            self._sleep_until(self._monotonic() + self.interval, should_stop)

    def run_once(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """One pass: wait (at most twice ``settle`` plus two intervals) for the present files to settle."""
        deadline = self._monotonic() + 2 * self.settle + 2 * self.interval
        while not should_stop():
            self.poll()
            now = self._monotonic()
            if not self.pending() or now >= deadline:
                return
            self._sleep_until(min(now + self.interval, deadline), should_stop)

    def pending(self) -> bool:
        """Whether a file is still settling or waiting to be retried (not merely waiting to grow)."""
        return any(not t.waiting for t in self._files.values())

    def _sleep_until(self, until: float, should_stop: Callable[[], bool]) -> None:
        while not should_stop():
            left = until - self._monotonic()
            if left <= 0:
                return
            self._sleep(min(left, _SLEEP_SLICE))

    def emit(self, event: Event) -> None:
        if event.event in FINAL:
            self.counts[event.event] += 1
        self._emit(event)

    # --- one poll ------------------------------------------------------------------------

    def _scan(self, dfd: int) -> dict[str, Signature]:
        found: dict[str, Signature] = {}
        with os.scandir(dfd) as entries:
            for entry in entries:
                if ignored(entry.name):
                    continue
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):  # not a link, FIFO, device or directory
                    found[entry.name] = (st.st_size, st.st_mtime_ns, st.st_ino)
        return found

    def poll(self) -> None:
        """Look at the directory once and handle every file that has settled."""
        now = self._monotonic()
        try:
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:  # the stick was pulled or unmounted: wait for it
            self._gone(exc)
            return
        try:
            self._dfd = dfd
            self._poll(dfd, now)
        finally:
            self._dfd = None
            os.close(dfd)

    def _gone(self, exc: OSError) -> None:
        if not self._unavailable:
            self._unavailable = True
            self.emit(Event("unavailable", message=f"{self.dir}: {exc.strerror or exc}", kind="os-error"))

    def _poll(self, dfd: int, now: float) -> None:
        try:
            found = self._scan(dfd)
        except OSError as exc:  # the stick was pulled or unmounted: wait for it
            self._gone(exc)
            return
        if self._unavailable:
            self._unavailable = False
            self.emit(Event("available", message=str(self.dir)))
        for name in list(self._files):
            if name not in found:
                del self._files[name]
        for name, sig in sorted(found.items()):
            tracked = self._files.get(name)
            if tracked is None or tracked.sig != sig:
                announced = tracked.announced if tracked is not None else None
                self._files[name] = _Tracked(sig, now, announced=announced)
                continue
            quiet = now - tracked.since
            if quiet < self.settle:
                continue
            if tracked.waiting and quiet < self.incomplete_timeout:
                continue
            if now < tracked.retry_at:
                continue
            self._handle(dfd, name, tracked, now)

    # --- one file --------------------------------------------------------------------------

    def _handle(self, dfd: int, name: str, tracked: _Tracked, now: float) -> None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as exc:  # gone, or swapped for a link (ELOOP) since the scan: look again next poll
            self._files.pop(name, None)
            if exc.errno not in (errno.ENOENT, errno.ELOOP):
                self._defer(name, tracked, exc)
            return
        try:
            self._handle_open(fd, name, tracked, now)
        finally:
            os.close(fd)

    def _as_scanned(self, fd: int, name: str, tracked: _Tracked, now: float) -> bool:
        """Whether the open file is the regular file the scan saw (else forget it, or let it settle again)."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device swapped in after the scan: never read
            self._files.pop(name, None)
            return False
        if (st.st_size, st.st_mtime_ns, st.st_ino) != tracked.sig:  # changed under us: settle again
            self._files[name] = _Tracked((st.st_size, st.st_mtime_ns, st.st_ino), now, announced=tracked.announced)
            return False
        return True

    def _handle_open(self, fd: int, name: str, tracked: _Tracked, now: float) -> None:
        try:
            if not self._as_scanned(fd, name, tracked, now):
                return
            data = _read_capped(fd, MAX_FILE)
        except Rejected as exc:  # larger than any pack may be
            self._finish(fd, name, tracked, None, self._rejected(name, None, exc))
            return
        except (EnvironmentFault, OSError) as exc:
            self._defer(name, tracked, exc)
            return
        digest = hashlib.sha256(data).digest()
        unmoved = self._unmoved.get((name, digest))
        if unmoved is not None:
            self._finish(fd, name, tracked, digest, unmoved)
            return
        timed_out = tracked.waiting
        if not data or self._ends_early(data):
            if not timed_out:
                self._wait(name, tracked, len(data))
                return
        else:
            timed_out = False
        try:
            outcome = self._duplicate(name, digest) or self._import(name, data, digest, timed_out)
        except (EnvironmentFault, OSError, sqlite3.OperationalError) as exc:
            self._defer(name, tracked, exc)
            return
        self._finish(fd, name, tracked, digest, outcome)

    def _ends_early(self, data: bytes) -> bool:
        """Whether ``data`` is an incomplete pack worth waiting for (not garbage that ends early)."""
        try:
            if seal.is_sealed(data):
                seal.split(data)
            else:
                pack.outer(data)
        except Incomplete:
            return could_be_pack(data)
        except Rejected:
            return False  # garbage: import_pack refuses it (and records that in the audit log)
        return False

    def _wait(self, name: str, tracked: _Tracked, size: int) -> None:
        tracked.waiting = True
        message = (
            f"{'empty' if not size else 'ends early'} ({size} bytes): waiting for its writer, "
            f"rejected if unchanged for {self.incomplete_timeout:g} s"
        )
        if tracked.announced is None or not tracked.announced.startswith("incomplete"):
            tracked.announced = "incomplete"
            self.emit(Event("incomplete", name, message, kind="malformed"))

    def _defer(self, name: str, tracked: _Tracked, exc: Exception) -> None:
        if isinstance(exc, EnvironmentFault):
            kind, message = exc.kind, exc.message
        elif isinstance(exc, OSError):
            kind, message = "os-error", f"{exc.strerror or exc}"
        else:
            kind, message = "store", str(exc)
        if tracked.announced != f"deferred {kind}: {message}":
            tracked.announced = f"deferred {kind}: {message}"
            self.emit(Event("deferred", name, f"{message} (left in place, retried)", kind=kind))

    def _duplicate(self, name: str, digest: bytes) -> _Outcome | None:
        store = self.node.store
        earlier = store.watched_file(digest)
        if earlier is not None and earlier["outcome"] == "rejected":
            earlier = None  # a rejected file is tried again: the reason may have been the node's clock
        if earlier is None and not store.pack_digest_seen(digest):
            return None
        first = f"duplicate of an already imported pack (sha256 {digest.hex()})"
        lines = [first, *self._about(name, digest)]
        if earlier is not None:
            lines.append(f"first handled as {_printable(earlier['name'])} at {_iso(earlier['at'])}")
        else:
            lines.append("imported before (packs seen by this node)")
        return _Outcome("duplicate", IMPORTED, first, "\n".join(lines))

    def _import(self, name: str, data: bytes, digest: bytes, timed_out: bool) -> _Outcome:
        try:
            result = self.node.import_pack(data, self._wall(), source=f"watch {_printable(name)}")
        except ImportRejected as exc:
            if exc.result.applied:
                return self._imported(name, digest, exc.result)
            return self._rejected(name, digest, exc, exc.result)
        except Malformed as exc:
            if timed_out:  # still ends early (or is still empty) after the timeout
                exc = Incomplete(f"incomplete pack, unchanged for {self.incomplete_timeout:g} s: {exc.message}")
            return self._rejected(name, digest, exc)
        except Rejected as exc:
            return self._rejected(name, digest, exc)
        return self._imported(name, digest, result)

    def _about(self, name: str, digest: bytes | None) -> list[str]:
        lines = [f"file: {_printable(name)}"]
        if digest is not None:
            lines.append(f"sha256: {digest.hex()}")
        lines.append(f"at: {_iso(self._wall())}")
        lines.append(f"node: {self.node.node_id} ({self.node.domain})")
        return lines

    @staticmethod
    def _describe(result: ImportResult) -> list[str]:
        report = result.to_json()
        lines = []
        m = report["pack"]
        if m is not None:
            ex = result.exporter
            trust = "verified" if ex.get("verified") else "unverified"
            lines.append(
                f"pack: {m['pack_id']} ({m['documents']} documents) from {m['exporter']['domain']} "
                f"node {m['exporter']['node']}, sequence {m['sequence']}, exporter {trust} ({ex.get('basis', '-')})"
            )
        lines.append(f"sealed: {'yes' if result.sealed else 'no'}")
        rejected = [d for d in report["documents"] if d["report"].startswith("rejected")]
        if rejected:
            lines.append("rejected documents:")
            for d in rejected:
                what = f"{d.get('type', '?')} v{d.get('version', '?')}" if "type" in d else f"document {d['index']}"
                lines.append(f"  {what}: {d['report']}: {_printable(d['error']['message'])}")
        return lines

    def _imported(self, name: str, digest: bytes, result: ImportResult) -> _Outcome:
        lines = [f"imported: {result.summary()}", *self._about(name, digest), *self._describe(result)]
        return _Outcome("imported", IMPORTED, result.summary(), "\n".join(lines), report=result.to_json())

    def _rejected(self, name: str, digest: bytes | None, exc: Rejected, result: ImportResult | None = None) -> _Outcome:
        message = _printable(exc.message)
        lines = [f"rejected: {exc.kind}: {message}", *self._about(name, digest)]
        if result is not None:
            lines.append(f"documents: {result.summary()}")
            lines.extend(self._describe(result))
        report = result.to_json() if result is not None else None
        return _Outcome("rejected", REJECTED, message, "\n".join(lines), exc.kind, report)

    # --- moving ------------------------------------------------------------------------------

    def _finish(self, fd: int, name: str, tracked: _Tracked, digest: bytes | None, outcome: _Outcome) -> None:
        try:
            dest = self._move(fd, name, outcome)
        except (OSError, UnsafePath) as exc:
            if digest is not None:
                self._unmoved[(name, digest)] = outcome
            tracked.retry_at = self._monotonic() + self.move_retry
            self._defer(name, tracked, exc)
            return
        self._unmoved.pop((name, digest or b""), None)
        self._files.pop(name, None)
        if digest is not None:
            # On failure only a duplicate's shortcut is lost: a second import is a no-op that says so.
            with suppress(EnvironmentFault, sqlite3.OperationalError):
                self.node.store.record_watched(digest, _printable(name), outcome.event, self._wall())
        self.emit(
            Event(
                outcome.event,
                name,
                outcome.message,
                kind=outcome.kind,
                moved_to=f"{outcome.folder}/{dest}",
                sha256=digest.hex() if digest is not None else None,
                report=outcome.report,
            )
        )

    def _subfolder(self, dfd: int, folder: str) -> int:
        """A descriptor of ``imported/`` or ``rejected/``: made if absent, a real directory of the folder."""
        with suppress(FileExistsError):
            os.mkdir(folder, 0o755, dir_fd=dfd)
            os.fsync(dfd)
        try:
            ffd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafePath(f"{self.dir / folder} is not a directory of the watched folder (a link?)") from exc
            raise
        if os.fstat(ffd).st_dev != os.fstat(dfd).st_dev:
            os.close(ffd)
            raise UnsafePath(f"{self.dir / folder} is another file system mounted in the watched folder")
        return ffd

    def _move(self, fd: int, name: str, outcome: _Outcome) -> str:
        dfd = self._dfd
        assert dfd is not None, "moves happen inside a poll"
        ffd = self._subfolder(dfd, outcome.folder)
        try:
            dest = free_name_at(ffd, name)
            reason = f"{dest}{REASON_SUFFIX}"
            os.fsync(fd)  # the writer may not have: make the content durable before the rename
            _write_new(ffd, reason, (outcome.reason + "\n").encode("utf-8", "replace"))
            try:
                os.replace(name, dest, src_dir_fd=dfd, dst_dir_fd=ffd)
            except OSError:
                with suppress(OSError):  # no reason file without its pack
                    os.unlink(reason, dir_fd=ffd)
                raise
            os.fsync(ffd)
            os.fsync(dfd)
        finally:
            os.close(ffd)
        return dest


MAX_FILE = pack.MAX_PACK_SIZE + seal.MAX_HEADER_SIZE + 64  # the largest file a (sealed) pack may be


def _read_capped(fd: int, cap: int) -> bytes:
    """The whole of an open regular file of at most ``cap`` bytes, else :class:`Oversize`."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = os.read(fd, min(1 << 20, cap + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > cap:
            raise Oversize(f"pack file larger than the cap of {cap} bytes")


def _exists_at(dfd: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=dfd)
    except FileNotFoundError:
        return False
    return True


def free_name_at(dfd: int, name: str) -> str:
    """``name``, or ``STEM-N.SUFFIX``: a name in the folder ``dfd`` whose file and reason file are both free."""
    candidate, n = name, 0
    while _exists_at(dfd, candidate) or _exists_at(dfd, candidate + REASON_SUFFIX):
        n += 1
        p = Path(name)
        candidate = f"{p.stem}-{n}{p.suffix}"
    return candidate


def free_name(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/STEM-N.SUFFIX`` (see :func:`free_name_at`)."""
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return folder / free_name_at(dfd, name)
    finally:
        os.close(dfd)


def _write_new(dfd: int, name: str, data: bytes) -> None:
    """Write ``name`` in the folder ``dfd`` atomically (temporary name, fsync, rename), never through a link."""
    tmp = f".{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise


# --- running it ----------------------------------------------------------------------------------


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, str]]:
    """SIGINT and SIGTERM set a flag instead of interrupting (a file is never left half-moved)."""
    flag: dict[str, str] = {}

    def handler(signum: int, _frame: FrameType | None) -> None:
        flag.setdefault("signal", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def serve(
    node: Node,
    directory: Path,
    *,
    settle: float,
    interval: float,
    incomplete_timeout: float,
    once: bool,
    emit: Callable[[Event], None],
) -> Counter[str]:
    """The ``pack watch`` command: unlock the node's keys, then watch until a signal (or one pass)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingFile(f"no such directory to watch: {directory}")
    node.identity  # noqa: B018 - unlock the keys now (sealed packs need them), not at the first sealed pack
    watcher = Watcher(
        directory, node, settle=settle, interval=interval, incomplete_timeout=incomplete_timeout, emit=emit
    )
    with _stop_on_signals() as flag:  # before the first line: a signal right after it must stop us cleanly
        emit(
            Event(
                "watching",
                message=f"{directory} for node {node.node_id} ({node.domain})" + (", one pass" if once else ""),
                extra={"directory": str(directory), "node": node.node_id, "settle": settle, "interval": interval},
            )
        )
        (watcher.run_once if once else watcher.run)(lambda: bool(flag))
    stopped_by = f"stopped by {flag['signal']}" if flag else "one pass done"
    counts = {k: watcher.counts.get(k, 0) for k in FINAL}
    emit(
        Event(
            "stopped",
            message=f"{stopped_by}: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
            extra={"counts": counts},
        )
    )
    return watcher.counts
