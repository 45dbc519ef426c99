"""Expiry holds after import (issue 8, point 4; TUF 5.3.10, freeze attacks).

An adversary who withholds new packs (or a courier who only carries freshness)
must not keep a node issuing on a bundle, policy or root that has expired.  A
held document past its ``expires`` puts its domain in ``expired``: ``status``
says so and names it, no SVID is issued, and a new freshness naming it is
refused as ``expired``, until newer material arrives.

These tests failed on 7a292f4 (before expiry was checked after import): the node
stayed ``connected`` and issued SVIDs on an expired bundle and policy, and it
accepted a freshness naming them.
"""

from __future__ import annotations

import pytest

from qhx_edge.core.errors import QhxError
from qhx_edge.core.policyfile import policy_fields
from qhx_edge.homes import node
from qhx_edge.homes.authority import DEFAULT_LIFETIMES
from qhx_edge.issue.issuer import Issuer
from qhx_edge.store import clock
from tests.conftest import PASSPHRASE, Homes, faketime_prefix, find_libfaketime, need, run_cli
from tests.test_issuance import POLICY, UID, Clock, attested, delegate, load

DOMAIN = "alpha.example"
DAY = 86400


def status(homes: Homes, now: int) -> dict[str, object]:
    n = node.Node(homes.node_home)
    try:
        out: dict[str, object] = n.status(now)["domains"][DOMAIN]
        return out
    finally:
        n.close()


def frozen(homes: Homes) -> tuple[int, int]:
    """A node kept fresh (freshness and delegation) until just before its bundle and policy expire.

    Returns (t0, the time the bundle and policy expire).
    """
    t0 = clock.now()
    attested(homes, t0)
    end = t0 + DEFAULT_LIFETIMES["policy"]
    t1 = end - 600
    # Only freshness and a new delegation reach the node: the bundle and policy are never renewed.
    load(homes, homes.authority.publish_freshness(t1) + delegate(homes, t1), t1)
    return t0, end


def test_an_expired_bundle_and_policy_stop_issuance(homes: Homes) -> None:
    _, end = frozen(homes)
    clk = Clock(end - 60)
    with Issuer(homes.node_home, PASSPHRASE.encode, now=clk) as iss:
        (svid,) = iss.x509_svids(UID)
        assert svid.not_after <= end  # no SVID outlives the material that vouches for it
        clk.t = end + 1  # well inside the freshness budget, past the bundle's and policy's expiry
        with pytest.raises(QhxError) as info:
            iss.x509_svids(UID)
        assert info.value.kind == "stale"
        assert "expired" in info.value.message
        assert iss.status()["mode"] == "expired"
    st = status(homes, end + 1)
    assert st["mode"] == "expired"
    assert set(st["expired_documents"]) >= {"policy"}  # type: ignore[arg-type]
    assert st["max_ttl"] == 0


def test_a_freshness_naming_an_expired_bundle_is_refused(homes: Homes) -> None:
    _, end = frozen(homes)
    t2 = end + 10
    n = node.Node(homes.node_home)
    try:
        with pytest.raises(QhxError) as info:
            n.import_pack(homes.authority.export_pack(homes.authority.publish_freshness(t2), t2), t2)
        assert info.value.kind == "expired"
    finally:
        n.close()
    # Newer material lets the domain move on.
    t3 = end + 20
    docs = homes.authority.publish_bundle(t3) + homes.authority.publish_policy(policy_fields(POLICY), t3)
    load(homes, docs, t3)
    assert status(homes, t3)["mode"] == "connected"


@pytest.mark.faketime
def test_status_through_the_cli_names_the_expired_documents(homes: Homes) -> None:
    need(find_libfaketime() is not None, "libfaketime is not installed (Debian package faketime)")
    _, end = frozen(homes)
    offset = end + 120 - clock.now()
    r = run_cli("--home", homes.node_home, "--json", "status", prefix=faketime_prefix(f"+{offset}"))
    assert r.code == 0, (r.stdout, r.stderr)
    d = r.json["domains"][DOMAIN]
    assert d["mode"] == "expired"
    assert "policy" in d["expired_documents"]
    r = run_cli("--home", homes.node_home, "status", prefix=faketime_prefix(f"+{offset}"))
    assert "EXPIRED: the held policy" in r.stdout
