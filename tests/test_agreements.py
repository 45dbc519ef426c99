"""The agreement document and its pure rules (core/documents.py ``Agreement``, core/agreements.py).

Strict parsing with typed errors, one COSE_Sign envelope signed by both
domains' federation roles (countersigning keeps the signed content, so the
document keeps its digest), thresholds of both sides, the gate and the scope
and staleness of partner identities.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qhx_edge.core import agreements as A  # noqa: N812
from qhx_edge.core import documents as D  # noqa: N812
from qhx_edge.core.errors import (
    AnchorMismatch,
    Expired,
    Malformed,
    NoAgreement,
    Rejected,
    ScopeViolation,
    Stale,
    ThresholdNotMet,
)
from qhx_edge.core.suites import PrivateKey
from qhx_edge.homes.authority import Authority
from tests.conftest import PASSPHRASE

NOW = 1_800_000_000
ALPHA, BETA = "alpha.example", "beta.example"


def terms(accept: list[str], release: list[str], budget: int = 3600) -> dict[str, Any]:
    return {"accept": accept, "release": release, "max_staleness": budget, "allow_spiffe_bundles": False}


def body(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "type": "agreement",
        "domain": ALPHA,
        "version": 1,
        "issued_at": NOW,
        "expires": NOW + 86400,
        "partner": BETA,
        "status": "active",
        "roots": {ALPHA: "a" * 64, BETA: "b" * 64},
        "terms": {
            ALPHA: terms(["spiffe://beta.example/ns/logistics"], ["bundle", "freshness"]),
            BETA: terms(["spiffe://alpha.example"], ["bundle", "freshness"]),
        },
    }
    d.update(over)
    return d


def test_agreement_round_trips_and_keeps_unknown_fields() -> None:
    a = D.Agreement.from_dict({**body(), "later": 7})
    assert a.to_dict() == {**body(), "later": 7}
    assert a.other(ALPHA) == BETA
    assert a.other(BETA) == ALPHA
    assert D.Agreement.from_dict(D.cbor.decode(a.to_bytes(), max_size=D.MAX_DOCUMENT_SIZE)) == a


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"partner": ALPHA}, "two different domains"),
        ({"partner": "NOT VALID"}, "trust domain"),
        ({"status": "paused"}, "status"),
        ({"roots": {ALPHA: "a" * 64}}, "roots"),
        ({"roots": {ALPHA: "a" * 64, BETA: "B" * 64}}, "roots"),
        ({"terms": {ALPHA: terms([], [])}}, "terms"),
        ({"terms": {ALPHA: terms(["spiffe://gamma.example/x"], []), BETA: terms([], [])}}, "not an identity of"),
        ({"terms": {ALPHA: terms(["spiffe://beta.example/"], []), BETA: terms([], [])}}, "SPIFFE ID"),
        ({"terms": {ALPHA: terms([], ["keys"]), BETA: terms([], [])}}, "release"),
        ({"terms": {ALPHA: terms([], ["bundle", "bundle"]), BETA: terms([], [])}}, "release"),
        ({"terms": {ALPHA: terms([], [], 0), BETA: terms([], [])}}, "max_staleness"),
        ({"terms": {ALPHA: {**terms([], []), "allow_spiffe_bundles": 1}, BETA: terms([], [])}}, "boolean"),
        ({"terms": {ALPHA: {**terms([], []), "extra": 1}, BETA: terms([], [])}}, "terms of"),
    ],
)
def test_agreement_parsing_is_strict(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(Malformed, match=needle):
        D.Agreement.from_dict(body(**change))


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authority, Authority]:
    tmp = tmp_path_factory.mktemp("agreements")
    make = {
        d: Authority.init(
            tmp / d,
            d,
            suite="classical",
            root_keys=1,
            root_threshold=1,
            passphrase=PASSPHRASE.encode(),
            now=NOW,
        )
        for d in (ALPHA, BETA)
    }
    return make[ALPHA], make[BETA]


def roots(alpha: Authority, beta: Authority) -> tuple[D.Signed[Any], D.Signed[Any]]:
    return D.parse(alpha.current("root")), D.parse(beta.current("root"))


def signed(alpha: Authority, beta: Authority, *, both: bool = True, **over: Any) -> D.Signed[Any]:
    ra, rb = roots(alpha, beta)
    payload = D.Agreement.from_dict(body(roots={ALPHA: A.fingerprint(ra.raw), BETA: A.fingerprint(rb.raw)}, **over))
    data = D.sign(payload, alpha._signers("federation"))
    if both:
        data = D.countersign(data, beta._signers("federation"))
    return D.parse(data)


def test_countersigning_keeps_the_document_and_needs_both_thresholds(two: tuple[Authority, Authority]) -> None:
    alpha, beta = two
    ra, rb = roots(alpha, beta)
    one = signed(alpha, beta, both=False)
    both = signed(alpha, beta)
    assert one.digest == both.digest  # the same signed content
    assert len(both.envelope.signatures) == 2
    assert D.countersign(both.raw, beta._signers("federation")) == both.raw  # idempotent
    # Both sides are needed for an active agreement, seen from either side.
    A.check_signatures(both, ra.payload, rb.payload)
    A.check_signatures(both, rb.payload, ra.payload)
    with pytest.raises(ThresholdNotMet):
        A.check_signatures(one, rb.payload, ra.payload)  # beta never signed
    with pytest.raises(ThresholdNotMet):
        A.check_signatures(one, ra.payload, rb.payload)
    with pytest.raises(AnchorMismatch):
        A.check_signatures(both, ra.payload, None)  # the partner root is needed
    # The root it pins is the partner's, by fingerprint.
    A.check_pinned_root(both.payload, BETA, rb)
    with pytest.raises(Malformed):
        A.check_pinned_root(both.payload, ALPHA, rb)  # a root of beta is no root of alpha
    with pytest.raises(AnchorMismatch):
        A.check_pinned_root(D.Agreement.from_dict(body()), BETA, rb)  # pins another beta root


def test_a_termination_needs_one_side_only(two: tuple[Authority, Authority]) -> None:
    alpha, beta = two
    ra, rb = roots(alpha, beta)
    ended = signed(alpha, beta, both=False, status="terminated", version=2)
    A.check_signatures(ended, ra.payload, rb.payload)
    A.check_signatures(ended, rb.payload, ra.payload)  # beta's node learns alpha ended it
    with pytest.raises(Rejected):
        A.check_signatures(ended, rb.payload, None)  # without alpha's root, beta's node cannot tell


def epoch(agreements: dict[str, int]) -> D.Freshness:
    return D.Freshness.from_dict(
        {
            "type": "freshness",
            "domain": ALPHA,
            "version": 3,
            "issued_at": NOW,
            "expires": NOW + 3600,
            "versions": {"root": 1, "bundle": 1, "policy": 1},
            "agreements": agreements,
        }
    )


def test_the_gate_and_partner_identities() -> None:
    a = D.Agreement.from_dict(body())
    assert A.gate(ALPHA, BETA, a, epoch({BETA: 1}), NOW) is None
    for agreement, ep, now in (
        (None, epoch({BETA: 1}), NOW),  # none held
        (a, epoch({}), NOW),  # the freshness no longer names it
        (a, epoch({BETA: 2}), NOW),  # names another version
        (a, None, NOW),  # no freshness at all
        (a, epoch({BETA: 1}), NOW + 86400),  # expired
        (D.Agreement.from_dict(body(status="terminated")), epoch({BETA: 1}), NOW),
    ):
        assert isinstance(A.gate(ALPHA, BETA, agreement, ep, now), NoAgreement)
    ok = "spiffe://beta.example/ns/logistics/api"
    assert A.check_identity(ok, ALPHA, a, epoch({BETA: 1}), NOW - 10, NOW) == BETA
    assert A.check_identity("spiffe://beta.example/ns/logistics", ALPHA, a, epoch({BETA: 1}), NOW, NOW) == BETA
    for sid in ("spiffe://beta.example/ns/logisticsx", "spiffe://beta.example/ns/other", "spiffe://alpha.example/x"):
        with pytest.raises(ScopeViolation):
            A.check_identity(sid, ALPHA, a, epoch({BETA: 1}), NOW, NOW)
    with pytest.raises(Stale):
        A.check_identity(ok, ALPHA, a, epoch({BETA: 1}), NOW - 3600, NOW)
    with pytest.raises(Stale):
        A.check_identity(ok, ALPHA, a, epoch({BETA: 1}), None, NOW)
    with pytest.raises(NoAgreement):
        A.check_identity(ok, ALPHA, a, epoch({}), NOW, NOW)
    with pytest.raises(Stale, match=r"epoch of alpha\.example"):
        A.check_identity(ok, ALPHA, a, epoch({BETA: 1}), NOW + 3599, NOW + 3600)  # our own epoch ran out
    # Beta's side accepts every alpha identity.
    assert A.check_identity("spiffe://alpha.example/any/thing", BETA, a, epoch({ALPHA: 1}), NOW, NOW) == ALPHA
    assert A.partner_mode(ALPHA, BETA, a, epoch({BETA: 1}), NOW - 10, NOW).mode == "connected"
    assert A.partner_mode(ALPHA, BETA, a, epoch({BETA: 1}), NOW - 3600, NOW).mode == "expired"
    assert A.partner_mode(ALPHA, BETA, a, epoch({}), NOW, NOW).mode == "no-agreement"
    # A freshness time stamped by a clock that ran ahead, and was set right since, proves nothing about
    # now (review finding: it kept the partner fresh until that future time); within the tolerance it does.
    ahead = NOW + 86400
    with pytest.raises(Stale, match="after now"):
        A.check_identity(ok, ALPHA, a, epoch({BETA: 1}), ahead, NOW)
    assert A.partner_mode(ALPHA, BETA, a, epoch({BETA: 1}), ahead, NOW).mode == "expired"
    assert A.check_identity(ok, ALPHA, a, epoch({BETA: 1}), NOW + 60, NOW) == BETA
    # The partner's held root (or bundle) past its expiry ends trust in it, however fresh its epoch
    # (review finding: `federation check` and `svid verify` still said yes while `status` said expired).
    with pytest.raises(Expired, match=r"held root of beta\.example"):
        A.check_identity(ok, ALPHA, a, epoch({BETA: 1}), NOW, NOW, None, {"root": NOW, "bundle": NOW + 9})
    assert A.check_identity(ok, ALPHA, a, epoch({BETA: 1}), NOW, NOW, None, {"root": NOW + 1}) == BETA
    # Our policy's [federation] caps every agreement's budget (profiles/coalition.toml) ...
    budget = a.terms[ALPHA].max_staleness
    cap = D.PartnerLimits(max_staleness=budget // 2)
    assert A.check_identity(ok, ALPHA, a, epoch({BETA: 1}), NOW - budget // 2 + 1, NOW, cap) == BETA
    with pytest.raises(Stale, match="our policy allows any partner"):
        A.check_identity(ok, ALPHA, a, epoch({BETA: 1}), NOW - budget // 2, NOW, cap)
    assert A.partner_mode(ALPHA, BETA, a, epoch({BETA: 1}), NOW - budget // 2, NOW, limits=cap).mode == "expired"
    assert A.budget(a, ALPHA, D.PartnerLimits(max_staleness=budget * 2)) == budget  # a cap never widens
    # ... and can forbid SPIFFE-format partner bundles whatever an agreement allows (profiles/pq-strict.toml).
    allowing = D.Agreement.from_dict(
        body(terms={**body()["terms"], ALPHA: {**body()["terms"][ALPHA], "allow_spiffe_bundles": True}})
    )
    A.check_spiffe_bundle_allowed(ALPHA, BETA, allowing, epoch({BETA: 1}), NOW)
    with pytest.raises(ScopeViolation, match="policy"):
        A.check_spiffe_bundle_allowed(
            ALPHA, BETA, allowing, epoch({BETA: 1}), NOW, D.PartnerLimits(spiffe_bundles=False)
        )
    # Workloads get a partner's bundle only while it is connected under the agreement.
    assert A.serves_bundle(ALPHA, BETA, a, epoch({BETA: 1}), NOW - 10, NOW)
    assert not A.serves_bundle(ALPHA, BETA, a, epoch({BETA: 1}), NOW - 3600, NOW)
    assert not A.serves_bundle(ALPHA, BETA, a, epoch({}), NOW - 10, NOW)
    # A SPIFFE-format (unsigned) bundle of the partner only where our side's terms allow it.
    with pytest.raises(ScopeViolation):
        A.check_spiffe_bundle_allowed(ALPHA, BETA, a, epoch({BETA: 1}), NOW)
    allowed = D.Agreement.from_dict(
        body(terms={ALPHA: {**terms([], []), "allow_spiffe_bundles": True}, BETA: terms([], [])})
    )
    A.check_spiffe_bundle_allowed(ALPHA, BETA, allowed, epoch({BETA: 1}), NOW)
    with pytest.raises(NoAgreement):
        A.check_spiffe_bundle_allowed(ALPHA, BETA, allowed, epoch({}), NOW)


def test_describe_shows_both_ways() -> None:
    info = A.describe(D.Agreement.from_dict(body()))
    assert info["grants"][ALPHA]["to"] == BETA
    assert info["grants"][ALPHA]["releases_to_partner"] == ["root", "bundle", "freshness"]
    assert info["grants"][BETA]["accepts_from_partner"] == ["spiffe://alpha.example"]


def test_a_new_partner_is_followed_from_an_expired_pinned_root(tmp_path: Path) -> None:
    """The agreement pinned beta's root v1; a year later beta is at root v2 and v1 has expired.  A node
    meeting beta for the first time then walks the chain from the pinned v1 (expiry holds on the final
    root, TUF 5.3.10) instead of refusing every beta document."""
    from qhx_edge.core.policyfile import policy_fields
    from qhx_edge.homes import federation, node
    from qhx_edge.packs import pack

    t0, year = NOW, 400 * 86400
    alpha, beta = (
        Authority.init(
            tmp_path / d, d, suite="classical", root_keys=1, root_threshold=1, passphrase=PASSPHRASE.encode(), now=t0
        )
        for d in (ALPHA, BETA)
    )
    ours = federation.terms(
        accept=("spiffe://beta.example",), release=("bundle", "freshness"), max_staleness=3600,
        allow_spiffe_bundles=False, other=BETA,
    )  # fmt: skip
    theirs = federation.terms(
        accept=(), release=("bundle", "freshness"), max_staleness=3600, allow_spiffe_bundles=False, other=ALPHA
    )
    fp_beta, fp_alpha = A.fingerprint(beta.anchor()), A.fingerprint(alpha.anchor())
    proposal, _ = federation.propose(
        alpha, partner=BETA, partner_anchor=beta.anchor(), expect_fingerprint=fp_beta,
        ours=ours, theirs=theirs, lifetime=2 * year, now=t0,
    )  # fmt: skip
    accepted, _ = federation.accept(beta, proposal, expect_fingerprint=fp_alpha, now=t0)
    federation.publish(alpha, accepted, t0)
    federation.publish(beta, accepted, t0)
    node.init(tmp_path / "N", alpha.anchor(), t0, passphrase=PASSPHRASE.encode())

    t1 = t0 + year  # both roots v1, every bundle and policy have expired
    for auth in (alpha, beta):
        auth.rotate_root(t1 - 60, root_keys=None, root_threshold=None)
        auth.publish_policy(policy_fields({}), t1)
        auth.publish_bundle(t1)
    docs = alpha.export_documents(t1) + federation.released_to(beta, ALPHA, t1)
    with node.Node(tmp_path / "N", PASSPHRASE.encode) as n:
        result = n.import_pack(pack.build(docs, PrivateKey.generate("classical"), domain="relay.example",
                                          node="relay", sequence=1, now=t1), t1)  # fmt: skip
        got: dict[tuple[str, str, int], list[str]] = {}
        for v in result.outcome.verdicts:
            if v.doc is not None:
                got.setdefault((v.doc.payload.domain, v.doc.type, v.doc.payload.version), []).append(v.status)
        assert sorted(got[(BETA, "root", 1)]) == ["already-held", "history"]  # pinned in alpha's, again in beta's
        assert got[(BETA, "root", 2)] == ["applied"]
        assert got[(BETA, "bundle", 2)] == ["applied"]
        assert n.status(t1)["domains"][BETA]["mode"] == "connected"
        assert n.check_partner_identity("spiffe://beta.example/ns/x", t1 + 10)["agreement_version"] == 1


def test_node_batch_rules_for_agreements(two: tuple[Authority, Authority]) -> None:
    """agreements.verify_batch on its own: versions per pair, copies, times, other pairs' agreements."""
    from qhx_edge.core import trust

    alpha, beta = two
    ra, rb = roots(alpha, beta)
    state = trust.TrustState({ALPHA: trust.DomainView(root=ra)}, clock_high_water=NOW)
    fed = A.Federation(ALPHA)
    v1, v1b = signed(alpha, beta), signed(alpha, beta, expires=NOW + 7200)
    supplied = [rb.raw]

    def verdicts(docs: list[bytes], f: A.Federation = fed, now: int = NOW + 10) -> list[str]:
        out = A.verify_batch(docs, state, f, now)
        return [v.status if v.error is None else f"rejected:{v.error.kind}" for v in out.verdicts]

    # Valid, with the partner root it pins beside it (a partner first seen: the gate is closed, no epoch).
    assert verdicts([v1.raw, *supplied]) == ["applied", "rejected:no-agreement"]
    # Two different documents claiming version 1: nothing says which is genuine.
    assert verdicts([v1.raw, v1b.raw, *supplied])[:2] == ["rejected:equal-version-conflict"] * 2
    # Copies of one are one document.
    assert verdicts([v1.raw, v1.raw, *supplied])[:2] == ["applied", "duplicate"]
    # Against a held version 1: the same is already held, another is a conflict, an older one a rollback.
    held = A.Federation(ALPHA, agreements={BETA: v1}, roots={A.fingerprint(rb.raw): rb})
    assert verdicts([v1.raw], held) == ["already-held"]
    assert verdicts([v1b.raw], held) == ["rejected:equal-version-conflict"]
    v2 = signed(alpha, beta, version=2)
    newer = A.Federation(ALPHA, agreements={BETA: v2}, roots={A.fingerprint(rb.raw): rb})
    assert verdicts([v1.raw], newer) == ["rejected:rollback"]
    # Issued in the future, or expired.
    assert verdicts([signed(alpha, beta, version=3, issued_at=NOW + 3600, expires=NOW + 7200).raw], held) == [
        "rejected:not-yet-valid"
    ]
    assert verdicts([v1.raw, *supplied], now=NOW + 86400) == ["rejected:expired", "rejected:no-agreement"]
    # An agreement between two other domains is relayed, not judged.
    gamma = "gamma.example"
    other = D.Agreement.from_dict(
        body(
            domain=BETA,
            partner=gamma,
            roots={BETA: "b" * 64, gamma: "c" * 64},
            terms={BETA: terms([], []), gamma: terms([], [])},
        )
    )
    assert verdicts([D.sign(other, beta._signers("federation"))]) == ["not-mine"]


def test_hybrid_domains_need_both_algorithms_of_each_side(tmp_path: Path) -> None:
    """The default suite: every federation key is Ed25519 + ML-DSA-65, and a side counts only when both
    of its algorithms signed; countersigning a hybrid proposal keeps one document."""
    alpha, beta = (
        Authority.init(
            tmp_path / d, d, suite="hybrid", root_keys=1, root_threshold=1, passphrase=PASSPHRASE.encode(), now=NOW
        )
        for d in (ALPHA, BETA)
    )
    ra, rb = roots(alpha, beta)
    both = signed(alpha, beta)
    assert len(both.envelope.signatures) == 4  # two keys, two algorithms each
    A.check_signatures(both, ra.payload, rb.payload)
    # Drop beta's ML-DSA-65 signature: beta's key is no longer satisfied.
    beta_kid = bytes.fromhex(next(iter(rb.payload.role_keys("federation"))))
    keep = [i for i, s in enumerate(both.envelope.signatures) if not (s.kid == beta_kid and s.alg == -49)]
    half = D.parse(both.envelope.canonical(keep))
    assert half.digest == both.digest
    with pytest.raises(ThresholdNotMet):
        A.check_signatures(half, ra.payload, rb.payload)
