"""Private keys at rest, encrypted under a passphrase.

A home that holds private keys (an authority, later a node) has one
``keystore.cbor`` naming the KDF: Argon2id (RFC 9106, memory-hard) with a
random 16-byte salt, 64 MiB, 3 passes.  The passphrase is stretched once per
command into a 256-bit key; every key file is then sealed with
ChaCha20-Poly1305 under a fresh random nonce, with the file's purpose (for
example ``key/root-1``) as associated data, so files cannot be swapped for one
another unnoticed.  Files are written atomically with mode 0600.

The passphrase comes from, in order: ``QHX_EDGE_PASSPHRASE_FILE`` (first line
of that file), ``QHX_EDGE_PASSPHRASE``, a prompt when standard input is a
terminal.  A keystore made with ``--no-passphrase`` stores keys unencrypted
(still 0600) and says so loudly every time it is opened.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from qhx_edge.core import cbor
from qhx_edge.core.errors import Malformed, MissingFile, PassphraseError, Rejected, StoreCorrupt
from qhx_edge.core.suites import PrivateKey
from qhx_edge.store.files import atomic_write

KEYSTORE = "keystore.cbor"
FORMAT = "qhx-edge-keystore"
KDF_DEFAULTS = {"alg": "argon2id", "iterations": 3, "lanes": 2, "memory_kib": 64 * 1024}
_CHECK = b"qhx-edge keystore check v1"
MAX_KEY_FILE = 1 << 16

WARNING = (
    "WARNING: private keys in {path} are stored WITHOUT a passphrase. Anyone who can read "
    "these files can sign as this domain. Use only for demos and tests."
)


def passphrase_from_env(prompt: Callable[[str, bool], str] | None = None, *, confirm: bool = False) -> bytes:
    """Find the passphrase: file, variable, or terminal prompt (in that order)."""
    path = os.environ.get("QHX_EDGE_PASSPHRASE_FILE")
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise PassphraseError(f"cannot read QHX_EDGE_PASSPHRASE_FILE {path}: {exc.strerror}") from exc
        if not text or not text[0]:
            raise PassphraseError(f"QHX_EDGE_PASSPHRASE_FILE {path} is empty")
        return text[0].encode()
    value = os.environ.get("QHX_EDGE_PASSPHRASE")
    if value:
        return value.encode()
    if prompt is not None and sys.stdin.isatty():
        got = prompt("Passphrase for private keys", confirm)
        if got:
            return got.encode()
    raise PassphraseError(
        "no passphrase: set QHX_EDGE_PASSPHRASE_FILE or QHX_EDGE_PASSPHRASE, run on a terminal, "
        "or create the home with --no-passphrase (demo only)"
    )


class Keystore:
    """Seals and opens key files in one home directory."""

    def __init__(self, home: Path, key: bytes | None) -> None:
        self.home = home
        self._aead = ChaCha20Poly1305(key) if key is not None else None

    @property
    def encrypted(self) -> bool:
        return self._aead is not None

    @staticmethod
    def _derive(passphrase: bytes, salt: bytes, kdf: dict[str, Any]) -> bytes:
        if kdf.get("alg") != "argon2id":
            raise Malformed(f"unsupported KDF {kdf.get('alg')!r}")
        return Argon2id(
            salt=salt,
            length=32,
            iterations=int(kdf["iterations"]),
            lanes=int(kdf["lanes"]),
            memory_cost=int(kdf["memory_kib"]),
        ).derive(passphrase)

    @staticmethod
    def _check_header(doc: dict[str, Any], path: Path) -> None:
        """An encrypted keystore's header has the shape :meth:`create` writes, else ``store-corrupt``."""
        kdf, check = doc.get("kdf"), doc.get("check")
        ok = (
            isinstance(doc.get("salt"), bytes)
            and isinstance(kdf, dict)
            and kdf.get("alg") == "argon2id"
            and all(_small_uint(kdf.get(k)) for k in ("iterations", "lanes", "memory_kib"))
            and isinstance(check, list)
            and len(check) == 2
            and all(isinstance(c, bytes) for c in check)
            and len(check[0]) == 12
        )
        if not ok:
            raise StoreCorrupt(f"{path} is not a usable qhx-edge keystore: its header is damaged")

    @classmethod
    def create(cls, home: Path, passphrase: bytes | None) -> Keystore:
        """Create ``home/keystore.cbor``; ``None`` means no passphrase (loud)."""
        if passphrase is None:
            atomic_write(home / KEYSTORE, cbor.encode({"format": FORMAT, "encrypted": False}), mode=0o600)
            print(WARNING.format(path=home), file=sys.stderr)
            return cls(home, None)
        salt = secrets.token_bytes(16)
        key = cls._derive(passphrase, salt, KDF_DEFAULTS)
        nonce = secrets.token_bytes(12)
        check = ChaCha20Poly1305(key).encrypt(nonce, _CHECK, b"check")
        doc = {"format": FORMAT, "encrypted": True, "kdf": dict(KDF_DEFAULTS), "salt": salt, "check": [nonce, check]}
        atomic_write(home / KEYSTORE, cbor.encode(doc), mode=0o600)
        return cls(home, key)

    @classmethod
    def open(cls, home: Path, get_passphrase: Callable[[], bytes]) -> Keystore:
        try:
            raw = (home / KEYSTORE).read_bytes()
        except FileNotFoundError:
            raise MissingFile(f"no keystore in {home}") from None
        doc = _decode(raw, home / KEYSTORE, "keystore")
        if doc.get("format") != FORMAT or not isinstance(doc.get("encrypted"), bool):
            raise StoreCorrupt(f"{home / KEYSTORE} is not a qhx-edge keystore")
        if doc.get("encrypted") is False:
            print(WARNING.format(path=home), file=sys.stderr)
            return cls(home, None)
        cls._check_header(doc, home / KEYSTORE)
        key = cls._derive(get_passphrase(), doc["salt"], doc["kdf"])
        nonce, check = doc["check"]
        try:
            ok = ChaCha20Poly1305(key).decrypt(nonce, check, b"check") == _CHECK
        except InvalidTag:
            ok = False
        if not ok:
            raise PassphraseError("wrong passphrase for this keystore")
        return cls(home, key)

    def save_secret(self, name: str, plain: bytes) -> Path:
        """Seal ``plain`` into ``keys/NAME.key`` (atomic, 0600)."""
        path = self.home / "keys" / f"{name}.key"
        if self._aead is None:
            body = {"format": "qhx-edge-key", "encrypted": False, "key": plain}
        else:
            nonce = secrets.token_bytes(12)
            body = {
                "format": "qhx-edge-key",
                "encrypted": True,
                "nonce": nonce,
                "ct": self._aead.encrypt(nonce, plain, f"key/{name}".encode()),
            }
        atomic_write(path, cbor.encode(body), mode=0o600)
        return path

    def load_secret(self, name: str) -> bytes:
        path = self.home / "keys" / f"{name}.key"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise MissingFile(f"missing key file {path}") from None
        body = _decode(raw, path, "key file")
        if body.get("format") != "qhx-edge-key":
            raise StoreCorrupt(f"{path} is not a qhx-edge key file")
        if body.get("encrypted"):
            if self._aead is None:
                raise PassphraseError(f"{path} is encrypted but the keystore is not")
            try:
                return self._aead.decrypt(body["nonce"], body["ct"], f"key/{name}".encode())
            except (InvalidTag, KeyError, TypeError, ValueError):
                raise PassphraseError(
                    f"{path} cannot be decrypted with this keystore (wrong file or tampered)"
                ) from None
        if self._aead is not None:
            raise PassphraseError(f"{path} is stored unencrypted inside an encrypted keystore")
        plain = body.get("key")
        if not isinstance(plain, bytes):
            raise StoreCorrupt(f"{path} holds no key")
        return plain

    def save(self, name: str, key: PrivateKey) -> Path:
        return self.save_secret(name, cbor.encode(key.to_cbor()))

    def load(self, name: str) -> PrivateKey:
        path = self.home / "keys" / f"{name}.key"
        try:
            return PrivateKey.from_cbor(cbor.decode(self.load_secret(name), max_size=MAX_KEY_FILE))
        except Rejected as exc:  # decrypted, so the passphrase was right: the file itself is damaged
            raise StoreCorrupt(f"{path} holds no usable key: {exc.message}") from exc


def _small_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**32


def _decode(raw: bytes, path: Path, what: str) -> dict[str, Any]:
    """A keystore or key file's CBOR map, else ``store-corrupt`` naming the file (it is ours, not input)."""
    try:
        doc = cbor.decode(raw, max_size=MAX_KEY_FILE)
    except Rejected as exc:  # malformed, non-deterministic or oversize
        raise StoreCorrupt(f"{path} is not a usable qhx-edge {what}: {exc.message}") from exc
    if not isinstance(doc, dict):
        raise StoreCorrupt(f"{path} is not a qhx-edge {what}")
    return doc
