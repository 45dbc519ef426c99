"""COSE_Sign envelopes (RFC 9052 §4.1), one signature per key and algorithm.

::

    COSE_Sign = #6.98([protected: bstr, unprotected: {}, payload: bstr,
                       signatures: [+ [protected: bstr, unprotected: {}, signature: bstr]]])

Each signature's protected header carries its algorithm (label 1) and its
unprotected header the signer's key id (label 4).  The bytes signed are the
``Sig_structure`` of RFC 9052 §4.4::

    ["Signature", body_protected, sign_protected, external_aad, payload]

This module parses and builds envelopes and computes ``Sig_structure``; it does
not decide whom to believe (that is :mod:`qhx_edge.core.trust` for trust
documents).  :func:`parse_signed` is the one way every signed message type is
read: envelope, content type, payload map and message type, and the signer when
the message names or the caller knows it.  Parsing is strict:
the whole envelope must be deterministic CBOR, header maps must be maps, an
empty protected header must be the empty byte string (§3), and critical
headers (label 2) are refused because we implement none.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2

from qhx_edge.core import cbor
from qhx_edge.core.errors import BadSignature, Malformed
from qhx_edge.core.suites import PrivateKey, PublicKey

COSE_SIGN_TAG = 98
H_ALG = 1
H_CRIT = 2
H_CONTENT_TYPE = 3
H_KID = 4
MAX_SIGNATURES = 64
MAX_HEADER_SIZE = 4096


def _header_map(protected: Any, where: str) -> dict[Any, Any]:
    if not isinstance(protected, bytes):
        raise Malformed(f"{where} protected header must be a byte string")
    if protected == b"":
        return {}
    value = _decode_header(protected)
    if not isinstance(value, dict):
        raise Malformed(f"{where} protected header must encode a map")
    if not value:
        raise Malformed(f"{where} empty protected header must be a zero-length string (RFC 9052 §3)")
    if H_CRIT in value:
        raise Malformed(f"{where} names critical headers; none are supported")
    return dict(value)  # a copy: the cached value is shared


@functools.lru_cache(maxsize=256)
def _decode_header(protected: bytes) -> Any:
    """A protected header decoded once per distinct byte string.

    The same few headers ({1: -19}, {1: -49}, the content type) recur in every
    document, and each strict decode costs about a quarter of a payload's.
    A pure function of the exact bytes; input that fails to decode raises and
    is not cached.
    """
    return cbor.decode(protected, max_size=MAX_HEADER_SIZE)


@dataclass(frozen=True, slots=True)
class Signature:
    protected: bytes
    alg: int
    kid: bytes
    signature: bytes

    def to_value(self) -> list[Any]:
        """This signature as a canonical COSE_Signature: the kid unprotected unless it is protected."""
        sheaders = _decode_header(self.protected) if self.protected else {}
        unprotected = {} if H_KID in sheaders else {H_KID: self.kid}
        return [self.protected, unprotected, self.signature]


# The content of a COSE_Sign: what every one of its signers signed (RFC 9052 §4.4), and
# nothing a relay can change without a key: the body's protected header and the payload.
# Domain-separated from every other hash of the project.
_CONTENT_PREFIX = cbor2.dumps(["qhx-edge signed content", b"", b""])[:-2]


@dataclass(frozen=True)
class Envelope:
    protected: bytes
    headers: dict[Any, Any]
    payload: bytes
    signatures: tuple[Signature, ...]
    # Already in the form :meth:`canonical` gives for all its signatures (as cose.sign writes it):
    # no unprotected body header, each kid alone in its unprotected header, (kid, alg) strictly ordered.
    in_canonical_form: bool = False

    @functools.cached_property
    def content_digest(self) -> bytes:
        """SHA-256 of the signed content: ``["qhx-edge signed content", protected, payload]``.

        Two envelopes with one content digest say the same thing under the
        same protected header; they may differ only in what no signer signed
        (unprotected headers, extra or missing signatures), so a relay that
        adds a junk signature or header does not make another document.
        """
        return hashlib.sha256(_CONTENT_PREFIX + cbor2.dumps(self.protected) + cbor2.dumps(self.payload)).digest()

    def canonical(self, keep: Sequence[int]) -> bytes:
        """The canonical envelope of the signatures at ``keep`` (those that verified).

        The same content with the same verified signatures always gives the
        same bytes: no unprotected body header, each signature's kid in its
        unprotected header (unless its protected header holds it), one
        signature per key id and algorithm, in (key id, algorithm) order.
        """
        chosen: dict[tuple[bytes, int], Signature] = {}
        for i in keep:
            sig = self.signatures[i]
            slot = (sig.kid, sig.alg)
            if slot not in chosen or (sig.protected, sig.signature) < (chosen[slot].protected, chosen[slot].signature):
                chosen[slot] = sig
        sigs = [chosen[slot].to_value() for slot in sorted(chosen)]
        return cbor.encode(cbor2.CBORTag(COSE_SIGN_TAG, [self.protected, {}, self.payload, sigs]))

    def to_be_signed(self, sig_protected: bytes, external_aad: bytes = b"") -> bytes:
        """``Sig_structure`` for one signer (RFC 9052 §4.4)."""
        return sig_structure(self.protected, sig_protected, self.payload, external_aad)

    @classmethod
    def parse(cls, data: bytes, *, max_size: int) -> Envelope:
        if isinstance(data, bytes) and len(data) <= max_size:
            value = _written_shape(data)
            if value is not None:
                return cls.from_value(value)
        value = cbor.decode(data, max_size=max_size, tags=frozenset({COSE_SIGN_TAG}))
        return cls.from_value(value)

    @classmethod
    def from_value(cls, value: Any) -> Envelope:
        if not isinstance(value, cbor2.CBORTag) or value.tag != COSE_SIGN_TAG:
            raise Malformed("not a COSE_Sign structure (tag 98)")
        body = value.value
        if not isinstance(body, list) or len(body) != 4:
            raise Malformed("COSE_Sign must be an array of four items")
        protected, unprotected, payload, signatures = body
        headers = _header_map(protected, "body")
        if not isinstance(unprotected, dict):
            raise Malformed("unprotected header must be a map")
        if not isinstance(payload, bytes):
            raise Malformed("payload must be an attached byte string")
        if not isinstance(signatures, list) or not signatures:
            raise Malformed("COSE_Sign needs at least one signature")
        if len(signatures) > MAX_SIGNATURES:
            raise Malformed(f"more than {MAX_SIGNATURES} signatures")
        sigs: list[Signature] = []
        canonical = not unprotected
        for item in signatures:
            if not isinstance(item, list) or len(item) != 3:
                raise Malformed("COSE_Signature must be an array of three items")
            sprot, sunprot, sig = item
            sheaders = _header_map(sprot, "signature")
            if not isinstance(sunprot, dict) or not isinstance(sig, bytes):
                raise Malformed("COSE_Signature has the wrong shape")
            alg = sheaders.get(H_ALG)
            if not isinstance(alg, int) or isinstance(alg, bool):
                raise Malformed("signature algorithm must be a protected integer")
            kid = sunprot.get(H_KID, sheaders.get(H_KID, b""))
            if not isinstance(kid, bytes):
                raise Malformed("kid must be a byte string")
            canonical = canonical and sunprot == ({} if H_KID in sheaders else {H_KID: kid})
            if sigs and (sigs[-1].kid, sigs[-1].alg) >= (kid, alg):
                canonical = False
            sigs.append(Signature(bytes(sprot), alg, kid, sig))
        return cls(bytes(protected), headers, payload, tuple(sigs), canonical)


def _bstr_size(b: bytes) -> int:
    return cbor.head_size(len(b)) + len(b)


class _OtherShape(Exception):
    """Not the written shape: the generic reader decides."""


def _written_shape(data: bytes) -> cbor2.CBORTag | None:
    """``data`` decoded, when it provably is a deterministic envelope of the shape signers write.

    That shape is ``#6.98([bstr, {}, bstr, [+ [bstr, {} or {4: bstr}, bstr]]])``:
    what :func:`sign` writes and :meth:`Envelope.canonical` gives, so what
    nodes store and relay.  Byte strings, one-key maps and arrays hold no
    choice but their heads' lengths, and every head cbor2 reads is at least as
    long as its shortest form; so when the item's shortest-form length equals
    ``len(data)``, it is deterministic and fills ``data`` exactly (RFC 8949
    §4.2.1), with no walk over its items.  Anything else (another shape, a
    longer head, trailing bytes, an error) returns None and the generic strict
    reader (:func:`qhx_edge.core.cbor.decode`) decides, with its own errors.
    """
    try:
        return _checked_shape(data, cbor.loads_strict(data))
    except _OtherShape:
        return None


def _checked_shape(data: bytes, value: Any) -> cbor2.CBORTag:
    if type(value) is not cbor2.CBORTag or value.tag != COSE_SIGN_TAG:
        raise _OtherShape
    body = value.value
    if type(body) is not tuple or len(body) != 4:
        raise _OtherShape
    protected, unprotected, payload, signatures = body
    if type(protected) is not bytes or type(payload) is not bytes or type(signatures) is not tuple:
        raise _OtherShape
    if type(unprotected) is not cbor2.frozendict or unprotected:
        raise _OtherShape
    size = 3 + _bstr_size(protected) + 1 + _bstr_size(payload) + cbor.head_size(len(signatures))  # tag 98, array(4)
    sigs: list[list[Any]] = []
    for item in signatures:
        if type(item) is not tuple or len(item) != 3:
            raise _OtherShape
        sprot, sunprot, sig = item
        if type(sprot) is not bytes or type(sig) is not bytes or type(sunprot) is not cbor2.frozendict:
            raise _OtherShape
        headers: dict[Any, Any] = {}
        size += 1 + _bstr_size(sprot) + _bstr_size(sig) + 1  # array(3), the map's head
        if sunprot:
            if len(sunprot) != 1:
                raise _OtherShape
            ((label, kid),) = sunprot.items()
            if type(label) is not int or label != H_KID or type(kid) is not bytes:
                raise _OtherShape
            headers[H_KID] = kid
            size += 1 + _bstr_size(kid)  # the key 4, then the kid
        sigs.append([sprot, headers, sig])
    if size != len(data):
        raise _OtherShape
    return cbor2.CBORTag(COSE_SIGN_TAG, [protected, {}, payload, sigs])


def sig_structure(body_protected: bytes, sign_protected: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    """``Sig_structure`` (RFC 9052 §4.4): ``["Signature", body_protected, sign_protected, external_aad, payload]``.

    The deterministic encoding of that array is its head, then each item's own
    encoding (RFC 8949 §4.2.1: an array has no order to choose), so the first
    four items, which recur in every document, are encoded once
    (:func:`_sig_prefix`) and only the payload's byte string per call.
    """
    if type(payload) is not bytes:
        raise TypeError("the payload must be bytes")
    # A byte string's encoding is its shortest head and its bytes: deterministic as cbor2 writes it.
    return _sig_prefix(body_protected, sign_protected, external_aad) + cbor2.dumps(payload)


@functools.lru_cache(maxsize=256)
def _sig_prefix(body_protected: bytes, sign_protected: bytes, external_aad: bytes) -> bytes:
    """The encoding of ``Sig_structure`` up to its payload: a pure function of exact bytes."""
    full = cbor.encode(["Signature", body_protected, sign_protected, external_aad, b""])
    return full[:-1]  # the empty payload's encoding is the one byte 0x40


def sign(
    payload: bytes,
    signers: Sequence[PrivateKey],
    *,
    content_type: str | int | None = None,
) -> bytes:
    """Build a COSE_Sign over ``payload`` with every algorithm of every signer.

    The signatures are in the canonical order of :meth:`Envelope.canonical`
    (key id, then algorithm), so what a signer publishes is byte for byte what
    a node stores and relays once every signature has verified.
    """
    protected = cbor.encode({H_CONTENT_TYPE: content_type}) if content_type is not None else b""
    signatures = []
    for key in signers:
        kid = bytes.fromhex(key.public.keyid)
        for alg, _ in key.parts:
            sprot = cbor.encode({H_ALG: alg})
            tbs = sig_structure(protected, sprot, payload)
            signatures.append((kid, alg, [sprot, {H_KID: kid}, key.sign(alg, tbs)]))
    signatures.sort(key=lambda s: (s[0], s[1]))  # the canonical order (Envelope.canonical)
    return cbor.encode(cbor2.CBORTag(COSE_SIGN_TAG, [protected, {}, payload, [s[2] for s in signatures]]))


def require_signed_by(env: Envelope, key: PublicKey, what: str) -> None:
    """Raise :class:`BadSignature` unless every algorithm of ``key`` validly signed ``env``."""
    kid = bytes.fromhex(key.keyid)
    good: set[int] = set()
    for sig in env.signatures:
        if sig.kid == kid and key.verify_part(sig.alg, sig.signature, env.to_be_signed(sig.protected)):
            good.add(sig.alg)
    if not set(key.algs) <= good:
        raise BadSignature(f"{what} is not signed by the key it names")


@dataclass(frozen=True, slots=True)
class SignedMessage:
    """A parsed signed message: its exact bytes, its envelope and its decoded payload map."""

    raw: bytes
    envelope: Envelope
    body: dict[str, Any]


Signer = PublicKey | Callable[[dict[str, Any]], PublicKey]


def parse_signed(
    data: bytes,
    *,
    content_type: str,
    max_size: int,
    what: str,
    types: frozenset[str] | None = None,
    signer: Signer | None = None,
) -> SignedMessage:
    """Parse a signed message of one content type: the one reader of every signed message type.

    Steps, in order: the COSE_Sign envelope (strict, deterministic, at most
    ``max_size`` bytes); the body's content type (RFC 9052 §3.1 label 3), so a
    message of one kind is never read as another; when ``signer`` is a key
    known beforehand, its signatures (before the payload is decoded, so an
    unsigned payload costs nothing); the payload as a deterministic CBOR map
    whose ``type`` is one of ``types``; when ``signer`` is a function, the key
    it finds in the payload (a card or manifest names its own key), whose every
    algorithm must have signed.  Trust documents pass no signer: their
    signatures are counted against role thresholds by :mod:`qhx_edge.core.trust`.
    """
    env = Envelope.parse(data, max_size=max_size)
    if env.headers.get(H_CONTENT_TYPE) != content_type:
        raise Malformed(f"not a {what}: the content type must be {content_type!r}")
    if isinstance(signer, PublicKey):
        require_signed_by(env, signer, what)
    body = cbor.decode(env.payload, max_size=max_size)
    if not isinstance(body, dict):
        raise Malformed(f"not a {what}: the payload must be a map")
    if types is not None and body.get("type") not in types:
        raise Malformed(f"not a {what}: unexpected message type {body.get('type')!r}")
    if signer is not None and not isinstance(signer, PublicKey):
        require_signed_by(env, signer(body), what)
    return SignedMessage(bytes(data), env, body)
