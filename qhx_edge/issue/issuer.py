"""SPIFFE issuance under bounded staleness (docs/issuance.md §4, DESIGN.md "Freshness").

An :class:`Issuer` serves one node home: it reads the trust state from the
node store (re-read whenever another process commits, ``PRAGMA
data_version``), matches the caller's selectors against the home domain's
policy ``registrations``, and issues

* **X.509-SVIDs** (SPIFFE X509-SVID): one URI SAN (the SPIFFE ID, critical,
  since the subject is empty: RFC 5280 §4.2.1.6), ``cA`` false
  (BasicConstraints, critical), key usage digitalSignature only (critical),
  extended key usage serverAuth + clientAuth, a random serial, subject and
  authority key identifiers; a fresh leaf key of the algorithm the policy
  ``algorithms`` map names for the longest matching path prefix (``ES256``:
  ECDSA P-256 when nothing matches, ``ML-DSA-65``), signed by the node's
  delegated intermediate of that algorithm;
* **JWT-SVIDs** (SPIFFE JWT-SVID): ``{"alg": "ES256", "kid": <delegation
  jwt_key kid>, "typ": "JWT"}``, claims ``sub``, ``aud`` (a list), ``exp``
  and ``iat``, signed with the node's JWT key (raw ``r || s``).

Rules:

* clock behind the store's trusted time beyond its tolerance: ``clock-rollback``;
  no delegation held, or an expired one: ``stale`` ("node not attested");
  expired mode: ``stale`` (fail closed); no matching registration:
  ``policy-denied`` ("no identity").
* TTL = min(registration ``ttl`` or the policy ``svid_ttl``, the mode's max
  TTL, delegation ``expires`` - now, the intermediate's notAfter - now); for
  JWT-SVIDs also at most :data:`JWT_MAX_TTL`.  ``notAfter = now + TTL``, so
  no SVID outlives ``staleness.issued_at + S2`` (the mode's max TTL already
  stops there) nor the delegation.  A registration's ``ttl`` is the shortest
  of every registration naming that SPIFFE ID, so every caller of one ID gets
  the same (cached) SVID.
* ``notBefore = now -`` :data:`BACKDATE` (relying parties' clock skew), but
  never before the intermediate's own notBefore, so the leaf's validity nests
  inside its issuer's.  It is deliberately *not* clamped to the freshness
  ``issued_at``: the backdate grants no extra lifetime, and the bounded-
  staleness invariant is about notAfter.
* SVIDs are cached per SPIFFE ID (JWT-SVIDs per ID and audience list, at
  most :data:`MAX_JWT_CACHE` of them in at most :attr:`Issuer.jwt_cache_bytes`,
  the oldest dropped first) and re-minted at half-life (never sooner than one
  second after minting); a new bundle, policy, root or delegation of the home
  domain, or a mode change, empties the cache.  ``cached_x509`` and
  ``cached_jwt`` answer from the cache without minting, writing or waiting
  (one read, which a writer holding the store never blocks): a locked store
  delays only what must be minted.
* A JWT-SVID request has 1 to :data:`MAX_AUDIENCES` non-empty audiences of at
  most :data:`MAX_AUDIENCE_BYTES` bytes, else ``malformed``.
* Every SVID minted is written to the node's audit log (event ``issue``:
  SPIFFE ID; an X.509-SVID's serial, or a JWT-SVID's key id and the SHA-256
  of its audience list as compact JSON (:func:`audience_digest`: the list
  itself may be long, or say more than the log should); notAfter, algorithm,
  mode, TTL; ``digest`` =
  SHA-256 of the certificate DER or of the token) before it is handed out:
  a call returns only after a fsynced commit holds its entries.  Concurrent
  callers share commits (:class:`~qhx_edge.store.trust_store.GroupCommit`:
  one transaction and one fsync for the entries of every caller waiting at
  that moment; docs/issuance.md §4).  If the audit write fails the SVIDs are
  neither returned nor cached, for every caller of that commit.
* Registrations the issuer cannot honour (a SPIFFE ID outside the SPIFFE ID
  syntax, a ``ttl`` that is not a positive integer) never match: fail closed
  for that entry only.

Validation (``validate_jwt``): ES256 only; header and claims are JSON objects
with no repeated member, nested at most :data:`MAX_JSON_DEPTH` levels, with no
``NaN``/``Infinity`` and no integer beyond the parser's digit limit (else
``malformed``, never an internal error); a ``crit`` header is refused
(``malformed``: RFC 7515 §4.1.11, we understand no extension); then the key by
``kid`` from the subject's trust domain bundle, the signature, ``exp``,
``nbf`` and the audience (``policy-denied`` when the token is not for it, which
the Workload API answers INVALID_ARGUMENT).

Bundles: the home domain's are always served (SVIDs already issued under them
keep running out); a partner domain's only while its own mode is not expired
(DESIGN.md: "a partner bundle older than its budget stops validating partner
SVIDs"; under an agreement the budget is our side's ``max_staleness``, none
while the agreement gate is closed, and a partner JWT-SVID's subject must be
inside the prefixes our side accepts: docs/architecture.md "Agreements").
A partner's bundle is its signed ``bundle`` document when one is held, else
the SPIFFE bundle imported for it (SPIFFE Trust Domain and Bundle §4; store
migration 9), under the same gate with that bundle's freshness time (its
import, or its last confirmation by an authenticated fetch) as the partner's
freshness, and only while our side's terms allow SPIFFE bundles (else
``scope-violation``): docs/architecture.md "SPIFFE-format partner bundles",
the rule ``svid verify`` follows too.

Thread safety: one lock guards the reading connection, the trust snapshot
and the caches, so the Workload API's worker threads may share one Issuer.
Minting and the audit commit run outside it: a caller plans its SVIDs under
the lock (TTL, signer), marks them in flight, mints them, and waits for the
commit; a second caller asking for an SVID in flight waits for that one, so
concurrent first requests for one SPIFFE ID mint once.  At most
:data:`MINT_SLOTS` callers plan or mint at a time (the rest sleep rather than
contend for the interpreter); waiting for a commit takes no slot.  The audit
log is written on a connection of its own, so this issuer's own commits move
``PRAGMA data_version`` too: the snapshot is re-read only when the rows it is
made of changed.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_der_public_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID

from qhx_edge.core import agreements, staleness, suites, trust
from qhx_edge.core.agreements import in_scope
from qhx_edge.core.delegations import NodeCa, delegation_end, delegation_status, node_cas, revocable_keys
from qhx_edge.core.documents import Bundle, Delegation, Freshness, PartnerLimits, Policy, Revocation, Staleness
from qhx_edge.core.errors import (
    BadSignature,
    ClockRollback,
    Expired,
    Malformed,
    MissingFile,
    NoAgreement,
    NotYetValid,
    PolicyDenied,
    Revoked,
    ScopeViolation,
    Stale,
    StoreCorrupt,
    UnknownDomain,
)
from qhx_edge.core.jsonstrict import strict_object
from qhx_edge.core.spiffe import parse_spiffe_id
from qhx_edge.core.spiffe_bundle import JWT_USE, jwk_of
from qhx_edge.core.suites import ES256
from qhx_edge.core.x509ca import private_key_object
from qhx_edge.store import clock
from qhx_edge.store.identity import NodeIdentity
from qhx_edge.store.keystore import Keystore
from qhx_edge.store.trust_store import AuditEntry, GroupCommit, HeldSpiffeBundle, Store, copy_error

BACKDATE = 30  # seconds an X.509-SVID's notBefore lies before its minting
JWT_MAX_TTL = 300  # a JWT-SVID is a bearer token: five minutes at most
MIN_ROTATION = 1  # never re-mint sooner than this after minting (no busy loops)
POLL_SECONDS = 5.0  # refresh_in() cap: documents imported by another process are noticed this fast
MAX_JWT_CACHE = 1024  # JWT-SVIDs cached per (SPIFFE ID, audience list); the oldest go first
MAX_JWT_CACHE_BYTES = 4 << 20  # and at most this many bytes of them (tokens, audiences, IDs)
MAX_AUDIENCES = 32  # audiences of one JWT-SVID
MAX_AUDIENCE_BYTES = 256  # UTF-8 bytes of one audience
MAX_JSON_DEPTH = 16  # nesting of a JWT header or claims set (ours are flat)
MINT_SLOTS = 2  # callers planning or minting at once (see Issuer._slots)
CACHED_LOCK_WAIT = 0.0005  # seconds Issuer.cached_x509 waits for the lock
MAX_TOKEN = 16 << 10  # a JWT-SVID to validate is at most 16 KiB
ALGORITHMS = {suites.name_of(alg): alg for alg in suites.SVID_ALGORITHMS}
DEFAULT_ALGORITHM = "ES256"
X509_SVID = "x509-svid"
JWT_SVID = "jwt-svid"
SIGNED = "signed"  # a partner's bundle from its signed bundle document
SPIFFE_BUNDLE = "spiffe-bundle"  # ... from an imported SPIFFE bundle (lower assurance)

_EMPTY_NAME = x509.Name([])
_BASIC = x509.BasicConstraints(ca=False, path_length=None)
_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
_SHA256 = hashes.SHA256()

CaPrivateKey = ec.EllipticCurvePrivateKey | mldsa.MLDSA65PrivateKey


@dataclass(frozen=True)
class X509Svid:
    spiffe_id: str
    cert_chain: list[bytes]  # DER, leaf first, then the node intermediate (the domain CA is in the bundle)
    private_key: bytes  # PKCS#8 DER
    bundle: bytes  # concatenated DER of the trust domain's X.509 authorities (current bundle document)
    hint: str = ""
    not_after: int = 0


@dataclass(frozen=True)
class JwtSvid:
    spiffe_id: str
    token: str
    hint: str = ""
    expires: int = 0


# --- SPIFFE IDs ---------------------------------------------------------------------------


def algorithm_for(spiffe_id: str, algorithms: dict[str, str]) -> str:
    """The algorithm the policy names for the longest path prefix of ``spiffe_id`` (``ES256`` if none)."""
    _, path = parse_spiffe_id(spiffe_id)
    best: str | None = None
    for prefix in algorithms:
        if path.startswith(prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    return DEFAULT_ALGORITHM if best is None else algorithms[best]


# --- the trust snapshot ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Registration:
    selectors: frozenset[str]
    spiffe_id: str


@dataclass(frozen=True)
class _DomainState:
    bundle: Bundle | None
    fresh_issued_at: int | None
    budget: Staleness | None
    jwt_keys: dict[str, ec.EllipticCurvePublicKey]
    jwks: bytes
    expires: dict[str, int]  # of the held root, bundle and policy: past any, the domain is expired
    # A partner under an agreement (core/agreements.py): the SPIFFE ID prefixes our side accepts from it.
    # Its budget is then the agreement's, and a closed agreement (no-agreement) leaves it without one.
    accept: tuple[str, ...] | None = None
    # The concatenated DER of the bundle's X.509 authorities that are CA certificates we can read: what
    # workloads get (a partner's unreadable authority is left out, never passed on or fatal).
    x509_der: bytes = b""
    # Where the authorities served come from: SIGNED (the bundle document), SPIFFE_BUNDLE (a partner's
    # imported SPIFFE bundle, when no signed one is held), or None: nothing is served for this domain.
    assurance: str | None = None
    # A partner's SPIFFE bundle held but not served because our side's terms do not allow SPIFFE bundles.
    refusal: str | None = None
    # What the served SPIFFE bundle is (sequence, content digest, freshness time): part of the generation.
    spiffe_mark: str = ""


def _readable_authorities(authorities: Iterable[bytes]) -> bytes:
    out = []
    for der in authorities:
        try:
            cert = x509.load_der_x509_certificate(der)
            cert.public_key()
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except (ValueError, TypeError, UnsupportedAlgorithm, x509.ExtensionNotFound, x509.DuplicateExtension):
            continue
        if bc.ca:
            out.append(der)
    return b"".join(out)


@dataclass(frozen=True)
class _Snapshot:
    home: str
    tolerance: int
    high_water: int
    generation: bytes  # every domain's root, bundle, policy and the delegation
    home_generation: bytes  # the home domain's: what cached SVIDs depend on
    domains: dict[str, _DomainState]
    policy: Policy | None
    registrations: tuple[_Registration, ...]
    by_selector: dict[str, tuple[int, ...]]  # see _index()
    reg_ttl: dict[str, int | None]
    reg_alg: dict[str, str]  # SPIFFE ID -> the algorithm the policy names for it
    home_bundle: bytes  # concatenated DER of the home domain's X.509 authorities
    delegation: Delegation | None
    cas: dict[int, NodeCa]
    delegation_end: int | None  # see delegation_end()
    observed: int = 0  # the latest time the node itself observed (Store.observed_time)
    revoked_at: int | None = None  # when the domain revoked a key of our delegation, if it did


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (ValueError, TypeError) as exc:
        raise Malformed(f"JWT {what} is not base64url") from exc
    if _b64(data) != text:
        raise Malformed(f"JWT {what} is not canonical unpadded base64url")
    return data


def _jwk(kid: str, key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    members = jwk_of(key)
    assert members is not None  # a P-256 key always has one
    return {**members, "kid": kid, "use": JWT_USE}


def _partner_terms(
    store: Store, home: str, domain: str, held: Any = None
) -> tuple[Staleness | None, dict[str, int], tuple[str, ...]]:
    """A partner's budget under our agreement (None while the agreement gate is closed), the expiries that
    end it (the agreement's, our epoch's), and the prefixes our side accepts (docs/architecture.md "Agreements").
    ``held``: the agreement held with ``domain``, if the caller has read it already."""
    held = held if held is not None else store.agreement(domain)
    if held is None:
        return None, {}, ()
    a = held.payload
    f = store.current(home, "freshness")
    epoch = f.payload if f is not None and isinstance(f.payload, Freshness) else None
    named = epoch is not None and epoch.agreements.get(domain) == a.version and a.status == "active"
    ends = {"agreement": a.expires, **({"epoch": epoch.expires} if epoch is not None else {})}
    b = agreements.budget(a, home, _limits(store, home))
    return (Staleness(b, b, b, 1) if named else None), ends, a.terms[home].accept


def _limits(store: Store, home: str) -> PartnerLimits | None:
    """Our own policy's limits on every partner (``[federation]``), if a policy is held."""
    p = store.current(home, "policy")
    return p.payload.federation if p is not None and isinstance(p.payload, Policy) else None


def _held_spiffe_bundle(store: Store, domain: str) -> HeldSpiffeBundle | None:
    """The SPIFFE bundle held for a partner, or None; one that no longer reads is left out like an
    unreadable key, never fatal to issuance."""
    try:
        return store.spiffe_bundle(domain)
    except StoreCorrupt:
        return None


def _domain_state(store: Store, domain: str, home: str | None = None) -> _DomainState:
    b = store.current(domain, "bundle")
    p = store.current(domain, "policy")
    f = store.current(domain, "freshness")
    bundle = b.payload if b is not None and isinstance(b.payload, Bundle) else None
    policy = p.payload if p is not None and isinstance(p.payload, Policy) else None
    fresh = f.payload if f is not None and isinstance(f.payload, Freshness) else None
    fresh_at = fresh.issued_at if fresh else None
    budget, expires, accept = policy.staleness if policy else None, store.held_expiries(domain), None
    agreement = store.agreement(domain) if home is not None and domain != home else None
    if agreement is not None:
        assert home is not None
        budget, ends, accept = _partner_terms(store, home, domain, agreement)
        expires = {**expires, **ends}
    # What is served: the signed bundle; else, for a partner under an agreement, its SPIFFE bundle
    # (docs/architecture.md "SPIFFE-format partner bundles"), whose freshness time stands for the
    # partner's freshness under our budget, served only while our side's terms allow SPIFFE bundles.
    x509_authorities: tuple[bytes, ...] = ()
    jwt_authorities: list[tuple[Any, Any]] = []
    sequence: int | None = None
    refresh_hint: int | None = None
    assurance: str | None = None
    refusal: str | None = None
    spiffe_mark = ""
    if bundle is not None:
        assurance = SIGNED
        x509_authorities = bundle.x509_authorities
        jwt_authorities = [(item["kid"], item["spki"]) for item in bundle.jwt_authorities]
        sequence, refresh_hint = bundle.version, bundle.refresh_hint
    elif agreement is not None and (held := _held_spiffe_bundle(store, domain)) is not None:
        assert home is not None
        fresh_at = held.fresh_at  # its import, or its last confirmation by an authenticated fetch
        limits = _limits(store, home)
        if limits is not None and not limits.spiffe_bundles:
            refusal = f"the policy of {home} takes partner trust only as signed documents, not SPIFFE bundles"
        elif agreement.payload.terms[home].allow_spiffe_bundles:
            sb = held.bundle
            assurance = SPIFFE_BUNDLE
            x509_authorities = sb.x509_authorities
            jwt_authorities = [(a.kid, a.spki) for a in sb.jwt_authorities]
            sequence, refresh_hint = held.sequence, sb.refresh_hint
            spiffe_mark = f"{held.sequence}/{held.digest.hex()}/{fresh_at}"
        else:
            refusal = f"the agreement with {domain} takes its trust only as signed documents, not SPIFFE bundles"
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    jwks: list[dict[str, str]] = []
    rv = store.current(domain, "revocation")
    revoked = rv.payload.index() if rv is not None and isinstance(rv.payload, Revocation) else {}
    for kid, spki in jwt_authorities:
        if hashlib.sha256(bytes(spki)).digest() in revoked:  # a revoked node's key: neither served nor trusted
            continue
        try:
            pub = load_der_public_key(spki)
        except (ValueError, TypeError, UnsupportedAlgorithm):  # a partner's unreadable key is left out
            continue
        # JWT-SVIDs are ES256 here; other key types have no SPIFFE JWK form yet.
        if isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(pub.curve, ec.SECP256R1):
            keys[kid] = pub
            jwks.append(_jwk(kid, pub))
    doc: dict[str, Any] = {"keys": jwks}
    if assurance is not None:
        if refresh_hint is not None or assurance == SIGNED:
            doc["spiffe_refresh_hint"] = refresh_hint
        doc["spiffe_sequence"] = sequence
    return _DomainState(
        bundle,
        fresh_at,
        budget,
        keys,
        json.dumps(doc, separators=(",", ":"), sort_keys=True).encode(),
        expires,
        accept,
        _readable_authorities(x509_authorities),
        assurance,
        refusal,
        spiffe_mark,
    )


def _registrations(policy: Policy | None) -> tuple[tuple[_Registration, ...], dict[str, int | None]]:
    if policy is None:
        return (), {}
    regs: list[_Registration] = []
    ttls: dict[str, int | None] = {}
    bad: set[str] = set()
    for reg in policy.registrations:
        ttl = reg.get("ttl")
        try:
            domain, _ = parse_spiffe_id(reg.get("spiffe_id"))
        except Malformed:
            continue
        sid = str(reg["spiffe_id"])
        if domain != policy.domain or (ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool))):
            continue
        if ttl is not None and ttl <= 0:
            bad.add(sid)  # an unusable TTL poisons the ID: never issue it with a longer one
            continue
        regs.append(_Registration(frozenset(reg["selectors"]), sid))
        if ttl is not None:
            held = ttls.get(sid)
            ttls[sid] = ttl if held is None else min(held, ttl)
        else:
            ttls.setdefault(sid, None)
    return tuple(r for r in regs if r.spiffe_id not in bad), ttls


def _index(regs: tuple[_Registration, ...]) -> dict[str, tuple[int, ...]]:
    """Registration positions by their smallest selector ("" for none): a caller is matched against
    the registrations filed under one of its own selectors only, not against the whole policy."""
    out: dict[str, list[int]] = {}
    for i, reg in enumerate(regs):
        out.setdefault(min(reg.selectors, default=""), []).append(i)
    return {k: tuple(v) for k, v in out.items()}


def _load_snapshot(store: Store) -> _Snapshot:
    info = store.node_info()
    home = str(info["home_domain"])
    gen = hashlib.sha256()
    home_gen = hashlib.sha256()
    domains: dict[str, _DomainState] = {}
    for d in store.domains():
        name = d["domain"]
        for t, m in sorted(store.marks(name).items()):
            if t == "freshness":
                continue
            gen.update(f"{name}/{t}/{m.version}/".encode() + m.digest)
            if name == home:
                home_gen.update(f"{t}/{m.version}/".encode() + m.digest)
        state = domains[name] = _domain_state(store, name, home)
        if name != home:  # what a partner's bundle is served from, and a SPIFFE bundle's freshness time
            gen.update(f"{name}/served/{state.assurance}/{state.refusal is not None}/{state.spiffe_mark}/".encode())
    p = store.current(home, "policy")
    policy = p.payload if p is not None and isinstance(p.payload, Policy) else None
    dl = store.current(home, "delegation")
    delegation = dl.payload if dl is not None and isinstance(dl.payload, Delegation) else None
    regs, ttls = _registrations(policy)
    home_bundle = domains[home].bundle if home in domains else None
    rv = store.current(home, "revocation")
    revoked = rv.payload.index() if rv is not None and isinstance(rv.payload, Revocation) else {}
    own = [key for _, key in revocable_keys(delegation)] if delegation is not None and revoked else []
    return _Snapshot(
        home=home,
        tolerance=int(info["clock_tolerance"]),
        high_water=store.clock_high_water(),
        observed=store.observed_time(),
        generation=gen.digest(),
        home_generation=home_gen.digest(),
        domains=domains,
        policy=policy,
        registrations=regs,
        by_selector=_index(regs),
        reg_ttl=ttls,
        reg_alg={sid: algorithm_for(sid, policy.algorithms) for sid in ttls} if policy is not None else {},
        home_bundle=b"".join(home_bundle.x509_authorities) if home_bundle is not None else b"",
        delegation=delegation,
        cas=node_cas(delegation) if delegation is not None else {},
        delegation_end=delegation_end(delegation),
        revoked_at=min((revoked[k] for k in own if k in revoked), default=None),
    )


_FINGERPRINT = (
    "SELECT (SELECT home_domain || ' ' || clock_tolerance FROM node), (SELECT high_water FROM clock), "
    "(SELECT group_concat(domain || ' ' || relation, ' ') FROM domains), "
    "(SELECT group_concat(domain || ' ' || type || ' ' || version || ' ' || hex(digest), ' ') FROM high_water), "
    "(SELECT group_concat(partner || ' ' || version, ' ') FROM agreements), "
    # Partners' SPIFFE bundles (store migration 9): the newest per domain (the one served), its import time
    # and, where the store has one (an authenticated fetch confirming it), its confirmation time.
    "(SELECT group_concat(domain || ' ' || sequence || ' ' || imported_at{confirmed}, ' ') FROM "
    "(SELECT domain, max(sequence) AS sequence, imported_at{confirmed_column} FROM spiffe_bundles GROUP BY domain)), "
    # Last, and not part of the comparison: the observed time moves with every audited event.
    "(SELECT high_water FROM observed)"
)


def _fingerprint_query(conn: sqlite3.Connection) -> str:
    """:data:`_FINGERPRINT` for this store: with ``spiffe_bundles.confirmed_at`` when the store has it."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(spiffe_bundles)")}
    if "confirmed_at" in columns:
        return _FINGERPRINT.format(confirmed=" || ' ' || ifnull(confirmed_at, '')", confirmed_column=", confirmed_at")
    return _FINGERPRINT.format(confirmed="", confirmed_column="")


def _trust_fingerprint(conn: sqlite3.Connection, query: str | None = None) -> tuple[Any, ...]:
    """The rows a snapshot is made of, in one statement (documents are immutable per version and digest).

    Equal rows give an equal fingerprint; rows read in another order only cost a needless re-read."""
    return tuple(conn.execute(query if query is not None else _fingerprint_query(conn)).fetchone())


def _open_store(home: Path) -> Store:
    """The node store on a connection the Workload API's worker threads may share.

    :meth:`Store.open` checks the home and migrates; the connection is then
    reopened with ``check_same_thread=False`` and the store's own pragmas
    (every use is serialised by ``Issuer._lock``).
    """
    checked = Store.open(home)
    path = checked.path
    checked.close()
    conn = sqlite3.connect(path, isolation_level=None, timeout=2.0, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return Store(conn, path)


@dataclass
class _Cached:
    value: Any  # X509Svid | JwtSvid
    rotate_at: int
    flagged: bool = False  # past half-life and already counted in the change token


def _jwt_size(key: tuple[str, tuple[str, ...]], entry: _Cached) -> int:
    """What a cached JWT-SVID holds, in bytes: its token, its SPIFFE ID and audiences (twice: key and value)."""
    sid, audience = key
    return len(entry.value.token) + 2 * (len(sid) + sum(len(a) for a in audience)) + 64


class _JwtCache(dict[tuple[str, tuple[str, ...]], _Cached]):
    """The JWT-SVID cache, which keeps count of the bytes it holds (:attr:`size`); oldest first."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def __setitem__(self, key: tuple[str, tuple[str, ...]], value: _Cached) -> None:
        old = self.get(key)
        if old is not None:
            self.size -= _jwt_size(key, old)
        super().__setitem__(key, value)
        self.size += _jwt_size(key, value)

    def __delitem__(self, key: tuple[str, tuple[str, ...]]) -> None:
        self.size -= _jwt_size(key, self[key])
        super().__delitem__(key)

    def clear(self) -> None:
        super().clear()
        self.size = 0

    def trim(self, entries: int, size: int) -> None:
        """Drop the oldest entries until at most ``entries`` of at most ``size`` bytes are left."""
        while self and (len(self) > entries or self.size > size):
            del self[next(iter(self))]


@dataclass
class _Minted:
    key: Any
    value: Any
    rotate_at: int
    entry: AuditEntry


@dataclass(frozen=True)
class _Plan:
    """What one SVID will be, decided under the issuer's lock; signed outside it."""

    key: Any  # the cache key: SPIFFE ID, or (SPIFFE ID, audience) for a JWT-SVID
    spiffe_id: str
    ttl: int
    signer: Any  # CaPrivateKey for an X.509-SVID, the JWT key for a JWT-SVID
    alg_name: str
    ca: NodeCa | None = None
    audience: tuple[str, ...] = ()


class _InFlight:
    """An SVID one caller is minting; other callers asking for the same one wait for it."""

    __slots__ = ("_done", "_error", "_value")

    def __init__(self) -> None:
        # Held until resolved; each waiter takes it and passes it on (cheaper than an Event: most
        # SVIDs in flight are never waited for).
        self._done = threading.Lock()
        self._done.acquire()
        self._value: Any = None
        self._error: BaseException | None = None

    def resolve(self, value: Any) -> None:
        self._value = value
        self._done.release()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.release()

    def wait(self) -> Any:
        with self._done:
            pass
        if self._error is not None:
            raise copy_error(self._error)
        return self._value


@dataclass(frozen=True)
class _Claimed:
    """What :meth:`Issuer._claim_planned` decided for one call."""

    snap: _Snapshot
    mode: staleness.Mode
    now: int
    keys: list[Any]  # the caller's cache keys, in answer order
    hits: dict[Any, Any]
    plans: list[_Plan]
    theirs: dict[Any, _InFlight]
    generation: Any


@dataclass
class _Mode:
    """The home domain's mode and every domain's, at one instant."""

    clock_ok: bool
    home: staleness.Mode
    domains: dict[str, staleness.Mode] = field(default_factory=dict)


class Issuer:
    """SVID issuance for one node home (see the module docstring for the rules)."""

    poll_seconds = POLL_SECONDS
    jwt_cache_bytes = MAX_JWT_CACHE_BYTES

    def __init__(self, home: Path, get_passphrase: Callable[[], bytes], *, now: Callable[[], int] = clock.now) -> None:
        self.home = Path(home)
        self._get_passphrase = get_passphrase
        self._now = now
        self._lock = threading.RLock()
        self._store = _open_store(self.home)  # reads, under self._lock
        # The audit log's own connection: commits grouped across callers, outside self._lock.
        self._audit = GroupCommit(_open_store(self.home))
        # Issuance checkpoints are signed with the identity this issuer unlocks anyway (the passphrase
        # may have been typed at a prompt, so the store could not open the key by itself).
        self._audit.store.signer_source = lambda: self._ident().signer
        self._data_version: int | None = None
        self._fingerprint_sql = _fingerprint_query(self._store.conn)  # the store is migrated: its columns are set
        self._fingerprint: tuple[Any, ...] | None = None
        self._snap: _Snapshot | None = None
        self._identity: NodeIdentity | None = None
        self._ca_keys: dict[int, tuple[CaPrivateKey, bytes]] = {}  # alg -> (key, its SPKI DER)
        self._jwt_key: tuple[ec.EllipticCurvePrivateKey, bytes] | None = None
        self._cache_key: tuple[bytes, str] | None = None
        self._x509: dict[str, _Cached] = {}
        self._jwt = _JwtCache()
        self._x509_flight: dict[str, _InFlight] = {}
        self._jwt_flight: dict[tuple[str, tuple[str, ...]], _InFlight] = {}
        self._rotations = 0
        # Callers planning or minting at once; the rest wait here, asleep, rather than contend for the
        # interpreter and the lock (measured: bench/issuance.py).  Waiting for a commit takes no slot.
        self._slots = threading.BoundedSemaphore(MINT_SLOTS)

    def close(self) -> None:
        with self._lock:
            self._store.close()
            self._audit.store.close()

    @property
    def audit_commits(self) -> tuple[int, int]:
        """(audit transactions committed, issuing calls they held): their ratio is the group size."""
        return self._audit.commits, self._audit.appended

    def __enter__(self) -> Issuer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- state ---------------------------------------------------------------------------

    def _snapshot(self) -> _Snapshot:
        """The trust snapshot, re-read when another connection has changed the trust state since.

        ``PRAGMA data_version`` moves on any other connection's commit, this
        issuer's own audit commits included; so when it moves, the rows the
        snapshot is made of (node, domains, clock mark, high-water marks) are
        compared, and the snapshot is re-read only if they changed.
        """
        snap = self._current_snapshot(reload=True)
        assert snap is not None
        return snap

    def _current_snapshot(self, *, reload: bool) -> _Snapshot | None:
        """:meth:`_snapshot`; without ``reload``, None instead of re-reading a snapshot whose rows changed
        (checking the rows is one read, which a writer holding the store's lock never blocks: WAL)."""
        version = int(self._store.conn.execute("PRAGMA data_version").fetchone()[0])
        if self._snap is not None and version == self._data_version:
            return self._snap
        *fingerprint, observed = _trust_fingerprint(self._store.conn, self._fingerprint_sql)
        if self._snap is None or tuple(fingerprint) != self._fingerprint:
            if not reload:
                return None
            self._snap = _load_snapshot(self._store)
            self._fingerprint = tuple(fingerprint)
        elif observed != self._snap.observed:
            self._snap = dataclasses.replace(self._snap, observed=int(observed or 0))
        self._data_version = version
        return self._snap

    @staticmethod
    def _modes(snap: _Snapshot, now: int) -> _Mode:
        try:
            trust.check_clock(now, snap.high_water, snap.tolerance)
            trust.check_observed(now, snap.observed, snap.tolerance)
            clock_ok = True
        except ClockRollback:
            clock_ok = False
        modes = {
            name: staleness.mode(now, d.fresh_issued_at, d.budget, clock_ok=clock_ok, expires=d.expires)
            for name, d in snap.domains.items()
        }
        home = modes.get(snap.home) or staleness.mode(now, None, None)
        return _Mode(clock_ok, home, modes)

    def _issuing(self, snap: _Snapshot, now: int) -> staleness.Mode:
        """The home mode, or the reason nothing may be issued now."""
        trust.check_clock(now, snap.high_water, snap.tolerance)
        trust.check_observed(now, snap.observed, snap.tolerance)
        d = snap.delegation
        if d is None:
            raise Stale(
                "node not attested: no delegation held "
                "(attest with 'node attest request' and import the delegation pack)"
            )
        end = snap.delegation_end
        assert end is not None
        if now >= end:
            raise Stale(f"node not attested: delegation v{d.version} expired at {end}; attest again")
        if snap.revoked_at is not None and now >= snap.revoked_at:
            raise Revoked(
                f"this node's delegation v{d.version} was revoked by {snap.home} at {snap.revoked_at}: "
                "nothing is issued with its keys"
            )
        mode = self._modes(snap, now).home
        if mode.mode == staleness.EXPIRED:
            dom = snap.domains.get(snap.home)
            if dom is None or dom.fresh_issued_at is None or dom.budget is None:
                raise Stale(f"{snap.home}: no freshness and policy held; import a pack from the authority")
            if mode.expired:
                gone = ", ".join(f"{t} (expired at {dom.expires[t]})" for t in mode.expired)
                raise Stale(f"{snap.home}: the held {gone}; no new SVIDs until newer ones are imported")
            raise Stale(
                f"{snap.home}: trust is stale ({mode.staleness} s since freshness issued at {dom.fresh_issued_at}, "
                f"hard budget {dom.budget.hard} s); no new SVIDs until a fresh pack is imported"
            )
        if self._cache_key != (snap.home_generation, mode.mode):
            self._cache_key = (snap.home_generation, mode.mode)
            self._x509.clear()
            self._jwt.clear()
            self._x509_flight.clear()  # SVIDs being minted under the old state fill no new caller's request
            self._jwt_flight.clear()
        return mode

    def _match(self, snap: _Snapshot, selectors: Iterable[str]) -> list[str]:
        have = frozenset(selectors)
        # A registration matches when all its selectors are the caller's, so its smallest one is too.
        candidates = sorted(i for sel in (*have, "") for i in snap.by_selector.get(sel, ()))
        out: dict[str, None] = {}
        for i in candidates:  # in policy order
            reg = snap.registrations[i]
            if reg.selectors <= have:
                out[reg.spiffe_id] = None
        if not out:
            raise PolicyDenied("no identity: no registration matches the caller's selectors")
        return list(out)

    def _ttl(self, snap: _Snapshot, mode: staleness.Mode, spiffe_id: str, now: int, cap: int | None) -> int:
        assert snap.policy is not None
        assert snap.delegation is not None
        reg = snap.reg_ttl.get(spiffe_id)
        end = snap.delegation_end
        ttl = min(reg if reg is not None else snap.policy.staleness.svid_ttl, staleness.issuable_ttl(mode, end, now))
        if cap is not None:
            ttl = min(ttl, cap)
        if ttl <= 0:
            raise Stale(f"no lifetime left to issue {spiffe_id} (mode {mode.mode}, delegation ends at {end})")
        return ttl

    # --- keys ------------------------------------------------------------------------------

    def _ident(self) -> NodeIdentity:
        if self._identity is None:
            self._identity = NodeIdentity(Keystore.open(self.home, self._get_passphrase))
        return self._identity

    def _ca_key(self, ca: NodeCa) -> CaPrivateKey:
        held = self._ca_keys.get(ca.alg)
        if held is None:
            try:
                obj = private_key_object(self._ident().ca_key(ca.alg))
            except MissingFile as exc:
                raise Stale(f"node not attested: this node has no {suites.name_of(ca.alg)} CA key") from exc
            spki = obj.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            held = self._ca_keys[ca.alg] = (obj, spki)
        if held[1] != ca.spki:
            raise Stale(
                f"node not attested: the delegation certifies another {suites.name_of(ca.alg)} CA key than it holds"
            )
        return held[0]

    def _jwt_signer(self, snap: _Snapshot) -> ec.EllipticCurvePrivateKey:
        assert snap.delegation is not None
        if self._jwt_key is None:
            try:
                obj = private_key_object(self._ident().jwt_key())
            except MissingFile as exc:
                raise Stale("node not attested: this node has no JWT-SVID key") from exc
            assert isinstance(obj, ec.EllipticCurvePrivateKey)
            self._jwt_key = (obj, obj.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
        if self._jwt_key[1] != snap.delegation.jwt_key.get("spki"):
            raise Stale("node not attested: the delegation certifies another JWT-SVID key than this node holds")
        return self._jwt_key[0]

    # --- minting ----------------------------------------------------------------------------

    def _plan_x509(self, snap: _Snapshot, mode: staleness.Mode, spiffe_id: str, now: int) -> _Plan:
        assert snap.policy is not None
        alg_name = snap.reg_alg[spiffe_id]
        alg = ALGORITHMS.get(alg_name)
        ca = snap.cas.get(alg) if alg is not None else None
        if ca is None:
            held = ", ".join(suites.name_of(a) for a in snap.cas) or "none"
            raise PolicyDenied(
                f"policy names {alg_name!r} for {spiffe_id}, but this node's delegation holds CAs for {held}"
            )
        ttl = self._ttl(snap, mode, spiffe_id, now, ca.not_after - now)
        return _Plan(spiffe_id, spiffe_id, ttl, self._ca_key(ca), alg_name, ca=ca)

    @staticmethod
    def _mint_x509(snap: _Snapshot, mode: staleness.Mode, plan: _Plan, now: int) -> _Minted:
        ca = plan.ca
        assert ca is not None
        spiffe_id, ttl = plan.spiffe_id, plan.ttl
        key: ec.EllipticCurvePrivateKey | mldsa.MLDSA65PrivateKey
        key = ec.generate_private_key(ec.SECP256R1()) if ca.alg == ES256 else mldsa.MLDSA65PrivateKey.generate()
        pub = key.public_key()
        not_after = now + ttl
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_EMPTY_NAME)
            .issuer_name(ca.cert.subject)
            .public_key(pub)
            .serial_number(serial)
            .not_valid_before(dt.datetime.fromtimestamp(max(now - BACKDATE, ca.not_before), dt.UTC))
            .not_valid_after(dt.datetime.fromtimestamp(not_after, dt.UTC))
            .add_extension(_BASIC, critical=True)
            .add_extension(_KEY_USAGE, critical=True)
            .add_extension(_EKU, critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .add_extension(ca.aki, critical=False)
            .sign(plan.signer, _SHA256 if ca.alg == ES256 else None)
        )
        der = cert.public_bytes(Encoding.DER)
        svid = X509Svid(
            spiffe_id=spiffe_id,
            cert_chain=[der, ca.der],
            private_key=key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption()),
            bundle=snap.home_bundle,
            not_after=not_after,
        )
        detail = (
            f"{X509_SVID} {spiffe_id} serial {serial:x} not_after {not_after} alg {plan.alg_name} "
            f"mode {mode.mode} ttl {ttl}"
        )
        entry = AuditEntry("issue", detail, None, snap.home, X509_SVID, None, hashlib.sha256(der).digest())
        return _Minted(spiffe_id, svid, now + max(MIN_ROTATION, ttl // 2), entry)

    def _plan_jwt(
        self, snap: _Snapshot, mode: staleness.Mode, spiffe_id: str, audience: tuple[str, ...], now: int
    ) -> _Plan:
        assert snap.delegation is not None
        ttl = self._ttl(snap, mode, spiffe_id, now, JWT_MAX_TTL)
        return _Plan((spiffe_id, audience), spiffe_id, ttl, self._jwt_signer(snap), "ES256", audience=audience)

    @staticmethod
    def _mint_jwt(snap: _Snapshot, mode: staleness.Mode, plan: _Plan, now: int) -> _Minted:
        assert snap.delegation is not None
        spiffe_id, ttl, audience = plan.spiffe_id, plan.ttl, plan.audience
        kid = str(snap.delegation.jwt_key["kid"])
        header = {"alg": "ES256", "kid": kid, "typ": "JWT"}
        claims = {"sub": spiffe_id, "aud": list(audience), "exp": now + ttl, "iat": now}
        signing_input = (
            _b64(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64(json.dumps(claims, separators=(",", ":")).encode())
        )
        r, s = decode_dss_signature(plan.signer.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256())))
        token = signing_input + "." + _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        svid = JwtSvid(spiffe_id=spiffe_id, token=token, expires=now + ttl)
        detail = (
            f"{JWT_SVID} {spiffe_id} aud sha256:{audience_digest(audience)} kid {kid} not_after {now + ttl} "
            f"alg ES256 mode {mode.mode} ttl {ttl}"
        )
        entry = AuditEntry("issue", detail, None, snap.home, JWT_SVID, None, hashlib.sha256(token.encode()).digest())
        return _Minted(plan.key, svid, now + max(MIN_ROTATION, ttl // 2), entry)

    def _claim(
        self, keys: list[Any], cache: dict[Any, _Cached], flights: dict[Any, _InFlight], now: int
    ) -> tuple[dict[Any, Any], list[Any], dict[Any, _InFlight]]:
        """Split ``keys`` into cache hits, SVIDs this caller must mint, and SVIDs another caller is minting."""
        hits: dict[Any, Any] = {}
        mine: list[Any] = []
        theirs: dict[Any, _InFlight] = {}
        for key in keys:
            hit = cache.get(key)
            if hit is not None and now < hit.rotate_at:
                hits[key] = hit.value
            elif key in flights:
                theirs[key] = flights[key]
            else:
                mine.append(key)
        return hits, mine, theirs

    def _claim_planned(
        self,
        selectors: frozenset[str],
        keys_of: Callable[[list[str]], list[Any]],
        cache: dict[Any, _Cached],
        flights: dict[Any, _InFlight],
        plan: Callable[[_Snapshot, staleness.Mode, Any, int], _Plan],
    ) -> _Claimed:
        """Take a minting slot, then under the lock: the state, the caller's keys (``keys_of`` the matched
        SPIFFE IDs), their cache hits, and a plan and an :class:`_InFlight` for each this caller must mint.

        The slot is released on any refusal (planning may refuse before anything is claimed); otherwise
        :meth:`_issue` releases it once the SVIDs are minted."""
        self._slots.acquire()
        try:
            with self._lock:
                now = self._now()
                snap = self._snapshot()
                mode = self._issuing(snap, now)
                keys = keys_of(self._match(snap, selectors))
                hits, mine, theirs = self._claim(keys, cache, flights, now)
                plans = [plan(snap, mode, key, now) for key in mine]  # may refuse: nothing claimed yet
                for p in plans:
                    flights[p.key] = _InFlight()
                return _Claimed(snap, mode, now, keys, hits, plans, theirs, self._cache_key)
        except BaseException:
            self._slots.release()
            raise

    def _issue(
        self, c: _Claimed, cache: dict[Any, _Cached], flights: dict[Any, _InFlight], *, streamed: bool
    ) -> dict[Any, Any]:
        """Mint the planned SVIDs (outside the lock), audit them durably, then cache and return them.

        The caller holds one of ``self._slots``; it is released once the SVIDs
        are minted, before the wait for the audit commit.  The caller has
        registered an :class:`_InFlight` per plan in ``flights`` (under the
        lock).  Nothing minted is cached or returned unless the commit holding
        its audit entries succeeded; callers waiting on these SVIDs get the
        same error.
        """
        snap, mode, now, plans, generation = c.snap, c.mode, c.now, c.plans, c.generation
        mine = [flights[p.key] for p in plans]
        try:
            try:
                minted = [(self._mint_x509 if p.ca is not None else self._mint_jwt)(snap, mode, p, now) for p in plans]
            finally:
                self._slots.release()  # taken by the caller: the wait for the commit holds no slot
            if minted:
                self._audit.append(now, [m.entry for m in minted])
        except BaseException as exc:
            with self._lock:
                for p, f in zip(plans, mine, strict=True):
                    if flights.get(p.key) is f:
                        del flights[p.key]
            for f in mine:
                f.fail(exc)
            raise
        with self._lock:
            for m, f in zip(minted, mine, strict=True):
                if flights.get(m.key) is f:
                    del flights[m.key]
                if self._cache_key == generation:  # else the state changed meanwhile: cache nothing stale
                    old = cache.get(m.key)
                    if streamed and old is not None and not old.flagged:
                        self._rotations += 1  # another stream may hold the old one: make it re-fetch
                    cache[m.key] = _Cached(m.value, m.rotate_at)
        for m, f in zip(minted, mine, strict=True):
            f.resolve(m.value)
        return {m.key: m.value for m in minted}

    # --- the interface the Workload API uses -------------------------------------------------

    def x509_svids(self, selectors: frozenset[str]) -> list[X509Svid]:
        """Every X.509-SVID registered for ``selectors`` (cached until half-life)."""
        c = self._claim_planned(selectors, list, self._x509, self._x509_flight, self._plan_x509)
        out = c.hits
        out.update(self._issue(c, self._x509, self._x509_flight, streamed=True))
        for sid, flight in c.theirs.items():
            out[sid] = flight.wait()
        return [out[sid] for sid in c.keys]

    def cached_x509(self, selectors: frozenset[str]) -> tuple[list[X509Svid], dict[str, bytes]] | None:
        """``(x509_svids(selectors), x509_bundles())`` when that needs no minting and no store read beyond
        ``PRAGMA data_version``, else None; it waits at most :data:`CACHED_LOCK_WAIT` for the lock (held
        for microseconds but while a snapshot is re-read or a key loaded), so the Workload API may answer
        a fetch served from the cache on its event loop, without a thread hop.  Waiting a little rather
        than not at all lets a holder the interpreter had paused finish, instead of sending every fetch
        meanwhile to the threads.  Refusals are the same typed errors as :meth:`x509_svids` raises."""
        if not self._lock.acquire(timeout=CACHED_LOCK_WAIT):
            return None
        try:
            snap = self._current_snapshot(reload=False)
            if snap is None:
                return None  # the state changed: the blocking path re-reads it
            now = self._now()
            self._issuing(snap, now)
            out: list[X509Svid] = []
            for sid in self._match(snap, selectors):
                hit = self._x509.get(sid)
                if hit is None or now >= hit.rotate_at:
                    return None
                out.append(hit.value)
            return out, self._x509_bundles(snap, now)
        finally:
            self._lock.release()

    def x509_bundles(self) -> dict[str, bytes]:
        """Trust domain -> concatenated DER of its X.509 authorities (home always, partners while fresh)."""
        with self._lock:
            return self._x509_bundles(self._snapshot(), self._now())

    def _x509_bundles(self, snap: _Snapshot, now: int) -> dict[str, bytes]:
        usable = self._usable_domains(snap, now)
        return {
            name: d.x509_der
            for name, d in snap.domains.items()
            if d.assurance is not None and name in usable and d.x509_der
        }

    def jwt_svids(self, selectors: frozenset[str], audience: list[str], spiffe_id: str | None) -> list[JwtSvid]:
        """A JWT-SVID for ``audience`` per registered SPIFFE ID (or only ``spiffe_id``)."""
        aud = _audience(audience)
        c = self._claim_planned(
            selectors,
            lambda ids: [(sid, aud) for sid in _only(ids, spiffe_id)],
            self._jwt,
            self._jwt_flight,
            lambda snap, mode, key, now: self._plan_jwt(snap, mode, key[0], key[1], now),
        )
        out = c.hits
        out.update(self._issue(c, self._jwt, self._jwt_flight, streamed=False))
        with self._lock:
            self._jwt.trim(MAX_JWT_CACHE, self.jwt_cache_bytes)
        for key, flight in c.theirs.items():
            out[key] = flight.wait()
        return [out[key] for key in c.keys]

    def cached_jwt(self, selectors: frozenset[str], audience: list[str], spiffe_id: str | None) -> list[JwtSvid] | None:
        """``jwt_svids(...)`` when every SVID it would give is cached, else None; like :meth:`cached_x509` it
        never mints, writes or waits more than :data:`CACHED_LOCK_WAIT` for the lock, so the Workload API
        answers a JWT-SVID cache hit on its event loop, even while the store is locked by a writer."""
        aud = _audience(audience)
        if not self._lock.acquire(timeout=CACHED_LOCK_WAIT):
            return None
        try:
            snap = self._current_snapshot(reload=False)
            if snap is None:
                return None
            now = self._now()
            self._issuing(snap, now)
            out: list[JwtSvid] = []
            for sid in _only(self._match(snap, selectors), spiffe_id):
                hit = self._jwt.get((sid, aud))
                if hit is None or now >= hit.rotate_at:
                    return None
                out.append(hit.value)
            return out
        finally:
            self._lock.release()

    def jwt_bundles(self) -> dict[str, bytes]:
        """Trust domain -> JWKS (RFC 7517, SPIFFE bundle format) of its JWT authorities."""
        with self._lock:
            snap = self._snapshot()
            usable = self._usable_domains(snap, self._now())
            return {name: d.jwks for name, d in snap.domains.items() if d.assurance is not None and name in usable}

    def validate_jwt(self, token: str, audience: str) -> tuple[str, dict[str, Any]]:
        """``(SPIFFE ID, claims)`` of a valid JWT-SVID for ``audience``, or a typed rejection."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN:
            raise Malformed("a JWT-SVID must be a text of at most 16 KiB")
        parts = token.split(".")
        if len(parts) != 3:
            raise Malformed("a JWT-SVID has three dot-separated parts")
        header = _json_object(_unb64(parts[0], "header"), "header")
        claims = _json_object(_unb64(parts[1], "claims"), "claims")
        signature = _unb64(parts[2], "signature")
        if "crit" in header:  # RFC 7515 §4.1.11: extensions that must be understood; we understand none
            raise Malformed(f"JWT-SVID header lists critical extensions {header['crit']!r}: none is understood")
        if header.get("alg") != "ES256":
            raise BadSignature(f"JWT-SVID algorithm {header.get('alg')!r} is not accepted (ES256 only)")
        if header.get("typ", "JWT") not in ("JWT", "JOSE"):
            raise Malformed("JWT-SVID typ must be JWT or JOSE")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Malformed("JWT-SVID header has no kid")
        sub = claims.get("sub")
        domain, _ = parse_spiffe_id(sub)
        assert isinstance(sub, str)
        with self._lock:
            now = self._now()
            snap = self._snapshot()
            trust.check_clock(now, snap.high_water, snap.tolerance)
            trust.check_observed(now, snap.observed, snap.tolerance)
            state = snap.domains.get(domain)
            if state is None or (state.assurance is None and state.refusal is None):
                raise UnknownDomain(f"this node holds no bundle for {domain}")
            if state.accept is not None and state.budget is None:
                raise NoAgreement(f"no live agreement with {domain} (expired, revoked or not named by our epoch)")
            if state.accept is not None and not in_scope(sub, state.accept):
                raise ScopeViolation(f"{sub} is outside what {snap.home} accepts from {domain}")
            if domain not in self._usable_domains(snap, now):
                raise Stale(f"the bundle of {domain} is older than its staleness budget")
            if state.refusal is not None:  # checked last, as svid verify does (Node.check_partner_identity)
                raise ScopeViolation(state.refusal)
            key = state.jwt_keys.get(kid)
        if key is None:
            raise BadSignature(f"no JWT authority {kid!r} in the bundle of {domain}")
        if len(signature) != 64:
            raise BadSignature("an ES256 signature is 64 bytes")
        der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
        try:
            key.verify(der, f"{parts[0]}.{parts[1]}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise BadSignature(f"JWT-SVID signature does not verify under {kid!r}") from None
        exp = claims.get("exp")
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise Malformed("JWT-SVID has no integer exp claim")
        if now >= exp:
            raise Expired(f"JWT-SVID expired at {exp}")
        nbf = claims.get("nbf")
        if isinstance(nbf, int) and not isinstance(nbf, bool) and now < nbf:
            raise NotYetValid(f"JWT-SVID is not valid before {nbf}")
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud
        if not isinstance(auds, list) or not auds or not all(isinstance(a, str) for a in auds):
            raise Malformed("JWT-SVID aud must be a text or a non-empty list of texts")
        if audience not in auds:  # the audience asked about is capped by the caller; the token's are not shown
            raise PolicyDenied(f"JWT-SVID is not for audience {audience!r}")
        return sub, claims

    # --- change notification ----------------------------------------------------------------

    @staticmethod
    def _usable_domains(snap: _Snapshot, now: int) -> set[str]:
        modes = Issuer._modes(snap, now).domains
        return {n for n in snap.domains if n == snap.home or modes[n].mode != staleness.EXPIRED}

    def change_token(self) -> bytes:
        """Changes whenever a stream should re-send: a new root, bundle, policy or delegation,
        a mode change (of any domain, or the clock), or a cached X.509-SVID past half-life."""
        with self._lock:
            now = self._now()
            snap = self._snapshot()
            modes = self._modes(snap, now)
            for entry in self._x509.values():
                if not entry.flagged and now >= entry.rotate_at:
                    entry.flagged = True
                    self._rotations += 1
            h = hashlib.sha256(snap.generation)
            h.update(b"clock-ok" if modes.clock_ok else b"clock-rollback")
            for name, m in sorted(modes.domains.items()):
                h.update(f"|{name}={m.mode}".encode())
            d_end = snap.delegation_end
            h.update(f"|delegation={d_end is not None and now < d_end}|rotations={self._rotations}".encode())
            return h.digest()

    def refresh_in(self) -> float:
        """Seconds until the next scheduled change (at most :attr:`poll_seconds`, so that
        documents imported by another process are noticed)."""
        with self._lock:
            now = self._now()
            snap = self._snapshot()
            times: list[int] = [e.rotate_at for e in self._x509.values() if not e.flagged]
            for d in snap.domains.values():
                if d.fresh_issued_at is not None and d.budget is not None:
                    times += [d.fresh_issued_at + d.budget.soft, d.fresh_issued_at + d.budget.hard]
            end = snap.delegation_end
            if end is not None:
                times.append(end)
            times.append(snap.high_water - snap.tolerance)  # a clock that was behind catches up
            future = [t - now for t in times if t > now]
            return float(min([self.poll_seconds, *future]))

    def status(self) -> dict[str, Any]:
        """Mode, staleness and maximum TTL of the home domain, and the delegation."""
        with self._lock:
            now = self._now()
            snap = self._snapshot()
            modes = self._modes(snap, now)
            dom = snap.domains.get(snap.home)
            m = modes.home
            return {
                "domain": snap.home,
                "now": now,
                "clock": "ok" if modes.clock_ok else "rollback",
                "mode": m.mode,
                "staleness": m.staleness,
                "max_ttl": staleness.issuable_ttl(m, snap.delegation_end, now),
                "freshness_max_ttl": m.max_ttl,
                "freshness_issued_at": dom.fresh_issued_at if dom else None,
                "budget": {"soft": dom.budget.soft, "hard": dom.budget.hard} if dom and dom.budget else None,
                "delegation": delegation_status(snap.delegation, now),
                "registrations": len(snap.registrations),
                "cached": {"x509_svids": len(self._x509), "jwt_svids": len(self._jwt), "jwt_bytes": self._jwt.size},
                "refresh_in": self.refresh_in(),
            }


def _only(ids: list[str], spiffe_id: str | None) -> list[str]:
    """``ids``, or just ``spiffe_id`` when the caller asked for one of them."""
    if not spiffe_id:
        return ids
    if spiffe_id not in ids:
        raise PolicyDenied(f"no identity: {spiffe_id} is not registered for the caller's selectors")
    return [spiffe_id]


def audience_digest(audience: Iterable[str]) -> str:
    """SHA-256 (hex) of an audience list as compact JSON: what the audit log records instead of the list."""
    return hashlib.sha256(json.dumps(list(audience), separators=(",", ":")).encode()).hexdigest()


def _audience(audience: list[str]) -> tuple[str, ...]:
    """The audience list of a JWT-SVID request, duplicates removed; ``malformed`` unless it has 1 to
    :data:`MAX_AUDIENCES` non-empty texts of at most :data:`MAX_AUDIENCE_BYTES` bytes each."""
    if not isinstance(audience, list | tuple) or len(audience) > MAX_AUDIENCES:
        raise Malformed(f"a JWT-SVID has at most {MAX_AUDIENCES} audiences")
    aud = tuple(dict.fromkeys(audience))
    if not aud or not all(isinstance(a, str) and a for a in aud):
        raise Malformed("a JWT-SVID needs at least one non-empty audience")
    if any(len(a.encode("utf-8", "surrogatepass")) > MAX_AUDIENCE_BYTES for a in aud):
        raise Malformed(f"a JWT-SVID audience is at most {MAX_AUDIENCE_BYTES} bytes")
    return aud


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    return strict_object(data, f"JWT {what}", max_depth=MAX_JSON_DEPTH)
