"""Agreements through the real command line, by pack files only (issue 9 point 1).

Two authorities (alpha.example, beta.example) make an agreement over files
(propose, show, accept, publish on both sides); alpha's node takes it from its
own authority's pack, then beta's documents from a pack beta exports for alpha
(only what the agreement releases); partner identities in scope verify, out of
scope are ``scope-violation``, past the budget ``stale``, after revocation
``no-agreement``; a partner rollback and a forged partner root are refused and
change nothing.  A third domain's documents and another pair's agreement,
relayed beside them, are refused (``unknown-domain``) or passed over (``not-mine``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qhx_edge.homes.node import Node
from tests.conftest import Result, faketime_prefix, find_libfaketime, make_pack, need, run_cli

ALPHA, BETA, GAMMA = "alpha.example", "beta.example", "gamma.example"


def ok(*args: str | Path, prefix: list[str] | None = None) -> dict[str, Any]:
    r = run_cli(*args, prefix=prefix)
    assert r.code == 0, (args, r.code, r.stdout, r.stderr)
    out: dict[str, Any] = r.json
    return out


def fails(kind: str, *args: str | Path, prefix: list[str] | None = None) -> dict[str, Any]:
    r: Result = run_cli(*args, prefix=prefix)
    assert r.code == 1, (args, r.code, r.stdout, r.stderr)
    out: dict[str, Any] = r.json
    assert out["error"]["kind"] == kind, out
    return out


def authority(tmp: Path, name: str, domain: str) -> tuple[Path, Path, str]:
    home = tmp / name
    ok("--home", home, "--json", "authority", "init", "--domain", domain, "--suite", "classical")
    anchor = tmp / f"{name}-root.cbor"
    fp = ok("--home", home, "--json", "authority", "anchor", "--to", anchor)["fingerprint"]
    return home, anchor, fp


def reports(out: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(d.get("domain", "?"), d.get("type", "?"), d["report"]) for d in out["documents"]]


def agree(
    tmp: Path,
    a: tuple[Path, Path, str],
    b: tuple[Path, Path, str],
    partner: str,
    *extra: str,
    name: str = "ab",
) -> Path:
    """``a`` proposes to ``b`` (domain ``partner``), ``b`` accepts, both publish; the doubly signed pack."""
    proposal, agreement = tmp / f"{name}-proposal.pack", tmp / f"{name}-agreement.pack"
    ok(
        "--home", a[0], "--json", "federation", "propose", "--partner", partner,
        "--partner-anchor", b[1], "--expect-fingerprint", b[2], *extra, "--to", proposal,
    )  # fmt: skip
    ok("--home", b[0], "--json", "federation", "accept", proposal, "--expect-fingerprint", a[2], "--to", agreement)
    ok("--home", b[0], "--json", "federation", "publish", agreement)
    ok("--home", a[0], "--json", "federation", "publish", agreement)
    return agreement


def trust_digest(home: Path) -> str:
    with Node(home) as n:
        return n.store.trust_digest()


TERMS = (
    "--accept", "spiffe://beta.example/ns/logistics", "--release", "bundle", "--release", "freshness",
    "--max-staleness", "1h", "--expires", "30d", "--partner-accept", "spiffe://alpha.example/ns/ops",
)  # fmt: skip


def test_agreement_by_pack_files(tmp_path: Path) -> None:
    a = authority(tmp_path, "A", ALPHA)
    b = authority(tmp_path, "B", BETA)
    n = tmp_path / "N"
    ok("--home", n, "--json", "node", "init", "--anchor", a[1], "--expect-fingerprint", a[2])
    first = tmp_path / "a1.pack"
    ok("--home", a[0], "--json", "pack", "export", "--to", first)
    ok("--home", n, "--json", "pack", "import", first)

    # Propose; the partner reviews both directions before it signs.
    proposal = tmp_path / "proposal.pack"
    fails(
        "anchor-mismatch", "--home", a[0], "--json", "federation", "propose", "--partner", BETA,
        "--partner-anchor", b[1], "--expect-fingerprint", "00" * 32, *TERMS, "--to", proposal,
    )  # fmt: skip
    fails(
        "malformed", "--home", a[0], "--json", "federation", "propose", "--partner", BETA,
        "--partner-anchor", b[1], "--expect-fingerprint", b[2], *TERMS, "--accept", "spiffe://gamma.example/x",
        "--to", proposal,
    )  # fmt: skip
    ok(
        "--home", a[0], "--json", "federation", "propose", "--partner", BETA,
        "--partner-anchor", b[1], "--expect-fingerprint", b[2], *TERMS, "--to", proposal,
    )  # fmt: skip
    shown = ok("--json", "federation", "show", proposal)["agreement"]
    assert shown["grants"][ALPHA]["accepts_from_partner"] == ["spiffe://beta.example/ns/logistics"]
    assert shown["grants"][ALPHA]["releases_to_partner"] == ["root", "bundle", "freshness"]
    assert shown["grants"][ALPHA]["max_staleness"] == 3600
    assert shown["grants"][BETA]["accepts_from_partner"] == ["spiffe://alpha.example/ns/ops"]
    assert shown["signed_by"][ALPHA] == "yes"
    assert shown["signed_by"][BETA] != "yes"
    assert shown["roots"] == {ALPHA: a[2], BETA: b[2]}
    text = run_cli("federation", "show", proposal)
    assert text.code == 0
    assert "alpha.example grants beta.example" in text.stdout

    # Accept: the proposer's root must be the one its operator named.
    agreement = tmp_path / "agreement.pack"
    fails(
        "anchor-mismatch", "--home", b[0], "--json", "federation", "accept", proposal,
        "--expect-fingerprint", "11" * 32, "--to", agreement,
    )  # fmt: skip
    fails("domain-mismatch", "--home", a[0], "--json", "federation", "accept", proposal,
          "--expect-fingerprint", a[2], "--to", agreement)  # fmt: skip
    # A proposal alone cannot be published: beta has not signed it.
    fails("threshold", "--home", a[0], "--json", "federation", "publish", proposal)
    ok("--home", b[0], "--json", "federation", "accept", proposal, "--expect-fingerprint", a[2], "--to", agreement)
    assert ok("--json", "federation", "show", agreement)["agreement"]["signed_by"] == {ALPHA: "yes", BETA: "yes"}
    pub_b = ok("--home", b[0], "--json", "federation", "publish", agreement)["published"]
    pub_a = ok("--home", a[0], "--json", "federation", "publish", agreement)["published"]
    assert [p["type"] for p in pub_a] == ["agreement", "freshness"] == [p["type"] for p in pub_b]
    assert pub_a[0]["digest"] == pub_b[0]["digest"]  # one document, signed by both
    fails("rollback", "--home", a[0], "--json", "federation", "publish", agreement)
    listed = ok("--home", a[0], "--json", "federation", "list")["agreements"]
    assert [(x["partner"], x["version"], x["status"]) for x in listed] == [(BETA, 1, "active")]

    # Beta's pack before alpha's freshness names the agreement: the agreement (signed by both) is
    # taken, but the gate is closed, so none of beta's documents are.
    released = tmp_path / "b-for-alpha.pack"
    ok("--home", b[0], "--json", "pack", "export", "--partner", ALPHA, "--to", released)
    out = fails("no-agreement", "--home", n, "--json", "pack", "import", released)
    rep = reports(out)
    assert (ALPHA, "agreement", "applied") in rep
    assert {r for d, _, r in rep if d == BETA} == {"rejected:no-agreement"}
    assert BETA not in ok("--home", n, "--json", "status")["domains"]

    # Alpha's own pack carries the agreement, the beta root it pins and a freshness naming it.
    second = tmp_path / "a2.pack"
    ok("--home", a[0], "--json", "pack", "export", "--to", second)
    out = ok("--home", n, "--json", "pack", "import", second)
    rep = reports(out)
    assert (BETA, "root", "applied") in rep
    assert (ALPHA, "agreement", "already-held") in rep
    assert (ALPHA, "freshness", "applied") in rep
    st = ok("--home", n, "--json", "status")["domains"][BETA]
    assert st["relation"] == "partner"
    assert st["anchor_fingerprint"] == b[2]
    assert st["mode"] == "expired"  # no beta freshness yet
    assert st["agreement"]["version"] == 1
    held = [d for d in ok("--home", n, "--json", "doc", "list")["documents"] if d["type"] == "agreement"]
    assert [(d["domain"], d["partner"], d["version"], d["status"], d["current"]) for d in held] == [
        (ALPHA, BETA, 1, "active", True)
    ]

    # Beta's release for alpha: its root, the agreement, bundle and freshness; verified against beta's root.
    out = ok("--home", n, "--json", "pack", "import", released)
    rep = reports(out)
    assert (BETA, "bundle", "applied") in rep
    assert (BETA, "freshness", "applied") in rep
    st = ok("--home", n, "--json", "status")["domains"][BETA]
    assert st["mode"] == "connected"
    assert st["agreement"]["max_staleness"] == 3600
    assert st["versions"]["bundle"] == 1
    assert st["versions"]["policy"] is None

    # Identities: inside scope, outside scope, our own domain is not a partner's.
    inside = "spiffe://beta.example/ns/logistics/api"
    assert ok("--home", n, "--json", "federation", "check", inside)["agreement_version"] == 1
    fails("scope-violation", "--home", n, "--json", "federation", "check", "spiffe://beta.example/ns/logisticsx")
    fails("scope-violation", "--home", n, "--json", "federation", "check", "spiffe://beta.example/ns/other/api")
    fails("no-agreement", "--home", n, "--json", "federation", "check", "spiffe://gamma.example/ns/x")

    # Beta's full export holds its policy, which beta does not release to alpha: refused, the rest applies.
    full = tmp_path / "b-full.pack"
    ok("--home", b[0], "--json", "pack", "export", "--to", full)
    out = fails("scope-violation", "--home", n, "--json", "pack", "import", full)
    assert (BETA, "policy", "rejected:scope-violation") in reports(out)

    # A partner rollback: beta moves on, then an old beta freshness alone is refused.
    ok("--home", b[0], "--json", "authority", "publish", "freshness")
    newer = tmp_path / "b-newer.pack"
    ok("--home", b[0], "--json", "pack", "export", "--partner", ALPHA, "--to", newer)
    ok("--home", n, "--json", "pack", "import", newer)
    old = tmp_path / "b-old.pack"
    old.write_bytes(make_pack([(b[0] / "published" / "freshness" / "2.cbor").read_bytes()]))
    before = trust_digest(n)
    fails("rollback", "--home", n, "--json", "pack", "import", old)
    assert trust_digest(n) == before

    # A forged partner root: an impostor authority for beta.example rotates to a root v2 of its own.
    fake = tmp_path / "F"
    ok("--home", fake, "--json", "authority", "init", "--domain", BETA, "--suite", "classical")
    ok("--home", fake, "--json", "authority", "rotate-root")
    forged = tmp_path / "forged.pack"
    forged.write_bytes(make_pack([(fake / "published" / "root" / "2.cbor").read_bytes()]))
    out = run_cli("--home", n, "--json", "pack", "import", forged)
    assert out.code == 1, out.stdout
    assert out.json["error"]["kind"] in ("threshold", "bad-signature"), out.stdout
    assert trust_digest(n) == before
    assert ok("--home", n, "--json", "status")["domains"][BETA]["versions"]["root"] == 1

    # Past the agreement's budget (1 h) the partner is stale, though its own documents have not expired.
    if find_libfaketime() is not None:
        later = faketime_prefix("+2h")
        fails("stale", "--home", n, "--json", "federation", "check", inside, prefix=later)
        assert ok("--home", n, "--json", "status", prefix=later)["domains"][BETA]["mode"] == "expired"
    else:
        need(False, "libfaketime is not installed (Debian package faketime)")

    # Beta rotates its root and pki key: alpha's node follows the chain from the pinned root.
    ok("--home", b[0], "--json", "authority", "rotate-root", "--rotate-role", "pki")
    rotated = tmp_path / "b-rotated.pack"
    ok("--home", b[0], "--json", "pack", "export", "--partner", ALPHA, "--to", rotated)
    out = ok("--home", n, "--json", "pack", "import", rotated)
    assert (BETA, "root", "applied") in reports(out)
    st = ok("--home", n, "--json", "status")["domains"][BETA]
    assert (st["versions"]["root"], st["mode"], st["anchor_fingerprint"]) == (2, "connected", b[2])
    ok("--home", n, "--json", "federation", "check", inside)

    # An expired agreement stops trust in the partner with no pack at all.
    if find_libfaketime() is not None:
        fails("no-agreement", "--home", n, "--json", "federation", "check", inside, prefix=faketime_prefix("+31d"))

    # Revocation: a terminated version and a freshness without beta close trust at once.
    revoked = ok("--home", a[0], "--json", "federation", "revoke", "--partner", BETA)["published"]
    assert [(p["type"], p["version"]) for p in revoked] == [("agreement", 2), ("freshness", 3)]
    third = tmp_path / "a3.pack"
    ok("--home", a[0], "--json", "pack", "export", "--to", third)
    out = ok("--home", n, "--json", "pack", "import", third)
    assert (ALPHA, "agreement", "applied") in reports(out)
    fails("no-agreement", "--home", n, "--json", "federation", "check", inside)
    st = ok("--home", n, "--json", "status")["domains"][BETA]
    assert st["mode"] == "no-agreement"
    ok("--home", b[0], "--json", "authority", "publish", "freshness")
    after = tmp_path / "b-after.pack"
    ok("--home", b[0], "--json", "pack", "export", "--partner", ALPHA, "--to", after)  # beta has not revoked
    out = fails("no-agreement", "--home", n, "--json", "pack", "import", after)
    assert (BETA, "freshness", "rejected:no-agreement") in reports(out)
    fails("no-agreement", "--home", a[0], "--json", "federation", "revoke", "--partner", BETA)
    # The revoked agreement cannot be brought back: alpha's older pack replays version 1.
    before = trust_digest(n)
    out = fails("rollback", "--home", n, "--json", "pack", "import", second)
    assert (ALPHA, "agreement", "rejected:rollback") in reports(out)
    assert trust_digest(n) == before


def test_three_domains_relayed_documents(tmp_path: Path) -> None:
    """alpha-beta and beta-gamma agreements: one relayed pack (beta's documents, gamma's release for
    beta, beta's release for alpha) is accepted only where each node's agreements allow: alpha's
    node takes beta's and refuses gamma's; a beta node takes gamma's."""
    a = authority(tmp_path, "A", ALPHA)
    b = authority(tmp_path, "B", BETA)
    g = authority(tmp_path, "G", GAMMA)
    n = tmp_path / "N"
    ok("--home", n, "--json", "node", "init", "--anchor", a[1], "--expect-fingerprint", a[2])
    agree(tmp_path, a, b, BETA, *TERMS, name="ab")
    bg_terms = ("--accept", "spiffe://gamma.example", "--release", "bundle", "--release", "freshness",
                "--max-staleness", "1h", "--expires", "30d")  # fmt: skip
    agree(tmp_path, b, g, GAMMA, *bg_terms, name="bg")
    from qhx_edge.packs import pack

    # Before alpha's own pack: alpha's proposal (signed by alpha alone) beside beta's root is not an
    # agreement; the doubly signed one beside an impostor's beta root opens nothing.
    proposal = list(pack.parse((tmp_path / "ab-proposal.pack").read_bytes()).documents)
    signed = pack.parse((tmp_path / "ab-agreement.pack").read_bytes()).documents
    one_side = tmp_path / "one-side.pack"
    one_side.write_bytes(make_pack([*proposal, b[1].read_bytes()]))
    before = trust_digest(n)
    out = fails("threshold", "--home", n, "--json", "pack", "import", one_side)
    assert (ALPHA, "agreement", "rejected:threshold") in reports(out)
    assert trust_digest(n) == before
    fake = tmp_path / "F"
    ok("--home", fake, "--json", "authority", "init", "--domain", BETA, "--suite", "classical")
    impostor = tmp_path / "impostor.pack"
    impostor.write_bytes(make_pack([signed[-1], (fake / "published" / "root" / "1.cbor").read_bytes()]))
    out = fails("anchor-mismatch", "--home", n, "--json", "pack", "import", impostor)
    assert (ALPHA, "agreement", "rejected:anchor-mismatch") in reports(out)
    assert trust_digest(n) == before

    p = tmp_path / "a.pack"
    ok("--home", a[0], "--json", "pack", "export", "--to", p)
    ok("--home", n, "--json", "pack", "import", p)

    # A beta node's relay: beta's own export (its agreements with both, gamma's pinned root),
    # gamma's release for beta, beta's release for alpha, in one pack signed by a stranger.
    bfull, g_for_b, b_for_a = tmp_path / "bfull.pack", tmp_path / "g-for-b.pack", tmp_path / "b-for-a.pack"
    ok("--home", b[0], "--json", "pack", "export", "--to", bfull)
    ok("--home", g[0], "--json", "pack", "export", "--partner", BETA, "--to", g_for_b)
    ok("--home", b[0], "--json", "pack", "export", "--partner", ALPHA, "--to", b_for_a)
    docs = []
    for f in (bfull, g_for_b, b_for_a):
        docs += pack.parse(f.read_bytes()).documents
    relay = tmp_path / "relay.pack"
    relay.write_bytes(make_pack(list(dict.fromkeys(docs))))
    out = run_cli("--home", n, "--json", "pack", "import", relay)
    assert out.code == 1, out.stdout
    rep = reports(out.json)
    assert (BETA, "freshness", "applied") in rep
    assert (BETA, "bundle", "applied") in rep
    assert all(r == "rejected:unknown-domain" for d, _, r in rep if d == GAMMA), rep
    assert (BETA, "agreement", "not-mine") in rep  # the beta-gamma agreement (proposed by beta)
    assert (BETA, "policy", "rejected:scope-violation") in rep  # beta does not release its policy to alpha
    st = ok("--home", n, "--json", "status")["domains"]
    assert set(st) == {ALPHA, BETA}
    assert st[BETA]["mode"] == "connected"

    # Node to node: what alpha's node holds (its agreement, beta's documents) relayed to a new alpha node.
    hop, n3 = tmp_path / "hop.pack", tmp_path / "N3"
    ok("--home", n, "--json", "pack", "export", "--to", hop)
    ok("--home", n3, "--json", "node", "init", "--anchor", a[1], "--expect-fingerprint", a[2])
    out = ok("--home", n3, "--json", "pack", "import", hop)
    assert (BETA, "freshness", "applied") in reports(out)
    assert ok("--home", n3, "--json", "status")["domains"][BETA]["mode"] == "connected"
    ok("--home", n3, "--json", "federation", "check", "spiffe://beta.example/ns/logistics/x")

    # The same relayed pack on a beta node: there the beta-gamma agreement allows gamma's documents.
    nb = tmp_path / "NB"
    ok("--home", nb, "--json", "node", "init", "--anchor", b[1], "--expect-fingerprint", b[2])
    out = ok("--home", nb, "--json", "pack", "import", relay)
    rep = reports(out)
    assert (GAMMA, "bundle", "applied") in rep
    assert (GAMMA, "freshness", "applied") in rep
    assert (BETA, "agreement", "applied") in rep
    st = ok("--home", nb, "--json", "status")["domains"]
    assert st[GAMMA]["relation"] == "partner"
    assert st[GAMMA]["mode"] == "connected"
    assert st[ALPHA]["relation"] == "partner"  # the alpha root beta's agreement pins; alpha sent no bundle
    ok("--home", nb, "--json", "federation", "check", "spiffe://gamma.example/any/workload")
    fails("stale", "--home", nb, "--json", "federation", "check", "spiffe://alpha.example/ns/ops/x")
    fails("scope-violation", "--home", nb, "--json", "federation", "check", "spiffe://alpha.example/ns/dev/x")


def _pem(chain: list[bytes]) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return b"".join(x509.load_der_x509_certificate(c).public_bytes(Encoding.PEM) for c in chain)


def test_partner_svids_by_pack_files(tmp_path: Path) -> None:
    """A beta workload's X.509-SVID verifies on alpha's node inside the agreement's scope; outside it is
    ``scope-violation``, past alpha's budget ``stale``, after revocation ``no-agreement``."""
    from qhx_edge.core.suites import ES256
    from qhx_edge.issue.issuer import Issuer
    from qhx_edge.store import clock
    from tests.conftest import PASSPHRASE, make_homes
    from tests.test_issuance import STALENESS, Clock, attested

    now = clock.now()
    beta = make_homes(tmp_path / "beta", domain=BETA, suite="classical")
    inside, outside = "spiffe://beta.example/ns/logistics/api", "spiffe://beta.example/ns/other/api"
    policy = {
        "staleness": STALENESS,
        "algorithms": {"/": "ES256"},
        "registrations": [
            {"spiffe_id": inside, "selectors": ["unix:uid:1000"]},
            {"spiffe_id": outside, "selectors": ["unix:uid:2000"]},
        ],
    }
    attested(beta, now, policy, algs=(ES256,))
    pems, jwts = {}, {}
    with Issuer(beta.node_home, PASSPHRASE.encode, now=Clock(now)) as iss:
        for uid, sid in (("1000", inside), ("2000", outside)):
            (svid,) = iss.x509_svids(frozenset({f"unix:uid:{uid}"}))
            assert svid.spiffe_id == sid
            pems[sid] = tmp_path / f"{uid}.pem"
            pems[sid].write_bytes(_pem(svid.cert_chain))
            (jwt,) = iss.jwt_svids(frozenset({f"unix:uid:{uid}"}), ["spiffe://alpha.example/ns/ops/db"], None)
            jwts[sid] = jwt.token

    a = authority(tmp_path, "A", ALPHA)
    b_anchor = tmp_path / "beta-root.cbor"
    b = (beta.a, b_anchor, ok("--home", beta.a, "--json", "authority", "anchor", "--to", b_anchor)["fingerprint"])
    n = tmp_path / "N"
    ok("--home", n, "--json", "node", "init", "--anchor", a[1], "--expect-fingerprint", a[2])
    agree(tmp_path, a, b, BETA, *TERMS)
    ours, theirs = tmp_path / "a.pack", tmp_path / "b.pack"
    ok("--home", a[0], "--json", "pack", "export", "--to", ours)
    ok("--home", n, "--json", "pack", "import", ours)
    fails("stale", "--home", n, "--json", "svid", "verify", pems[inside])  # no beta freshness yet
    ok("--home", beta.a, "--json", "pack", "export", "--partner", ALPHA, "--to", theirs)
    ok("--home", n, "--json", "pack", "import", theirs)

    # alpha's issuer (Workload API) serves beta's bundle and validates beta's JWT-SVIDs under the agreement.
    from qhx_edge.core.errors import QhxError

    def workload_view(at: int) -> tuple[set[str], dict[str, str]]:
        with Issuer(n, PASSPHRASE.encode, now=Clock(at)) as alpha_iss:
            kinds = {}
            for sid, token in jwts.items():
                try:
                    alpha_iss.validate_jwt(token, "spiffe://alpha.example/ns/ops/db")
                    kinds[sid] = "ok"
                except QhxError as exc:
                    kinds[sid] = exc.kind
            return set(alpha_iss.x509_bundles()), kinds

    assert workload_view(now + 5) == ({ALPHA, BETA}, {inside: "ok", outside: "scope-violation"})
    assert workload_view(now + 7200) == ({ALPHA}, {inside: "stale", outside: "scope-violation"})

    got = ok("--home", n, "--json", "svid", "verify", pems[inside])
    assert (got["spiffe_id"], got["relation"], got["agreement_version"]) == (inside, "partner", 1)
    fails("scope-violation", "--home", n, "--json", "svid", "verify", pems[outside])
    # A chain cut from its intermediate does not reach the bundle.
    leaf_only = tmp_path / "leaf.pem"
    leaf_only.write_bytes(
        pems[inside].read_bytes().split(b"-----END CERTIFICATE-----\n")[0] + b"-----END CERTIFICATE-----\n"
    )
    fails("bad-signature", "--home", n, "--json", "svid", "verify", leaf_only)
    if find_libfaketime() is not None:
        fails("stale", "--home", n, "--json", "svid", "verify", pems[inside], prefix=faketime_prefix("+2h"))
    ok("--home", a[0], "--json", "federation", "revoke", "--partner", BETA)
    ok("--home", a[0], "--json", "pack", "export", "--to", ours)
    ok("--home", n, "--json", "pack", "import", ours)
    fails("no-agreement", "--home", n, "--json", "svid", "verify", pems[inside])
    assert workload_view(clock.now()) == ({ALPHA}, {inside: "no-agreement", outside: "no-agreement"})


def _connected(tmp_path: Path) -> tuple[tuple[Path, Path, str], tuple[Path, Path, str], Path]:
    """alpha and beta authorities under TERMS, and an alpha node holding beta's released documents."""
    a, b = authority(tmp_path, "A", ALPHA), authority(tmp_path, "B", BETA)
    n = tmp_path / "N"
    ok("--home", n, "--json", "node", "init", "--anchor", a[1], "--expect-fingerprint", a[2])
    agree(tmp_path, a, b, BETA, *TERMS)
    for name, args in (("a.pack", ("--home", a[0])), ("b.pack", ("--home", b[0], "--partner", ALPHA))):
        pack_file = tmp_path / name
        ok(*args[:2], "--json", "pack", "export", *args[2:], "--to", pack_file)
        ok("--home", n, "--json", "pack", "import", pack_file)
    return a, b, n
