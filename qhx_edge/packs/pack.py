"""Pack files v1: signed documents carried between homes (sneakernet).

Format (deterministic CBOR)::

    {"format": "qhx-edge-pack", "version": 1,
     "manifest": bstr,            # COSE_Sign by the exporter, over the manifest below
     "documents": [bstr, ...]}    # exact signed documents (or evidence segments)

    manifest = {"type": "manifest", "kind": "documents" | "evidence",
                "pack_id": bstr(16), "created_at": uint, "sequence": uint,
                "exporter": {"domain": tstr, "node": tstr, "key": [[alg, pub], ...]},
                "documents": [sha256(document), ...]}

Reading a pack checks, before any document is parsed: the outer structure is
deterministic CBOR, the manifest is signed by every algorithm of the key it
names, and the documents are exactly those the manifest lists, in order.  So a
tampered, truncated or spliced pack is refused as a whole.

The manifest signature proves integrity and, when the receiver knows the key
(an authority's freshness role key from its root, or a node's pinned card),
who exported it; the documents still authenticate themselves, so an unknown
exporter's pack is verified document by document (store-and-forward relay).
``sequence`` counts the exporter's packs, so a receiver can tell an older pack
from the same exporter.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qhx_edge.core import cbor, cose
from qhx_edge.core.cards import EncryptionPrivateKey
from qhx_edge.core.errors import BadSignature, Malformed, Oversize
from qhx_edge.core.limits import is_uint
from qhx_edge.core.spiffe import check_trust_domain
from qhx_edge.core.suites import PrivateKey, PublicKey
from qhx_edge.packs import seal
from qhx_edge.store.files import atomic_write, read_capped

FORMAT = "qhx-edge-pack"
VERSION = 1
MANIFEST_CONTENT_TYPE = "application/qhx-edge-manifest+cbor"
KINDS = ("documents", "evidence", "attestation")
MAX_PACK_SIZE = 64 << 20
MAX_PACK_DOCUMENTS = 10_000
MAX_MANIFEST_SIZE = 1 << 20


@dataclass(frozen=True)
class Manifest:
    raw: bytes
    kind: str
    pack_id: bytes
    created_at: int
    sequence: int
    exporter_domain: str
    exporter_node: str
    exporter_key: PublicKey
    digests: tuple[bytes, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "pack_id": self.pack_id.hex(),
            "created_at": self.created_at,
            "sequence": self.sequence,
            "exporter": {"domain": self.exporter_domain, "node": self.exporter_node, "keyid": self.exporter_key.keyid},
            "documents": len(self.digests),
        }


@dataclass(frozen=True)
class Pack:
    raw: bytes
    manifest: Manifest
    documents: list[bytes]

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.raw).digest()


def build(
    documents: Sequence[bytes],
    signer: PrivateKey,
    *,
    domain: str,
    node: str,
    sequence: int,
    now: int,
    kind: str = "documents",
) -> bytes:
    """A signed pack of ``documents`` exported by (``domain``, ``node``) with ``signer``."""
    if len(documents) > MAX_PACK_DOCUMENTS:
        raise Oversize(f"a pack holds at most {MAX_PACK_DOCUMENTS} documents")
    if kind not in KINDS:
        raise Malformed(f"unknown pack kind {kind!r}")
    manifest = {
        "type": "manifest",
        "kind": kind,
        "pack_id": secrets.token_bytes(16),
        "created_at": now,
        "sequence": sequence,
        "exporter": {"domain": domain, "node": node, "key": signer.public.to_cbor()},
        "documents": [hashlib.sha256(d).digest() for d in documents],
    }
    signed = cose.sign(cbor.encode(manifest), [signer], content_type=MANIFEST_CONTENT_TYPE)
    data = cbor.encode({"format": FORMAT, "version": VERSION, "manifest": signed, "documents": list(documents)})
    if len(data) > MAX_PACK_SIZE:
        raise Oversize(f"pack of {len(data)} bytes exceeds the cap of {MAX_PACK_SIZE}")
    return data


def outer(data: bytes) -> dict[str, Any]:
    """Decode the outer map of an (unsealed) pack and check its format name."""
    if seal.is_sealed(data):
        raise Malformed("this pack is sealed; open it first")
    value = cbor.decode(data, max_size=MAX_PACK_SIZE)
    if not isinstance(value, dict) or value.get("format") != FORMAT:
        raise Malformed("not a qhx-edge pack")
    return value


def unseal_if_sealed(data: bytes, my_kid: bytes, get_key: Callable[[], EncryptionPrivateKey]) -> tuple[bytes, bool]:
    """The pack inside ``data`` if it is sealed (to ``my_kid``), else ``data``; and whether it was."""
    if seal.is_sealed(data):
        return seal.unseal(data, my_kid, get_key), True
    return data, False


def _uint(d: dict[str, Any], key: str) -> int:
    v = d.get(key)
    if not is_uint(v):
        raise Malformed(f"manifest {key} must be an unsigned integer (at most 2^63 - 1)")
    assert isinstance(v, int)
    return v


_MANIFEST = frozenset({"manifest"})


def parse_manifest(raw: bytes) -> Manifest:
    msg = cose.parse_signed(
        raw, content_type=MANIFEST_CONTENT_TYPE, max_size=MAX_MANIFEST_SIZE, what="pack manifest", types=_MANIFEST
    )
    d = msg.body
    kind = d.get("kind")
    if kind not in KINDS:
        raise Malformed(f"unknown pack kind {kind!r}")
    pack_id = d.get("pack_id")
    if not isinstance(pack_id, bytes) or len(pack_id) != 16:
        raise Malformed("pack_id must be 16 bytes")
    exporter = d.get("exporter")
    if not isinstance(exporter, dict) or not isinstance(exporter.get("node"), str) or not exporter["node"]:
        raise Malformed("manifest exporter must name a domain and a node")
    key = PublicKey.from_cbor(exporter.get("key"))
    digests = d.get("documents")
    if (
        not isinstance(digests, list)
        or len(digests) > MAX_PACK_DOCUMENTS
        or not all(isinstance(x, bytes) and len(x) == 32 for x in digests)
    ):
        raise Malformed("manifest must list a SHA-256 digest per document")
    cose.require_signed_by(msg.envelope, key, "pack manifest")
    return Manifest(
        raw,
        kind,
        pack_id,
        _uint(d, "created_at"),
        _uint(d, "sequence"),
        check_trust_domain(exporter.get("domain")),
        exporter["node"],
        key,
        tuple(digests),
    )


def parse(data: bytes) -> Pack:
    """Parse an (unsealed) pack: outer structure, manifest signature, document digests."""
    value = outer(data)
    if value.get("version") != VERSION:
        raise Malformed(f"unsupported pack version {value.get('version')!r}")
    if set(value) != {"format", "version", "manifest", "documents"}:
        raise Malformed("pack has unexpected fields")
    raw_manifest, docs = value.get("manifest"), value.get("documents")
    if not isinstance(raw_manifest, bytes):
        raise Malformed("pack manifest must be a byte string")
    if not isinstance(docs, list) or not all(isinstance(d, bytes) for d in docs):
        raise Malformed("pack documents must be a list of byte strings")
    if len(docs) > MAX_PACK_DOCUMENTS:
        raise Oversize(f"a pack holds at most {MAX_PACK_DOCUMENTS} documents")
    manifest = parse_manifest(raw_manifest)
    if len(docs) != len(manifest.digests):
        raise BadSignature(f"pack holds {len(docs)} documents, its signed manifest lists {len(manifest.digests)}")
    for i, (doc, digest) in enumerate(zip(docs, manifest.digests, strict=True)):
        if hashlib.sha256(doc).digest() != digest:
            raise BadSignature(f"document {i} does not match the signed manifest (tampered)")
    return Pack(bytes(data), manifest, docs)


def write(path: Path, data: bytes) -> int:
    atomic_write(Path(path), data)
    return len(data)


def read(path: Path) -> bytes:
    return read_capped(Path(path), MAX_PACK_SIZE + seal.MAX_HEADER_SIZE + 64, "pack file")
