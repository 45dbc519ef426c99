"""Private keys at rest: Argon2id + ChaCha20-Poly1305, 0600, passphrase sources."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from qhx_edge.core import cbor
from qhx_edge.core.errors import PassphraseError
from qhx_edge.core.suites import PrivateKey
from qhx_edge.store.keystore import Keystore, passphrase_from_env


@pytest.fixture(scope="module")
def key() -> PrivateKey:
    return PrivateKey.generate("hybrid")


def test_round_trip_encrypted_and_mode_0600(tmp_path: Path, key: PrivateKey) -> None:
    ks = Keystore.create(tmp_path, b"pw")
    path = ks.save("root-1", key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keystore.cbor").stat().st_mode) == 0o600
    raw = path.read_bytes()
    for _, secret in key.parts:
        assert secret not in raw  # sealed, not stored in the clear
    again = Keystore.open(tmp_path, lambda: b"pw")
    assert again.load("root-1") == key


def test_wrong_passphrase_is_a_passphrase_error(tmp_path: Path, key: PrivateKey) -> None:
    Keystore.create(tmp_path, b"pw").save("k", key)
    with pytest.raises(PassphraseError) as err:
        Keystore.open(tmp_path, lambda: b"not it")
    assert err.value.kind == "passphrase"
    assert err.value.exit_code == 3


def test_swapped_key_files_are_detected(tmp_path: Path, key: PrivateKey) -> None:
    ks = Keystore.create(tmp_path, b"pw")
    ks.save("root-1", key)
    ks.save("pki-2", PrivateKey.generate("classical"))
    keys = tmp_path / "keys"
    (keys / "pki-2.key").write_bytes((keys / "root-1.key").read_bytes())
    with pytest.raises(PassphraseError, match="tampered"):
        ks.load("pki-2")


def test_tampered_ciphertext_is_detected(tmp_path: Path, key: PrivateKey) -> None:
    ks = Keystore.create(tmp_path, b"pw")
    path = ks.save("k", key)
    body = cbor.decode(path.read_bytes(), max_size=1 << 16)
    ct = bytearray(body["ct"])
    ct[5] ^= 1
    body["ct"] = bytes(ct)
    path.write_bytes(cbor.encode(body))
    with pytest.raises(PassphraseError):
        ks.load("k")


def test_no_passphrase_is_loud_and_unencrypted(
    tmp_path: Path, key: PrivateKey, capsys: pytest.CaptureFixture[str]
) -> None:
    ks = Keystore.create(tmp_path, None)
    assert "WITHOUT a passphrase" in capsys.readouterr().err
    ks.save("k", key)
    opened = Keystore.open(tmp_path, lambda: pytest.fail("no passphrase should be asked"))  # type: ignore[arg-type,return-value]
    assert "WITHOUT a passphrase" in capsys.readouterr().err
    assert not opened.encrypted
    assert opened.load("k") == key


def test_passphrase_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QHX_EDGE_PASSPHRASE_FILE", raising=False)
    monkeypatch.delenv("QHX_EDGE_PASSPHRASE", raising=False)
    with pytest.raises(PassphraseError, match="no passphrase"):
        passphrase_from_env(None)
    monkeypatch.setenv("QHX_EDGE_PASSPHRASE", "from-env")
    assert passphrase_from_env(None) == b"from-env"
    f = tmp_path / "pass"
    f.write_text("from-file\nignored second line\n")
    monkeypatch.setenv("QHX_EDGE_PASSPHRASE_FILE", str(f))
    assert passphrase_from_env(None) == b"from-file"  # the file wins over the variable
    monkeypatch.setenv("QHX_EDGE_PASSPHRASE_FILE", str(tmp_path / "missing"))
    with pytest.raises(PassphraseError, match="cannot read"):
        passphrase_from_env(None)
    f.write_text("")
    monkeypatch.setenv("QHX_EDGE_PASSPHRASE_FILE", str(f))
    with pytest.raises(PassphraseError, match="empty"):
        passphrase_from_env(None)
