"""Sealed packs: a pack encrypted to one or more recipient nodes.

HPKE (RFC 9180) base mode with the ML-KEM-768 + X25519 hybrid KEM, HKDF-SHA256
and ChaCha20-Poly1305, all from ``cryptography``: recorded traffic stays safe
against a later quantum adversary as long as either KEM holds (the harvest-
now-decrypt-later row of the threat matrix).

Format: a framed file, so a large pack is never copied or re-encoded to be
checked::

    MAGIC   = the CBOR text "qhx-edge-sealed/1"
    header  = deterministic CBOR {"recipients": [{"kid": bstr, "wrapped": bstr}, ...],  # sorted by kid
                                  "nonce": bstr(12), "length": uint}
    payload = ChaCha20-Poly1305(content key, nonce, pack, aad = MAGIC || header)   # exactly `length` bytes

The pack is encrypted once under a random 256-bit content key; the associated
data is everything before the payload, so nobody can strip or add recipients
or change the framing unnoticed.  The content key is wrapped to each recipient
with HPKE (``info`` names the format).  A node whose key id is not listed gets
``not-recipient`` without unlocking its private key; errors never say anything
about the content.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from qhx_edge.core import cbor
from qhx_edge.core.cards import EncryptionPrivateKey, EncryptionPublicKey
from qhx_edge.core.errors import Incomplete, Malformed, NotRecipient, Oversize

MAGIC = cbor.encode("qhx-edge-sealed/1")
INFO = b"qhx-edge sealed pack v1"
MAX_RECIPIENTS = 256
MAX_HEADER_SIZE = 1 << 20
MAX_PAYLOAD_SIZE = (64 << 20) + 16
SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
TAG_SIZE = 16


def is_sealed(data: bytes) -> bool:
    return bytes(data[: len(MAGIC)]) == MAGIC


def seal(pack: bytes, recipients: Sequence[EncryptionPublicKey]) -> bytes:
    if not recipients:
        raise Malformed("a sealed pack needs at least one recipient")
    if len(recipients) > MAX_RECIPIENTS:
        raise Oversize(f"at most {MAX_RECIPIENTS} recipients")
    if len(pack) + TAG_SIZE > MAX_PAYLOAD_SIZE:
        raise Oversize("pack too large to seal")
    unique = {r.kid: r for r in recipients}
    content_key = ChaCha20Poly1305.generate_key()
    entries = [
        {"kid": kid, "wrapped": SUITE.encrypt(content_key, unique[kid].hpke_key(), info=INFO)} for kid in sorted(unique)
    ]
    nonce = secrets.token_bytes(12)
    head = MAGIC + cbor.encode({"recipients": entries, "nonce": nonce, "length": len(pack) + TAG_SIZE})
    return head + ChaCha20Poly1305(content_key).encrypt(nonce, pack, head)


@dataclass(frozen=True)
class Sealed:
    """A parsed sealed file: its header and a view of its payload (no copy)."""

    header: dict[str, Any]
    head: bytes  # MAGIC || encoded header: the associated data
    payload: memoryview

    @property
    def recipients(self) -> list[bytes]:
        return [r["kid"] for r in self.header["recipients"]]


def split(data: bytes) -> Sealed:
    """Parse the frame of a sealed pack: magic, deterministic header, payload length."""
    if not is_sealed(data):
        raise Malformed("not a qhx-edge sealed pack")
    view = memoryview(data)
    if len(data) == len(MAGIC):
        raise Incomplete("sealed pack ends after its magic")
    header, n = cbor.decode_prefix(bytes(view[len(MAGIC) : len(MAGIC) + MAX_HEADER_SIZE]))
    if not isinstance(header, dict) or set(header) != {"recipients", "nonce", "length"}:
        raise Malformed("sealed pack header has the wrong fields")
    recipients = header["recipients"]
    if (
        not isinstance(recipients, list)
        or not 1 <= len(recipients) <= MAX_RECIPIENTS
        or not all(
            isinstance(r, dict)
            and set(r) == {"kid", "wrapped"}
            and isinstance(r["kid"], bytes)
            and isinstance(r["wrapped"], bytes)
            for r in recipients
        )
    ):
        raise Malformed("sealed pack has a malformed recipient list")
    if not isinstance(header["nonce"], bytes) or len(header["nonce"]) != 12:
        raise Malformed("sealed pack has a malformed nonce")
    length = header["length"]
    if not isinstance(length, int) or isinstance(length, bool) or not TAG_SIZE <= length <= MAX_PAYLOAD_SIZE:
        raise Malformed("sealed pack has a malformed length")
    start = len(MAGIC) + n
    have = len(data) - start
    if have < length:
        raise Incomplete(f"sealed pack ends early ({have} of {length} payload bytes)")
    if have > length:
        raise Malformed(f"{have - length} trailing bytes after the sealed payload")
    return Sealed(header, bytes(view[:start]), view[start:])


def recipients_of(data: bytes) -> list[bytes]:
    """The recipient key ids a sealed pack names."""
    return split(data).recipients


def open_sealed(data: bytes, key: EncryptionPrivateKey) -> bytes:
    """Decrypt a sealed pack with this node's key, or raise ``not-recipient``."""
    return unseal(data, key.public.kid, lambda: key)


def unseal(data: bytes, my_kid: bytes, get_key: Callable[[], EncryptionPrivateKey]) -> bytes:
    """Open a sealed pack addressed to ``my_kid``; the private key is fetched only if it is."""
    sealed = split(data)
    entry = next((r for r in sealed.header["recipients"] if r["kid"] == my_kid), None)
    if entry is None:
        raise NotRecipient("this pack is sealed to other nodes")
    try:
        content_key = SUITE.decrypt(entry["wrapped"], get_key().hpke_key(), info=INFO)
        return ChaCha20Poly1305(content_key).decrypt(sealed.header["nonce"], sealed.payload, sealed.head)
    except (InvalidTag, ValueError) as exc:
        # Deliberately vague: a damaged or forged sealed pack says nothing more.
        raise Malformed("sealed pack cannot be opened (damaged or not made for this key)") from exc
