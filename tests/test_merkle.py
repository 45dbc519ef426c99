"""Merkle trees of RFC 9162 §2.1 (qhx_edge/core/merkle.py): roots against the recursive definition
of MTH, every inclusion and consistency proof of small trees checked by the verification algorithms
of §2.1.3.2 and §2.1.4.2, and every altered leaf, proof, index or root refused.  (A tree's size is
bound to its root by the signed tree head, not by a proof: a proof alone may check for several
sizes of the same shape.)"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qhx_edge.core import merkle
from qhx_edge.core.errors import BadSignature, Malformed


def mth(leaves: Sequence[bytes]) -> bytes:
    """MTH exactly as §2.1.1 defines it, on leaf data."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def tree(n: int) -> tuple[list[bytes], list[bytes]]:
    data = [b"receipt %d" % i for i in range(n)]
    return data, [merkle.leaf_hash(d) for d in data]


def test_the_root_is_mth_and_the_empty_tree_is_the_hash_of_nothing() -> None:
    for n in range(0, 70):
        data, leaves = tree(n)
        assert merkle.root(leaves) == mth(data), n
    assert merkle.root([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_every_inclusion_and_consistency_proof_of_small_trees_checks() -> None:
    for n in range(1, 34):
        _, leaves = tree(n)
        r = merkle.root(leaves)
        for i in range(n):
            merkle.verify_inclusion(leaves[i], i, n, merkle.inclusion_proof(leaves, i), r)
        for m in range(1, n + 1):
            merkle.verify_consistency(m, n, merkle.consistency_proof(leaves, m) if m < n else [],
                                      merkle.root(leaves[:m]), r)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(n=st.integers(2, 300), data=st.data())
def test_anything_altered_is_refused(n: int, data: st.DataObject) -> None:
    _, leaves = tree(n)
    r = merkle.root(leaves)
    i = data.draw(st.integers(0, n - 1))
    proof = merkle.inclusion_proof(leaves, i)
    wrong = [
        (leaves[(i + 1) % n], i, n, proof, r),  # another leaf
        (leaves[i], (i + 1) % n, n, proof, r),  # another place
        (leaves[i], i, n, proof, merkle.leaf_hash(b"x")),  # another root
        (leaves[i], i, n, [*proof, proof[0]] if proof else [r], r),  # a hash too many
    ]
    if proof:
        j = data.draw(st.integers(0, len(proof) - 1))
        bad = bytearray(proof[j])
        bad[data.draw(st.integers(0, 31))] ^= 1 << data.draw(st.integers(0, 7))
        wrong.append((leaves[i], i, n, [*proof[:j], bytes(bad), *proof[j + 1 :]], r))
        wrong.append((leaves[i], i, n, proof[:-1], r))  # a hash too few
    for leaf, index, size, p, root in wrong:
        if (leaf, index, size, p, root) == (leaves[i], i, n, proof, r):
            continue
        with pytest.raises((BadSignature, Malformed)):
            merkle.verify_inclusion(leaf, index, size, p, root)
    m = data.draw(st.integers(1, n - 1))
    c = merkle.consistency_proof(leaves, m)
    old = merkle.root(leaves[:m])
    merkle.verify_consistency(m, n, c, old, r)
    rewritten = merkle.root([*leaves[: m - 1], merkle.leaf_hash(b"rewritten")])  # a dropped or rewritten leaf
    for args in ((m, n, c, rewritten, r), (m, n, c, old, merkle.leaf_hash(b"x")), (m, n, [], old, r),
                 (m, n, c[:-1], old, r)):  # fmt: skip
        with pytest.raises((BadSignature, Malformed)):
            merkle.verify_consistency(*args)


def test_requests_that_make_no_sense_are_malformed() -> None:
    _, leaves = tree(5)
    with pytest.raises(Malformed):
        merkle.inclusion_proof(leaves, 5)
    with pytest.raises(Malformed):
        merkle.consistency_proof(leaves, 0)
    with pytest.raises(Malformed):
        merkle.verify_inclusion(leaves[0], 0, 5, [b"short"], merkle.root(leaves))
    with pytest.raises(Malformed):
        merkle.verify_consistency(6, 5, [], merkle.root(leaves), merkle.root(leaves))
