"""SPIFFE names (core/spiffe.py): the one trust-domain rule and SPIFFE ID rule, used everywhere."""

from __future__ import annotations

import pytest

from qhx_edge.core.errors import Malformed
from qhx_edge.core.spiffe import check_trust_domain, parse_spiffe_id, trust_domain_id, trust_domain_of

GOOD_DOMAINS = ["alpha.example", "a", "td_1-x.y", "192.0.2.1", "a" * 255]
BAD_DOMAINS = [
    "",
    "Alpha.example",  # uppercase (SPIFFE ID §2.1)
    "alpha example",
    "alpha.example\n",  # re.match(r"...$") lets a trailing newline through; fullmatch does not
    "alpha.example:443",  # a port
    "user@alpha.example",  # userinfo
    "alpha%2eexample",  # percent-encoding
    ".example",  # a URI name constraint ".example" would permit every host below example
    "alpha.",
    "a" * 256,
    "ｅxample",  # a fullwidth letter, not ASCII
    5,
    None,
]


@pytest.mark.parametrize("name", GOOD_DOMAINS)
def test_good_trust_domains(name: str) -> None:
    assert check_trust_domain(name) == name
    assert trust_domain_of(f"spiffe://{name}/w") == name
    assert trust_domain_id(name) == f"spiffe://{name}"


@pytest.mark.parametrize("name", BAD_DOMAINS)
def test_bad_trust_domains(name: object) -> None:
    with pytest.raises(Malformed):
        check_trust_domain(name)


@pytest.mark.parametrize(
    "value",
    [
        "spiffe://alpha.example",  # a trust domain's own ID, not a workload's
        "spiffe://alpha.example/",
        "spiffe://alpha.example/a//b",
        "spiffe://alpha.example/a/./b",
        "spiffe://alpha.example/a/../b",
        "spiffe://alpha.example/a/",
        "spiffe://alpha.example/a%20b",
        "spiffe://alpha.example/a?b",
        "spiffe://alpha.example/a#b",
        "spiffe://alpha.example/web\n",
        "spiffe://.example/web",
        "https://alpha.example/web",
        "spiffe://alpha.example/" + "a" * 2048,
    ],
)
def test_bad_workload_ids(value: str) -> None:
    with pytest.raises(Malformed):
        parse_spiffe_id(value)


def test_good_workload_ids() -> None:
    assert parse_spiffe_id("spiffe://alpha.example/ns/prod/sa/web-1.v2_x") == (
        "alpha.example",
        "/ns/prod/sa/web-1.v2_x",
    )
    longest = "spiffe://alpha.example/" + "a" * (2048 - len("spiffe://alpha.example/"))
    assert parse_spiffe_id(longest)[0] == "alpha.example"
