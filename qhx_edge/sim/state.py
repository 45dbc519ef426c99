"""A simulated domain authority and a simulated node's trust state, in memory (docs/simulation.md).

The authority signs real documents (``core.documents``: root, bundle, policy, freshness, revocation)
with real hybrid keys (Ed25519 + ML-DSA-65) derived from the scenario's seed, so two runs sign with
the same keys.  A node holds what the real trust core (``core.trust.verify_batch``) accepted, and
applies an outcome as the node store does (``store/trust_store.Store.apply``: documents, high-water
marks, resets of a rotated role's types, the trusted-time mark), without SQLite.  Signature checks go
through :class:`MemoChecker`: every distinct signature is verified once, then remembered (the same
bytes reach thousands of nodes).

The simulation mints no certificates: a bundle names its CA generation by an opaque label, and
issuance is decided by the real staleness rules (``core.staleness``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qhx_edge.core import documents as D  # noqa: N812 -- as the rest of the package names it
from qhx_edge.core import suites, trust
from qhx_edge.core.staleness import Mode, mode

ROLES = ("root", "pki", "policy", "freshness", "federation", "notary")


def derived_key(seed: int, *label: str) -> suites.PrivateKey:
    """A hybrid (Ed25519 + ML-DSA-65) key derived from the scenario's seed and a label."""
    material = hashlib.sha256(repr((seed, *label)).encode()).digest()
    ed = hashlib.sha256(b"ed25519" + material).digest()
    ml = hashlib.sha256(b"ml-dsa-65" + material).digest()
    return suites.PrivateKey(((suites.ED25519, ed), (suites.MLDSA65, ml)))


class MemoChecker:
    """A ``trust.Checker`` that verifies each distinct (algorithm, key, signature, message) once."""

    def __init__(self) -> None:
        self.known: dict[bytes, bool] = {}
        self.verified = 0
        self.remembered = 0

    def __call__(self, checks: Sequence[trust.SignatureCheck]) -> list[bool]:
        out = []
        for alg, pub, sig, msg in checks:
            key = hashlib.sha256(b"%d|" % alg + hashlib.sha256(pub).digest() + hashlib.sha256(sig).digest()
                                 + hashlib.sha256(msg).digest()).digest()  # fmt: skip
            got = self.known.get(key)
            if got is None:
                got = suites.PublicKey(((alg, pub),)).verify_part(alg, sig, msg)
                self.known[key] = got
                self.verified += 1
            else:
                self.remembered += 1
            out.append(got)
        return out


class Authority:
    """A domain's authority in memory: role keys, the published documents, the current versions."""

    def __init__(self, domain: str, seed: int, now: int, *, soft: int, hard: int, lifetime: int) -> None:
        self.domain, self.seed, self.lifetime = domain, seed, lifetime
        self.generation = dict.fromkeys(ROLES, 1)
        self.versions: dict[str, int] = {}
        self.revoked: list[D.RevokedKey] = []
        self.staleness = D.Staleness.from_dict({"soft": soft, "hard": hard, "svid_ttl": 3600, "ttl_floor": 300})
        self.published: list[bytes] = []
        self.ca_generation = 1
        self.publish_root(now)
        self.publish_bundle(now)
        self.publish_policy(now)
        self.publish_freshness(now)

    def key(self, role: str, generation: int | None = None) -> suites.PrivateKey:
        return derived_key(self.seed, self.domain, role, str(generation or self.generation[role]))

    def _common(self, kind: str, now: int, life: int) -> dict[str, Any]:
        self.versions[kind] = self.versions.get(kind, 0) + 1
        return {"type": kind, "domain": self.domain, "version": self.versions[kind], "issued_at": now,
                "expires": now + life}  # fmt: skip

    def _publish(self, payload: D.Payload, signers: list[suites.PrivateKey]) -> bytes:
        data = D.sign(payload, signers)
        self.published.append(data)
        return data

    def _root(self, now: int) -> D.Root:
        keys = {self.key(r).public.keyid: self.key(r).public for r in ROLES}
        roles = {r: D.RoleKeys((self.key(r).public.keyid,), 1) for r in ROLES}
        self.versions["root"] = self.versions.get("root", 0) + 1
        return D.Root(domain=self.domain, version=self.versions["root"], issued_at=now,
                      expires=now + 10 * self.lifetime, suite="hybrid", keys=keys, roles=roles)  # fmt: skip

    def publish_root(self, now: int, *, rotate: Sequence[str] = ()) -> bytes:
        old = self.key("root")
        for role in rotate:
            self.generation[role] += 1
        signers = [old] if "root" not in rotate else [old, self.key("root")]
        return self._publish(self._root(now), signers if self.versions.get("root") else [self.key("root")])

    def anchor(self) -> bytes:
        return self.published[0]

    def publish_bundle(self, now: int) -> bytes:
        label = f"sim-ca:{self.domain}:{self.ca_generation}".encode()
        d = {**self._common("bundle", now, self.lifetime), "x509_authorities": [label], "jwt_authorities": [],
             "refresh_hint": 300}  # fmt: skip
        return self._publish(D.Bundle.from_dict(d), [self.key("pki")])

    def publish_policy(self, now: int) -> bytes:
        d = {**self._common("policy", now, self.lifetime), "registrations": [], "authorization": [],
             "algorithms": {"/": "ES256"}, "staleness": self.staleness.to_dict()}  # fmt: skip
        return self._publish(D.Policy.from_dict(d), [self.key("policy")])

    def publish_freshness(self, now: int) -> bytes:
        versions = {t: self.versions[t] for t in D.EPOCH_TYPES}
        if self.versions.get("revocation"):
            versions["revocation"] = self.versions["revocation"]
        d = {**self._common("freshness", now, self.staleness.hard), "versions": versions, "agreements": {}}
        return self._publish(D.Freshness.from_dict(d), [self.key("freshness")])

    def revoke(self, node: str, now: int) -> list[bytes]:
        """Revoke a node's CA key (named by a digest of the node's name and generation), then publish the list,
        a bundle and a freshness naming them: what ``authority revoke-node`` publishes."""
        key = hashlib.sha256(f"sim-node-ca:{self.domain}:{node}".encode()).digest()
        self.revoked.append(D.RevokedKey(key, now, "x509-ca", node[:64], 1))
        d = {**self._common("revocation", now, self.lifetime), "revoked": [r.to_dict() for r in self.revoked]}
        return [self._publish(D.Revocation.from_dict(d), [self.key("pki")]), self.publish_bundle(now),
                self.publish_freshness(now)]  # fmt: skip

    def rotate_ca(self, now: int) -> list[bytes]:
        self.ca_generation += 1
        return [self.publish_bundle(now), self.publish_freshness(now)]

    def forged(self, now: int) -> list[bytes]:
        """A bundle and a freshness naming it, as the pki and freshness roles would sign them, signed by a
        key no role of the root holds (what an adversary without the keys can make)."""
        stranger = derived_key(self.seed, self.domain, "stranger", str(now))
        v = self.versions
        bundle = D.Bundle.from_dict({"type": "bundle", "domain": self.domain, "version": v["bundle"] + 1,
                                     "issued_at": now, "expires": now + self.lifetime,
                                     "x509_authorities": [b"sim-ca:forged"], "jwt_authorities": [],
                                     "refresh_hint": 300})  # fmt: skip
        versions = {t: v[t] for t in D.EPOCH_TYPES} | {"bundle": v["bundle"] + 1}
        fresh = D.Freshness.from_dict({"type": "freshness", "domain": self.domain, "version": v["freshness"] + 1,
                                       "issued_at": now, "expires": now + self.staleness.hard,
                                       "versions": versions, "agreements": {}})  # fmt: skip
        return [D.sign(bundle, [stranger]), D.sign(fresh, [stranger])]

    def current(self) -> list[bytes]:
        """Every document a node needs, oldest root first: what a full pack from this authority holds."""
        newest: dict[str, bytes] = {}
        roots = []
        for raw in self.published:
            t = D.parse(raw).type
            if t == "root":
                roots.append(raw)
            else:
                newest[t] = raw
        return [*roots, *(newest[t] for t in sorted(newest))]


@dataclass
class NodeState:
    """What one simulated node trusts: held documents and marks per domain, and its trusted-time mark."""

    name: str
    home: str
    docs: dict[tuple[str, str], dict[int, D.Signed[Any]]] = field(default_factory=dict)
    raw: dict[tuple[str, str, int], bytes] = field(default_factory=dict)
    marks: dict[tuple[str, str], trust.Mark] = field(default_factory=dict)
    clock_high_water: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # kind -> count

    def current(self, domain: str, kind: str) -> D.Signed[Any] | None:
        mark = self.marks.get((domain, kind))
        return self.docs.get((domain, kind), {}).get(mark.version) if mark else None

    def trust_state(self) -> trust.TrustState:
        views = {}
        for domain in sorted({d for d, _ in self.marks}):
            root = self.current(domain, "root")
            if root is None:
                continue
            fresh = self.current(domain, "freshness")
            history = {(t, v): doc.digest for (d, t), by_v in self.docs.items() if d == domain
                       for v, doc in by_v.items()}  # fmt: skip
            expires = {t: doc.payload.expires for t in ("bundle", "policy") if (doc := self.current(domain, t))}
            views[domain] = trust.DomainView(root=root, marks={t: m for (d, t), m in self.marks.items() if d == domain},
                                             freshness=fresh, history=history, expires=expires)  # fmt: skip
        return trust.TrustState(views, self.clock_high_water, self.name, None)

    def anchor(self, root: bytes, now: int) -> None:
        doc = trust.verify_anchor(root, now)
        self._keep(doc)
        self.marks[(doc.payload.domain, "root")] = trust.Mark(doc.payload.version, doc.digest)

    def _keep(self, doc: D.Signed[Any]) -> None:
        p = doc.payload
        self.docs.setdefault((p.domain, p.type), {})[p.version] = doc
        self.raw[(p.domain, p.type, p.version)] = doc.raw

    def import_documents(self, raw: Sequence[bytes], now: int, checker: MemoChecker) -> trust.Outcome:
        """The real trust core over ``raw`` at ``now`` (the node's clock), applied as the node store applies it."""
        outcome = trust.verify_batch(list(raw), self.trust_state(), now, checker=checker)
        for domain, kind in outcome.resets:
            self.docs.pop((domain, kind), None)
            self.marks.pop((domain, kind), None)
        for doc in outcome.accepted:
            self._keep(doc)
        self.marks.update(outcome.marks)
        self.clock_high_water = max(self.clock_high_water, outcome.clock_high_water)
        for v in outcome.rejected:
            kind = v.error.kind if v.error is not None else "rejected"
            self.rejected[kind] = self.rejected.get(kind, 0) + 1
        return outcome

    def inventory(self) -> dict[tuple[str, str], int]:
        """The newest version held per (domain, type): what a sync contact offers."""
        return {k: m.version for k, m in self.marks.items()}

    def pack(self) -> list[bytes]:
        """What ``pack export`` of this node carries: every held root in order, then the current document of
        every other type, domain by domain."""
        out = []
        for (domain, kind), by_v in sorted(self.docs.items(), key=lambda kv: (kv[0][0], kv[0][1] != "root", kv[0][1])):
            if kind == "root":
                out += [self.raw[(domain, kind, v)] for v in sorted(by_v)]
            elif (mark := self.marks.get((domain, kind))) is not None and mark.version in by_v:
                out.append(self.raw[(domain, kind, mark.version)])
        return out

    def newer(self, domain: str, kind: str, since: int) -> list[bytes]:
        """What a sync answer sends for a want of (domain, type) since ``since``, as ``sync_session.answer``
        does: every newer root, oldest first (a chain in order); of any other type, the newest alone."""
        by_v = self.docs.get((domain, kind), {})
        versions = [v for v in sorted(by_v) if v > since]
        if kind != "root":
            versions = versions[-1:]
        return [self.raw[(domain, kind, v)] for v in versions]

    def budget(self) -> D.Staleness | None:
        """The staleness budgets of the policy the node holds (what the real issuer reads)."""
        policy = self.current(self.home, "policy")
        return policy.payload.staleness if policy is not None else None

    def mode(self, now: int, budget: D.Staleness | None) -> Mode:
        fresh = self.current(self.home, "freshness")
        expires = {t: doc.payload.expires for t in ("root", "bundle", "policy") if (doc := self.current(self.home, t))}
        ok = now >= self.clock_high_water - trust.DEFAULT_CLOCK_TOLERANCE
        return mode(now, fresh.payload.issued_at if fresh else None, budget, clock_ok=ok, expires=expires)
