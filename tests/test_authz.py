"""Authorization on identities (qhx_edge/core/authz.py): which caller may reach which service."""

from __future__ import annotations

import pytest

from qhx_edge.core.authz import authorize, parse_rules, registration_labels
from qhx_edge.core.errors import Malformed, PolicyDenied
from qhx_edge.core.policyfile import policy_fields

DB = "spiffe://alpha.example/ns/db/main"
WEB = "spiffe://alpha.example/ns/web/frontend"
PARTNER = "spiffe://beta.example/ns/logistics/api"

RULES = parse_rules(
    [
        {"to": "spiffe://alpha.example/ns/db/", "allow": ["spiffe://alpha.example/ns/web/", PARTNER]},
        {"to": "spiffe://alpha.example/ns/pay", "allow": "spiffe://alpha.example/", "labels": {"tier": "gold"}},
    ]
)


def test_a_caller_in_an_allowed_namespace_or_named_reaches_the_service() -> None:
    assert authorize(RULES, DB, WEB, {}).to == "spiffe://alpha.example/ns/db/"
    assert authorize(RULES, DB, PARTNER, {}).to == "spiffe://alpha.example/ns/db/"


def test_everything_else_is_policy_denied_and_says_why() -> None:
    with pytest.raises(PolicyDenied, match="no rule of the policy allows it"):
        authorize(RULES, DB, "spiffe://alpha.example/ns/webhooks/x", {})  # a prefix, not the namespace web/
    with pytest.raises(PolicyDenied, match="names this service"):
        authorize(RULES, "spiffe://alpha.example/ns/cache", WEB, {})
    with pytest.raises(PolicyDenied):
        authorize(RULES, "spiffe://alpha.example/ns/payments", WEB, {"tier": "gold"})  # exact 'to', not a prefix


def test_labels_must_be_bound_to_the_caller() -> None:
    pay = "spiffe://alpha.example/ns/pay"
    with pytest.raises(PolicyDenied):
        authorize(RULES, pay, WEB, {})
    with pytest.raises(PolicyDenied):
        authorize(RULES, pay, WEB, {"tier": "silver"})
    assert authorize(RULES, pay, WEB, {"tier": "gold", "zone": "a"}).labels == (("tier", "gold"),)
    other = "spiffe://alpha.example/other"
    regs = [{"spiffe_id": WEB, "selectors": ["unix:uid:1"], "labels": {"tier": "gold"}},
            {"spiffe_id": other, "selectors": ["unix:uid:2"], "labels": {"tier": "x"}}]  # fmt: skip
    assert registration_labels(regs, WEB) == {"tier": "gold"}
    assert registration_labels(regs, PARTNER) == {}  # a partner's workload carries none of our labels


@pytest.mark.parametrize(
    "rule",
    [
        5,
        {"allow": [WEB]},
        {"to": DB},
        {"to": DB, "allow": []},
        {"to": DB, "allow": [WEB], "extra": 1},
        {"to": "http://alpha.example/db", "allow": [WEB]},
        {"to": DB, "allow": ["spiffe://alpha.example/../x"]},
        {"to": DB, "allow": [WEB], "labels": {"tier": 5}},
        {"to": DB, "allow": [WEB] * 300},
    ],
)
def test_malformed_rules_are_refused_when_the_policy_is_written(rule: object) -> None:
    with pytest.raises(Malformed):
        parse_rules([rule])
    if isinstance(rule, dict):
        with pytest.raises(Malformed):
            policy_fields({"authorization": [rule]})
