"""``pack export --for CARD-OR-SUMMARY`` (issue 10: a pack is a one-way sync session): what that peer
lacks, as a contact would send it, urgent first; importing it is the receiving half.  A partner's
node gets only what the agreement releases."""

from __future__ import annotations

import json
from pathlib import Path

from qhx_edge.core import documents as D  # noqa: N812
from qhx_edge.homes import node
from qhx_edge.packs import pack
from qhx_edge.store import clock
from tests.conftest import PASSPHRASE, attest_node, make_homes, run_cli
from tests.test_federation import ALPHA, BETA, TERMS, _connected, ok
from tests.test_sync_link import _held


def _types(path: Path) -> list[tuple[str, str, int]]:
    out = []
    for raw in pack.parse(pack.read(path)).documents:
        d = D.parse(raw)
        out.append((d.payload.domain, d.type, d.payload.version))
    return out


def test_a_pack_for_a_summary_carries_what_the_peer_lacks_urgent_first(tmp_path: Path) -> None:
    h = make_homes(tmp_path)
    behind = tmp_path / "N2"
    node.init(behind, h.authority.anchor(), clock.now(), passphrase=PASSPHRASE.encode())
    now = clock.now()
    with node.Node(behind) as n:  # the peer holds the first documents
        n.import_pack(h.authority.export_pack(h.authority.export_documents(), now), now)
    victim = tmp_path / "V"  # a node to revoke
    node.init(victim, h.authority.anchor(), clock.now(), passphrase=PASSPHRASE.encode())
    attest_node(h, victim)
    for _ in range(2):
        h.authority.rotate_root(clock.now(), root_keys=None, root_threshold=None)
    h.authority.publish_bundle(clock.now())
    with node.Node(victim) as v:
        h.authority.revoke(clock.now(), node_id=v.node_id)
    now = clock.now()
    with node.Node(h.node_home) as n:
        n.import_pack(h.authority.export_pack(h.authority.export_documents(), now), now)
    summary = tmp_path / "behind.json"
    summary.write_text(json.dumps(ok("--home", behind, "--json", "doc", "summary")))
    out = tmp_path / "for.pack"
    wrote = ok("--home", h.node_home, "--json", "pack", "export", "--for", summary, "--to", out)
    got = _types(out)
    assert wrote["documents"] == len(got)
    # Urgent first: roots (a rotation's keys sign what follows), then the revocation, then freshness.
    types = [t for _d, t, _v in got]
    assert types[:2] == ["root", "root"]
    assert types.index("revocation") < types.index("freshness") < types.index("bundle")
    assert sorted(v for _d, t, v in got if t == "root") == [2, 3]  # the chain from what it holds, not v1
    assert "policy" not in {t for _d, t, _v in got}  # it holds the newest policy already
    assert "delegation" not in {t for _d, t, _v in got}  # each node's own: never synced
    ok("--home", behind, "--json", "pack", "import", out)
    assert _held(behind) == _held(h.node_home)
    # Now in step: a second pack for its new summary carries nothing.
    summary.write_text(json.dumps(ok("--home", behind, "--json", "doc", "summary")))
    assert ok("--home", h.node_home, "--json", "pack", "export", "--for", summary, "--to", out)["documents"] == 0


def test_a_pack_for_a_partner_card_carries_only_what_the_agreement_releases(tmp_path: Path) -> None:
    _a, b, n = _connected(tmp_path)
    ok("--home", n, "--json", "pack", "export", "--to", tmp_path / "all.pack")
    held = {(d, t) for d, t, _v in _types(tmp_path / "all.pack")}
    assert {(ALPHA, "policy"), (BETA, "bundle")} <= held  # what the node could hand out
    beta_node = tmp_path / "BN"
    ok("--home", beta_node, "--json", "node", "init", "--anchor", b[1], "--expect-fingerprint", b[2])
    ok("--home", beta_node, "--json", "node", "card", "--to", tmp_path / "beta.card")
    out = tmp_path / "for-beta.pack"
    ok("--home", n, "--json", "pack", "export", "--for", tmp_path / "beta.card", "--to", out)
    got = {(d, t) for d, t, _v in _types(out)}
    release = TERMS[TERMS.index("--release") + 1 :: 2][:2]  # alpha releases bundle and freshness
    assert got == {(ALPHA, "root"), (ALPHA, "agreement"), *((ALPHA, t) for t in release)}, got
    # The beta node takes it (its own root is from its anchor; alpha's arrive pinned by the agreement).
    report = run_cli("--home", beta_node, "--json", "pack", "import", out)
    assert report.code in (0, 1), report.stdout
    # Its own domain's card: everything it could take.
    ok("--home", n, "--json", "node", "card", "--to", tmp_path / "own.card")
    ok("--home", n, "--json", "pack", "export", "--for", tmp_path / "own.card", "--to", out)
    assert {(d, t) for d, t, _v in _types(out)} >= {(ALPHA, "policy"), (BETA, "bundle")}


def test_for_refuses_what_it_cannot_read_and_other_selections(tmp_path: Path) -> None:
    h = make_homes(tmp_path)
    bad = tmp_path / "bad.json"
    for text in ("{not json", json.dumps({"format": "other"}), json.dumps({"format": "qhx-edge-summary",
                 "domains": {"alpha.example": {"root": {"version": "1"}}}, "domain": "alpha.example"})):  # fmt: skip
        bad.write_text(text)
        r = run_cli("--home", h.node_home, "--json", "pack", "export", "--for", bad, "--to", tmp_path / "x.pack")
        assert (r.code, r.json["error"]["kind"]) == (1, "malformed"), r.stdout
    bad.write_bytes(b"\x00\x01 not a card")
    r = run_cli("--home", h.node_home, "--json", "pack", "export", "--for", bad, "--to", tmp_path / "x.pack")
    assert (r.code, r.json["error"]["kind"]) == (1, "malformed"), r.stdout
    r = run_cli("--home", h.node_home, "--json", "pack", "export", "--for", bad, "--history", "--to", "x")
    assert r.code == 2
    assert not (tmp_path / "x.pack").exists()
