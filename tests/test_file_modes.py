"""File modes: a home is 0700 and its SQLite files (and their WAL and shared memory) 0600.

The adversary is a local process of another user: with the default umask a
store was 0644, so anyone on the machine could read a node's trust state and
audit chain, and list a home.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from qhx_edge.homes import attestation, node
from qhx_edge.homes.evidence import EvidenceStore
from qhx_edge.store import clock
from qhx_edge.store.trust_store import Store
from tests.conftest import Homes, make_homes


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)  # the usual default: files 0644, directories 0755
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def sqlite_files(home: Path, name: str) -> list[Path]:
    files = [home / name, home / f"{name}-wal", home / f"{name}-shm"]
    return [f for f in files if f.exists()]


@pytest.mark.usefixtures("loose_umask")
def test_homes_are_0700_and_stores_0600(tmp_path: Path) -> None:
    homes: Homes = make_homes(tmp_path)  # an authority, a node, and a first import into the node
    attestation.create_join_token(homes.authority, clock.now(), 600)  # makes attestation.sqlite
    ev = EvidenceStore.open(homes.authority.home)  # makes evidence.sqlite
    assert ev is not None
    ev.close()
    assert mode(homes.node_home) == 0o700
    assert mode(homes.authority.home) == 0o700
    with node.Node(homes.node_home) as n:  # open: its WAL and shared-memory files exist
        n.store.trust_digest()
        files = [
            *sqlite_files(homes.node_home, "node.sqlite"),
            *sqlite_files(homes.authority.home, "attestation.sqlite"),
            *sqlite_files(homes.authority.home, "evidence.sqlite"),
        ]
        assert {f.name for f in files} >= {"node.sqlite", "node.sqlite-wal", "node.sqlite-shm", "evidence.sqlite"}
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}


@pytest.mark.usefixtures("loose_umask")
def test_an_existing_wide_open_store_is_tightened_when_opened(tmp_path: Path) -> None:
    homes = make_homes(tmp_path)
    with node.Node(homes.node_home) as n:  # its WAL and shared-memory files exist while it is open
        n.store.trust_digest()
        for f in sqlite_files(homes.node_home, "node.sqlite"):
            f.chmod(0o644)
        assert len(sqlite_files(homes.node_home, "node.sqlite")) == 3
        Store.open(homes.node_home).close()
        for f in sqlite_files(homes.node_home, "node.sqlite"):
            assert mode(f) == 0o600, f.name


def test_a_store_file_that_is_a_link_is_refused(tmp_path: Path) -> None:
    homes = make_homes(tmp_path)
    real = homes.node_home / "node.sqlite"
    moved = tmp_path / "elsewhere.sqlite"
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{real}{suffix}").exists():
            Path(f"{real}{suffix}").rename(f"{moved}{suffix}")
    real.symlink_to(moved)
    with pytest.raises(Exception, match="symbolic link") as exc:
        Store.open(homes.node_home)
    assert getattr(exc.value, "kind", None) == "store-corrupt"
