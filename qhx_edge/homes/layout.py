"""Which kind of home a directory is, told by its marker file.

An authority home holds ``authority.json`` (:mod:`qhx_edge.homes.authority`);
a node home holds ``node.sqlite`` (:mod:`qhx_edge.store.trust_store`).  Commands
that work on both ask here first, without importing either home's operations.
"""

from __future__ import annotations

from pathlib import Path

AUTHORITY_STATE = "authority.json"


def is_authority(home: Path) -> bool:
    """Whether ``home`` is an authority home."""
    return (Path(home) / AUTHORITY_STATE).exists()
