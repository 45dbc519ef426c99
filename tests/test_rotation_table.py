"""Root key rotation, as a table (after python-tuf's test_updater_key_rotations.py).

Each row is a list of root versions.  Version 1 is the node's anchor; every
later version names the root keys it trusts (indexes into ``root-<i>``), its
threshold, the keys that sign it, and the expected result: ``None`` when the
node accepts it, otherwise the error kind.  A version N+1 must carry the root
threshold of N *and* of N+1 (TUF 5.3.4), walked one version at a time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from qhx_edge.core import documents, trust
from qhx_edge.core.errors import Malformed, ThresholdNotMet
from qhx_edge.core.suites import ED25519, MLDSA65
from qhx_edge.core.trust import Mark
from tests.repo_sim import (
    DAY,
    DOMAIN,
    NOW,
    KeyRing,
    RepoSim,
    cose_parts,
    duplicate_signatures,
    keep_algorithms,
    one_key_many_ways,
    rewrite_signatures,
    with_root_role,
)


@dataclass(frozen=True)
class MdVersion:
    keys: list[int]
    threshold: int
    sigs: list[int]
    result: str | None = None


# fmt: off
ROTATIONS: dict[str, list[MdVersion]] = {
    "1-of-1 key rotation": [
        MdVersion(keys=[1], threshold=1, sigs=[1]),
        MdVersion(keys=[2], threshold=1, sigs=[2, 1]),
        MdVersion(keys=[3], threshold=1, sigs=[3, 2]),
    ],
    "1-of-1 key rotation, unused signatures": [
        MdVersion(keys=[1], threshold=1, sigs=[3, 1, 4]),
        MdVersion(keys=[2], threshold=1, sigs=[3, 2, 1, 4]),
        MdVersion(keys=[3], threshold=1, sigs=[3, 2, 4]),
    ],
    "1-of-1 key rotation fails: not signed by the old key": [
        MdVersion(keys=[1], threshold=1, sigs=[1]),
        MdVersion(keys=[2], threshold=1, sigs=[2, 3, 4], result="threshold"),
    ],
    "1-of-1 key rotation fails: not signed by the new key": [
        MdVersion(keys=[1], threshold=1, sigs=[1]),
        MdVersion(keys=[2], threshold=1, sigs=[1, 3, 4], result="threshold"),
    ],
    "3-of-5, signed by different key combinations": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 4, 1]),
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 1, 3]),
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[4, 3, 2]),
    ],
    "3-of-5, one key rotated": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 4, 1]),
    ],
    "3-of-5, one key rotated fails: not signed by 3 new keys": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 2, 4], result="threshold"),
    ],
    "3-of-5, one key rotated fails: not signed by 3 old keys": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 4, 5], result="threshold"),
    ],
    "3-of-5, one key rotated, with intermediate step": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 2, 4, 5]),
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 4, 5]),
    ],
    "3-of-5, all keys rotated, with intermediate step": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[5, 6, 7, 8, 9], threshold=3, sigs=[0, 2, 4, 5, 6, 7]),
        MdVersion(keys=[5, 6, 7, 8, 9], threshold=3, sigs=[5, 6, 7]),
    ],
    "3-of-5, all keys rotated at once fails: signed by new keys only": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[5, 6, 7, 8, 9], threshold=3, sigs=[5, 6, 7, 8, 9], result="threshold"),
    ],
    "1-of-3 threshold raised to 2-of-3": [
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[1]),
        MdVersion(keys=[1, 2, 3], threshold=2, sigs=[1, 2]),
    ],
    "1-of-3 threshold bump to 2-of-3 fails: new threshold not reached": [
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[1]),
        MdVersion(keys=[1, 2, 3], threshold=2, sigs=[2], result="threshold"),
    ],
    "2-of-3 threshold lowered to 1-of-3": [
        MdVersion(keys=[1, 2, 3], threshold=2, sigs=[1, 2]),
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[1, 2]),
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[3]),
    ],
    "2-of-3 threshold lowered to 1-of-3 fails: old threshold not reached": [
        MdVersion(keys=[1, 2, 3], threshold=2, sigs=[1, 2]),
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[1], result="threshold"),
    ],
    "1-of-1 to 2-of-2 with a new key": [
        MdVersion(keys=[1], threshold=1, sigs=[1]),
        MdVersion(keys=[1, 2], threshold=2, sigs=[1, 2]),
    ],
    "2-of-2 fails: one key signing twice counts once": [
        MdVersion(keys=[1, 2], threshold=2, sigs=[1, 2]),
        MdVersion(keys=[1, 2], threshold=2, sigs=[1, 1], result="threshold"),
    ],
    "3-of-5 fails: one key signing three times counts once": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 0, 0, 4], result="threshold"),
    ],
    "3-of-5, duplicate signatures beside a threshold of distinct ones": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[1, 1, 3, 3, 4, 4]),
    ],
}
# A few rows again with hybrid (Ed25519 + ML-DSA-65) keys.
HYBRID_ROWS = (
    "1-of-1 key rotation",
    "3-of-5, one key rotated",
    "3-of-5, one key rotated fails: not signed by 3 new keys",
    "2-of-3 threshold lowered to 1-of-3 fails: old threshold not reached",
)
# fmt: on

CASES = [pytest.param("classical", name, id=f"classical: {name}") for name in ROTATIONS] + [
    pytest.param("hybrid", name, id=f"hybrid: {name}") for name in HYBRID_ROWS
]


@pytest.fixture(scope="module")
def rings() -> dict[str, KeyRing]:
    return {"classical": KeyRing("classical"), "hybrid": KeyRing("hybrid")}


def names(indexes: list[int]) -> list[str]:
    return [f"root-{i}" for i in indexes]


def publish(sim: RepoSim, rows: list[MdVersion]) -> list[bytes]:
    """Sign root v1..vN as the rows describe (the other roles keep their keys)."""
    out = []
    for version, row in enumerate(rows, start=1):
        payload = sim.root(version, roles={"root": names(row.keys)}, thresholds={"root": row.threshold})
        out.append(sim.sign(payload, names(row.sigs)))
    return out


def root_version(raw: bytes) -> int:
    return documents.parse(raw).payload.version


def test_table_rows_fail_only_at_the_end() -> None:
    # The walk stops at the first failure, so a failure must be the last row.
    for name, rows in ROTATIONS.items():
        assert rows[0].result is None, name
        assert all(r.result is None for r in rows[1:-1]), name


@pytest.mark.parametrize(("suite", "name"), CASES)
def test_root_rotation_walk(rings: dict[str, KeyRing], suite: str, name: str) -> None:
    """Walk the versions one batch at a time, as a node receiving them one by one."""
    rows = ROTATIONS[name]
    sim = RepoSim(rings[suite])
    raws = publish(sim, rows)
    trusted = trust.verify_anchor(raws[0], NOW)  # v1 is the anchor: self-signed by its threshold
    assert trusted.payload.version == 1

    trusted_raw = raws[0]
    for raw, row in zip(raws[1:], rows[1:], strict=True):
        version = root_version(raw)
        out = trust.verify_batch([raw], sim.state(trusted_raw), NOW)
        (verdict,) = out.verdicts
        if row.result is None:
            assert verdict.status == "applied", (version, verdict.error)
            assert out.marks == {(DOMAIN, "root"): Mark(version, documents.parse(raw).digest)}
            assert out.resets == set()  # only root keys changed: no other role's marks reset
            trusted_raw = raw
        else:
            assert verdict.status == "rejected"
            assert verdict.error is not None
            assert verdict.error.kind == row.result, verdict.error.message
            assert out.marks == {}
            assert not out.changed
            break

    expected_final = len(rows) if rows[-1].result is None else len(rows) - 1
    assert root_version(trusted_raw) == expected_final


@pytest.mark.parametrize(("suite", "name"), CASES)
def test_root_rotation_in_one_batch(rings: dict[str, KeyRing], suite: str, name: str) -> None:
    """All versions in one pack, in any order: the chain is still walked one version at a time."""
    rows = ROTATIONS[name]
    sim = RepoSim(rings[suite])
    raws = publish(sim, rows)
    batch = raws[1:]
    random.Random(name).shuffle(batch)
    out = trust.verify_batch(batch, sim.state(raws[0]), NOW)

    by_version = {v.doc.payload.version: v for v in out.verdicts if v.doc is not None}
    last = len(rows)
    expected_final = last if rows[-1].result is None else last - 1
    for version in range(2, last + 1):
        v = by_version[version]
        if version < expected_final:
            assert v.status == "history"
        elif version == expected_final:
            assert v.status == "applied"
        else:
            assert v.status == "rejected"
            assert v.error is not None
            assert v.error.kind == rows[-1].result
    if expected_final > 1:
        assert out.marks[(DOMAIN, "root")].version == expected_final
    else:
        assert (DOMAIN, "root") not in out.marks


# --- one key listed many times ---------------------------------------------------------


def test_role_listing_one_key_many_times_is_malformed(rings: dict[str, KeyRing]) -> None:
    sim = RepoSim(rings["classical"])
    v1 = sim.sign(sim.root(1))
    k0 = sim.ring.keyid("root-0")
    stuffed = with_root_role(sim.root(2), "root", [k0, k0, k0], 3)
    raw = sim.sign(stuffed, ["root-0", "root-0", "root-0"])

    out = trust.verify_batch([raw], sim.state(v1), NOW)
    (verdict,) = out.verdicts
    assert verdict.status == "rejected"
    assert verdict.error is not None
    assert verdict.error.kind == "malformed"
    assert "more than once" in verdict.error.message
    assert not out.changed

    # Nor can such a root bootstrap trust.
    anchor = sim.sign(with_root_role(sim.root(1), "root", [k0, k0, k0], 3), ["root-0"] * 3)
    with pytest.raises(Malformed):
        trust.verify_anchor(anchor, NOW)


def _stuffed_root(sim: RepoSim, keyids: list[str], threshold: int) -> documents.Root:
    # Built directly, bypassing the decoder, to test the threshold count itself.
    return with_root_role(sim.root(1, roles={"root": names([0, 1, 2])}), "root", keyids, threshold)


def test_one_key_never_reaches_threshold_three_however_presented(rings: dict[str, KeyRing]) -> None:
    sim = RepoSim(rings["classical"])
    k0, k1, k2 = (sim.ring.keyid(f"root-{i}") for i in range(3))
    key0 = sim.ring["root-0"]
    signed_once = sim.sign(sim.root(2), ["root-0"])
    presentations = {
        "one signature": signed_once,
        "signature copied three times": duplicate_signatures(signed_once, 3),
        "signed three times": sim.sign(sim.root(2), ["root-0"] * 3),
        "four distinct valid signatures (alg -19/-8, kid protected/unprotected)": one_key_many_ways(signed_once, key0),
        "many ways, each twice": duplicate_signatures(one_key_many_ways(signed_once, key0), 2),
    }
    for listed in ([k0, k0, k0], [k0, k0, k0, k1], [k0, k1, k2]):
        root = _stuffed_root(sim, listed, 3)
        for what, raw in presentations.items():
            doc = documents.parse(raw)
            ok, bad = trust.satisfied_keys(doc, root.role_keys("root"))
            assert ok == {k0}, what
            assert bad == 0, what
            with pytest.raises(ThresholdNotMet):
                trust.check_role(doc, root, "root")

    # Control: three distinct keys do reach it, so the check above can fail.
    three = documents.parse(sim.sign(sim.root(2), ["root-0", "root-1", "root-2"]))
    root = _stuffed_root(sim, [k0, k1, k2], 3)
    assert trust.satisfied_keys(three, root.role_keys("root"))[0] == {k0, k1, k2}
    trust.check_role(three, root, "root")


def test_duplicate_signatures_of_one_key_count_once_in_a_batch(rings: dict[str, KeyRing]) -> None:
    sim = RepoSim(rings["classical"])
    sim.roles["root"] = names([0, 1, 2])
    sim.thresholds["root"] = 2
    v1 = sim.sign(sim.root(1), names([0, 1]))
    lone = sim.sign(sim.root(2), names([0]))
    for raw in (duplicate_signatures(lone, 5), one_key_many_ways(lone, sim.ring["root-0"])):
        out = trust.verify_batch([raw], sim.state(v1), NOW)
        assert out.verdicts[0].error is not None
        assert out.verdicts[0].error.kind == "threshold"
    out = trust.verify_batch([duplicate_signatures(sim.sign(sim.root(2), names([0, 2])), 3)], sim.state(v1), NOW)
    assert out.verdicts[0].status == "applied"


# --- hybrid: a key counts only with both of its algorithms ------------------------------------


def test_hybrid_rotation_needs_both_halves_of_each_key(rings: dict[str, KeyRing]) -> None:
    sim = RepoSim(rings["hybrid"])
    rows = ROTATIONS["1-of-1 key rotation"]
    raws = publish(sim, rows)
    full = raws[1]  # v2 signed by root-2 then root-1, each with Ed25519 and ML-DSA-65
    assert trust.verify_batch([full], sim.state(raws[0]), NOW).verdicts[0].status == "applied"
    for algs in ((ED25519,), (MLDSA65,)):
        half = keep_algorithms(full, algs)
        out = trust.verify_batch([half], sim.state(raws[0]), NOW)
        assert out.verdicts[0].error is not None
        assert out.verdicts[0].error.kind == "threshold"
    # The old key with both halves, the new key with only one: the new threshold fails.
    old_full_new_half = sim.sign(sim.root(2, roles={"root": names([2])}), names([1]))
    new_half = keep_algorithms(sim.sign(sim.root(2, roles={"root": names([2])}), names([2])), (ED25519,))
    mixed = rewrite_signatures(old_full_new_half, lambda sigs: sigs + cose_parts(new_half)[3])
    out = trust.verify_batch([mixed], sim.state(raws[0]), NOW)
    assert out.verdicts[0].error is not None
    assert out.verdicts[0].error.kind == "threshold"


# --- version gaps and expiry -------------------------------------------------------------


def _three_versions(sim: RepoSim, *, expires: dict[int, int] | None = None) -> list[bytes]:
    expires = expires or {}
    out = []
    for v in (1, 2, 3):
        end = expires.get(v)
        out.append(sim.sign(sim.root(v, issued_at=None if end is None else end - DAY, expires=end)))
    return out


def test_root_version_gap_is_rejected(rings: dict[str, KeyRing]) -> None:
    sim = RepoSim(rings["classical"])
    v1, v2, v3 = _three_versions(sim)
    # v3 carries valid signatures of v1's keys, but v2 is missing: no skipping ahead.
    out = trust.verify_batch([v3], sim.state(v1), NOW)
    assert out.verdicts[0].status == "rejected"
    assert out.verdicts[0].error is not None
    assert out.verdicts[0].error.kind == "threshold"
    assert "one version at a time" in out.verdicts[0].error.message
    assert not out.changed
    # With v2 supplied too, in either order, the chain walks through.
    for batch in ([v2, v3], [v3, v2]):
        out = trust.verify_batch(batch, sim.state(v1), NOW)
        assert {v.doc.payload.version: v.status for v in out.verdicts if v.doc} == {2: "history", 3: "applied"}
        assert out.marks[(DOMAIN, "root")] == Mark(3, documents.parse(v3).digest)


def test_root_expiry_is_checked_on_the_final_root_only(rings: dict[str, KeyRing]) -> None:
    sim = RepoSim(rings["classical"])
    past = NOW - DAY
    # An expired intermediate root is fine when a valid one follows it.
    v1, v2_old, v3 = _three_versions(sim, expires={2: past})
    out = trust.verify_batch([v3, v2_old], sim.state(v1), NOW)
    assert [v.status for v in out.verdicts] == ["applied", "history"]
    assert out.marks[(DOMAIN, "root")].version == 3
    # The same expired root as the final one is rejected.
    out = trust.verify_batch([v2_old], sim.state(v1), NOW)
    assert out.verdicts[0].error is not None
    assert out.verdicts[0].error.kind == "expired"
    assert not out.changed


def test_expired_final_root_falls_back_to_the_newest_valid_one(rings: dict[str, KeyRing]) -> None:
    sim = RepoSim(rings["classical"])
    v1, v2, v3_old = _three_versions(sim, expires={3: NOW})  # expires == now: expired
    out = trust.verify_batch([v2, v3_old], sim.state(v1), NOW)
    assert out.verdicts[0].status == "applied"
    assert out.verdicts[1].status == "rejected"
    assert out.verdicts[1].error is not None
    assert out.verdicts[1].error.kind == "expired"
    assert out.marks[(DOMAIN, "root")].version == 2
    # Both expired: nothing changes.
    _, v2_old, v3_old = _three_versions(sim, expires={2: NOW, 3: NOW})
    out = trust.verify_batch([v2_old, v3_old], sim.state(v1), NOW)
    assert [v.error.kind for v in out.verdicts if v.error] == ["expired", "expired"]
    assert out.marks == {}


def test_an_expired_held_root_can_still_be_rotated_away(rings: dict[str, KeyRing]) -> None:
    sim = RepoSim(rings["classical"])
    v1 = sim.sign(sim.root(1, issued_at=NOW - 2 * DAY, expires=NOW - DAY))
    v2 = sim.sign(sim.root(2))
    out = trust.verify_batch([v2], sim.state(v1), NOW)
    assert out.verdicts[0].status == "applied"
