"""Signed documents: one payload class per type inside one COSE_Sign envelope.

Shaped after python-tuf's ``Metadata[T]``: :class:`Signed` is the generic
envelope (exact signed bytes, parsed COSE_Sign, decoded payload) and each
document type is a payload class with ``type: ClassVar[str]``,
``from_dict`` / ``to_dict``.  Decoding is strict: every known field is
type-checked, and fields this version does not know are kept in
``unrecognized`` and written back unchanged by ``to_dict`` (forward
compatibility: a newer authority may add fields an older node must carry).

Common fields (DESIGN.md): ``type``, ``domain``, ``version`` (monotonic per
domain and type, >= 1), ``issued_at`` and ``expires`` (integer Unix seconds,
``issued_at <= expires``).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from qhx_edge.core import cbor, cose
from qhx_edge.core.cose import Envelope
from qhx_edge.core.errors import Malformed
from qhx_edge.core.limits import MAX_INT
from qhx_edge.core.spiffe import check_trust_domain, parse_spiffe_id, trust_domain_id
from qhx_edge.core.suites import SUITES, PublicKey

CONTENT_TYPE = "application/qhx-edge+cbor"

# Caps (DESIGN.md "size caps on everything"): a document is at most 1 MiB.
MAX_DOCUMENT_SIZE = 1 << 20
MAX_KEYS = 256
MAX_LIST = 4096

ROLES = ("root", "pki", "policy", "freshness", "federation", "notary")
ROLE_FOR_TYPE = {
    "root": "root",
    "bundle": "pki",
    "policy": "policy",
    "freshness": "freshness",
    "agreement": "federation",
    "delegation": "pki",
    "revocation": "pki",
    "notary": "notary",
}
# The documents a freshness epoch binds together (mix-and-match guard); and the one it binds once the
# domain has revoked anything (an epoch then names the revocation list: holding it back holds back
# freshness too, so a relay that drops revocations leaves the node stale, never trusting).
EPOCH_TYPES = ("root", "bundle", "policy")
OPTIONAL_EPOCH_TYPES = ("revocation",)


def _get(d: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str | None = None) -> Any:
    if key not in d:
        raise Malformed(f"missing field {key!r}")
    value = d[key]
    if isinstance(value, bool) and kind is int:
        raise Malformed(f"field {key!r} must be {what or kind}")
    if not isinstance(value, kind):
        raise Malformed(f"field {key!r} must be {what or getattr(kind, '__name__', kind)}")
    return value


def _uint(d: dict[str, Any], key: str, minimum: int = 0) -> int:
    value: int = _get(d, key, int, "an unsigned integer")
    if not minimum <= value <= MAX_INT:
        raise Malformed(f"field {key!r} out of range (at most 2^63 - 1)")
    return value


@dataclass(frozen=True, kw_only=True)
class Payload(abc.ABC):
    """Common fields of every document."""

    type: ClassVar[str] = ""
    _fields: ClassVar[tuple[str, ...]] = ()

    domain: str
    version: int
    issued_at: int
    expires: int
    unrecognized: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def _common(cls, d: dict[str, Any]) -> dict[str, Any]:
        if d.get("type") != cls.type:
            raise Malformed(f"expected a {cls.type} document")
        issued_at, expires = _uint(d, "issued_at"), _uint(d, "expires")
        common: dict[str, Any] = {
            "domain": check_trust_domain(d.get("domain")),
            "version": _uint(d, "version", 1),
            "issued_at": issued_at,
            "expires": expires,
        }
        if expires < issued_at:
            raise Malformed("expires is before issued_at")
        known = {"type", "domain", "version", "issued_at", "expires", *cls._fields}
        for key in d:
            if not isinstance(key, str):
                raise Malformed("document map keys must be text strings")
        common["unrecognized"] = {k: v for k, v in d.items() if k not in known}
        return common

    def _common_dict(self) -> dict[str, Any]:
        out = dict(self.unrecognized)
        out.update(
            type=self.type,
            domain=self.domain,
            version=self.version,
            issued_at=self.issued_at,
            expires=self.expires,
        )
        return out

    @classmethod
    @abc.abstractmethod
    def from_dict(cls, d: dict[str, Any]) -> Payload:
        """Strictly validate a decoded payload map (each document type defines it)."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The payload map, unknown fields included (each document type defines it)."""

    def to_bytes(self) -> bytes:
        return cbor.encode(self.to_dict())


@dataclass(frozen=True)
class RoleKeys:
    keyids: tuple[str, ...]
    threshold: int

    @classmethod
    def from_dict(cls, name: str, d: Any) -> RoleKeys:
        if not isinstance(d, dict):
            raise Malformed(f"role {name!r} must be a map")
        keyids = _get(d, "keyids", list)
        if not keyids or len(keyids) > MAX_KEYS or not all(isinstance(k, str) for k in keyids):
            raise Malformed(f"role {name!r} needs a list of key ids")
        # python-tuf refuses duplicate key ids in a role: a key listed twice must
        # never count twice towards the threshold (verify.py counts distinct keys too).
        if len(set(keyids)) != len(keyids):
            raise Malformed(f"role {name!r} lists a key id more than once")
        threshold = _uint(d, "threshold", 1)
        if threshold > len(keyids):
            raise Malformed(f"role {name!r} threshold {threshold} exceeds its {len(keyids)} keys")
        return cls(tuple(keyids), threshold)

    def to_dict(self) -> dict[str, Any]:
        return {"keyids": list(self.keyids), "threshold": self.threshold}


@dataclass(frozen=True, kw_only=True)
class Root(Payload):
    """Keys and thresholds of every role (TUF root)."""

    type: ClassVar[str] = "root"
    _fields: ClassVar[tuple[str, ...]] = ("suite", "keys", "roles")

    suite: str
    keys: dict[str, PublicKey]
    roles: dict[str, RoleKeys]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Root:
        common = cls._common(d)
        suite = _get(d, "suite", str)
        if suite not in SUITES:
            raise Malformed(f"unknown suite {suite!r}")
        raw_keys = _get(d, "keys", dict)
        if len(raw_keys) > MAX_KEYS:
            raise Malformed("too many keys")
        keys: dict[str, PublicKey] = {}
        for keyid, value in raw_keys.items():
            key = PublicKey.from_cbor(value)
            if key.keyid != keyid:
                raise Malformed(f"key id {keyid!r} does not match its key")
            keys[keyid] = key
        algs = set(SUITES[suite])
        for keyid, key in keys.items():
            # A hybrid domain's every key is hybrid: one weaker key would let its
            # role be satisfied by one algorithm alone.
            if set(key.algs) != algs:
                raise Malformed(f"key {keyid[:16]} does not hold exactly the algorithms of suite {suite}")
        raw_roles = _get(d, "roles", dict)
        roles: dict[str, RoleKeys] = {}
        for name in ROLES:
            if name not in raw_roles:
                raise Malformed(f"root has no {name!r} role")
            roles[name] = RoleKeys.from_dict(name, raw_roles[name])
            for keyid in roles[name].keyids:
                if keyid not in keys:
                    raise Malformed(f"role {name!r} names unknown key {keyid[:16]}")
        extra = set(raw_roles) - set(ROLES)
        if extra:
            raise Malformed(f"unknown roles {sorted(extra)}")
        return cls(suite=suite, keys=keys, roles=roles, **common)

    def to_dict(self) -> dict[str, Any]:
        out = self._common_dict()
        out.update(
            suite=self.suite,
            keys={k: v.to_cbor() for k, v in self.keys.items()},
            roles={k: v.to_dict() for k, v in self.roles.items()},
        )
        return out

    def role_keys(self, role: str) -> dict[str, PublicKey]:
        return {k: self.keys[k] for k in self.roles[role].keyids}


@dataclass(frozen=True, kw_only=True)
class Bundle(Payload):
    """The domain's X.509 and JWT authorities (a SPIFFE trust bundle)."""

    type: ClassVar[str] = "bundle"
    _fields: ClassVar[tuple[str, ...]] = ("x509_authorities", "jwt_authorities", "refresh_hint")

    x509_authorities: tuple[bytes, ...]
    jwt_authorities: tuple[dict[str, Any], ...]
    refresh_hint: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Bundle:
        common = cls._common(d)
        x509 = _get(d, "x509_authorities", list)
        if len(x509) > MAX_LIST or not all(isinstance(c, bytes) and c for c in x509):
            raise Malformed("x509_authorities must be a list of DER certificates")
        jwt = _get(d, "jwt_authorities", list)
        for item in jwt:
            if not isinstance(item, dict) or not isinstance(item.get("kid"), str) or not item["kid"]:
                raise Malformed("every JWT authority needs a text 'kid' (SPIFFE bundle §4.2.2)")
            if not isinstance(item.get("spki"), bytes):
                raise Malformed("every JWT authority needs its public key as DER 'spki'")
        return cls(
            x509_authorities=tuple(x509),
            jwt_authorities=tuple(jwt),
            refresh_hint=_uint(d, "refresh_hint"),
            **common,
        )

    def to_dict(self) -> dict[str, Any]:
        out = self._common_dict()
        out.update(
            x509_authorities=list(self.x509_authorities),
            jwt_authorities=list(self.jwt_authorities),
            refresh_hint=self.refresh_hint,
        )
        return out


@dataclass(frozen=True)
class Staleness:
    """Staleness budgets and SVID lifetimes, in seconds (DESIGN.md "Freshness")."""

    soft: int
    hard: int
    svid_ttl: int
    ttl_floor: int

    @classmethod
    def from_dict(cls, d: Any) -> Staleness:
        if not isinstance(d, dict):
            raise Malformed("staleness must be a map")
        s = cls(_uint(d, "soft"), _uint(d, "hard", 1), _uint(d, "svid_ttl", 1), _uint(d, "ttl_floor", 1))
        if not s.soft <= s.hard:
            raise Malformed("staleness soft budget must not exceed the hard budget")
        if not s.ttl_floor <= s.svid_ttl:
            raise Malformed("ttl_floor must not exceed svid_ttl")
        return s

    def to_dict(self) -> dict[str, int]:
        return {"soft": self.soft, "hard": self.hard, "svid_ttl": self.svid_ttl, "ttl_floor": self.ttl_floor}


# A PCR index as the policy writes it: canonical ASCII decimal ("7", never "07" or another script's digit), 0 to 23.
_PCR_INDEX = re.compile(r"(?:[0-9]|1[0-9]|2[0-3])", re.ASCII)
MAX_CHALLENGE_TTL = 30 * 86400


def _attestation(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) - {"tpm", "challenge_ttl"}:
        raise Malformed("policy attestation must be a map with optional 'tpm' and 'challenge_ttl' entries")
    out: dict[str, Any] = {}
    if "challenge_ttl" in value:
        ttl = value["challenge_ttl"]
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 60 <= ttl <= MAX_CHALLENGE_TTL:
            raise Malformed("policy attestation.challenge_ttl must be 60 seconds to 30 days")
        out["challenge_ttl"] = ttl
    tpm = value.get("tpm", {})
    if not isinstance(tpm, dict) or set(tpm) - {"pcrs"}:
        raise Malformed("policy attestation.tpm has only 'pcrs'")
    pcrs = tpm.get("pcrs", {})
    if not isinstance(pcrs, dict) or not all(
        isinstance(k, str) and _PCR_INDEX.fullmatch(k) and isinstance(v, bytes) and len(v) == 32
        for k, v in pcrs.items()
    ):
        raise Malformed("policy attestation.tpm.pcrs maps PCR indexes (0-23) to 32-byte SHA-256 values")
    if tpm:
        out["tpm"] = {"pcrs": dict(pcrs)}
    return out


@dataclass(frozen=True)
class PartnerLimits:
    """What a domain's policy allows any partner, whatever an agreement says (``[federation]`` of a
    policy file; docs/architecture.md "Agreements").  ``max_staleness``: no partner is trusted staler
    than this (seconds; None: the agreement's budget alone); ``spiffe_bundles``: whether a partner's
    trust may come as an unsigned SPIFFE bundle at all, where an agreement allows it."""

    max_staleness: int | None = None
    spiffe_bundles: bool = True

    @classmethod
    def from_dict(cls, value: Any) -> PartnerLimits:
        if not isinstance(value, dict) or set(value) - {"max_partner_staleness", "spiffe_bundles"}:
            raise Malformed("policy federation must be a map with 'max_partner_staleness' and 'spiffe_bundles'")
        cap = _uint(value, "max_partner_staleness", 1) if "max_partner_staleness" in value else None
        allow = value.get("spiffe_bundles", True)
        if not isinstance(allow, bool):
            raise Malformed("policy federation.spiffe_bundles must be a boolean")
        return cls(cap, allow)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spiffe_bundles": self.spiffe_bundles}
        if self.max_staleness is not None:
            out["max_partner_staleness"] = self.max_staleness
        return out


@dataclass(frozen=True, kw_only=True)
class Policy(Payload):
    """Registrations, authorization rules, algorithms per namespace, staleness budgets."""

    type: ClassVar[str] = "policy"
    _fields: ClassVar[tuple[str, ...]] = (
        "registrations", "authorization", "algorithms", "staleness", "attestation", "federation", "notary",
    )  # fmt: skip

    registrations: tuple[dict[str, Any], ...]
    authorization: tuple[dict[str, Any], ...]
    algorithms: dict[str, str]
    staleness: Staleness
    # Node attestation policy: {"tpm": {"pcrs": {"<index>": sha256 value}}} (optional).
    attestation: dict[str, Any] = field(default_factory=dict)
    # Limits on every partner (optional; absent: what each agreement says).
    federation: PartnerLimits = field(default_factory=PartnerLimits)
    # The notary's routes and levels (core/authz.py parse_routes; optional).
    notary: tuple[dict[str, Any], ...] = ()

    def challenge_ttl(self, default: int) -> int:
        """How long an attestation challenge stays answerable: long enough for a courier's round trip."""
        ttl = self.attestation.get("challenge_ttl", default)
        assert isinstance(ttl, int)
        return ttl

    def tpm_pcrs(self) -> dict[int, bytes]:
        """The PCR values (sha256 bank) a TPM quote must show, by index."""
        pcrs = self.attestation.get("tpm", {}).get("pcrs", {})
        return {int(k): v for k, v in pcrs.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        common = cls._common(d)
        regs = _get(d, "registrations", list)
        if len(regs) > MAX_LIST:
            raise Malformed("too many registrations")
        prefix = f"spiffe://{common['domain']}/"
        for reg in regs:
            if not isinstance(reg, dict):
                raise Malformed("a registration must be a map")
            sid = reg.get("spiffe_id")
            if not isinstance(sid, str) or not sid.startswith(prefix):
                raise Malformed(f"registration SPIFFE ID must start with {prefix}")
            sel = reg.get("selectors")
            if not isinstance(sel, list) or not sel or not all(isinstance(s, str) and ":" in s for s in sel):
                raise Malformed("a registration needs a non-empty list of 'type:value' selectors")
        auth = _get(d, "authorization", list)
        if len(auth) > MAX_LIST or not all(isinstance(a, dict) for a in auth):
            raise Malformed("authorization must be a list of maps")
        algs = _get(d, "algorithms", dict)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in algs.items()):
            raise Malformed("algorithms must map namespaces to algorithm names")
        return cls(
            registrations=tuple(regs),
            authorization=tuple(auth),
            algorithms=dict(algs),
            staleness=Staleness.from_dict(d.get("staleness")),
            attestation=_attestation(d.get("attestation", {})),
            federation=PartnerLimits.from_dict(d["federation"]) if "federation" in d else PartnerLimits(),
            notary=tuple(_notary_routes(d.get("notary", []))),
            **common,
        )

    def to_dict(self) -> dict[str, Any]:
        out = self._common_dict()
        out.update(
            registrations=list(self.registrations),
            authorization=list(self.authorization),
            algorithms=dict(self.algorithms),
            staleness=self.staleness.to_dict(),
        )
        if self.attestation:
            out["attestation"] = self.attestation
        if self.federation != PartnerLimits():
            out["federation"] = self.federation.to_dict()
        if self.notary:
            out["notary"] = list(self.notary)
        return out


def _notary_routes(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > MAX_LIST or not all(isinstance(a, dict) for a in value):
        raise Malformed("notary must be a list of maps")
    return value


@dataclass(frozen=True, kw_only=True)
class Freshness(Payload):
    """The explicit freshness epoch: which versions belong together, signed often."""

    type: ClassVar[str] = "freshness"
    _fields: ClassVar[tuple[str, ...]] = ("versions", "agreements")

    versions: dict[str, int]
    agreements: dict[str, int]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Freshness:
        common = cls._common(d)
        raw = _get(d, "versions", dict)
        versions = {}
        for name in EPOCH_TYPES:
            versions[name] = _uint(raw, name, 1)
        for name in OPTIONAL_EPOCH_TYPES:
            if name in raw:
                versions[name] = _uint(raw, name, 1)
        unknown = set(raw) - set(EPOCH_TYPES) - set(OPTIONAL_EPOCH_TYPES)
        if unknown:
            raise Malformed(f"freshness names unknown types {sorted(unknown)}")
        agreements_raw = _get(d, "agreements", dict)
        agreements = {check_trust_domain(k): _uint(agreements_raw, k, 1) for k in agreements_raw}
        return cls(versions=versions, agreements=agreements, **common)

    def to_dict(self) -> dict[str, Any]:
        out = self._common_dict()
        out.update(versions=dict(self.versions), agreements=dict(self.agreements))
        return out


@dataclass(frozen=True, kw_only=True)
class Delegation(Payload):
    """A node's delegated intermediate CA(s), signed by the pki role after attestation.

    ``version`` is the authority's running count of delegations (monotonic per
    domain and type); ``node_id`` names the only node that may use it.
    """

    type: ClassVar[str] = "delegation"
    _fields: ClassVar[tuple[str, ...]] = ("node_id", "card_fingerprint", "attestation", "x509_cas", "jwt_key")

    node_id: str
    card_fingerprint: str
    attestation: dict[str, Any]
    x509_cas: tuple[bytes, ...]
    jwt_key: dict[str, Any]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Delegation:
        common = cls._common(d)
        node_id = _get(d, "node_id", str)
        if not 1 <= len(node_id) <= 64:
            raise Malformed("delegation node_id must be a short text")
        fp = _get(d, "card_fingerprint", str)
        if len(fp) != 64:
            raise Malformed("delegation card_fingerprint must be a SHA-256 hex digest")
        att = _get(d, "attestation", dict)
        if att.get("method") not in ("tpm", "join-token"):
            raise Malformed("delegation attestation method must be tpm or join-token")
        cas = _get(d, "x509_cas", list)
        if not 1 <= len(cas) <= 4 or not all(isinstance(c, bytes) and c for c in cas):
            raise Malformed("delegation x509_cas must list 1 to 4 DER certificates")
        jwt = _get(d, "jwt_key", dict)
        if not isinstance(jwt.get("kid"), str) or not jwt["kid"] or not isinstance(jwt.get("spki"), bytes):
            raise Malformed("delegation jwt_key needs a text kid and a DER spki")
        return cls(
            node_id=node_id,
            card_fingerprint=fp,
            attestation=dict(att),
            x509_cas=tuple(cas),
            jwt_key=dict(jwt),
            **common,
        )

    def to_dict(self) -> dict[str, Any]:
        out = self._common_dict()
        out.update(
            node_id=self.node_id,
            card_fingerprint=self.card_fingerprint,
            attestation=dict(self.attestation),
            x509_cas=list(self.x509_cas),
            jwt_key=dict(self.jwt_key),
        )
        return out


@dataclass(frozen=True, kw_only=True)
class NotaryDelegation(Payload):
    """The domain's notary role makes a node a notary (docs/architecture.md, "Notary").

    The node signs receipts and its receipt log's tree heads with the signing key of the card whose
    fingerprint this names (under the receipt content types, never the document one), from
    ``issued_at`` until ``expires``.  Like a delegation it names one node, is outside the freshness
    epoch and is held only by that node; a receipt carries it, so a verifier needs only the domain's
    root chain to check it.
    """

    type: ClassVar[str] = "notary"
    _fields: ClassVar[tuple[str, ...]] = ("node_id", "card_fingerprint")

    node_id: str
    card_fingerprint: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NotaryDelegation:
        common = cls._common(d)
        node_id = _get(d, "node_id", str)
        if not 1 <= len(node_id) <= 64:
            raise Malformed("notary node_id must be a short text")
        fp = _get(d, "card_fingerprint", str)
        if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
            raise Malformed("notary card_fingerprint must be a SHA-256 hex digest")
        return cls(node_id=node_id, card_fingerprint=fp, **common)

    def to_dict(self) -> dict[str, Any]:
        out = self._common_dict()
        out.update(node_id=self.node_id, card_fingerprint=self.card_fingerprint)
        return out


# The documents that delegate something to one node, and the role that signs each.
DELEGATION_TYPES = ("delegation", "notary")


# What one side of an agreement may release to the other (docs/architecture.md "Agreements").
# The root chain is always released: nothing else of a domain verifies without it.
RELEASES = ("bundle", "freshness", "policy", "policy:authorization", "revocation")
AGREEMENT_STATUSES = ("active", "terminated")
MAX_PREFIXES = 256


def _accept_prefix(value: Any, other: str) -> str:
    """A SPIFFE ID prefix of the domain ``other``: ``spiffe://other`` (all of it) or a workload ID."""
    if value == trust_domain_id(other):
        return str(value)
    domain, _ = parse_spiffe_id(value)
    if domain != other:
        raise Malformed(f"accepted prefix {value!r} is not an identity of {other}")
    return str(value)


@dataclass(frozen=True)
class Terms:
    """What one side grants the other: the other's SPIFFE IDs it accepts, what it releases to the
    other, its staleness budget for the other's trust material, and whether it takes the other's
    bundle in the plain SPIFFE format too (``allow_spiffe_bundles``: unsigned, e.g. from a partner
    that runs SPIRE), not only as signed documents."""

    accept: tuple[str, ...]
    release: tuple[str, ...]
    max_staleness: int
    allow_spiffe_bundles: bool

    @classmethod
    def from_dict(cls, side: str, other: str, d: Any) -> Terms:
        if not isinstance(d, dict) or set(d) != {"accept", "release", "max_staleness", "allow_spiffe_bundles"}:
            raise Malformed(f"terms of {side} must be a map of accept, release, max_staleness and allow_spiffe_bundles")
        accept = _get(d, "accept", list)
        if len(accept) > MAX_PREFIXES:
            raise Malformed(f"terms of {side}: too many accepted prefixes")
        prefixes = tuple(_accept_prefix(p, other) for p in accept)
        if len(set(prefixes)) != len(prefixes):
            raise Malformed(f"terms of {side} list an accepted prefix twice")
        release = _get(d, "release", list)
        if not all(isinstance(r, str) and r in RELEASES for r in release) or len(set(release)) != len(release):
            raise Malformed(f"terms of {side}: release lists each of {', '.join(RELEASES)} at most once")
        allow = d["allow_spiffe_bundles"]
        if not isinstance(allow, bool):
            raise Malformed(f"terms of {side}: allow_spiffe_bundles must be a boolean")
        return cls(prefixes, tuple(release), _uint(d, "max_staleness", 1), allow)

    def to_dict(self) -> dict[str, Any]:
        return {
            "accept": list(self.accept),
            "release": list(self.release),
            "max_staleness": self.max_staleness,
            "allow_spiffe_bundles": self.allow_spiffe_bundles,
        }


@dataclass(frozen=True, kw_only=True)
class Agreement(Payload):
    """A coalition federation between ``domain`` (the proposer) and ``partner`` (the acceptor).

    One document, signed in one COSE_Sign envelope by a threshold of the
    federation role of *both* domains (the proposer signs, the acceptor adds
    its signatures: :func:`countersign`).  ``roots`` pins each side's root by
    fingerprint (SHA-256 of its signed bytes); ``terms[X]`` is what side X
    grants the other.  ``version`` counts per pair of domains, whichever side
    proposed.  A ``terminated`` version ends the agreement and needs the
    threshold of one side only: either side may stop trusting at once.
    """

    type: ClassVar[str] = "agreement"
    _fields: ClassVar[tuple[str, ...]] = ("partner", "status", "roots", "terms")

    partner: str
    status: str
    roots: dict[str, str]
    terms: dict[str, Terms]

    @property
    def parties(self) -> tuple[str, str]:
        return (self.domain, self.partner)

    def other(self, domain: str) -> str:
        """The party that is not ``domain`` (which must be one of the two)."""
        if domain == self.domain:
            return self.partner
        if domain == self.partner:
            return self.domain
        raise ValueError(f"{domain} is not a party of this agreement")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Agreement:
        common = cls._common(d)
        domain = common["domain"]
        partner = check_trust_domain(d.get("partner"))
        if partner == domain:
            raise Malformed("an agreement needs two different domains")
        status = _get(d, "status", str)
        if status not in AGREEMENT_STATUSES:
            raise Malformed(f"agreement status must be one of {', '.join(AGREEMENT_STATUSES)}")
        parties = {domain, partner}
        roots = _get(d, "roots", dict)
        if set(roots) != parties or not all(
            isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v) for v in roots.values()
        ):
            raise Malformed("agreement roots must map both domains to a root fingerprint (SHA-256, lowercase hex)")
        raw_terms = _get(d, "terms", dict)
        if set(raw_terms) != parties:
            raise Malformed("agreement terms must give the terms of both domains")
        terms = {
            domain: Terms.from_dict(domain, partner, raw_terms[domain]),
            partner: Terms.from_dict(partner, domain, raw_terms[partner]),
        }
        return cls(partner=partner, status=status, roots=dict(roots), terms=terms, **common)

    def to_dict(self) -> dict[str, Any]:
        out = self._common_dict()
        out.update(
            partner=self.partner,
            status=self.status,
            roots=dict(self.roots),
            terms={k: v.to_dict() for k, v in self.terms.items()},
        )
        return out


REVOKED_USES = ("x509-ca", "jwt", "notary")
MAX_REVOKED = 4096


@dataclass(frozen=True)
class RevokedKey:
    """One revoked key: the SHA-256 of its SubjectPublicKeyInfo (DER), revoked from ``since``."""

    key: bytes
    since: int
    use: str  # x509-ca: a node's delegated CA; jwt: a node's JWT-SVID key
    node_id: str
    delegation: int  # the version of the delegation that delegated it

    @classmethod
    def from_dict(cls, d: Any) -> RevokedKey:
        if not isinstance(d, dict) or set(d) != {"key", "from", "use", "node_id", "delegation"}:
            raise Malformed("a revoked key is a map of key, from, use, node_id and delegation")
        key = d["key"]
        if not isinstance(key, bytes) or len(key) != 32:
            raise Malformed("a revoked key is named by the SHA-256 of its SubjectPublicKeyInfo (32 bytes)")
        if d["use"] not in REVOKED_USES:
            raise Malformed(f"a revoked key's use is one of {REVOKED_USES}")
        node_id = _get(d, "node_id", str)
        if not 1 <= len(node_id) <= 64:
            raise Malformed("a revoked key's node_id must be a short text")
        return cls(key, _uint(d, "from"), d["use"], node_id, _uint(d, "delegation", 1))

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "from": self.since, "use": self.use, "node_id": self.node_id,
                "delegation": self.delegation}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Revocation(Payload):
    """Keys of nodes the domain's pki role revoked (a node CA, a node JWT key), each from a time.

    Cumulative, as a CRL: each version lists every revocation of the domain so far, so the current
    one is the whole list and a node never needs an older one.  Small, sent first on every link and
    in every pack (core/sync.py ``URGENCY``); named by the freshness epoch once one exists.
    """

    type: ClassVar[str] = "revocation"
    _fields: ClassVar[tuple[str, ...]] = ("revoked",)

    revoked: tuple[RevokedKey, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Revocation:
        common = cls._common(d)
        items = _get(d, "revoked", list)
        if len(items) > MAX_REVOKED:
            raise Malformed(f"a revocation lists at most {MAX_REVOKED} keys")
        revoked = tuple(RevokedKey.from_dict(i) for i in items)
        if len({r.key for r in revoked}) != len(revoked):
            raise Malformed("a revocation lists each key once")
        return cls(revoked=revoked, **common)

    def to_dict(self) -> dict[str, Any]:
        out = self._common_dict()
        out.update(revoked=[r.to_dict() for r in self.revoked])
        return out

    def index(self) -> dict[bytes, int]:
        """Revoked key digest -> the time it is revoked from."""
        return {r.key: r.since for r in self.revoked}


PAYLOAD_TYPES: dict[str, type[Payload]] = {
    cls.type: cls for cls in (Root, Bundle, Policy, Freshness, Delegation, NotaryDelegation, Agreement, Revocation)
}

T = TypeVar("T", bound=Payload)


@dataclass(frozen=True)
class Signed(Generic[T]):
    """A signed document: its exact bytes, its envelope and its payload.

    A document is what its signers signed: its identity, :attr:`digest`, is
    the digest of its signed content (the envelope's protected header and
    payload, :attr:`Envelope.content_digest`), not of its bytes, so copies
    that differ only in unsigned parts are one document (docs/architecture.md
    "Verification rules").  What a node stores and relays is
    :meth:`canonical`: the envelope of the signatures that verified.
    """

    raw: bytes
    envelope: Envelope
    payload: T

    @property
    def digest(self) -> bytes:
        return self.envelope.content_digest

    def canonical(self, verified: Sequence[int]) -> Signed[T]:
        """This document with only the signatures at ``verified``, in the canonical envelope."""
        if self.envelope.in_canonical_form and len(verified) == len(self.envelope.signatures):
            return self  # every signature verified and the envelope is canonical already: nothing to rebuild
        raw = self.envelope.canonical(verified)
        if raw == self.raw:
            return self
        env = Envelope.parse(raw, max_size=MAX_DOCUMENT_SIZE)
        env.__dict__["content_digest"] = self.envelope.content_digest  # the same content (fills the cache)
        return Signed(raw, env, self.payload)

    @property
    def type(self) -> str:
        return self.payload.type

    @property
    def role(self) -> str:
        return ROLE_FOR_TYPE[self.payload.type]

    def describe(self) -> str:
        p = self.payload
        return f"{p.type} v{p.version} of {p.domain}"


def parse(data: bytes) -> Signed[Payload]:
    """Parse and validate a signed document (no signature check: :mod:`qhx_edge.core.trust` counts them)."""
    msg = cose.parse_signed(data, content_type=CONTENT_TYPE, max_size=MAX_DOCUMENT_SIZE, what="qhx-edge document")
    kind = msg.body.get("type")
    cls = PAYLOAD_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise Malformed(f"unknown document type {kind!r}")
    return Signed(msg.raw, msg.envelope, cls.from_dict(msg.body))


def sign(payload: Payload, signers: list[Any]) -> bytes:
    """Sign ``payload`` with every algorithm of every signer (a :class:`PrivateKey` list)."""
    return cose.sign(payload.to_bytes(), signers, content_type=CONTENT_TYPE)


def countersign(data: bytes, signers: list[Any]) -> bytes:
    """``data`` (a signed document) with signatures by ``signers`` added: the second side of an agreement.

    The signed content (protected header, payload) is unchanged, so the
    document keeps its :attr:`Signed.digest`; every signature is over the
    same ``Sig_structure`` (RFC 9052 §4.4), and the result is in the
    canonical signature order :func:`cose.sign` writes.  Signatures already
    present are kept as they are (the trust core decides which verify); a
    signer whose key id already signed replaces nothing and adds nothing.
    """
    doc = parse(data)
    env = doc.envelope
    have = {(s.kid, s.alg) for s in env.signatures}
    extra = cose.Envelope.parse(cose.sign(env.payload, signers, content_type=CONTENT_TYPE), max_size=MAX_DOCUMENT_SIZE)
    if extra.protected != env.protected:
        raise Malformed("the document's protected header is not the one this version writes")
    sigs = list(env.signatures) + [s for s in extra.signatures if (s.kid, s.alg) not in have]
    merged = cose.Envelope(env.protected, env.headers, env.payload, tuple(sigs))
    return merged.canonical(range(len(sigs)))
