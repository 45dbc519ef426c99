"""Node cards: the public face of a home (its signing and encryption keys).

Every node makes two keys at ``node init`` (the authority's home has the same
identity for its exports):

* a **signing key** in its domain's suite (hybrid by default) that signs the
  node's card, the manifests of the packs it exports, and its evidence;
* an **encryption key** for HPKE with the ML-KEM-768 + X25519 hybrid KEM
  (:mod:`qhx_edge.packs.seal`), so packs can be sealed to it.

The **card** is the node's public face: node id, domain, both public keys,
signed by the signing key (a COSE_Sign like every document, with its own
content type so it can never be taken for a trust document).  A card is
trusted the way an anchor is: by its fingerprint, compared out of band, and
(once nodes are attested) by the delegation that vouches for its key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from qhx_edge.core import cbor, cose
from qhx_edge.core.errors import Malformed
from qhx_edge.core.spiffe import check_trust_domain
from qhx_edge.core.suites import PrivateKey, PublicKey

CARD_CONTENT_TYPE = "application/qhx-edge-card+cbor"
KEM_NAME = "MLKEM768-X25519"
MAX_CARD_SIZE = 64 << 10
CARD_LIFETIME = 365 * 86400


@dataclass(frozen=True)
class EncryptionPublicKey:
    """An HPKE recipient key: ML-KEM-768 and X25519 public keys (draft X-Wing-style hybrid)."""

    mlkem: bytes
    x25519: bytes

    def to_cbor(self) -> dict[str, Any]:
        return {"kem": KEM_NAME, "mlkem": self.mlkem, "x25519": self.x25519}

    @classmethod
    def from_cbor(cls, d: Any) -> EncryptionPublicKey:
        if not isinstance(d, dict) or d.get("kem") != KEM_NAME:
            raise Malformed(f"encryption key must be a {KEM_NAME} key")
        ml, xk = d.get("mlkem"), d.get("x25519")
        if not isinstance(ml, bytes) or len(ml) != 1184 or not isinstance(xk, bytes) or len(xk) != 32:
            raise Malformed("encryption key has the wrong sizes")
        return cls(ml, xk)

    @property
    def kid(self) -> bytes:
        """SHA-256 of the key's deterministic CBOR: how sealed packs name their recipients."""
        return hashlib.sha256(cbor.encode(self.to_cbor())).digest()

    def hpke_key(self) -> hpke.MLKEM768X25519PublicKey:
        try:
            return hpke.MLKEM768X25519PublicKey(
                mlkem.MLKEM768PublicKey.from_public_bytes(self.mlkem),
                x25519.X25519PublicKey.from_public_bytes(self.x25519),
            )
        except ValueError as exc:
            raise Malformed(f"invalid encryption public key: {exc}") from exc


@dataclass(frozen=True)
class EncryptionPrivateKey:
    mlkem_seed: bytes  # 64 bytes (FIPS 203 d || z)
    x25519: bytes

    @classmethod
    def generate(cls) -> EncryptionPrivateKey:
        return cls(
            mlkem.MLKEM768PrivateKey.generate().private_bytes_raw(),
            x25519.X25519PrivateKey.generate().private_bytes_raw(),
        )

    def hpke_key(self) -> hpke.MLKEM768X25519PrivateKey:
        return hpke.MLKEM768X25519PrivateKey(
            mlkem.MLKEM768PrivateKey.from_seed_bytes(self.mlkem_seed),
            x25519.X25519PrivateKey.from_private_bytes(self.x25519),
        )

    @property
    def public(self) -> EncryptionPublicKey:
        return EncryptionPublicKey(
            mlkem.MLKEM768PrivateKey.from_seed_bytes(self.mlkem_seed).public_key().public_bytes_raw(),
            x25519.X25519PrivateKey.from_private_bytes(self.x25519).public_key().public_bytes_raw(),
        )

    def to_bytes(self) -> bytes:
        return cbor.encode({"mlkem_seed": self.mlkem_seed, "x25519": self.x25519})

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptionPrivateKey:
        d = cbor.decode(data, max_size=1024)
        if (
            not isinstance(d, dict)
            or not isinstance(d.get("mlkem_seed"), bytes)
            or not isinstance(d.get("x25519"), bytes)
        ):
            raise Malformed("not an encryption private key")
        return cls(d["mlkem_seed"], d["x25519"])


@dataclass(frozen=True)
class Card:
    """A node's signed public card."""

    raw: bytes
    domain: str
    node_id: str
    issued_at: int
    expires: int
    signing_key: PublicKey
    encryption_key: EncryptionPublicKey

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "node_id": self.node_id,
            "fingerprint": self.fingerprint,
            "signing_keyid": self.signing_key.keyid,
            "encryption_kid": self.encryption_key.kid.hex(),
            "issued_at": self.issued_at,
            "expires": self.expires,
        }


def make_card(
    domain: str,
    node_id: str,
    signer: PrivateKey,
    enc: EncryptionPublicKey,
    now: int,
    countersigners: Sequence[PrivateKey] = (),
) -> bytes:
    """A card signed by its own key, and by ``countersigners`` (an authority's freshness role keys vouch
    for its card, so a node can check it against the root it holds before sealing anything to it)."""
    payload = {
        "type": "card",
        "domain": domain,
        "node_id": node_id,
        "issued_at": now,
        "expires": now + CARD_LIFETIME,
        "signing_key": signer.public.to_cbor(),
        "encryption_key": enc.to_cbor(),
    }
    return cose.sign(cbor.encode(payload), [signer, *countersigners], content_type=CARD_CONTENT_TYPE)


def parse_card(data: bytes) -> Card:
    """Parse a card and check it is signed by every algorithm of the key it names."""
    d = cose.parse_signed(
        data,
        content_type=CARD_CONTENT_TYPE,
        max_size=MAX_CARD_SIZE,
        what="qhx-edge node card",
        types=frozenset({"card"}),
        signer=lambda body: PublicKey.from_cbor(body.get("signing_key")),
    ).body
    node_id = d.get("node_id")
    if not isinstance(node_id, str) or not 1 <= len(node_id) <= 64:
        raise Malformed("card node_id must be a short text")
    issued, expires = d.get("issued_at"), d.get("expires")
    if not isinstance(issued, int) or not isinstance(expires, int) or isinstance(issued, bool) or expires < issued:
        raise Malformed("card times are invalid")
    key = PublicKey.from_cbor(d.get("signing_key"))
    return Card(
        bytes(data),
        check_trust_domain(d.get("domain")),
        node_id,
        issued,
        expires,
        key,
        EncryptionPublicKey.from_cbor(d.get("encryption_key")),
    )


def spki(key: PrivateKey) -> bytes:
    """SubjectPublicKeyInfo DER of a one-algorithm key (ES256 or ML-DSA-65)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from qhx_edge.core.x509ca import private_key_object

    return private_key_object(key).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
