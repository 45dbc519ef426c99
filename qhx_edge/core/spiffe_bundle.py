"""SPIFFE bundles as JWK Sets: reading a partner's, writing ours (SPIFFE Trust Domain and Bundle §4,
X509-SVID §6, JWT-SVID §6; RFC 7517, RFC 7518 §6).

A SPIFFE bundle is unsigned: it says nothing about who wrote it. Reading one
here proves only that it is well formed; whether to believe it is the
caller's decision (an agreement that allows SPIFFE bundles, at lower
assurance: docs/architecture.md, "Agreements").

Reading (:func:`parse`), strict where the standard is and where being lax
would be a hole:

* one JSON object, no repeated member (§6.3), at most :data:`MAX_BUNDLE_BYTES`;
* ``keys`` MUST be present (§4.1.3), an array of at most :data:`MAX_KEYS`
  objects; it may be empty (the domain revoked every key);
* ``spiffe_sequence`` and ``spiffe_refresh_hint``, when present, are integers
  in ``0 .. 2**63 - 1`` (§4.1.1, §4.1.2);
* a key whose ``use`` is missing or unknown is ignored (§4.2.2), and so is a
  key of a type we cannot read; each ignored key is reported in ``ignored``;
* ``x509-svid``: an entry without ``x5c`` (or with an empty one) is ignored,
  the first certificate counts and the rest are ignored (X509-SVID §6.2); the
  certificate must parse, and key members beside it must describe its key
  (RFC 7517 §4.7), else the bundle is ``malformed``;
* ``jwt-svid``: ``kid`` MUST be set (JWT-SVID §6.1) and is unique among the
  JWT keys, and the key members must describe a valid public key, else the
  bundle is ``malformed``: a token naming that kid would otherwise mean two
  keys, or none.

Writing (:func:`to_json`) follows what SPIRE's ``bundle show -format spiffe``
writes: ``x509-svid`` keys with exactly one ``x5c`` certificate, their key
members and no ``kid``; ``jwt-svid`` keys with their ``kid``;
``spiffe_sequence`` and ``spiffe_refresh_hint``. ML-DSA keys are written as
``AKP`` JWKs (the JOSE key type of the ML-DSA drafts); ``classical=True``
leaves them out for partners whose software cannot read them (SPIRE and Go's
crypto/x509 today) and says what it left out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_der_public_key

from qhx_edge.core.documents import Bundle
from qhx_edge.core.errors import Malformed, Oversize
from qhx_edge.core.jsonstrict import strict_object

MAX_BUNDLE_BYTES = 1 << 20
MAX_KEYS = 1024
MAX_JSON_DEPTH = 8  # a bundle nests three levels: the set, its keys, an x5c array
_UINT_MAX = 2**63 - 1
X509_USE = "x509-svid"
JWT_USE = "jwt-svid"

_CURVES: dict[str, tuple[type[ec.EllipticCurve], int]] = {
    "P-256": (ec.SECP256R1, 32),
    "P-384": (ec.SECP384R1, 48),
    "P-521": (ec.SECP521R1, 66),
}
_CURVE_NAMES = {cls().name: (name, size) for name, (cls, size) in _CURVES.items()}
_AKP = {"ML-DSA-65": mldsa.MLDSA65PublicKey}

PublicKeyTypes = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey | mldsa.MLDSA65PublicKey


@dataclass(frozen=True)
class JwtAuthority:
    kid: str
    spki: bytes  # DER SubjectPublicKeyInfo


@dataclass(frozen=True)
class SpiffeBundle:
    """What a SPIFFE bundle says, and what reading it ignored."""

    x509_authorities: tuple[bytes, ...]  # DER certificates
    jwt_authorities: tuple[JwtAuthority, ...]
    sequence: int | None
    refresh_hint: int | None
    ignored: tuple[str, ...] = ()


# --- base64 ----------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: Any, what: str) -> bytes:
    if not isinstance(text, str) or not text or "=" in text:
        raise Malformed(f"SPIFFE bundle: {what} must be unpadded base64url text (RFC 7515 §2)")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise Malformed(f"SPIFFE bundle: {what} is not base64url: {exc}") from None


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise Malformed(f"SPIFFE bundle: {what} must be base64 text (RFC 7517 §4.7)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Malformed(f"SPIFFE bundle: {what} is not base64: {exc}") from None


# --- JWK <-> public keys -----------------------------------------------------------------------


def jwk_of(key: Any) -> dict[str, str] | None:
    """The JWK members of a public key (RFC 7518 §6), or None for a key type JWK cannot carry here."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        named = _CURVE_NAMES.get(key.curve.name)
        if named is None:
            return None
        crv, size = named
        nums = key.public_numbers()
        x, y = _b64url(nums.x.to_bytes(size, "big")), _b64url(nums.y.to_bytes(size, "big"))
        return {"kty": "EC", "crv": crv, "x": x, "y": y}
    if isinstance(key, rsa.RSAPublicKey):
        rn = key.public_numbers()
        return {
            "kty": "RSA",
            "n": _b64url(rn.n.to_bytes((rn.n.bit_length() + 7) // 8, "big")),
            "e": _b64url(rn.e.to_bytes((rn.e.bit_length() + 7) // 8, "big")),
        }
    if isinstance(key, ed25519.Ed25519PublicKey):
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(key.public_bytes_raw())}
    if isinstance(key, mldsa.MLDSA65PublicKey):
        return {"kty": "AKP", "alg": "ML-DSA-65", "pub": _b64url(key.public_bytes_raw())}
    return None


def _ec_key(jwk: dict[str, Any], what: str) -> PublicKeyTypes | None:
    curve = _CURVES.get(str(jwk.get("crv")))
    if curve is None:
        return None
    cls, size = curve
    xb, yb = _unb64url(jwk.get("x"), f"{what} x"), _unb64url(jwk.get("y"), f"{what} y")
    if len(xb) != size or len(yb) != size:
        raise Malformed(f"SPIFFE bundle: {what} coordinates must be {size} bytes (RFC 7518 §6.2.1.2)")
    return ec.EllipticCurvePublicNumbers(int.from_bytes(xb, "big"), int.from_bytes(yb, "big"), cls()).public_key()


def _rsa_key(jwk: dict[str, Any], what: str) -> PublicKeyTypes | None:
    n = int.from_bytes(_unb64url(jwk.get("n"), f"{what} n"), "big")
    e = int.from_bytes(_unb64url(jwk.get("e"), f"{what} e"), "big")
    if n.bit_length() < 2048:
        raise Malformed(f"SPIFFE bundle: {what} is an RSA key under 2048 bits")
    return rsa.RSAPublicNumbers(e, n).public_key()


def _okp_key(jwk: dict[str, Any], what: str) -> PublicKeyTypes | None:
    if jwk.get("crv") != "Ed25519":
        return None
    return ed25519.Ed25519PublicKey.from_public_bytes(_unb64url(jwk.get("x"), f"{what} x"))


def _akp_key(jwk: dict[str, Any], what: str) -> PublicKeyTypes | None:
    cls = _AKP.get(str(jwk.get("alg")))
    return None if cls is None else cls.from_public_bytes(_unb64url(jwk.get("pub"), f"{what} pub"))


_READERS = {"EC": _ec_key, "RSA": _rsa_key, "OKP": _okp_key, "AKP": _akp_key}


def key_of(jwk: dict[str, Any], what: str) -> PublicKeyTypes | None:
    """The public key a JWK describes; None for a key type we do not read (to be ignored, §4.1.3).

    Raises :class:`Malformed` for a known type whose members are wrong or describe no valid key."""
    reader = _READERS.get(str(jwk.get("kty")))
    if reader is None:
        return None
    try:
        return reader(jwk, what)
    except ValueError as exc:
        raise Malformed(f"SPIFFE bundle: {what} is not a valid public key: {exc}") from None


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


# --- reading -----------------------------------------------------------------------------------


def _uint(d: dict[str, Any], name: str) -> int | None:
    if name not in d:
        return None
    v = d[name]
    if type(v) is not int or not 0 <= v <= _UINT_MAX:
        raise Malformed(f"SPIFFE bundle: {name} must be an integer in 0..2^63-1")
    return v


def _x509_entry(jwk: dict[str, Any], what: str, ignored: list[str]) -> bytes | None:
    chain = jwk.get("x5c")
    if chain is None or chain == []:
        ignored.append(f"{what}: x509-svid without x5c (X509-SVID §6.2)")
        return None
    if not isinstance(chain, list):
        raise Malformed(f"SPIFFE bundle: {what} x5c must be an array")
    der = _unb64(chain[0], f"{what} x5c[0]")
    try:
        cert = x509.load_der_x509_certificate(der)
        cert_key = cert.public_key()
    except ValueError as exc:
        raise Malformed(f"SPIFFE bundle: {what} x5c[0] is not a DER certificate: {exc}") from None
    if "kty" in jwk:
        described = key_of(jwk, what)
        if described is not None and _spki(described) != _spki(cert_key):
            raise Malformed(f"SPIFFE bundle: {what} key members do not match its certificate (RFC 7517 §4.7)")
    if len(chain) > 1:
        ignored.append(f"{what}: {len(chain) - 1} certificate(s) after the first in x5c (X509-SVID §6.2)")
    return der


def _jwt_entry(jwk: dict[str, Any], what: str, ignored: list[str]) -> JwtAuthority | None:
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise Malformed(f"SPIFFE bundle: {what} is a jwt-svid key without a kid (JWT-SVID §6.1)")
    key = key_of(jwk, what)
    if key is None:
        ignored.append(f"{what}: jwt-svid key {kid!r} of a type not read here ({jwk.get('kty')!r})")
        return None
    return JwtAuthority(kid, _spki(key))


def parse(data: bytes) -> SpiffeBundle:
    """Read a SPIFFE bundle (the module docstring lists the rules); :class:`Malformed` or
    :class:`Oversize` when it breaks one."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise Oversize(f"SPIFFE bundle of {len(data)} bytes exceeds the cap of {MAX_BUNDLE_BYTES}")
    d = strict_object(data, "SPIFFE bundle", max_depth=MAX_JSON_DEPTH)
    if "keys" not in d:
        raise Malformed("SPIFFE bundle has no 'keys' member (SPIFFE Trust Domain and Bundle §4.1.3)")
    keys = d["keys"]
    if not isinstance(keys, list):
        raise Malformed("SPIFFE bundle: 'keys' must be an array")
    if len(keys) > MAX_KEYS:
        raise Oversize(f"SPIFFE bundle holds {len(keys)} keys, over the cap of {MAX_KEYS}")
    sequence, hint = _uint(d, "spiffe_sequence"), _uint(d, "spiffe_refresh_hint")
    x509s: list[bytes] = []
    jwts: list[JwtAuthority] = []
    ignored: list[str] = []
    for i, jwk in enumerate(keys):
        what = f"keys[{i}]"
        if not isinstance(jwk, dict):
            raise Malformed(f"SPIFFE bundle: {what} must be an object")
        use = jwk.get("use")
        if use == X509_USE:
            der = _x509_entry(jwk, what, ignored)
            if der is not None and der not in x509s:
                x509s.append(der)
        elif use == JWT_USE:
            auth = _jwt_entry(jwk, what, ignored)
            if auth is not None:
                if any(a.kid == auth.kid for a in jwts):
                    raise Malformed(f"SPIFFE bundle: {what} repeats the jwt-svid kid {auth.kid!r}")
                jwts.append(auth)
        else:
            ignored.append(f"{what}: use {use!r} is not x509-svid or jwt-svid (§4.2.2)")
    return SpiffeBundle(tuple(x509s), tuple(jwts), sequence, hint, tuple(ignored))


def content_digest(bundle: SpiffeBundle) -> bytes:
    """SHA-256 of what a SPIFFE bundle says (sequence, X.509 and JWT authorities, in a fixed order), not
    of its JSON text: the same bundle pretty-printed again is the same bundle, and two bundles with one
    sequence but other keys differ (an import calls that ``rollback``).  The refresh hint is left out:
    it says how often to look, not what to trust, and SPIRE's ``bundle show`` omits the hint its
    bundle endpoint serves for the very same bundle."""
    from qhx_edge.core import cbor

    body = [
        bundle.sequence,
        sorted(bundle.x509_authorities),
        sorted([a.kid, a.spki] for a in bundle.jwt_authorities),
    ]
    return hashlib.sha256(cbor.encode(body)).digest()


# --- writing -----------------------------------------------------------------------------------


def from_document(bundle: Bundle) -> SpiffeBundle:
    """Our bundle document as a SPIFFE bundle: its authorities, its version as ``spiffe_sequence``."""
    jwts = tuple(JwtAuthority(str(a["kid"]), bytes(a["spki"])) for a in bundle.jwt_authorities)
    return SpiffeBundle(bundle.x509_authorities, jwts, bundle.version, bundle.refresh_hint)


_CLASSICAL = ("EC", "RSA", "OKP")


def to_json(bundle: SpiffeBundle, *, classical: bool = False) -> tuple[bytes, list[str]]:
    """The JWK Set of ``bundle`` (sorted members, stable bytes) and what was left out, and why."""
    keys: list[dict[str, Any]] = []
    left_out: list[str] = []
    for i, der in enumerate(bundle.x509_authorities):
        try:
            jwk = jwk_of(x509.load_der_x509_certificate(der).public_key())
        except (ValueError, TypeError, UnsupportedAlgorithm):
            left_out.append(f"x509 authority {i}: not a certificate with a key we can read")
            continue
        if jwk is None or (classical and jwk["kty"] not in _CLASSICAL):
            left_out.append(
                f"x509 authority {i}: {jwk['alg'] if jwk else 'its key type'} is not readable by classical peers"
            )
            continue
        keys.append({"use": X509_USE, **jwk, "x5c": [base64.b64encode(der).decode("ascii")]})
    for auth in bundle.jwt_authorities:
        try:
            jwk = jwk_of(load_der_public_key(auth.spki))
        except (ValueError, TypeError, UnsupportedAlgorithm):
            left_out.append(f"jwt authority {auth.kid}: not a public key we can read")
            continue
        if jwk is None or (classical and jwk["kty"] not in _CLASSICAL):
            left_out.append(f"jwt authority {auth.kid}: its key type is not readable by classical peers")
            continue
        keys.append({"use": JWT_USE, "kid": auth.kid, **jwk})
    out: dict[str, Any] = {"keys": keys}
    if bundle.sequence is not None:
        out["spiffe_sequence"] = bundle.sequence
    if bundle.refresh_hint is not None:
        out["spiffe_refresh_hint"] = bundle.refresh_hint
    return (json.dumps(out, indent=4, sort_keys=True) + "\n").encode(), left_out
