"""The command-line contract through the real CLI: JSON objects, exit codes, two-home round trip."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli


def test_two_home_round_trip(tmp_path: Path) -> None:
    a, n = tmp_path / "A", tmp_path / "N"
    r = run_cli("--home", a, "--json", "authority", "init", "--domain", "alpha.example", "--suite", "classical")
    assert r.code == 0, r.stderr
    init = r.json
    assert init["ok"] is True
    fp = init["root_fingerprint"]

    r = run_cli("--home", a, "--json", "authority", "anchor", "--to", tmp_path / "anchor.cbor")
    assert r.code == 0
    assert r.json["fingerprint"] == fp

    r = run_cli("--home", n, "--json", "node", "init", "--anchor", tmp_path / "anchor.cbor", "--expect-fingerprint", fp)
    assert r.code == 0, r.stderr
    assert r.json["domain"] == "alpha.example"
    assert r.json["fingerprint"] == fp

    # Before any pack, the node holds only its anchor: no freshness, so mode expired.
    st = run_cli("--home", n, "--json", "status").json
    assert st["domains"]["alpha.example"]["mode"] == "expired"
    assert st["domains"]["alpha.example"]["versions"]["bundle"] is None

    assert run_cli("--home", a, "--json", "pack", "export", "--to", tmp_path / "p.pack").code == 0
    r = run_cli("--home", n, "--json", "pack", "import", tmp_path / "p.pack")
    assert r.code == 0, r.stdout + r.stderr
    assert r.json["applied"] is True
    assert r.json["counts"] == {"already-held": 1, "applied": 3}

    again = run_cli("--home", n, "--json", "pack", "import", tmp_path / "p.pack")
    assert again.code == 0
    assert again.json["applied"] is False
    assert again.json["counts"] == {"already-held": 4}

    st = run_cli("--home", n, "--json", "status").json
    dom = st["domains"]["alpha.example"]
    assert st["clock"] == "ok"
    assert dom["mode"] == "connected"
    assert dom["versions"] == {"root": 1, "bundle": 1, "policy": 1, "freshness": 1}
    assert 0 <= dom["staleness"] < 120
    assert dom["freshness_max_ttl"] == 3600
    assert dom["max_ttl"] == 0  # not attested: no delegation, nothing can be issued
    assert st["delegation"] == {"present": False}

    docs = run_cli("--home", n, "--json", "doc", "list").json["documents"]
    assert sorted((d["type"], d["version"]) for d in docs) == [
        ("bundle", 1),
        ("freshness", 1),
        ("policy", 1),
        ("root", 1),
    ]
    assert all(len(d["digest"]) == 64 and d["domain"] == "alpha.example" for d in docs)


def test_exit_codes_and_error_objects(tmp_path: Path) -> None:
    # Usage error: exit 2, still one JSON object with --json.
    r = run_cli("--json", "authority", "init")
    assert r.code == 2
    assert r.json["ok"] is False
    assert r.json["error"]["kind"] == "usage"
    # Environment: a missing anchor file is exit 3, missing-file.
    r = run_cli("--home", tmp_path / "N", "--json", "node", "init", "--anchor", tmp_path / "nope.cbor")
    assert (r.code, r.json["error"]["kind"]) == (3, "missing-file")
    # Environment: a home that is not a node.
    r = run_cli("--home", tmp_path / "empty", "--json", "status")
    assert (r.code, r.json["error"]["kind"]) == (3, "not-initialised")
    # Environment: no passphrase source at all.
    r = run_cli(
        "--home",
        tmp_path / "A",
        "--json",
        "authority",
        "init",
        "--domain",
        "alpha.example",
        env={"QHX_EDGE_PASSPHRASE": ""},
    )
    assert (r.code, r.json["error"]["kind"]) == (3, "passphrase")
    assert not (tmp_path / "A" / "authority.json").exists()


def test_anchor_fingerprint_mismatch_and_bad_anchor(tmp_path: Path) -> None:
    a = tmp_path / "A"
    assert run_cli("--home", a, "authority", "init", "--domain", "alpha.example", "--suite", "classical").code == 0
    assert run_cli("--home", a, "authority", "anchor", "--to", tmp_path / "anchor.cbor").code == 0
    r = run_cli(
        "--home",
        tmp_path / "N",
        "--json",
        "node",
        "init",
        "--anchor",
        tmp_path / "anchor.cbor",
        "--expect-fingerprint",
        "00" * 32,
    )
    assert (r.code, r.json["error"]["kind"]) == (1, "anchor-mismatch")
    assert not (tmp_path / "N" / "node.sqlite").exists()
    # A non-root document as anchor is refused.
    bundle = a / "published" / "bundle" / "1.cbor"
    r = run_cli("--home", tmp_path / "N2", "--json", "node", "init", "--anchor", bundle)
    assert (r.code, r.json["error"]["kind"]) == (1, "malformed")


def test_wrong_passphrase_on_authority_command(tmp_path: Path) -> None:
    a = tmp_path / "A"
    assert run_cli("--home", a, "authority", "init", "--domain", "alpha.example", "--suite", "classical").code == 0
    r = run_cli("--home", a, "--json", "authority", "publish", "bundle", env={"QHX_EDGE_PASSPHRASE": "wrong"})
    assert (r.code, r.json["error"]["kind"]) == (3, "passphrase")
    state = json.loads((a / "authority.json").read_text())
    assert state["versions"]["bundle"] == 1  # nothing was published


def test_no_passphrase_home_works_without_secret(tmp_path: Path) -> None:
    a = tmp_path / "A"
    r = run_cli(
        "--home",
        a,
        "authority",
        "init",
        "--domain",
        "alpha.example",
        "--suite",
        "classical",
        "--no-passphrase",
        env={"QHX_EDGE_PASSPHRASE": ""},
    )
    assert r.code == 0
    assert "WITHOUT a passphrase" in r.stderr
    r = run_cli(
        "--home", a, "--json", "authority", "publish", "freshness", "--lifetime", "1h", env={"QHX_EDGE_PASSPHRASE": ""}
    )
    assert r.code == 0, r.stdout
    assert r.json["published"][0]["type"] == "freshness"
    assert r.json["published"][0]["version"] == 2


def test_inputs_are_capped_before_they_are_read(tmp_path: Path) -> None:
    big = tmp_path / "big.cbor"
    big.write_bytes(b"\x00" * ((1 << 20) + 1))
    r = run_cli("--home", tmp_path / "N", "--json", "node", "init", "--anchor", big)
    assert (r.code, r.json["error"]["kind"]) == (1, "oversize")
    r = run_cli("--home", tmp_path / "A", "--json", "authority", "publish", "policy", big)
    assert r.code in (1, 3)  # no authority here: environment first, or the cap; never a crash
    assert r.json["ok"] is False
