"""SPIFFE names: trust domain names and SPIFFE IDs (SPIFFE ID §2), the one place their rules live.

* A trust domain name (§2.1) is 1 to 255 bytes of lowercase letters, digits,
  dots, dashes and underscores; no userinfo, port or percent-encoding.  We add
  one restriction: it neither begins nor ends with a dot.  Every CA of a
  domain carries the domain as a URI name constraint, and RFC 5280 §4.2.1.10
  reads a constraint that begins with a dot as "every host below it": a
  domain named ``.example`` would be permitted ``spiffe://alpha.example/...``.
* A SPIFFE ID (§2) is ``spiffe://`` + trust domain + path, at most 2,048 bytes
  (§2.3).  A workload's ID has a non-empty path (§2.2) whose segments are
  letters, digits, dots, dashes and underscores, never empty, ``.`` or ``..``,
  and no trailing ``/``.  A trust domain's own ID is ``spiffe://td``.

Every check uses ``fullmatch``: ``re.match(r"...$")`` would let a trailing
newline through.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from qhx_edge.core.errors import Malformed

SCHEME = "spiffe://"
MAX_TRUST_DOMAIN = 255
MAX_SPIFFE_ID = 2048

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def check_trust_domain(name: Any) -> str:
    """``name`` if it is a trust domain name (SPIFFE ID §2.1), else :class:`Malformed`."""
    if not isinstance(name, str) or not _TRUST_DOMAIN.fullmatch(name) or name.strip(".") != name:
        raise Malformed(f"invalid trust domain name {name!r}")
    return name


def parse_spiffe_id(value: Any) -> tuple[str, str]:
    """``(trust domain, path)`` of a workload SPIFFE ID (a non-empty path), else :class:`Malformed`."""
    if not isinstance(value, str):
        raise Malformed(f"{value!r} is not a SPIFFE ID")
    return _parse_spiffe_id(value)


@functools.lru_cache(maxsize=4096)  # verification meets the same few IDs again and again; a refusal is not kept
def _parse_spiffe_id(value: str) -> tuple[str, str]:
    if len(value.encode()) > MAX_SPIFFE_ID or not value.startswith(SCHEME):
        raise Malformed(f"{value!r} is not a SPIFFE ID")
    domain, slash, path = value[len(SCHEME) :].partition("/")
    if (
        not slash
        or not _TRUST_DOMAIN.fullmatch(domain)
        or domain.strip(".") != domain
        or any(not _SEGMENT.fullmatch(s) or s in (".", "..") for s in path.split("/"))
    ):
        raise Malformed(f"{value!r} is not a SPIFFE ID with a workload path")
    return domain, "/" + path


def trust_domain_of(name_or_id: Any) -> str:
    """The trust domain of ``spiffe://td/path``, ``spiffe://td`` or ``td`` (checked)."""
    if not isinstance(name_or_id, str):
        raise Malformed(f"{name_or_id!r} is not a trust domain or SPIFFE ID")
    rest = name_or_id.removeprefix(SCHEME)
    return check_trust_domain(rest.split("/", 1)[0])


def trust_domain_id(domain: str) -> str:
    """A trust domain's own SPIFFE ID, ``spiffe://td`` (as the Workload API keys bundles)."""
    return SCHEME + check_trust_domain(domain)
