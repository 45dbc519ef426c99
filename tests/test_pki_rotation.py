"""Rotating the pki role keeps every node delegated (issue 8, point 6).

A node resets its delegation mark when the pki role's keys change (TUF
5.3.11), so an authority that rotated its pki key used to strip every node of
its delegation, and of its ability to issue.  The authority now re-signs each
current delegation with the new key (same content and expiry, a new version),
and its export carries every node's current delegation: each node takes its
own and passes over the others' (``not-mine``), through the real command line.

test_every_node_keeps_its_delegation_across_a_pki_rotation failed on 7a292f4
(the nodes held no delegation after the rotation pack).
"""

from __future__ import annotations

from pathlib import Path

from qhx_edge.core import documents as D  # noqa: N812
from qhx_edge.homes import node
from qhx_edge.issue.issuer import Issuer
from qhx_edge.store import clock
from tests.conftest import PASSPHRASE, Homes, run_cli
from tests.test_delegation import delegate
from tests.test_issuance import POLICY, UID, Clock, load

A = "alpha.example"


def held_delegation(home: Path) -> D.Delegation | None:
    with node.Node(home) as n:
        doc = n.store.current(A, "delegation")
    return doc.payload if doc is not None and isinstance(doc.payload, D.Delegation) else None


def import_cli(home: Path, path: Path) -> dict[str, object]:
    r = run_cli("--home", home, "--json", "pack", "import", path)
    assert r.code == 0, (r.code, r.stdout, r.stderr)
    out: dict[str, object] = r.json
    return out


def test_every_node_keeps_its_delegation_across_a_pki_rotation(homes: Homes, tmp_path: Path) -> None:
    from qhx_edge.core.policyfile import policy_fields

    now = clock.now()
    second = tmp_path / "N2"
    node.init(second, homes.authority.anchor(), now, passphrase=PASSPHRASE.encode())
    policy = homes.authority.publish_policy(policy_fields(POLICY), now)
    first_docs = delegate(homes, homes.node_home, now)
    second_docs = delegate(homes, second, now)
    load(homes, policy + first_docs, now)
    n2 = node.Node(second)
    try:
        n2.import_pack(homes.authority.export_pack(second_docs[:1] + homes.authority.export_documents(), now), now)
    finally:
        n2.close()
    before = {h: held_delegation(h) for h in (homes.node_home, second)}
    assert all(before.values())

    t1 = now + 60
    homes.authority.rotate_root(t1, root_keys=None, root_threshold=None, roles=("pki",))
    path = tmp_path / "rotation.pack"
    r = run_cli("--home", homes.a, "--json", "pack", "export", "--to", path)
    assert r.code == 0, (r.stdout, r.stderr)
    for home in (homes.node_home, second):
        out = import_cli(home, path)
        reports = [d["report"] for d in out["documents"]]  # type: ignore[attr-defined]
        assert reports.count("not-mine") == 2, reports  # the other node's delegation and notary delegation
        after = held_delegation(home)
        old = before[home]
        assert old is not None
        assert after is not None, "the node lost its delegation with the pki rotation"
        assert after.version > old.version
        assert after.node_id == old.node_id
        assert after.card_fingerprint == old.card_fingerprint
        assert after.x509_cas == old.x509_cas
        assert after.jwt_key == old.jwt_key
        assert after.expires == old.expires  # re-signing never extends a delegation
    # The node still issues.
    with Issuer(homes.node_home, PASSPHRASE.encode, now=Clock(t1 + 5)) as iss:
        assert iss.x509_svids(UID)
