"""Pack files: signed documents carried between homes (sneakernet).

Format (deterministic CBOR)::

    {"format": "qhx-edge-pack", "version": 0, "documents": [bstr, ...]}

This is the trust core's minimal carrier: it adds no trust of its own, since
every document in it is self-authenticating and verified on import.  The
sealed and manifest-signed pack format v1 extends it (issue 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qhx_edge import cbor
from qhx_edge.errors import Malformed, Oversize
from qhx_edge.fsutil import atomic_write, read_capped

FORMAT = "qhx-edge-pack"
MAX_PACK_SIZE = 64 << 20
MAX_PACK_DOCUMENTS = 10_000


def encode(documents: Sequence[bytes]) -> bytes:
    if len(documents) > MAX_PACK_DOCUMENTS:
        raise Oversize(f"a pack holds at most {MAX_PACK_DOCUMENTS} documents")
    return cbor.encode({"format": FORMAT, "version": 0, "documents": list(documents)})


def decode(data: bytes) -> list[bytes]:
    value = cbor.decode(data, max_size=MAX_PACK_SIZE)
    if not isinstance(value, dict) or value.get("format") != FORMAT:
        raise Malformed("not a qhx-edge pack")
    if value.get("version") != 0:
        raise Malformed(f"unsupported pack version {value.get('version')!r}")
    docs = value.get("documents")
    if not isinstance(docs, list) or not all(isinstance(d, bytes) for d in docs):
        raise Malformed("pack documents must be a list of byte strings")
    if len(docs) > MAX_PACK_DOCUMENTS:
        raise Oversize(f"a pack holds at most {MAX_PACK_DOCUMENTS} documents")
    return docs


def write(path: Path, documents: Sequence[bytes]) -> int:
    data = encode(documents)
    atomic_write(Path(path), data)
    return len(data)


def read(path: Path) -> bytes:
    return read_capped(Path(path), MAX_PACK_SIZE, "pack file")
