"""A clock that cannot be wound back for issuance (the node's own observed time).

Trusted time only moves with verified documents.  Before the node persisted
the latest time it observed itself, a clock set back after the node had gone
``expired`` made it issue full-TTL SVIDs again: trusted time (the freshness's
``issued_at``) was still behind the set-back clock.  Now issuance and
``status`` refuse with ``clock-rollback`` until the clock is fixed or a newly
verified freshness epoch re-anchors the node's time; a clock pushed forward
and then corrected therefore fails closed only until the next fresh pack.
"""

from __future__ import annotations

from pathlib import Path

from qhx_edge.homes import node
from qhx_edge.store import clock
from tests.conftest import PASSPHRASE, Homes, make_homes
from tests.test_issuance import STALENESS, UID, attested, issuer, load, rejected


def status(homes: Homes, now: int) -> dict[str, object]:
    with node.Node(homes.node_home, PASSPHRASE.encode) as n:
        return n.status(now)


def test_a_clock_set_back_after_expiry_issues_nothing_until_a_fresh_pack(tmp_path: Path) -> None:
    homes = make_homes(tmp_path)
    t0 = clock.now()
    clk = attested(homes, t0)
    hard = STALENESS["hard"]
    with issuer(homes, clk) as iss:
        assert iss.x509_svids(UID)  # issued at t0
        clk.t = t0 + hard - 120  # degraded, near the floor: still issues (and the node observes the time)
        assert iss.x509_svids(UID)
        clk.t = t0 + hard + 10  # past S2: expired
        rejected("stale", iss.x509_svids, UID)
        clk.t = t0 + 60  # someone winds the clock back: trusted time (t0) is behind it, the observed time is not
        err = rejected("clock-rollback", iss.x509_svids, UID)
        assert "latest time this node observed" in err.message
    st = status(homes, t0 + 60)
    assert st["clock"] == "rollback"
    assert st["observed_high_water"] >= t0 + hard - 120

    # The authority's word on the time: a fresh epoch, verified at the corrected clock, re-anchors it.
    later = t0 + 90
    load(homes, homes.authority.publish_freshness(later), later)
    assert status(homes, later)["clock"] == "ok"
    clk.t = later
    with issuer(homes, clk) as iss:
        assert iss.x509_svids(UID)


def test_a_set_back_within_the_tolerance_is_not_a_rollback(tmp_path: Path) -> None:
    homes = make_homes(tmp_path)
    t0 = clock.now()
    clk = attested(homes, t0)
    with issuer(homes, clk) as iss:
        clk.t = t0 + 600
        assert iss.x509_svids(UID)
        clk.t = t0 + 600 - 200  # behind what it observed, but within the 300 s tolerance
        assert iss.x509_svids(UID)
