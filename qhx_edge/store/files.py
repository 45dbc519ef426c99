"""Durable file writes: temporary name, fsync, rename, fsync of the directory.

A reader (or a USB stick pulled mid-write) sees either the old file or the
complete new one, never a prefix that looks complete.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from qhx_edge.core.errors import MissingFile, Oversize


def read_capped(path: Path, cap: int, what: str = "file") -> bytes:
    """Read a whole file of at most ``cap`` bytes (the cap is checked before reading)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(cap + 1)
    except FileNotFoundError:
        raise MissingFile(f"no such {what}: {path}") from None
    except IsADirectoryError:
        raise MissingFile(f"{path} is a directory, not a {what}") from None
    if len(data) > cap:
        raise Oversize(f"{path}: {what} larger than the cap of {cap} bytes")
    return data


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically and durably with permissions ``mode``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def private_dir(path: Path) -> None:
    """Make ``path`` (and missing parents) a directory only its owner may enter: mode 0700.

    A home holds the node's trust store, audit chain and sealed keys; another
    local user must not even list it.  An existing home is tightened too.
    """
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != 0o700:
        path.chmod(0o700)
