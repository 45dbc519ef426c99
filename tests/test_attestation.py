"""Node attestation: the two-trip exchange, join tokens, and what a failure leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qhx_edge.core import documents as D  # noqa: N812
from qhx_edge.core.errors import AttestationFailed, BadSignature
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


# --- the authority's card: authenticated before anything is sealed to it -------------------------------------


def _rogue_card(tmp_path: Path) -> Path:
    """A courier's own 'authority' card for the same domain: its own keys, its own freshness role."""
    rogue = Authority.init(
        tmp_path / "rogue",
        "alpha.example",
        suite="hybrid",
        root_keys=1,
        root_threshold=1,
        passphrase=PASSPHRASE.encode(),
        now=clock.now(),
    )
    path = tmp_path / "rogue.card"
    path.write_bytes(rogue.card())
    return path


def _request(n: Path, card: Path, to: Path, *extra: str) -> object:
    return run_cli(
        "--home", n, "--json", "node", "attest", "request", "--method", "join-token",
        "--token", "qhx1-secret", "--authority-card", card, "--to", to, *extra,
    )  # fmt: skip


def test_a_swapped_authority_card_gets_no_join_token(homes: Homes, tmp_path: Path) -> None:
    rogue = _rogue_card(tmp_path)
    r = _request(homes.node_home, rogue, tmp_path / "req.pack")
    assert (r.code, r.json["error"]["kind"]) == (1, "bad-signature"), r.stdout  # type: ignore[attr-defined]
    assert not (tmp_path / "req.pack").exists()  # nothing was sealed to the courier's key

    genuine = tmp_path / "a.card"
    genuine.write_bytes(homes.authority.card())
    fp = attestation.parse_card(genuine.read_bytes()).fingerprint
    r = _request(homes.node_home, rogue, tmp_path / "req.pack", "--expect-fingerprint", fp)
    assert (r.code, r.json["error"]["kind"]) == (1, "anchor-mismatch"), r.stdout  # type: ignore[attr-defined]
    assert not (tmp_path / "req.pack").exists()

    r = _request(homes.node_home, genuine, tmp_path / "req.pack", "--expect-fingerprint", fp)
    assert r.code == 0, r.stdout  # type: ignore[attr-defined]
    r = _request(homes.node_home, genuine, tmp_path / "req2.pack")  # countersigned by the held root's freshness role
    assert r.code == 0, r.stdout  # type: ignore[attr-defined]


def test_evidence_is_never_sealed_to_a_swapped_authority_card(homes: Homes, tmp_path: Path) -> None:
    rogue = _rogue_card(tmp_path)
    r = run_cli("--home", homes.node_home, "--json", "pack", "export", "--evidence", "--seal-to", rogue, "--to",
                tmp_path / "ev.pack")  # fmt: skip
    assert (r.code, r.json["error"]["kind"]) == (1, "bad-signature"), r.stdout
    assert not (tmp_path / "ev.pack").exists()
    genuine = tmp_path / "a.card"
    genuine.write_bytes(homes.authority.card())
    r = run_cli("--home", homes.node_home, "--json", "pack", "export", "--evidence", "--seal-to", genuine, "--to",
                tmp_path / "ev.pack")  # fmt: skip
    assert r.code == 0, r.stdout


def test_a_challenge_pack_with_a_swapped_card_gets_no_evidence(homes: Homes, tmp_path: Path) -> None:
    auth, now = homes.authority, clock.now()
    token = attestation.create_join_token(auth, now, 600)
    with node.Node(homes.node_home, PASSPHRASE.encode) as n:
        card = attestation.parse_card(auth.card())
        request = attestation.unwrap(
            pack.unseal_if_sealed(
                attestation.request_pack(n, card, "join-token", now, token=token),
                card.encryption_key.kid,
                lambda: auth.identity.encryption,
            )[0]
        )
        challenge = attestation.challenge(auth, request, now)
        rogue = attestation.parse_card(_rogue_card(tmp_path).read_bytes())
        with pytest.raises(BadSignature):
            attestation.evidence_pack(n, challenge, rogue, now)
        assert attestation.evidence_pack(n, challenge, card, now)


def test_the_card_follows_a_rotation_of_the_freshness_role(homes: Homes, tmp_path: Path) -> None:
    auth, now = homes.authority, clock.now()
    old = auth.card()
    auth.rotate_root(now, root_keys=None, root_threshold=None, roles=("freshness",))
    new = auth.card()
    assert new != old
    with node.Node(homes.node_home, PASSPHRASE.encode) as n:
        n.import_pack(auth.export_pack(auth.export_documents(), now), now)
        attestation.check_authority_card(n, attestation.parse_card(new))
        with pytest.raises(BadSignature):  # countersigned by a freshness key the held root no longer names
            attestation.check_authority_card(n, attestation.parse_card(old))


# --- a node id belongs to its first card; tokens are spent when the exchange finishes ---------------------------


def _exchange(auth: Authority, n: node.Node, token: str, now: int) -> tuple[bytes, bytes]:
    """(request message, challenge message) of a join-token exchange, as the authority reads them."""
    card = attestation.parse_card(auth.card())
    sealed = attestation.request_pack(n, card, "join-token", now, token=token)
    request = attestation.unwrap(
        pack.unseal_if_sealed(sealed, card.encryption_key.kid, lambda: auth.identity.encryption)[0]
    )
    return request, attestation.challenge(auth, request, now)


def _evidence(n: node.Node, challenge: bytes, now: int) -> bytes:
    return attestation.respond(n, challenge, now)


def test_a_second_card_claiming_an_attested_node_id_is_refused(homes: Homes) -> None:
    from qhx_edge.core.cards import make_card
    from qhx_edge.core.suites import PrivateKey

    auth, now = homes.authority, clock.now()
    with node.Node(homes.node_home, PASSPHRASE.encode) as n:
        _, chal = _exchange(auth, n, attestation.create_join_token(auth, now, 600), now)
        attestation.finish(auth, _evidence(n, chal, now), now)  # node n is attested: its id is bound
        node_id, card = n.node_id, attestation.parse_card(n.card())
        body = attestation.parse_message(_exchange(auth, n, attestation.create_join_token(auth, now, 600), now)[0],
                                         "attest-request").body  # fmt: skip
    impostor = PrivateKey.generate("hybrid")
    fake_card = make_card(card.domain, node_id, impostor, card.encryption_key, now)
    token = attestation.create_join_token(auth, now, 600)
    forged = attestation.sign_message({**body, "card": fake_card, "token": token}, impostor)
    with pytest.raises(AttestationFailed, match="bound to another card"):
        attestation.challenge(auth, forged, now)


def test_a_delegation_for_another_card_with_this_node_id_is_not_accepted(homes: Homes) -> None:
    from qhx_edge.core.cards import spki
    from qhx_edge.core.suites import ES256, MLDSA65

    auth, now = homes.authority, clock.now()
    with node.Node(homes.node_home, PASSPHRASE.encode) as n:
        ident = n.identity
        docs = auth.issue_delegation(
            node_id=n.node_id,
            card_fingerprint="ab" * 32,  # another card claiming this node's id
            ca_spkis={alg: spki(ident.ca_key(alg, create=True)) for alg in (ES256, MLDSA65)},
            jwt_spki=spki(ident.jwt_key(create=True)),
            attestation={"method": "join-token"},
            now=now,
        )
        with pytest.raises(node.ImportRejected) as exc:
            n.import_pack(auth.export_pack(docs[:1], now), now)
        reports = exc.value.result.to_json()["documents"]
        assert [d["report"] for d in reports] == ["rejected:scope-violation"]


def test_a_join_token_is_spent_when_its_exchange_finishes_not_before(homes: Homes) -> None:
    auth, now = homes.authority, clock.now()
    token = attestation.create_join_token(auth, now, 7 * 86400)
    with node.Node(homes.node_home, PASSPHRASE.encode) as n:
        _, first = _exchange(auth, n, token, now)
        # The courier is slow: the first challenge expires unanswered (three days by default) ...
        late = now + attestation.CHALLENGE_TTL + 1
        with pytest.raises(AttestationFailed, match="expired"):
            attestation.finish(auth, _evidence(n, first, now), late)
        # ... and the token, never spent, earns a new challenge, answered two days later: it holds.
        _, second = _exchange(auth, n, token, late)
        docs = attestation.finish(auth, _evidence(n, second, late + 2 * 86400), late + 2 * 86400)
        assert D.parse(docs[0]).payload.type == "delegation"
        # Spent now: a third exchange with it fails at the challenge.
        with pytest.raises(AttestationFailed, match="already used"):
            _exchange(auth, n, token, late + 2 * 86400)


def test_two_pending_exchanges_with_one_token_deliver_one_delegation(homes: Homes) -> None:
    auth, now = homes.authority, clock.now()
    token = attestation.create_join_token(auth, now, 600)
    with node.Node(homes.node_home, PASSPHRASE.encode) as n:
        _, a = _exchange(auth, n, token, now)
        _, b = _exchange(auth, n, token, now)  # not spent by the first challenge
        attestation.finish(auth, _evidence(n, a, now), now)
        with pytest.raises(AttestationFailed, match="already used"):
            attestation.finish(auth, _evidence(n, b, now), now)


def test_the_policy_sets_how_long_a_challenge_lives(homes: Homes, tmp_path: Path) -> None:
    from qhx_edge.core.policyfile import parse_policy_file

    auth, now = homes.authority, clock.now()
    auth.publish_policy(parse_policy_file(b'[attestation]\nchallenge_ttl = "10m"\n', "p.toml"), now)
    with node.Node(homes.node_home, PASSPHRASE.encode) as n:
        card = attestation.parse_card(auth.card())
        sealed = attestation.request_pack(
            n, card, "join-token", now, token=attestation.create_join_token(auth, now, 600)
        )
        path = tmp_path / "req.pack"
        path.write_bytes(sealed)
        chal = attestation.unwrap(attestation.challenge_pack(auth, attestation.read_message(auth, path), now))
        assert attestation.parse_message(chal, "attest-challenge").body["expires"] == now + 600
