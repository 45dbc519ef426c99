"""Integers past SQLite's range (2^63 - 1) in signed input are ``malformed`` where they are read.

A document or a pack manifest may be validly signed and still carry a number
the store cannot hold: before the cap, a bundle with version 2^63 passed the
decoder (which allowed up to 2^64 - 1) and crashed the import with
OverflowError at the database, and a manifest with such a sequence did the
same.  Now each is refused as ``malformed`` and the store is unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qhx_edge.core import documents as D  # noqa: N812
from qhx_edge.packs import pack
from qhx_edge.store import clock
from tests.conftest import Homes, make_homes, run_cli


def trust_digest(homes: Homes) -> str:
    r = run_cli("--json", "--home", homes.node_home, "doc", "summary")
    assert r.code == 0, r.stderr
    return r.stdout


def test_a_signed_bundle_with_a_version_past_2_63_is_malformed(tmp_path: Path) -> None:
    homes = make_homes(tmp_path)
    auth, now = homes.authority, clock.now()
    bundle = D.parse(auth.current("bundle")).payload
    huge = dataclasses.replace(bundle, version=2**63, issued_at=now)
    doc = D.sign(huge, auth._signers("pki"))  # validly signed by the domain's pki role
    before = trust_digest(homes)
    path = tmp_path / "huge.pack"
    path.write_bytes(auth.export_pack([doc], now))
    r = run_cli("--json", "--home", homes.node_home, "pack", "import", path)
    assert r.code == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    reports = r.json["documents"]
    assert [d["report"] for d in reports] == ["rejected:malformed"]
    assert "2^63 - 1" in reports[0]["error"]["message"]
    assert trust_digest(homes) == before


def test_a_manifest_with_a_sequence_past_2_63_is_malformed(tmp_path: Path) -> None:
    homes = make_homes(tmp_path)
    auth, now = homes.authority, clock.now()
    signer = auth._signers("freshness")[0]
    data = pack.build(auth.export_documents(), signer, domain=auth.domain, node="authority", sequence=2**63, now=now)
    path = tmp_path / "huge-seq.pack"
    path.write_bytes(data)
    before = trust_digest(homes)
    r = run_cli("--json", "--home", homes.node_home, "pack", "import", path)
    assert (r.code, r.json["error"]["kind"]) == (1, "malformed"), r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert trust_digest(homes) == before
