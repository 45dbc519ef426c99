"""Node attestation: the two-trip exchange, join tokens, and what a failure leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qhx_edge.core import documents as D  # noqa: N812
from qhx_edge.core.errors import AttestationFailed
from qhx_edge.homes import attestation, node
from qhx_edge.homes.authority import Authority
from qhx_edge.packs import pack
from qhx_edge.store import clock
from tests.conftest import PASSPHRASE, Homes, run_cli


def _ok(*args: str | Path) -> dict[str, object]:
    r = run_cli(args[0], args[1], "--json", *args[2:])  # --home HOME --json COMMAND...
    assert r.code == 0, (r.stdout, r.stderr)
    out: dict[str, object] = r.json
    return out


def test_join_token_attestation_through_the_cli(homes: Homes, tmp_path: Path) -> None:
    a, n = homes.a, homes.node_home
    token = str(_ok("--home", a, "authority", "join-token", "create", "--ttl", "10m")["token"])
    _ok("--home", a, "node", "card", "--to", tmp_path / "a.card")
    _ok(
        "--home",
        n,
        "node",
        "attest",
        "request",
        "--method",
        "join-token",
        "--token",
        token,
        "--authority-card",
        tmp_path / "a.card",
        "--to",
        tmp_path / "req.pack",
    )
    assert token.encode() not in (tmp_path / "req.pack").read_bytes()  # sealed: the token is a secret
    _ok("--home", a, "authority", "attest", "challenge", tmp_path / "req.pack", "--to", tmp_path / "chal.pack")
    _ok("--home", n, "node", "attest", "respond", tmp_path / "chal.pack", "--to", tmp_path / "ev.pack")
    _ok("--home", a, "authority", "attest", "finish", tmp_path / "ev.pack", "--to", tmp_path / "deleg.pack")
    out = _ok("--home", n, "pack", "import", tmp_path / "deleg.pack")
    reports = {d["type"]: d["report"] for d in out["documents"]}  # type: ignore[attr-defined]
    assert reports["delegation"] == "applied"
    docs = run_cli("--home", n, "--json", "doc", "list").json["documents"]
    assert any(d["type"] == "delegation" and d["current"] for d in docs)

    # The same token again: refused, nothing issued.
    r = run_cli(
        "--home",
        n,
        "--json",
        "node",
        "attest",
        "request",
        "--method",
        "join-token",
        "--token",
        token,
        "--authority-card",
        tmp_path / "a.card",
        "--to",
        tmp_path / "req2.pack",
    )
    assert r.code == 0
    before = json.loads((a / "authority.json").read_text())["versions"]
    r = run_cli(
        "--home",
        a,
        "--json",
        "authority",
        "attest",
        "challenge",
        tmp_path / "req2.pack",
        "--to",
        tmp_path / "chal2.pack",
    )
    assert (r.code, r.json["error"]["kind"]) == (1, "attestation-failed")
    assert "already used" in r.json["error"]["message"]
    assert json.loads((a / "authority.json").read_text())["versions"] == before
    assert not (tmp_path / "chal2.pack").exists()

    # The same evidence again (a replay): refused.
    r = run_cli(
        "--home", a, "--json", "authority", "attest", "finish", tmp_path / "ev.pack", "--to", tmp_path / "d2.pack"
    )
    assert (r.code, r.json["error"]["kind"]) == (1, "attestation-failed")
    assert json.loads((a / "authority.json").read_text())["versions"] == before


def _flow(auth: Authority, node_home: Path, token: str, now: int) -> tuple[bytes, bytes]:
    n = node.Node(node_home, PASSPHRASE.encode)
    try:
        req = attestation.make_request(n, "join-token", now, token=token)
        chal = attestation.challenge(auth, req, now)
        ev = attestation.respond(n, chal, now)
    finally:
        n.close()
    return chal, ev


def test_unknown_expired_and_foreign_tokens_fail(homes: Homes, tmp_path: Path) -> None:
    auth, now = homes.authority, clock.now()
    n = node.Node(homes.node_home, PASSPHRASE.encode)
    try:
        with pytest.raises(AttestationFailed, match="unknown"):
            attestation.challenge(auth, attestation.make_request(n, "join-token", now, token="qhx1-nope"), now)
        token = attestation.create_join_token(auth, now, 60)
        with pytest.raises(AttestationFailed, match="expired"):
            attestation.challenge(auth, attestation.make_request(n, "join-token", now, token=token), now + 61)
    finally:
        n.close()
    # A node of another domain cannot use this domain's token.
    other = Authority.init(
        tmp_path / "B", "bravo.example", suite="classical", root_keys=1, root_threshold=1, passphrase=None, now=now
    )
    node.init(tmp_path / "NB", other.anchor(), now, passphrase=PASSPHRASE.encode())
    token = attestation.create_join_token(auth, now, 600)
    nb = node.Node(tmp_path / "NB", PASSPHRASE.encode)
    try:
        with pytest.raises(AttestationFailed, match=r"belongs to bravo\.example"):
            attestation.challenge(auth, attestation.make_request(nb, "join-token", now, token=token), now)
    finally:
        nb.close()
    kinds = [a["outcome"] for a in attestation.AttestationStore(auth.home).attempts()]
    assert kinds.count("attestation-failed") == 3


def test_challenge_expiry_and_forged_evidence(homes: Homes, tmp_path: Path) -> None:
    auth, now = homes.authority, clock.now()
    token = attestation.create_join_token(auth, now, 600)
    _, ev = _flow(auth, homes.node_home, token, now)
    with pytest.raises(AttestationFailed, match="expired"):
        attestation.finish(auth, ev, now + attestation.CHALLENGE_TTL + 1)
    # Evidence signed by another key for the same challenge: refused.
    token = attestation.create_join_token(auth, now, 600)
    _, ev = _flow(auth, homes.node_home, token, now)
    msg = attestation.parse_message(ev, "attest-evidence")
    from qhx_edge.core.suites import PrivateKey

    forged = attestation.sign_message(msg.body, PrivateKey.generate("hybrid"))
    with pytest.raises(AttestationFailed, match="not signed"):
        attestation.finish(auth, forged, now)
    assert auth.state["versions"].get("delegation") is None  # nothing issued


def test_a_node_refuses_a_challenge_not_from_its_authority(homes: Homes, tmp_path: Path) -> None:
    auth, now = homes.authority, clock.now()
    token = attestation.create_join_token(auth, now, 600)
    n = node.Node(homes.node_home, PASSPHRASE.encode)
    try:
        chal = attestation.challenge(auth, attestation.make_request(n, "join-token", now, token=token), now)
        msg = attestation.parse_message(chal, "attest-challenge")
        from qhx_edge.core.suites import PrivateKey

        forged = attestation.sign_message(msg.body, PrivateKey.generate("hybrid"))
        with pytest.raises(AttestationFailed, match="not signed by this domain"):
            attestation.respond(n, forged, now)
        with pytest.raises(AttestationFailed, match="expired"):
            attestation.respond(n, chal, now + attestation.CHALLENGE_TTL)
    finally:
        n.close()


def test_delegation_pack_is_a_normal_documents_pack(homes: Homes) -> None:
    auth, now = homes.authority, clock.now()
    token = attestation.create_join_token(auth, now, 600)
    _, ev = _flow(auth, homes.node_home, token, now)
    docs = attestation.finish(auth, ev, now)
    deleg = D.parse(docs[0]).payload
    assert isinstance(deleg, D.Delegation)
    assert deleg.attestation == {"method": "join-token"}
    n = node.Node(homes.node_home)
    try:
        assert n.import_pack(auth.export_pack(docs, now), now).applied
    finally:
        n.close()
    assert pack.parse(auth.export_pack(docs, now)).manifest.kind == "documents"
