"""Agreements over their lifetime, through the real command line (issue 9; split from
tests/test_federation.py so the suite's two workers share the load): either side ends one and terms are
negotiated again, a rotated federation role renews them, a courier's own root cannot end one, partner
checks refuse a clock wound back, a partner's bundle leaves exports when trust ends, and the coalition
and pq-strict profiles limit every partner."""

from __future__ import annotations

from pathlib import Path

from qhx_edge.homes.node import Node
from tests.conftest import make_pack
from tests.test_federation import ALPHA, BETA, TERMS, _connected, agree, authority, fails, ok, reports, trust_digest


def test_either_side_ends_it_and_terms_are_renegotiated(tmp_path: Path) -> None:
    """Beta's revocation reaches alpha's node in beta's pack; a renegotiated agreement (version 2) replaces
    version 1 on both authorities and in the next freshness epoch."""
    a = authority(tmp_path, "A", ALPHA)
    b = authority(tmp_path, "B", BETA)
    n = tmp_path / "N"
    ok("--home", n, "--json", "node", "init", "--anchor", a[1], "--expect-fingerprint", a[2])
    agree(tmp_path, a, b, BETA, *TERMS, name="v1")
    # Renegotiate: beta proposes wider terms; version 2 for the pair, whichever side proposes.
    wider = ("--accept", "spiffe://alpha.example", "--release", "bundle", "--release", "freshness",
             "--max-staleness", "2h", "--expires", "30d", "--partner-accept", "spiffe://beta.example/ns")  # fmt: skip
    agree(tmp_path, b, a, ALPHA, *wider, name="v2")
    listed = {x["partner"]: x for x in ok("--home", a[0], "--json", "federation", "list")["agreements"]}
    assert (listed[BETA]["version"], listed[BETA]["status"]) == (2, "active")
    assert listed[BETA]["grants"][ALPHA]["accepts_from_partner"] == ["spiffe://beta.example/ns"]
    assert ok("--home", a[0], "--json", "status")["authority"]["agreements"] == {
        BETA: {"version": 2, "status": "active"}
    }
    p = tmp_path / "a.pack"
    ok("--home", a[0], "--json", "pack", "export", "--to", p)
    ok("--home", n, "--json", "pack", "import", p)
    rel = tmp_path / "b.pack"
    ok("--home", b[0], "--json", "pack", "export", "--partner", ALPHA, "--to", rel)
    ok("--home", n, "--json", "pack", "import", rel)
    ok("--home", n, "--json", "federation", "check", "spiffe://beta.example/ns/anything")
    # Version 1 replayed is a rollback; beta ends the agreement and its pack says so.
    fails("rollback", "--home", n, "--json", "pack", "import", tmp_path / "v1-agreement.pack")
    ok("--home", b[0], "--json", "federation", "revoke", "--partner", ALPHA)
    ended = tmp_path / "b-ended.pack"
    ok("--home", b[0], "--json", "pack", "export", "--partner", ALPHA, "--to", ended)
    out = ok("--home", n, "--json", "pack", "import", ended)
    assert (BETA, "agreement", "applied") in reports(out)
    fails("no-agreement", "--home", n, "--json", "federation", "check", "spiffe://beta.example/ns/anything")
    assert ok("--home", n, "--json", "status")["domains"][BETA]["mode"] == "no-agreement"


def test_rotating_our_federation_role_renews_agreements(tmp_path: Path) -> None:
    """Agreements signed with a retired federation key stop counting: the next epoch no longer names
    them, exports no longer carry them (a new node would find them below the new root's threshold),
    until each is negotiated again with the new key."""
    a = authority(tmp_path, "A", ALPHA)
    b = authority(tmp_path, "B", BETA)
    n, n2 = tmp_path / "N", tmp_path / "N2"
    for home in (n, n2):
        ok("--home", home, "--json", "node", "init", "--anchor", a[1], "--expect-fingerprint", a[2])
    agree(tmp_path, a, b, BETA, *TERMS, name="v1")
    mine, theirs = tmp_path / "a.pack", tmp_path / "b.pack"
    ok("--home", b[0], "--json", "pack", "export", "--partner", ALPHA, "--to", theirs)
    ok("--home", a[0], "--json", "pack", "export", "--to", mine)
    ok("--home", n, "--json", "pack", "import", mine)
    ok("--home", n, "--json", "pack", "import", theirs)
    inside = "spiffe://beta.example/ns/logistics/api"
    ok("--home", n, "--json", "federation", "check", inside)

    ok("--home", a[0], "--json", "authority", "rotate-root", "--rotate-role", "federation")
    listed = ok("--home", a[0], "--json", "federation", "list")["agreements"]
    assert [(x["partner"], x["status"]) for x in listed] == [(BETA, "renew")]
    fails("no-agreement", "--home", a[0], "--json", "pack", "export", "--partner", BETA, "--to", tmp_path / "x")
    ok("--home", a[0], "--json", "pack", "export", "--to", mine)
    ok("--home", n, "--json", "pack", "import", mine)
    fails("no-agreement", "--home", n, "--json", "federation", "check", inside)
    ok("--home", n2, "--json", "pack", "import", mine)  # nothing below the new root's threshold in it
    assert BETA not in ok("--home", n2, "--json", "status")["domains"]

    # Negotiated again with the new key: version 2, and trust is back.
    anchor = tmp_path / "A-root-2.cbor"
    fp = ok("--home", a[0], "--json", "authority", "anchor", "--to", anchor)["fingerprint"]
    agree(tmp_path, (a[0], anchor, fp), b, BETA, *TERMS, name="v2")
    ok("--home", a[0], "--json", "pack", "export", "--to", mine)
    ok("--home", n, "--json", "pack", "import", mine)
    assert ok("--home", n, "--json", "federation", "check", inside)["agreement_version"] == 2


def test_a_courier_cannot_terminate_an_agreement_with_a_root_of_its_own(tmp_path: Path) -> None:
    """A courier with no keys makes its own 'beta.example' authority and signs a terminated alpha-beta
    agreement at a huge version pinning that root, shipped beside it. A termination needs the partner
    root the node holds, so it is refused, the store is unchanged, and the real v2 still applies."""
    from qhx_edge.core import documents as D  # noqa: N812
    from qhx_edge.homes.authority import Authority
    from qhx_edge.store import clock
    from tests.conftest import PASSPHRASE

    a, b, n = _connected(tmp_path)
    inside = "spiffe://beta.example/ns/logistics/api"
    assert ok("--home", n, "--json", "federation", "check", inside)["trusted"]

    fake_home, fake_anchor, fake_fp = authority(tmp_path, "EVIL", BETA)
    evil = Authority.open(fake_home, PASSPHRASE.encode)
    now = clock.now()
    real = D.parse((a[0] / "published" / "agreement" / BETA / "1.cbor").read_bytes()).payload
    fields = {**real.to_dict(), "version": 2**62, "issued_at": now, "expires": now + 600, "status": "terminated"}
    fields["roots"] = {ALPHA: "00" * 32, BETA: fake_fp}
    forged = D.sign(D.Agreement.from_dict(fields), evil._signers("federation"))
    evil_pack = tmp_path / "evil.pack"
    evil_pack.write_bytes(make_pack([fake_anchor.read_bytes(), forged]))
    before = trust_digest(n)
    out = fails("threshold", "--home", n, "--json", "pack", "import", evil_pack)
    assert ("alpha.example", "agreement", "rejected:threshold") in reports(out)
    assert trust_digest(n) == before
    assert ok("--home", n, "--json", "federation", "check", inside)["trusted"]

    agree(tmp_path, a, b, BETA, *TERMS, name="ab2")
    again = tmp_path / "a2.pack"
    ok("--home", a[0], "--json", "pack", "export", "--to", again)
    ok("--home", n, "--json", "pack", "import", again)
    assert ok("--home", n, "--json", "federation", "check", inside)["agreement_version"] == 2


def test_partner_checks_refuse_a_clock_wound_back(tmp_path: Path) -> None:
    """``federation check`` and ``svid verify`` refuse a clock behind the latest time the node itself
    observed (``clock-rollback``), as issuance does: winding the clock back must not revive stale trust."""
    import pytest

    from qhx_edge.core.errors import ClockRollback
    from qhx_edge.store import clock
    from qhx_edge.store.trust_store import AuditEntry

    _a, _b, n = _connected(tmp_path)
    inside = "spiffe://beta.example/ns/logistics/api"
    now = clock.now()
    with Node(n) as node:
        assert node.check_partner_identity(inside, now)["spiffe_id"] == inside
        node.store.audit(now + 3 * 3600, [AuditEntry("test", "an event the node observed three hours on")])
        with pytest.raises(ClockRollback):
            node.check_partner_identity(inside, now)
        with pytest.raises(ClockRollback):
            node.verify_svid([b"not even parsed"], now)


def test_a_partner_bundle_is_exported_only_while_the_partner_is_trusted(tmp_path: Path) -> None:
    """``bundle export --domain PARTNER`` follows the agreement gate: after our side revokes, the node
    no longer hands the partner's bundle to SPIFFE software (``no-agreement``)."""
    a, _b, n = _connected(tmp_path)
    assert ok("--home", n, "--json", "bundle", "export", "--domain", BETA)["domain"] == BETA
    ok("--home", a[0], "--json", "federation", "revoke", "--partner", BETA)
    revoked = tmp_path / "revoked.pack"
    ok("--home", a[0], "--json", "pack", "export", "--to", revoked)
    ok("--home", n, "--json", "pack", "import", revoked)
    fails("no-agreement", "--home", n, "--json", "bundle", "export", "--domain", BETA)


def test_the_coalition_and_pq_strict_profiles_limit_every_partner(tmp_path: Path) -> None:
    """profiles/coalition.toml caps every partner's budget at 24 h and profiles/pq-strict.toml takes no
    partner trust from SPIFFE bundles ([federation] of a policy): the authority refuses terms over the
    cap, and a node applies a policy published after the agreement to it at once."""
    from tests.test_partner_fetch import bundle_json

    profiles = Path(__file__).resolve().parent.parent / "profiles"
    a, b = authority(tmp_path, "A", ALPHA), authority(tmp_path, "B", BETA)
    n = tmp_path / "N"
    ok("--home", n, "--json", "node", "init", "--anchor", a[1], "--expect-fingerprint", a[2])
    generous = [*TERMS[: TERMS.index("--max-staleness")], "--max-staleness", "48h", "--expires", "30d"]
    agree(tmp_path, a, b, BETA, *generous, "--allow-spiffe-bundles")
    for name, args in (("a.pack", ("--home", a[0])), ("b.pack", ("--home", b[0], "--partner", ALPHA))):
        ok(*args[:2], "--json", "pack", "export", *args[2:], "--to", tmp_path / name)
        ok("--home", n, "--json", "pack", "import", tmp_path / name)
    assert ok("--home", n, "--json", "status")["domains"][BETA]["agreement"]["max_staleness"] == 48 * 3600

    ok("--home", a[0], "--json", "authority", "publish", "policy", profiles / "coalition.toml")
    ok("--home", a[0], "--json", "pack", "export", "--to", tmp_path / "coalition.pack")
    ok("--home", n, "--json", "pack", "import", tmp_path / "coalition.pack")
    partner = ok("--home", n, "--json", "status")["domains"][BETA]
    assert partner["agreement"]["max_staleness"] == 24 * 3600  # the agreement says 48 h; the policy caps it
    # A new proposal over the cap is refused by our authority, one at the cap is signed.
    proposal = tmp_path / "over.pack"
    fails("scope-violation", "--home", a[0], "--json", "federation", "propose", "--partner", BETA,
          "--partner-anchor", b[1], "--expect-fingerprint", b[2], *generous, "--to", proposal)  # fmt: skip
    at_cap = [*TERMS[: TERMS.index("--max-staleness")], "--max-staleness", "24h", "--expires", "30d"]
    ok("--home", a[0], "--json", "federation", "propose", "--partner", BETA, "--partner-anchor", b[1],
       "--expect-fingerprint", b[2], *at_cap, "--to", proposal)  # fmt: skip

    # pq-strict: the agreement allows SPIFFE bundles, our policy does not.
    spiffe = tmp_path / "beta.json"
    from tests.pki import make_ca

    spiffe.write_bytes(bundle_json([make_ca("beta CA")], 1))
    ok("--home", n, "--json", "bundle", "import-spiffe", spiffe, "--domain", BETA)  # allowed under coalition
    ok("--home", a[0], "--json", "authority", "publish", "policy", profiles / "pq-strict.toml")
    ok("--home", a[0], "--json", "pack", "export", "--to", tmp_path / "strict.pack")
    ok("--home", n, "--json", "pack", "import", tmp_path / "strict.pack")
    spiffe.write_bytes(bundle_json([make_ca("beta CA")], 2))
    before = trust_digest(n)
    fails("scope-violation", "--home", n, "--json", "bundle", "import-spiffe", spiffe, "--domain", BETA)
    assert trust_digest(n) == before
    assert ok("--home", n, "--json", "status")["domains"][BETA]["agreement"]["max_staleness"] == 12 * 3600
    fails("scope-violation", "--home", a[0], "--json", "federation", "propose", "--partner", BETA,
          "--partner-anchor", b[1], "--expect-fingerprint", b[2], *TERMS, "--allow-spiffe-bundles",
          "--to", proposal)  # fmt: skip
