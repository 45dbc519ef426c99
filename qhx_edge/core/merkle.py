"""Merkle tree hashes, inclusion and consistency proofs (RFC 9162 §2.1; docs/architecture.md, "Notary").

The notary's receipts form an append-only log: each receipt carries an inclusion proof against a
signed tree head, and evidence packs carry tree heads with consistency proofs, so the authority sees a
receipt the node dropped or rewrote (issue 11).  This module is the tree alone, with SHA-256:

* ``leaf_hash(d) = SHA-256(0x00 || d)``, ``node_hash(l, r) = SHA-256(0x01 || l || r)`` (§2.1.1);
* :func:`root` is MTH over a list of leaf hashes (§2.1.1), :func:`inclusion_proof` and
  :func:`consistency_proof` build the proofs of §2.1.3.1 and §2.1.4.1, and
  :func:`verify_inclusion` and :func:`verify_consistency` check them by the algorithms of §2.1.3.2
  and §2.1.4.2, bit for bit, so a proof made by another RFC 9162 implementation checks here.

Pure: bytes in, bytes out; a proof that does not check is ``bad-signature`` (it fails to
authenticate what it claims), a request that makes no sense (an index past the tree) ``malformed``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from qhx_edge.core.errors import BadSignature, Malformed

HASH_SIZE = 32
MAX_PROOF = 64  # hashes in a proof: a tree of 2**63 leaves needs 63


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH of the leaf hashes ``leaves`` (the empty tree's is SHA-256 of nothing)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    level = list(leaves)
    while len(level) > 1:  # pairwise from the left; an odd last node rises as it is (the same tree as §2.1.1)
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(index, leaves) of §2.1.3.1."""
    if not 0 <= index < len(leaves):
        raise Malformed(f"leaf {index} is not in a tree of {len(leaves)}")

    def path(m: int, d: Sequence[bytes]) -> list[bytes]:
        if len(d) == 1:
            return []
        k = _split(len(d))
        if m < k:
            return [*path(m, d[:k]), root(d[k:])]
        return [*path(m - k, d[k:]), root(d[:k])]

    return path(index, leaves)


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """PROOF(old_size, leaves) of §2.1.4.1."""
    if not 0 < old_size <= len(leaves):
        raise Malformed(f"no consistency proof from size {old_size} to {len(leaves)}")

    def subproof(m: int, d: Sequence[bytes], whole: bool) -> list[bytes]:
        if m == len(d):
            return [] if whole else [root(d)]
        k = _split(len(d))
        if m <= k:
            return [*subproof(m, d[:k], whole), root(d[k:])]
        return [*subproof(m - k, d[k:], False), root(d[:k])]

    return subproof(old_size, leaves, True)


def _check(proof: Sequence[bytes]) -> None:
    if len(proof) > MAX_PROOF or any(len(h) != HASH_SIZE for h in proof):
        raise Malformed(f"a proof holds at most {MAX_PROOF} hashes of {HASH_SIZE} bytes")


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], expected_root: bytes) -> None:
    """That leaf hash ``leaf`` is leaf ``index`` of the tree of ``size`` with root ``expected_root`` (§2.1.3.2)."""
    _check(proof)
    if not 0 <= index < size:
        raise Malformed(f"leaf {index} is not in a tree of {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise BadSignature("the inclusion proof is longer than the tree allows")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0 or r != expected_root:
        raise BadSignature(f"leaf {index} is not in the tree of {size} with that root")


def verify_consistency(old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes) -> None:
    """That the tree of ``new_size`` (``new_root``) extends the tree of ``old_size`` (``old_root``) (§2.1.4.2)."""
    _check(proof)
    if not 0 < old_size <= new_size:
        raise Malformed(f"no consistency between sizes {old_size} and {new_size}")
    if old_size == new_size:
        if proof or old_root != new_root:
            raise BadSignature("trees of one size must have one root and need no proof")
        return
    if not proof:
        raise BadSignature("the consistency proof is empty")
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is the first node of the path
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise BadSignature("the consistency proof is longer than the trees allow")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0 or fr != old_root or sr != new_root:
        raise BadSignature(f"the tree of {new_size} does not extend the tree of {old_size} with those roots")
