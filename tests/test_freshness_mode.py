"""Staleness modes and the TTL bound (DESIGN.md "Freshness and degraded issuance")."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from qhx_edge.core.documents import Staleness
from qhx_edge.core.staleness import CONNECTED, DEGRADED, EXPIRED, mode

B = Staleness(soft=6 * 3600, hard=72 * 3600, svid_ttl=3600, ttl_floor=300)
T0 = 1_800_000_000


def test_connected_below_soft_budget() -> None:
    m = mode(T0 + 60, T0, B)
    assert (m.mode, m.staleness, m.max_ttl) == (CONNECTED, 60, 3600)


def test_degraded_ttl_shrinks_to_the_floor() -> None:
    at_soft = mode(T0 + B.soft, T0, B)
    middle = mode(T0 + (B.soft + B.hard) // 2, T0, B)
    late = mode(T0 + B.hard - 3600, T0, B)
    assert at_soft.mode == middle.mode == late.mode == DEGRADED
    assert at_soft.max_ttl == 3600
    assert at_soft.max_ttl > middle.max_ttl > late.max_ttl >= B.ttl_floor


def test_expired_at_hard_budget_without_freshness_and_on_clock_rollback() -> None:
    assert mode(T0 + B.hard, T0, B).mode == EXPIRED
    assert mode(T0 + B.hard, T0, B).max_ttl == 0
    assert mode(T0, None, B).mode == EXPIRED
    assert mode(T0, T0, None).mode == EXPIRED
    assert mode(T0 + 10, T0, B, clock_ok=False).mode == EXPIRED


@given(
    soft=st.integers(0, 10**6),
    extra=st.integers(1, 10**6),
    ttl=st.integers(1, 10**5),
    floor_frac=st.floats(0, 1),
    age=st.integers(-1000, 3 * 10**6),
)
def test_no_ttl_outlives_issued_at_plus_hard_budget(
    soft: int, extra: int, ttl: int, floor_frac: float, age: int
) -> None:
    budget = Staleness(soft=soft, hard=soft + extra, svid_ttl=ttl, ttl_floor=max(1, int(ttl * floor_frac)))
    m = mode(T0 + age, T0, budget)
    assert 0 <= m.max_ttl <= budget.svid_ttl
    if m.mode == EXPIRED:
        assert m.max_ttl == 0  # nothing is issued at all
    else:
        assert m.max_ttl > 0
        assert T0 + age + m.max_ttl <= T0 + budget.hard
