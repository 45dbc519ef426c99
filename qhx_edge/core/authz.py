"""Authorization of a connection on identities, not addresses (docs/architecture.md, "Tunnels").

The policy document's ``authorization`` rules say which callers may reach which services:

.. code-block:: toml

    [[authorization]]
    to = "spiffe://alpha.example/ns/db/"        # the service: a SPIFFE ID, or a namespace ending in "/"
    allow = ["spiffe://alpha.example/ns/web/",  # callers: SPIFFE IDs or namespaces ending in "/"
             "spiffe://beta.example/ns/logistics/api"]
    labels = { tier = "frontend" }              # optional: labels the caller's registration must carry

A connection is allowed when some rule's ``to`` matches the service's SPIFFE ID, one of its
``allow`` entries matches the caller's, and every label of the rule is bound to the caller.  Labels
are bound by our policy's registrations (``labels`` of the registration of the caller's SPIFFE ID),
so only callers of our own domain carry them: a rule with labels never admits a partner's workload.
Nothing else is allowed: a service no rule names takes no connection (``policy-denied``).

Pure: the caller passes the rules and the caller's labels; nothing here reads a store or a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qhx_edge.core.errors import Malformed, PolicyDenied
from qhx_edge.core.spiffe import parse_spiffe_id

MAX_RULES = 1024
MAX_ALLOW = 256
MAX_LABELS = 32
_KEYS = frozenset({"to", "allow", "labels"})


@dataclass(frozen=True)
class Rule:
    to: str
    allow: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]


def _pattern(value: Any, what: str) -> str:
    """A SPIFFE ID, or a namespace: a SPIFFE ID prefix ending in ``/``."""
    if not isinstance(value, str):
        raise Malformed(f"{what} must be a SPIFFE ID or a namespace ending in '/'")
    if value.endswith("/"):  # a namespace (spiffe://DOMAIN/ is the whole domain): a valid ID path below it
        parse_spiffe_id(value + "x")
    else:
        parse_spiffe_id(value)
    return value


def parse_rules(items: Iterable[Any]) -> tuple[Rule, ...]:
    """The policy's ``authorization`` list as rules; ``malformed`` for anything else."""
    rules: list[Rule] = []
    for i, item in enumerate(items):
        if len(rules) >= MAX_RULES:
            raise Malformed(f"at most {MAX_RULES} authorization rules")
        if not isinstance(item, Mapping) or set(item) - _KEYS or "to" not in item or "allow" not in item:
            raise Malformed(f"authorization rule {i} has 'to', 'allow' and optionally 'labels'")
        allow = item["allow"] if isinstance(item["allow"], list) else [item["allow"]]
        if not allow or len(allow) > MAX_ALLOW:
            raise Malformed(f"authorization rule {i}: 'allow' names 1 to {MAX_ALLOW} callers")
        labels = item.get("labels", {})
        if not isinstance(labels, Mapping) or len(labels) > MAX_LABELS:
            raise Malformed(f"authorization rule {i}: 'labels' is a table of at most {MAX_LABELS} names")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise Malformed(f"authorization rule {i}: labels are text names and values")
        rules.append(
            Rule(
                to=_pattern(item["to"], f"authorization rule {i} 'to'"),
                allow=tuple(_pattern(a, f"authorization rule {i} 'allow'") for a in allow),
                labels=tuple(sorted(labels.items())),
            )
        )
    return tuple(rules)


def _matches(pattern: str, spiffe_id: str) -> bool:
    return spiffe_id.startswith(pattern) if pattern.endswith("/") else spiffe_id == pattern


def registration_labels(registrations: Sequence[Mapping[str, Any]], spiffe_id: str) -> dict[str, str]:
    """The labels our policy binds to ``spiffe_id`` (those of its registrations, merged)."""
    out: dict[str, str] = {}
    for reg in registrations:
        labels = reg.get("labels")
        if reg.get("spiffe_id") == spiffe_id and isinstance(labels, Mapping):
            out.update({str(k): str(v) for k, v in labels.items()})
    return out


def authorize(rules: Sequence[Rule], service: str, caller: str, caller_labels: Mapping[str, str]) -> Rule:
    """The rule that lets ``caller`` reach ``service``; ``policy-denied`` if none does."""
    for rule in rules:
        if not _matches(rule.to, service) or not any(_matches(a, caller) for a in rule.allow):
            continue
        if all(caller_labels.get(k) == v for k, v in rule.labels):
            return rule
    named = any(_matches(r.to, service) for r in rules)
    why = "no rule of the policy allows it" if named else "no rule of the policy names this service"
    raise PolicyDenied(f"{caller} may not reach {service}: {why}")
