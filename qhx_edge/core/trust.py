"""The trust core: pure verification of signed documents.

Input: document bytes, a reference time and the node's trusted state (held
roots, persisted high-water marks, the held freshness epoch, the trusted clock
mark).  Output: a verdict per document and the state changes to persist.  No
files, no sockets, no clock reads: the caller passes ``now`` once per
operation (TUF client workflow §5.1, "fix the reference time").

Invariants enforced here (DESIGN.md "Verification rules"):

1. Clock first: ``now`` behind the clock high-water mark by more than the
   tolerance is ``clock-rollback`` for the whole batch, whatever it holds.
   The mark is trusted time -- the latest ``issued_at`` among verified
   documents -- never the local clock, so a clock once pushed forward by an
   attacker cannot lock the node out.
2. Thresholds count **distinct** key ids; a key is satisfied only if every
   algorithm of its suite has a valid signature (hybrid = both).
3. Role separation: a document counts only signatures of the role that owns
   its type; signatures of another role make it ``wrong-role``.
4. Root N+1 must be signed by the root thresholds of N **and** N+1, walked
   one version at a time (TUF 5.3.4); expiry is checked on the final root.
   When a role's keys or threshold change, the high-water mark of the types
   it signs is reset (TUF 5.3.11 fast-forward attack recovery).
5. Versions never go back: lower than the mark is ``rollback`` (except a
   root whose exact bytes are a held link of the rotation chain:
   ``already-held``), the same bytes again are ``already-held``, equal
   version with other bytes is ``equal-version-conflict``.
6. ``issued_at`` later than ``now`` + tolerance is ``not-yet-valid``;
   ``expires`` before ``now`` is ``expired`` for documents that would become
   current (superseded history versions in the same batch are kept unexpired
   or not: they are never used).
7. Mix-and-match: a bundle or policy becomes current only if the freshness
   epoch that is current after the batch names exactly its version; a
   freshness document is accepted only if it names the held root and versions
   that are held or arrive valid in the same batch.  The newest bundle or
   policy of a batch must not be expired.
8. One document per version: exact copies in a batch are ``duplicate``;
   validly signed different documents claiming one version are all
   ``equal-version-conflict`` (nothing says which is genuine), while a forged
   copy is refused for its own fault and cannot block the genuine one.
9. Suites: every key of a root holds exactly its suite's algorithms, and a
   root rotation may not drop post-quantum signatures (``downgrade``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qhx_edge.core.documents import (
    EPOCH_TYPES,
    ROLE_FOR_TYPE,
    Freshness,
    Root,
    Signed,
    parse,
)
from qhx_edge.core.errors import (
    BadSignature,
    ClockRollback,
    Downgrade,
    EqualVersionConflict,
    Expired,
    Malformed,
    MixAndMatch,
    NotYetValid,
    Oversize,
    Rejected,
    Rollback,
    ScopeViolation,
    ThresholdNotMet,
    UnknownDomain,
    WrongRole,
)
from qhx_edge.core.suites import POST_QUANTUM, canonical_alg, suite_algs

DEFAULT_CLOCK_TOLERANCE = 300
MAX_BATCH = 10_000

# Which document types each role signs (for fast-forward recovery).
TYPES_OF_ROLE: dict[str, tuple[str, ...]] = {}
for _t, _r in ROLE_FOR_TYPE.items():
    TYPES_OF_ROLE.setdefault(_r, ())
    TYPES_OF_ROLE[_r] += (_t,)


@dataclass(frozen=True, slots=True)
class Mark:
    """A persisted high-water mark: the highest version accepted, and its digest."""

    version: int
    digest: bytes


@dataclass(frozen=True)
class DomainView:
    """What a node trusts for one domain."""

    root: Signed[Root]
    marks: Mapping[str, Mark] = field(default_factory=dict)
    freshness: Signed[Freshness] | None = None
    history: Mapping[tuple[str, int], bytes] = field(default_factory=dict)  # (type, version) -> digest


@dataclass(frozen=True)
class TrustState:
    domains: Mapping[str, DomainView]
    clock_high_water: int = 0
    node_id: str | None = None  # the node whose delegations this state may accept


@dataclass(frozen=True)
class Limits:
    clock_tolerance: int = DEFAULT_CLOCK_TOLERANCE
    max_batch: int = MAX_BATCH


@dataclass
class Verdict:
    index: int
    status: str  # applied | history | already-held | duplicate | rejected
    doc: Signed[Any] | None = None
    error: Rejected | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "status": self.status}
        if self.doc is not None:
            p = self.doc.payload
            out.update(domain=p.domain, type=p.type, version=p.version, digest=self.doc.digest.hex())
        if self.error is not None:
            out["status"] = f"rejected:{self.error.kind}"
            out["error"] = self.error.to_json()
        return out


@dataclass
class Outcome:
    verdicts: list[Verdict]
    marks: dict[tuple[str, str], Mark] = field(default_factory=dict)
    resets: set[tuple[str, str]] = field(default_factory=set)
    clock_high_water: int = 0

    @property
    def accepted(self) -> list[Signed[Any]]:
        """Documents to store, in verification order (roots first)."""
        return [v.doc for v in self.verdicts if v.status in ("applied", "history") and v.doc is not None]

    @property
    def rejected(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.status == "rejected"]

    @property
    def changed(self) -> bool:
        return bool(self.accepted) or bool(self.resets)

    def first_error(self) -> Rejected | None:
        """The batch's error: the first rejection by index, but a ``mix-and-match``
        yields to any other kind, because it is often only the echo of that other
        rejection (a bundle is unnamed when the freshness naming it was expired or
        forged): report the cause, e.g. ``expired`` for a replayed old pack."""
        rej = sorted(self.rejected, key=lambda v: (isinstance(v.error, MixAndMatch), v.index))
        return rej[0].error if rej else None


def check_clock(now: int, clock_high_water: int, tolerance: int = DEFAULT_CLOCK_TOLERANCE) -> None:
    """Raise :class:`ClockRollback` if ``now`` is behind trusted time beyond ``tolerance``."""
    if now < clock_high_water - tolerance:
        raise ClockRollback(
            f"node clock {now} is {clock_high_water - now} s behind trusted time {clock_high_water} "
            f"(tolerance {tolerance} s); fix the clock before trusting anything"
        )


# --- signatures and thresholds ----------------------------------------------------


def satisfied_keys(
    doc: Signed[Any], keys: Mapping[str, Any], cache: dict[int, bool] | None = None
) -> tuple[set[str], int]:
    """Key ids of ``keys`` whose every algorithm validly signed ``doc``.

    Returns the satisfied key ids and the number of signatures by those keys
    that failed cryptographic verification.  Distinct key ids only: a key that
    signs twice, or is listed twice, still counts once.
    """
    cache = {} if cache is None else cache
    good: dict[str, set[int]] = {}
    bad = 0
    for i, sig in enumerate(doc.envelope.signatures):
        keyid = sig.kid.hex()
        key = keys.get(keyid)
        if key is None:
            continue
        if i not in cache:
            cache[i] = key.verify_part(sig.alg, sig.signature, doc.envelope.to_be_signed(sig.protected))
        if cache[i]:
            good.setdefault(keyid, set()).add(canonical_alg(sig.alg))
        else:
            bad += 1
    ok = {kid for kid, algs in good.items() if set(keys[kid].algs) <= algs}
    return ok, bad


def check_role(doc: Signed[Any], root: Root, role: str, cache: dict[int, bool] | None = None) -> None:
    """Raise unless ``doc`` carries a threshold of valid signatures by ``role`` of ``root``."""
    spec = root.roles[role]
    ok, bad = satisfied_keys(doc, root.role_keys(role), cache)
    if len(ok) >= spec.threshold:
        return
    others = {k: v for k, v in root.keys.items() if k not in spec.keyids}
    foreign, _ = satisfied_keys(doc, others)
    where = f"{doc.describe()}: {len(ok)} of {spec.threshold} required {role} signatures"
    if foreign:
        raise WrongRole(f"{where}; signed by keys of another role (type confusion)")
    if bad:
        raise BadSignature(f"{where}; {bad} signature(s) do not verify")
    raise ThresholdNotMet(where)


def verify_anchor(data: bytes, now: int, tolerance: int = DEFAULT_CLOCK_TOLERANCE) -> Signed[Root]:
    """Verify a root document used to bootstrap trust (self-signed by its threshold)."""
    doc = parse(data)
    if not isinstance(doc.payload, Root):
        raise Malformed(f"an anchor must be a root document, not {doc.type}")
    check_role(doc, doc.payload, "root")
    _check_times(doc, now, tolerance)
    return doc  # type: ignore[return-value]


def _check_times(doc: Signed[Any], now: int, tolerance: int, *, expiry: bool = True) -> None:
    p = doc.payload
    if p.issued_at > now + tolerance:
        raise NotYetValid(f"{doc.describe()} is issued at {p.issued_at}, {p.issued_at - now} s in the future")
    if expiry and now >= p.expires:
        raise Expired(f"{doc.describe()} expired at {p.expires}")


def _check_version(
    doc: Signed[Any], mark: Mark | None, history: Mapping[tuple[str, int], bytes], *, carried: bool = False
) -> str | None:
    """``already-held`` or None (newer); raise for rollback / equal-version conflict.

    ``carried``: the batch also holds the current version of this type, so held
    older versions in it are history travelling with it (re-importing a pack is a
    no-op), not a replay of an older pack.
    """
    if mark is None:
        return None
    v = doc.payload.version
    if v > mark.version:
        return None
    if v == mark.version and mark.digest == doc.digest:
        return "already-held"
    # Older roots are links of the rotation chain that packs carry so any node can
    # walk it: a held link is harmless.  Other held older versions are harmless only
    # beside the current one; alone they are a replay of an older pack.
    if (doc.type == "root" or carried) and history.get((doc.type, v)) == doc.digest:
        return "already-held"
    if v == mark.version:
        raise EqualVersionConflict(f"{doc.describe()} differs from the held document of the same version")
    raise Rollback(f"{doc.describe()} is older than the held version {mark.version}")


def _check_version_signed(
    doc: Signed[Any],
    mark: Mark | None,
    history: Mapping[tuple[str, int], bytes],
    root: Root,
    role: str,
    *,
    carried: bool = False,
) -> str | None:
    """:func:`_check_version`, but an equal-version conflict is claimed only by a
    validly signed document: a forgery of a held version is refused for its own
    fault, so nobody without keys can make the audit log show the authority
    signing two documents for one version."""
    try:
        return _check_version(doc, mark, history, carried=carried)
    except EqualVersionConflict:
        check_role(doc, root, role)
        raise


def _check_suite_change(old: Root, new: Root) -> None:
    """A root rotation must not drop post-quantum signatures (hybrid/pq -> classical)."""
    had_pq = bool(set(suite_algs(old.suite)) & POST_QUANTUM)
    if had_pq and not set(suite_algs(new.suite)) & POST_QUANTUM:
        raise Downgrade(f"root v{new.version} moves the domain from suite {old.suite} to {new.suite}")


def _role_changed(old: Root, new: Root, role: str) -> bool:
    a, b = old.roles[role], new.roles[role]
    return a.threshold != b.threshold or set(a.keyids) != set(b.keyids)


# --- batches ------------------------------------------------------------------


def verify_batch(
    docs: Sequence[bytes],
    state: TrustState,
    now: int,
    limits: Limits = Limits(),
    *,
    digests: Sequence[bytes] | None = None,
) -> Outcome:
    """Verify a batch of documents (a pack) against ``state`` at time ``now``.

    ``digests``: the SHA-256 of each document, when the caller has already
    checked them (a pack's manifest), so they are not computed twice.
    """
    check_clock(now, state.clock_high_water, limits.clock_tolerance)
    if len(docs) > limits.max_batch:
        raise Oversize(f"{len(docs)} documents exceed the cap of {limits.max_batch}")
    if digests is not None and len(digests) != len(docs):
        raise ValueError("one digest per document")
    verdicts: list[Verdict] = []
    by_domain: dict[str, list[Verdict]] = {}
    for i, raw in enumerate(docs):
        try:
            doc = parse(raw)
        except Rejected as exc:
            verdicts.append(Verdict(i, "rejected", None, exc))
            continue
        if digests is not None:
            doc.__dict__["digest"] = digests[i]  # fills Signed.digest's cache (a cached_property)
        v = Verdict(i, "pending", doc)
        verdicts.append(v)
        if doc.payload.domain not in state.domains:
            v.status, v.error = (
                "rejected",
                UnknownDomain(f"{doc.describe()}: this node does not trust {doc.payload.domain}"),
            )
            continue
        if doc.type not in (*EPOCH_TYPES, "freshness", "delegation"):
            v.status, v.error = "rejected", Malformed(f"{doc.type} documents are not accepted in this batch")
            continue
        by_domain.setdefault(doc.payload.domain, []).append(v)

    outcome = Outcome(verdicts, clock_high_water=state.clock_high_water)
    for domain, items in by_domain.items():
        _verify_domain(domain, items, state.domains[domain], now, limits, outcome, state.node_id)
    for v in verdicts:
        if v.status in ("applied", "history") and v.doc is not None:
            outcome.clock_high_water = max(outcome.clock_high_water, v.doc.payload.issued_at)
    return outcome


def _reject(v: Verdict, exc: Rejected) -> None:
    v.status, v.error = "rejected", exc


def _dedupe(vs: list[Verdict]) -> list[Verdict]:
    """One document per version (``vs`` is sorted by version): exact copies are
    ``duplicate``; different documents claiming one version are all
    ``equal-version-conflict``, since nothing says which one is genuine."""
    kept: dict[int, Verdict] = {}
    conflicted: set[int] = set()
    for v in vs:
        assert v.doc is not None
        ver = v.doc.payload.version
        first = kept.get(ver)
        if ver in conflicted or (first is not None and first.doc is not None and first.doc.digest != v.doc.digest):
            conflict = EqualVersionConflict(f"{v.doc.describe()}: different documents in one batch claim this version")
            _reject(v, conflict)
            if first is not None:
                _reject(first, conflict)
                del kept[ver]
            conflicted.add(ver)
        elif first is not None:
            v.status = "duplicate"
        else:
            kept[ver] = v
    return list(kept.values())


def _verify_domain(
    domain: str,
    items: list[Verdict],
    view: DomainView,
    now: int,
    limits: Limits,
    out: Outcome,
    node_id: str | None = None,
) -> None:
    tol = limits.clock_tolerance
    by_type: dict[str, list[Verdict]] = {}
    for v in items:
        assert v.doc is not None
        by_type.setdefault(v.doc.type, []).append(v)
    for vs in by_type.values():
        vs.sort(key=lambda v: (v.doc.payload.version if v.doc else 0, v.index))
    # Roots are deduplicated before the chain walk; other types after their
    # signature check, so a forged copy cannot get a genuine document refused.
    by_type["root"] = _dedupe(by_type.get("root", []))

    # 1. Root rotation chain, one version at a time.
    root = view.root
    root_mark = Mark(root.payload.version, root.digest)
    steps: list[tuple[Verdict, Signed[Root]]] = []
    for v in by_type.get("root", []):
        doc: Signed[Any] = v.doc  # type: ignore[assignment]
        try:
            state = _check_version_signed(doc, root_mark, view.history, root.payload, "root")
            if state:
                v.status = state
                continue
            if doc.payload.version != root.payload.version + 1:
                raise ThresholdNotMet(
                    f"{doc.describe()} cannot be verified from held root v{root.payload.version}: "
                    "rotation is one version at a time; the missing versions are needed"
                )
            cache: dict[int, bool] = {}
            check_role(doc, root.payload, "root", cache)  # old threshold
            check_role(doc, doc.payload, "root", cache)  # new threshold
            _check_times(doc, now, tol, expiry=False)
            _check_suite_change(root.payload, doc.payload)
        except Rejected as exc:
            _reject(v, exc)
            continue
        steps.append((v, doc))
        root = doc
        root_mark = Mark(doc.payload.version, doc.digest)
        v.status = "history"
    # Expiry on the final root only (TUF 5.3.10): drop expired tails.
    while steps and now >= steps[-1][1].payload.expires:
        v, doc = steps.pop()
        _reject(v, Expired(f"{doc.describe()} expired at {doc.payload.expires}"))
        root = steps[-1][1] if steps else view.root
    if steps:
        steps[-1][0].status = "applied"
        out.marks[(domain, "root")] = Mark(root.payload.version, root.digest)
        for role, types in TYPES_OF_ROLE.items():
            if role != "root" and _role_changed(view.root.payload, root.payload, role):
                for t in types:
                    out.resets.add((domain, t))
    marks = {t: m for t, m in view.marks.items() if (domain, t) not in out.resets}
    history = {k: d for k, d in view.history.items() if (domain, k[0]) not in out.resets}

    # 2. Signatures, versions and times of the other documents.
    valid: dict[str, list[Verdict]] = {}
    for t in ("bundle", "policy", "freshness"):
        mark = marks.get(t)
        carried = mark is not None and any(
            v.doc is not None and v.doc.payload.version == mark.version and v.doc.digest == mark.digest
            for v in by_type.get(t, [])
        )
        candidates = []
        for v in by_type.get(t, []):
            doc = v.doc  # type: ignore[assignment]
            try:
                state = _check_version_signed(doc, mark, history, root.payload, ROLE_FOR_TYPE[t], carried=carried)
                if state:
                    v.status = state
                    continue
                check_role(doc, root.payload, ROLE_FOR_TYPE[t])
                _check_times(doc, now, tol, expiry=False)
            except Rejected as exc:
                _reject(v, exc)
                continue
            candidates.append(v)
        candidates = _dedupe(candidates)
        # The newest version is the one that would become current: it must not be
        # expired (older ones in the batch are only ever history).
        while t != "freshness" and candidates and now >= candidates[-1].doc.payload.expires:  # type: ignore[union-attr]
            top = candidates.pop()
            _reject(top, Expired(f"{top.doc.describe()} expired at {top.doc.payload.expires}"))  # type: ignore[union-attr]
        if candidates:
            valid[t] = candidates

    def usable(t: str, version: int) -> bool:
        m = marks.get(t)
        if m is not None and m.version == version:
            return True
        return any(
            v.doc is not None and v.doc.payload.version == version and now < v.doc.payload.expires
            for v in valid.get(t, [])
        )

    # 3. The freshness epoch: the newest valid freshness that names what we can hold.
    epoch: Freshness | None = None
    if view.freshness is not None and (domain, "freshness") not in out.resets:
        epoch = view.freshness.payload
    fresh = valid.get("freshness", [])
    chosen: Verdict | None = None
    for v in reversed(fresh):
        f: Freshness = v.doc.payload  # type: ignore[union-attr]
        try:
            if now >= f.expires:
                raise Expired(f"freshness v{f.version} expired at {f.expires}")
            if f.versions["root"] != root.payload.version:
                raise MixAndMatch(
                    f"freshness v{f.version} names root v{f.versions['root']}, the node holds v{root.payload.version}"
                )
            for t in ("bundle", "policy"):
                if not usable(t, f.versions[t]):
                    raise MixAndMatch(
                        f"freshness v{f.version} names {t} v{f.versions[t]}, which is neither held nor supplied"
                    )
        except Rejected as exc:
            _reject(v, exc)
            continue
        chosen = v
        epoch = f
        break
    for v in fresh:
        if v.status == "pending":
            v.status = "applied" if v is chosen else "history"
    if chosen is not None:
        assert chosen.doc is not None
        out.marks[(domain, "freshness")] = Mark(chosen.doc.payload.version, chosen.doc.digest)
        # Superseded freshness newer than the chosen one was rejected above, so
        # any remaining "history" freshness is older than the chosen epoch.

    # 4. Bundle and policy: only the versions the epoch names become current.
    for t in ("bundle", "policy"):
        for v in valid.get(t, []):
            doc = v.doc  # type: ignore[assignment]
            ver = doc.payload.version
            if epoch is None:
                _reject(v, MixAndMatch(f"{doc.describe()}: no freshness epoch names it"))
            elif ver > epoch.versions[t]:
                _reject(
                    v,
                    MixAndMatch(
                        f"{doc.describe()} is not named by freshness v{epoch.version} ({t} v{epoch.versions[t]})"
                    ),
                )
            elif ver < epoch.versions[t]:
                v.status = "history"
            elif now >= doc.payload.expires:
                _reject(v, Expired(f"{doc.describe()} expired at {doc.payload.expires}"))
            else:
                v.status = "applied"
                out.marks[(domain, t)] = Mark(ver, doc.digest)

    # 5. Delegations: only this node's own, by the pki threshold of the held root,
    # unexpired; not part of the freshness epoch (a delegation outlives many epochs).
    mark = marks.get("delegation")
    delegations = []
    for v in by_type.get("delegation", []):
        doc = v.doc  # type: ignore[assignment]
        try:
            if node_id is None or doc.payload.node_id != node_id:
                raise ScopeViolation(f"{doc.describe()} delegates node {doc.payload.node_id}, not this node")
            state = _check_version_signed(doc, mark, history, root.payload, "pki")
            if state:
                v.status = state
                continue
            check_role(doc, root.payload, "pki")
            _check_times(doc, now, tol)
        except Rejected as exc:
            _reject(v, exc)
            continue
        delegations.append(v)
    delegations = _dedupe(delegations)
    for i, v in enumerate(delegations):
        assert v.doc is not None
        v.status = "applied" if i == len(delegations) - 1 else "history"
        if v.status == "applied":
            out.marks[(domain, "delegation")] = Mark(v.doc.payload.version, v.doc.digest)
