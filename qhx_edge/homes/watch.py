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

Time, sleeping and the wall clock are injected, so the stability and
incomplete-timeout rules are tested without waiting.
"""

from __future__ import annotations

import hashlib
import os
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
from qhx_edge.core.errors import EnvironmentFault, Incomplete, Malformed, MissingFile, Rejected
from qhx_edge.homes.node import ImportRejected, ImportResult, Node
from qhx_edge.packs import pack, seal
from qhx_edge.store import clock
from qhx_edge.store.files import atomic_write, fsync_dir

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


def _printable(text: str) -> str:
    """A file name or message made safe for one log line (no control characters, no surrogates)."""
    try:  # a name that is not UTF-8 shows its bytes (os.fsdecode escaped them as surrogates)
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


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
    ) -> None:
        self.dir = Path(directory)
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

    def _scan(self) -> dict[str, Signature]:
        found: dict[str, Signature] = {}
        with os.scandir(self.dir) as entries:
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
            found = self._scan()
        except OSError as exc:  # the stick was pulled or unmounted: wait for it
            if not self._unavailable:
                self._unavailable = True
                self.emit(Event("unavailable", message=f"{self.dir}: {exc.strerror or exc}", kind="os-error"))
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
            self._handle(name, tracked, now)

    # --- one file --------------------------------------------------------------------------

    def _handle(self, name: str, tracked: _Tracked, now: float) -> None:
        path = self.dir / name
        try:
            data = pack.read(path)
            st = os.stat(path, follow_symlinks=False)
        except Rejected as exc:  # larger than any pack may be
            self._finish(name, tracked, None, self._rejected(name, None, exc))
            return
        except (EnvironmentFault, OSError) as exc:
            self._defer(name, tracked, exc)
            return
        if (st.st_size, st.st_mtime_ns, st.st_ino) != tracked.sig:  # changed under us: settle again
            self._files[name] = _Tracked((st.st_size, st.st_mtime_ns, st.st_ino), now, announced=tracked.announced)
            return
        digest = hashlib.sha256(data).digest()
        unmoved = self._unmoved.get((name, digest))
        if unmoved is not None:
            self._finish(name, tracked, digest, unmoved)
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
        self._finish(name, tracked, digest, outcome)

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

    def _finish(self, name: str, tracked: _Tracked, digest: bytes | None, outcome: _Outcome) -> None:
        try:
            dest = self._move(name, outcome)
        except OSError as exc:
            if digest is not None:
                self._unmoved[(name, digest)] = outcome
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
                moved_to=f"{outcome.folder}/{dest.name}",
                sha256=digest.hex() if digest is not None else None,
                report=outcome.report,
            )
        )

    def _move(self, name: str, outcome: _Outcome) -> Path:
        folder = self.dir / outcome.folder
        if not folder.is_dir():
            folder.mkdir(exist_ok=True)
            fsync_dir(self.dir)
        dest = free_name(folder, name)
        source = self.dir / name
        _fsync_file(source)  # the writer may not have: make the content durable before the rename
        atomic_write(folder / f"{dest.name}{REASON_SUFFIX}", (outcome.reason + "\n").encode("utf-8", "replace"))
        os.replace(source, dest)
        fsync_dir(folder)
        fsync_dir(self.dir)
        return dest


def free_name(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/STEM-N.SUFFIX``: a name whose file and reason file are both free."""
    candidate = folder / name
    n = 0
    while candidate.exists() or candidate.with_name(candidate.name + REASON_SUFFIX).exists():
        n += 1
        p = Path(name)
        candidate = folder / f"{p.stem}-{n}{p.suffix}"
    return candidate


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
