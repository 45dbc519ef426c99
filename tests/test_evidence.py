"""Evidence out: node audit logs exported in evidence packs and kept per node by the authority.

Acceptance (issue 3): evidence round trip from two nodes to the authority, including a forged and a
missing segment detected; plus forks, sealing, impersonation, caps and the real CLI.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest

from qhx_edge.core import cbor, cose
from qhx_edge.core.cards import make_card, parse_card
from qhx_edge.core.errors import BadSignature, DomainMismatch, Malformed, NotRecipient, Oversize, Rejected
from qhx_edge.core.suites import PrivateKey
from qhx_edge.homes import evidence, node
from qhx_edge.homes.authority import Authority
from qhx_edge.packs import pack, seal
from qhx_edge.store import clock
from qhx_edge.store.trust_store import GENESIS, AuditEntry, _entry_hash
from tests.conftest import PASSPHRASE, Homes, make_homes, run_cli

COLS = ", ".join(evidence.COLUMNS)


def opened(home: Path) -> node.Node:
    return node.Node(home, PASSPHRASE.encode)


def activity(home: Path, auth: Authority) -> None:
    """Real audit activity on a node: a new bundle and freshness from the authority, imported."""
    now = clock.now()
    auth.publish_bundle(now)
    with opened(home) as n:
        n.import_pack(auth.export_pack(auth.export_documents(), now), now)


def reject_something(home: Path, detail: bytes = b"not a pack") -> None:
    """Different real audit activity: a garbage pack, rejected and logged."""
    with opened(home) as n, pytest.raises(Malformed):
        n.import_pack(detail, clock.now())


def export(home: Path, path: Path, *, segment_entries: int = 3, **kw: Any) -> dict[str, Any]:
    with opened(home) as n:
        return evidence.write_evidence(n, path, clock.now(), segment_entries=segment_entries, **kw)


def audit_rows(home: Path) -> list[tuple[Any, ...]]:
    with opened(home) as n:
        return [tuple(r.values()) for r in n.store.audit_entries()]


def held_rows(auth: Authority, node_id: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(auth.home / evidence.EVIDENCE_FILE)
    try:
        return conn.execute(f"SELECT {COLS} FROM entries WHERE node_id = ? ORDER BY seq", (node_id,)).fetchall()
    finally:
        conn.close()


def evidence_digest(auth: Authority) -> str:
    store = evidence.EvidenceStore.open(auth.home)
    assert store is not None
    try:
        return store.digest()
    finally:
        store.close()


def node_id_of(home: Path) -> str:
    with opened(home) as n:
        return n.node_id


def import_file(auth: Authority, path: Path, **kw: Any) -> evidence.EvidenceReport:
    return evidence.import_evidence(auth, pack.read(path), clock.now(), **kw)


@pytest.fixture
def two(tmp_path: Path) -> tuple[Homes, Path]:
    """An authority, its node N (from make_homes) and a second node M, both with some activity."""
    homes = make_homes(tmp_path)
    m = tmp_path / "M"
    node.init(m, homes.authority.anchor(), clock.now(), passphrase=PASSPHRASE.encode())
    with opened(m) as n:
        n.import_pack(homes.authority.export_pack(homes.authority.export_documents(), clock.now()), clock.now())
    return homes, m


# --- the round trip ------------------------------------------------------------------------------


def test_round_trip_from_two_nodes(two: tuple[Homes, Path]) -> None:
    homes, m = two
    auth, n_home, tmp = homes.authority, homes.node_home, homes.tmp
    ids = {"N": node_id_of(n_home), "M": node_id_of(m)}

    # Two exports from each node, with activity between: consecutive segments, several per pack.
    first = {name: export(home, tmp / f"{name}1.pack") for name, home in (("N", n_home), ("M", m))}
    activity(n_home, auth)
    activity(m, auth)
    reject_something(m)
    second = {name: export(home, tmp / f"{name}2.pack") for name, home in (("N", n_home), ("M", m))}
    for name in ("N", "M"):
        assert first[name]["from_seq"] == 1
        assert len(first[name]["segments"]) >= 2  # 3 entries per segment in these tests
        assert second[name]["from_seq"] == first[name]["to_seq"] + 1
        assert second[name]["remaining"] == 0

    # Interleaved imports: each node's chain is kept apart.
    r = import_file(auth, tmp / "N1.pack")
    nj = r.to_json()["nodes"][ids["N"]]
    assert nj["new_node"] is True
    assert "new node, key pinned: " + nj["card_fingerprint"] in r.summary()
    with opened(n_home) as n:
        assert nj["card_fingerprint"] == parse_card(n.card()).fingerprint
    assert nj["segments_accepted"] == len(first["N"]["segments"])
    assert nj["entries_added"] == first["N"]["entries"]
    assert nj["gaps"] == []
    assert nj["forks"] == []
    assert nj["rejected"] == []
    assert import_file(auth, tmp / "M1.pack").new_node is True
    r2 = import_file(auth, tmp / "N2.pack")
    assert r2.new_node is False
    assert r2.node_json()["entries_added"] == second["N"]["entries"]
    import_file(auth, tmp / "M2.pack")

    # The authority now holds exactly each node's audit log, every column, hashes included.
    st = evidence.status(auth.home)
    assert set(st["nodes"]) == set(ids.values())
    for name, home in (("N", n_home), ("M", m)):
        rows = audit_rows(home)
        assert held_rows(auth, ids[name]) == rows
        info = st["nodes"][ids[name]]
        assert info["entries"] == len(rows) == info["last_seq"]
        assert info["head"] == rows[-1][-1].hex()
        assert info["gaps"] == []
        assert info["forks"] == []
        assert info["rejections"] == 0
        assert info["domain"] == "alpha.example"
        with opened(home) as n:
            assert n.store.evidence_mark() == len(rows)
            assert n.store.verify_audit_chain() == len(rows)

    # Re-importing the same evidence is a no-op that says so.
    before = evidence_digest(auth)
    again = import_file(auth, tmp / "N1.pack")
    assert again.pack_status == "already-imported"
    assert again.changed is False
    assert {s["status"] for s in again.segments} == {"already-held"}
    assert "nothing new: this evidence pack was imported before" in again.summary()
    assert evidence_digest(auth) == before

    # Nothing new on the node: a valid pack holding only the card, which changes nothing.
    empty = export(n_home, tmp / "N3.pack")
    assert empty["segments"] == []
    assert empty["entries"] == 0
    r3 = import_file(auth, tmp / "N3.pack")
    assert r3.segments == []
    assert r3.changed is False
    assert "nothing new: no new audit entries" in r3.summary()
    assert held_rows(auth, ids["N"]) == audit_rows(n_home)


def test_a_re_exported_range_is_recognised_as_held(homes: Homes) -> None:
    """A failed mark update re-exports the same entries: new segment bytes, same chain, already held."""
    tmp = homes.tmp
    with opened(homes.node_home) as n:
        ex = evidence.export_evidence(n, clock.now(), segment_entries=10)
    pack.write(tmp / "a.pack", ex.data)
    import_file(homes.authority, tmp / "a.pack")
    info = export(homes.node_home, tmp / "b.pack", segment_entries=2)  # the mark never moved
    assert info["from_seq"] == 1
    r = import_file(homes.authority, tmp / "b.pack")
    assert r.changed is False
    assert {s["status"] for s in r.segments} == {"already-held"}


# --- forged segments ---------------------------------------------------------------------------


def _payload(raw: bytes) -> dict[str, Any]:
    env = cose.Envelope.parse(raw, max_size=evidence.MAX_SEGMENT_SIZE)
    d = cbor.decode(env.payload, max_size=evidence.MAX_SEGMENT_SIZE)
    assert isinstance(d, dict)
    return d


def resign(raw: bytes, mutate: Callable[[dict[str, Any]], None], signer: PrivateKey) -> bytes:
    d = _payload(raw)
    mutate(d)
    return cose.sign(cbor.encode(d), [signer], content_type=evidence.CONTENT_TYPE)


def keep_signature(raw: bytes, mutate: Callable[[dict[str, Any]], None]) -> bytes:
    value = cbor.decode(raw, max_size=evidence.MAX_SEGMENT_SIZE, tags=frozenset({cose.COSE_SIGN_TAG}))
    body = value.value
    d = cbor.decode(body[2], max_size=evidence.MAX_SEGMENT_SIZE)
    mutate(d)
    body[2] = cbor.encode(d)
    return cbor.encode(cbor2.CBORTag(cose.COSE_SIGN_TAG, body))


def repack(n: node.Node, docs: list[bytes]) -> bytes:
    """A pack whose manifest the node itself signed (so only the segment inside is at fault)."""
    return pack.build(
        docs, n.identity.signer, domain=n.domain, node=n.node_id, sequence=99, now=clock.now(), kind="evidence"
    )


def _detail(d: dict[str, Any]) -> None:
    d["entries"][0]["detail"] = "nothing happened here"


def _hash(d: dict[str, Any]) -> None:
    d["entries"][-1]["hash"] = bytes(32)
    d["head"] = bytes(32)


def _drop(d: dict[str, Any]) -> None:
    d["entries"].pop(1)


def _renumber(d: dict[str, Any]) -> None:
    d["entries"][1]["seq"] += 1


OTHER_KEY = PrivateKey.generate("hybrid")


def _rechain(d: dict[str, Any]) -> None:
    """Recompute every entry's prev and hash, and the head: an internally consistent forged chain."""
    link = d["prev"]
    for e in d["entries"]:
        entry = AuditEntry(e["event"], e["detail"], e["kind"], e["domain"], e["type"], e["version"], e["digest"])
        e["prev"], e["hash"] = link, _entry_hash(link, e["seq"], e["at"], entry)
        link = e["hash"]
    d["head"] = link


def _detail_rechained(d: dict[str, Any]) -> None:
    _detail(d)
    _rechain(d)


def _huge_version(d: dict[str, Any]) -> None:
    d["entries"][0]["version"] = 2**63  # beyond SQLite's INTEGER: refused where it is read, not at the database
    _rechain(d)


def _huge_time(d: dict[str, Any]) -> None:
    d["entries"][0]["at"] = 2**64 - 1
    _rechain(d)


NOT_SIGNED = "not signed by the key it names"
ALTERED = "does not match its hash"
# name: (forge(segment, node's own signer), kind, message fragment naming the check that caught it)
FORGERIES: dict[str, tuple[Callable[[bytes, PrivateKey], bytes], str, str]] = {
    "detail altered, re-signed by another key": (
        lambda raw, _k: resign(raw, _detail, OTHER_KEY),
        "bad-signature",
        NOT_SIGNED,
    ),
    "detail altered and chain recomputed, re-signed by another key": (
        lambda raw, _k: resign(raw, _detail_rechained, OTHER_KEY),
        "bad-signature",
        NOT_SIGNED,
    ),
    "detail altered and chain recomputed, old signature kept": (
        lambda raw, _k: keep_signature(raw, _detail_rechained),
        "bad-signature",
        NOT_SIGNED,
    ),
    "detail altered, old signature kept": (lambda raw, _k: keep_signature(raw, _detail), "bad-signature", NOT_SIGNED),
    "hash altered, old signature kept": (lambda raw, _k: keep_signature(raw, _hash), "bad-signature", NOT_SIGNED),
    "detail altered, re-signed by the node's own key": (
        lambda raw, k: resign(raw, _detail, k),
        "bad-signature",
        ALTERED,
    ),
    "hash altered, re-signed by the node's own key": (lambda raw, k: resign(raw, _hash, k), "bad-signature", ALTERED),
    "entry removed, re-signed by the node's own key": (
        lambda raw, k: resign(raw, _drop, k),
        "malformed",
        "does not hold",
    ),
    "entry renumbered, re-signed by the node's own key": (
        lambda raw, k: resign(raw, _renumber, k),
        "malformed",
        "not contiguous",
    ),
    "version past 2^63 - 1, re-signed by the node's own key": (
        lambda raw, k: resign(raw, _huge_version, k),
        "malformed",
        "at most 2^63 - 1",
    ),
    "time past 2^63 - 1, re-signed by the node's own key": (
        lambda raw, k: resign(raw, _huge_time, k),
        "malformed",
        "at most 2^63 - 1",
    ),
}


@dataclass
class Exported:
    auth: Authority
    signer: PrivateKey
    node_id: str
    domain: str
    docs: list[bytes]  # card, segment 1-3, segment 4-6
    rows: list[tuple[Any, ...]]

    def pack(self, docs: list[bytes]) -> bytes:
        return pack.build(
            docs, self.signer, domain=self.domain, node=self.node_id, sequence=9, now=clock.now(), kind="evidence"
        )

    def fresh(self) -> Authority:
        """The authority with no evidence yet (the forgery cases share one set of homes)."""
        for suffix in ("", "-wal", "-shm"):
            (self.auth.home / (evidence.EVIDENCE_FILE + suffix)).unlink(missing_ok=True)
        return self.auth


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    homes = make_homes(tmp_path_factory.mktemp("forgery"))
    activity(homes.node_home, homes.authority)
    with opened(homes.node_home) as n:
        p = pack.parse(evidence.export_evidence(n, clock.now(), segment_entries=3).data)
        assert len(p.documents) == 3
        return Exported(homes.authority, n.identity.signer, n.node_id, n.domain, p.documents, audit_rows(n.home))


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_segment_is_rejected_with_its_kind(exported: Exported, name: str) -> None:
    forge, kind, why = FORGERIES[name]
    auth = exported.fresh()
    card, good, genuine = exported.docs
    data = exported.pack([card, good, forge(genuine, exported.signer)])

    with pytest.raises(evidence.EvidenceRejected) as info:
        evidence.import_evidence(auth, data, clock.now())
    assert info.value.kind == kind
    assert why in info.value.message
    report = info.value.report.node_json()
    # The good segment is kept; the forged one changed nothing and is reported with its kind.
    assert [s["status"] for s in report["segments"]] == ["accepted", f"rejected:{kind}"]
    assert report["rejected"][0]["kind"] == kind
    assert report["rejected"][0]["index"] == 2
    assert held_rows(auth, exported.node_id) == exported.rows[:3]
    st = evidence.status(auth.home)["nodes"][exported.node_id]
    assert st["last_seq"] == 3
    assert st["rejections"] == 1
    # The genuine segment still fits where the forged one did not.
    assert evidence.import_evidence(auth, exported.pack([card, genuine]), clock.now()).node_json()["entries_added"] == 3


def test_strict_import_of_a_forged_segment_applies_nothing(homes: Homes) -> None:
    auth = homes.authority
    activity(homes.node_home, auth)
    with opened(homes.node_home) as n:
        p = pack.parse(evidence.export_evidence(n, clock.now(), segment_entries=3).data)
        data = repack(n, [p.documents[0], p.documents[1], keep_signature(p.documents[2], _detail)])
    before = evidence_digest(auth)
    with pytest.raises(evidence.EvidenceRejected) as info:
        evidence.import_evidence(auth, data, clock.now(), strict=True)
    assert info.value.kind == "bad-signature"
    assert info.value.report.applied is False
    assert [s["status"] for s in info.value.report.segments] == ["not-applied", "rejected:bad-signature"]
    assert evidence_digest(auth) == before
    assert evidence.status(auth.home)["rejections"] == 1


def test_tampered_pack_bytes_are_refused_whole(homes: Homes) -> None:
    with opened(homes.node_home) as n:
        data = bytearray(evidence.export_evidence(n, clock.now()).data)
    data[-40] ^= 0x01  # inside the last segment: no longer the document the manifest lists
    before = evidence_digest(homes.authority)
    with pytest.raises(BadSignature):
        evidence.import_evidence(homes.authority, bytes(data), clock.now())
    assert evidence_digest(homes.authority) == before
    assert evidence.status(homes.authority.home) == {"nodes": {}, "rejections": 1}


# --- missing segments and forks -------------------------------------------------------------------


def test_missing_segment_is_reported_as_a_gap_and_filled_later(homes: Homes) -> None:
    auth, tmp, home = homes.authority, homes.tmp, homes.node_home
    e1 = export(home, tmp / "e1.pack")
    activity(home, auth)
    e2 = export(home, tmp / "e2.pack")
    activity(home, auth)
    e3 = export(home, tmp / "e3.pack")
    node_id = e1["node_id"]
    missing = [e2["from_seq"], e2["to_seq"]]

    import_file(auth, tmp / "e1.pack")
    r = import_file(auth, tmp / "e3.pack")  # the 2nd stick never arrived
    nj = r.node_json()
    assert nj["gaps"] == [missing]
    assert r.segments[0]["gap_before"] == missing
    assert nj["entries_added"] == e3["entries"]
    assert "after a gap (missing {}-{})".format(*missing) in r.summary()
    st = evidence.status(auth.home)["nodes"][node_id]
    assert st["gaps"] == [missing]
    assert st["entries"] == e1["entries"] + e3["entries"]
    assert st["last_seq"] == e3["to_seq"]

    filled = import_file(auth, tmp / "e2.pack")
    assert filled.node_json()["gaps"] == []
    assert filled.segments[0].get("fills_gap") is True
    assert evidence.status(auth.home)["nodes"][node_id]["gaps"] == []
    assert held_rows(auth, node_id) == audit_rows(home)


def test_fork_from_a_copied_node_home_is_reported_and_kept_as_proof(homes: Homes) -> None:
    auth, tmp, home = homes.authority, homes.tmp, homes.node_home
    export(home, tmp / "base.pack")
    import_file(auth, tmp / "base.pack")
    clone = tmp / "N-clone"
    shutil.copytree(home, clone)  # same node id, same keys, same log so far

    activity(home, auth)  # the two copies diverge: two entries here ...
    for i in range(4):  # ... four different ones there
        reject_something(clone, f"bad pack {i}".encode())
    real = export(home, tmp / "real.pack", segment_entries=50)
    other = export(clone, tmp / "clone.pack", segment_entries=50)
    assert real["from_seq"] == other["from_seq"]
    assert other["to_seq"] > real["to_seq"]
    node_id = real["node_id"]

    import_file(auth, tmp / "real.pack")
    chain = held_rows(auth, node_id)
    r = import_file(auth, tmp / "clone.pack")  # a finding, not an exception
    nj = r.node_json()
    assert [s["status"] for s in r.segments] == ["fork"]
    assert len(nj["forks"]) == 1
    fork = nj["forks"][0]
    assert fork["seq"] == real["from_seq"]
    assert fork["reason"] == "entry differs from the held entry with the same number"
    assert fork["held"] == chain[real["from_seq"] - 1][-1].hex()
    assert fork["other"] != fork["held"]
    assert f"FORK at entry {real['from_seq']}" in r.summary()
    # The held chain is unchanged; the forking segment is kept as proof.
    assert held_rows(auth, node_id) == chain
    st = evidence.status(auth.home)["nodes"][node_id]
    assert [f["seq"] for f in st["forks"]] == [real["from_seq"]]
    assert st["fork_segments"] == 1
    assert st["last_seq"] == real["to_seq"]
    assert st["gaps"] == []

    # The clone goes on beyond the held chain: its continuation is still the other history.
    for i in range(3):
        reject_something(clone, f"more {i}".encode())
    more = export(clone, tmp / "clone2.pack", segment_entries=50)
    assert more["from_seq"] == other["to_seq"] + 1 > real["to_seq"] + 1
    r2 = import_file(auth, tmp / "clone2.pack")
    assert [s["status"] for s in r2.segments] == ["fork"]
    assert r2.node_json()["forks"][0]["reason"].startswith("continues the forked history of segment")
    assert held_rows(auth, node_id) == chain

    # The real node goes on and its chain grows as before.
    activity(home, auth)
    export(home, tmp / "real2.pack")
    r3 = import_file(auth, tmp / "real2.pack")
    assert {s["status"] for s in r3.segments} == {"accepted"}
    assert held_rows(auth, node_id) == audit_rows(home)
    assert len(evidence.status(auth.home)["nodes"][node_id]["forks"]) == 2

    # Re-importing the fork changes nothing.
    before = evidence_digest(auth)
    again = import_file(auth, tmp / "clone.pack")
    assert again.pack_status == "already-imported"
    assert again.changed is False
    assert evidence_digest(auth) == before


def test_a_gap_filler_that_does_not_link_is_a_fork(homes: Homes) -> None:
    """A segment that fits a gap by number but not by hash (from another history) is a fork."""
    auth, tmp, home = homes.authority, homes.tmp, homes.node_home
    export(home, tmp / "e1.pack")
    clone = tmp / "N-clone"
    shutil.copytree(home, clone)
    activity(home, auth)
    reject_something(clone)
    reject_something(clone)
    export(home, tmp / "e2.pack", segment_entries=50)
    export(clone, tmp / "c2.pack", segment_entries=50)
    activity(home, auth)
    export(home, tmp / "e3.pack")
    import_file(auth, tmp / "e1.pack")
    import_file(auth, tmp / "e3.pack")
    r = import_file(auth, tmp / "c2.pack")  # numbered like the missing e2, from the other history
    assert [s["status"] for s in r.segments] == ["fork"]
    assert r.node_json()["forks"][0]["reason"] == "the held entry after it does not link to its head"
    assert r.node_json()["gaps"]  # still missing
    ok = import_file(auth, tmp / "e2.pack")
    assert ok.node_json()["gaps"] == []
    assert held_rows(auth, ok.card.node_id) == audit_rows(home)


# --- who may send evidence -------------------------------------------------------------------------


def test_sealed_evidence_round_trip(two: tuple[Homes, Path]) -> None:
    homes, m = two
    auth, tmp = homes.authority, homes.tmp
    authority_card = parse_card(auth.card())
    info = export(homes.node_home, tmp / "sealed.pack", recipients=[authority_card.encryption_key])
    data = pack.read(tmp / "sealed.pack")
    assert seal.is_sealed(data)
    # Nobody but the authority can read it: not another node, not the exporting node.
    for home in (m, homes.node_home):
        with opened(home) as n, pytest.raises(NotRecipient):
            n.import_pack(data, clock.now())
    r = evidence.import_evidence(auth, data, clock.now())
    assert r.sealed is True
    assert r.node_json()["entries_added"] == info["entries"]
    assert held_rows(auth, info["node_id"]) == audit_rows(homes.node_home)[: info["to_seq"]]


def test_a_node_impersonating_another_node_is_rejected(two: tuple[Homes, Path]) -> None:
    homes, m = two
    auth, tmp = homes.authority, homes.tmp
    export(homes.node_home, tmp / "n.pack")
    import_file(auth, tmp / "n.pack")  # N is pinned
    victim = node_id_of(homes.node_home)
    before = evidence_digest(auth)
    now = clock.now()
    with opened(m) as mm, opened(homes.node_home) as nn:
        signer = mm.identity.signer
        rows = [dict(zip(evidence.COLUMNS, r, strict=True)) for r in audit_rows(m)]
        segment = evidence.make_segment(signer, victim, mm.domain, rows, GENESIS, now)
        fake_card = make_card(mm.domain, victim, signer, mm.identity.encryption.public, now)
        kw: dict[str, Any] = {"domain": mm.domain, "sequence": 1, "now": now, "kind": "evidence"}
        # M claims N's node id with its own key (and a card it signed itself).
        claim = pack.build([fake_card, segment], signer, node=victim, **kw)
        # M carries N's genuine card but signs the pack itself.
        stolen_card = pack.build([nn.card(), segment], signer, node=victim, **kw)
        # M's own genuine pack, with a segment that names N.
        own = pack.build([mm.card(), segment], signer, node=mm.node_id, **kw)

    with pytest.raises(BadSignature, match="pinned to key"):
        evidence.import_evidence(auth, claim, now)
    with pytest.raises(BadSignature, match="not signed by the key of the node card"):
        evidence.import_evidence(auth, stolen_card, now)
    assert evidence_digest(auth) == before
    with pytest.raises(evidence.EvidenceRejected) as info:
        evidence.import_evidence(auth, own, now)
    assert info.value.kind == "bad-signature"
    assert "names node" in info.value.message
    st = evidence.status(auth.home)
    assert held_rows(auth, victim) == audit_rows(homes.node_home)[: st["nodes"][victim]["last_seq"]]
    assert st["nodes"][victim]["rejections"] == 2
    assert st["rejections"] == 3


def test_evidence_from_another_domain_is_domain_mismatch(tmp_path: Path) -> None:
    homes = make_homes(tmp_path / "alpha")
    beta = make_homes(tmp_path / "beta", domain="beta.example")
    export(beta.node_home, tmp_path / "beta.pack")
    with pytest.raises(DomainMismatch):
        import_file(homes.authority, tmp_path / "beta.pack")
    assert evidence.status(homes.authority.home)["nodes"] == {}
    # ... and evidence sealed to one authority is unreadable by another.
    sealed = tmp_path / "sealed.pack"
    export(homes.node_home, sealed, recipients=[parse_card(homes.authority.card()).encryption_key])
    with pytest.raises(NotRecipient):
        import_file(beta.authority, sealed)


def test_authorities_import_evidence_only_and_nodes_no_evidence(homes: Homes) -> None:
    with pytest.raises(Malformed, match="authorities import evidence only"):
        import_file(homes.authority, homes.export())
    export(homes.node_home, homes.tmp / "e.pack")
    with opened(homes.node_home) as n, pytest.raises(Malformed, match="authority home"):
        n.import_pack(pack.read(homes.tmp / "e.pack"), clock.now())
    # A pack without the card, or with a document where the card belongs.
    with opened(homes.node_home) as n:
        no_card = repack(n, [])
        doc_first = repack(n, [homes.authority.anchor()])
    for data in (no_card, doc_first):
        with pytest.raises(Malformed):
            evidence.import_evidence(homes.authority, data, clock.now())
    assert evidence.status(homes.authority.home)["rejections"] == 3


# --- caps ---------------------------------------------------------------------------------------------


def test_segments_are_capped(homes: Homes) -> None:
    home, tmp = homes.node_home, homes.tmp
    with opened(home) as n:
        base = n.store.audit_entries()[-1]["seq"]
        n.store.audit(clock.now(), [AuditEntry("test", f"entry {i}") for i in range(evidence.SEGMENT_ENTRIES + 2)])
        with pytest.raises(Malformed):
            evidence.export_evidence(n, clock.now(), segment_entries=evidence.SEGMENT_ENTRIES + 1)
    total = base + evidence.SEGMENT_ENTRIES + 2
    info = export(home, tmp / "big.pack", segment_entries=evidence.SEGMENT_ENTRIES)
    assert info["segments"] == [
        {"from_seq": 1, "to_seq": evidence.SEGMENT_ENTRIES},
        {"from_seq": evidence.SEGMENT_ENTRIES + 1, "to_seq": total},
    ]
    r = import_file(homes.authority, tmp / "big.pack")
    assert r.node_json()["entries_added"] == total

    # A segment over the cap, correctly chained and signed by the node, is refused as oversize.
    prev, entries = GENESIS, []
    for seq in range(1, evidence.SEGMENT_ENTRIES + 2):
        e = AuditEntry("test", "x")
        h = _entry_hash(prev, seq, 1, e)
        entries.append({"seq": seq, "at": 1, "event": "test", "kind": None, "domain": None, "type": None})
        entries[-1].update({"version": None, "digest": None, "detail": "x", "prev": prev, "hash": h})
        prev = h
    with opened(home) as n:
        card = parse_card(n.card())
        big = evidence.make_segment(n.identity.signer, n.node_id, n.domain, entries, GENESIS, 1)
    with pytest.raises(Oversize):
        evidence.parse_segment(big, card.signing_key)


def test_parse_segment_refuses_other_signed_things(homes: Homes) -> None:
    with opened(homes.node_home) as n:
        card = parse_card(n.card())
        with pytest.raises(Malformed, match="content type"):
            evidence.parse_segment(n.card(), card.signing_key)
        rows = [dict(zip(evidence.COLUMNS, r, strict=True)) for r in audit_rows(homes.node_home)]
        good = evidence.make_segment(n.identity.signer, n.node_id, n.domain, rows, GENESIS, 1)
        assert evidence.parse_segment(good, card.signing_key).to_seq == len(rows)
        # A chain that claims to start at 1 from anything but the genesis hash.
        bad = resign(good, lambda d: d.update(prev=bytes([1]) * 32), n.identity.signer)
        with pytest.raises(Rejected) as info:
            evidence.parse_segment(bad, card.signing_key)
        assert info.value.kind == "bad-signature"


# --- the real command line -------------------------------------------------------------------------


def test_cli_evidence_round_trip(homes: Homes) -> None:
    a, n, tmp = homes.a, homes.node_home, homes.tmp
    r = run_cli("--home", a, "--json", "node", "card", "--to", tmp / "a.card")
    assert r.code == 0, r.stderr

    r = run_cli(
        "--home", n, "--json", "pack", "export", "--evidence", "--to", tmp / "e1.pack", "--seal-to", tmp / "a.card"
    )
    assert r.code == 0, r.stdout + r.stderr
    out = r.json
    assert out["ok"] is True
    assert out["sealed_to"] == ["authority"]
    assert out["from_seq"] == 1
    node_id, last = out["node_id"], out["to_seq"]
    st = run_cli("--home", n, "--json", "evidence", "status").json
    assert st["evidence_mark"] == last
    assert st["pending"] == 0

    r = run_cli("--home", a, "--json", "pack", "import", tmp / "e1.pack")
    assert r.code == 0, r.stdout + r.stderr
    rep = r.json
    assert rep["ok"] is True
    assert rep["sealed"] is True
    assert rep["kind"] == "evidence"
    assert rep["nodes"][node_id]["new_node"] is True
    assert rep["nodes"][node_id]["entries_added"] == last

    again = run_cli("--home", a, "--json", "pack", "import", tmp / "e1.pack")
    assert again.code == 0
    assert again.json["pack_status"] == "already-imported"
    assert again.json["changed"] is False

    # A forged segment through the CLI: exit 1, the kind, and the per-segment report.
    activity(n, homes.authority)
    with opened(n) as nn:
        p = pack.parse(evidence.export_evidence(nn, clock.now(), segment_entries=1).data)
        forged = repack(nn, [p.documents[0], p.documents[1], keep_signature(p.documents[2], _detail)])
    pack.write(tmp / "forged.pack", forged)
    r = run_cli("--home", a, "--json", "pack", "import", tmp / "forged.pack")
    assert r.code == 1, r.stdout + r.stderr
    assert r.json["ok"] is False
    assert r.json["error"]["kind"] == "bad-signature"
    nj = r.json["nodes"][node_id]
    assert nj["segments_accepted"] == 1
    assert nj["rejected"][0]["kind"] == "bad-signature"
    assert nj["rejected"][0]["from_seq"] == last + 2

    st = run_cli("--home", a, "--json", "evidence", "status")
    assert st.code == 0
    held = st.json["nodes"][node_id]
    assert held["last_seq"] == last + 1
    assert held["gaps"] == []
    assert held["rejections"] == 1
    text = run_cli("--home", a, "evidence", "status")
    assert text.code == 0
    assert node_id in text.stdout
    assert "gaps: none" in text.stdout

    # Usage and kinds at the edges.
    r = run_cli("--home", a, "--json", "pack", "export", "--evidence", "--to", tmp / "x.pack")
    assert r.code == 1
    assert r.json["error"]["kind"] == "malformed"
    r = run_cli("--home", n, "pack", "export", "--evidence", "--history", "--to", tmp / "x.pack")
    assert r.code == 2
    assert not (tmp / "x.pack").exists()
    r = run_cli("--home", a, "--json", "pack", "import", homes.export())
    assert r.code == 1
    assert r.json["error"]["kind"] == "malformed"
    assert "evidence only" in r.json["error"]["message"]
