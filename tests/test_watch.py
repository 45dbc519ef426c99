"""``pack watch``: a drop folder or USB stick, read only once a file has settled.

Most tests drive :class:`qhx_edge.homes.watch.Watcher` with an injected clock (no
waiting) over real files and a real node store; the subprocess tests run the
real command against a writer that writes a pack slowly in pieces.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qhx_edge.core import cbor
from qhx_edge.core.cards import parse_card
from qhx_edge.core.errors import Incomplete, Malformed, StoreLocked
from qhx_edge.homes.node import Node
from qhx_edge.homes.watch import FINAL as FINAL_EVENTS
from qhx_edge.homes.watch import Event, Watcher, could_be_pack, free_name, ignored
from qhx_edge.packs import pack, seal
from qhx_edge.store import clock
from qhx_edge.store.trust_store import Store

from .conftest import PASSPHRASE, Homes, _cli_env, make_homes, run_cli

SETTLE = 2.0
TIMEOUT = 60.0


class FakeTime:
    """An injected monotonic clock; sleeping advances it."""

    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.t += seconds


class Rig:
    def __init__(self, homes: Homes, drop: Path) -> None:
        self.homes = homes
        self.drop = drop
        self.time = FakeTime()
        self.events: list[Event] = []
        self.node = Node(homes.node_home, PASSPHRASE.encode)
        self.watcher = self.make_watcher()

    def make_watcher(self, **kw: float) -> Watcher:
        return Watcher(
            self.drop,
            self.node,
            settle=kw.get("settle", SETTLE),
            interval=kw.get("interval", 1.0),
            incomplete_timeout=kw.get("incomplete_timeout", TIMEOUT),
            emit=self.events.append,
            monotonic=self.time.monotonic,
            sleep=self.time.sleep,
        )

    def poll_at(self, offset: float) -> list[Event]:
        """Advance the clock by ``offset`` and poll; return the new events."""
        self.time.t += offset
        before = len(self.events)
        self.watcher.poll()
        return self.events[before:]

    def trust(self) -> str:
        return self.node.store.trust_digest()

    def audit_len(self) -> int:
        return len(self.node.store.audit_entries())

    def new_pack(self) -> bytes:
        """A pack that carries something the node does not hold yet."""
        auth = self.homes.authority
        auth.publish_bundle(clock.now())
        return auth.export_pack(auth.export_documents(), clock.now())


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    homes = make_homes(tmp_path)
    drop = tmp_path / "drop"
    drop.mkdir()
    r = Rig(homes, drop)
    yield r
    r.node.close()


def names(events: list[Event]) -> list[tuple[str, str | None]]:
    return [(e.event, e.file) for e in events]


def reason(path: Path) -> str:
    return path.with_name(path.name + ".reason").read_text()


# --- stability ------------------------------------------------------------------------------------


def test_a_file_is_read_only_after_it_has_settled(rig: Rig) -> None:
    (rig.drop / "p.cbor").write_bytes(rig.new_pack())
    before = rig.trust()
    assert rig.poll_at(0) == []  # first seen
    assert rig.poll_at(SETTLE - 0.1) == []  # not yet settled
    assert rig.trust() == before
    assert (rig.drop / "p.cbor").exists()
    events = rig.poll_at(0.1)
    assert names(events) == [("imported", "p.cbor")]
    assert events[0].moved_to == "imported/p.cbor"
    assert rig.trust() != before
    assert not (rig.drop / "p.cbor").exists()
    text = reason(rig.drop / "imported" / "p.cbor")
    assert text.startswith("imported: applied: ")
    assert "sealed: no" in text
    assert "exporter verified" in text


def test_growth_or_a_new_mtime_restarts_the_settle_time(rig: Rig) -> None:
    data = rig.new_pack()
    path = rig.drop / "p.cbor"
    path.write_bytes(data[:100])
    rig.poll_at(0)
    with path.open("ab") as f:
        f.write(data[100:])
    assert rig.poll_at(SETTLE - 0.5) == []  # changed: settling starts again
    assert rig.poll_at(SETTLE - 0.1) == []
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same size, touched
    assert rig.poll_at(0.2) == []
    assert rig.poll_at(SETTLE - 0.1) == []
    assert names(rig.poll_at(0.1)) == [("imported", "p.cbor")]


def test_an_incomplete_pack_is_waited_for_and_imported_once_complete(rig: Rig) -> None:
    data = rig.new_pack()
    path = rig.drop / "slow.cbor"
    path.write_bytes(b"")
    before, audit = rig.trust(), rig.audit_len()
    rig.poll_at(0)
    waiting = rig.poll_at(SETTLE)
    assert [(e.event, e.kind) for e in waiting] == [("incomplete", "malformed")]
    assert "empty" in waiting[0].message
    n = len(data)
    pieces = [data[i * n // 7 : (i + 1) * n // 7] for i in range(7)]
    for i, piece in enumerate(pieces):  # written in pieces, each one settling before the next arrives
        with path.open("ab") as f:
            f.write(piece)
        assert rig.poll_at(0.5) == []  # the change is seen
        settled = rig.poll_at(SETTLE * 3)
        if i < len(pieces) - 1:
            assert settled == []  # waited for (logged once), never rejected
            assert path.exists()
            assert rig.trust() == before
            assert rig.audit_len() == audit  # waiting is not a rejection: nothing in the audit log
        else:
            assert names(settled) == [("imported", "slow.cbor")]
    assert not path.exists()
    assert rig.trust() != before
    assert [e.event for e in rig.events] == ["incomplete", "imported"]
    assert reason(rig.drop / "imported" / "slow.cbor").startswith("imported: applied")


def test_an_incomplete_pack_is_rejected_after_the_timeout(rig: Rig) -> None:
    data = rig.new_pack()
    path = rig.drop / "cut.cbor"
    path.write_bytes(data[: len(data) // 2])  # a stick pulled mid-copy
    before, audit = rig.trust(), rig.audit_len()
    rig.poll_at(0)
    assert names(rig.poll_at(SETTLE)) == [("incomplete", "cut.cbor")]
    assert rig.poll_at(TIMEOUT - SETTLE - 0.1) == []
    assert path.exists()
    events = rig.poll_at(0.1)
    assert [(e.event, e.kind) for e in events] == [("rejected", "malformed")]
    assert "incomplete pack, unchanged for 60 s" in events[0].message
    text = reason(rig.drop / "rejected" / "cut.cbor")
    assert text.startswith("rejected: malformed: incomplete pack")
    assert rig.trust() == before
    assert rig.audit_len() == audit + 1  # the final rejection is audited, the waiting was not


def test_garbage_that_merely_ends_early_is_rejected_at_once(rig: Rig) -> None:
    garbage = bytes([0x5B]) + (1 << 40).to_bytes(8, "big") + b"not a pack"  # announces a huge byte string
    with pytest.raises(Incomplete):
        cbor.decode(garbage, max_size=1 << 20)
    assert not could_be_pack(garbage)
    (rig.drop / "junk").write_bytes(garbage)
    rig.poll_at(0)
    events = rig.poll_at(SETTLE)
    assert [(e.event, e.kind) for e in events] == [("rejected", "malformed")]
    assert reason(rig.drop / "rejected" / "junk").startswith("rejected: malformed: CBOR data ends early")


def test_random_garbage_lands_in_rejected_with_its_reason(rig: Rig) -> None:
    rng = random.Random(3)
    for i in range(5):
        (rig.drop / f"noise{i}.bin").write_bytes(rng.randbytes(700))
    before = rig.trust()
    rig.poll_at(0)
    events = rig.poll_at(SETTLE)
    assert sorted(names(events)) == [("rejected", f"noise{i}.bin") for i in range(5)]
    for i in range(5):
        assert reason(rig.drop / "rejected" / f"noise{i}.bin").startswith("rejected: malformed: ")
    assert rig.trust() == before
    assert sorted(p.name for p in rig.drop.iterdir()) == ["rejected"]


# --- what a pack looks like while it is being written ----------------------------------------------------


def test_every_truncation_of_a_pack_or_sealed_pack_ends_early_and_looks_like_a_pack(rig: Rig) -> None:
    data = rig.new_pack()
    sealed = seal.seal(data, [parse_card(rig.node.card()).encryption_key])
    for whole in (data, sealed):
        assert could_be_pack(whole)
        for n in [*range(1, 200), *range(200, len(whole), 97)]:
            part = whole[:n]
            assert could_be_pack(part), n
            with pytest.raises(Incomplete) as info:
                (seal.split if seal.is_sealed(part) else pack.outer)(part)
            assert info.value.kind == "malformed"  # the stable kind of a truncated file
    assert not could_be_pack(b"\xa4fformatmqhx-edge-pacK")
    assert not could_be_pack(b"\xa3")
    with pytest.raises(Malformed) as other:
        cbor.decode(data + b"\x00", max_size=1 << 26)
    assert not isinstance(other.value, Incomplete)  # trailing bytes are not truncation


# --- outcomes ------------------------------------------------------------------------------------------------------


def test_a_copy_of_an_imported_pack_is_a_duplicate_by_digest(rig: Rig) -> None:
    data = rig.new_pack()
    (rig.drop / "first.cbor").write_bytes(data)
    rig.poll_at(0)
    assert names(rig.poll_at(SETTLE)) == [("imported", "first.cbor")]
    audit = rig.audit_len()
    (rig.drop / "copy.cbor").write_bytes(data)
    rig.poll_at(0)
    events = rig.poll_at(SETTLE)
    assert names(events) == [("duplicate", "copy.cbor")]
    digest = events[0].sha256
    assert digest is not None
    text = reason(rig.drop / "imported" / "copy.cbor")
    assert text.splitlines()[0] == f"duplicate of an already imported pack (sha256 {digest})"
    assert "first handled as first.cbor" in text
    assert rig.audit_len() == audit  # not imported (nor audited) again


def test_a_pack_imported_by_pack_import_is_a_duplicate_too(rig: Rig) -> None:
    data = rig.new_pack()
    rig.node.import_pack(data, clock.now())  # recorded in packs_seen
    (rig.drop / "again.cbor").write_bytes(data)
    rig.poll_at(0)
    assert names(rig.poll_at(SETTLE)) == [("duplicate", "again.cbor")]


def test_a_sealed_duplicate_is_recognised_across_watcher_runs(rig: Rig) -> None:
    sealed = seal.seal(rig.new_pack(), [parse_card(rig.node.card()).encryption_key])
    (rig.drop / "s1").write_bytes(sealed)
    rig.poll_at(0)
    events = rig.poll_at(SETTLE)
    assert names(events) == [("imported", "s1")]
    assert "sealed: yes" in reason(rig.drop / "imported" / "s1")
    rig.node.close()
    rig.node = Node(rig.homes.node_home, PASSPHRASE.encode)  # a later run of the watcher
    rig.watcher = rig.make_watcher()
    (rig.drop / "s2").write_bytes(sealed)
    rig.poll_at(0)
    assert names(rig.poll_at(SETTLE)) == [("duplicate", "s2")]


def test_a_replayed_older_pack_lands_in_rejected_with_rollback(rig: Rig) -> None:
    auth = rig.homes.authority
    old = auth.export_pack(auth.export_documents(), clock.now())
    rig.node.import_pack(rig.new_pack(), clock.now())
    before = rig.trust()
    (rig.drop / "old.cbor").write_bytes(old)
    rig.poll_at(0)
    events = rig.poll_at(SETTLE)
    assert [(e.event, e.kind) for e in events] == [("rejected", "rollback")]
    text = reason(rig.drop / "rejected" / "old.cbor")
    assert text.startswith("rejected: rollback: ")
    assert "nothing applied" in text
    assert "rejected:rollback" in text
    assert rig.trust() == before
    # A rejected file is not a "duplicate": the same bytes are judged again.
    (rig.drop / "old-again.cbor").write_bytes(old)
    rig.poll_at(0)
    assert names(rig.poll_at(SETTLE)) == [("rejected", "old-again.cbor")]


def test_a_partly_applied_pack_lands_in_imported_with_its_rejections(rig: Rig) -> None:
    auth = rig.homes.authority
    older = auth.publish_bundle(clock.now())
    rig.node.import_pack(rig.new_pack(), clock.now())  # the node skips the 'older' versions
    newer = auth.publish_bundle(clock.now())
    (rig.drop / "mixed.cbor").write_bytes(auth.export_pack(older + newer, clock.now()))
    rig.poll_at(0)
    events = rig.poll_at(SETTLE)
    assert names(events) == [("imported", "mixed.cbor")]
    text = reason(rig.drop / "imported" / "mixed.cbor")
    assert text.startswith("imported: applied: applied 2, rejected:rollback 2")
    assert "rejected documents:" in text
    assert "bundle v2: rejected:rollback: " in text


def test_a_pack_for_another_node_is_rejected_not_recipient(rig: Rig, tmp_path: Path) -> None:
    other = make_homes(tmp_path / "other")
    other_node = Node(other.node_home, PASSPHRASE.encode)
    try:
        card = parse_card(other_node.card())
    finally:
        other_node.close()
    (rig.drop / "theirs").write_bytes(seal.seal(rig.new_pack(), [card.encryption_key]))
    rig.poll_at(0)
    assert [(e.event, e.kind) for e in rig.poll_at(SETTLE)] == [("rejected", "not-recipient")]


def test_hidden_temporary_and_special_files_are_left_alone(rig: Rig) -> None:
    data = rig.new_pack()
    for name in (".pack.cbor.1a2b3c.tmp", ".hidden", "copying.part", "x.cbor~", "download.crdownload"):
        (rig.drop / name).write_bytes(data)
    (rig.drop / "sub").mkdir()
    (rig.drop / "sub" / "nested.cbor").write_bytes(data)
    (rig.drop / "link.cbor").symlink_to(rig.drop / ".hidden")
    os.mkfifo(rig.drop / "fifo")  # reading it would block the watcher
    before = sorted(p.name for p in rig.drop.rglob("*"))
    rig.poll_at(0)
    assert rig.poll_at(SETTLE) == []
    assert rig.poll_at(TIMEOUT * 2) == []
    assert sorted(p.name for p in rig.drop.rglob("*")) == before
    assert all(ignored(n) for n in (".x", ".a.b.tmp", "a.part", "a~"))
    assert not ignored("pack.cbor")


def test_a_name_that_is_not_utf8_is_handled(rig: Rig) -> None:
    name = os.fsdecode(b"caf\xe9\n.cbor")  # a stick formatted elsewhere, and a newline
    data = rig.new_pack()
    (rig.drop / name).write_bytes(data)
    rig.poll_at(0)
    events = rig.poll_at(SETTLE)
    assert names(events) == [("imported", name)]
    assert "caf\\xe9\\x0a.cbor" in events[0].text()
    assert json.loads(json.dumps(events[0].to_json()))["file"] == name
    assert "file: caf\\xe9\\x0a.cbor" in reason(rig.drop / "imported" / name)
    (rig.drop / "copy").write_bytes(data)
    rig.poll_at(0)
    assert names(rig.poll_at(SETTLE)) == [("duplicate", "copy")]


def test_an_existing_name_is_never_overwritten(rig: Rig) -> None:
    (rig.drop / "imported").mkdir()
    (rig.drop / "imported" / "p.cbor").write_bytes(b"earlier")
    (rig.drop / "imported" / "p-1.cbor.reason").write_bytes(b"orphan reason")
    (rig.drop / "p.cbor").write_bytes(rig.new_pack())
    rig.poll_at(0)
    events = rig.poll_at(SETTLE)
    assert events[0].moved_to == "imported/p-2.cbor"
    assert (rig.drop / "imported" / "p.cbor").read_bytes() == b"earlier"
    assert (rig.drop / "imported" / "p-1.cbor.reason").read_bytes() == b"orphan reason"
    assert reason(rig.drop / "imported" / "p-2.cbor").startswith("imported: ")
    assert free_name(rig.drop / "imported", "new") == rig.drop / "imported" / "new"


def test_an_environment_error_leaves_the_file_and_is_retried(rig: Rig) -> None:
    (rig.drop / "p.cbor").write_bytes(rig.new_pack())
    rig.node.store.conn.execute("PRAGMA busy_timeout = 20")
    locker = Store.open(rig.homes.node_home)
    locker.conn.execute("BEGIN IMMEDIATE")  # another process holds the store's write lock
    try:
        rig.poll_at(0)
        events = rig.poll_at(SETTLE)
        assert [(e.event, e.kind) for e in events] == [("deferred", StoreLocked.kind)]
        assert rig.poll_at(1) == []  # retried, but logged once
        assert (rig.drop / "p.cbor").exists()
        assert not (rig.drop / "rejected").exists()
    finally:
        locker.conn.execute("ROLLBACK")
        locker.close()
    assert names(rig.poll_at(1)) == [("imported", "p.cbor")]


def test_a_vanishing_directory_is_waited_for(rig: Rig) -> None:
    away = rig.drop.with_name("away")
    rig.drop.rename(away)  # the stick was pulled
    assert [e.event for e in rig.poll_at(1)] == ["unavailable"]
    assert rig.poll_at(1) == []
    away.rename(rig.drop)
    (rig.drop / "p.cbor").write_bytes(rig.new_pack())
    assert [e.event for e in rig.poll_at(1)] == ["available"]
    assert names(rig.poll_at(SETTLE)) == [("imported", "p.cbor")]


# --- the loops -------------------------------------------------------------------------------------------------


def test_run_once_handles_settled_files_and_gives_up_on_a_busy_writer(rig: Rig) -> None:
    data = rig.new_pack()
    (rig.drop / "ready.cbor").write_bytes(data)
    busy = rig.drop / "busy.cbor"
    busy.write_bytes(b"\xa4")
    sleep = rig.time.sleep

    def sleep_and_write(seconds: float) -> None:
        with busy.open("ab") as f:
            f.write(b"f")  # a writer that never stops
        sleep(seconds)

    watcher = Watcher(
        rig.drop,
        rig.node,
        settle=SETTLE,
        interval=0.5,
        emit=rig.events.append,
        monotonic=rig.time.monotonic,
        sleep=sleep_and_write,
    )
    start = rig.time.t
    watcher.run_once()
    assert rig.time.t - start <= 2 * SETTLE + 2 * 0.5
    assert names(rig.events) == [("imported", "ready.cbor")]
    assert busy.exists()
    assert watcher.counts["imported"] == 1


def test_run_polls_until_asked_to_stop(rig: Rig) -> None:
    (rig.drop / "p.cbor").write_bytes(rig.new_pack())
    start = rig.time.t
    rig.watcher.run(lambda: rig.time.t - start > 10)
    assert names(rig.events) == [("imported", "p.cbor")]
    assert 10 < rig.time.t - start < 11.5


def test_event_json_lines() -> None:
    ok = Event("imported", "p", "applied: applied 1", moved_to="imported/p", sha256="ab")
    assert ok.to_json() == {
        "ok": True,
        "event": "imported",
        "file": "p",
        "message": "applied: applied 1",
        "moved_to": "imported/p",
        "sha256": "ab",
    }
    bad = Event("rejected", "bad\nname", "x", kind="malformed")
    assert bad.to_json()["error"] == {"kind": "malformed", "message": "x"}
    assert bad.text() == "rejected bad\\x0aname: x"  # a name cannot forge log lines


# --- the real command --------------------------------------------------------------------------------------------


def _watch(home: Path, drop: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "qhx_edge", "--json", "--home", str(home), "pack", "watch", str(drop), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_cli_env(),
    )


def test_cli_slow_writer_nothing_is_imported_until_the_pack_is_complete(tmp_path: Path) -> None:
    homes = make_homes(tmp_path)
    homes.authority.publish_bundle(clock.now())
    data = homes.authority.export_pack(homes.authority.export_documents(), clock.now())
    drop = tmp_path / "stick"
    drop.mkdir()

    def trust() -> str:
        s = Store.open(homes.node_home)
        try:
            return s.trust_digest()
        finally:
            s.close()

    before = trust()
    proc = _watch(homes.node_home, drop, "--settle", "0.3", "--interval", "0.05")
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["event"] == "watching"
        target = drop / "pack.cbor"
        chunks = 8
        with target.open("wb") as f:  # straight to the final name, not atomically
            for i in range(chunks):
                f.write(data[i * len(data) // chunks : (i + 1) * len(data) // chunks])
                f.flush()
                if i < chunks - 1:
                    time.sleep(0.6)  # longer than --settle: each partial file settles
                    assert target.exists(), f"moved after chunk {i}"
                    assert trust() == before, f"state changed after chunk {i}"
        landed = drop / "imported" / "pack.cbor.reason"
        deadline = time.monotonic() + 15
        while not landed.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert landed.exists()
        assert (drop / "imported" / "pack.cbor").read_bytes() == data
        assert landed.read_text().startswith("imported: applied: ")
        assert trust() != before
        assert not (drop / "rejected").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    events = [line["event"] for line in lines]
    assert events[0] == "incomplete"
    assert events[1:] == ["imported", "stopped"]
    assert lines[-1]["counts"] == {"imported": 1, "duplicate": 0, "rejected": 0}
    assert "SIGTERM" in lines[-1]["message"]


def test_cli_once_in_text_with_garbage_a_pack_and_hidden_files(tmp_path: Path) -> None:
    homes = make_homes(tmp_path)
    homes.authority.publish_bundle(clock.now())
    drop = tmp_path / "drop"
    drop.mkdir()
    pack.write(drop / "good.cbor", homes.authority.export_pack(homes.authority.export_documents(), clock.now()))
    (drop / "garbage.bin").write_bytes(random.Random(7).randbytes(4096))
    (drop / ".good.cbor.00aa11.tmp").write_bytes(b"\xa4")
    started = time.monotonic()
    r = run_cli("--home", homes.node_home, "pack", "watch", drop, "--once", "--settle", "0.2", "--interval", "0.05")
    assert time.monotonic() - started < 10
    assert r.code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("watching: ")
    assert "rejected garbage.bin -> rejected/garbage.bin: " in r.stdout
    assert "imported good.cbor -> imported/good.cbor: applied: " in r.stdout
    assert lines[-1] == "stopped: one pass done: imported 1, duplicate 0, rejected 1"
    assert (drop / "rejected" / "garbage.bin.reason").read_text().startswith("rejected: malformed: ")
    assert (drop / ".good.cbor.00aa11.tmp").exists()


def test_cli_sigint_stops_cleanly(tmp_path: Path) -> None:
    homes = make_homes(tmp_path, import_first=False)
    drop = tmp_path / "drop"
    drop.mkdir()
    proc = _watch(homes.node_home, drop, "--interval", "5")
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline())["event"] == "watching"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    last = json.loads(out.splitlines()[-1])
    assert last["event"] == "stopped"
    assert "SIGINT" in last["message"]


def test_cli_missing_directory_is_an_environment_error(tmp_path: Path) -> None:
    homes = make_homes(tmp_path, import_first=False)
    r = run_cli("--json", "--home", homes.node_home, "pack", "watch", tmp_path / "nope", "--once")
    assert r.code == 3
    assert r.json["error"]["kind"] == "missing-file"


# --- a hostile drop folder (whoever writes to it must not reach outside it, nor hang the watcher) ---------------


class SwapAfterScan(Watcher):
    """A watcher that lets the test change a file between the scan and the read (the race an attacker wins)."""

    swap: Callable[[], None] | None = None

    def _scan(self, dfd: int) -> dict[str, tuple[int, int, int]]:
        found = super()._scan(dfd)
        if self.swap is not None:
            swap, self.swap = self.swap, None
            swap()
        return found


def swapping_rig(rig: Rig) -> SwapAfterScan:
    w = SwapAfterScan(
        rig.drop,
        rig.node,
        settle=SETTLE,
        interval=1.0,
        incomplete_timeout=TIMEOUT,
        emit=rig.events.append,
        monotonic=rig.time.monotonic,
        sleep=rig.time.sleep,
    )
    rig.watcher = w
    return w


@pytest.mark.parametrize("folder", ["imported", "rejected"])
def test_an_outcome_folder_that_is_a_link_is_never_written_through(rig: Rig, tmp_path: Path, folder: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (rig.drop / folder).symlink_to(outside)
    data = rig.new_pack() if folder == "imported" else b"\xff garbage, not a pack"
    (rig.drop / "p.cbor").write_bytes(data)
    rig.poll_at(0)
    events = rig.poll_at(SETTLE)
    assert [(e.event, e.kind) for e in events] == [("deferred", "unsafe-path")]
    assert list(outside.iterdir()) == []  # nothing placed, moved or written there
    assert (rig.drop / "p.cbor").read_bytes() == data  # the pack stays where it was dropped
    assert rig.poll_at(1) == []
    assert rig.poll_at(120) == []
    assert list(outside.iterdir()) == []


def test_a_pack_swapped_for_a_link_after_the_scan_is_not_followed(rig: Rig, tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere.pack"
    secret.write_bytes(rig.new_pack())  # a valid pack outside the folder: following the link would import it
    (rig.drop / "p.cbor").write_bytes(b"\xff placeholder")
    before = rig.trust()
    w = swapping_rig(rig)
    rig.poll_at(0)

    def to_link() -> None:
        (rig.drop / "p.cbor").unlink()
        (rig.drop / "p.cbor").symlink_to(secret)

    w.swap = to_link
    events = rig.poll_at(SETTLE)
    assert [e.event for e in events if e.event in FINAL_EVENTS] == []
    assert rig.trust() == before
    assert (rig.drop / "p.cbor").is_symlink()
    assert secret.exists()
    assert not (rig.drop / "imported").exists()
    assert not (rig.drop / "rejected").exists()
    assert rig.poll_at(SETTLE) == []  # a link is never a candidate


def test_a_fifo_swapped_in_after_the_scan_never_hangs_the_watcher(rig: Rig) -> None:
    (rig.drop / "p.cbor").write_bytes(rig.new_pack())
    w = swapping_rig(rig)
    rig.poll_at(0)

    def to_fifo() -> None:
        (rig.drop / "p.cbor").unlink()
        os.mkfifo(rig.drop / "p.cbor")

    w.swap = to_fifo
    rig.time.t += SETTLE
    done = threading.Event()
    t = threading.Thread(target=lambda: (w.poll(), done.set()), daemon=True)
    t.start()
    finished = done.wait(10)
    if not finished:  # release the blocked open() so the thread can end
        fd = os.open(rig.drop / "p.cbor", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    t.join(10)
    assert finished, "the watcher blocked opening a FIFO"
    assert not (rig.drop / "imported").exists()
    assert not (rig.drop / "rejected").exists()


def test_a_failed_move_is_reported_once_and_leaves_no_reason_files(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace

    def cross_device(src: Any, dst: Any, **kw: Any) -> None:
        if os.fspath(src).endswith("p.cbor"):  # the pack's own rename, as onto another file system
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "replace", cross_device)
    (rig.drop / "p.cbor").write_bytes(rig.new_pack())
    rig.poll_at(0)
    events = rig.poll_at(SETTLE) + rig.poll_at(1) + rig.poll_at(1) + rig.poll_at(120) + rig.poll_at(120)
    assert [(e.event, e.kind) for e in events] == [("deferred", "os-error")]
    assert sorted(p.name for p in (rig.drop / "imported").iterdir()) == []  # no reason file without its pack
    assert (rig.drop / "p.cbor").exists()

    monkeypatch.setattr(os, "replace", real_replace)  # the stick is writable again
    events = rig.poll_at(120)
    assert names(events) == [("imported", "p.cbor")]
    assert sorted(p.name for p in (rig.drop / "imported").iterdir()) == ["p.cbor", "p.cbor.reason"]


def test_cli_sigterm_stops_the_watcher_beside_a_fifo(tmp_path: Path) -> None:
    homes = make_homes(tmp_path, import_first=False)
    drop = tmp_path / "drop"
    drop.mkdir()
    os.mkfifo(drop / "p.cbor")  # a FIFO where a pack would be: never opened
    proc = _watch(homes.node_home, drop, "--interval", "0.2", "--settle", "0.2")
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline())["event"] == "watching"
    time.sleep(1.0)  # several polls over the FIFO
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "SIGTERM" in json.loads(out.splitlines()[-1])["message"]


def test_serve_watches_a_folder_beside_the_workload_api(tmp_path: Path) -> None:
    """``serve --watch DIR`` imports a pack dropped there while it serves, moves it to imported/ and
    logs the event as a JSON line on stderr; a folder that does not exist stops it before it serves."""
    import select

    from .conftest import stop_process, wait_until

    h = make_homes(tmp_path)
    drop = tmp_path / "usb"
    drop.mkdir()
    missing = run_cli("--home", h.node_home, "--json", "serve", "--socket", tmp_path / "x.sock", "--watch",
                      tmp_path / "nowhere")  # fmt: skip
    assert (missing.code, missing.json["error"]["kind"]) == (3, "missing-file"), missing.stdout
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "qhx_edge", "--json", "--home", str(h.node_home), "serve", "--socket",
           str(tmp_path / "w.sock"), "--watch", str(drop)]  # fmt: skip
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, log.read_text()
        assert json.loads(proc.stdout.readline())["watching"] == str(drop)
        before = _versions(h.node_home)
        h.authority.publish_bundle(clock.now())
        pack.write(drop / "next.pack", h.authority.export_pack(h.authority.export_documents(), clock.now()))
        wait_until((drop / "imported" / "next.pack").exists, "the served watcher never imported the pack")
        assert _versions(h.node_home)["bundle"] == before["bundle"] + 1
        events = [json.loads(line)["watch"] for line in log.read_text().splitlines() if line.startswith('{"watch"')]
        assert any(e["event"] == "imported" and e["file"] == "next.pack" for e in events), events
    finally:
        assert stop_process(proc) == 0, log.read_text()[-2000:]


def _versions(home: Path) -> dict[str, int]:
    with Node(home) as n:
        return {t: v["version"] for t, v in n.summary()["domains"]["alpha.example"].items()}
