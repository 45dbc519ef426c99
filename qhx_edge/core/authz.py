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

import re
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
        if route_path(path) != path:
            raise Malformed(f"notary route {i}: 'route' must be a normalised path ({route_path(path)!r})")
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


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def route_path(target: str) -> str:
    """The path a service routes a request ``target`` to, as routes are matched: the absolute form reduced
    to its path (RFC 9112 §3.2.2), the query dropped, unreserved characters percent-decoded (RFC 3986
    §6.2.2.2), dot-segments removed (§5.2.4) and empty segments dropped, so ``/%6Frders``, ``/./orders``,
    ``//orders`` and ``http://db/orders`` are all ``/orders``.  What servers decode in more than one way
    (an encoded ``/``, ``\\``, ``%`` or control character, a backslash, a broken escape) is ``malformed``."""
    if target == "*":
        return "*"
    path = target
    if not target.startswith("/"):
        m = _ABSOLUTE.match(target)
        if m is None:
            raise Malformed("a request target is a path or an absolute URI")
        path = target[m.end() :] or "/"
    path = path.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        path = "/" + path
    out: list[str] = []
    i = 0
    while i < len(path):
        c = path[i]
        if c == "%":
            h = path[i + 1 : i + 3]
            if len(h) != 2 or not set(h) <= _HEX:
                raise Malformed("a broken percent-escape in the request target")
            ch = chr(int(h, 16))
            if ch in _UNRESERVED:
                out.append(ch)
            elif ch in "/\\%" or ord(ch) < 0x20 or ord(ch) == 0x7F:
                raise Malformed(f"an encoded {ch!r} in the request target: servers decode it differently")
            else:
                out.append("%" + h.upper())
            i += 3
            continue
        if c == "\\" or ord(c) < 0x20 or ord(c) == 0x7F:
            raise Malformed("a backslash or control character in the request target")
        out.append(c)
        i += 1
    decoded = "".join(out)
    segments: list[str] = []
    for seg in decoded.split("/")[1:]:
        if seg in ("", "."):
            continue
        if seg == "..":
            if segments:
                segments.pop()
            continue
        segments.append(seg)
    trailing = segments and (decoded.endswith("/") or decoded.rsplit("/", 1)[-1] in (".", ".."))
    return "/" + "/".join(segments) + ("/" if trailing else "")


def notary_level(routes: Sequence[Route], service: str, method: str, target: str) -> str | None:
    """The level of the longest route of ``service`` matching ``method`` and ``target``'s path
    (:func:`route_path`); None if none; ``malformed`` for a target servers read in more than one way."""
    path = route_path(target)
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
