"""Signed checkpoints of a hash-chained audit log, and the rules that check a log against them.

A hash chain (``hash = SHA-256(prev ‖ CBOR(row))``) shows that rows were
changed only to someone who cannot recompute it: anyone who can write the
file can also rewrite every hash after the row they changed.  A checkpoint
closes that gap: a COSE_Sign by the home's own signing key (content type
:data:`CONTENT_TYPE`) over::

    {"type": "audit-checkpoint",
     "log": tstr,          # which log: "node" (node.sqlite), "evidence", "attestation"
     "node_id": tstr, "domain": tstr,   # whose log ("authority" for an authority's own stores)
     "n": uint,            # checkpoint number: 1, 2, 3 ... with no gap
     "seq": uint,          # the last row it covers
     "count": uint,        # rows it covers (seq minus the rows that predate the chain)
     "head": bstr(32),     # the hash of row seq
     "prev": bstr(32),     # SHA-256 of checkpoint n - 1's exact bytes (zeros for n = 1)
     "at": uint}           # the time of the write that made it

A rewritten chain no longer ends in the heads its checkpoints name, and a new
checkpoint needs the key.  Checkpoints are chained too, so one cannot be
removed from the middle; the latest one is also kept outside the database
(see :mod:`qhx_edge.store.audit`), so removing the last ones is seen unless
that record is rolled back as well.  Rows after the last checkpoint are
protected by the hash chain alone (:func:`verify_log` counts them as
``unprotected``): the window a checkpoint policy leaves open.

This module is pure: rows and checkpoints come in, a report or a typed
:class:`AuditBroken` (kind ``audit-broken``, with a stable ``reason``) goes out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from qhx_edge.core import cbor, cose
from qhx_edge.core.errors import BadSignature, Malformed, Rejected
from qhx_edge.core.limits import is_uint
from qhx_edge.core.suites import PrivateKey, PublicKey

CONTENT_TYPE = "application/qhx-edge-checkpoint+cbor"
MAX_CHECKPOINT = 64 << 10
ZERO = b"\x00" * 32
FIELDS = frozenset({"type", "log", "node_id", "domain", "n", "seq", "count", "head", "prev", "at"})

# The stable reasons of an audit-broken finding.
ROW_MISSING = "row-missing"  # a sequence number is skipped: a row was deleted
ROW_ALTERED = "row-altered"  # a row does not match its hash or link: edited, reordered or replaced
CHAIN_REWRITTEN = "chain-rewritten"  # a consistent chain that does not end in a checkpoint's head
TRUNCATED = "truncated"  # rows a checkpoint covers are gone from the end
CHECKPOINT_FORGED = "checkpoint-forged"  # not signed by the key, or about another log
CHECKPOINT_MISSING = "checkpoint-missing"  # a gap or a broken link in the checkpoints' own chain
CHECKPOINTS_REMOVED = "checkpoints-removed"  # the latest checkpoint recorded outside the log is gone
COUNT_MISMATCH = "count-mismatch"  # a checkpoint covers another number of rows than the log holds


class AuditBroken(Rejected):
    """The audit log does not verify: a row or checkpoint was changed, removed or forged."""

    kind = "audit-broken"

    def __init__(
        self, reason: str, message: str | None = None, *, seq: int | None = None, report: dict[str, Any] | None = None
    ):
        if message is None:  # one argument, as every typed error takes: a message with no stated reason
            reason, message = "unspecified", reason
        super().__init__(message)
        self.reason = reason
        self.seq = seq
        self.report = report or {}

    def finding(self) -> dict[str, Any]:
        return {"reason": self.reason, "seq": self.seq, "message": self.message}


@dataclass(frozen=True)
class Checkpoint:
    raw: bytes
    log: str
    node_id: str
    domain: str
    n: int
    seq: int
    count: int
    head: bytes
    prev: bytes
    at: int

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.raw).digest()

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "seq": self.seq, "count": self.count, "head": self.head.hex(), "at": self.at}


def row_hash(prev: bytes, content: Sequence[Any]) -> bytes:
    """A row's link: SHA-256 over the previous hash and the deterministic CBOR of the row's values."""
    return hashlib.sha256(prev + cbor.encode(list(content))).digest()


def make(
    signer: PrivateKey,
    *,
    log: str,
    node_id: str,
    domain: str,
    n: int,
    seq: int,
    count: int,
    head: bytes,
    prev: bytes,
    at: int,
) -> bytes:
    payload = {
        "type": "audit-checkpoint",
        "log": log,
        "node_id": node_id,
        "domain": domain,
        "n": n,
        "seq": seq,
        "count": count,
        "head": head,
        "prev": prev,
        "at": at,
    }
    return cose.sign(cbor.encode(payload), [signer], content_type=CONTENT_TYPE)


def parse(raw: bytes, key: PublicKey) -> Checkpoint:
    """One checkpoint, signed by every algorithm of ``key`` (``bad-signature``), well formed (``malformed``)."""
    d = cose.parse_signed(
        raw,
        content_type=CONTENT_TYPE,
        max_size=MAX_CHECKPOINT,
        what="audit checkpoint",
        types=frozenset({"audit-checkpoint"}),
        signer=key,
    ).body
    if set(d) != FIELDS:
        raise Malformed("not an audit checkpoint: unexpected fields")
    for k in ("log", "node_id", "domain"):
        if not isinstance(d[k], str) or not d[k]:
            raise Malformed(f"audit checkpoint {k} must be text")
    for k in ("n", "seq", "count", "at"):
        if not is_uint(d[k]):
            raise Malformed(f"audit checkpoint {k} must be an unsigned integer (at most 2^63 - 1)")
    for k in ("head", "prev"):
        if not isinstance(d[k], bytes) or len(d[k]) != 32:
            raise Malformed(f"audit checkpoint {k} must be a 32-byte hash")
    if d["n"] < 1 or d["seq"] < 1 or d["count"] > d["seq"]:
        raise Malformed("audit checkpoint numbers out of range")
    return Checkpoint(
        bytes(raw), d["log"], d["node_id"], d["domain"], d["n"], d["seq"], d["count"], d["head"], d["prev"], d["at"]
    )


def check_chain(
    raws: Iterable[bytes], key: PublicKey, *, log: str, node_id: str, domain: str, first: int | None = 1
) -> list[Checkpoint]:
    """Checkpoints in order of number: each signed by ``key``, about this log, numbered and linked without gap.

    ``first``: the number the sequence must start at; ``None`` for a run that
    may start anywhere (a segment of evidence carries the checkpoints of its
    rows), whose first ``prev`` is then not checked here.
    """
    out: list[Checkpoint] = []
    for raw in raws:
        try:
            cp = parse(raw, key)
        except (BadSignature, Malformed) as exc:
            where = f"{out[-1].n + 1}" if out else "1" if first == 1 else "of the run"
            raise AuditBroken(CHECKPOINT_FORGED, f"audit checkpoint {where}: {exc.message}") from exc
        if (cp.log, cp.node_id, cp.domain) != (log, node_id, domain):
            raise AuditBroken(
                CHECKPOINT_FORGED,
                f"audit checkpoint {cp.n} is about log {cp.log!r} of {cp.node_id} ({cp.domain}), "
                f"not this one ({log!r} of {node_id}, {domain})",
            )
        want = out[-1].n + 1 if out else cp.n if first is None else first
        if cp.n != want:
            raise AuditBroken(CHECKPOINT_MISSING, f"audit checkpoint {want} is missing (the next held is {cp.n})")
        if out and (cp.prev != out[-1].digest or cp.seq <= out[-1].seq):
            raise AuditBroken(CHECKPOINT_MISSING, f"audit checkpoint {cp.n} does not follow checkpoint {cp.n - 1}")
        if not out and first == 1 and cp.prev != ZERO:
            raise AuditBroken(CHECKPOINT_MISSING, "audit checkpoint 1 does not start the checkpoint chain")
        out.append(cp)
    return out


def verify_log(
    rows: Iterable[tuple[int, bytes, bytes, Sequence[Any]]],
    checkpoints: Sequence[Checkpoint],
    *,
    base: int = 0,
    latest: Checkpoint | None = None,
    latest_required: bool = False,
    hash_row: Callable[[bytes, Sequence[Any]], bytes] = row_hash,
) -> dict[str, Any]:
    """Check a whole log against its checkpoints (already verified by :func:`check_chain`).

    ``rows``: ``(seq, prev, hash, content)`` in order of ``seq``, where ``content``
    is what ``hash_row`` hashes; the chain starts at ``base + 1`` from the zero
    hash (rows up to ``base`` predate it).  ``latest``: the latest checkpoint as
    recorded outside the log; it must be one the log holds (a lagging record is
    fine: it is written after the commit).  Returns the report; raises
    :class:`AuditBroken` at the first finding, the report so far attached.
    """
    by_seq = {cp.seq: cp for cp in checkpoints}
    last_cp = checkpoints[-1] if checkpoints else None
    report: dict[str, Any] = {
        "entries": 0,
        "first_seq": None,
        "last_seq": None,
        "head": None,
        "checkpoints": len(checkpoints),
        "last_checkpoint": last_cp.to_json() if last_cp else None,
        "unprotected": 0,
        "latest_record": "absent" if latest is None else "ok",
    }

    def broken(reason: str, message: str, seq: int | None) -> AuditBroken:
        return AuditBroken(reason, message, seq=seq, report=report)

    for cp in checkpoints:
        if cp.count != cp.seq - base:
            raise broken(
                COUNT_MISMATCH, f"audit checkpoint {cp.n} covers {cp.count} rows, the log {cp.seq - base}", cp.seq
            )
    if latest is not None:
        held = checkpoints[latest.n - 1] if 0 < latest.n <= len(checkpoints) else None
        if held is None:
            raise broken(
                CHECKPOINTS_REMOVED,
                f"the latest audit checkpoint recorded is {latest.n}, the log holds {len(checkpoints)}: "
                "checkpoints were removed",
                latest.seq,
            )
        if held.raw != latest.raw:
            raise broken(CHECKPOINTS_REMOVED, f"audit checkpoint {latest.n} differs from the one recorded", latest.seq)
        if latest.n < len(checkpoints):
            report["latest_record"] = "lagging"
    elif latest_required and checkpoints:
        raise broken(
            CHECKPOINTS_REMOVED,
            "the record of the latest audit checkpoint is missing (removed, or lost in a crash right after "
            "the first checkpoint: the next checkpoint writes it again)",
            None,
        )
    link = ZERO
    expect = base + 1
    for seq, prev, h, content in rows:
        if seq <= base:
            continue
        if seq != expect:
            if seq < expect:
                raise broken(ROW_ALTERED, f"audit row {seq} is out of order", seq)
            raise broken(ROW_MISSING, f"audit row {expect} is missing (the next held is {seq})", expect)
        if prev != link or hash_row(link, content) != h:
            raise broken(ROW_ALTERED, f"audit row {seq} does not match its hash chain (edited, moved or replaced)", seq)
        signed = by_seq.get(seq)
        if signed is not None and signed.head != h:
            raise broken(
                CHAIN_REWRITTEN,
                f"audit row {seq} is not the head that checkpoint {signed.n} signed: the chain was recomputed "
                "without the key",
                seq,
            )
        if report["first_seq"] is None:
            report["first_seq"] = seq
        report["entries"] += 1
        report["last_seq"] = seq
        link = h
        expect += 1
    report["head"] = link.hex() if report["last_seq"] is not None else None
    last = report["last_seq"] or base
    if last_cp is not None and last_cp.seq > last:
        raise broken(
            TRUNCATED,
            f"audit rows {last + 1}-{last_cp.seq} are gone: checkpoint {last_cp.n} covers up to {last_cp.seq}",
            last + 1,
        )
    report["unprotected"] = last - (last_cp.seq if last_cp else base)
    return report
