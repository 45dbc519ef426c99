"""The signature checker of ``trust.verify_batch`` changes how long verification takes, never a verdict.

``verify_batch`` checks every signature a step may ask about in one call of its
checker, then decides verdicts on one thread (qhx_edge/core/trust.py,
invariant 10).  These tests run batches mixing every kind of fault with the
default checker, with the node's thread-pool checker (``spread_checks``) and
with checkers that schedule the work differently, and require the same
verdicts, marks and resets; a checker that answers wrongly is caught.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from qhx_edge.core import documents, trust
from qhx_edge.core.trust import Outcome, SignatureCheck
from qhx_edge.homes.node import spread_checks
from tests.repo_sim import NOW, KeyRing, RepoSim, duplicate_signatures, flip_signature_byte


def _reversed_order(checks: Sequence[SignatureCheck]) -> list[bool]:
    return list(reversed(trust.check_signatures(list(reversed(checks)))))


def _one_by_one(checks: Sequence[SignatureCheck]) -> list[bool]:
    return [trust.check_signatures([c])[0] for c in checks]


CHECKERS = {
    "default": trust.check_signatures,
    "threads": spread_checks,
    "threads-3": lambda checks: spread_checks(checks, workers=3),
    "reversed": _reversed_order,
    "one-by-one": _one_by_one,
}


def _summary(out: Outcome) -> Any:
    verdicts = [(v.index, v.status, v.error.kind if v.error else None) for v in out.verdicts]
    return verdicts, sorted(out.marks.items()), sorted(out.resets), out.clock_high_water


@pytest.fixture(scope="module", params=["classical", "hybrid"])
def batches(request: pytest.FixtureRequest) -> list[tuple[list[bytes], trust.TrustState]]:
    sim = RepoSim(KeyRing(request.param))
    v1 = sim.initial()
    state = sim.state(v1["root"], freshness=v1["freshness"], bundle=v1["bundle"], policy=v1["policy"])
    r2 = sim.sign(sim.root(2))
    bundles = [sim.sign(sim.bundle(v)) for v in range(2, 12)]
    f2 = sim.sign(sim.freshness(2, root=2, bundle=11))
    wrong_role = sim.sign(sim.bundle(12), ["policy-0"])
    forged = flip_signature_byte(bundles[3])
    sim.roles["pki"] = ["pki-1"]  # a rotation that changes the pki keys: a reset
    r3 = sim.sign(sim.root(3))
    b_new = sim.sign(sim.bundle(1, tag="new-keys"))
    return [
        ([r2, *bundles, f2], state),
        ([forged, *bundles, wrong_role, f2, v1["bundle"], duplicate_signatures(bundles[0], 2)], state),
        ([r2, r3, b_new, sim.sign(sim.freshness(3, root=3, bundle=1)), *bundles[:3]], state),
        ([v1["root"], v1["bundle"], v1["policy"], v1["freshness"]], state),  # all held: nothing to check
    ]


@pytest.mark.parametrize("name", [n for n in CHECKERS if n != "default"])
def test_every_checker_gives_the_default_verdicts(
    batches: list[tuple[list[bytes], trust.TrustState]], name: str
) -> None:
    for docs, state in batches:
        expected = _summary(trust.verify_batch(docs, state, NOW))
        assert _summary(trust.verify_batch(docs, state, NOW, checker=CHECKERS[name])) == expected


def test_the_batches_exercise_rejections_and_resets(batches: list[tuple[list[bytes], trust.TrustState]]) -> None:
    kinds = set()
    resets = False
    for docs, state in batches:
        out = trust.verify_batch(docs, state, NOW)
        kinds |= {v.error.kind for v in out.verdicts if v.error is not None}
        resets |= bool(out.resets)
    assert {"bad-signature", "wrong-role"} <= kinds
    assert resets


def test_a_checker_that_lies_is_not_trusted_blindly(batches: list[tuple[list[bytes], trust.TrustState]]) -> None:
    docs, state = batches[0]
    with pytest.raises(ValueError, match="one result per signature"):
        trust.verify_batch(docs, state, NOW, checker=lambda checks: [True] * (len(checks) - 1))
    # Its answers are what the verdicts rest on: a checker saying every signature fails refuses all.
    out = trust.verify_batch(docs, state, NOW, checker=lambda checks: [False] * len(checks))
    assert all(v.status == "rejected" for v in out.verdicts)


def test_held_documents_need_no_signature_checks(batches: list[tuple[list[bytes], trust.TrustState]]) -> None:
    docs, state = batches[3]
    seen: list[int] = []

    def counting(checks: Sequence[SignatureCheck]) -> list[bool]:
        seen.append(len(checks))
        return trust.check_signatures(checks)

    out = trust.verify_batch(docs, state, NOW, checker=counting)
    assert [v.status for v in out.verdicts] == ["already-held"] * 4
    assert seen == []


def test_spread_checks_keeps_input_order() -> None:
    ring = KeyRing("classical")
    sim = RepoSim(ring)
    raw = [sim.sign(sim.bundle(v)) for v in range(1, 40)]
    good = trust.check_signatures(_checks(raw, ring))
    bad = _checks([flip_signature_byte(r) if i % 3 == 0 else r for i, r in enumerate(raw)], ring)
    assert good == [True] * len(good)
    assert spread_checks(bad) == trust.check_signatures(bad) == [i % 3 != 0 for i in range(len(raw))]


def _checks(raws: list[bytes], ring: KeyRing) -> list[SignatureCheck]:
    out: list[SignatureCheck] = []
    for raw in raws:
        doc = documents.parse(raw)
        (sig,) = doc.envelope.signatures
        name = ring.name_of(sig.kid.hex())
        assert name is not None
        ((_, public),) = ring[name].public.parts
        out.append((sig.alg, public, sig.signature, doc.envelope.to_be_signed(sig.protected)))
    return out


def test_spread_checks_splits_uneven_batches_in_order() -> None:
    """Every worker count, on a batch that does not divide evenly: each result lands in its place."""
    ring = KeyRing("classical")
    sim = RepoSim(ring)
    raw = [sim.sign(sim.bundle(v)) for v in range(1, 140)]
    bad = _checks([flip_signature_byte(r) if i % 5 in (0, 3) else r for i, r in enumerate(raw)], ring)
    expected = [i % 5 not in (0, 3) for i in range(len(raw))]
    for workers in (2, 3, 4, 7):
        assert spread_checks(bad, workers=workers) == expected
