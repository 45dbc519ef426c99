"""The trust core: pure verification of signed documents.

Input: document bytes, a reference time and the node's trusted state (held
roots, persisted high-water marks, the held freshness epoch, the trusted clock
mark).  Output: a verdict per document and the state changes to persist.  No
files, no sockets, no clock reads: the caller passes ``now`` once per
operation (TUF client workflow §5.1, "fix the reference time").

Shaped after python-tuf's ``TrustedMetadataSet``, which has one method per
step of the client workflow: :func:`verify_batch` parses the batch and groups
it by domain, and :class:`DomainBatch` walks one domain's documents through
one method per step, in this order (each step sees only what the steps before
it accepted):

1. :meth:`DomainBatch.update_roots` -- the root rotation chain (TUF 5.3.4 to 5.3.11);
2. :meth:`DomainBatch.check_signed` -- signatures, versions and times of the
   bundle, policy and freshness documents;
3. :meth:`DomainBatch.choose_epoch` -- the freshness epoch;
4. :meth:`DomainBatch.apply_epoch` -- the bundle and policy the epoch names;
5. :meth:`DomainBatch.update_delegations` -- this node's delegations.

Signatures are checked once, before the verdicts: :func:`verify_batch` hands
every signature it may need to one ``checker`` (by default a plain loop; a
node may spread the list over several cores), and the steps then decide every
verdict sequentially from those results, so verdicts never depend on how the
checks were scheduled.

Invariants enforced here (docs/architecture.md "Verification rules"):

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
   root whose content is a held link of the rotation chain:
   ``already-held``), the same content again is ``already-held``, equal
   version with other content is ``equal-version-conflict``.  A document is
   what its signers signed: "content" is the protected header and payload
   (:attr:`Signed.digest`), so a copy differing only in unsigned parts (an
   added signature or unprotected header) is the same document.
6. ``issued_at`` later than ``now`` + tolerance is ``not-yet-valid``;
   ``expires`` before ``now`` is ``expired`` for documents that would become
   current (superseded history versions in the same batch are kept unexpired
   or not: they are never used).
7. Mix-and-match: a bundle or policy becomes current only if the freshness
   epoch that is current after the batch names exactly its version; a
   freshness document is accepted only if it names the held root and versions
   that are held or arrive valid in the same batch.  The newest bundle or
   policy of a batch must not be expired.
8. One document per version: copies of one content in a batch are
   ``duplicate``; validly signed different documents claiming one version
   are all ``equal-version-conflict`` (nothing says which is genuine), while
   a forged copy is refused for its own fault and cannot block the genuine
   one: signatures are checked before duplicates are resolved, roots
   included.  Accepted documents are returned in their canonical envelope
   (the signatures that verified, :meth:`Signed.canonical`): that is what a
   node stores and relays.
9. Suites: every key of a root holds exactly its suite's algorithms, and a
   root rotation may not drop post-quantum signatures (``downgrade``).
10. Determinism: the verdicts are a function of the batch bytes, the state,
    ``now`` and the limits only -- never of the checker's scheduling.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qhx_edge.core.documents import (
    DELEGATION_TYPES,
    EPOCH_TYPES,
    OPTIONAL_EPOCH_TYPES,
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
from qhx_edge.core.suites import POST_QUANTUM, PublicKey, canonical_alg, suite_algs
from qhx_edge.core.suites import get as get_algorithm

DEFAULT_CLOCK_TOLERANCE = 300
MAX_BATCH = 10_000

# Which document types each role signs (for fast-forward recovery).
TYPES_OF_ROLE: dict[str, tuple[str, ...]] = {}
for _t, _r in ROLE_FOR_TYPE.items():
    TYPES_OF_ROLE.setdefault(_r, ())
    TYPES_OF_ROLE[_r] += (_t,)

# One signature to check: (COSE algorithm, raw public key, signature, message).
SignatureCheck = tuple[int, bytes, bytes, bytes]
# Checks a list of signatures and returns their validity, in order.  It must be
# a pure function of its input (any scheduling: a loop, threads, processes).
Checker = Callable[[Sequence[SignatureCheck]], Sequence[bool]]


def check_signatures(checks: Sequence[SignatureCheck]) -> list[bool]:
    """The default :data:`Checker`: each signature in turn, on this thread."""
    return [get_algorithm(alg).verify(public, sig, msg) for alg, public, sig, msg in checks]


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
    # (type, version) -> digest of held documents.  A rule only ever asks whether a
    # batch document's exact bytes are held, so a caller may give just the entries
    # whose digest is among the batch's (the node store does, for a pack).
    history: Mapping[tuple[str, int], bytes] = field(default_factory=dict)
    # type -> ``expires`` of the held current bundle and policy (the root's is in ``root``): a
    # freshness naming a held document that has expired is ``expired`` (TUF 5.3.10, freeze attacks).
    expires: Mapping[str, int] = field(default_factory=dict)
    # What a freshness of this domain must find held or supplied besides the root (mix-and-match): a
    # partner domain releases its bundle, rarely its policy (core/agreements.py).
    # A type the freshness does not name (a revocation, before the domain revoked anything) is skipped.
    epoch_types: tuple[str, ...] = ("bundle", "policy", "revocation")


@dataclass(frozen=True)
class TrustState:
    domains: Mapping[str, DomainView]
    clock_high_water: int = 0
    node_id: str | None = None  # the node whose delegations this state may accept
    card_fingerprint: str | None = None  # ... and the card they must name (its own, not another claiming its id)


@dataclass(frozen=True)
class Limits:
    clock_tolerance: int = DEFAULT_CLOCK_TOLERANCE
    max_batch: int = MAX_BATCH


@dataclass
class Verdict:
    index: int
    status: str  # applied | history | already-held | duplicate | not-mine | rejected
    doc: Signed[Any] | None = None
    error: Rejected | None = None
    # Validity of this document's signatures by index, as far as checked (under
    # the key each signature's kid names; a key id names exactly one key).
    checked: dict[int, bool] = field(default_factory=dict, repr=False, compare=False)

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


def check_observed(now: int, observed: int, tolerance: int = DEFAULT_CLOCK_TOLERANCE) -> None:
    """Raise :class:`ClockRollback` if ``now`` is behind the latest time the node itself observed.

    Trusted time (:func:`check_clock`) only moves with verified documents; a
    clock set back after the node went ``expired`` would otherwise issue
    full-TTL SVIDs again.  Issuance checks both marks.
    """
    if now < observed - tolerance:
        raise ClockRollback(
            f"node clock {now} is {observed - now} s behind the latest time this node observed ({observed}; "
            f"tolerance {tolerance} s): the clock was set back; nothing is issued until it is fixed or a fresh "
            "pack re-anchors the node's time"
        )


# --- signatures and thresholds ----------------------------------------------------


def satisfied_keys(
    doc: Signed[Any], keys: Mapping[str, Any], cache: dict[int, bool] | None = None
) -> tuple[set[str], int]:
    """Key ids of ``keys`` whose every algorithm validly signed ``doc``.

    Returns the satisfied key ids and the number of signatures by those keys
    that failed cryptographic verification.  Distinct key ids only: a key that
    signs twice, or is listed twice, still counts once.  ``cache`` maps a
    signature's index to its validity under the key its kid names (a key id
    names exactly one key: :class:`~qhx_edge.core.documents.Root` checks it).
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
    foreign, _ = satisfied_keys(doc, others, cache)
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
    v: Verdict,
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
    assert v.doc is not None
    try:
        return _check_version(v.doc, mark, history, carried=carried)
    except EqualVersionConflict:
        check_role(v.doc, root, role, v.checked)
        raise


def _check_suite_change(old: Root, new: Root) -> None:
    """A root rotation must not drop post-quantum signatures (hybrid/pq -> classical)."""
    had_pq = bool(set(suite_algs(old.suite)) & POST_QUANTUM)
    if had_pq and not set(suite_algs(new.suite)) & POST_QUANTUM:
        raise Downgrade(f"root v{new.version} moves the domain from suite {old.suite} to {new.suite}")


def _role_changed(old: Root, new: Root, role: str) -> bool:
    a, b = old.roles[role], new.roles[role]
    return a.threshold != b.threshold or set(a.keyids) != set(b.keyids)


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


# --- batches ------------------------------------------------------------------


def verify_batch(
    docs: Sequence[bytes],
    state: TrustState,
    now: int,
    limits: Limits = Limits(),
    *,
    parsed: Sequence[Signed[Any] | Rejected] | None = None,
    checker: Checker = check_signatures,
) -> Outcome:
    """Verify a batch of documents (a pack) against ``state`` at time ``now``.

    ``parsed``: :func:`parse_batch` of ``docs``, when the caller has parsed them already.
    Accepted documents come back in their canonical envelope (:meth:`Signed.canonical`).
    ``checker``: how the batch's signatures are checked (see :data:`Checker`);
    it changes how long verification takes, never a verdict.
    """
    check_clock(now, state.clock_high_water, limits.clock_tolerance)
    items = parse_batch(docs, limits) if parsed is None else parsed
    if parsed is not None and len(parsed) != len(docs):
        raise ValueError("one parsed item per document")
    verdicts: list[Verdict] = []
    by_domain: dict[str, list[Verdict]] = {}
    for i, doc in enumerate(items):
        if isinstance(doc, Rejected):
            verdicts.append(Verdict(i, "rejected", None, doc))
            continue
        v = Verdict(i, "pending", doc)
        verdicts.append(v)
        if doc.payload.domain not in state.domains:
            v.status, v.error = (
                "rejected",
                UnknownDomain(f"{doc.describe()}: this node does not trust {doc.payload.domain}"),
            )
            continue
        if doc.type not in (*EPOCH_TYPES, *OPTIONAL_EPOCH_TYPES, "freshness", *DELEGATION_TYPES):
            v.status, v.error = "rejected", Malformed(f"{doc.type} documents are not accepted in this batch")
            continue
        by_domain.setdefault(doc.payload.domain, []).append(v)

    outcome = Outcome(verdicts, clock_high_water=state.clock_high_water)
    batches = [
        DomainBatch(domain, items, state.domains[domain], now, limits, outcome, state.node_id, state.card_fingerprint)
        for domain, items in by_domain.items()
    ]
    _prefetch_signatures(batches, checker)
    for batch in batches:
        batch.verify()
    for v in verdicts:
        if v.status in ("applied", "history") and v.doc is not None:
            outcome.clock_high_water = max(outcome.clock_high_water, v.doc.payload.issued_at)
            # What is stored and relayed: the signatures that verified, in the canonical envelope.
            v.doc = v.doc.canonical(sorted(i for i, ok in v.checked.items() if ok))
    return outcome


def parse_batch(docs: Sequence[bytes], limits: Limits = Limits()) -> list[Signed[Any] | Rejected]:
    """Each document of a batch parsed (no signature checked), or the error that refused it.

    A caller may parse first to learn the batch's :attr:`Signed.digest` values
    (to read only the history they can match), then pass the result to
    :func:`verify_batch` as ``parsed``.
    """
    if len(docs) > limits.max_batch:
        raise Oversize(f"{len(docs)} documents exceed the cap of {limits.max_batch}")
    out: list[Signed[Any] | Rejected] = []
    for raw in docs:
        try:
            out.append(parse(raw))
        except Rejected as exc:
            out.append(exc)
    return out


def _prefetch_signatures(batches: Sequence[DomainBatch], checker: Checker) -> None:
    """Check, in one call of ``checker``, every signature the steps will ask about.

    For each document that may need its signatures (newer than its type's mark,
    or a root newer than the held one; a delegation for this node), each
    signature whose kid names a key of the role owning the document's type, in
    the held root or a root of the batch.  The results fill each verdict's
    ``checked``; a signature not prefetched is checked when a step asks.
    """
    checks: list[SignatureCheck] = []
    slots: list[tuple[Verdict, int]] = []
    for batch in batches:
        keys = batch.role_key_index()
        for v in batch.items:
            if not batch.may_need_signatures(v):
                continue
            assert v.doc is not None
            env = v.doc.envelope
            role_keys = keys.get(ROLE_FOR_TYPE[v.doc.type], {})
            for i, sig in enumerate(env.signatures):
                key = role_keys.get(sig.kid)
                if key is None:
                    continue
                alg = canonical_alg(sig.alg)
                for part_alg, raw in key.parts:
                    if part_alg == alg:
                        checks.append((alg, raw, sig.signature, env.to_be_signed(sig.protected)))
                        slots.append((v, i))
                        break
    if not checks:
        return
    results = checker(checks)
    if len(results) != len(checks):
        raise ValueError("the checker must return one result per signature")
    for (v, i), ok in zip(slots, results, strict=True):
        v.checked[i] = bool(ok)


class DomainBatch:
    """One domain's documents of a batch, verified one workflow step per method.

    Like python-tuf's ``TrustedMetadataSet``: the state a step establishes
    (the final root, the marks left after fast-forward resets, the documents
    still valid, the chosen epoch) is what the next step starts from.
    """

    def __init__(
        self,
        domain: str,
        items: list[Verdict],
        view: DomainView,
        now: int,
        limits: Limits,
        out: Outcome,
        node_id: str | None = None,
        card_fingerprint: str | None = None,
    ) -> None:
        self.domain = domain
        self.items = items
        self.view = view
        self.now = now
        self.tolerance = limits.clock_tolerance
        self.out = out
        self.node_id = node_id
        self.card_fingerprint = card_fingerprint
        by_type: dict[str, list[Verdict]] = {}
        for v in items:
            assert v.doc is not None
            by_type.setdefault(v.doc.type, []).append(v)
        for vs in by_type.values():
            vs.sort(key=lambda v: (v.doc.payload.version if v.doc else 0, v.index))
        self.by_type = by_type
        # Set by the steps, in order.
        self.root: Signed[Root] = view.root
        self.marks: dict[str, Mark] = dict(view.marks)
        self.history: dict[tuple[str, int], bytes] = dict(view.history)
        self.valid: dict[str, list[Verdict]] = {}
        self.expired: dict[tuple[str, int], int] = {}  # (type, version) refused as expired -> its expires
        self.epoch: Freshness | None = None

    # --- signatures ---------------------------------------------------------------

    def role_key_index(self) -> dict[str, dict[bytes, PublicKey]]:
        """Role -> raw key id -> key, over the held root and every root in the batch.

        A key id is the SHA-256 of its key, so whichever root lists it names the
        same key; which root's thresholds count is decided by the steps.
        """
        index: dict[str, dict[bytes, PublicKey]] = {}
        roots = [self.view.root.payload] + [v.doc.payload for v in self.by_type.get("root", []) if v.doc is not None]
        for root in roots:
            for role, spec in root.roles.items():
                keys = index.setdefault(role, {})
                for keyid in spec.keyids:
                    keys.setdefault(bytes.fromhex(keyid), root.keys[keyid])
        return index

    def may_need_signatures(self, v: Verdict) -> bool:
        """Whether a step may check ``v``'s signatures (the rest are held, rollbacks or out of scope)."""
        doc = v.doc
        assert doc is not None
        if doc.type == "root":
            return bool(doc.payload.version > self.view.root.payload.version)
        if doc.type in DELEGATION_TYPES and not self._delegates_me(doc):
            return False
        mark = self.view.marks.get(doc.type)
        return mark is None or doc.payload.version > mark.version

    def check_role(self, v: Verdict, root: Root, role: str) -> None:
        assert v.doc is not None
        check_role(v.doc, root, role, v.checked)

    # --- the steps ----------------------------------------------------------------

    def verify(self) -> None:
        """Every step, in the order of the client workflow."""
        self.update_roots()
        self.check_signed()
        self.choose_epoch()
        self.apply_epoch()
        self.update_delegations()

    def update_roots(self) -> None:
        """Step 1: the root rotation chain, one version at a time (TUF 5.3.4).

        Roots are deduplicated before the walk (a root is checked against the
        one before it, so copies must not branch the chain).  Root N+1 needs
        the root thresholds of N and N+1, must not be issued in the future,
        and must not drop post-quantum signatures; expiry is checked on the
        final root only (TUF 5.3.10), dropping expired tails.  When the final
        root changes a role's keys or threshold, the marks and history of the
        types that role signs are reset (TUF 5.3.11).
        """
        view, now = self.view, self.now
        root = view.root
        root_mark = Mark(root.payload.version, root.digest)
        steps: list[tuple[Verdict, Signed[Root]]] = []
        by_version: dict[int, list[Verdict]] = {}
        for v in self.by_type.get("root", []):
            by_version.setdefault(v.doc.payload.version if v.doc else 0, []).append(v)
        for version in sorted(by_version):
            # Every copy of a version is checked against the chain first; only copies that
            # verify are then deduplicated, so a forged copy never blocks the genuine one.
            passed = []
            for v in by_version[version]:
                doc: Signed[Any] = v.doc  # type: ignore[assignment]
                try:
                    state = _check_version_signed(v, root_mark, view.history, root.payload, "root")
                    if state:
                        v.status = state
                        continue
                    if version != root.payload.version + 1:
                        raise ThresholdNotMet(
                            f"{doc.describe()} cannot be verified from held root v{root.payload.version}: "
                            "rotation is one version at a time; the missing versions are needed"
                        )
                    self.check_role(v, root.payload, "root")  # old threshold
                    self.check_role(v, doc.payload, "root")  # new threshold
                    _check_times(doc, now, self.tolerance, expiry=False)
                    _check_suite_change(root.payload, doc.payload)
                except Rejected as exc:
                    _reject(v, exc)
                    continue
                passed.append(v)
            for v in _dedupe(passed):
                assert v.doc is not None
                steps.append((v, v.doc))
                root = v.doc
                root_mark = Mark(root.payload.version, root.digest)
                v.status = "history"
        while steps and now >= steps[-1][1].payload.expires:
            v, doc = steps.pop()
            _reject(v, Expired(f"{doc.describe()} expired at {doc.payload.expires}"))
            root = steps[-1][1] if steps else view.root
        self.root = root
        if steps:
            steps[-1][0].status = "applied"
            self.out.marks[(self.domain, "root")] = Mark(root.payload.version, root.digest)
            for role, types in TYPES_OF_ROLE.items():
                if role != "root" and _role_changed(view.root.payload, root.payload, role):
                    for t in types:
                        self.out.resets.add((self.domain, t))
        resets = self.out.resets
        self.marks = {t: m for t, m in view.marks.items() if (self.domain, t) not in resets}
        self.history = {k: d for k, d in view.history.items() if (self.domain, k[0]) not in resets}

    def check_signed(self) -> None:
        """Step 2: signatures, versions and times of the bundle, policy and freshness documents.

        Each must be newer than its type's mark (or held: ``already-held``),
        carry a threshold of its role's signatures in the final root, and not
        be issued in the future.  Copies are deduplicated after the signature
        check, so a forged copy cannot get a genuine document refused.  The
        newest bundle or policy is the one that would become current, so it
        must not be expired (older ones in the batch are only ever history).
        """
        root, now = self.root.payload, self.now
        for t in ("bundle", "policy", "revocation", "freshness"):
            mark = self.marks.get(t)
            role = ROLE_FOR_TYPE[t]
            vs = self.by_type.get(t, [])
            carried = mark is not None and any(
                v.doc is not None and v.doc.payload.version == mark.version and v.doc.digest == mark.digest for v in vs
            )
            candidates = []
            for v in vs:
                doc: Signed[Any] = v.doc  # type: ignore[assignment]
                try:
                    state = _check_version_signed(v, mark, self.history, root, role, carried=carried)
                    if state:
                        v.status = state
                        continue
                    self._check_root_unexpired(doc)
                    self.check_role(v, root, role)
                    _check_times(doc, now, self.tolerance, expiry=False)
                except Rejected as exc:
                    _reject(v, exc)
                    continue
                candidates.append(v)
            candidates = _dedupe(candidates)
            while t != "freshness" and candidates and now >= candidates[-1].doc.payload.expires:  # type: ignore[union-attr]
                top = candidates.pop()
                self.expired[(t, top.doc.payload.version)] = top.doc.payload.expires  # type: ignore[union-attr]
                _reject(top, Expired(f"{top.doc.describe()} expired at {top.doc.payload.expires}"))  # type: ignore[union-attr]
            if candidates:
                self.valid[t] = candidates

    def _check_root_unexpired(self, doc: Signed[Any]) -> None:
        """Nothing new is combined with an expired root (TUF 5.3.10): only a newer root, which the
        expired one may still authorise (step 1), lets the domain move again."""
        root = self.root.payload
        if self.now >= root.expires:
            raise Expired(
                f"{doc.describe()}: the held root v{root.version} expired at {root.expires}; "
                "a newer root must come first"
            )

    def _check_unexpired(self, t: str, version: int, f: Freshness) -> None:
        """A freshness naming an expired bundle or policy (held, or refused as expired in this batch)."""
        m = self.marks.get(t)
        end = self.view.expires.get(t) if m is not None and m.version == version else None
        end = self.expired.get((t, version), end)
        if end is not None and self.now >= end:
            raise Expired(f"freshness v{f.version} names {t} v{version}, which expired at {end}")

    def _usable(self, t: str, version: int) -> bool:
        """Whether ``version`` of ``t`` is held or arrives valid and unexpired in this batch."""
        m = self.marks.get(t)
        if m is not None and m.version == version:
            return True
        return any(
            v.doc is not None and v.doc.payload.version == version and self.now < v.doc.payload.expires
            for v in self.valid.get(t, [])
        )

    def choose_epoch(self) -> None:
        """Step 3: the freshness epoch -- the newest valid freshness that names what the node can hold.

        It must be unexpired and name the final root and bundle and policy
        versions that are held or valid in this batch (mix-and-match); newer
        freshness documents that fail are rejected, older valid ones are history.
        Without a new one, the held epoch stays (unless its role was reset).
        """
        now = self.now
        if self.view.freshness is not None and (self.domain, "freshness") not in self.out.resets:
            self.epoch = self.view.freshness.payload
        fresh = self.valid.get("freshness", [])
        chosen: Verdict | None = None
        root_version = self.root.payload.version
        for v in reversed(fresh):
            f: Freshness = v.doc.payload  # type: ignore[union-attr]
            try:
                if now >= f.expires:
                    raise Expired(f"freshness v{f.version} expired at {f.expires}")
                if f.versions["root"] != root_version:
                    raise MixAndMatch(
                        f"freshness v{f.version} names root v{f.versions['root']}, the node holds v{root_version}"
                    )
                for t in self.view.epoch_types:
                    if t not in f.versions:
                        continue
                    self._check_unexpired(t, f.versions[t], f)
                    if not self._usable(t, f.versions[t]):
                        raise MixAndMatch(
                            f"freshness v{f.version} names {t} v{f.versions[t]}, which is neither held nor supplied"
                        )
            except Rejected as exc:
                _reject(v, exc)
                continue
            chosen = v
            self.epoch = f
            break
        for v in fresh:
            if v.status == "pending":
                v.status = "applied" if v is chosen else "history"
        if chosen is not None:
            assert chosen.doc is not None
            self.out.marks[(self.domain, "freshness")] = Mark(chosen.doc.payload.version, chosen.doc.digest)

    def apply_epoch(self) -> None:
        """Step 4: bundle and policy -- only the versions the epoch names become current.

        A newer version than the epoch names, or any without an epoch, is
        ``mix-and-match``; an older one is history; the named one must be unexpired.
        """
        epoch, now = self.epoch, self.now
        for t in ("bundle", "policy", "revocation"):
            for v in self.valid.get(t, []):
                doc: Signed[Any] = v.doc  # type: ignore[assignment]
                ver = doc.payload.version
                if epoch is None or t not in epoch.versions:
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
                    self.out.marks[(self.domain, t)] = Mark(ver, doc.digest)

    def _delegates_me(self, doc: Signed[Any]) -> bool:
        """Whether a delegation names this node and this node's own card (not another claiming its id)."""
        if self.node_id is None or doc.payload.node_id != self.node_id:
            return False
        return self.card_fingerprint is None or doc.payload.card_fingerprint == self.card_fingerprint

    def update_delegations(self) -> None:
        """Step 5 for each type of :data:`DELEGATION_TYPES`."""
        for kind in DELEGATION_TYPES:
            self._update_delegations(kind, ROLE_FOR_TYPE[kind])

    def _update_delegations(self, kind: str, role: str) -> None:
        """Step 5: delegations (``delegation`` by the pki role, ``notary`` by the notary role) -- only this
        node's own, by the role's threshold of the final root, unexpired.

        Not part of the freshness epoch (a delegation outlives many epochs);
        the newest valid one becomes current, older ones are history.  Another
        node's delegation is ``not-mine``: neither checked nor stored nor an
        error (packs carry every node's, so a rotated pki role reaches all).
        One naming this node's id but another card is ``scope-violation``.
        """
        root, mark = self.root.payload, self.marks.get(kind)
        delegations = []
        for v in self.by_type.get(kind, []):
            doc: Signed[Any] = v.doc  # type: ignore[assignment]
            if self.node_id is not None and doc.payload.node_id != self.node_id:
                # Another node's delegation, relayed beside ours (an authority's export carries every
                # node's current one): not ours to judge or store, and no fault of the pack.
                v.status = "not-mine"
                continue
            try:
                if self.node_id is None:
                    raise ScopeViolation(
                        f"{doc.describe()} delegates node {doc.payload.node_id}; this state has no node"
                    )
                if not self._delegates_me(doc):
                    raise ScopeViolation(f"{doc.describe()} delegates another card claiming this node's id")
                state = _check_version_signed(v, mark, self.history, root, role)
                if state:
                    v.status = state
                    continue
                self._check_root_unexpired(doc)
                self.check_role(v, root, role)
                _check_times(doc, self.now, self.tolerance)
            except Rejected as exc:
                _reject(v, exc)
                continue
            delegations.append(v)
        delegations = _dedupe(delegations)
        for i, v in enumerate(delegations):
            assert v.doc is not None
            v.status = "applied" if i == len(delegations) - 1 else "history"
            if v.status == "applied":
                self.out.marks[(self.domain, kind)] = Mark(v.doc.payload.version, v.doc.digest)
