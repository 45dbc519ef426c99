"""Sealed packs: a pack encrypted to one or more recipient nodes.

HPKE (RFC 9180) base mode with the ML-KEM-768 + X25519 hybrid KEM, HKDF-SHA256
and ChaCha20-Poly1305, all from ``cryptography``: recorded traffic stays safe
against a later quantum adversary as long as either KEM holds (the harvest-
now-decrypt-later row of the threat matrix).

Format (deterministic CBOR)::

    {"format": "qhx-edge-sealed", "version": 1,
     "recipients": [{"kid": bstr, "wrapped": bstr}, ...],   # sorted by kid
     "nonce": bstr, "ciphertext": bstr}

The pack is encrypted once under a random 256-bit content key with
ChaCha20-Poly1305, the associated data being the encoded recipient list (so
nobody can strip or add recipients unnoticed); the content key is wrapped to
each recipient with HPKE (``info`` names the format).  A node whose key id is
not listed gets ``not-recipient``; errors never say anything about the content.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from qhx_edge import cbor
from qhx_edge.errors import Malformed, NotRecipient, Oversize
from qhx_edge.identity import EncryptionPrivateKey, EncryptionPublicKey

FORMAT = "qhx-edge-sealed"
INFO = b"qhx-edge sealed pack v1"
MAX_RECIPIENTS = 256
MAX_SEALED_SIZE = (64 << 20) + (2 << 20)
SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


def seal(pack: bytes, recipients: Sequence[EncryptionPublicKey]) -> bytes:
    if not recipients:
        raise Malformed("a sealed pack needs at least one recipient")
    if len(recipients) > MAX_RECIPIENTS:
        raise Oversize(f"at most {MAX_RECIPIENTS} recipients")
    unique = {r.kid: r for r in recipients}
    content_key = ChaCha20Poly1305.generate_key()
    entries = [
        {"kid": kid, "wrapped": SUITE.encrypt(content_key, unique[kid].hpke_key(), info=INFO)} for kid in sorted(unique)
    ]
    nonce = secrets.token_bytes(12)
    ciphertext = ChaCha20Poly1305(content_key).encrypt(nonce, pack, cbor.encode(entries))
    return cbor.encode(
        {"format": FORMAT, "version": 1, "recipients": entries, "nonce": nonce, "ciphertext": ciphertext}
    )


def _parse(data: bytes) -> dict[str, Any]:
    value = cbor.decode(data, max_size=MAX_SEALED_SIZE)
    if not isinstance(value, dict) or value.get("format") != FORMAT or value.get("version") != 1:
        raise Malformed("not a qhx-edge sealed pack")
    recipients = value.get("recipients")
    if (
        not isinstance(recipients, list)
        or not 1 <= len(recipients) <= MAX_RECIPIENTS
        or not all(
            isinstance(r, dict) and isinstance(r.get("kid"), bytes) and isinstance(r.get("wrapped"), bytes)
            for r in recipients
        )
    ):
        raise Malformed("sealed pack has a malformed recipient list")
    if not isinstance(value.get("nonce"), bytes) or len(value["nonce"]) != 12:
        raise Malformed("sealed pack has a malformed nonce")
    if not isinstance(value.get("ciphertext"), bytes):
        raise Malformed("sealed pack has no ciphertext")
    return value


def recipients_of(data: bytes) -> list[bytes]:
    """The recipient key ids a sealed pack names."""
    return [r["kid"] for r in _parse(data)["recipients"]]


def open_sealed(data: bytes, key: EncryptionPrivateKey) -> bytes:
    """Decrypt a sealed pack with this node's key, or raise ``not-recipient``."""
    value = _parse(data)
    kid = key.public.kid
    entry = next((r for r in value["recipients"] if r["kid"] == kid), None)
    if entry is None:
        raise NotRecipient("this pack is sealed to other nodes")
    try:
        content_key = SUITE.decrypt(entry["wrapped"], key.hpke_key(), info=INFO)
        return ChaCha20Poly1305(content_key).decrypt(
            value["nonce"], value["ciphertext"], cbor.encode(value["recipients"])
        )
    except (InvalidTag, ValueError) as exc:
        # Deliberately vague: a damaged or forged sealed pack says nothing more.
        raise Malformed("sealed pack cannot be opened (damaged or not made for this key)") from exc
