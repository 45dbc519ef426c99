"""COSE_Sign envelopes (RFC 9052 §4.1), one signature per key and algorithm.

::

    COSE_Sign = #6.98([protected: bstr, unprotected: {}, payload: bstr,
                       signatures: [+ [protected: bstr, unprotected: {}, signature: bstr]]])

Each signature's protected header carries its algorithm (label 1) and its
unprotected header the signer's key id (label 4).  The bytes signed are the
``Sig_structure`` of RFC 9052 §4.4::

    ["Signature", body_protected, sign_protected, external_aad, payload]

This module parses and builds envelopes and computes ``Sig_structure``; it does
not decide whom to believe (that is :mod:`qhx_edge.verify`).  Parsing is strict:
the whole envelope must be deterministic CBOR, header maps must be maps, an
empty protected header must be the empty byte string (§3), and critical
headers (label 2) are refused because we implement none.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cbor2

from qhx_edge import cbor
from qhx_edge.errors import Malformed
from qhx_edge.suites import PrivateKey

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


@dataclass(frozen=True, slots=True)
class Envelope:
    protected: bytes
    headers: dict[Any, Any]
    payload: bytes
    signatures: tuple[Signature, ...]

    def to_be_signed(self, sig_protected: bytes, external_aad: bytes = b"") -> bytes:
        """``Sig_structure`` for one signer (RFC 9052 §4.4)."""
        return sig_structure(self.protected, sig_protected, self.payload, external_aad)

    @classmethod
    def parse(cls, data: bytes, *, max_size: int) -> Envelope:
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
        sigs = []
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
            sigs.append(Signature(bytes(sprot), alg, kid, sig))
        return cls(bytes(protected), headers, payload, tuple(sigs))


def sig_structure(body_protected: bytes, sign_protected: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    return cbor.encode(["Signature", body_protected, sign_protected, external_aad, payload])


def sign(
    payload: bytes,
    signers: Sequence[PrivateKey],
    *,
    content_type: str | int | None = None,
) -> bytes:
    """Build a COSE_Sign over ``payload`` with every algorithm of every signer."""
    protected = cbor.encode({H_CONTENT_TYPE: content_type}) if content_type is not None else b""
    signatures = []
    for key in signers:
        kid = bytes.fromhex(key.public.keyid)
        for alg, _ in key.parts:
            sprot = cbor.encode({H_ALG: alg})
            tbs = sig_structure(protected, sprot, payload)
            signatures.append([sprot, {H_KID: kid}, key.sign(alg, tbs)])
    return cbor.encode(cbor2.CBORTag(COSE_SIGN_TAG, [protected, {}, payload, signatures]))
