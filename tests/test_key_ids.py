"""One key, one id: a hybrid key's parts in another order are malformed, never a second "distinct" key.

Key ids hash a key's (algorithm, public key) pairs in order.  Before the order
was fixed, the same hybrid key listed twice in a root, once per order, gave two
ids, and one private key met a threshold of two.
"""

from __future__ import annotations

import pytest

from qhx_edge.core import documents as D  # noqa: N812
from qhx_edge.core import suites
from qhx_edge.core.errors import Malformed
from qhx_edge.core.suites import PrivateKey, PublicKey


def test_a_hybrid_key_in_registry_order_parses_and_keeps_its_id() -> None:
    key = PrivateKey.generate("hybrid").public
    again = PublicKey.from_cbor(key.to_cbor())
    assert again.keyid == key.keyid
    assert again.algs == suites.SUITES["hybrid"]


def test_the_same_key_in_the_other_order_is_malformed() -> None:
    key = PrivateKey.generate("hybrid").public
    with pytest.raises(Malformed, match="registry order"):
        PublicKey.from_cbor(list(reversed(key.to_cbor())))


def test_one_private_key_cannot_meet_a_threshold_of_two() -> None:
    signer = PrivateKey.generate("hybrid")
    parts = signer.public.to_cbor()
    swapped = list(reversed(parts))
    swapped_id = suites._keyid(tuple((alg, raw) for alg, raw in swapped))  # what that order would hash to
    root = {
        "type": "root",
        "domain": "alpha.example",
        "version": 1,
        "issued_at": 0,
        "expires": 10,
        "suite": "hybrid",
        "keys": {signer.public.keyid: parts, swapped_id: swapped},
        "roles": {r: {"keyids": [signer.public.keyid], "threshold": 1} for r in D.ROLES},
    }
    root["roles"]["root"] = {"keyids": [signer.public.keyid, swapped_id], "threshold": 2}
    with pytest.raises(Malformed, match="registry order"):
        D.Root.from_dict(root)
