"""Attacks on a node through the real CLI (``python -m qhx_edge`` in a subprocess).

Every rejected import must:

* exit with code 1 and print one JSON object ``{"ok": false, "error": {"kind": K}}``
  with the exact stable kind K (DESIGN.md "Command line");
* leave the node's trust state unchanged (``Store.trust_digest()`` covers every
  table but the audit log);
* append exactly one ``reject`` entry of that kind to the audit log, whose hash
  chain still verifies.

Clock attacks drive the subprocess clock with libfaketime (``FAKETIME=+N`` / ``-N``,
preloaded directly: see ``conftest.faketime_prefix``) and are skipped, with a reason,
where the faketime package is not installed.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest

from qhx_edge.core import cbor
from qhx_edge.core import documents as D  # noqa: N812 - the package's own alias
from qhx_edge.core.cose import COSE_SIGN_TAG
from qhx_edge.core.suites import PrivateKey
from qhx_edge.homes.authority import Authority
from qhx_edge.store import clock
from qhx_edge.store.trust_store import STORE_FILE, Store

from .conftest import PASSPHRASE, Homes, Result, faketime_prefix, find_libfaketime, make_pack, need, run_cli

A = "alpha.example"
B = "bravo.example"


@pytest.fixture
def libfaketime() -> None:
    """The clock attacks drive the CLI's clock with libfaketime (skipped without it, a failure in CI)."""
    need(
        find_libfaketime() is not None,
        "libfaketime is not installed (Debian package faketime): the clock attacks drive the CLI's clock with it",
    )


def uses_faketime(fn: Callable[..., Any]) -> Callable[..., Any]:
    return pytest.mark.faketime(pytest.mark.usefixtures("libfaketime")(fn))


def shifted(offset: str) -> list[str]:
    """A run_cli prefix that moves the subprocess clock by ``offset`` (e.g. ``+100d``, ``-1d``)."""
    return faketime_prefix(offset)


# --- helpers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    digest: str
    audit: list[dict[str, Any]]


def snapshot(home: Path) -> Snapshot:
    store = Store.open(home)
    try:
        assert store.integrity_check() == "ok"
        n = store.verify_audit_chain()
        entries = store.audit_entries()
        assert len(entries) == n
        return Snapshot(store.trust_digest(), entries)
    finally:
        store.close()


def import_ok(home: Path, pack_path: Path, prefix: list[str] | None = None) -> dict[str, Any]:
    r = run_cli("--home", home, "--json", "pack", "import", pack_path, prefix=prefix)
    assert r.code == 0, (r.stdout, r.stderr)
    out: dict[str, Any] = r.json
    assert out["ok"] is True
    return out


def assert_json_error(r: Result, code: int, kind: str) -> dict[str, Any]:
    assert r.code == code, (r.code, r.stdout, r.stderr)
    out: dict[str, Any] = r.json  # exactly one JSON object on stdout
    assert out["ok"] is False, out
    assert out["error"]["kind"] == kind, out
    assert isinstance(out["error"]["message"], str)
    assert out["error"]["message"]
    return out


def attack(
    home: Path,
    pack_path: Path,
    kind: str,
    prefix: list[str] | None = None,
    audited: tuple[str, str, int] | None = None,
    args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Import ``pack_path`` into ``home`` and check the rejection contract for ``kind``.

    ``audited`` is the (domain, type, version) of the document an audit entry of
    that kind must blame; ``None`` for rejections of the whole file or of the clock.
    """
    before = snapshot(home)
    r = run_cli("--home", home, "--json", "pack", "import", *args, pack_path, prefix=prefix)
    out = assert_json_error(r, 1, kind)
    after = snapshot(home)
    assert after.digest == before.digest, f"a rejected import ({kind}) changed the trust state"
    assert after.audit[: len(before.audit)] == before.audit, "the audit log was rewritten"
    new = after.audit[len(before.audit) :]
    assert new, "the rejection was not audited"
    assert {e["event"] for e in new} <= {"reject", "noop"}, new
    assert all(pack_path.name in e["detail"] for e in new), new
    blamed = [(e["domain"], e["type"], e["version"]) for e in new if e["event"] == "reject" and e["kind"] == kind]
    assert (audited or (None, None, None)) in blamed, new
    return out


def write_pack(path: Path, docs: list[bytes]) -> Path:
    """``docs`` in a v1 pack whose manifest an unknown relay signed (the documents must speak for themselves)."""
    path.write_bytes(make_pack(docs))
    return path


def doc_of(docs: list[bytes], type_: str, version: int | None = None) -> int:
    """Index of the (last) document of ``type_`` (and ``version``) in ``docs``."""
    hits = [
        i
        for i, raw in enumerate(docs)
        if D.parse(raw).type == type_ and (version is None or D.parse(raw).payload.version == version)
    ]
    assert hits, (type_, version)
    return hits[-1]


def flip_signature_byte(raw: bytes, which: int = 0) -> bytes:
    """Flip one bit in the middle of signature ``which``; the result still parses."""
    tag = cbor.decode(raw, max_size=D.MAX_DOCUMENT_SIZE, tags=frozenset({COSE_SIGN_TAG}))
    protected, unprotected, payload, sigs = tag.value
    sig = bytearray(sigs[which][2])
    sig[len(sig) // 2] ^= 0x01
    sigs[which][2] = bytes(sig)
    forged = cbor.encode(cbor2.CBORTag(COSE_SIGN_TAG, [protected, unprotected, payload, sigs]))
    assert forged != raw
    assert len(forged) == len(raw)
    D.parse(forged)  # well-formed and deterministic: only the signature is wrong
    return forged


def open_authority(home: Path) -> Authority:
    return Authority.open(home, PASSPHRASE.encode)


# --- rollback and equal-version conflicts -----------------------------------------------------


def test_rollback_to_an_older_pack(homes: Homes) -> None:
    now = clock.now()
    homes.authority.publish_bundle(now)  # bundle/freshness v2: never seen by the node
    p1 = homes.export("p1.pack")
    homes.authority.publish_bundle(now)  # v3
    p2 = homes.export("p2.pack")
    out = import_ok(homes.node_home, p2)
    assert out["applied"] is True

    attack(homes.node_home, p1, "rollback", audited=(A, "bundle", 2))

    # The contrast: the same newer pack again is an idempotent no-op, not a rejection.
    again = import_ok(homes.node_home, p2)
    assert again["applied"] is False
    assert snapshot(homes.node_home).audit[-1]["event"] == "noop"


def test_equal_version_with_other_bytes(homes: Homes, tmp_path: Path) -> None:
    twin_home = tmp_path / "A-twin"
    shutil.copytree(homes.a, twin_home)
    twin = open_authority(twin_home)
    now = clock.now()
    homes.authority.publish_bundle(now)
    twin.publish_bundle(now + 1)
    mine, theirs = homes.authority.export_documents(), twin.export_documents()
    b_mine, b_theirs = mine[doc_of(mine, "bundle")], theirs[doc_of(theirs, "bundle")]
    assert D.parse(b_mine).payload.version == D.parse(b_theirs).payload.version == 2
    assert b_mine != b_theirs

    import_ok(homes.node_home, write_pack(tmp_path / "mine.pack", mine))
    attack(
        homes.node_home,
        write_pack(tmp_path / "theirs.pack", theirs),
        "equal-version-conflict",
        audited=(A, "bundle", 2),
    )


# --- time ----------------------------------------------------------------------------------------


@uses_faketime
@pytest.mark.parametrize(
    ("offset", "blamed"),
    [
        pytest.param("+4d", "freshness", id="freshness-past-hard-budget"),
        pytest.param("+100d", "bundle", id="bundle-and-policy-past-lifetime"),
        pytest.param("+400d", "bundle", id="root-past-lifetime"),
    ],
)
def test_expired_pack_replayed_later(homes: Homes, offset: str, blamed: str) -> None:
    homes.authority.publish_bundle(clock.now())
    p = homes.export("old.pack")
    # At +4d only the freshness v2 is past its hard budget, so the bundle v2 it names is
    # unnamed (mix-and-match); the node reports and audits the cause: expired.  Past the
    # bundle's lifetime the bundle itself (first in the pack) is the expired document.
    attack(homes.node_home, p, "expired", prefix=shifted(offset), audited=(A, blamed, 2))


@uses_faketime
def test_not_yet_valid_pack_from_an_authority_clock_ahead(homes: Homes, tmp_path: Path) -> None:
    r = run_cli("--home", homes.a, "--json", "authority", "publish", "bundle", prefix=shifted("+1d"))
    assert r.code == 0, (r.stdout, r.stderr)
    p = tmp_path / "future.pack"
    r = run_cli("--home", homes.a, "--json", "pack", "export", "--to", p)
    assert r.code == 0, (r.stdout, r.stderr)
    attack(homes.node_home, p, "not-yet-valid", audited=(A, "bundle", 2))
    # Once the node's clock reaches the issue time the same pack is accepted.
    assert import_ok(homes.node_home, p, prefix=shifted("+1d"))["applied"] is True


@uses_faketime
def test_clock_moved_back_beyond_tolerance(homes: Homes) -> None:
    homes.authority.publish_bundle(clock.now())
    p = homes.export("new.pack")
    attack(homes.node_home, p, "clock-rollback", prefix=shifted("-1d"))

    r = run_cli("--home", homes.node_home, "--json", "status", prefix=shifted("-1d"))
    assert r.code == 0, (r.stdout, r.stderr)
    st = r.json
    assert st["ok"] is True
    assert st["clock"] == "rollback"
    assert st["domains"]["alpha.example"]["mode"] == "expired"
    assert st["domains"]["alpha.example"]["max_ttl"] == 0

    # With the clock fixed the node is connected again and the pack applies.
    r = run_cli("--home", homes.node_home, "--json", "status")
    assert r.code == 0, (r.stdout, r.stderr)
    assert r.json["clock"] == "ok"
    assert r.json["domains"]["alpha.example"]["mode"] == "connected"
    assert import_ok(homes.node_home, p)["applied"] is True


@uses_faketime
def test_clock_behind_within_tolerance_is_accepted(homes: Homes) -> None:
    homes.authority.publish_bundle(clock.now())
    p = homes.export("new.pack")
    assert import_ok(homes.node_home, p, prefix=shifted("-60s"))["applied"] is True


# --- signatures ------------------------------------------------------------------------------


@pytest.mark.parametrize("type_", ["bundle", "freshness", "root"])
def test_flipped_signature_byte(homes: Homes, tmp_path: Path, type_: str) -> None:
    now = clock.now()
    if type_ == "root":
        homes.authority.rotate_root(now, root_keys=None, root_threshold=None)  # root v2, signed by v1 and v2 keys
    else:
        homes.authority.publish_bundle(now)
    docs = homes.authority.export_documents()
    i = doc_of(docs, type_)
    assert D.parse(docs[i]).payload.version == 2  # a version the node does not hold yet
    docs[i] = flip_signature_byte(docs[i], 0)
    attack(homes.node_home, write_pack(tmp_path / "forged.pack", docs), "bad-signature", audited=(A, type_, 2))


def test_flipped_payload_byte_breaks_every_signature(homes: Homes, tmp_path: Path) -> None:
    homes.authority.publish_bundle(clock.now())
    docs = homes.authority.export_documents()
    i = doc_of(docs, "bundle")
    tag = cbor.decode(docs[i], max_size=D.MAX_DOCUMENT_SIZE, tags=frozenset({COSE_SIGN_TAG}))
    protected, unprotected, payload, sigs = tag.value
    # Change the refresh hint (a value, not the structure): still a valid bundle payload.
    body = D.parse(docs[i]).payload.to_dict()
    body["refresh_hint"] += 1
    new_payload = cbor.encode(body)
    assert len(new_payload) == len(payload)
    docs[i] = cbor.encode(cbor2.CBORTag(COSE_SIGN_TAG, [protected, unprotected, new_payload, sigs]))
    D.parse(docs[i])
    attack(homes.node_home, write_pack(tmp_path / "forged.pack", docs), "bad-signature", audited=(A, "bundle", 2))


@pytest.mark.parametrize(
    ("signer", "kind"),
    [
        pytest.param("stranger", "threshold", id="key-not-in-root"),
        pytest.param("policy", "wrong-role", id="policy-key-signs-bundle"),
        pytest.param("freshness", "wrong-role", id="freshness-key-signs-bundle"),
    ],
)
def test_bundle_resigned_by_a_key_the_root_does_not_allow(homes: Homes, tmp_path: Path, signer: str, kind: str) -> None:
    homes.authority.publish_bundle(clock.now())
    docs = homes.authority.export_documents()
    i = doc_of(docs, "bundle")
    payload = D.parse(docs[i]).payload
    keys = [PrivateKey.generate("hybrid")] if signer == "stranger" else homes.authority._signers(signer)
    docs[i] = D.sign(payload, keys)
    assert D.parse(docs[i]).payload == payload
    attack(homes.node_home, write_pack(tmp_path / "resigned.pack", docs), kind, audited=(A, "bundle", 2))


# --- garbage -------------------------------------------------------------------------------------


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _random(data: bytes) -> bytes:
    return random.Random(20240601).randbytes(len(data))


def _empty(data: bytes) -> bytes:
    return b""


def _trailing(data: bytes) -> bytes:
    return data + b"\x00"


def _not_a_pack(data: bytes) -> bytes:
    return cbor.encode({"format": "something-else", "version": 0, "documents": []})


@pytest.mark.parametrize(
    "mangle",
    [_truncated, _random, _empty, _trailing, _not_a_pack],
    ids=["truncated", "random-bytes", "empty", "trailing-byte", "not-a-pack"],
)
def test_malformed_file(homes: Homes, tmp_path: Path, mangle: Callable[[bytes], bytes]) -> None:
    homes.authority.publish_bundle(clock.now())
    good = homes.authority.export_pack(homes.authority.export_documents(), clock.now())
    p = tmp_path / "bad.pack"
    p.write_bytes(mangle(good))
    attack(homes.node_home, p, "malformed")


def test_truncated_document_inside_a_valid_pack(homes: Homes, tmp_path: Path) -> None:
    homes.authority.publish_bundle(clock.now())
    docs = homes.authority.export_documents()
    i = doc_of(docs, "bundle")
    docs[i] = docs[i][:-7]
    attack(homes.node_home, write_pack(tmp_path / "bad.pack", docs), "malformed")


# --- trust confusion -----------------------------------------------------------------------------


def test_pack_for_a_domain_the_node_does_not_trust(homes: Homes, tmp_path: Path) -> None:
    other = Authority.init(
        tmp_path / "B",
        "bravo.example",
        suite="hybrid",
        root_keys=1,
        root_threshold=1,
        passphrase=PASSPHRASE.encode(),
        now=clock.now(),
    )
    p = write_pack(tmp_path / "bravo.pack", other.export_documents())
    attack(homes.node_home, p, "unknown-domain", audited=(B, "root", 1))


def test_pack_mixing_domains_strict_is_rejected_whole(homes: Homes, tmp_path: Path) -> None:
    other = Authority.init(
        tmp_path / "B",
        "bravo.example",
        suite="hybrid",
        root_keys=1,
        root_threshold=1,
        passphrase=PASSPHRASE.encode(),
        now=clock.now(),
    )
    homes.authority.publish_bundle(clock.now())
    # Valid new documents for the home domain first: with --strict nothing of them may be applied.
    docs = homes.authority.export_documents() + other.export_documents()
    p = write_pack(tmp_path / "mixed.pack", docs)
    attack(homes.node_home, p, "unknown-domain", audited=(B, "root", 1), args=("--strict",))
    # Without --strict the valid documents apply and the foreign ones are reported.
    r = run_cli("--home", homes.node_home, "--json", "pack", "import", p)
    out = assert_json_error(r, 1, "unknown-domain")
    assert out["applied"] is True
    reports = {(d.get("domain"), d.get("type")): d["report"] for d in out["documents"]}
    assert reports[(A, "bundle")] == "applied"
    assert reports[(B, "root")] == "rejected:unknown-domain"


@pytest.mark.parametrize("case", ["bundle-alone", "bundle-with-older-freshness"])
def test_bundle_not_named_by_the_freshness(homes: Homes, tmp_path: Path, case: str) -> None:
    now = clock.now()
    auth = homes.authority
    auth.publish_bundle(now)  # bundle v2, freshness v2 (names bundle v2)
    auth.publish_bundle(now)  # bundle v3, freshness v3
    if case == "bundle-alone":
        docs = [auth.published("bundle", 3)]  # the node's freshness v1 names bundle v1
    else:
        docs = [auth.published("bundle", 3), auth.published("freshness", 2)]
    attack(homes.node_home, write_pack(tmp_path / "mix.pack", docs), "mix-and-match", audited=(A, "bundle", 3))


# --- environment errors (exit 3) and usage errors (exit 2) -----------------------------------------


def test_missing_pack_file(homes: Homes, tmp_path: Path) -> None:
    before = snapshot(homes.node_home)
    r = run_cli("--home", homes.node_home, "--json", "pack", "import", tmp_path / "nowhere.pack")
    assert_json_error(r, 3, "missing-file")
    assert snapshot(homes.node_home).digest == before.digest


def test_pack_path_is_a_directory(homes: Homes, tmp_path: Path) -> None:
    before = snapshot(homes.node_home)
    r = run_cli("--home", homes.node_home, "--json", "pack", "import", tmp_path)
    assert_json_error(r, 3, "missing-file")
    assert snapshot(homes.node_home).digest == before.digest


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["pack", "import"], id="missing-argument"),
        pytest.param(["pack", "frobnicate"], id="unknown-command"),
        pytest.param(["pack", "import", "--bogus", "x.pack"], id="unknown-option"),
    ],
)
def test_usage_error(homes: Homes, args: list[str]) -> None:
    before = snapshot(homes.node_home)
    r = run_cli("--home", homes.node_home, "--json", *args)
    assert_json_error(r, 2, "usage")
    r = run_cli("--home", homes.node_home, *args)
    assert r.code == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert "Usage" in r.stderr or "Error" in r.stderr
    after = snapshot(homes.node_home)
    assert after.digest == before.digest
    assert after.audit == before.audit


def test_locked_store(homes: Homes) -> None:
    homes.authority.publish_bundle(clock.now())
    p = homes.export("new.pack")
    before = snapshot(homes.node_home)
    holder = sqlite3.connect(homes.node_home / STORE_FILE, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        r = run_cli("--home", homes.node_home, "--json", "pack", "import", p)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert_json_error(r, 3, "store-locked")
    after = snapshot(homes.node_home)
    assert after.digest == before.digest
    assert after.audit == before.audit
    # Released: the same import goes through.
    assert import_ok(homes.node_home, p)["applied"] is True
    assert snapshot(homes.node_home).digest != before.digest
