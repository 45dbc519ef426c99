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

The policy's ``notary`` routes say which exchanges a notary (``tunnel inbound --notary``) records, and
how (:data:`LEVELS`; docs/architecture.md, "Notary"):

.. code-block:: toml

    [[notary]]
    service = "spiffe://alpha.example/ns/pay/"  # the service: a SPIFFE ID, or a namespace ending in "/"
    route = "/transfers"                        # a path prefix, matched on "/" boundaries
    methods = ["POST", "PUT"]                   # optional: every method when absent
    level = "sign-request"                      # workload-only | log-request | sign-request

The longest matching route of the service decides; an exchange no route matches is not recorded.

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


LEVELS = ("workload-only", "log-request", "sign-request")
_ROUTE_KEYS = frozenset({"service", "route", "methods", "level"})
MAX_ROUTES = 1024


@dataclass(frozen=True)
class Route:
    service: str
    path: str
    methods: tuple[str, ...]  # empty: every method
    level: str


def parse_routes(items: Iterable[Any]) -> tuple[Route, ...]:
    """The policy's ``notary`` list as routes; ``malformed`` for anything else."""
    routes: list[Route] = []
    for i, item in enumerate(items):
        if len(routes) >= MAX_ROUTES:
            raise Malformed(f"at most {MAX_ROUTES} notary routes")
        if not isinstance(item, Mapping) or set(item) - _ROUTE_KEYS or not {"service", "route", "level"} <= set(item):
            raise Malformed(f"notary route {i} has 'service', 'route', 'level' and optionally 'methods'")
        path = item["route"]
        if not isinstance(path, str) or not path.startswith("/") or len(path) > 1024:
            raise Malformed(f"notary route {i}: 'route' is a path prefix starting with '/'")
        if item["level"] not in LEVELS:
            raise Malformed(f"notary route {i}: 'level' is one of {', '.join(LEVELS)}")
        methods = item.get("methods", [])
        if not isinstance(methods, list) or len(methods) > 32:
            raise Malformed(f"notary route {i}: 'methods' lists at most 32 methods")
        if not all(isinstance(m, str) and m.isascii() and m.isalpha() and m.isupper() for m in methods):
            raise Malformed(f"notary route {i}: methods are upper-case HTTP method names")
        routes.append(Route(_pattern(item["service"], f"notary route {i} 'service'"), path, tuple(methods),
                            item["level"]))  # fmt: skip
    return tuple(routes)


def _on_path(prefix: str, path: str) -> bool:
    return path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/")


def notary_level(routes: Sequence[Route], service: str, method: str, target: str) -> str | None:
    """The level of the longest route of ``service`` matching ``method`` and ``target``'s path; None if none."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    best: Route | None = None
    for r in routes:
        if not _matches(r.service, service) or (r.methods and method not in r.methods) or not _on_path(r.path, path):
            continue
        if best is None or len(r.path) > len(best.path):
            best = r
    return best.level if best is not None else None


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
