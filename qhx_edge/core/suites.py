"""Signature algorithms and crypto suites, behind one small registry.

An *algorithm* is a COSE signature algorithm (RFC 9053 §2, RFC 9864 for
Ed25519 as -19, draft-ietf-cose-dilithium for ML-DSA as -48/-49/-50).  A
*suite* names which algorithms one signer holds, and a signer's key is only
satisfied when **every** algorithm of its suite has a valid signature: the
``hybrid`` suite therefore needs both Ed25519 and ML-DSA-65 from one signer,
so forging a hybrid signature takes breaking both.

The registry is open: :func:`register` adds an algorithm (a different
backend, say liboqs) without touching the verification code, which only
asks the registry for ``verify(public, signature, message)``.

Key id (``keyid``) = SHA-256 over the deterministic CBOR of the public key
description ``[[alg, raw_public], ...]`` in registry order; for a one-
algorithm key that is one pair.  Like TUF's keyid over canonical JSON, it
names the whole key, so a hybrid key is one key, counted once.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from qhx_edge.core import cbor
from qhx_edge.core.errors import Malformed

# COSE algorithm identifiers.
ED25519 = -19
EDDSA_LEGACY = -8  # RFC 8152 "EdDSA"; accepted on input as Ed25519 only
ES256 = -7
MLDSA44 = -48
MLDSA65 = -49
MLDSA87 = -50


@dataclass(frozen=True)
class Algorithm:
    """One signature algorithm: how to make, use and check its keys."""

    cose_id: int
    name: str
    public_size: int
    generate: Callable[[], tuple[bytes, bytes]]  # -> (private_raw, public_raw)
    sign: Callable[[bytes, bytes], bytes]  # (private_raw, message) -> signature
    verify: Callable[[bytes, bytes, bytes], bool]  # (public_raw, signature, message)
    public_from_private: Callable[[bytes], bytes] = field(repr=False, default=lambda b: b)


_REGISTRY: dict[int, Algorithm] = {}
_ALIASES: dict[int, int] = {EDDSA_LEGACY: ED25519}


def register(alg: Algorithm) -> None:
    """Add (or replace) an algorithm backend."""
    _REGISTRY[alg.cose_id] = alg


def get(cose_id: int) -> Algorithm:
    """The algorithm for a COSE id (aliases resolved), or :class:`Malformed`."""
    try:
        return _REGISTRY[_ALIASES.get(cose_id, cose_id)]
    except (KeyError, TypeError):
        raise Malformed(f"unsupported signature algorithm {cose_id!r}") from None


def _rank(cose_id: int) -> int:
    """An algorithm's place in the registry (the canonical order of a key's parts); unknown ones last."""
    order = list(_REGISTRY)
    return order.index(cose_id) if cose_id in _REGISTRY else len(order)


def canonical_alg(cose_id: int) -> int:
    return _ALIASES.get(cose_id, cose_id)


def name_of(cose_id: int) -> str:
    """The registry's name of an algorithm (``ES256``, ``ML-DSA-65``...)."""
    return get(cose_id).name


def by_name(name: str) -> int:
    """The COSE id of the registered algorithm called ``name``, or :class:`Malformed`."""
    for cose_id, alg in _REGISTRY.items():
        if alg.name == name:
            return cose_id
    raise Malformed(f"unknown algorithm {name!r}")


@functools.lru_cache(maxsize=512)
def _public_key(cls: Any, raw: bytes) -> Any:
    """The public key object of ``cls`` that ``raw`` loads, loaded once per distinct key.

    A node checks many documents under the same few role keys, and loading an
    ML-DSA-65 key costs about 3 % of a verification.  The cache maps the exact
    raw bytes (and the key class) to the immutable object they load, so it can
    never make another key verify; bytes that fail to load raise and are not cached.
    """
    return cls.from_public_bytes(raw)


# --- Ed25519 ---------------------------------------------------------------


def _ed_generate() -> tuple[bytes, bytes]:
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


def _ed_sign(private: bytes, msg: bytes) -> bytes:
    return ed25519.Ed25519PrivateKey.from_private_bytes(private).sign(msg)


def _ed_verify(public: bytes, sig: bytes, msg: bytes) -> bool:
    try:
        _public_key(ed25519.Ed25519PublicKey, bytes(public)).verify(sig, msg)
    except (InvalidSignature, ValueError):
        return False
    return True


def _ed_public(private: bytes) -> bytes:
    return ed25519.Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


register(Algorithm(ED25519, "Ed25519", 32, _ed_generate, _ed_sign, _ed_verify, _ed_public))


# --- ML-DSA (FIPS 204) -------------------------------------------------------


def _mldsa(cose_id: int, name: str, priv_cls: Any, pub_cls: Any, pub_size: int) -> Algorithm:
    def generate() -> tuple[bytes, bytes]:
        key = priv_cls.generate()
        return key.private_bytes_raw(), key.public_key().public_bytes_raw()

    def sign(private: bytes, msg: bytes) -> bytes:
        return bytes(priv_cls.from_seed_bytes(private).sign(msg))

    def verify(public: bytes, sig: bytes, msg: bytes) -> bool:
        try:
            _public_key(pub_cls, bytes(public)).verify(sig, msg)
        except (InvalidSignature, ValueError):
            return False
        return True

    def public(private: bytes) -> bytes:
        return bytes(priv_cls.from_seed_bytes(private).public_key().public_bytes_raw())

    # Private keys are kept as the 32-byte seed (FIPS 204 §6.1 ξ).
    return Algorithm(cose_id, name, pub_size, generate, sign, verify, public)


register(_mldsa(MLDSA44, "ML-DSA-44", mldsa.MLDSA44PrivateKey, mldsa.MLDSA44PublicKey, 1312))
register(_mldsa(MLDSA65, "ML-DSA-65", mldsa.MLDSA65PrivateKey, mldsa.MLDSA65PublicKey, 1952))
register(_mldsa(MLDSA87, "ML-DSA-87", mldsa.MLDSA87PrivateKey, mldsa.MLDSA87PublicKey, 2592))


# --- ES256 (ECDSA P-256 with SHA-256; COSE signature is r||s, RFC 9053 §2.1) --


def _es_generate() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    priv = key.private_numbers().private_value.to_bytes(32, "big")
    return priv, _es_public(priv)


def _es_key(private: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(private, "big"), ec.SECP256R1())


def _es_public(private: bytes) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return _es_key(private).public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def _es_sign(private: bytes, msg: bytes) -> bytes:
    der = _es_key(private).sign(msg, ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _es_verify(public: bytes, sig: bytes, msg: bytes) -> bool:
    if len(sig) != 64:
        return False
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public)
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        key.verify(der, msg, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


register(Algorithm(ES256, "ES256", 65, _es_generate, _es_sign, _es_verify, _es_public))


# --- Suites -----------------------------------------------------------------

SUITES: dict[str, tuple[int, ...]] = {
    "classical": (ED25519,),
    "pq": (MLDSA65,),
    "hybrid": (ED25519, MLDSA65),
}
DEFAULT_SUITE = "hybrid"
POST_QUANTUM = frozenset({MLDSA44, MLDSA65, MLDSA87})
# What X.509 CAs and SVIDs are signed with (X.509 has no Ed25519 + ML-DSA hybrid): ES256 always,
# ML-DSA-65 beside it in a domain whose suite is post-quantum.
SVID_ALGORITHMS = (ES256, MLDSA65)


def ca_algs(suite: str) -> tuple[int, ...]:
    """The CA algorithms of a domain of ``suite``: ES256, and ML-DSA-65 when the suite is post-quantum."""
    return SVID_ALGORITHMS if POST_QUANTUM & set(suite_algs(suite)) else (ES256,)


def suite_algs(name: str) -> tuple[int, ...]:
    try:
        return SUITES[name]
    except KeyError:
        raise Malformed(f"unknown suite {name!r} (choose from {', '.join(SUITES)})") from None


@dataclass(frozen=True)
class PublicKey:
    """A signer's public key: one raw public key per algorithm of its suite."""

    parts: tuple[tuple[int, bytes], ...]  # ((cose_alg, raw_public), ...)

    def __post_init__(self) -> None:
        if not self.parts:
            raise Malformed("a key needs at least one algorithm")
        algs = [a for a, _ in self.parts]
        if len(set(algs)) != len(algs):
            raise Malformed("a key lists one algorithm twice")
        # One key, one id: the id hashes the parts in order, so the same key material in another
        # order would be another "distinct" key and one private key could count twice toward a
        # threshold.  Parts must come in registry order (the order of every suite).
        ranks = [_rank(a) for a in algs]
        if ranks != sorted(ranks):
            raise Malformed("the parts of a key must be in registry order (one key has one id)")
        for alg, raw in self.parts:
            spec = get(alg)
            if canonical_alg(alg) != alg:
                raise Malformed(f"key algorithm {alg} must be given as {canonical_alg(alg)}")
            if len(raw) != spec.public_size:
                raise Malformed(f"{spec.name} public key must be {spec.public_size} bytes")

    @property
    def algs(self) -> tuple[int, ...]:
        return tuple(a for a, _ in self.parts)

    def to_cbor(self) -> list[list[Any]]:
        return [[alg, raw] for alg, raw in self.parts]

    @classmethod
    def from_cbor(cls, value: Any) -> PublicKey:
        if not isinstance(value, list) or not value or len(value) > 4:
            raise Malformed("a public key is a non-empty array of [alg, bytes] pairs")
        parts = []
        for item in value:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[0], int)
                or isinstance(item[0], bool)
                or not isinstance(item[1], bytes)
            ):
                raise Malformed("a public key part is [alg, bytes]")
            parts.append((item[0], item[1]))
        return cls(tuple(parts))

    @property
    def keyid(self) -> str:
        return _keyid(self.parts)

    def verify_part(self, alg: int, signature: bytes, message: bytes) -> bool:
        alg = canonical_alg(alg)
        for part_alg, raw in self.parts:
            if part_alg == alg:
                return get(alg).verify(raw, signature, message)
        return False


@functools.lru_cache(maxsize=1024)
def _keyid(parts: tuple[tuple[int, bytes], ...]) -> str:
    """SHA-256 over the deterministic CBOR of ``[[alg, raw_public], ...]``, once per distinct key.

    Every root lists its keys by id, and a root is re-read at every import: the
    id is a pure function of the exact (algorithm, raw bytes) pairs, so caching
    it by them can never give one key another's id.
    """
    return hashlib.sha256(cbor.encode([[alg, raw] for alg, raw in parts])).hexdigest()


@dataclass(frozen=True)
class PrivateKey:
    """A signer's private key for every algorithm of its suite."""

    parts: tuple[tuple[int, bytes], ...]  # ((cose_alg, raw_private), ...)

    @classmethod
    def generate(cls, suite: str) -> PrivateKey:
        return cls.generate_algs(suite_algs(suite))

    @classmethod
    def generate_algs(cls, algs: Sequence[int]) -> PrivateKey:
        return cls(tuple((alg, get(alg).generate()[0]) for alg in algs))

    @property
    def public(self) -> PublicKey:
        return PublicKey(tuple((alg, get(alg).public_from_private(raw)) for alg, raw in self.parts))

    def sign(self, alg: int, message: bytes) -> bytes:
        for part_alg, raw in self.parts:
            if part_alg == alg:
                return get(alg).sign(raw, message)
        raise KeyError(alg)

    def to_cbor(self) -> list[list[Any]]:
        return [[alg, raw] for alg, raw in self.parts]

    @classmethod
    def from_cbor(cls, value: Any) -> PrivateKey:
        if not isinstance(value, list) or not value:
            raise Malformed("a private key is a non-empty array of [alg, bytes] pairs")
        parts = []
        for item in value:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], bytes):
                raise Malformed("a private key part is [alg, bytes]")
            get(item[0])
            parts.append((int(item[0]), bytes(item[1])))
        return cls(tuple(parts))
