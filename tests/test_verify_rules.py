"""Every rule of the trust core (qhx_edge/trust.py), one at a time, by error kind.

Each test builds signed documents with the in-memory simulator, hands
``verify_batch`` a node's trust state and a fixed ``now``, and checks the
verdict of every document.  Root rotation has its own table in
test_rotation_table.py.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qhx_edge.core import cbor, documents, errors, trust
from qhx_edge.core.documents import ROLES, RoleKeys, Root
from qhx_edge.core.errors import ClockRollback, Malformed, Oversize, Rejected
from qhx_edge.core.suites import ED25519, MLDSA65, PrivateKey
from qhx_edge.core.trust import Limits, Mark, Outcome, TrustState
from tests.repo_sim import (
    DAY,
    DOMAIN,
    NOW,
    KeyRing,
    RepoSim,
    add_signatures,
    cose_parts,
    duplicate_signatures,
    flip_signature_byte,
    keep_algorithms,
    rewrite_signatures,
    signature_by,
    trust_state,
)

TOL = trust.DEFAULT_CLOCK_TOLERANCE


@pytest.fixture(scope="module")
def ring() -> KeyRing:
    return KeyRing("classical")


@pytest.fixture(scope="module")
def hybrid_ring() -> KeyRing:
    return KeyRing("hybrid")


@pytest.fixture
def sim(ring: KeyRing) -> RepoSim:
    return RepoSim(ring)


@pytest.fixture
def v1(sim: RepoSim) -> dict[str, bytes]:
    return sim.initial()


def held(sim: RepoSim, docs: dict[str, bytes], **kwargs: Any) -> TrustState:
    """A node holding ``docs`` (root, bundle, policy, freshness) as current."""
    return sim.state(
        docs["root"], freshness=docs.get("freshness"), bundle=docs.get("bundle"), policy=docs.get("policy"), **kwargs
    )


def statuses(out: Outcome) -> list[str]:
    return [v.status if v.error is None else f"rejected:{v.error.kind}" for v in out.verdicts]


def kind(out: Outcome, index: int = 0) -> str | None:
    err = out.verdicts[index].error
    return None if err is None else err.kind


def digest(raw: bytes) -> bytes | None:
    """A document's identity (its signed content's digest), None if it does not parse."""
    try:
        return documents.parse(raw).digest
    except Rejected:
        return None


# --- versions: rollback, equal-version conflict, already held -----------------------


def test_rollback_lower_version_is_rejected(sim: RepoSim, v1: dict[str, bytes]) -> None:
    b2, b3 = sim.sign(sim.bundle(2)), sim.sign(sim.bundle(3))
    f3 = sim.sign(sim.freshness(3, bundle=3))
    state = held(sim, {**v1, "bundle": b3, "freshness": f3})  # v2 never held: not in history
    out = trust.verify_batch([b2], state, NOW)
    assert statuses(out) == ["rejected:rollback"]
    assert not out.changed
    # Freshness too.
    f2 = sim.sign(sim.freshness(2, bundle=3))
    assert statuses(trust.verify_batch([f2], state, NOW)) == ["rejected:rollback"]


def test_root_rollback_and_already_held(sim: RepoSim, v1: dict[str, bytes]) -> None:
    r2 = sim.sign(sim.root(2))
    same_v1 = duplicate_signatures(v1["root"], 2)  # same signed content, other bytes
    other_v1 = sim.sign(sim.root(1, issued_at=NOW - 7))  # other content
    state = sim.state(r2)  # held v2, v1 not in history
    assert statuses(trust.verify_batch([v1["root"]], state, NOW)) == ["rejected:rollback"]
    state = sim.state(r2, history=[v1["root"]])
    assert statuses(trust.verify_batch([v1["root"]], state, NOW)) == ["already-held"]
    assert statuses(trust.verify_batch([same_v1], state, NOW)) == ["already-held"]
    assert statuses(trust.verify_batch([other_v1], state, NOW)) == ["rejected:rollback"]
    assert statuses(trust.verify_batch([r2], state, NOW)) == ["already-held"]
    assert statuses(trust.verify_batch([duplicate_signatures(r2, 2)], state, NOW)) == ["already-held"]
    other_v2 = sim.sign(sim.root(2, issued_at=NOW - 7))
    assert statuses(trust.verify_batch([other_v2], state, NOW)) == ["rejected:equal-version-conflict"]


@pytest.mark.parametrize("type_", ["bundle", "policy", "freshness"])
def test_equal_version_with_other_content_is_a_conflict(sim: RepoSim, v1: dict[str, bytes], type_: str) -> None:
    # Other bytes but the same signed content (signatures repeated): the same document.
    same_payload_other_sigs = duplicate_signatures(v1[type_], 2)
    out = trust.verify_batch([same_payload_other_sigs], held(sim, v1), NOW)
    assert statuses(out) == ["already-held"]
    other_payload = {
        "bundle": lambda: sim.sign(sim.bundle(1, tag="other")),
        "policy": lambda: sim.sign(sim.policy(1, tag="other")),
        "freshness": lambda: sim.sign(sim.freshness(1, issued_at=NOW - 30)),
    }[type_]()
    out = trust.verify_batch([other_payload], held(sim, v1), NOW)
    assert statuses(out) == ["rejected:equal-version-conflict"]


def test_same_bytes_again_are_already_held(sim: RepoSim, v1: dict[str, bytes]) -> None:
    out = trust.verify_batch(list(v1.values()), held(sim, v1), NOW)
    assert statuses(out) == ["already-held"] * 4
    assert not out.changed
    assert out.marks == {}
    assert out.clock_high_water == 0  # already-held documents do not move trusted time
    # An older bundle or freshness, even one the node once held, is a replay ...
    b2 = sim.sign(sim.bundle(2))
    f2 = sim.sign(sim.freshness(2, bundle=2))
    state = held(sim, {**v1, "bundle": b2, "freshness": f2}, history=[v1["bundle"], v1["freshness"]])
    out = trust.verify_batch([v1["bundle"], v1["freshness"]], state, NOW)
    assert statuses(out) == ["rejected:rollback", "rejected:rollback"]
    # ... while an older held root is a link of the rotation chain (test_root_rollback_and_already_held).


def test_one_version_twice_in_one_batch(sim: RepoSim, v1: dict[str, bytes]) -> None:
    """Within a batch a version counts once: a copy is a duplicate, other bytes conflict (all of them)."""
    b2, b2_other = sim.sign(sim.bundle(2)), sim.sign(sim.bundle(2, tag="other"))
    f2 = sim.sign(sim.freshness(2, bundle=2))
    state = held(sim, v1)
    out = trust.verify_batch([b2, f2, b2, f2], state, NOW)
    assert statuses(out) == ["applied", "applied", "duplicate", "duplicate"]
    assert [d.payload.type for d in out.accepted] == ["bundle", "freshness"]  # stored once each
    out = trust.verify_batch([b2, b2_other, f2], state, NOW)
    assert statuses(out) == [
        "rejected:equal-version-conflict",
        "rejected:equal-version-conflict",
        "rejected:mix-and-match",  # the bundle it names did not survive
    ]
    assert out.marks == {}
    f2_other = sim.sign(sim.freshness(2, bundle=1))
    out = trust.verify_batch([f2_other, f2], state, NOW)
    assert statuses(out) == ["rejected:equal-version-conflict"] * 2
    # A forged copy is refused for its own fault and cannot get the genuine one refused:
    # duplicates are resolved among validly signed documents only.
    out = trust.verify_batch([flip_signature_byte(b2), b2, f2], state, NOW)
    assert statuses(out) == ["rejected:bad-signature", "applied", "applied"]
    assert [d.payload.type for d in out.accepted] == ["bundle", "freshness"]
    # Roots too: every copy is checked against the chain before copies are resolved.
    r2 = sim.sign(sim.root(2))
    out = trust.verify_batch([r2, duplicate_signatures(r2, 2), r2], state, NOW)
    assert statuses(out) == ["applied", "duplicate", "duplicate"]
    out = trust.verify_batch([flip_signature_byte(r2), r2], state, NOW)
    assert statuses(out) == ["rejected:bad-signature", "applied"]
    r2_other = sim.sign(sim.root(2, issued_at=NOW - 7))  # validly signed, other content: equivocation
    out = trust.verify_batch([r2, r2_other], state, NOW)
    assert statuses(out) == ["rejected:equal-version-conflict"] * 2


# --- times ------------------------------------------------------------------------


def test_expired_documents(sim: RepoSim, v1: dict[str, bytes]) -> None:
    state = held(sim, v1)
    f2 = sim.sign(sim.freshness(2, issued_at=NOW - DAY, expires=NOW - 1))
    assert statuses(trust.verify_batch([f2], state, NOW)) == ["rejected:expired"]
    r2 = sim.sign(sim.root(2, issued_at=NOW - DAY, expires=NOW - 1))
    assert statuses(trust.verify_batch([r2], state, NOW)) == ["rejected:expired"]
    # A bundle the held epoch already names (its mark was reset by a pki rotation), now expired.
    f_names_b2 = sim.sign(sim.freshness(2, bundle=2))
    state = held(sim, {**v1, "freshness": f_names_b2})
    b2_old = sim.sign(sim.bundle(2, issued_at=NOW - DAY, expires=NOW - 1))
    assert statuses(trust.verify_batch([b2_old], state, NOW)) == ["rejected:expired"]
    b2 = sim.sign(sim.bundle(2))
    assert statuses(trust.verify_batch([b2], state, NOW)) == ["applied"]


def test_expiry_boundary(sim: RepoSim, v1: dict[str, bytes]) -> None:
    state = held(sim, v1)
    at_now = sim.sign(sim.freshness(2, issued_at=NOW - 10, expires=NOW))
    assert statuses(trust.verify_batch([at_now], state, NOW)) == ["rejected:expired"]
    one_more = sim.sign(sim.freshness(2, issued_at=NOW - 10, expires=NOW + 1))
    assert statuses(trust.verify_batch([one_more], state, NOW)) == ["applied"]


def test_bundle_expiry_boundary(sim: RepoSim, v1: dict[str, bytes]) -> None:
    state = held(sim, {**v1, "freshness": sim.sign(sim.freshness(2, bundle=2))})
    at_now = sim.sign(sim.bundle(2, issued_at=NOW - 10, expires=NOW))
    assert statuses(trust.verify_batch([at_now], state, NOW)) == ["rejected:expired"]
    one_more = sim.sign(sim.bundle(2, issued_at=NOW - 10, expires=NOW + 1))
    assert statuses(trust.verify_batch([one_more], state, NOW)) == ["applied"]


def test_verify_anchor(sim: RepoSim, v1: dict[str, bytes]) -> None:
    assert trust.verify_anchor(v1["root"], NOW).payload.version == 1
    cases = {
        "expired": sim.sign(sim.root(1, issued_at=NOW - DAY, expires=NOW)),
        "not-yet-valid": sim.sign(sim.root(1, issued_at=NOW + TOL + 1)),
        "malformed": v1["bundle"],  # an anchor must be a root
        "wrong-role": sim.sign(sim.root(1), ["pki-0"]),
        "threshold": sim.sign(sim.root(1, thresholds={"root": 2}, roles={"root": ["root-0", "root-1"]}), ["root-0"]),
        "bad-signature": flip_signature_byte(v1["root"]),
    }
    for expected, raw in cases.items():
        with pytest.raises(Rejected) as exc:
            trust.verify_anchor(raw, NOW)
        assert exc.value.kind == expected
    assert trust.verify_anchor(sim.sign(sim.root(1, issued_at=NOW - DAY, expires=NOW + 1)), NOW)
    assert trust.verify_anchor(sim.sign(sim.root(1, issued_at=NOW + TOL)), NOW)


def test_a_new_freshness_naming_an_expired_bundle_is_refused(sim: RepoSim, v1: dict[str, bytes]) -> None:
    b2_old = sim.sign(sim.bundle(2, issued_at=NOW - DAY, expires=NOW - 1))
    f2 = sim.sign(sim.freshness(2, bundle=2))
    out = trust.verify_batch([b2_old, f2], held(sim, v1), NOW)
    # The freshness names a bundle the node cannot use, so neither becomes current.
    assert [v.status for v in out.verdicts] == ["rejected", "rejected"]
    assert kind(out, 1) == "expired"
    assert out.marks == {}


def test_expiry_holds_after_import(sim: RepoSim) -> None:
    """A held bundle, policy or root past its expiry combines with nothing new (TUF 5.3.10, freeze attacks)."""
    # A held bundle that has expired: a new freshness naming it is refused as expired ...
    v1 = sim.initial()
    b1_short = sim.sign(sim.bundle(1, issued_at=NOW - DAY, expires=NOW - 1))
    f1 = sim.sign(sim.freshness(1, issued_at=NOW - DAY))
    state = held(sim, {**v1, "bundle": b1_short, "freshness": f1})
    f2 = sim.sign(sim.freshness(2))
    out = trust.verify_batch([f2], state, NOW)
    assert statuses(out) == ["rejected:expired"]
    assert "bundle v1" in str(out.verdicts[0].error)
    # ... while newer material, named by a new freshness, moves the domain on.
    b2, f3 = sim.sign(sim.bundle(2)), sim.sign(sim.freshness(3, bundle=2))
    assert statuses(trust.verify_batch([b2, f3], state, NOW)) == ["applied", "applied"]
    # The same for a held policy.
    p1_short = sim.sign(sim.policy(1, issued_at=NOW - DAY, expires=NOW - 1))
    state = held(sim, {**v1, "policy": p1_short, "freshness": f1})
    assert statuses(trust.verify_batch([f2], state, NOW)) == ["rejected:expired"]
    # A held root that has expired: nothing new is accepted under it ...
    r1_short = sim.sign(sim.root(1, issued_at=NOW - DAY, expires=NOW - 1))
    state = sim.state(r1_short, freshness=v1["freshness"], bundle=v1["bundle"], policy=v1["policy"])
    out = trust.verify_batch([b2, f3], state, NOW)
    assert statuses(out) == ["rejected:expired", "rejected:expired"]
    assert "root v1 expired" in str(out.verdicts[0].error)
    # ... but the expired root may still authorise a newer root, and then the rest follows.
    r2 = sim.sign(sim.root(2))
    f3r = sim.sign(sim.freshness(3, root=2, bundle=2))
    assert statuses(trust.verify_batch([r2, b2, f3r], state, NOW)) == ["applied", "applied", "applied"]


@pytest.mark.parametrize(
    ("tolerance", "ahead", "ok"),
    [(TOL, TOL, True), (TOL, TOL + 1, False), (0, 0, True), (0, 1, False), (60, 60, True), (60, 61, False)],
)
def test_not_yet_valid_and_tolerance_boundary(
    sim: RepoSim, v1: dict[str, bytes], tolerance: int, ahead: int, ok: bool
) -> None:
    state = held(sim, v1)
    limits = Limits(clock_tolerance=tolerance)
    f2 = sim.sign(sim.freshness(2, issued_at=NOW + ahead))
    r2 = sim.sign(sim.root(2, issued_at=NOW + ahead))
    b2 = sim.sign(sim.bundle(2, issued_at=NOW + ahead))
    f3 = sim.sign(sim.freshness(3, root=2, bundle=2))
    out = trust.verify_batch([f2], state, NOW, limits)
    assert statuses(out) == (["applied"] if ok else ["rejected:not-yet-valid"])
    out = trust.verify_batch([r2, b2, f3], state, NOW, limits)
    if ok:
        assert statuses(out) == ["applied", "applied", "applied"]
        assert out.clock_high_water == NOW + ahead
    else:
        # The future root is refused, so the freshness naming root v2 cannot hold either.
        assert statuses(out) == ["rejected:not-yet-valid", "rejected:not-yet-valid", "rejected:mix-and-match"]


# --- roles and signatures -----------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "signers"),
    [
        ("bundle", ["policy-0"]),  # a bundle signed by the policy key
        ("bundle", ["root-0"]),  # a root-signed bundle
        ("policy", ["pki-0"]),
        ("freshness", ["pki-0"]),
        ("root", ["freshness-0"]),
    ],
)
def test_wrong_role(sim: RepoSim, v1: dict[str, bytes], type_: str, signers: list[str]) -> None:
    payload = {
        "bundle": sim.bundle(2),
        "policy": sim.policy(2),
        "freshness": sim.freshness(2),
        "root": sim.root(2),
    }[type_]
    raw = sim.sign(payload, signers)
    extra = [sim.sign(sim.freshness(2, **{type_: 2}))] if type_ in ("bundle", "policy") else []
    out = trust.verify_batch([raw, *extra], held(sim, v1), NOW)
    assert kind(out) == "wrong-role"
    assert out.verdicts[0].status == "rejected"
    assert (DOMAIN, type_) not in out.marks


def test_wrong_role_is_reported_before_bad_signatures(sim: RepoSim, v1: dict[str, bytes]) -> None:
    # Signed by the policy key and by a broken pki signature: the diagnosis is type confusion.
    signed = sim.sign(sim.bundle(2), ["pki-0", "policy-0"])
    raw = flip_signature_byte(signed, sig_index(signed, kid=sim.ring.keyid("pki-0")))
    assert kind(trust.verify_batch([raw], held(sim, v1), NOW)) == "wrong-role"


def test_signatures_of_other_roles_beside_a_threshold_are_ignored(sim: RepoSim, v1: dict[str, bytes]) -> None:
    b2 = sim.sign(sim.bundle(2), ["pki-0", "policy-0", "root-0"])
    f2 = sim.sign(sim.freshness(2, bundle=2))
    assert statuses(trust.verify_batch([b2, f2], held(sim, v1), NOW)) == ["applied", "applied"]


def test_bad_signature(sim: RepoSim, v1: dict[str, bytes]) -> None:
    f2 = sim.sign(sim.freshness(2))
    for position in (0, 31, 63):
        out = trust.verify_batch([flip_signature_byte(f2, 0, position)], held(sim, v1), NOW)
        assert statuses(out) == ["rejected:bad-signature"]
    # A broken signature beside a threshold of good ones is ignored (as TUF does).
    sim.roles["freshness"] = ["freshness-0", "freshness-1"]
    r2 = sim.sign(sim.root(2))
    f3 = sim.sign(sim.freshness(3, root=2), ["freshness-1", "freshness-0"])
    out = trust.verify_batch([r2, flip_signature_byte(f3, 0)], held(sim, v1), NOW)
    assert statuses(out) == ["applied", "applied"]


def test_threshold(sim: RepoSim, v1: dict[str, bytes]) -> None:
    sim.roles["pki"] = ["pki-0", "pki-1", "pki-2"]
    sim.thresholds["pki"] = 2
    r2 = sim.sign(sim.root(2))
    f2 = sim.sign(sim.freshness(2, root=2, bundle=2))
    state = held(sim, v1)
    cases = {
        ("pki-0",): "rejected:threshold",
        ("pki-0", "pki-0", "pki-0"): "rejected:threshold",  # one key three times
        ("pki-0", "stranger-0"): "rejected:threshold",  # a key the root does not know
        ("pki-0", "pki-2"): "applied",
    }
    for signers, expected in cases.items():
        out = trust.verify_batch([r2, sim.sign(sim.bundle(2), signers), f2], state, NOW)
        assert statuses(out)[1] == expected, signers


def test_hybrid_needs_both_ed25519_and_mldsa65(hybrid_ring: KeyRing) -> None:
    sim = RepoSim(hybrid_ring)
    v1 = sim.initial()
    state = held(sim, v1)
    b2 = sim.sign(sim.bundle(2))
    f2 = sim.sign(sim.freshness(2, bundle=2))
    assert statuses(trust.verify_batch([b2, f2], state, NOW)) == ["applied", "applied"]

    root = documents.parse(v1["root"]).payload
    assert isinstance(root, Root)
    pki = root.role_keys("pki")
    for algs in ((ED25519,), (MLDSA65,)):
        half = keep_algorithms(b2, algs)
        assert trust.satisfied_keys(documents.parse(half), pki) == (set(), 0)
        assert statuses(trust.verify_batch([half, f2], state, NOW))[0] == "rejected:threshold"
    # Each half twice is still only one half.
    twice = duplicate_signatures(keep_algorithms(b2, (ED25519,)), 2)
    assert statuses(trust.verify_batch([twice, f2], state, NOW))[0] == "rejected:threshold"
    # A valid Ed25519 half with a broken ML-DSA-65 half.
    broken = flip_signature_byte(b2, sig_index(b2, alg=MLDSA65), 100)
    assert statuses(trust.verify_batch([broken, f2], state, NOW))[0] == "rejected:bad-signature"
    # The legacy EdDSA id (-8) is accepted on input for the Ed25519 half.
    key = sim.ring["pki-0"]
    legacy = rewrite_signatures(
        b2, lambda sigs: [signature_by(b2, key, ED25519, {1: -8}), *keep_algorithm_sigs(sigs, MLDSA65)]
    )
    assert statuses(trust.verify_batch([legacy, f2], state, NOW)) == ["applied", "applied"]
    # Ed25519 from one pki key and ML-DSA-65 from another do not make one signer.
    sim.roles["pki"] = ["pki-0", "pki-1"]
    r2 = sim.sign(sim.root(2))
    f3 = sim.sign(sim.freshness(3, root=2, bundle=2))
    mixed = rewrite_signatures(
        keep_algorithms(sim.sign(sim.bundle(2), ["pki-0"]), (ED25519,)),
        lambda sigs: sigs + cose_parts(keep_algorithms(sim.sign(sim.bundle(2), ["pki-1"]), (MLDSA65,)))[3],
    )
    assert statuses(trust.verify_batch([r2, mixed, f3], state, NOW))[1] == "rejected:threshold"


def sig_index(raw: bytes, *, alg: int | None = None, kid: str | None = None) -> int:
    """The index of the first signature with ``alg`` and/or key id ``kid`` (envelopes are in canonical order)."""
    for i, (sprot, sunprot, _) in enumerate(cose_parts(raw)[3]):
        if (alg is None or cbor.decode(sprot, max_size=64)[1] == alg) and (kid is None or sunprot[4].hex() == kid):
            return i
    raise AssertionError("no such signature")


def keep_algorithm_sigs(sigs: list[list[Any]], alg: int) -> list[list[Any]]:
    return [s for s in sigs if cbor.decode(s[0], max_size=64)[1] == alg]


# --- mix-and-match -------------------------------------------------------------------


def test_bundle_not_named_by_the_held_freshness(sim: RepoSim, v1: dict[str, bytes]) -> None:
    b2 = sim.sign(sim.bundle(2))
    out = trust.verify_batch([b2], held(sim, v1), NOW)
    assert statuses(out) == ["rejected:mix-and-match"]
    # With no freshness held at all.
    out = trust.verify_batch([b2], held(sim, {**v1, "freshness": None}), NOW)
    assert statuses(out) == ["rejected:mix-and-match"]
    # Control: the freshness naming it lets it in.
    f2 = sim.sign(sim.freshness(2, bundle=2))
    assert statuses(trust.verify_batch([b2, f2], held(sim, v1), NOW)) == ["applied", "applied"]


def test_freshness_naming_a_version_neither_held_nor_supplied(sim: RepoSim, v1: dict[str, bytes]) -> None:
    b2 = sim.sign(sim.bundle(2))
    for bad in (sim.freshness(2, bundle=3), sim.freshness(2, policy=2)):
        f = sim.sign(bad)
        assert statuses(trust.verify_batch([f], held(sim, v1), NOW)) == ["rejected:mix-and-match"]
        out = trust.verify_batch([b2, f], held(sim, v1), NOW)
        assert kind(out, 1) == "mix-and-match"
        assert out.marks == {}
    # Naming an older bundle than the one held is no better.
    f3 = sim.sign(sim.freshness(3, bundle=2))
    state = held(sim, {**v1, "bundle": b2, "freshness": f3}, history=[v1["bundle"]])
    f4 = sim.sign(sim.freshness(4, bundle=1))
    assert statuses(trust.verify_batch([f4], state, NOW)) == ["rejected:mix-and-match"]


def test_freshness_naming_another_root_version(sim: RepoSim, v1: dict[str, bytes]) -> None:
    ahead = sim.sign(sim.freshness(2, root=2))
    assert statuses(trust.verify_batch([ahead], held(sim, v1), NOW)) == ["rejected:mix-and-match"]
    # A root rotation in the same batch: the freshness must name the new root.
    r2 = sim.sign(sim.root(2))
    behind = sim.sign(sim.freshness(2, root=1))
    assert statuses(trust.verify_batch([r2, behind], held(sim, v1), NOW)) == ["applied", "rejected:mix-and-match"]
    assert statuses(trust.verify_batch([r2, ahead], held(sim, v1), NOW)) == ["applied", "applied"]


def test_history_versions_in_one_batch(sim: RepoSim, v1: dict[str, bytes]) -> None:
    bundles = {n: sim.sign(sim.bundle(n)) for n in range(2, 7)}
    f2 = sim.sign(sim.freshness(2, bundle=5))
    batch = [bundles[n] for n in (2, 3, 4, 5)] + [f2]
    for seed in range(4):
        order = batch[:]
        random.Random(seed).shuffle(order)
        out = trust.verify_batch(order, held(sim, v1), NOW)
        got = {(v.doc.type, v.doc.payload.version): v.status for v in out.verdicts if v.doc}
        assert got == {
            ("bundle", 2): "history",
            ("bundle", 3): "history",
            ("bundle", 4): "history",
            ("bundle", 5): "applied",
            ("freshness", 2): "applied",
        }
        assert out.marks == {
            (DOMAIN, "bundle"): Mark(5, digest(bundles[5])),
            (DOMAIN, "freshness"): Mark(2, digest(f2)),
        }
        assert len(out.accepted) == 5
    # A version beyond the one named is not taken.
    out = trust.verify_batch([*batch, bundles[6]], held(sim, v1), NOW)
    assert statuses(out)[-1] == "rejected:mix-and-match"
    assert out.marks[(DOMAIN, "bundle")].version == 5


def test_older_freshness_in_the_batch_is_history(sim: RepoSim, v1: dict[str, bytes]) -> None:
    b2 = sim.sign(sim.bundle(2))
    f2 = sim.sign(sim.freshness(2, bundle=1))
    f3 = sim.sign(sim.freshness(3, bundle=2))
    f4_bad = sim.sign(sim.freshness(4, bundle=9))
    out = trust.verify_batch([f4_bad, f3, b2, f2], held(sim, v1), NOW)
    assert statuses(out) == ["rejected:mix-and-match", "applied", "applied", "history"]
    assert out.marks[(DOMAIN, "freshness")] == Mark(3, digest(f3))


# --- clock --------------------------------------------------------------------------


def test_check_clock_boundary() -> None:
    high = NOW + 1000
    trust.check_clock(high - TOL, high)  # exactly at the tolerance: fine
    trust.check_clock(high + DAY, high)  # ahead: fine
    with pytest.raises(ClockRollback) as exc:
        trust.check_clock(high - TOL - 1, high)
    assert exc.value.kind == "clock-rollback"
    trust.check_clock(high - 10, high, tolerance=10)
    with pytest.raises(ClockRollback):
        trust.check_clock(high - 11, high, tolerance=10)


def test_verify_batch_refuses_a_clock_behind_trusted_time(sim: RepoSim, v1: dict[str, bytes]) -> None:
    f2 = sim.sign(sim.freshness(2))
    behind = held(sim, v1, clock_high_water=NOW + TOL + 1)
    for batch in ([], [f2], list(v1.values())):
        with pytest.raises(ClockRollback) as exc:
            trust.verify_batch(batch, behind, NOW)
        assert exc.value.kind == "clock-rollback"
    with pytest.raises(ClockRollback):
        trust.verify_batch([f2], held(sim, v1, clock_high_water=NOW + 11), NOW, Limits(clock_tolerance=10))
    within = held(sim, v1, clock_high_water=NOW + TOL)
    out = trust.verify_batch([f2], within, NOW)
    assert statuses(out) == ["applied"]
    assert out.clock_high_water == NOW + TOL  # never moves back


def test_clock_high_water_is_the_latest_issued_at_accepted(sim: RepoSim, v1: dict[str, bytes]) -> None:
    b2 = sim.sign(sim.bundle(2, issued_at=NOW + 250))  # becomes history
    b3 = sim.sign(sim.bundle(3, issued_at=NOW - 500))
    f2 = sim.sign(sim.freshness(2, bundle=3, issued_at=NOW + 100))
    rejected = sim.sign(sim.policy(2, issued_at=NOW + 299), ["pki-0"])  # wrong role
    out = trust.verify_batch([b2, b3, f2, rejected], held(sim, v1, clock_high_water=NOW - DAY), NOW)
    assert statuses(out) == ["history", "applied", "applied", "rejected:wrong-role"]
    assert out.clock_high_water == NOW + 250
    # Nothing accepted: the mark stays where it was.
    out = trust.verify_batch([rejected], held(sim, v1, clock_high_water=NOW - DAY), NOW)
    assert out.clock_high_water == NOW - DAY
    # A mark beyond every accepted document stays too.
    out = trust.verify_batch([b2, b3, f2], held(sim, v1, clock_high_water=NOW + TOL), NOW)
    assert out.clock_high_water == NOW + TOL


# --- domains, caps, malformed input ---------------------------------------------------


def test_unknown_domain(sim: RepoSim, v1: dict[str, bytes]) -> None:
    beta = RepoSim(KeyRing("classical"), domain="beta.example")
    foreign = beta.sign(beta.freshness(2))
    f2 = sim.sign(sim.freshness(2))
    out = trust.verify_batch([foreign, f2], held(sim, v1), NOW)
    assert statuses(out) == ["rejected:unknown-domain", "applied"]
    assert out.verdicts[0].doc is not None
    assert out.marks == {(DOMAIN, "freshness"): Mark(2, digest(f2))}
    # Once trusted, the same document is fine: each domain is judged by its own root.
    b1 = beta.initial()
    both = trust_state(held(sim, v1).domains[DOMAIN], beta.view(b1["root"], bundle=b1["bundle"], policy=b1["policy"]))
    out = trust.verify_batch([foreign, f2], both, NOW)
    assert statuses(out) == ["applied", "applied"]
    assert set(out.marks) == {(DOMAIN, "freshness"), ("beta.example", "freshness")}
    # A beta document signed with alpha's freshness key is not beta's.
    impostor = sim.sign(beta.freshness(2), ["freshness-0"])
    assert statuses(trust.verify_batch([impostor], both, NOW)) == ["rejected:threshold"]


def test_batch_size_cap(sim: RepoSim, v1: dict[str, bytes]) -> None:
    f2 = sim.sign(sim.freshness(2))
    with pytest.raises(Oversize) as exc:
        trust.verify_batch([f2, f2, f2], held(sim, v1), NOW, Limits(max_batch=2))
    assert exc.value.kind == "oversize"
    out = trust.verify_batch([f2, f2], held(sim, v1), NOW, Limits(max_batch=2))
    assert statuses(out) == ["applied", "duplicate"]


def test_malformed_documents_are_rejected_one_by_one(sim: RepoSim, v1: dict[str, bytes]) -> None:
    f2 = sim.sign(sim.freshness(2))
    out = trust.verify_batch([b"\xa0", f2, b"not cbor at all"], held(sim, v1), NOW)
    assert [v.status for v in out.verdicts] == ["rejected", "applied", "rejected"]
    assert out.verdicts[0].doc is None
    assert kind(out, 0) == "malformed"
    assert kind(out, 2) == "malformed"


# --- fast-forward recovery --------------------------------------------------------------


def test_freshness_key_rotation_resets_its_mark(sim: RepoSim, v1: dict[str, bytes]) -> None:
    f9 = sim.sign(sim.freshness(9))
    state = held(sim, {**v1, "freshness": f9}, history=[v1["freshness"]])
    # Without a rotation, a lower freshness version is a rollback.
    low = sim.sign(sim.freshness(2))
    assert statuses(trust.verify_batch([low], state, NOW)) == ["rejected:rollback"]

    sim.roles["freshness"] = ["freshness-1"]  # the online key was compromised and replaced
    r2 = sim.sign(sim.root(2))
    out = trust.verify_batch([r2], state, NOW)
    assert statuses(out) == ["applied"]
    assert out.resets == {(DOMAIN, "freshness")}  # pki, policy keys unchanged: their marks stand

    # The node applies the reset (the store drops the freshness mark and history) ...
    after = held(sim, {**v1, "root": r2, "freshness": None})
    f1_new = sim.sign(sim.freshness(1, root=2))
    out = trust.verify_batch([f1_new], after, NOW)
    assert statuses(out) == ["applied"]
    assert out.marks == {(DOMAIN, "freshness"): Mark(1, digest(f1_new))}
    # ... and the old key no longer counts.
    f10_old = sim.sign(sim.freshness(10, root=2), ["freshness-0"])
    assert statuses(trust.verify_batch([f10_old], after, NOW)) == ["rejected:threshold"]

    # In one batch, rotation and the lower new freshness together.
    out = trust.verify_batch([f1_new, r2], state, NOW)
    assert statuses(out) == ["applied", "applied"]
    assert out.resets == {(DOMAIN, "freshness")}
    assert out.marks[(DOMAIN, "freshness")] == Mark(1, digest(f1_new))


PKI_TYPES = {(DOMAIN, "bundle"), (DOMAIN, "delegation"), (DOMAIN, "revocation")}  # the pki role signs these


def test_role_changes_reset_the_types_of_the_role(sim: RepoSim) -> None:
    sim.roles["pki"] = ["pki-0", "pki-1"]
    v1 = sim.initial()
    state = held(sim, v1)
    cases = [
        ({"pki": ["pki-1", "pki-0"]}, {}, set()),  # key order alone is no change
        ({"pki": ["pki-0", "pki-2"]}, {}, PKI_TYPES),  # one key replaced
        ({"pki": ["pki-0"]}, {}, PKI_TYPES),  # one key removed
        ({}, {"pki": 2}, PKI_TYPES),  # threshold raised
        ({"policy": ["policy-1"]}, {}, {(DOMAIN, "policy")}),
        ({"root": ["root-1"]}, {}, set()),  # root keys: the chain itself guards root versions
        ({"freshness": ["freshness-1"], "pki": ["pki-1"]}, {}, {(DOMAIN, "freshness"), *PKI_TYPES}),
    ]
    for roles, thresholds, resets in cases:
        payload = sim.root(2, roles=roles, thresholds=thresholds)
        r2 = sim.sign(payload, ["root-0", *roles.get("root", [])])
        out = trust.verify_batch([r2], state, NOW)
        assert statuses(out) == ["applied"], roles
        assert out.resets == resets, (roles, thresholds)


# --- property: any subset, any order -----------------------------------------------------


@dataclass(frozen=True)
class PoolDoc:
    raw: bytes
    signers: frozenset[str]  # keys whose signatures on raw are complete and valid
    label: str


class Pool:
    """Two domains' worth of documents, honest and tampered, and the node's starting state."""

    def __init__(self) -> None:
        alpha = RepoSim(KeyRing("classical"))
        beta = RepoSim(KeyRing("hybrid"), domain="beta.example")
        gamma = RepoSim(alpha.ring, domain="gamma.example")
        self.sims = {alpha.domain: alpha, beta.domain: beta}
        alpha.roles["policy"], alpha.thresholds["policy"] = ["policy-0", "policy-1"], 2
        a1, b1 = alpha.initial(), beta.initial()
        self.state = trust_state(
            alpha.view(a1["root"], freshness=a1["freshness"], bundle=a1["bundle"], policy=a1["policy"]),
            beta.view(b1["root"], freshness=b1["freshness"], bundle=b1["bundle"], policy=b1["policy"]),
            clock_high_water=NOW - DAY,
        )
        self.roots: dict[tuple[str, int], Root] = {}
        for sim, docs in ((alpha, a1), (beta, b1)):
            root = documents.parse(docs["root"]).payload
            assert isinstance(root, Root)
            self.roots[(sim.domain, 1)] = root
        self.docs: list[PoolDoc] = []

        def add(sim: RepoSim, payload: Any, signers: Sequence[str], label: str, raw: bytes | None = None) -> bytes:
            raw = sim.sign(payload, signers) if raw is None else raw
            self.docs.append(PoolDoc(raw, frozenset(signers), label))
            if isinstance(payload, Root):
                self.roots[(sim.domain, payload.version)] = payload
            return raw

        # alpha: root v2 rotates the freshness key, v3 the root key.
        alpha.roles["freshness"] = ["freshness-1"]
        add(alpha, alpha.root(2), ["root-0"], "a root v2")
        alpha.roles["root"] = ["root-1"]
        r3 = alpha.root(3)
        add(alpha, r3, ["root-0", "root-1"], "a root v3")
        add(alpha, r3, ["root-1"], "a root v3 without the old key")
        add(alpha, r3, ["root-0"], "a root v3 without the new key")
        add(alpha, alpha.root(4, issued_at=NOW + TOL + 5), ["root-1"], "a root v4 from the future")
        b2 = add(alpha, alpha.bundle(2), ["pki-0"], "a bundle v2")
        add(alpha, alpha.bundle(2), ["pki-0"], "a bundle v2, signed twice", duplicate_signatures(b2, 2))
        add(alpha, alpha.bundle(3), ["pki-0"], "a bundle v3")
        add(alpha, alpha.bundle(3, tag="x"), ["policy-0"], "a bundle v3 by the policy key")
        b4 = alpha.sign(alpha.bundle(4))
        add(alpha, alpha.bundle(4), [], "a bundle v4, flipped", flip_signature_byte(b4))
        add(alpha, alpha.bundle(5, issued_at=NOW - DAY, expires=NOW - 5), ["pki-0"], "a bundle v5, expired")
        add(alpha, alpha.policy(2), ["policy-0", "policy-1"], "a policy v2 (2 of 2)")
        p2 = alpha.sign(alpha.policy(2, tag="y"), ["policy-0", "policy-0"])
        add(alpha, alpha.policy(2, tag="y"), ["policy-0"], "a policy v2, one key twice", p2)
        add(alpha, alpha.policy(2, tag="x"), ["root-0"], "a policy v2 by the old root key")
        add(alpha, alpha.freshness(2, bundle=2, policy=2), ["freshness-0"], "a freshness v2 (old key)")
        add(alpha, alpha.freshness(3, bundle=3), ["freshness-0"], "a freshness v3 (old key)")
        add(alpha, alpha.freshness(1, root=2, bundle=2), ["freshness-1"], "a freshness v1 (new key, root 2)")
        add(alpha, alpha.freshness(4, root=3, bundle=3, policy=2), ["freshness-1"], "a freshness v4 (new key)")
        add(alpha, alpha.freshness(5, root=3, bundle=5), ["freshness-1"], "a freshness v5 naming an expired bundle")
        add(alpha, alpha.freshness(6, root=3, expires=NOW), ["freshness-1"], "a freshness v6, expired")
        fp7 = alpha.freshness(7, root=3, bundle=2)
        f7 = add_signatures(alpha.sign(fp7, ["freshness-1"]), [alpha.ring["pki-0"]])
        add(alpha, fp7, ["freshness-1", "pki-0"], "a freshness v7, countersigned by pki", f7)
        # beta (hybrid): whole signatures and halves.
        hb2 = add(beta, beta.bundle(2), ["pki-0"], "b bundle v2")
        add(beta, beta.bundle(2), [], "b bundle v2, Ed25519 only", keep_algorithms(hb2, (ED25519,)))
        add(beta, beta.bundle(2), [], "b bundle v2, ML-DSA only", keep_algorithms(hb2, (MLDSA65,)))
        add(beta, beta.bundle(3), [], "b bundle v3, ML-DSA flipped", flip_signature_byte(beta.sign(beta.bundle(3)), 1))
        add(beta, beta.freshness(2, bundle=2), ["freshness-0"], "b freshness v2")
        add(beta, beta.freshness(3, bundle=3), ["freshness-0"], "b freshness v3")
        # Neither trusted nor parseable.
        self.docs.append(PoolDoc(gamma.sign(gamma.freshness(2)), frozenset(), "gamma freshness"))
        self.docs.append(PoolDoc(b2[:-3], frozenset(), "truncated"))
        self.by_raw = {d.raw: d for d in self.docs}

    def names(self, domain: str, root: Root, role: str) -> set[str]:
        ring = self.sims[domain].ring
        return {n for n in (ring.name_of(k) for k in root.roles[role].keyids) if n is not None}

    def meets(self, domain: str, root: Root, role: str, signers: frozenset[str]) -> bool:
        return len(signers & self.names(domain, root, role)) >= root.roles[role].threshold


@functools.cache
def pool() -> Pool:
    """Built once per module: it signs some thirty documents."""
    return Pool()


KINDS = set(errors.all_kinds())


@settings(max_examples=800, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_subset_in_any_order_is_judged_by_the_rules(data: st.DataObject) -> None:
    p = pool()
    picks = data.draw(st.lists(st.integers(0, len(p.docs) - 1), max_size=14))
    batch = [p.docs[i].raw for i in picks]
    try:
        out = trust.verify_batch(batch, p.state, NOW)
    except Rejected as exc:  # pragma: no cover - nothing here is oversize or behind the clock
        pytest.fail(f"batch-level rejection {exc.kind}: {exc}")

    assert len(out.verdicts) == len(batch)
    assert [v.index for v in out.verdicts] == list(range(len(batch)))
    current: dict[str, Root] = {}
    for domain, view in p.state.domains.items():
        mark = out.marks.get((domain, "root"))
        current[domain] = p.roots[(domain, mark.version)] if mark else view.root.payload
    applied: dict[tuple[str, str], list[int]] = {}
    for v, i in zip(out.verdicts, picks, strict=True):
        assert v.status in ("applied", "history", "already-held", "duplicate", "rejected")
        if v.status == "rejected":
            assert isinstance(v.error, Rejected)
            assert v.error.kind in KINDS
            continue
        assert v.error is None
        assert v.doc is not None
        if v.status in ("already-held", "duplicate"):
            same = [r for r in batch if digest(r) == v.doc.digest]  # one signed content
            assert len(same) > 1 or v.status == "already-held"
            continue
        d = p.docs[i]
        t, domain, version = v.doc.type, v.doc.payload.domain, v.doc.payload.version
        assert v.doc.payload.expires > NOW or v.status == "history", d.label
        assert v.doc.payload.issued_at <= NOW + TOL, d.label
        if (domain, t) not in out.resets and t in p.state.domains[domain].marks:
            assert version > p.state.domains[domain].marks[t].version, d.label  # never back
        if t == "root":
            # One version at a time: the previous one is held or accepted in this batch.
            assert version - 1 == p.state.domains[domain].root.payload.version or any(
                w.doc is not None
                and w.status == "history"
                and (w.doc.payload.domain, w.doc.type, w.doc.payload.version) == (domain, "root", version - 1)
                for w in out.verdicts
            ), d.label
            # Signed by the root thresholds of the previous version and its own.
            assert p.meets(domain, p.roots[(domain, version - 1)], "root", d.signers), d.label
            assert p.meets(domain, p.roots[(domain, version)], "root", d.signers), d.label
        else:
            role = documents.ROLE_FOR_TYPE[t]
            assert p.meets(domain, current[domain], role, d.signers), d.label
        if v.status == "applied":
            applied.setdefault((domain, t), []).append(version)
            assert out.marks[(domain, t)] == Mark(version, v.doc.digest)

    # One current document per (domain, type), and the marks are exactly those.
    assert all(len(vs) == 1 for vs in applied.values()), applied
    assert set(out.marks) == set(applied)
    # A bundle or policy becomes current only as the (new or held) freshness epoch names it.
    for domain, view in p.state.domains.items():
        fresh_mark = out.marks.get((domain, "freshness"))
        if fresh_mark is not None:
            epoch = next(v.doc.payload for v in out.verdicts if v.doc is not None and v.doc.digest == fresh_mark.digest)
            assert epoch.versions["root"] == current[domain].version
        elif (domain, "freshness") in out.resets:
            epoch = None
        else:
            epoch = view.freshness.payload if view.freshness else None
        for t in ("bundle", "policy"):
            if (domain, t) in applied:
                assert epoch is not None
                assert applied[(domain, t)] == [epoch.versions[t]]


def test_held_history_carried_with_the_current_version_is_a_no_op(sim: RepoSim, v1: dict[str, bytes]) -> None:
    """Re-importing a pack that carries history is a no-op; the same old documents alone are a replay."""
    state = held(sim, v1)
    history = [sim.sign(sim.bundle(v)) for v in range(2, 6)]
    f5 = sim.sign(sim.freshness(2, bundle=5))
    out = trust.verify_batch([*history, f5], state, NOW)
    assert statuses(out) == ["history"] * 3 + ["applied", "applied"]
    # A node holding what that batch accepted.
    after = sim.state(
        v1["root"], freshness=f5, bundle=history[-1], policy=v1["policy"], history=[*history[:-1], v1["bundle"]]
    )
    again = trust.verify_batch([*history, f5], after, NOW)
    assert statuses(again) == ["already-held"] * 5
    # Without the current bundle v5 beside them, held older versions are a replay.
    replay = trust.verify_batch(history[:2], after, NOW)
    assert statuses(replay) == ["rejected:rollback"] * 2


def test_expired_newest_bundle_is_reported_as_expired(sim: RepoSim, v1: dict[str, bytes]) -> None:
    """A long-lived freshness naming an expired bundle: the bundle is `expired`, not only unnamed."""
    state = held(sim, v1)
    b2 = sim.sign(sim.bundle(2, expires=NOW - 1))
    f2 = sim.sign(sim.freshness(2, bundle=2))
    out = trust.verify_batch([b2, f2], state, NOW)
    assert statuses(out) == ["rejected:expired", "rejected:expired"]  # the freshness names an expired bundle
    assert out.first_error() is not None
    assert out.first_error().kind == "expired"  # type: ignore[union-attr]


def _root_of(suite: str, key: PrivateKey, version: int) -> Root:
    pub = key.public
    return Root(
        domain="suite.example",
        version=version,
        issued_at=NOW - 10,
        expires=NOW + 86400,
        suite=suite,
        keys={pub.keyid: pub},
        roles={r: RoleKeys((pub.keyid,), 1) for r in ROLES},
    )


def test_root_keys_must_match_the_suite_and_rotation_cannot_drop_post_quantum() -> None:
    hybrid, classical = PrivateKey.generate("hybrid"), PrivateKey.generate("classical")
    # A "hybrid" root listing an Ed25519-only key would let one algorithm satisfy a role.
    mislabelled = documents.sign(_root_of("hybrid", classical, 1), [classical])
    with pytest.raises(Malformed, match="suite hybrid"):
        documents.parse(mislabelled)
    r1 = documents.sign(_root_of("hybrid", hybrid, 1), [hybrid])
    down = documents.sign(_root_of("classical", classical, 2), [hybrid, classical])
    state = TrustState({"suite.example": trust.DomainView(root=documents.parse(r1))})  # type: ignore[arg-type]
    out = trust.verify_batch([down], state, NOW)
    assert statuses(out) == ["rejected:downgrade"]
    # Moving up (classical -> hybrid) is allowed.
    c1 = documents.sign(_root_of("classical", classical, 1), [classical])
    up = documents.sign(_root_of("hybrid", hybrid, 2), [classical, hybrid])
    state = TrustState({"suite.example": trust.DomainView(root=documents.parse(c1))})  # type: ignore[arg-type]
    assert statuses(trust.verify_batch([up], state, NOW)) == ["applied"]


def test_a_forged_copy_of_a_held_version_is_a_bad_signature_not_a_conflict(sim: RepoSim, v1: dict[str, bytes]) -> None:
    """Only a validly signed document can claim an equal-version conflict."""
    state = held(sim, v1)
    forged = flip_signature_byte(sim.sign(sim.bundle(1, tag="forged")))
    assert statuses(trust.verify_batch([forged], state, NOW)) == ["rejected:bad-signature"]
    genuine_other = sim.sign(sim.bundle(1, tag="other"))
    assert statuses(trust.verify_batch([genuine_other], state, NOW)) == ["rejected:equal-version-conflict"]


def test_a_parsed_batch_gives_the_same_verdicts(sim: RepoSim, v1: dict[str, bytes]) -> None:
    """verify_batch may be handed parse_batch's result; it must be what it would parse itself."""
    b2, f2 = sim.sign(sim.bundle(2)), sim.sign(sim.freshness(2, bundle=2))
    plain = trust.verify_batch([b2, f2, b"junk"], held(sim, v1), NOW)
    parsed = trust.parse_batch([b2, f2, b"junk"])
    given_ = trust.verify_batch([b2, f2, b"junk"], held(sim, v1), NOW, parsed=parsed)
    assert plain.marks == given_.marks
    assert statuses(plain) == statuses(given_) == ["applied", "applied", "rejected:malformed"]
    with pytest.raises(ValueError, match="one parsed item"):
        trust.verify_batch([b2, f2], held(sim, v1), NOW, parsed=parsed[:1])
