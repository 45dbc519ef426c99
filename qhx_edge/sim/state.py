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

from qhx_edge.core import agreements, suites, trust
from qhx_edge.core import documents as D  # noqa: N812 -- as the rest of the package names it
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
        self.agreements: dict[str, int] = {}  # partner -> the agreement version the freshness epoch names
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
        d = {**self._common("freshness", now, self.staleness.hard), "versions": versions,
             "agreements": dict(sorted(self.agreements.items()))}  # fmt: skip
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

    def agreement_key(self, generation: int | None = None) -> suites.PrivateKey:
        return self.key("federation", generation)

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
            doc = D.parse(raw)
            if doc.type == "root":
                roots.append(raw)
            elif doc.type != "agreement":
                newest[doc.type] = raw
        return [*roots, *(newest[t] for t in sorted(newest))]


def agreement(proposer: Authority, partner: Authority, version: int, now: int, *, release: Sequence[str],
              max_staleness: int, status: str = "active") -> bytes:  # fmt: skip
    """An agreement between two simulated domains, as ``federation propose`` and ``accept`` make it: both
    roots pinned (each domain's first), each side accepting the other's whole trust domain and releasing
    ``release``; signed by the proposer's federation role and countersigned by the partner's (a
    termination by the proposer's alone)."""
    a, b = proposer.domain, partner.domain
    terms = {x: {"accept": [f"spiffe://{y}"], "release": list(release), "max_staleness": max_staleness,
                 "allow_spiffe_bundles": False} for x, y in ((a, b), (b, a))}  # fmt: skip
    payload = D.Agreement.from_dict({
        "type": "agreement", "domain": a, "version": version, "issued_at": now, "expires": now + proposer.lifetime,
        "partner": b, "status": status, "terms": terms,
        "roots": {a: agreements.fingerprint(proposer.anchor()), b: agreements.fingerprint(partner.anchor())},
    })  # fmt: skip
    signed = D.sign(payload, [proposer.agreement_key()])
    return signed if status != "active" else D.countersign(signed, [partner.agreement_key()])


def sync_type(doc: D.Signed[Any]) -> str:
    """The name a sync inventory gives a document's kind: its type, an agreement's per pair."""
    p = doc.payload
    return f"agreement/{p.partner}" if isinstance(p, D.Agreement) else p.type


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

    def federation(self) -> agreements.Federation:
        """What the node holds about its partners (``core.agreements.Federation``), from what it keeps."""
        current: dict[str, D.Signed[Any]] = {}
        roots: dict[str, D.Signed[Any]] = {}
        floors: dict[str, int] = {}
        for (domain, kind), by_v in self.docs.items():
            if kind.startswith("agreement/") and (mark := self.marks.get((domain, kind))) is not None:
                doc = by_v[mark.version]
                partner = doc.payload.other(self.home) if self.home in doc.payload.parties else None
                if partner is not None:
                    current[partner] = doc
            elif kind == "root" and domain != self.home:
                for v, doc in by_v.items():
                    roots[agreements.fingerprint(doc.raw)] = doc
                    floors[domain] = min(floors.get(domain, v), v)
        return agreements.Federation(self.home, current, roots, floors)

    def offered(self, peer_domain: str) -> dict[tuple[str, str], int]:
        """The inventory a contact with a node of ``peer_domain`` offers, as ``sync_session.offer`` chooses:
        everything to our own domain (a relay stores and forwards); to a partner's node only our root
        chain, the agreement between the two domains and what our side of it releases, never a third
        domain's documents."""
        inv = self.inventory()
        if peer_domain == self.home:
            return inv
        return {k: v for k, v in inv.items() if k in self._released_to(peer_domain)}

    def _released_to(self, peer_domain: str) -> set[tuple[str, str]]:
        pair = {(self.home, f"agreement/{peer_domain}"), (peer_domain, f"agreement/{self.home}")}
        held = {k: doc for k in pair if (doc := self.current(*k)) is not None}
        newest = max(held.values(), key=lambda doc: doc.payload.version, default=None)
        live = newest.payload if newest is not None and newest.payload.status == "active" else None
        out = set(held)
        if live is not None:
            out |= {(self.home, t) for d, t in self.marks if d == self.home
                    and (t == "root" or agreements.released(live, self.home, t))}  # fmt: skip
        return out

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
        p, kind = doc.payload, sync_type(doc)
        self.docs.setdefault((p.domain, kind), {})[p.version] = doc
        self.raw[(p.domain, kind, p.version)] = doc.raw

    def import_documents(self, raw: Sequence[bytes], now: int, checker: MemoChecker) -> trust.Outcome:
        """The real trust core over ``raw`` at ``now`` (the node's clock), with agreements and the partner
        domains they open (``core.agreements.verify_batch``), applied as the node store applies it."""
        outcome = agreements.verify_batch(list(raw), self.trust_state(), self.federation(), now, checker=checker)
        for domain, kind in outcome.resets:
            self.docs.pop((domain, kind), None)
            self.marks.pop((domain, kind), None)
        for doc in outcome.accepted:
            self._keep(doc)
        self.marks.update(outcome.marks)
        for doc in outcome.agreements:  # kept per pair, the newest current (as the store keeps them)
            self._keep(doc)
            key = (doc.payload.domain, sync_type(doc))
            if doc.payload.version >= (self.marks[key].version if key in self.marks else 0):
                self.marks[key] = trust.Mark(doc.payload.version, doc.digest)
        self.clock_high_water = max(self.clock_high_water, outcome.clock_high_water)
        for v in outcome.rejected:
            kind = v.error.kind if v.error is not None else "rejected"
            self.rejected[kind] = self.rejected.get(kind, 0) + 1
        return outcome

    def inventory(self) -> dict[tuple[str, str], int]:
        """The newest version held per (domain, type): what a sync contact offers."""
        return {k: m.version for k, m in self.marks.items()}

    def pack(self, for_domain: str | None = None) -> list[bytes]:
        """What ``pack export`` of this node carries (``--for`` a node of ``for_domain``: what a contact
        would offer it): every held root in order, then the current document of every other type, domain
        by domain."""
        out = []
        allowed = self.offered(for_domain) if for_domain is not None else None
        for (domain, kind), by_v in sorted(self.docs.items(), key=lambda kv: (kv[0][0], kv[0][1] != "root", kv[0][1])):
            if allowed is not None and (domain, kind) not in allowed:
                continue
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
