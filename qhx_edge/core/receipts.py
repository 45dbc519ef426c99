"""Notary receipts, the receipt log's tree heads, and their offline verification (docs/architecture.md,
"Notary").

A node's notary (``tunnel inbound --notary``) records each HTTP exchange it carries as a **receipt**:
who called whom (both SPIFFE IDs and the SHA-256 of each certificate of both chains), when, and at the
levels that say so (:data:`LEVELS`, set per route by the policy: :mod:`qhx_edge.core.authz`), the
method, target, status and the digests of the request and the response (:func:`message_digest`),
with the bundle and revocation versions the chains were verified against.

Receipts are the leaves of the node's append-only log (RFC 9162 §2.1, :mod:`qhx_edge.core.merkle`).
The node signs **tree heads** (size, root hash, time) with its card's key, which the domain's notary
role delegates to it (the ``notary`` document); at ``sign-request`` each receipt is also signed on its
own before the response is released.  A **receipt file** (``receipt export``) carries the receipt, its
inclusion proof against a signed tree head, the node's card and notary delegation and the certificates,
so :func:`verify` needs nothing but the bundle history (:class:`History`): no network, and no
credential that is still valid.  Like an RFC 3161 token it is checked at its own time: every signature
must have been made while the delegation held and before any revocation of the notary key, and each
chain must have been valid at the receipt's time under the bundle version it names, with no revocation
that names one of its CAs from before that time.

Pure: bytes and trust state in, a report out; no clock, no file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qhx_edge.core import cbor, cose, merkle, svid
from qhx_edge.core.authz import LEVELS
from qhx_edge.core.cards import Card, parse_card
from qhx_edge.core.documents import Bundle, NotaryDelegation, Revocation, Root, Signed, parse
from qhx_edge.core.errors import BadSignature, Expired, Malformed, MissingHistory, Oversize, QhxError, Revoked
from qhx_edge.core.spiffe import check_trust_domain, parse_spiffe_id, trust_domain_of
from qhx_edge.core.suites import PrivateKey, PublicKey
from qhx_edge.core.trust import check_role

RECEIPT_CONTENT_TYPE = "application/qhx-edge-receipt+cbor"
TREE_HEAD_CONTENT_TYPE = "application/qhx-edge-tree-head+cbor"
FILE_FORMAT = "qhx-edge-receipt"
FILE_VERSION = 1
MAX_RECEIPT = 16 << 10  # one receipt's payload
MAX_HEAD = 16 << 10  # a signed tree head (a hybrid signature is ~3.4 kB)
MAX_FILE = 1 << 20  # a receipt file: the receipt, a head, a proof, a card, a delegation, two chains
MAX_TARGET = 2048
MAX_CERTS = 8
CLOCK_TOLERANCE = 300  # a tree head may be stamped this much before the receipt it covers (clock skew)


@dataclass(frozen=True)
class Party:
    """One end of an exchange: its SPIFFE ID and the SHA-256 of each certificate it presented, leaf first."""

    spiffe_id: str
    certs: tuple[bytes, ...]

    @classmethod
    def of_chain(cls, spiffe_id: str, chain: Sequence[bytes]) -> Party:
        return cls(spiffe_id, tuple(hashlib.sha256(c).digest() for c in chain))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.spiffe_id, "certs": list(self.certs)}

    @classmethod
    def from_dict(cls, d: Any, what: str) -> Party:
        if not isinstance(d, dict) or set(d) != {"id", "certs"}:
            raise Malformed(f"the receipt's {what} is a map of id and certs")
        parse_spiffe_id(d["id"])
        certs = d["certs"]
        if not isinstance(certs, list) or not 1 <= len(certs) <= MAX_CERTS:
            raise Malformed(f"the receipt's {what} names 1 to {MAX_CERTS} certificates")
        if not all(isinstance(c, bytes) and len(c) == 32 for c in certs):
            raise Malformed(f"the receipt's {what} names certificates by SHA-256")
        return cls(d["id"], tuple(certs))


@dataclass(frozen=True)
class Receipt:
    """One exchange the notary carried (a leaf of its log)."""

    domain: str
    node_id: str
    seq: int  # its index in the node's log (0-based, as RFC 9162 numbers leaves)
    at: int  # when the response ended (Unix seconds, the node's clock)
    level: str
    caller: Party
    callee: Party
    versions: Mapping[str, Mapping[str, int]]  # domain -> {"bundle" | "spiffe": N, "revocation": M}
    method: str | None = None  # log-request and sign-request only
    target: str | None = None
    status: int | None = None
    request: bytes | None = None  # message_digest of the request, log-request and sign-request only
    response: bytes | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "receipt",
            "domain": self.domain,
            "node_id": self.node_id,
            "seq": self.seq,
            "at": self.at,
            "level": self.level,
            "caller": self.caller.to_dict(),
            "callee": self.callee.to_dict(),
            "versions": {d: dict(v) for d, v in self.versions.items()},
        }
        if self.level != "workload-only":
            out.update(method=self.method, target=self.target, status=self.status, request=self.request,
                       response=self.response)  # fmt: skip
        return out

    def to_bytes(self) -> bytes:
        return cbor.encode(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> Receipt:
        if len(data) > MAX_RECEIPT:
            raise Oversize(f"a receipt is at most {MAX_RECEIPT} bytes")
        d = cbor.decode(data, max_size=MAX_RECEIPT)
        base = {"type", "domain", "node_id", "seq", "at", "level", "caller", "callee", "versions"}
        http = {"method", "target", "status", "request", "response"}
        if not isinstance(d, dict) or d.get("type") != "receipt":
            raise Malformed("not a receipt")
        level = d.get("level")
        if level not in LEVELS:
            raise Malformed(f"a receipt's level is one of {', '.join(LEVELS)}")
        if set(d) != (base if level == "workload-only" else base | http):
            raise Malformed(
                f"a {level} receipt has exactly the fields {sorted(base if level == 'workload-only' else base | http)}"
            )
        for name in ("seq", "at"):
            if not isinstance(d[name], int) or isinstance(d[name], bool) or d[name] < 0:
                raise Malformed(f"a receipt's {name} is a count")
        if not isinstance(d["node_id"], str) or not 1 <= len(d["node_id"]) <= 64:
            raise Malformed("a receipt's node_id is a short text")
        versions = d["versions"]
        if not isinstance(versions, dict) or not 1 <= len(versions) <= 2:
            raise Malformed("a receipt names the versions of one or two domains")
        for dom, v in versions.items():
            check_trust_domain(dom)
            if (
                not isinstance(v, dict)
                or len([k for k in v if k in ("bundle", "spiffe")]) != 1
                or set(v) - {"bundle", "spiffe", "revocation"}
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v.values())
            ):
                raise Malformed("a receipt's versions map a domain to its bundle (or spiffe) and revocation versions")
        out = cls(
            domain=check_trust_domain(d["domain"]),
            node_id=d["node_id"],
            seq=d["seq"],
            at=d["at"],
            level=level,
            caller=Party.from_dict(d["caller"], "caller"),
            callee=Party.from_dict(d["callee"], "callee"),
            versions={k: dict(v) for k, v in versions.items()},
        )
        if level == "workload-only":
            return out
        if not isinstance(d["method"], str) or not 1 <= len(d["method"]) <= 32:
            raise Malformed("a receipt's method is a short text")
        if not isinstance(d["target"], str) or len(d["target"]) > MAX_TARGET:
            raise Malformed(f"a receipt's target is a text of at most {MAX_TARGET} characters")
        if not isinstance(d["status"], int) or isinstance(d["status"], bool) or not 100 <= d["status"] <= 999:
            raise Malformed("a receipt's status is an HTTP status code")
        for name in ("request", "response"):
            if not isinstance(d[name], bytes) or len(d[name]) != 32:
                raise Malformed(f"a receipt's {name} is a SHA-256 digest")
        return cls(**{**out.__dict__, "method": d["method"], "target": d["target"], "status": d["status"],
                      "request": d["request"], "response": d["response"]})  # fmt: skip


def message_digest(
    start: Sequence[str | int],
    headers: Iterable[tuple[bytes, bytes]],
    body_digest: bytes,
    trailers: Iterable[tuple[bytes, bytes]] = (),
) -> bytes:
    """What a receipt's ``request`` / ``response`` digest covers, as a client can compute it: SHA-256 of the
    deterministic CBOR of ``[start line, [[name, value], ...], SHA-256 of the body, [[name, value], ...]]``,
    where the start line is ``[method, target]`` or ``[status]``, header and trailer names are lowercase and
    in the order sent, values as sent, and the body is the message's content after any chunked transfer
    coding is removed (the trailers are those of a chunked body; chunk extensions are not covered)."""
    fields = [[bytes(n).lower(), bytes(v)] for n, v in headers]
    after = [[bytes(n).lower(), bytes(v)] for n, v in trailers]
    return hashlib.sha256(cbor.encode([list(start), fields, body_digest, after])).digest()


@dataclass(frozen=True)
class TreeHead:
    """A signed statement of the node's log: its first ``size`` receipts hash to ``root`` (RFC 9162 §2.1)."""

    domain: str
    node_id: str
    size: int
    root: bytes
    at: int

    def to_dict(self) -> dict[str, Any]:
        return {"type": "tree-head", "domain": self.domain, "node_id": self.node_id, "size": self.size,
                "root": self.root, "at": self.at}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Any) -> TreeHead:
        if not isinstance(d, dict) or set(d) != {"type", "domain", "node_id", "size", "root", "at"}:
            raise Malformed("a tree head is a map of type, domain, node_id, size, root and at")
        if not isinstance(d["root"], bytes) or len(d["root"]) != merkle.HASH_SIZE:
            raise Malformed("a tree head's root is a SHA-256 hash")
        for name in ("size", "at"):
            if not isinstance(d[name], int) or isinstance(d[name], bool) or d[name] < 0:
                raise Malformed(f"a tree head's {name} is a count")
        if not isinstance(d["node_id"], str) or not 1 <= len(d["node_id"]) <= 64:
            raise Malformed("a tree head's node_id is a short text")
        return cls(check_trust_domain(d["domain"]), d["node_id"], d["size"], d["root"], d["at"])


def sign_tree_head(head: TreeHead, key: PrivateKey) -> bytes:
    return cose.sign(cbor.encode(head.to_dict()), [key], content_type=TREE_HEAD_CONTENT_TYPE)


def parse_tree_head(data: bytes, key: PublicKey) -> TreeHead:
    """A tree head signed by every algorithm of ``key``; ``bad-signature`` otherwise."""
    msg = cose.parse_signed(data, content_type=TREE_HEAD_CONTENT_TYPE, max_size=MAX_HEAD, what="receipt log tree head",
                            types=frozenset({"tree-head"}), signer=key)  # fmt: skip
    return TreeHead.from_dict(msg.body)


def sign_receipt(receipt_bytes: bytes, key: PrivateKey) -> bytes:
    return cose.sign(receipt_bytes, [key], content_type=RECEIPT_CONTENT_TYPE)


@dataclass(frozen=True)
class ReceiptFile:
    """What ``receipt export`` writes: everything :func:`verify` needs besides the bundle history."""

    receipt: bytes  # the receipt's deterministic CBOR: the leaf
    signature: bytes | None  # its own COSE_Sign (sign-request)
    tree_head: bytes
    proof: tuple[bytes, ...]  # inclusion of the leaf in the tree head
    card: bytes
    notary: bytes  # the notary delegation (a signed document)
    certs: tuple[bytes, ...]  # the DER certificates the receipt names

    def to_bytes(self) -> bytes:
        return cbor.encode({
            "format": FILE_FORMAT, "version": FILE_VERSION, "receipt": self.receipt, "signature": self.signature,
            "tree_head": self.tree_head, "proof": list(self.proof), "card": self.card, "notary": self.notary,
            "certs": list(self.certs),
        })  # fmt: skip

    @classmethod
    def from_bytes(cls, data: bytes) -> ReceiptFile:
        if len(data) > MAX_FILE:
            raise Oversize(f"a receipt file is at most {MAX_FILE} bytes")
        d = cbor.decode(data, max_size=MAX_FILE)
        keys = {"format", "version", "receipt", "signature", "tree_head", "proof", "card", "notary", "certs"}
        if not isinstance(d, dict) or d.get("format") != FILE_FORMAT:
            raise Malformed("not a qhx-edge receipt file")
        if d.get("version") != FILE_VERSION or set(d) != keys:
            raise Malformed(f"a receipt file of version {FILE_VERSION} has exactly the fields {sorted(keys)}")
        if not all(isinstance(d[k], bytes) for k in ("receipt", "tree_head", "card", "notary")):
            raise Malformed("a receipt file's receipt, tree_head, card and notary are byte strings")
        if d["signature"] is not None and not isinstance(d["signature"], bytes):
            raise Malformed("a receipt file's signature is a byte string or null")
        proof, certs = d["proof"], d["certs"]
        if not isinstance(proof, list) or len(proof) > merkle.MAX_PROOF or not all(isinstance(h, bytes) for h in proof):
            raise Malformed(f"a receipt file's proof lists at most {merkle.MAX_PROOF} hashes")
        if not isinstance(certs, list) or len(certs) > 2 * MAX_CERTS or not all(isinstance(c, bytes) for c in certs):
            raise Malformed(f"a receipt file carries at most {2 * MAX_CERTS} certificates")
        return cls(d["receipt"], d["signature"], d["tree_head"], tuple(proof), d["card"], d["notary"], tuple(certs))


# --- the bundle history ---------------------------------------------------------------------------


@dataclass
class DomainHistory:
    """One domain's verified documents: its root chain (from a trusted root up), bundles and revocations
    by version, each checked against the root that was current when it was issued, and how long that
    root's keys for the role stayed trusted (``until``: the next root that changed them, or None)."""

    domain: str
    roots: list[Signed[Root]] = field(default_factory=list)
    bundles: dict[int, tuple[Signed[Bundle], int | None]] = field(default_factory=dict)
    revocations: list[Signed[Revocation]] = field(default_factory=list)

    def root_at(self, t: int) -> Signed[Root]:
        """The newest root of the chain issued at or before ``t`` (the oldest, if ``t`` precedes them all)."""
        best = self.roots[0]
        for r in self.roots:
            if r.payload.issued_at <= t:
                best = r
        return best

    def check(self, doc: Signed[Any], role: str) -> tuple[Signed[Root], int | None]:
        """The root whose ``role`` threshold signed ``doc`` (the one current at its issue time), and the time
        that root's keys for the role stopped being trusted: the issue time of the first later root that
        changed them.  A key rotated out proves nothing it signs for a time after its rotation, whatever
        issue time it writes (a backdated document)."""
        root = self.root_at(doc.payload.issued_at)
        check_role(doc, root.payload, role)
        spec = root.payload.roles[role]
        for later in self.roots:
            if later.payload.version > root.payload.version:
                other = later.payload.roles.get(role)
                if other is None or set(other.keyids) != set(spec.keyids) or other.threshold != spec.threshold:
                    return root, later.payload.issued_at
        return root, None

    def revoked(self) -> tuple[int | None, dict[bytes, int]]:
        """Every revocation list held, as one: the newest version, and key digest -> the earliest time any
        list revokes it from.  Lists are cumulative, so the union is the newest list unless one was made
        to leave something out (by a key rotated out since, say): the union never forgets a revocation."""
        if not self.revocations:
            return None, {}
        out: dict[bytes, int] = {}
        for doc in self.revocations:
            p = doc.payload
            assert isinstance(p, Revocation)
            for key, since in p.index().items():
                out[key] = min(since, out.get(key, since))
        return max(d.payload.version for d in self.revocations), out


class History:
    """The bundle history a receipt is verified against (``receipt verify --history``).

    Built from signed documents and the fingerprints of roots trusted as anchors (SHA-256 of a root's
    signed bytes, as ``authority anchor`` prints it): each domain's chain is walked up from an anchor,
    each next root signed by the root thresholds of both (TUF 5.3.4); a bundle or revocation counts
    only if the pki role of the root current at its issue time signed it.  Documents that do not verify
    are left out and listed (``refused``, shown by ``receipt verify``); every copy of a root version is
    checked, so a forged copy cannot hide the genuine one.  The history is evidence, not trust state.
    """

    def __init__(self, documents: Iterable[bytes], anchors: Iterable[str]) -> None:
        anchors = set(anchors)
        parsed: dict[str, list[Signed[Any]]] = {}
        self.refused: list[str] = []
        seen: set[bytes] = set()
        for raw in documents:
            try:
                doc = parse(raw)
            except QhxError as exc:
                self.refused.append(f"an unreadable document: {exc.message}")
                continue
            if doc.digest in seen:
                continue
            seen.add(doc.digest)
            parsed.setdefault(doc.payload.domain, []).append(doc)
        self.domains: dict[str, DomainHistory] = {}
        for domain, docs in parsed.items():
            h = self._chain(domain, docs, anchors)
            if h is None:
                continue
            for d in docs:
                if not isinstance(d.payload, (Bundle, Revocation)):
                    continue
                try:
                    _, until = h.check(d, "pki")
                except QhxError as exc:
                    self.refused.append(f"{d.describe()}: {exc.message}")
                    continue
                if isinstance(d.payload, Bundle):
                    if d.payload.version in h.bundles:
                        self.refused.append(f"{d.describe()}: another bundle of this version verifies too")
                        h.bundles.pop(d.payload.version)  # neither is believed
                        continue
                    h.bundles[d.payload.version] = (d, until)
                else:
                    h.revocations.append(d)  # every list counts (DomainHistory.revoked)
            self.domains[domain] = h

    def _chain(self, domain: str, docs: list[Signed[Any]], anchors: set[str]) -> DomainHistory | None:
        """The domain's root chain from its lowest trusted root, each copy of each version checked."""
        by_version: dict[int, list[Signed[Any]]] = {}
        for d in docs:
            if isinstance(d.payload, Root):
                by_version.setdefault(d.payload.version, []).append(d)
        trusted = sorted(
            (d for copies in by_version.values() for d in copies if hashlib.sha256(d.raw).hexdigest() in anchors),
            key=lambda d: d.payload.version,
        )
        for anchor in trusted:
            try:
                check_role(anchor, anchor.payload, "root")
            except QhxError as exc:
                self.refused.append(f"{anchor.describe()} (trusted): {exc.message}")
                continue
            h = DomainHistory(domain, roots=[anchor])
            v = anchor.payload.version
            while v + 1 in by_version:
                good = []
                for nxt in by_version[v + 1]:
                    try:
                        check_role(nxt, h.roots[-1].payload, "root")
                        check_role(nxt, nxt.payload, "root")
                    except QhxError as exc:
                        self.refused.append(f"{nxt.describe()}: {exc.message}")
                        continue
                    good.append(nxt)
                if len(good) != 1:
                    if good:
                        self.refused.append(f"root v{v + 1} of {domain}: {len(good)} different copies verify")
                    break
                h.roots.append(good[0])
                v += 1
            return h
        return None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            d: {"roots": [r.payload.version for r in h.roots], "bundles": sorted(h.bundles),
                "revocations": sorted({r.payload.version for r in h.revocations})}
            for d, h in sorted(self.domains.items())
        }  # fmt: skip
        if self.refused:
            out["refused"] = list(self.refused)
        return out


# --- verification -----------------------------------------------------------------------------------


def _in_window(what: str, t: int, notary: NotaryDelegation, revoked_from: int | None, until: int | None) -> None:
    if not notary.issued_at <= t < notary.expires:
        raise Expired(
            f"{what} is dated {t}, outside the notary delegation v{notary.version} "
            f"({notary.issued_at} to {notary.expires}): it proves nothing"
        )
    if until is not None and t >= until:
        raise Expired(
            f"{what} is dated {t}, after the notary role key that signed the delegation was rotated out ({until})"
        )
    if revoked_from is not None and t >= revoked_from:
        raise Revoked(f"{what} is dated {t}, after the domain revoked the notary key (from {revoked_from})")


def verify(data: bytes, history: History) -> dict[str, Any]:
    """Verify a receipt file against ``history``; a report of what it proves.

    Raises the error of the first check that fails (``bad-signature``, ``expired``, ``revoked``,
    ``malformed`` ...); ``missing-history`` when everything present verified but the history lacks a
    document the receipt names (the report is then in :attr:`MissingHistory.report`)."""
    rf = ReceiptFile.from_bytes(data)
    receipt = Receipt.from_bytes(rf.receipt)
    card: Card = parse_card(rf.card)
    notary_doc = parse(rf.notary)
    notary = notary_doc.payload
    if not isinstance(notary, NotaryDelegation):
        raise Malformed(f"the receipt file's notary is a {notary_doc.type} document")
    if (notary.domain, notary.node_id) != (receipt.domain, receipt.node_id) or (card.domain, card.node_id) != (
        receipt.domain,
        receipt.node_id,
    ):
        raise Malformed("the receipt, its card and its notary delegation name different nodes")
    if card.fingerprint != notary.card_fingerprint:
        raise BadSignature(f"the notary delegation v{notary.version} names another card than the receipt carries")
    missing: list[str] = []
    home = history.domains.get(receipt.domain)
    if home is None:
        raise MissingHistory(f"the history holds no root chain of {receipt.domain} from a trusted root")
    root, until = home.check(notary_doc, "notary")
    revocation_version, revoked = home.revoked()
    notary_revoked = revoked.get(bytes.fromhex(card.fingerprint))

    # The log: the leaf is in a tree head the notary key signed while it was delegated.
    head = parse_tree_head(rf.tree_head, card.signing_key)
    if (head.domain, head.node_id) != (receipt.domain, receipt.node_id):
        raise Malformed("the tree head is of another node's log")
    if receipt.seq >= head.size:
        raise Malformed(f"receipt {receipt.seq} is not in a tree head of size {head.size}")
    merkle.verify_inclusion(merkle.leaf_hash(rf.receipt), receipt.seq, head.size, rf.proof, head.root)
    if head.at + CLOCK_TOLERANCE < receipt.at:
        raise Malformed(f"the tree head ({head.at}) predates the receipt it covers ({receipt.at})")
    _in_window("the tree head", head.at, notary, notary_revoked, until)
    if receipt.level == "sign-request" or rf.signature is not None:
        if rf.signature is None:
            raise Malformed("a sign-request receipt carries its own signature")
        # The signed payload must be the receipt's exact bytes, decoded above: no second decode of it.
        env = cose.Envelope.parse(rf.signature, max_size=MAX_FILE)
        if env.headers.get(cose.H_CONTENT_TYPE) != RECEIPT_CONTENT_TYPE:
            raise Malformed(f"not a notary receipt signature: the content type must be {RECEIPT_CONTENT_TYPE!r}")
        if env.payload != rf.receipt:
            raise BadSignature("the receipt's signature covers another receipt")
        cose.require_signed_by(env, card.signing_key, "notary receipt")
    _in_window("the receipt", receipt.at, notary, notary_revoked, until)

    # The chains, at the receipt's time, under the bundle versions it names.
    certs = {hashlib.sha256(c).digest(): c for c in rf.certs}
    parties: dict[str, Any] = {}
    for role, party in (("caller", receipt.caller), ("callee", receipt.callee)):
        chain = []
        for digest in party.certs:
            if digest not in certs:
                raise Malformed(f"the receipt file lacks a certificate of the {role}'s chain")
            chain.append(certs[digest])
        domain = trust_domain_of(party.spiffe_id)
        if role == "callee" and domain != receipt.domain:
            raise Malformed("the callee is a workload of the notary's own domain")
        named = receipt.versions.get(domain)
        if named is None:
            raise Malformed(f"the receipt names no bundle version of {domain}")
        out: dict[str, Any] = {"id": party.spiffe_id, "domain": domain}
        parties[role] = out
        if "spiffe" in named:
            out["spiffe_sequence"] = named["spiffe"]
            missing.append(f"the {role}'s chain was verified against {domain}'s SPIFFE bundle (sequence "
                           f"{named['spiffe']}): an unsigned bundle no history holds")  # fmt: skip
            continue
        h = history.domains.get(domain)
        if h is None:
            missing.append(f"the {role}'s chain: the history holds no root chain of {domain}")
            continue
        held = h.bundles.get(named["bundle"])
        if held is None:
            missing.append(f"the {role}'s chain: the history lacks bundle v{named['bundle']} of {domain}")
            continue
        bundle, bundle_until = held[0].payload, held[1]
        assert isinstance(bundle, Bundle)
        if not bundle.issued_at - CLOCK_TOLERANCE <= receipt.at < bundle.expires:
            raise Expired(f"bundle v{bundle.version} of {domain} was not valid at the receipt's time {receipt.at}")
        if bundle_until is not None and receipt.at >= bundle_until:
            raise Expired(
                f"bundle v{bundle.version} of {domain} was signed by a pki key rotated out before the receipt"
            )
        rv, rev = h.revoked()
        got = svid.verify_x509_svid(chain, bundle.x509_authorities, receipt.at, rev)
        if got != party.spiffe_id:
            raise Malformed(f"the {role}'s chain names {got}, not {party.spiffe_id}")
        out.update(bundle_version=bundle.version, revocation_version=rv)
        if named.get("revocation") is not None and (rv is None or rv < named["revocation"]):
            missing.append(
                f"revocations of {domain}: the receipt was made under revocation v{named['revocation']}, "
                f"the history holds {'none' if rv is None else f'v{rv}'}"
            )
    report: dict[str, Any] = {
        "verified": not missing,
        "receipt": {"domain": receipt.domain, "node_id": receipt.node_id, "seq": receipt.seq, "at": receipt.at,
                    "level": receipt.level},
        "caller": parties["caller"],
        "callee": parties["callee"],
        "notary": {"delegation_version": notary.version, "root_version": root.payload.version,
                   "card": card.fingerprint, "signed": rf.signature is not None},
        "log": {"tree_size": head.size, "root": head.root.hex(), "signed_at": head.at},
        "revocation_version": revocation_version,
        "could_not": missing,
    }  # fmt: skip
    if receipt.level != "workload-only":
        assert receipt.request is not None
        assert receipt.response is not None
        report["exchange"] = {
            "method": receipt.method,
            "target": receipt.target,
            "status": receipt.status,
            "request_sha256": receipt.request.hex(),
            "response_sha256": receipt.response.hex(),
        }
    if missing:
        raise MissingHistory("; ".join(missing), report)
    return report
