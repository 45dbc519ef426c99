"""A home's private keys, loaded from its keystore on demand.

Every node makes two keys at ``node init`` (the authority's home has the same
identity for its exports): a signing key in its domain's suite and an HPKE
encryption key (:mod:`qhx_edge.core.cards` defines their public halves and the
card).  Attested nodes add their delegated CA keys and a JWT-SVID key.
"""

from __future__ import annotations

from qhx_edge.core.cards import EncryptionPrivateKey
from qhx_edge.core.errors import MissingFile
from qhx_edge.core.suites import ES256, MLDSA65, PrivateKey
from qhx_edge.store.keystore import Keystore

SIGNING_KEY = "node-signing"
ENCRYPTION_KEY = "node-encryption"
# The node's delegated CA keys (one per CA algorithm) and its JWT-SVID key, made
# when the node first asks to be attested; the authority certifies their public halves.
CA_KEYS = {ES256: "node-ca-es256", MLDSA65: "node-ca-mldsa65"}
JWT_KEY = "node-jwt"


class NodeIdentity:
    """A home's signing and encryption keys, loaded from its keystore on demand."""

    def __init__(self, keystore: Keystore) -> None:
        self.keystore = keystore
        self._signer: PrivateKey | None = None
        self._enc: EncryptionPrivateKey | None = None

    @classmethod
    def create(cls, keystore: Keystore, suite: str) -> NodeIdentity:
        ident = cls(keystore)
        ident._signer = PrivateKey.generate(suite)
        ident._enc = EncryptionPrivateKey.generate()
        keystore.save(SIGNING_KEY, ident._signer)
        keystore.save_secret(ENCRYPTION_KEY, ident._enc.to_bytes())
        return ident

    @property
    def signer(self) -> PrivateKey:
        if self._signer is None:
            self._signer = self.keystore.load(SIGNING_KEY)
        return self._signer

    def key(self, name: str, alg: int, *, create: bool = False) -> PrivateKey:
        """A one-algorithm key of this home (CA or JWT key), made on first use if ``create``."""
        try:
            return self.keystore.load(name)
        except MissingFile:
            if not create:
                raise
        key = PrivateKey.generate_algs([alg])
        self.keystore.save(name, key)
        return key

    def ca_key(self, alg: int, *, create: bool = False) -> PrivateKey:
        return self.key(CA_KEYS[alg], alg, create=create)

    def jwt_key(self, *, create: bool = False) -> PrivateKey:
        return self.key(JWT_KEY, ES256, create=create)

    @property
    def encryption(self) -> EncryptionPrivateKey:
        if self._enc is None:
            self._enc = EncryptionPrivateKey.from_bytes(self.keystore.load_secret(ENCRYPTION_KEY))
        return self._enc
