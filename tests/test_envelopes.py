"""Envelopes a relay cannot spoil (issue 8, point 3; docs/architecture.md "Verification rules" 5 and 8).

A document is what its signers signed: the protected header and the payload.
Anyone on the courier path can add a junk signature or an unprotected header
to a genuine document without a key.  Such a copy is the same document: it is
not an equal-version conflict, it does not block the genuine copy, and what
the node stores and relays is the canonical envelope of the signatures that
verified, so the altered bytes go no further.  A forged copy of a root never
blocks the genuine one either.

Each test failed on 7a292f4 (before signed-content identity and canonical
envelopes): the altered copies were refused as ``equal-version-conflict``, or
broke the authority's next pack.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import cbor2

from qhx_edge.core import cbor
from qhx_edge.core import documents as D  # noqa: N812 - the package's own alias
from qhx_edge.core.cose import COSE_SIGN_TAG
from qhx_edge.store import clock
from qhx_edge.store.trust_store import STORE_FILE, Store

from .conftest import Homes, make_pack, run_cli

A = "alpha.example"


def parts(raw: bytes) -> list[Any]:
    tag = cbor.decode(raw, max_size=D.MAX_DOCUMENT_SIZE, tags=frozenset({COSE_SIGN_TAG}))
    return list(tag.value)


def spoiled(raw: bytes, *, header: bool = True, junk: bool = True, reorder: bool = True) -> bytes:
    """``raw`` as a relay with no key can alter it: unprotected headers, a junk signature, another order."""
    protected, unprotected, payload, sigs = parts(raw)
    if header:
        unprotected = {**unprotected, 33: b"relay was here"}
        sigs = [[s[0], {**s[1], 99: "x"}, s[2]] for s in sigs]
    if junk:
        sigs = [*sigs, [cbor.encode({1: -19}), {4: b"\x07" * 32}, b"\x00" * 64]]
    if reorder:
        sigs = sigs[::-1]
    out = cbor.encode(cbor2.CBORTag(COSE_SIGN_TAG, [protected, unprotected, payload, sigs]))
    assert out != raw
    assert parts(out)[0::2] == parts(raw)[0::2]  # the same signed content: protected header and payload
    return out


def import_cli(home: Path, path: Path, code: int = 0) -> dict[str, Any]:
    r = run_cli("--home", home, "--json", "pack", "import", path)
    assert r.code == code, (r.code, r.stdout, r.stderr)
    out: dict[str, Any] = r.json
    return out


def held(home: Path, *, history: bool = True) -> list[bytes]:
    store = Store.open(home)
    try:
        return store.held_documents(history=history)
    finally:
        store.close()


def test_altered_copies_are_the_genuine_documents(homes: Homes, tmp_path: Path) -> None:
    """A pack of relay-altered copies is applied, stored canonically, and the next genuine pack still applies."""
    now = clock.now()
    homes.authority.publish_bundle(now)  # bundle v2 + freshness v2
    genuine = homes.authority.export_documents()
    altered = [spoiled(d) for d in genuine]
    out = import_cli(homes.node_home, _write(tmp_path / "altered.pack", altered))
    assert out["applied"] is True
    # What the node holds is the authority's own bytes: the junk went no further.
    stored = held(homes.node_home)
    assert not set(altered) & set(stored)
    assert set(genuine) <= set(stored)
    # The authority's next pack carries the genuine v2 history beside v3: it applies.
    homes.authority.publish_bundle(now)
    out = import_cli(homes.node_home, homes.export("next.pack"))
    assert out["applied"] is True
    assert {(d["type"], d["version"], d["status"]) for d in out["documents"]} >= {
        ("bundle", 3, "applied"),
        ("freshness", 3, "applied"),
    }


def test_a_pack_holding_both_copies_applies_the_genuine_one(homes: Homes, tmp_path: Path) -> None:
    now = clock.now()
    homes.authority.publish_bundle(now)
    genuine = homes.authority.export_documents()
    batch = [spoiled(d) for d in genuine if D.parse(d).type != "root"] + genuine
    out = import_cli(homes.node_home, _write(tmp_path / "both.pack", batch))
    assert out["applied"] is True
    statuses = sorted(d["status"] for d in out["documents"])
    assert "rejected" not in " ".join(statuses), out
    assert set(genuine) <= set(held(homes.node_home))


def test_a_forged_root_copy_never_blocks_the_genuine_root(homes: Homes, tmp_path: Path) -> None:
    now = clock.now()
    homes.authority.rotate_root(now, root_keys=None, root_threshold=None)
    genuine = homes.authority.export_documents()
    root2 = next(d for d in genuine if D.parse(d).type == "root" and D.parse(d).payload.version == 2)
    protected, unprotected, payload, sigs = parts(root2)
    forged_sigs = [[s[0], s[1], bytes(len(s[2]))] for s in sigs]  # every signature zeroed
    forged = cbor.encode(cbor2.CBORTag(COSE_SIGN_TAG, [protected, unprotected, payload, forged_sigs]))
    batch = [forged, *genuine]
    # Exit 1: the forged copy is refused for its own fault; the genuine root is applied.
    out = import_cli(homes.node_home, _write(tmp_path / "forged-root.pack", batch), code=1)
    assert out["applied"] is True
    verdicts = {(d["index"], d["status"]) for d in out["documents"]}
    assert (0, "rejected:bad-signature") in verdicts, out
    assert any(d["type"] == "root" and d["version"] == 2 and d["status"] == "applied" for d in out["documents"]), out
    assert root2 in held(homes.node_home)


def test_a_node_relays_the_canonical_envelope(homes: Homes, tmp_path: Path) -> None:
    """What a node stores drops signatures that did not verify and every unprotected extra."""
    now = clock.now()
    homes.authority.publish_bundle(now)
    genuine = homes.authority.export_documents()
    only_altered = [spoiled(d, reorder=False) for d in genuine]
    import_cli(homes.node_home, _write(tmp_path / "a.pack", only_altered))
    for raw in held(homes.node_home):
        _, unprotected, _, sigs = parts(raw)
        assert unprotected == {}
        assert all(set(s[1]) <= {4} for s in sigs)
        assert b"\x07" * 32 not in [s[1].get(4) for s in sigs]
        kids = [(s[1][4], cbor.decode(s[0], max_size=64)[1]) for s in sigs]
        assert kids == sorted(kids)


def test_migration_re_keys_documents_by_signed_content(homes: Homes) -> None:
    """A store written when digests were of bytes opens, re-keyed, with the same trust state."""
    path = homes.node_home / STORE_FILE
    store = Store.open(homes.node_home)
    before = store.trust_digest()
    store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    for row_id, domain, type_, version, body in conn.execute(
        "SELECT id, domain, type, version, body FROM documents"
    ).fetchall():
        old = hashlib.sha256(body).digest()
        conn.execute("UPDATE documents SET digest = ? WHERE id = ?", (old, row_id))
        conn.execute(
            "UPDATE high_water SET digest = ? WHERE domain = ? AND type = ? AND version = ?",
            (old, domain, type_, version),
        )
    conn.execute("PRAGMA user_version = 5")
    conn.close()
    store = Store.open(homes.node_home)
    try:
        assert store.trust_digest() == before
        assert store.current(A, "bundle") is not None
    finally:
        store.close()
    r = run_cli("--home", homes.node_home, "--json", "status")
    assert r.code == 0, (r.stdout, r.stderr)


def _write(path: Path, docs: list[bytes]) -> Path:
    path.write_bytes(make_pack(docs))
    return path


def test_canonical_form_is_recognised_and_rebuilt(homes: Homes) -> None:
    """What cose.sign writes is canonical already (kept as is); a spoiled copy is rebuilt to exactly it."""
    for raw in homes.authority.export_documents():
        doc = D.parse(raw)
        assert doc.envelope.in_canonical_form
        everything = list(range(len(doc.envelope.signatures)))
        assert doc.canonical(everything) is doc
        bad = D.parse(spoiled(raw))
        assert not bad.envelope.in_canonical_form
        good = [i for i, s in enumerate(bad.envelope.signatures) if s.kid != b"\x07" * 32]
        assert bad.canonical(good).raw == raw
        for variant in (spoiled(raw, junk=False, reorder=False), spoiled(raw, header=False, junk=False)):
            assert not D.parse(variant).envelope.in_canonical_form or len(doc.envelope.signatures) == 1
