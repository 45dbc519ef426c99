"""A home's own files damaged: every command gives a typed error and a stable kind, never a traceback.

``authority.json``, the keystore, a key file and the node store are the home's
own state, so damage there is an environment fault: exit 3, ``store-corrupt``
(naming the file).  Before, a partial ``authority.json`` was a KeyError, a
non-object one an AttributeError, a keystore header without its salt a
KeyError, and damaged keystores or key files were reported as ``malformed``
input without saying which file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cbor2
import pytest

from qhx_edge.core import cbor
from tests.conftest import PASSPHRASE, Homes, make_homes, run_cli

ENV = {"QHX_EDGE_PASSPHRASE": PASSPHRASE}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Homes:
    return make_homes(tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def homes(pristine: Homes, tmp_path: Path) -> tuple[Path, Path]:
    a, n = tmp_path / "A", tmp_path / "N"
    shutil.copytree(pristine.authority.home, a)
    shutil.copytree(pristine.node_home, n)
    return a, n


def state_doc() -> dict[str, object]:
    return {"format": "qhx-edge-authority", "domain": "alpha.example"}


AUTHORITY_STATES = {
    "not json": b"not json",
    "an array": b"[]",
    "wrong format": json.dumps({"format": 5}).encode(),
    "partial": json.dumps(state_doc()).encode(),
    "bad domain": json.dumps({**state_doc(), "domain": "Alpha Example"}).encode(),
    "empty": b"",
}


def assert_corrupt(r: object, name: str) -> None:
    code, out, err = r.code, r.stdout, r.stderr  # type: ignore[attr-defined]
    assert code == 3, (name, out, err)
    assert json.loads(out)["error"]["kind"] == "store-corrupt", (name, out)
    assert "Traceback" not in err, err


@pytest.mark.parametrize("name", sorted(AUTHORITY_STATES))
def test_a_damaged_authority_state_file_is_store_corrupt(homes: tuple[Path, Path], name: str) -> None:
    a, _ = homes
    (a / "authority.json").write_bytes(AUTHORITY_STATES[name])
    for args in (["authority", "publish", "bundle"], ["status"], ["pack", "export", "--to", str(a.parent / "x")]):
        r = run_cli("--json", "--home", a, *args, env=ENV)
        assert_corrupt(r, f"{name}: {args[0]}")
    assert (a / "authority.json").read_bytes() == AUTHORITY_STATES[name]  # nothing rewritten
    assert not (a.parent / "x").exists()


def keystore_variants(original: bytes) -> dict[str, bytes]:
    doc = cbor.decode(original, max_size=1 << 20)
    return {
        "garbage": b"\xff\x00garbage",
        "empty": b"",
        "not a map": cbor.encode([1, 2]),
        "non-deterministic": cbor2.dumps({**doc, "format": "qhx-edge-keystore"}, canonical=False)[::-1],
        "wrong format": cbor.encode({**doc, "format": "other"}),
        "no salt": cbor.encode({k: v for k, v in doc.items() if k != "salt"}),
        "no encrypted flag": cbor.encode({k: v for k, v in doc.items() if k != "encrypted"}),
        "bad kdf": cbor.encode({**doc, "kdf": {"alg": "argon2id", "iterations": "many"}}),
    }


@pytest.mark.parametrize(
    "name",
    ["garbage", "empty", "not a map", "non-deterministic", "wrong format", "no salt", "no encrypted flag", "bad kdf"],
)
def test_a_damaged_keystore_is_store_corrupt(homes: tuple[Path, Path], name: str) -> None:
    a, n = homes
    for home, args in ((a, ["authority", "publish", "bundle"]), (n, ["pack", "export", "--to", str(n.parent / "p")])):
        bad = keystore_variants((home / "keystore.cbor").read_bytes())[name]
        (home / "keystore.cbor").write_bytes(bad)
        assert_corrupt(run_cli("--json", "--home", home, *args, env=ENV), f"{name}: {home.name}")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not a map", "no key inside"])
def test_a_damaged_key_file_is_store_corrupt(homes: tuple[Path, Path], damage: str) -> None:
    a, _ = homes
    key = a / "keys" / "pki-2.key"
    raw = key.read_bytes()
    key.write_bytes(
        {
            "truncated": raw[: len(raw) // 2],
            "garbage": b"\xffgarbage",
            "not a map": cbor.encode(["qhx-edge-key"]),
            "no key inside": cbor.encode({"format": "qhx-edge-key", "encrypted": False}),
        }[damage]
    )
    r = run_cli("--json", "--home", a, "authority", "publish", "bundle", env=ENV)
    if damage == "no key inside":  # an unencrypted key inside an encrypted keystore: refused as such
        assert (r.code, json.loads(r.stdout)["error"]["kind"]) == (3, "passphrase"), r.stdout
    else:
        assert_corrupt(r, damage)
    assert "pki-2.key" in json.loads(r.stdout)["error"]["message"]


def test_a_damaged_node_store_is_store_corrupt(homes: tuple[Path, Path]) -> None:
    _, n = homes
    (n / "node.sqlite").write_bytes(b"SQLite format 3\x00" + b"\x00garbage" * 100)
    for suffix in ("-wal", "-shm"):
        (n / f"node.sqlite{suffix}").unlink(missing_ok=True)
    assert_corrupt(run_cli("--json", "--home", n, "status", env=ENV), "node store")
