"""Policy TOML files and durations, turned into the ``policy`` payload fields.

A policy file::

    [staleness]          # docs/architecture.md "Freshness and modes"
    soft = "6h"          # S1: connected below this staleness
    hard = "72h"         # S2: expired at or beyond it; no SVID outlives issued_at + S2
    svid_ttl = "1h"      # TTL while connected
    ttl_floor = "5m"     # smallest TTL while degraded

    [algorithms]         # SVID key algorithm per SPIFFE ID path prefix
    "/" = "ES256"
    "/pq/" = "ML-DSA-65"

    [[registrations]]    # selector sets to SPIFFE IDs, as SPIRE's entries
    spiffe_id = "spiffe://alpha.example/web"
    selectors = ["unix:uid:1000"]

    [attestation]
    challenge_ttl = "3d" # how long a node may take to answer (a courier's round trip)

    [attestation.tpm.pcrs]  # PCR values (sha256 bank) a node's TPM quote must show
    0 = "3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969"

    [federation]         # limits on every partner, whatever an agreement says
    max_partner_staleness = "24h"  # no partner trusted staler (caps each agreement's budget)
    spiffe_bundles = false         # no partner trust from unsigned SPIFFE bundles

    [[authorization]]    # who may reach a service through a tunnel (core/authz.py)
    to = "spiffe://alpha.example/db"           # a SPIFFE ID, or a namespace ending in "/"
    allow = ["spiffe://alpha.example/web"]     # callers: SPIFFE IDs or namespaces ending in "/"
    labels = { tier = "frontend" }             # optional: labels our registrations bind to the caller

    [[notary]]           # which exchanges a notary records, and how (core/authz.py)
    service = "spiffe://alpha.example/db"      # a SPIFFE ID, or a namespace ending in "/"
    route = "/orders"                          # a path prefix
    methods = ["POST"]                         # optional: every method when absent
    level = "sign-request"                     # workload-only | log-request | sign-request
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

from qhx_edge.core import suites
from qhx_edge.core.authz import parse_routes, parse_rules
from qhx_edge.core.errors import Malformed

MAX_POLICY_FILE = 1 << 20

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# ASCII digits only: re's \d (and int()) also take other scripts' digits, such as "٣".
_DURATION = re.compile(r"\s*([0-9]{1,19})\s*([smhdw]?)\s*", re.ASCII)
_PCR_INDEX = re.compile(r"[0-9]{1,2}", re.ASCII)
# Durations end up added to times in documents, certificates and SQLite (all at most 2^63 - 1, and
# X.509 dates before year 10000): a century is longer than anything qhx-edge needs to express.
MAX_DURATION = 100 * 365 * 86400
SVID_ALGORITHMS = tuple(suites.name_of(alg) for alg in suites.SVID_ALGORITHMS)

DEFAULT_STALENESS = {"soft": 6 * 3600, "hard": 72 * 3600, "svid_ttl": 3600, "ttl_floor": 300}
DEFAULT_ALGORITHMS = {"/": "ES256"}
_REGISTRATION_KEYS = {"spiffe_id", "selectors", "ttl", "namespace", "labels"}


def duration(value: Any, what: str = "duration") -> int:
    """Seconds from an integer or a string such as ``"90d"``, ``"6h"``, ``"300"`` (at most a century)."""
    seconds: int | None = None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        seconds = value
    elif isinstance(value, str):
        m = _DURATION.fullmatch(value)
        if m:
            seconds = int(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds is None:
        raise Malformed(f"{what}: {value!r} is not a duration (examples: 300, '45s', '30m', '6h', '90d')")
    if seconds > MAX_DURATION:
        raise Malformed(f"{what}: {value!r} is longer than a century, the longest duration qhx-edge takes")
    return seconds


def _table(data: dict[str, Any], key: str, what: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise Malformed(f"{what} must be a table")
    return value


def _tables(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise Malformed(f"{key} must be an array of tables ([[{key}]])")
    return value


def policy_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Validate a parsed policy TOML table and return the payload fields (every bad value ``malformed``)."""
    known = {"staleness", "algorithms", "registrations", "authorization", "attestation", "federation", "notary"}
    unknown = set(data) - known
    if unknown:
        raise Malformed(f"unknown policy sections {sorted(unknown)}")
    stale = dict(DEFAULT_STALENESS)
    for key, value in _table(data, "staleness", "[staleness]").items():
        if key not in stale:
            raise Malformed(f"unknown staleness setting {key!r}")
        stale[key] = duration(value, f"staleness.{key}")
    algorithms = dict(_table(data, "algorithms", "[algorithms]")) if "algorithms" in data else dict(DEFAULT_ALGORITHMS)
    for prefix, alg in algorithms.items():
        if alg not in SVID_ALGORITHMS:
            raise Malformed(f"algorithm for {prefix!r} must be one of {SVID_ALGORITHMS}")
    regs = []
    for item in _tables(data, "registrations"):
        if set(item) - _REGISTRATION_KEYS:
            raise Malformed("a registration has spiffe_id, selectors and optionally ttl, namespace, labels")
        reg = dict(item)
        if "ttl" in reg:
            reg["ttl"] = duration(reg["ttl"], "registration ttl")
        regs.append(reg)
    auth = [dict(a) for a in _tables(data, "authorization")]
    parse_rules(auth)  # refused here, at publishing, not at the first connection
    out = {"registrations": regs, "authorization": auth, "algorithms": algorithms, "staleness": stale}
    if "notary" in data:
        routes = [dict(r) for r in _tables(data, "notary")]
        parse_routes(routes)  # refused at publishing
        out["notary"] = routes
    if "attestation" in data:
        att = _table(data, "attestation", "[attestation]")
        if set(att) - {"tpm", "challenge_ttl"}:
            raise Malformed(f"unknown attestation settings {sorted(set(att) - {'tpm', 'challenge_ttl'})}")
        tpm = _table(att, "tpm", "[attestation.tpm]")
        if set(tpm) - {"pcrs"}:
            raise Malformed(f"unknown attestation.tpm settings {sorted(set(tpm) - {'pcrs'})}")
        pcrs = {}
        for index, value in _table(tpm, "pcrs", "[attestation.tpm.pcrs]").items():
            if not _PCR_INDEX.fullmatch(index) or int(index) > 23:
                raise Malformed(f"attestation.tpm.pcrs: {index!r} is not a PCR index (0 to 23)")
            try:
                digest = bytes.fromhex(value)
            except (ValueError, TypeError) as exc:
                raise Malformed(f"attestation.tpm.pcrs.{index} must be a hex SHA-256 value") from exc
            if len(digest) != 32:
                raise Malformed(f"attestation.tpm.pcrs.{index} must be a SHA-256 value (32 bytes)")
            pcrs[str(int(index))] = digest
        attestation: dict[str, Any] = {"tpm": {"pcrs": pcrs}} if "tpm" in att else {}
        if "challenge_ttl" in att:
            attestation["challenge_ttl"] = duration(att["challenge_ttl"], "attestation.challenge_ttl")
        out["attestation"] = attestation
    if "federation" in data:
        fed = _table(data, "federation", "[federation]")
        if set(fed) - {"max_partner_staleness", "spiffe_bundles"}:
            raise Malformed(
                f"unknown federation settings {sorted(set(fed) - {'max_partner_staleness', 'spiffe_bundles'})}"
            )
        limits: dict[str, Any] = {}
        if "max_partner_staleness" in fed:
            limits["max_partner_staleness"] = duration(fed["max_partner_staleness"], "federation.max_partner_staleness")
        if "spiffe_bundles" in fed:
            if not isinstance(fed["spiffe_bundles"], bool):
                raise Malformed("federation.spiffe_bundles must be true or false")
            limits["spiffe_bundles"] = fed["spiffe_bundles"]
        out["federation"] = limits
    return out


def parse_policy_file(text: bytes, name: str) -> dict[str, Any]:
    """Policy payload fields from the bytes of a policy TOML file (``name`` is for messages)."""
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise Malformed(f"{name}: not valid TOML: {exc}") from exc
    return policy_fields(data)
