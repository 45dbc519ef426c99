"""TPM node attestation against a real software TPM (swtpm), end to end.

A genuine node attests and gets its delegation; wrong PCR values, a replayed
quote (an old nonce), an EK from an unknown manufacturer CA and a reused join
token each fail with ``attestation-failed`` and leave nothing issued.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qhx_edge.attest import tpm
from qhx_edge.core.errors import AttestationFailed
from qhx_edge.core.policyfile import policy_fields
from qhx_edge.homes import attestation, node
from qhx_edge.homes.authority import Authority
from qhx_edge.store import clock
from tests.conftest import PASSPHRASE, Homes, make_homes, run_cli
from tests.swtpm import SwTpm, swtpm_a, swtpm_b  # noqa: F401 - fixtures

PCRS = [0, 1, 7]


@pytest.fixture
def tpm_homes(tmp_path: Path, swtpm_a: SwTpm) -> tuple[Homes, SwTpm, dict[int, bytes]]:  # noqa: F811
    """An authority trusting swtpm_a's manufacturer, whose policy names swtpm_a's current PCRs."""
    homes = make_homes(tmp_path, suite="hybrid")
    with tpm.TpmClient(swtpm_a.tcti) as t:
        values = t.read_pcrs(PCRS)
    now = clock.now()
    fields = policy_fields({"attestation": {"tpm": {"pcrs": {str(i): v.hex() for i, v in values.items()}}}})
    homes.authority.publish_policy(fields, now)
    n = node.Node(homes.node_home)
    try:
        n.import_pack(homes.authority.export_pack(homes.authority.export_documents(), now), now)
    finally:
        n.close()
    return homes, swtpm_a, values


def _request(homes: Homes, t: SwTpm, now: int) -> bytes:
    n = node.Node(homes.node_home, PASSPHRASE.encode)
    try:
        with tpm.TpmClient(t.tcti) as client:
            return attestation.make_request(n, "tpm", now, tpm=client)
    finally:
        n.close()


def _respond(homes: Homes, t: SwTpm, challenge: bytes, now: int) -> bytes:
    n = node.Node(homes.node_home, PASSPHRASE.encode)
    try:
        with tpm.TpmClient(t.tcti) as client:
            return attestation.respond(n, challenge, now, tpm=client)
    finally:
        n.close()


def _issued(auth: Authority) -> int:
    return int(auth.state["versions"].get("delegation", 0))


def test_genuine_node_attests_with_its_tpm(tpm_homes: tuple[Homes, SwTpm, dict[int, bytes]]) -> None:
    homes, t, values = tpm_homes
    auth, now = homes.authority, clock.now()
    chal = attestation.challenge(auth, _request(homes, t, now), now, manufacturer_cas=t.manufacturer_cas, pcrs=PCRS)
    ev = _respond(homes, t, chal, now)
    docs = attestation.finish(auth, ev, now, expected_pcrs=values)
    assert _issued(auth) == 1
    n = node.Node(homes.node_home)
    try:
        assert n.import_pack(auth.export_pack(docs, now), now).applied
        deleg = n.store.current(auth.domain, "delegation")
        assert deleg is not None
        assert deleg.payload.attestation["method"] == "tpm"
        assert deleg.payload.attestation["pcrs"] == {str(i): v.hex() for i, v in values.items()}
    finally:
        n.close()


def test_wrong_pcr_values_fail(tpm_homes: tuple[Homes, SwTpm, dict[int, bytes]]) -> None:
    homes, t, values = tpm_homes
    auth, now = homes.authority, clock.now()
    chal = attestation.challenge(auth, _request(homes, t, now), now, manufacturer_cas=t.manufacturer_cas, pcrs=PCRS)
    ev = _respond(homes, t, chal, now)
    wrong = {**values, 7: bytes([0x5A]) * 32}  # not what this TPM's PCR 7 holds
    assert wrong != values
    with pytest.raises(AttestationFailed):
        attestation.finish(auth, ev, now, expected_pcrs=wrong)
    assert _issued(auth) == 0


def test_replayed_quote_with_an_old_nonce_fails(tpm_homes: tuple[Homes, SwTpm, dict[int, bytes]]) -> None:
    homes, t, values = tpm_homes
    auth, now = homes.authority, clock.now()
    chal1 = attestation.challenge(auth, _request(homes, t, now), now, manufacturer_cas=t.manufacturer_cas, pcrs=PCRS)
    ev1 = _respond(homes, t, chal1, now)
    attestation.finish(auth, ev1, now, expected_pcrs=values)
    assert _issued(auth) == 1
    # The same evidence again: the challenge is spent.
    with pytest.raises(AttestationFailed, match="already answered"):
        attestation.finish(auth, ev1, now, expected_pcrs=values)
    # An old quote (nonce of challenge 1) grafted onto a fresh challenge 2.
    chal2 = attestation.challenge(auth, _request(homes, t, now), now, manufacturer_cas=t.manufacturer_cas, pcrs=PCRS)
    ev2 = attestation.parse_message(_respond(homes, t, chal2, now), "attest-evidence")
    old = attestation.parse_message(ev1, "attest-evidence")
    body = dict(
        ev2.body, tpm=dict(ev2.body["tpm"], attest=old.body["tpm"]["attest"], signature=old.body["tpm"]["signature"])
    )
    n = node.Node(homes.node_home, PASSPHRASE.encode)
    try:
        replay = attestation.sign_message(body, n.identity.signer)  # even signed by the genuine node
    finally:
        n.close()
    with pytest.raises(AttestationFailed):
        attestation.finish(auth, replay, now, expected_pcrs=values)
    assert _issued(auth) == 1


def test_ek_from_an_unknown_manufacturer_fails(
    tpm_homes: tuple[Homes, SwTpm, dict[int, bytes]],
    swtpm_b: SwTpm,  # noqa: F811
) -> None:
    homes, t, _ = tpm_homes
    auth, now = homes.authority, clock.now()
    # The node uses TPM b, whose EK certificate comes from a CA the authority does not trust.
    with pytest.raises(AttestationFailed):
        attestation.challenge(auth, _request(homes, swtpm_b, now), now, manufacturer_cas=t.manufacturer_cas, pcrs=PCRS)
    assert _issued(auth) == 0
    kinds = [a["outcome"] for a in attestation.AttestationStore(auth.home).attempts()]
    assert kinds == ["attestation-failed"]


def test_reused_join_token_fails(tpm_homes: tuple[Homes, SwTpm, dict[int, bytes]]) -> None:
    homes, _, _ = tpm_homes
    auth, now = homes.authority, clock.now()
    token = attestation.create_join_token(auth, now, 600)
    n = node.Node(homes.node_home, PASSPHRASE.encode)
    try:
        chal = attestation.challenge(auth, attestation.make_request(n, "join-token", now, token=token), now)
        attestation.finish(auth, attestation.respond(n, chal, now), now)
        assert _issued(auth) == 1
        with pytest.raises(AttestationFailed, match="already used"):
            attestation.challenge(auth, attestation.make_request(n, "join-token", now, token=token), now)
    finally:
        n.close()
    assert _issued(auth) == 1


def test_tpm_attestation_through_the_cli(tpm_homes: tuple[Homes, SwTpm, dict[int, bytes]], tmp_path: Path) -> None:
    homes, t, values = tpm_homes
    a, nh = homes.a, homes.node_home

    def ok(*args: str | Path) -> None:
        r = run_cli(*args)
        assert r.code == 0, (r.stdout, r.stderr)

    root_pem = tmp_path / "mfr-root.der"
    issuer = tmp_path / "mfr-issuer.der"
    root_pem.write_bytes(t.root_ca)
    issuer.write_bytes(t.issuer_ca)
    ok("--home", a, "authority", "tpm-ca", root_pem)
    ok("--home", a, "authority", "tpm-ca", issuer)
    ok("--home", a, "node", "card", "--to", tmp_path / "a.card")
    ok(
        "--home",
        nh,
        "node",
        "attest",
        "request",
        "--method",
        "tpm",
        "--tpm",
        t.tcti,
        "--authority-card",
        tmp_path / "a.card",
        "--to",
        tmp_path / "req.pack",
    )
    ok("--home", a, "authority", "attest", "challenge", tmp_path / "req.pack", "--to", tmp_path / "chal.pack")
    ok("--home", nh, "node", "attest", "respond", tmp_path / "chal.pack", "--tpm", t.tcti, "--to", tmp_path / "ev.pack")
    ok("--home", a, "authority", "attest", "finish", tmp_path / "ev.pack", "--to", tmp_path / "deleg.pack")
    r = run_cli("--home", nh, "--json", "pack", "import", tmp_path / "deleg.pack")
    assert r.code == 0, r.stdout
    assert {d["type"]: d["report"] for d in r.json["documents"]}["delegation"] == "applied"
    assert values  # the policy named real PCR values
