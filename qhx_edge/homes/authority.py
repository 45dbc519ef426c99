"""A trust domain's authority: offline root keys, role keys, CAs, published documents.

Home layout::

    authority.json        domain, suite, key names per role, CA generations, versions
    keystore.cbor         KDF parameters (see keystore.py)
    keys/*.key            private keys, sealed (mode 0600)
    published/TYPE/N.cbor every document ever published, exact signed bytes
    card.cbor             the authority's own card (nodes seal evidence to it)
    evidence.sqlite       audit-log evidence imported from nodes (see evidence.py)
    .lock                 held while a command changes the authority (one writer)

One writer: every operation that signs or changes the state takes an exclusive
lock on ``.lock`` and re-reads ``authority.json`` under it, so two commands at
once never sign two documents with one version (that would be equivocation by
our own authority); a command that cannot get the lock in time is
``store-locked``.

Each role (root, pki, policy, freshness, federation, notary) has its own keys
and threshold in the root document: separation of duties is structural, and
root keys exist only here, never on a node.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from qhx_edge.core import documents as D  # noqa: N812 - short alias for the payload classes
from qhx_edge.core.cards import make_card
from qhx_edge.core.errors import AlreadyInitialised, Malformed, NotInitialised, Revoked, StoreCorrupt, StoreLocked
from qhx_edge.core.policyfile import DEFAULT_ALGORITHMS, DEFAULT_STALENESS, policy_fields
from qhx_edge.core.spiffe import check_trust_domain
from qhx_edge.core.suites import SUITES, PrivateKey, ca_algs, suite_algs
from qhx_edge.core.x509ca import load_spki, make_ca, make_intermediate
from qhx_edge.homes.layout import AUTHORITY_STATE, is_authority
from qhx_edge.store.files import atomic_write, private_dir, read_capped
from qhx_edge.store.identity import NodeIdentity
from qhx_edge.store.keystore import Keystore

STATE = AUTHORITY_STATE
CARD = "card.cbor"
AUTHORITY_NODE = "authority"
_CURRENT = {"delegation": "delegations", "notary": "notaries"}  # state: node id -> current version, per type
DAY = 86400
DELEGATION_LIFETIME = 7 * 86400
DEFAULT_LIFETIMES = {"root": 365 * DAY, "bundle": 90 * DAY, "policy": 90 * DAY, "ca": 365 * DAY}
REFRESH_HINT = 3600


MAX_STATE_FILE = 16 << 20


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**63 - 1


def load_state(data: bytes, where: Path) -> dict[str, Any]:
    """The authority's ``authority.json``, checked field by field: ``store-corrupt`` if it is not one.

    The file is the authority's own state, not input from anyone else, so a
    damaged one is an environment fault (exit 3), found here rather than as a
    KeyError deep in a command.
    """

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise StoreCorrupt(f"{where} is not a usable authority state file: {what}")

    try:
        state = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreCorrupt(f"{where} is not a usable authority state file: {exc}") from exc
    need(isinstance(state, dict) and state.get("format") == "qhx-edge-authority", "not an authority state file")
    need(isinstance(state.get("domain"), str), "no domain")
    try:
        check_trust_domain(state["domain"])
    except Malformed as exc:
        raise StoreCorrupt(f"{where}: {exc.message}") from exc
    need(state.get("suite") in SUITES, "unknown suite")
    roles = state.get("roles")
    need(isinstance(roles, dict) and set(roles) == set(D.ROLES), "roles must name every role")
    for role, spec in roles.items():
        need(
            isinstance(spec, dict)
            and isinstance(spec.get("keys"), list)
            and spec["keys"]
            and all(isinstance(k, str) for k in spec["keys"])
            and _is_uint(spec.get("threshold"))
            and 1 <= spec["threshold"] <= len(spec["keys"]),
            f"role {role!r} needs key names and a threshold",
        )
    need(_is_uint(state.get("key_counter")), "key_counter must be a count")
    cas = state.get("cas")
    need(isinstance(cas, list) and bool(cas), "cas must list the CA generations")
    for entry in cas:
        certs = entry.get("certs") if isinstance(entry, dict) else None
        need(_is_uint(entry.get("generation")) if isinstance(entry, dict) else False, "a CA generation needs a number")
        need(
            isinstance(certs, dict)
            and bool(certs)
            and all(
                isinstance(c, dict)
                and isinstance(c.get("key"), str)
                and isinstance(c.get("cert"), str)
                and _is_uint(c.get("not_after"))
                for c in certs.values()
            ),
            "a CA generation lists its certificates",
        )
    versions = state.get("versions")
    need(isinstance(versions, dict) and all(_is_uint(v) for v in versions.values()), "versions must be counts")
    lifetimes = state.get("lifetimes")
    need(
        isinstance(lifetimes, dict)
        and set(DEFAULT_LIFETIMES) <= set(lifetimes)
        and all(_is_uint(v) for v in lifetimes.values()),
        "lifetimes must give every document's lifetime",
    )
    jwt = state.get("jwt_keys", {})
    need(
        isinstance(jwt, dict)
        and all(
            isinstance(k, dict) and isinstance(k.get("spki"), str) and _is_uint(k.get("not_after"))
            for k in jwt.values()
        ),
        "jwt_keys must map key ids to keys",
    )
    need(_is_uint(state.get("export_sequence", 0)), "export_sequence must be a count")
    for name in _CURRENT.values():
        current = state.get(name, {})
        need(
            isinstance(current, dict) and all(_is_uint(v) for v in current.values()),
            f"{name} must map node ids to the version of their current one",
        )
    federation = state.get("federation", {})
    need(
        isinstance(federation, dict)
        and all(
            isinstance(e, dict)
            and _is_uint(e.get("version", 0))
            and _is_uint(e.get("proposed", 0))
            and e.get("status") in ("proposed", "active", "terminated", "renew")
            for e in federation.values()
        ),
        "federation must map partner domains to their agreement versions and status",
    )
    checked: dict[str, Any] = state
    return checked


def _read_state(home: Path) -> dict[str, Any]:
    return load_state(read_capped(home / STATE, MAX_STATE_FILE, "authority state file"), home / STATE)


def fingerprint(data: bytes) -> str:
    """A root document's fingerprint: SHA-256 of its exact signed bytes."""
    return hashlib.sha256(data).hexdigest()


LOCK = ".lock"
LOCK_TIMEOUT = 30.0  # seconds a command waits for another to finish changing the authority

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _one_writer(fn: Callable[Concatenate[Authority, _P], _R]) -> Callable[Concatenate[Authority, _P], _R]:
    """Run ``fn`` holding the authority's lock, on its state as re-read under the lock."""

    def locked(self: Authority, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.locked():
            return fn(self, *args, **kwargs)

    locked.__name__, locked.__qualname__, locked.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return locked


class Authority:
    """An authority home.  The keystore (and so the passphrase) is opened only
    when a private key is needed: anchor, export and status need none."""

    def __init__(self, home: Path, state: dict[str, Any], keystore: Keystore | Callable[[], Keystore]) -> None:
        self.home = home
        self.state = state
        self._keystore = keystore
        self._lock_depth = 0

    @contextlib.contextmanager
    def locked(self, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """Hold the authority's exclusive lock (re-entrant) and work on its state as on disk now."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        fd = os.open(self.home / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StoreLocked(f"{self.home} is being changed by another command") from None
                    time.sleep(0.02)
            # Another command may have changed the state since this one read it.
            self.state = load_state(
                read_capped(self.home / STATE, MAX_STATE_FILE, "authority state file"), self.home / STATE
            )
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0
        finally:
            os.close(fd)  # releases the lock

    @property
    def keystore(self) -> Keystore:
        if not isinstance(self._keystore, Keystore):
            self._keystore = self._keystore()
        return self._keystore

    # --- lifecycle -------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        home: Path,
        domain: str,
        *,
        suite: str,
        root_keys: int,
        root_threshold: int,
        passphrase: bytes | None,
        now: int,
    ) -> Authority:
        check_trust_domain(domain)
        suite_algs(suite)
        _check_threshold(root_keys, root_threshold)
        home = Path(home)
        if (home / STATE).exists():
            raise AlreadyInitialised(f"{home} already holds an authority")
        private_dir(home)
        keystore = Keystore.create(home, passphrase)
        state: dict[str, Any] = {
            "format": "qhx-edge-authority",
            "domain": domain,
            "suite": suite,
            "roles": {},
            "key_counter": 0,
            "cas": [],
            "versions": {},
            "lifetimes": dict(DEFAULT_LIFETIMES),
        }
        auth = cls(home, state, keystore)
        for role in D.ROLES:
            n, m = (root_keys, root_threshold) if role == "root" else (1, 1)
            state["roles"][role] = {"keys": [auth._new_key(role) for _ in range(n)], "threshold": m}
        # The authority's own identity: an encryption key so nodes can seal evidence
        # to it, and a card (node id "authority") that carries it.
        ident = NodeIdentity.create(keystore, suite)
        auth._write_card(ident, now)
        auth._new_ca_generation(now)
        root = auth._root_payload(1, now)
        auth._publish(root, auth._signers("root"))
        auth._publish_bundle(now)
        auth._publish(auth._policy_payload(policy_fields({}), now), auth._signers("policy"))
        auth._publish_freshness(now)
        return auth

    @classmethod
    def open(cls, home: Path, get_passphrase: Callable[[], bytes]) -> Authority:
        home = Path(home)
        if not (home / STATE).exists():
            raise NotInitialised(f"{home} is not an authority home (no {STATE}); run 'authority init'")
        return cls(home, _read_state(home), lambda: Keystore.open(home, get_passphrase))

    @staticmethod
    def exists(home: Path) -> bool:
        return is_authority(home)

    def _save(self) -> None:
        atomic_write(self.home / STATE, json.dumps(self.state, indent=2, sort_keys=True).encode() + b"\n", mode=0o600)

    # --- keys ------------------------------------------------------------------------

    @property
    def domain(self) -> str:
        return str(self.state["domain"])

    def _new_key(self, role: str) -> str:
        self.state["key_counter"] += 1
        name = f"{role}-{self.state['key_counter']}"
        self.keystore.save(name, PrivateKey.generate(self.state["suite"]))
        return name

    def _signers(self, role: str, names: list[str] | None = None) -> list[PrivateKey]:
        spec = self.state["roles"][role]
        chosen = names if names is not None else spec["keys"][: spec["threshold"]]
        return [self.keystore.load(n) for n in chosen]

    def _new_ca_generation(self, now: int) -> None:
        gen = len(self.state["cas"]) + 1
        entry: dict[str, Any] = {"generation": gen, "certs": {}}
        for alg in ca_algs(self.state["suite"]):
            name = f"ca-g{gen}-{-alg}"
            key = PrivateKey.generate_algs([alg])
            self.keystore.save(name, key)
            cert = make_ca(self.domain, key, gen, now, self.state["lifetimes"]["ca"])
            path = self.home / "ca" / f"{name}.der"
            atomic_write(path, cert.der)
            entry["certs"][str(alg)] = {
                "key": name,
                "cert": str(path.relative_to(self.home)),
                "not_after": now + self.state["lifetimes"]["ca"],
            }
        self.state["cas"].append(entry)

    # --- payloads ---------------------------------------------------------------------

    def _common(self, type_: str, now: int, lifetime: int) -> dict[str, Any]:
        version = int(self.state["versions"].get(type_, 0)) + 1
        return {"domain": self.domain, "version": version, "issued_at": now, "expires": now + lifetime}

    def _root_payload(self, version: int, now: int) -> D.Root:
        keys = {}
        roles = {}
        for role, spec in self.state["roles"].items():
            ids = []
            for name in spec["keys"]:
                pub = self.keystore.load(name).public
                keys[pub.keyid] = pub
                ids.append(pub.keyid)
            roles[role] = D.RoleKeys(tuple(ids), spec["threshold"])
        return D.Root(
            domain=self.domain,
            version=version,
            issued_at=now,
            expires=now + self.state["lifetimes"]["root"],
            suite=self.state["suite"],
            keys=keys,
            roles=roles,
        )

    def _policy_payload(self, fields: dict[str, Any], now: int) -> D.Policy:
        d = {"type": "policy", **self._common("policy", now, self.state["lifetimes"]["policy"]), **fields}
        d.setdefault("algorithms", DEFAULT_ALGORITHMS)
        d.setdefault("staleness", DEFAULT_STALENESS)
        return D.Policy.from_dict(d)

    def _publish(self, payload: D.Payload, signers: list[PrivateKey]) -> bytes:
        data = D.sign(payload, signers)
        D.parse(data)  # what we publish must parse under our own strict rules
        atomic_write(self.home / "published" / payload.type / f"{payload.version}.cbor", data)
        self.state["versions"][payload.type] = payload.version
        self._save()
        return data

    def _publish_bundle(self, now: int) -> bytes:
        revoked = {r.key for r in self._revoked()}  # a revoked key never comes back, re-attested or not
        # The newest CA generation and the one before it: overlap while SVIDs rotate.
        certs = []
        for entry in self.state["cas"][-2:]:
            for info in entry["certs"].values():
                if info["not_after"] > now:
                    certs.append((self.home / info["cert"]).read_bytes())
        d = {
            "type": "bundle",
            **self._common("bundle", now, self.state["lifetimes"]["bundle"]),
            "x509_authorities": certs,
            # Delegated nodes sign JWT-SVIDs offline: their keys are the domain's JWT authorities.
            "jwt_authorities": [
                {"kid": kid, "spki": bytes.fromhex(k["spki"])}
                for kid, k in sorted(self.state.get("jwt_keys", {}).items())
                if k["not_after"] > now and hashlib.sha256(bytes.fromhex(k["spki"])).digest() not in revoked
            ],
            "refresh_hint": REFRESH_HINT,
        }
        return self._publish(D.Bundle.from_dict(d), self._signers("pki"))

    def _publish_freshness(self, now: int, lifetime: int | None = None) -> bytes:
        policy = D.parse(self.current("policy")).payload
        assert isinstance(policy, D.Policy)
        life = lifetime if lifetime is not None else policy.staleness.hard
        self._renew_revocation(now, now + life)
        versions = {t: int(self.state["versions"][t]) for t in D.EPOCH_TYPES}
        for t in D.OPTIONAL_EPOCH_TYPES:  # named once one exists (a revocation: the domain revoked something)
            if int(self.state["versions"].get(t, 0)):
                versions[t] = int(self.state["versions"][t])
        d = {
            "type": "freshness",
            **self._common("freshness", now, life),
            "versions": versions,
            "agreements": self.active_agreements(),
        }
        return self._publish(D.Freshness.from_dict(d), self._signers("freshness"))

    # --- commands -------------------------------------------------------------------------

    # --- agreements (the exchange is homes/federation.py) -----------------------------------

    def active_agreements(self) -> dict[str, int]:
        """Partner -> version of every active published agreement: what the next freshness names."""
        fed = self.state.get("federation", {})
        return {
            p: int(e["version"]) for p, e in sorted(fed.items()) if e.get("status") == "active" and e.get("version")
        }

    def current_agreement(self, partner: str) -> D.Signed[D.Agreement] | None:
        """The newest published agreement with ``partner`` (active or terminated), if any."""
        entry = self.state.get("federation", {}).get(partner)
        if entry is None or not entry.get("version"):
            return None
        doc = D.parse((self.home / "published" / "agreement" / partner / f"{entry['version']}.cbor").read_bytes())
        return doc if isinstance(doc.payload, D.Agreement) else None  # type: ignore[return-value]

    def agreement_documents(self, now: int) -> list[bytes]:
        """For this domain's own nodes: each partner's current agreement (active and unexpired, or
        terminated) and, while it is active, the partner root it pins (nodes check both thresholds)."""
        out = []
        for partner, entry in sorted(self.state.get("federation", {}).items()):
            doc = self.current_agreement(partner)
            if doc is None:
                continue
            a = doc.payload
            if a.status == "active" and entry.get("status") == "active" and now < a.expires:
                pinned = self.home / "federation" / partner / f"{a.roots[partner]}.cbor"
                if pinned.exists():
                    out.append(pinned.read_bytes())
                out.append(doc.raw)
            elif a.status == "terminated":
                out.append(doc.raw)
        return out

    def current(self, type_: str) -> bytes:
        return self.published(type_, int(self.state["versions"][type_]))

    def published(self, type_: str, version: int) -> bytes:
        return (self.home / "published" / type_ / f"{version}.cbor").read_bytes()

    @_one_writer
    def publish_bundle(self, now: int) -> list[bytes]:
        return [self._publish_bundle(now), self._publish_freshness(now)]

    @_one_writer
    def publish_policy(self, fields: dict[str, Any], now: int) -> list[bytes]:
        policy = self._publish(self._policy_payload(fields, now), self._signers("policy"))
        return [policy, self._publish_freshness(now)]

    @_one_writer
    def publish_freshness(self, now: int, lifetime: int | None = None) -> list[bytes]:
        return [self._publish_freshness(now, lifetime)]

    @_one_writer
    def rotate_ca(self, now: int) -> list[bytes]:
        self._new_ca_generation(now)
        return self.publish_bundle(now)

    @_one_writer
    def rotate_root(
        self, now: int, *, root_keys: int | None, root_threshold: int | None, roles: tuple[str, ...] = ()
    ) -> list[bytes]:
        """Root v+1 with new root keys (and new keys for ``roles``), signed by old and new thresholds."""
        old = self.state["roles"]["root"]
        n = root_keys if root_keys is not None else len(old["keys"])
        m = root_threshold if root_threshold is not None else min(old["threshold"], n)
        _check_threshold(n, m)
        for role in roles:
            if role not in D.ROLES or role == "root":
                raise Malformed(f"cannot rotate unknown role {role!r}")
        old_signers = self._signers("root")
        self.state["roles"]["root"] = {"keys": [self._new_key("root") for _ in range(n)], "threshold": m}
        for role in roles:
            self.state["roles"][role] = {"keys": [self._new_key(role)], "threshold": 1}
        version = int(self.state["versions"]["root"]) + 1
        root = self._root_payload(version, now)
        out = [self._publish(root, old_signers + self._signers("root"))]
        # A rotated role must re-sign what it owns, or nodes reset its mark and hold nothing.
        if "pki" in roles:
            out += self._resign_revocation(now)
            out.append(self._publish_bundle(now))
            out += self._resign_delegations(now)
        if "notary" in roles:
            out += self._resign_delegations(now, "notary")
        if "policy" in roles:
            current = D.parse(self.current("policy")).payload
            assert isinstance(current, D.Policy)
            fields = {k: v for k, v in current.to_dict().items() if k in D.Policy._fields}
            out.append(self._publish(self._policy_payload(fields, now), self._signers("policy")))
        if "federation" in roles:
            # Agreements carry the retired federation key's signatures, which our nodes' new root no longer
            # counts: the next epoch stops naming them (trust in those partners stops) until each is
            # negotiated again with the new key (federation propose / accept / publish).
            for entry in self.state.get("federation", {}).values():
                if entry.get("status") == "active":
                    entry["status"] = "renew"
        out.append(self._publish_freshness(now))
        if "freshness" in roles:
            self._write_card(self.identity, now)
        return out

    def anchor(self) -> bytes:
        return self.current("root")

    @_one_writer
    def issue_delegation(
        self,
        *,
        node_id: str,
        card_fingerprint: str,
        ca_spkis: dict[int, bytes],
        jwt_spki: bytes,
        attestation: dict[str, Any],
        now: int,
        lifetime: int = DELEGATION_LIFETIME,
    ) -> list[bytes]:
        """Sign a node's intermediate CA certificate(s) and its delegation (pki role).

        Call only after the node has been attested.  Returns the delegation and
        a new bundle + freshness whose JWT authorities include the node's key.
        """
        revoked = {r.key: r for r in self._revoked()}
        if any(r.node_id == node_id and r.use == "x509-ca" for r in revoked.values()):
            # A revoked node is revoked for good: attesting again must not hand its identity new keys.
            raise Revoked(f"node {node_id} was revoked by {self.domain}; it gets no delegation again")
        for spki in [*ca_spkis.values(), jwt_spki]:
            if hashlib.sha256(spki).digest() in revoked:
                raise Revoked(f"a key node {node_id} asks to have delegated was revoked by {self.domain}")
        gen = self.state["cas"][-1]
        certs = []
        not_after = now + lifetime
        for alg, spki in sorted(ca_spkis.items()):
            info = gen["certs"].get(str(alg))
            if info is None:
                raise Malformed(f"this domain has no CA for algorithm {alg}")
            cert = make_intermediate(
                self.domain,
                self.keystore.load(info["key"]),
                (self.home / info["cert"]).read_bytes(),
                spki,
                node_id,
                now,
                lifetime,
            )
            certs.append(cert.der)
            not_after = min(not_after, int(info["not_after"]))
        load_spki(jwt_spki)
        kid = f"{node_id}-{hashlib.sha256(jwt_spki).hexdigest()[:16]}"
        self.state.setdefault("jwt_keys", {})[kid] = {
            "spki": jwt_spki.hex(),
            "node_id": node_id,
            "not_after": not_after,
        }
        payload = D.Delegation.from_dict(
            {
                "type": "delegation",
                "domain": self.domain,
                "version": int(self.state["versions"].get("delegation", 0)) + 1,
                "issued_at": now,
                "expires": not_after,
                "node_id": node_id,
                "card_fingerprint": card_fingerprint,
                "attestation": attestation,
                "x509_cas": certs,
                "jwt_key": {"kid": kid, "spki": jwt_spki},
            }
        )
        self.state.setdefault("delegations", {})[node_id] = payload.version  # saved by _publish
        delegation = self._publish(payload, self._signers("pki"))
        notary = self._publish_notary(node_id, card_fingerprint, now, not_after)
        return [delegation, *notary, *self.publish_bundle(now)]

    def _publish_notary(self, node_id: str, card_fingerprint: str, now: int, expires: int) -> list[bytes]:
        """The notary role makes the node a notary for as long as its delegation (docs/architecture.md,
        "Notary"): its card's key may sign receipts and receipt-log tree heads."""
        if not self.state["roles"].get("notary", {}).get("keys"):
            return []
        payload = D.NotaryDelegation.from_dict(
            {"type": "notary", "domain": self.domain, "version": int(self.state["versions"].get("notary", 0)) + 1,
             "issued_at": now, "expires": expires, "node_id": node_id, "card_fingerprint": card_fingerprint}
        )  # fmt: skip
        self.state.setdefault("notaries", {})[node_id] = payload.version  # saved by _publish
        return [self._publish(payload, self._signers("notary"))]

    @_one_writer
    def revoke(self, now: int, *, node_id: str | None = None, delegation: int | None = None) -> list[bytes]:
        """Revoke every key a node was ever delegated (``node_id``: ``authority revoke-node``) or the keys
        of one delegation (``delegation``: ``authority revoke-delegation``), from ``now``.

        Publishes the next revocation (the whole list so far plus these keys: the SHA-256 of each
        delegated CA's and JWT key's SubjectPublicKeyInfo), a bundle without the revoked node's JWT
        keys, and a freshness naming both.  A revoked node's delegation is no longer exported nor
        signed again.  ``malformed`` for a node or delegation this authority never issued; revoking
        what is already revoked changes nothing but is published again (idempotent)."""
        from qhx_edge.core.delegations import revocable_keys

        if (node_id is None) == (delegation is None):
            raise Malformed("revoke a node or one delegation")
        held = self._revoked()
        known = {r.key for r in held}
        added: list[D.RevokedKey] = []
        nodes: set[str] = set()
        for version in range(1, int(self.state["versions"].get("delegation", 0)) + 1):
            doc = D.parse(self.published("delegation", version)).payload
            assert isinstance(doc, D.Delegation)
            if (node_id is not None and doc.node_id != node_id) or (delegation is not None and version != delegation):
                continue
            nodes.add(doc.node_id)
            for use, key in revocable_keys(doc):
                if key not in known:
                    known.add(key)
                    added.append(D.RevokedKey(key, now, use, doc.node_id, version))
        if not nodes:
            which = f"node {node_id}" if node_id is not None else f"delegation v{delegation}"
            raise Malformed(f"this authority never delegated to {which}")
        if node_id is not None:  # its notary key too: receipts it signs from now on prove nothing
            for version in range(1, int(self.state["versions"].get("notary", 0)) + 1):
                notary = D.parse(self.published("notary", version)).payload
                assert isinstance(notary, D.NotaryDelegation)
                key = bytes.fromhex(notary.card_fingerprint)
                if notary.node_id == node_id and key not in known:
                    known.add(key)
                    added.append(D.RevokedKey(key, now, "notary", node_id, version))
            self.state.get("notaries", {}).pop(node_id, None)
        revoked_nodes = nodes if node_id is not None else set()
        for n in revoked_nodes:
            self.state.get("delegations", {}).pop(n, None)
        if delegation is not None:  # one delegation: the node keeps a later one, if it has one
            for n, v in list(self.state.get("delegations", {}).items()):
                if v == delegation:
                    del self.state["delegations"][n]
        revoked_jwt = {r.key for r in [*held, *added] if r.use == "jwt"}
        self.state["jwt_keys"] = {
            kid: k
            for kid, k in self.state.get("jwt_keys", {}).items()
            if hashlib.sha256(bytes.fromhex(k["spki"])).digest() not in revoked_jwt
        }
        life = int(self.state["lifetimes"].get("revocation", self.state["lifetimes"]["bundle"]))
        payload = D.Revocation.from_dict(
            {"type": "revocation", **self._common("revocation", now, life),
             "revoked": [r.to_dict() for r in [*held, *added]]}
        )  # fmt: skip
        out = [self._publish(payload, self._signers("pki"))]
        return [*out, self._publish_bundle(now), self._publish_freshness(now)]

    def _revoked(self) -> list[D.RevokedKey]:
        if not int(self.state["versions"].get("revocation", 0)):
            return []
        current = D.parse(self.current("revocation")).payload
        assert isinstance(current, D.Revocation)
        return list(current.revoked)

    def _renew_revocation(self, now: int, until: int) -> None:
        """Sign the revocation list again before a freshness would name it past its expiry: revocations
        never lapse, and a node that missed the list must still be able to take it."""
        if not int(self.state["versions"].get("revocation", 0)):
            return
        current = D.parse(self.current("revocation")).payload
        life = int(self.state["lifetimes"].get("revocation", self.state["lifetimes"]["bundle"]))
        if current.expires < max(until, now + life // 2):
            self._resign_revocation(now)

    def _resign_revocation(self, now: int) -> list[bytes]:
        """The current revocation signed again by the (new) pki keys, under the next version: a node
        resets the marks of a rotated role's types, and must not lose its revocations with them."""
        held = self._revoked()
        if not held:
            return []
        life = int(self.state["lifetimes"].get("revocation", self.state["lifetimes"]["bundle"]))
        payload = D.Revocation.from_dict(
            {"type": "revocation", **self._common("revocation", now, life), "revoked": [r.to_dict() for r in held]}
        )
        return [self._publish(payload, self._signers("pki"))]

    def _resign_delegations(self, now: int, kind: str = "delegation") -> list[bytes]:
        """Every node's current, unexpired delegation (or notary delegation, ``kind``) signed again by
        the (new) keys of the role that signs it.

        A node resets its delegation mark when the role's keys change (TUF
        5.3.11), so without this every node would lose its delegation, and its
        ability to issue, when its authority rotates the pki key.  The content
        is the same (CAs, JWT key, card, expiry: re-signing never extends a
        delegation), under a new version issued now.  Expired ones are dropped.
        """
        out = []
        cls: Any = D.PAYLOAD_TYPES[kind]
        current: dict[str, int] = self.state.get(_CURRENT[kind], {})
        for node_id, version in sorted(current.items()):
            old = D.parse(self.published(kind, version)).payload
            if old.expires <= now:
                del current[node_id]
                continue
            fields = {**old.to_dict(), "version": int(self.state["versions"][kind]) + 1, "issued_at": now}
            payload = cls.from_dict(fields)
            current[node_id] = payload.version
            out.append(self._publish(payload, self._signers(D.ROLE_FOR_TYPE[kind])))
        self._save()
        return out

    def current_delegations(self, now: int | None = None) -> list[bytes]:
        """Each node's current delegation and notary delegation (unexpired at ``now``, when given), in
        node id order."""
        out = []
        for kind in D.DELEGATION_TYPES:
            for _, version in sorted(self.state.get(_CURRENT[kind], {}).items()):
                raw = self.published(kind, version)
                if now is None or D.parse(raw).payload.expires > now:
                    out.append(raw)
        return out

    def card(self) -> bytes:
        return (self.home / CARD).read_bytes()

    def _write_card(self, ident: NodeIdentity, now: int) -> None:
        """The authority's card: its own identity key, countersigned by the freshness role's keys.

        Nodes seal join tokens and evidence to this card; the countersignature lets
        them check it against the root they hold (``attestation.check_authority_card``),
        so a card swapped by a courier is refused.  Remade when the freshness role rotates.
        """
        card = make_card(
            self.domain, AUTHORITY_NODE, ident.signer, ident.encryption.public, now, self._signers("freshness")
        )
        atomic_write(self.home / CARD, card)

    @property
    def identity(self) -> NodeIdentity:
        return NodeIdentity(self.keystore)

    @_one_writer
    def export_pack(self, docs: list[bytes], now: int, *, kind: str = "documents") -> bytes:
        """A pack of ``docs`` whose manifest is signed by the freshness role key.

        Nodes know that key from the root they hold, so they can attribute an
        authority's pack without any extra trust material.
        """
        from qhx_edge.packs import pack

        self.state["export_sequence"] = int(self.state.get("export_sequence", 0)) + 1
        self._save()
        signer = self._signers("freshness")[0]
        return pack.build(
            docs,
            signer,
            domain=self.domain,
            node=AUTHORITY_NODE,
            sequence=self.state["export_sequence"],
            now=now,
            kind=kind,
        )

    def export_documents(self, now: int | None = None) -> list[bytes]:
        """Every root version (so any node can walk the chain), the current epoch, and each node's
        current delegation (unexpired at ``now``, when given): a node takes its own and passes over
        the others' (``not-mine``), so a delegation re-signed by a rotated pki role reaches its node."""
        roots = [self.published("root", v) for v in range(1, int(self.state["versions"]["root"]) + 1)]
        # Revocations first after the roots they verify under: small, and the most urgent (issue 10).
        revocation = [self.current("revocation")] if int(self.state["versions"].get("revocation", 0)) else []
        current = [self.current(t) for t in ("bundle", "policy", "freshness")]
        docs = roots + revocation + current + self.current_delegations(now)
        return docs + self.agreement_documents(now if now is not None else 0)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"domain": self.domain, "suite": self.state["suite"], "documents": {}}
        for t in ("root", "bundle", "policy", "freshness"):
            doc = D.parse(self.current(t))
            out["documents"][t] = {
                "version": doc.payload.version,
                "issued_at": doc.payload.issued_at,
                "expires": doc.payload.expires,
                "digest": doc.digest.hex(),
            }
        out["root_fingerprint"] = fingerprint(self.current("root"))
        out["roles"] = {
            r: {"keys": len(s["keys"]), "threshold": s["threshold"]} for r, s in self.state["roles"].items()
        }
        out["ca_generation"] = len(self.state["cas"])
        out["agreements"] = {
            p: {"version": e.get("version") or None, "status": e.get("status")}
            for p, e in sorted(self.state.get("federation", {}).items())
        }
        return out


def _check_threshold(n: int, m: int) -> None:
    if n < 1 or n > 64:
        raise Malformed("--root-keys must be between 1 and 64")
    if m < 1 or m > n:
        raise Malformed(f"--root-threshold must be between 1 and {n}")
