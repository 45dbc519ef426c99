"""An in-memory repository simulator for the trust core (after python-tuf's RepositorySimulator).

It holds named private keys, builds root / bundle / policy / freshness payloads,
signs them with any chosen set of keys, makes tampered variants of signed
bytes, and produces the :class:`~qhx_edge.core.trust.TrustState` a node would hold,
so tests call :func:`qhx_edge.core.trust.verify_batch` directly, with no store,
no files and no clock.

Key names are free-form strings; by convention ``"<role>-<n>"`` (``root-0``,
``pki-0``...).  A :class:`KeyRing` generates a key the first time its name is
used and keeps it, so a test module that shares one ring (a module-scoped
fixture) pays for each key once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import cbor2

from qhx_edge.core import cbor, cose, documents
from qhx_edge.core.documents import ROLE_FOR_TYPE, ROLES, Bundle, Freshness, Payload, Policy, RoleKeys, Root, Signed
from qhx_edge.core.suites import ED25519, MLDSA65, PrivateKey
from qhx_edge.core.trust import DomainView, Mark, TrustState

NOW = 1_750_000_000  # a fixed reference time: every test passes ``now`` explicitly
DAY = 86_400
DOMAIN = "alpha.example"
LIFETIME = {"root": 365 * DAY, "bundle": 90 * DAY, "policy": 90 * DAY, "freshness": 1 * DAY}
STALENESS = {"soft": 6 * 3600, "hard": 72 * 3600, "svid_ttl": 3600, "ttl_floor": 300}


class KeyRing:
    """Named private keys of one suite, generated on first use and then kept."""

    def __init__(self, suite: str = "classical") -> None:
        self.suite = suite
        self._keys: dict[str, PrivateKey] = {}

    def __getitem__(self, name: str) -> PrivateKey:
        if name not in self._keys:
            self._keys[name] = PrivateKey.generate(self.suite)
        return self._keys[name]

    def keyid(self, name: str) -> str:
        return self[name].public.keyid

    def name_of(self, keyid: str) -> str | None:
        """The name of a key this ring holds, by key id."""
        return next((n for n, k in self._keys.items() if k.public.keyid == keyid), None)


class RepoSim:
    """One trust domain's authority, in memory.

    ``roles`` maps each role to its key names and ``thresholds`` to its
    threshold; both describe the *next* root payload built by :meth:`root` and
    whose keys sign by default, and tests change them to rotate keys.
    """

    def __init__(self, ring: KeyRing, domain: str = DOMAIN, now: int = NOW) -> None:
        self.ring = ring
        self.domain = domain
        self.now = now
        self.roles: dict[str, list[str]] = {role: [f"{role}-0"] for role in ROLES}
        self.thresholds: dict[str, int] = dict.fromkeys(ROLES, 1)

    @property
    def suite(self) -> str:
        return self.ring.suite

    # --- payloads -------------------------------------------------------------------

    def _common(self, type_: str, version: int, issued_at: int | None, expires: int | None) -> dict[str, Any]:
        issued = self.now - 60 if issued_at is None else issued_at
        return {
            "domain": self.domain,
            "version": version,
            "issued_at": issued,
            "expires": issued + LIFETIME[type_] if expires is None else expires,
        }

    def root(
        self,
        version: int = 1,
        *,
        roles: Mapping[str, Sequence[str]] | None = None,
        thresholds: Mapping[str, int] | None = None,
        issued_at: int | None = None,
        expires: int | None = None,
    ) -> Root:
        """A root payload naming ``roles`` (default: the simulator's current roles)."""
        role_names = {**self.roles, **(roles or {})}
        role_thresholds = {**self.thresholds, **(thresholds or {})}
        keys = {}
        specs = {}
        for role in ROLES:
            ids = [self.ring.keyid(n) for n in role_names[role]]
            keys.update({self.ring.keyid(n): self.ring[n].public for n in role_names[role]})
            specs[role] = RoleKeys(tuple(ids), role_thresholds[role])
        return Root(suite=self.suite, keys=keys, roles=specs, **self._common("root", version, issued_at, expires))

    def bundle(
        self, version: int = 1, *, issued_at: int | None = None, expires: int | None = None, tag: str = ""
    ) -> Bundle:
        """A bundle payload; a different ``tag`` gives different bytes for the same version."""
        return Bundle(
            x509_authorities=(f"fake-der:{self.domain}:{version}:{tag}".encode(),),
            jwt_authorities=({"kid": f"jwt-{version}", "spki": b"fake-spki"},),
            refresh_hint=3600,
            **self._common("bundle", version, issued_at, expires),
        )

    def policy(
        self, version: int = 1, *, issued_at: int | None = None, expires: int | None = None, tag: str = ""
    ) -> Policy:
        return Policy(
            registrations=({"spiffe_id": f"spiffe://{self.domain}/web{tag}", "selectors": ["unix:uid:1000"]},),
            authorization=(),
            algorithms={"/": "ES256"},
            staleness=documents.Staleness(**STALENESS),
            **self._common("policy", version, issued_at, expires),
        )

    def freshness(
        self,
        version: int = 1,
        *,
        root: int = 1,
        bundle: int = 1,
        policy: int = 1,
        issued_at: int | None = None,
        expires: int | None = None,
    ) -> Freshness:
        return Freshness(
            versions={"root": root, "bundle": bundle, "policy": policy},
            agreements={},
            **self._common("freshness", version, issued_at, expires),
        )

    # --- signing --------------------------------------------------------------------

    def default_signers(self, payload: Payload) -> list[str]:
        """The threshold-many first keys of the role that owns ``payload``'s type."""
        role = ROLE_FOR_TYPE[payload.type]
        if isinstance(payload, Root):
            names = [self.ring.name_of(k) for k in payload.roles[role].keyids]
            return [n for n in names if n is not None][: payload.roles[role].threshold]
        return self.roles[role][: self.thresholds[role]]

    def sign(self, payload: Payload, signers: Iterable[str] | None = None) -> bytes:
        """Sign ``payload`` with the named keys (a name listed twice signs twice)."""
        names = self.default_signers(payload) if signers is None else list(signers)
        return documents.sign(payload, [self.ring[n] for n in names])

    def initial(self, *, root_signers: Iterable[str] | None = None) -> dict[str, bytes]:
        """Version 1 of root, bundle, policy and a freshness naming them."""
        return {
            "root": self.sign(self.root(1), root_signers),
            "bundle": self.sign(self.bundle(1)),
            "policy": self.sign(self.policy(1)),
            "freshness": self.sign(self.freshness(1)),
        }

    # --- node state -----------------------------------------------------------------

    def view(
        self,
        root: bytes,
        *,
        freshness: bytes | None = None,
        bundle: bytes | None = None,
        policy: bytes | None = None,
        history: Iterable[bytes] = (),
    ) -> DomainView:
        """What a node holds for this domain: current documents (marks) plus older ``history``."""
        root_doc = _parse(root, Root)
        fresh_doc = _parse(freshness, Freshness) if freshness is not None else None
        current = [d for d in (root, freshness, bundle, policy) if d is not None]
        marks: dict[str, Mark] = {}
        held: dict[tuple[str, int], bytes] = {}
        for raw in [*history, *current]:
            doc = documents.parse(raw)
            held[(doc.type, doc.payload.version)] = doc.digest
        expires: dict[str, int] = {}
        for raw in current:
            doc = documents.parse(raw)
            marks[doc.type] = Mark(doc.payload.version, doc.digest)
            if doc.type in ("bundle", "policy"):
                expires[doc.type] = doc.payload.expires
        return DomainView(root=root_doc, marks=marks, freshness=fresh_doc, history=held, expires=expires)

    def state(self, root: bytes, *, clock_high_water: int = 0, **kwargs: Any) -> TrustState:
        """A node trusting this domain only (see :meth:`view` for the keyword arguments)."""
        return TrustState({self.domain: self.view(root, **kwargs)}, clock_high_water)


def _parse(raw: bytes, cls: type[Payload]) -> Signed[Any]:
    doc = documents.parse(raw)
    assert isinstance(doc.payload, cls), f"expected {cls.type}, got {doc.type}"
    return doc


def trust_state(*views: DomainView, clock_high_water: int = 0) -> TrustState:
    """A node trusting several domains."""
    return TrustState({v.root.payload.domain: v for v in views}, clock_high_water)


def with_root_role(payload: Root, role: str, keyids: Sequence[str], threshold: int) -> Root:
    """``payload`` with ``role`` set to ``keyids``/``threshold`` verbatim (duplicates allowed: no decoder runs)."""
    roles = dict(payload.roles)
    roles[role] = RoleKeys(tuple(keyids), threshold)
    return dataclasses.replace(payload, roles=roles)


# --- tampering ---------------------------------------------------------------------
# Each helper takes signed bytes and re-encodes the COSE_Sign structure
# deterministically, so the result still parses: only the signatures differ.

Sig = list[Any]  # [protected: bytes, unprotected: {4: kid}, signature: bytes]


def cose_parts(raw: bytes) -> tuple[bytes, dict[Any, Any], bytes, list[Sig]]:
    tag = cbor.decode(raw, max_size=documents.MAX_DOCUMENT_SIZE, tags=frozenset({cose.COSE_SIGN_TAG}))
    protected, unprotected, payload, sigs = tag.value
    return protected, unprotected, payload, sigs


def rewrite_signatures(raw: bytes, edit: Callable[[list[Sig]], list[Sig]]) -> bytes:
    protected, unprotected, payload, sigs = cose_parts(raw)
    body = [protected, unprotected, payload, edit([list(s) for s in sigs])]
    return cbor.encode(cbor2.CBORTag(cose.COSE_SIGN_TAG, body))


def duplicate_signatures(raw: bytes, times: int = 3) -> bytes:
    """Every signature repeated ``times`` times (one key presented many times)."""
    return rewrite_signatures(raw, lambda sigs: [list(s) for s in sigs for _ in range(times)])


def flip_signature_byte(raw: bytes, index: int = 0, position: int = 0) -> bytes:
    """Signature ``index`` with one bit flipped at ``position``."""

    def edit(sigs: list[Sig]) -> list[Sig]:
        sig = bytearray(sigs[index][2])
        sig[position] ^= 0x01
        sigs[index][2] = bytes(sig)
        return sigs

    return rewrite_signatures(raw, edit)


def keep_algorithms(raw: bytes, algs: Iterable[int]) -> bytes:
    """Only the signatures made with ``algs`` (a hybrid key signing with one half of its suite)."""
    wanted = set(algs)
    return rewrite_signatures(raw, lambda sigs: [s for s in sigs if cbor.decode(s[0], max_size=64)[1] in wanted])


def drop_signatures(raw: bytes, indexes: Iterable[int]) -> bytes:
    gone = set(indexes)
    return rewrite_signatures(raw, lambda sigs: [s for i, s in enumerate(sigs) if i not in gone])


def add_signatures(raw: bytes, keys: Sequence[PrivateKey]) -> bytes:
    """``raw`` countersigned by ``keys`` (every algorithm of each) over the same payload."""
    _, _, payload, _ = cose_parts(raw)
    extra = cose_parts(cose.sign(payload, keys, content_type=documents.CONTENT_TYPE))[3]
    return rewrite_signatures(raw, lambda sigs: sigs + extra)


def signature_by(
    raw: bytes, key: PrivateKey, alg: int, header: Mapping[int, Any], *, kid_protected: bool = False
) -> Sig:
    """One signature entry by ``key`` with algorithm ``alg`` under a chosen protected ``header``.

    Different protected headers give different, individually valid
    signatures by the same key (e.g. ``{1: -19}`` and the legacy ``{1: -8}``).
    """
    protected, _, payload, _ = cose_parts(raw)
    kid = bytes.fromhex(key.public.keyid)
    hdr = dict(header)
    if kid_protected:
        hdr[cose.H_KID] = kid
    sprot = cbor.encode(hdr)
    sig = key.sign(alg, cose.sig_structure(protected, sprot, payload))
    return [sprot, {} if kid_protected else {cose.H_KID: kid}, sig]


def one_key_many_ways(raw: bytes, key: PrivateKey) -> bytes:
    """``raw`` re-signed by ``key`` alone, presented as several distinct valid signatures."""
    assert key.parts[0][0] == ED25519, "one_key_many_ways is for classical keys"
    variants = [
        signature_by(raw, key, ED25519, {cose.H_ALG: ED25519}),
        signature_by(raw, key, ED25519, {cose.H_ALG: -8}),  # legacy EdDSA id, same key
        signature_by(raw, key, ED25519, {cose.H_ALG: ED25519}, kid_protected=True),
        signature_by(raw, key, ED25519, {cose.H_ALG: -8}, kid_protected=True),
    ]
    return rewrite_signatures(raw, lambda _sigs: variants)


HYBRID_HALVES = {"ed25519": (ED25519,), "mldsa65": (MLDSA65,)}
