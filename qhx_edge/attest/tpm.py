"""TPM 2.0 operations for node attestation (docs/issuance.md §1).

Two halves:

* :class:`TpmClient` -- the node side, talking to a real TPM (``device:/dev/tpmrm0``)
  or to ``swtpm`` (``swtpm:host=127.0.0.1,port=2321``) through ``tpm2-pytss``:
  reads the EK certificate from NV, recreates the EK from the TCG EK Credential
  Profile template that matches it, creates the attestation key (AK), activates
  credentials and quotes PCRs.
* module functions -- the authority side, pure software (no TPM): check the EK
  certificate chain, bind the EK public area to its certificate, software
  MakeCredential, and verify quotes with ``cryptography``.

Wire formats (all ``bytes``): public areas are marshalled ``TPM2B_PUBLIC``;
names are ``nameAlg || H(TPMT_PUBLIC)``; a credential blob is the contents of a
``TPM2B_ID_OBJECT`` and an encrypted secret the contents of a
``TPM2B_ENCRYPTED_SECRET`` (no size prefix); a quote is the ``TPMS_ATTEST``
the TPM signed (the contents of its ``TPM2B_ATTEST``) plus a marshalled
``TPMT_SIGNATURE``.

The AK is an ECC P-256 restricted signing key (ECDSA-SHA256) created as a
*primary* key of the endorsement hierarchy from a fixed template: the TPM
derives it from its endorsement seed, so every :meth:`TpmClient.create_ak` on
the same TPM yields the same key.  A node can therefore run ``attest request``
and, days later in another process, ``attest respond`` with the same AK
without storing any key blob.

Every verification failure is :class:`~qhx_edge.core.errors.AttestationFailed`;
an unreachable or unusable TPM is :class:`~qhx_edge.core.errors.NoTpm`.
``tpm2_pytss`` is imported lazily (it costs ~60 ms), so importing this module
keeps CLI start-up fast.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import hmac
import os
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key

from qhx_edge.core.errors import AttestationFailed, NoTpm

PCR_BANK = "sha256"

#: TCG EK Credential Profile 2.0, low range: (NV index of the certificate, tpm2-pytss template name,
#: persistent handle where TCG provisioning guidance stores that EK).
EK_CERT_INDICES: tuple[tuple[int, str, int], ...] = (
    (0x01C00002, "EK-RSA2048", 0x81010001),
    (0x01C0000A, "EK-ECC256", 0x81010002),
)

PCR_COUNT = 24  # PC Client platform TPMs (and swtpm) implement PCRs 0..23
MAX_NONCE = 64  # TPM2B_DATA holds a TPMT_HA: at most a SHA-512 digest
MAX_SECRET = 32  # TPM2B_DIGEST of a SHA-256 TPM: the portable credential size

# TPMA_OBJECT bits (TPM 2.0 Part 2, §8.3)
_FIXEDTPM = 0x00000002
_FIXEDPARENT = 0x00000010
_SENSITIVEDATAORIGIN = 0x00000020
_USERWITHAUTH = 0x00000040
_RESTRICTED = 0x00010000
_DECRYPT = 0x00020000
_SIGN = 0x00040000
AK_ATTRIBUTES = _RESTRICTED | _SIGN | _FIXEDTPM | _FIXEDPARENT | _SENSITIVEDATAORIGIN
EK_ATTRIBUTES = _RESTRICTED | _DECRYPT | _FIXEDTPM | _FIXEDPARENT

# TPM_ALG_ID values (TPM 2.0 Part 2, §6.3)
_ALG_RSA = 0x0001
_ALG_SHA256 = 0x000B
_ALG_SHA384 = 0x000C
_ALG_SHA512 = 0x000D
_ALG_RSASSA = 0x0014
_ALG_RSAPSS = 0x0016
_ALG_ECDSA = 0x0018
_ALG_ECC = 0x0023
_HASHES: dict[int, Callable[[], hashes.HashAlgorithm]] = {
    _ALG_SHA256: hashes.SHA256,
    _ALG_SHA384: hashes.SHA384,
    _ALG_SHA512: hashes.SHA512,
}
_GENERATED_VALUE = 0xFF544347  # TPM_GENERATED_VALUE: "\xffTCG"
_ST_ATTEST_QUOTE = 0x8018

# TSS return codes this module reacts to
_RC_LAYER_MASK = 0xFF << 16  # 0 = the TPM itself answered
_RC_INITIALIZE = 0x100
_RC_OBJECT_MEMORY = 0x902

_T = TypeVar("_T")
_LIVE: weakref.WeakSet[TpmClient] = weakref.WeakSet()  # open clients, whose objects _reclaim spares


@dataclass(frozen=True)
class AkInfo:
    public: bytes  # marshalled TPM2B_PUBLIC of the attestation key
    name: bytes  # the AK's TPM name (nameAlg || digest of the public area)


@dataclass(frozen=True)
class Quote:
    attest: bytes  # marshalled TPMS_ATTEST (TPM2B_ATTEST contents)
    signature: bytes  # marshalled TPMT_SIGNATURE
    pcrs: dict[int, bytes]  # the PCR values read alongside (sha256 bank)


# --------------------------------------------------------------------------------------------
# Helpers shared by both halves


NO_TPM = (
    "TPM support is the optional extra qhx-edge[tpm] (pip install 'qhx-edge[tpm]'), which builds "
    "tpm2-pytss against the TPM software stack (Debian package libtss2-dev)"
)


def _require_tss() -> None:
    """Import ``tpm2_pytss`` or raise :class:`NoTpm` naming the extra and the system package."""
    try:
        import tpm2_pytss
        import tpm2_pytss.utils  # noqa: F401
    except ImportError as exc:  # not installed, or the TSS shared libraries are missing
        raise NoTpm(f"{NO_TPM}: {exc}") from exc


def _tss_rc(exc: BaseException) -> int | None:
    """The TSS2 return code of a tpm2-pytss error, or None for any other exception."""
    tss = sys.modules.get("tpm2_pytss")
    if tss is not None and isinstance(exc, tss.TSS2_Exception):
        return int(exc.rc)
    return None


def _unmarshal(cls: Any, blob: bytes, what: str) -> Any:
    """Unmarshal exactly ``blob`` as a tpm2-pytss type: trailing bytes and non-canonical encodings
    (which would let a name, a hash or a signature cover other bytes than the fields read) are refused."""
    if not isinstance(blob, bytes | bytearray) or not blob:
        raise AttestationFailed(f"{what} is empty or not bytes")
    try:
        obj, used = cls.unmarshal(bytes(blob))
        canonical = obj.marshal()
    except Exception as e:  # TSS2_Exception (MU layer), ValueError, TypeError
        raise AttestationFailed(f"{what} is not a valid {cls.__name__}: {e}") from e
    if used != len(blob):
        raise AttestationFailed(f"{what} has {len(blob) - used} trailing bytes after the {cls.__name__}")
    if canonical != blob:
        raise AttestationFailed(f"{what} is not a canonically encoded {cls.__name__}")
    return obj


def _parse_public(blob: bytes, what: str) -> Any:
    _require_tss()
    from tpm2_pytss import TPM2B_PUBLIC

    pub = _unmarshal(TPM2B_PUBLIC, blob, what)
    if pub.size == 0:
        raise AttestationFailed(f"{what} is an empty TPM2B_PUBLIC")
    return pub.publicArea


def _public_key(area: Any, what: str) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """The ``cryptography`` key of a TPMT_PUBLIC (RSA or ECC only)."""
    if int(area.type) not in (_ALG_RSA, _ALG_ECC):
        raise AttestationFailed(f"{what} is neither an RSA nor an ECC key (type {int(area.type):#06x})")
    try:
        key = load_der_public_key(area.to_der())
    except Exception as e:  # unsupported curve, bad point, malformed modulus
        raise AttestationFailed(f"{what} has no usable public key: {e}") from e
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise AttestationFailed(f"{what} is neither an RSA nor an ECC key")
    return key


def public_name(public: bytes) -> bytes:
    """The TPM name of a marshalled TPM2B_PUBLIC: ``nameAlg || H_nameAlg(TPMT_PUBLIC)``, computed in software."""
    area = _parse_public(public, "public area")
    alg = int(area.nameAlg)
    if alg not in _HASHES:
        raise AttestationFailed(f"public area has an unsupported name algorithm {alg:#06x}")
    h = hashes.Hash(_HASHES[alg]())
    h.update(area.marshal())
    return alg.to_bytes(2, "big") + h.finalize()


def verify_ak_name(ak_public: bytes, ak_name: bytes) -> None:
    """The claimed AK name is the name of ``ak_public``.

    The authority must check this before MakeCredential: the TPM releases the
    secret for the *named* key, and the quote is verified under the *public
    area*, so a node that could pair the name of one key with the public area
    of another would break the AK-to-EK binding.
    """
    if not hmac.compare_digest(public_name(ak_public), bytes(ak_name)):
        raise AttestationFailed("the AK name does not match the AK public area")


def extend_value(old: bytes, digest: bytes) -> bytes:
    """The value of a sha256 PCR holding ``old`` after TPM2_PCR_Extend with ``digest``."""
    return hashlib.sha256(old + digest).digest()


def pcr_digest(values: Mapping[int, bytes]) -> bytes:
    """SHA-256 of the PCR values concatenated in index order: a quote's ``pcrDigest`` for one sha256 selection."""
    return hashlib.sha256(b"".join(values[i] for i in sorted(values))).digest()


# --------------------------------------------------------------------------------------------
# Authority side


def _when(now: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(now, dt.UTC)


def _check_validity(cert: x509.Certificate, now: int, what: str) -> None:
    when = _when(now)
    if when < cert.not_valid_before_utc:
        raise AttestationFailed(f"{what} is not valid before {cert.not_valid_before_utc.isoformat()}")
    if when > cert.not_valid_after_utc:
        raise AttestationFailed(f"{what} expired at {cert.not_valid_after_utc.isoformat()}")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not bc.ca:
        return False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return bool(ku.key_cert_sign)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _trim_der(blob: bytes) -> bytes:
    """The DER SEQUENCE at the start of ``blob``: TPM NV areas may pad a certificate with trailing bytes."""
    if len(blob) < 2 or blob[0] != 0x30:
        return blob
    first = blob[1]
    if first < 0x80:
        return blob[: 2 + first]
    n = first & 0x7F
    if n == 0 or n > 4 or len(blob) < 2 + n:
        return blob
    return blob[: 2 + n + int.from_bytes(blob[2 : 2 + n], "big")]


def verify_ek_certificate(ek_cert_der: bytes, manufacturer_cas: Sequence[bytes], now: int) -> None:
    """The EK certificate is valid at ``now`` and chains to one of ``manufacturer_cas``.

    Every configured CA certificate (DER) is a trust anchor, root or
    intermediate.  swtpm_localca issues EK certificates from an intermediate
    ("CN=swtpm-localca") under its own root, as real manufacturers do, and a
    TPM stores no intermediate: so configure the *issuing* CA (typically with
    its root, ``[root, intermediate]``; the root alone cannot verify).  The EK
    certificate must be issued by a configured CA: names match, the signature
    verifies, the CA is ``cA`` with keyCertSign (when key usage is present) and
    valid at ``now``.  Matching names alone are never enough: every
    swtpm_localca CA carries the same names, with different keys.
    """
    try:
        cert = x509.load_der_x509_certificate(bytes(ek_cert_der))
    except Exception as e:
        raise AttestationFailed(f"EK certificate is not a DER X.509 certificate: {e}") from e
    cas: list[x509.Certificate] = []
    for i, der in enumerate(manufacturer_cas):
        try:
            cas.append(x509.load_der_x509_certificate(bytes(der)))
        except Exception as e:
            raise AttestationFailed(f"configured manufacturer CA #{i} is not a DER X.509 certificate: {e}") from e
    if not cas:
        raise AttestationFailed("no manufacturer CA is configured")
    _check_validity(cert, now, "EK certificate")
    if _is_ca(cert):
        raise AttestationFailed("EK certificate is a CA certificate")

    def issued_by_anchor(child: x509.Certificate) -> bool:
        for ca in cas:
            if ca.subject != child.issuer or not _is_ca(ca) or not _issued_by(child, ca):
                continue
            try:
                _check_validity(ca, now, "manufacturer CA")
            except AttestationFailed:
                continue
            return True
        return False

    if not issued_by_anchor(cert):
        names = ", ".join(sorted({c.subject.rfc4514_string() for c in cas})) or "-"
        raise AttestationFailed(
            f"EK certificate (issuer {cert.issuer.rfc4514_string() or '<empty>'}) does not chain to a configured "
            f"manufacturer CA ({names}): unknown manufacturer, wrong CA key, or CA not valid now"
        )


def ek_public_matches_certificate(ek_public: bytes, ek_cert_der: bytes) -> None:
    """The EK public area is an endorsement key (restricted decryption, fixedTPM) whose key is the certificate's."""
    area = _parse_public(ek_public, "EK public area")
    attrs = int(area.objectAttributes)
    if attrs & EK_ATTRIBUTES != EK_ATTRIBUTES or attrs & _SIGN:
        raise AttestationFailed(f"EK public area is not a restricted decryption key (attributes {attrs:#010x})")
    key = _public_key(area, "EK public area")
    try:
        cert_key = x509.load_der_x509_certificate(bytes(ek_cert_der)).public_key()
    except Exception as e:
        raise AttestationFailed(f"EK certificate is not a DER X.509 certificate: {e}") from e
    if isinstance(key, rsa.RSAPublicKey) and isinstance(cert_key, rsa.RSAPublicKey):
        same = key.public_numbers() == cert_key.public_numbers()
    elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(cert_key, ec.EllipticCurvePublicKey):
        same = key.curve.name == cert_key.curve.name and key.public_numbers() == cert_key.public_numbers()
    else:
        same = False
    if not same:
        raise AttestationFailed("EK public area does not hold the EK certificate's public key")


def make_credential(ek_public: bytes, ak_name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """Software TPM2_MakeCredential: ``(credential_blob, encrypted_secret)`` that only the TPM holding this EK
    can open, and only while the key named ``ak_name`` is loaded in it.

    ``secret`` is 1..32 bytes (a ValueError otherwise: it is the caller's own
    value); a malformed EK public area or AK name is AttestationFailed.
    """
    _require_tss()
    from tpm2_pytss import TPM2B_NAME
    from tpm2_pytss.utils import make_credential as _make_credential

    if not 1 <= len(secret) <= MAX_SECRET:
        raise ValueError(f"a credential secret is 1..{MAX_SECRET} bytes, not {len(secret)}")
    area = _parse_public(ek_public, "EK public area")
    name = bytes(ak_name)
    alg = int.from_bytes(name[:2], "big") if len(name) >= 2 else 0
    if alg not in _HASHES or len(name) != 2 + _HASHES[alg]().digest_size:
        raise AttestationFailed("AK name is not nameAlg || digest")
    try:
        blob, enc = _make_credential(area, bytes(secret), TPM2B_NAME(name=name))
    except Exception as e:  # unsupported EK type or symmetric scheme
        raise AttestationFailed(f"cannot make a credential for this EK: {e}") from e
    return bytes(blob), bytes(enc)


def ak_is_restricted_signing_key(ak_public: bytes) -> None:
    """The AK is a restricted signing key created inside a TPM (so it signs only TPM-generated attestations)."""
    area = _parse_public(ak_public, "AK public area")
    attrs = int(area.objectAttributes)
    missing = [
        label
        for bit, label in (
            (_RESTRICTED, "restricted"),
            (_SIGN, "sign"),
            (_FIXEDTPM, "fixedTPM"),
            (_FIXEDPARENT, "fixedParent"),
            (_SENSITIVEDATAORIGIN, "sensitiveDataOrigin"),
        )
        if not attrs & bit
    ]
    if missing:
        raise AttestationFailed(f"AK is not a restricted signing key: missing {', '.join(missing)}")
    if attrs & _DECRYPT:
        raise AttestationFailed("AK is a decryption key")
    if int(area.type) not in (_ALG_RSA, _ALG_ECC):
        raise AttestationFailed(f"AK is neither an RSA nor an ECC key (type {int(area.type):#06x})")


def _ak_scheme(area: Any) -> tuple[int, int]:
    """(signature scheme, hash) the restricted AK is bound to."""
    params = area.parameters
    scheme = params.eccDetail.scheme if int(area.type) == _ALG_ECC else params.rsaDetail.scheme
    return int(scheme.scheme), int(scheme.details.anySig.hashAlg)


def _verify_signature(area: Any, signature: bytes, message: bytes) -> None:
    _require_tss()
    from tpm2_pytss import TPMT_SIGNATURE

    sig = _unmarshal(TPMT_SIGNATURE, signature, "quote signature")
    key = _public_key(area, "AK public area")
    alg = int(sig.sigAlg)
    scheme, scheme_hash = _ak_scheme(area)
    try:
        if alg == _ALG_ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
            halg = int(sig.signature.ecdsa.hash)
            der = encode_dss_signature(
                int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big"),
                int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big"),
            )
            _check_sig_alg(alg, halg, scheme, scheme_hash)
            key.verify(der, message, ec.ECDSA(_HASHES[halg]()))
        elif alg in (_ALG_RSASSA, _ALG_RSAPSS) and isinstance(key, rsa.RSAPublicKey):
            body = sig.signature.rsassa if alg == _ALG_RSASSA else sig.signature.rsapss
            halg = int(body.hash)
            _check_sig_alg(alg, halg, scheme, scheme_hash)
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if alg == _ALG_RSASSA
                else padding.PSS(mgf=padding.MGF1(_HASHES[halg]()), salt_length=padding.PSS.AUTO)
            )
            key.verify(bytes(body.sig), message, pad, _HASHES[halg]())
        else:
            raise AttestationFailed(f"quote signature algorithm {alg:#06x} does not fit the AK key type")
    except InvalidSignature as e:
        raise AttestationFailed("quote signature does not verify under the AK") from e


def _check_sig_alg(alg: int, halg: int, scheme: int, scheme_hash: int) -> None:
    if halg not in _HASHES:
        raise AttestationFailed(f"quote signature uses an unsupported hash {halg:#06x}")
    if (alg, halg) != (scheme, scheme_hash):
        raise AttestationFailed("quote signature scheme is not the AK's scheme")


def _selected(selection: Any) -> tuple[int, set[int]]:
    """(hash, selected PCR indices) of a TPMS_PCR_SELECTION."""
    bitmap = bytes(selection.pcrSelect)[: int(selection.sizeofSelect)]
    return int(selection.hash), {8 * i + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1}


def verify_quote(ak_public: bytes, quote: Quote, nonce: bytes, expected_pcrs: Mapping[int, bytes]) -> None:
    """A TPM quote by this AK over exactly ``expected_pcrs`` (sha256 bank), carrying ``nonce``.

    Checks, in order: the AK is a restricted signing key; the signature
    verifies under it (with the AK's own scheme); the signed structure is a
    TPM-generated quote; ``extraData`` is the nonce; the selection is exactly
    the expected PCRs in the sha256 bank; the quoted digest is SHA-256 of the
    expected values in index order; and the reported ``quote.pcrs`` are those
    same values.  Any failure is AttestationFailed.
    """
    _require_tss()
    from tpm2_pytss import TPMS_ATTEST

    if not expected_pcrs:
        raise AttestationFailed("no PCR values to verify the quote against")
    for i, v in expected_pcrs.items():
        if not 0 <= i < PCR_COUNT or len(v) != 32:
            raise AttestationFailed(f"expected PCR {i} is not a sha256 PCR value")
    ak_is_restricted_signing_key(ak_public)
    area = _parse_public(ak_public, "AK public area")
    _verify_signature(area, quote.signature, quote.attest)

    attest = _unmarshal(TPMS_ATTEST, quote.attest, "quote")
    if int(attest.magic) != _GENERATED_VALUE:
        raise AttestationFailed("quote was not generated by a TPM (bad magic)")
    if int(attest.type) != _ST_ATTEST_QUOTE:
        raise AttestationFailed(f"attestation is not a quote (type {int(attest.type):#06x})")
    if not hmac.compare_digest(bytes(attest.extraData), bytes(nonce)):
        raise AttestationFailed("quote does not carry this challenge's nonce (replayed or stale quote)")

    selection = attest.attested.quote.pcrSelect
    if int(selection.count) != 1:
        raise AttestationFailed(f"quote selects {int(selection.count)} PCR banks, expected only {PCR_BANK}")
    bank, selected = _selected(selection.pcrSelections[0])
    if bank != _ALG_SHA256:
        raise AttestationFailed(f"quote is over PCR bank {bank:#06x}, expected {PCR_BANK}")
    if selected != set(expected_pcrs):
        raise AttestationFailed(f"quote covers PCRs {sorted(selected)}, the policy names {sorted(expected_pcrs)}")
    quoted = bytes(attest.attested.quote.pcrDigest)
    if not hmac.compare_digest(quoted, pcr_digest(expected_pcrs)):
        differing = sorted(i for i in expected_pcrs if quote.pcrs.get(i) != expected_pcrs[i])
        detail = f" (reported values differ at PCRs {differing})" if differing else ""
        raise AttestationFailed(f"quoted PCR digest does not match the policy's PCR values{detail}")
    if set(quote.pcrs) != set(expected_pcrs) or any(
        not hmac.compare_digest(quote.pcrs[i], expected_pcrs[i]) for i in expected_pcrs
    ):
        raise AttestationFailed("reported PCR values are not the quoted ones")


# --------------------------------------------------------------------------------------------
# Node side


def _pcr_selection(pcrs: Sequence[int]) -> Any:
    _require_tss()
    from tpm2_pytss import TPM2_ALG, TPML_PCR_SELECTION, TPMS_PCR_SELECTION

    bitmap = bytearray(3)
    for i in pcrs:
        bitmap[i // 8] |= 1 << (i % 8)
    return TPML_PCR_SELECTION([TPMS_PCR_SELECTION(hash=TPM2_ALG.SHA256, sizeofSelect=3, pcrSelect=bytes(bitmap))])


def _ak_template() -> Any:
    _require_tss()
    from tpm2_pytss import (
        TPM2_ALG,
        TPM2_ECC,
        TPM2B_PUBLIC,
        TPMA_OBJECT,
        TPMS_ECC_PARMS,
        TPMS_SCHEME_HASH,
        TPMT_ECC_SCHEME,
        TPMT_KDF_SCHEME,
        TPMT_PUBLIC,
        TPMT_SYM_DEF_OBJECT,
        TPMU_ASYM_SCHEME,
        TPMU_PUBLIC_PARMS,
    )

    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.ECC,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=TPMA_OBJECT(AK_ATTRIBUTES | _USERWITHAUTH),
            parameters=TPMU_PUBLIC_PARMS(
                eccDetail=TPMS_ECC_PARMS(
                    symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                    scheme=TPMT_ECC_SCHEME(
                        scheme=TPM2_ALG.ECDSA, details=TPMU_ASYM_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256))
                    ),
                    curveID=TPM2_ECC.NIST_P256,
                    kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
                )
            ),
        )
    )


class TpmClient:
    """A connection to one TPM (node side).

    The EK and the AK are created on first use and stay loaded until
    :meth:`close` flushes them.  The endorsement hierarchy must have an empty
    authorization (the default).  Unless ``TSS2_LOG`` is set, the TSS's own
    stderr logging is switched off: it logs expected misses (an absent NV
    index) as errors.
    """

    def __init__(self, tcti: str) -> None:
        os.environ.setdefault("TSS2_LOG", "all+none")
        _require_tss()
        from tpm2_pytss import ESAPI

        self._tcti = tcti
        self._ek_type: str | None = None
        self._ek_persistent: int | None = None
        self._ek_cert: bytes | None = None
        self._ek: Any = None  # ESYS_TR of the EK (transient, or persistent when _ek_owned is False)
        self._ek_owned = True
        self._ek_public: Any = None
        self._ak: Any = None
        self._ak_public: Any = None
        try:
            self._esys: Any = ESAPI(tcti)
        except Exception as e:
            raise NoTpm(f"no TPM reachable at {tcti!r}: {e}") from e
        try:
            self._probe()
        except BaseException:
            self._esys.close()
            raise
        _LIVE.add(self)

    def _probe(self) -> None:
        _require_tss()
        from tpm2_pytss import TPM2_CAP, TPM2_PT, TPM2_SU

        for attempt in range(2):
            try:
                self._esys.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.MANUFACTURER, 1)
            except Exception as e:
                if _tss_rc(e) == _RC_INITIALIZE and attempt == 0:  # a simulator nobody started up yet
                    self._call("TPM2_Startup", lambda: self._esys.startup(TPM2_SU.CLEAR))
                    continue
                raise NoTpm(f"the TPM at {self._tcti!r} does not answer: {e}") from e
            return

    def __enter__(self) -> TpmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush the EK and AK from the TPM and close the connection (idempotent)."""
        esys, self._esys = self._esys, None
        if esys is None:
            return
        _LIVE.discard(self)
        try:
            for handle, owned in ((self._ak, True), (self._ek, self._ek_owned)):
                if handle is not None:
                    # best effort: the connection may already be gone
                    with contextlib.suppress(Exception):
                        esys.flush_context(handle) if owned else esys.tr_close(handle)
        finally:
            self._ak = self._ek = None
            esys.close()

    # -- plumbing

    def _esapi(self) -> Any:
        if self._esys is None:
            raise NoTpm("the TPM client is closed")
        return self._esys

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run one TPM command; other failures are NoTpm.

        A TPM without a resource manager (swtpm, /dev/tpm0) keeps the transient
        objects of clients that died without flushing them; when it runs out of
        object slots (swtpm has 3), the objects no open client of this process
        owns are flushed and the command is retried once.  (Two *processes*
        sharing such a TPM at once is unsupported: use /dev/tpmrm0.)
        """
        for attempt in range(2):
            try:
                return fn()
            except NoTpm:
                raise
            except Exception as e:
                rc = _tss_rc(e)
                if attempt == 0 and rc == _RC_OBJECT_MEMORY:
                    self._reclaim()
                    continue
                raise NoTpm(f"{what} failed on the TPM: {e}") from e
        raise AssertionError("unreachable")

    def _reclaim(self) -> None:
        """Flush the transient objects that no open client of this process owns."""
        _require_tss()
        from tpm2_pytss import TPM2_CAP, TPM2_HC

        esys = self._esapi()
        owned: set[int] = set()
        for client in list(_LIVE):
            if client._tcti == self._tcti:
                owned |= client._tpm_handles()
        _, data = esys.get_capability(TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, 64)
        for handle in data.data.handles:
            if int(handle) in owned:
                continue
            with contextlib.suppress(Exception):  # best effort
                esys.flush_context(esys.tr_from_tpmpublic(handle))

    def _tpm_handles(self) -> set[int]:
        """TPM handles of the transient objects this client holds."""
        out: set[int] = set()
        if self._esys is None:
            return out
        for h in (self._ek if self._ek_owned else None, self._ak):
            if h is not None:
                with contextlib.suppress(Exception):  # a stale handle is simply not held
                    out.add(int(self._esys.tr_get_tpm_handle(h)))
        return out

    # -- EK

    def ek_certificate(self) -> bytes:
        """DER of the EK certificate from NV (RSA 2048 at 0x01c00002, else ECC P-256 at 0x01c0000a)."""
        if self._ek_cert is not None:
            return self._ek_cert
        _require_tss()
        from tpm2_pytss.utils import NoSuchIndex, NVReadEK

        reader = self._call("reading the NV buffer size", lambda: NVReadEK(self._esapi()))
        for index, ek_type, persistent in EK_CERT_INDICES:
            try:
                blob = reader(index)
            except NoSuchIndex:
                continue
            except Exception as e:
                raise NoTpm(f"reading the EK certificate at NV index {index:#010x} failed: {e}") from e
            self._ek_type, self._ek_persistent, self._ek_cert = ek_type, persistent, _trim_der(blob)
            return self._ek_cert
        raise NoTpm(
            "the TPM holds no EK certificate (NV indices "
            + ", ".join(f"{i:#010x}" for i, _, _ in EK_CERT_INDICES)
            + ")"
        )

    def _load_ek(self) -> Any:
        if self._ek is not None:
            return self._ek
        _require_tss()
        from tpm2_pytss import ESYS_TR

        _require_tss()
        from tpm2_pytss.utils import NVReadEK, create_ek_template

        self.ek_certificate()
        assert self._ek_type is not None
        esys = self._esapi()
        _, template = self._call("building the EK template", lambda: create_ek_template(self._ek_type, NVReadEK(esys)))
        found = self._persistent_ek(template)
        if found is not None:
            self._ek, self._ek_public = found
            self._ek_owned = False
            return self._ek
        handle, public, *_ = self._call(
            "creating the EK", lambda: esys.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        )
        self._ek, self._ek_public = handle, public
        self._ek_owned = True
        return handle

    def _persistent_ek(self, template: Any) -> tuple[Any, Any] | None:
        """The EK at its TCG persistent handle, if the key there is exactly the template's EK (same public
        area but for the key, which is the certificate's): no key generation, no transient slot."""
        _require_tss()
        from tpm2_pytss import TPMT_PUBLIC

        esys = self._esapi()
        try:
            handle = esys.tr_from_tpmpublic(self._ek_persistent)
        except Exception:
            return None
        try:
            public, _, _ = esys.read_public(handle)
            expected, _ = TPMT_PUBLIC.unmarshal(template.publicArea.marshal())
            expected.unique = public.publicArea.unique
            if expected.marshal() == public.publicArea.marshal():
                assert self._ek_cert is not None
                ek_public_matches_certificate(public.marshal(), self._ek_cert)
                return handle, public
        except Exception:  # noqa: S110 -- not the EK: create it from the template instead
            pass
        esys.tr_close(handle)
        return None

    def ek_public(self) -> bytes:
        """Marshalled TPM2B_PUBLIC of the EK recreated from the TCG template matching the EK certificate."""
        self._load_ek()
        return bytes(self._ek_public.marshal())

    # -- AK

    def _load_ak(self) -> Any:
        if self._ak is not None:
            return self._ak
        _require_tss()
        from tpm2_pytss import ESYS_TR

        esys = self._esapi()
        template = _ak_template()
        handle, public, *_ = self._call(
            "creating the AK", lambda: esys.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        )
        self._ak, self._ak_public = handle, public
        return handle

    def create_ak(self) -> AkInfo:
        """The AK: an ECC P-256 restricted signing key (ECDSA-SHA256), a primary key of the endorsement
        hierarchy, so the same TPM always yields the same AK.  It stays loaded for the next calls."""
        self._load_ak()
        return AkInfo(public=bytes(self._ak_public.marshal()), name=bytes(self._ak_public.get_name()))

    # -- activation

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the AK and the EK (under a PolicySecret(endorsement) session):
        the secret, when the credential was made for this TPM's EK and this AK; AttestationFailed otherwise."""
        _require_tss()
        from tpm2_pytss import ESYS_TR, TPM2_ALG, TPM2_SE, TPM2B_ENCRYPTED_SECRET, TPM2B_ID_OBJECT, TPMT_SYM_DEF

        try:
            blob = TPM2B_ID_OBJECT(credential=bytes(credential_blob))
            secret = TPM2B_ENCRYPTED_SECRET(secret=bytes(encrypted_secret))
        except Exception as e:  # larger than the TPM2B can hold
            raise AttestationFailed(f"malformed credential: {e}") from e
        ak, ek = self._load_ak(), self._load_ek()
        esys = self._esapi()
        session = self._call(
            "starting the EK policy session",
            lambda: esys.start_auth_session(
                ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256
            ),
        )
        try:
            # The EK's policy (TCG EK profile, policy A): PolicySecret(TPM_RH_ENDORSEMENT).
            self._call(
                "PolicySecret(endorsement)", lambda: esys.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
            )
            try:
                out = esys.activate_credential(ak, ek, blob, secret, session1=ESYS_TR.PASSWORD, session2=session)
            except Exception as e:
                rc = _tss_rc(e)
                if rc is not None and rc & _RC_LAYER_MASK == 0:  # the TPM refused this credential
                    raise AttestationFailed(f"credential activation failed: {e}") from e
                raise NoTpm(f"TPM2_ActivateCredential failed: {e}") from e
        finally:
            with contextlib.suppress(Exception):  # the session may be gone with the connection
                esys.flush_context(session)
        return bytes(out)

    # -- PCRs and quotes

    @staticmethod
    def _check_pcrs(pcrs: Sequence[int]) -> list[int]:
        out = sorted(set(pcrs))
        if not out or len(out) != len(pcrs) or not all(isinstance(i, int) and 0 <= i < PCR_COUNT for i in out):
            raise AttestationFailed(f"a PCR selection is distinct indices in 0..{PCR_COUNT - 1}, not {list(pcrs)}")
        return out

    def read_pcrs(self, pcrs: Sequence[int]) -> dict[int, bytes]:
        """The current values of ``pcrs`` in the sha256 bank."""
        wanted = self._check_pcrs(pcrs)
        esys = self._esapi()
        out: dict[int, bytes] = {}
        while len(out) < len(wanted):
            request = _pcr_selection([i for i in wanted if i not in out])
            _, selection, digests = self._call("TPM2_PCR_Read", functools.partial(esys.pcr_read, request))
            got: list[int] = []
            for k in range(int(selection.count)):
                bank, indices = _selected(selection.pcrSelections[k])
                if bank == _ALG_SHA256:
                    got.extend(sorted(indices))
            values = [bytes(d) for d in digests]
            if not got or len(got) != len(values):
                raise NoTpm(
                    f"the TPM's {PCR_BANK} PCR bank is not active (PCRs {sorted(set(wanted) - set(out))} unreadable)"
                )
            out.update(zip(got, values, strict=True))
        return {i: out[i] for i in wanted}

    def pcr_extend(self, pcr: int, digest: bytes) -> None:
        """TPM2_PCR_Extend of the sha256 bank of ``pcr`` with a 32-byte ``digest``."""
        _require_tss()
        from tpm2_pytss import ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

        (index,) = self._check_pcrs([pcr])
        if len(digest) != 32:
            raise ValueError("a sha256 PCR is extended with a 32-byte digest")
        values = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=bytes(digest)))])
        esys = self._esapi()
        self._call("TPM2_PCR_Extend", lambda: esys.pcr_extend(ESYS_TR(index), values))

    def quote(self, nonce: bytes, pcrs: Sequence[int]) -> Quote:
        """A quote by the AK over ``pcrs`` (sha256 bank) with ``extraData = nonce``, plus the PCR values.

        The values are read after the quote and checked against its digest
        (retried if a PCR was extended in between), so the evidence is
        self-consistent.
        """
        _require_tss()
        from tpm2_pytss import TPMS_ATTEST

        wanted = self._check_pcrs(pcrs)
        if not 1 <= len(nonce) <= MAX_NONCE:
            raise AttestationFailed(f"a quote nonce is 1..{MAX_NONCE} bytes, not {len(nonce)}")
        ak = self._load_ak()
        esys = self._esapi()
        for _ in range(3):
            attest, signature = self._call("TPM2_Quote", lambda: esys.quote(ak, _pcr_selection(wanted), bytes(nonce)))
            values = self.read_pcrs(wanted)
            raw = bytes(attest)
            parsed, _ = TPMS_ATTEST.unmarshal(raw)
            if bytes(parsed.attested.quote.pcrDigest) == pcr_digest(values):
                return Quote(attest=raw, signature=bytes(signature.marshal()), pcrs=values)
        raise NoTpm("PCRs kept changing while quoting")
