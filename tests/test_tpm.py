"""qhx_edge.attest.tpm against real software TPMs (swtpm manufactured by swtpm_setup with private CAs).

Two TPMs run for the whole module: A (the node under test) and B, an
independent TPM under a different manufacturer CA whose certificates carry the
same names as A's (swtpm_localca always names its CAs alike), so "unknown
manufacturer" is decided by keys, not names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from qhx_edge.attest import tpm
from qhx_edge.attest.tpm import AkInfo, Quote, TpmClient
from qhx_edge.core.errors import AttestationFailed, NoTpm
from tests.swtpm import SwTpm, running_swtpm, swtpm_a, swtpm_b

__all__ = ["swtpm_a", "swtpm_b"]  # module-scoped fixtures, re-exported for pytest

NONCE = bytes(range(32))
PCRS = [0, 1, 7]


@pytest.fixture(scope="module")
def node(swtpm_a: SwTpm) -> Iterator[TpmClient]:
    with TpmClient(swtpm_a.tcti) as client:
        yield client


@pytest.fixture(scope="module")
def other(swtpm_b: SwTpm) -> Iterator[TpmClient]:
    with TpmClient(swtpm_b.tcti) as client:
        yield client


@pytest.fixture(scope="module")
def ak(node: TpmClient) -> AkInfo:
    return node.create_ak()


@pytest.fixture(scope="module")
def quoted(node: TpmClient, ak: AkInfo) -> Quote:
    """A quote over PCRs 0, 1, 7 after extending PCR 7, so the values are not all zero."""
    before = node.read_pcrs([7])[7]
    measurement = hashlib.sha256(b"qhx-edge test boot component").digest()
    node.pcr_extend(7, measurement)
    quote = node.quote(NONCE, PCRS)
    assert quote.pcrs[7] == tpm.extend_value(before, measurement)
    assert quote.pcrs[7] != bytes(32)
    return quote


def now() -> int:
    return int(time.time())


# ---- EK certificate and EK public


def test_ek_certificate_chains_to_its_manufacturer_ca(node: TpmClient, swtpm_a: SwTpm) -> None:
    der = node.ek_certificate()
    cert = x509.load_der_x509_certificate(der)  # exactly one DER certificate: NV padding is trimmed
    assert cert.public_bytes(Encoding.DER) == der
    assert cert.issuer == x509.load_der_x509_certificate(swtpm_a.issuer_ca).subject
    tpm.verify_ek_certificate(der, swtpm_a.manufacturer_cas, now())
    tpm.verify_ek_certificate(der, [swtpm_a.issuer_ca], now())  # the issuing intermediate alone is an anchor
    with pytest.raises(AttestationFailed, match="does not chain"):
        tpm.verify_ek_certificate(der, [swtpm_a.root_ca], now())  # the TPM stores no intermediate


def test_ek_certificate_from_unknown_manufacturer_fails(node: TpmClient, swtpm_a: SwTpm, swtpm_b: SwTpm) -> None:
    der = node.ek_certificate()
    # Same CA names, different keys: only the signatures tell them apart.
    assert x509.load_der_x509_certificate(swtpm_b.issuer_ca).subject == x509.load_der_x509_certificate(der).issuer
    with pytest.raises(AttestationFailed, match="does not chain") as info:
        tpm.verify_ek_certificate(der, swtpm_b.manufacturer_cas, now())
    assert info.value.kind == "attestation-failed"
    with pytest.raises(AttestationFailed, match="no manufacturer CA"):
        tpm.verify_ek_certificate(der, [], now())


def test_ek_certificate_outside_validity_or_malformed_fails(node: TpmClient, swtpm_a: SwTpm) -> None:
    der = node.ek_certificate()
    not_before = int(x509.load_der_x509_certificate(der).not_valid_before_utc.timestamp())
    with pytest.raises(AttestationFailed, match="not valid before"):
        tpm.verify_ek_certificate(der, swtpm_a.manufacturer_cas, not_before - 3600)
    with pytest.raises(AttestationFailed, match="not a DER"):
        tpm.verify_ek_certificate(der[:-1], swtpm_a.manufacturer_cas, now())
    with pytest.raises(AttestationFailed, match="CA #0"):
        tpm.verify_ek_certificate(der, [b"junk"], now())
    # A CA certificate is not an EK certificate, even when it chains.
    with pytest.raises(AttestationFailed, match="is a CA"):
        tpm.verify_ek_certificate(swtpm_a.issuer_ca, swtpm_a.manufacturer_cas, now())


def test_ek_public_matches_certificate(node: TpmClient, other: TpmClient, ak: AkInfo) -> None:
    ek_public = node.ek_public()
    tpm.ek_public_matches_certificate(ek_public, node.ek_certificate())
    with pytest.raises(AttestationFailed, match="does not hold the EK certificate's public key"):
        tpm.ek_public_matches_certificate(other.ek_public(), node.ek_certificate())
    with pytest.raises(AttestationFailed, match="not a restricted decryption key"):
        tpm.ek_public_matches_certificate(ak.public, node.ek_certificate())
    with pytest.raises(AttestationFailed, match="trailing bytes"):
        tpm.ek_public_matches_certificate(ek_public + b"\x00", node.ek_certificate())
    with pytest.raises(AttestationFailed, match="not a valid TPM2B_PUBLIC"):
        tpm.ek_public_matches_certificate(ek_public[:-5], node.ek_certificate())


def test_ek_is_recreated_from_the_template_without_a_persistent_ek(tmp_path: Path) -> None:
    """swtpm_setup persists the RSA EK at 0x81010001; without it the EK is created from the TCG template,
    and it is the same key."""
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2_CAP, TPM2_HC

    with running_swtpm(tmp_path) as own:
        with TpmClient(own.tcti) as client:
            persisted = client.ek_public()
        esys = ESAPI(own.tcti)
        try:
            esys.evict_control(ESYS_TR.OWNER, esys.tr_from_tpmpublic(0x81010001), 0x81010001)
            _, data = esys.get_capability(TPM2_CAP.HANDLES, TPM2_HC.PERSISTENT_FIRST, 64)
            assert 0x81010001 not in [int(h) for h in data.data.handles]
        finally:
            esys.close()
        with TpmClient(own.tcti) as fresh:
            assert fresh.ek_public() == persisted
            tpm.ek_public_matches_certificate(fresh.ek_public(), fresh.ek_certificate())
            secret = os.urandom(32)
            assert fresh.activate_credential(*tpm.make_credential(persisted, fresh.create_ak().name, secret)) == secret


# ---- AK and credential activation


def test_ak_is_a_restricted_signing_key_with_a_stable_name(node: TpmClient, ak: AkInfo, swtpm_a: SwTpm) -> None:
    tpm.ak_is_restricted_signing_key(ak.public)
    tpm.verify_ak_name(ak.public, ak.name)
    assert ak.name == tpm.public_name(ak.public)
    assert ak.name[:2] == b"\x00\x0b"
    assert len(ak.name) == 34
    with pytest.raises(AttestationFailed, match="missing sign"):
        tpm.ak_is_restricted_signing_key(node.ek_public())
    with pytest.raises(AttestationFailed, match="does not match"):
        tpm.verify_ak_name(ak.public, tpm.public_name(node.ek_public()))
    size = int.from_bytes(ak.public[:2], "big")  # a TPM2B_PUBLIC padded inside its size: the name would lie
    with pytest.raises(AttestationFailed, match="TPM2B_PUBLIC"):
        tpm.public_name((size + 1).to_bytes(2, "big") + ak.public[2:] + b"\0")
    # A primary key of the endorsement hierarchy: another process gets the same AK.
    with TpmClient(swtpm_a.tcti) as again:
        assert again.create_ak() == ak


def test_make_credential_then_activate_returns_the_secret(node: TpmClient, ak: AkInfo) -> None:
    secret = os.urandom(32)
    blob, encrypted = tpm.make_credential(node.ek_public(), ak.name, secret)
    assert secret not in blob
    assert secret not in encrypted
    assert node.activate_credential(blob, encrypted) == secret


def test_activation_of_a_credential_for_another_tpm_fails(node: TpmClient, other: TpmClient, ak: AkInfo) -> None:
    blob, encrypted = tpm.make_credential(other.ek_public(), ak.name, os.urandom(32))
    with pytest.raises(AttestationFailed, match="activation failed"):
        node.activate_credential(blob, encrypted)
    # ... and the TPM keeps working afterwards (swtpm answers TPM_RC_FAILURE here, without entering failure mode).
    secret = os.urandom(32)
    assert node.activate_credential(*tpm.make_credential(node.ek_public(), ak.name, secret)) == secret


def test_activation_for_another_ak_or_tampered_blob_fails(node: TpmClient, other: TpmClient, ak: AkInfo) -> None:
    foreign_ak = other.create_ak()
    assert foreign_ak.name != ak.name
    with pytest.raises(AttestationFailed, match="activation failed"):
        node.activate_credential(*tpm.make_credential(node.ek_public(), foreign_ak.name, os.urandom(32)))
    blob, encrypted = tpm.make_credential(node.ek_public(), ak.name, os.urandom(32))
    with pytest.raises(AttestationFailed, match="activation failed"):
        node.activate_credential(blob[:-1] + bytes([blob[-1] ^ 1]), encrypted)
    with pytest.raises(AttestationFailed, match="malformed credential"):
        node.activate_credential(b"\x00" * 4096, encrypted)


def test_make_credential_rejects_bad_inputs(node: TpmClient, ak: AkInfo) -> None:
    with pytest.raises(AttestationFailed, match="nameAlg"):
        tpm.make_credential(node.ek_public(), ak.name[:-1], b"s" * 32)
    with pytest.raises(AttestationFailed, match="TPM2B_PUBLIC"):
        tpm.make_credential(b"\x00\x01\x02", ak.name, b"s" * 32)
    with pytest.raises(ValueError, match=r"1\.\.32 bytes"):
        tpm.make_credential(node.ek_public(), ak.name, b"s" * 33)


# ---- quotes


def test_quote_verifies_with_the_nonce_and_pcr_values(node: TpmClient, ak: AkInfo, quoted: Quote) -> None:
    assert sorted(quoted.pcrs) == PCRS
    assert node.read_pcrs(PCRS) == quoted.pcrs
    tpm.verify_quote(ak.public, quoted, NONCE, dict(quoted.pcrs))


def test_quote_with_another_nonce_is_a_replay(ak: AkInfo, quoted: Quote) -> None:
    with pytest.raises(AttestationFailed, match="nonce") as info:
        tpm.verify_quote(ak.public, quoted, os.urandom(32), quoted.pcrs)
    assert info.value.kind == "attestation-failed"


def test_quote_against_wrong_pcr_values_fails(ak: AkInfo, quoted: Quote) -> None:
    wrong = dict(quoted.pcrs)
    wrong[7] = hashlib.sha256(b"another bootloader").digest()
    with pytest.raises(AttestationFailed, match=r"PCR digest does not match.*PCRs \[7\]"):
        tpm.verify_quote(ak.public, quoted, NONCE, wrong)
    with pytest.raises(AttestationFailed, match="covers PCRs"):
        tpm.verify_quote(ak.public, quoted, NONCE, {i: quoted.pcrs[i] for i in (0, 1)})
    with pytest.raises(AttestationFailed, match="covers PCRs"):
        tpm.verify_quote(ak.public, quoted, NONCE, {**quoted.pcrs, 2: bytes(32)})
    # Values the node reports that are not the quoted ones are refused even when the policy matches.
    lying = dataclasses.replace(quoted, pcrs={**quoted.pcrs, 7: wrong[7]})
    with pytest.raises(AttestationFailed, match="reported PCR values"):
        tpm.verify_quote(ak.public, lying, NONCE, quoted.pcrs)


def test_quote_after_a_pcr_changes_no_longer_matches(node: TpmClient, ak: AkInfo) -> None:
    policy = node.read_pcrs([16])
    node.pcr_extend(16, hashlib.sha256(b"unexpected measurement").digest())
    fresh = node.quote(NONCE, [16])
    with pytest.raises(AttestationFailed, match="PCR digest does not match"):
        tpm.verify_quote(ak.public, fresh, NONCE, policy)
    tpm.verify_quote(ak.public, fresh, NONCE, fresh.pcrs)


def test_tampered_quote_or_signature_fails(ak: AkInfo, other: TpmClient, quoted: Quote) -> None:
    sig = bytearray(quoted.signature)
    sig[-1] ^= 1
    with pytest.raises(AttestationFailed, match="does not verify"):
        tpm.verify_quote(ak.public, dataclasses.replace(quoted, signature=bytes(sig)), NONCE, quoted.pcrs)
    attest = bytearray(quoted.attest)
    attest[-1] ^= 1  # the last byte of the PCR digest
    with pytest.raises(AttestationFailed, match="does not verify"):
        tpm.verify_quote(ak.public, dataclasses.replace(quoted, attest=bytes(attest)), NONCE, quoted.pcrs)
    with pytest.raises(AttestationFailed, match="does not verify"):
        tpm.verify_quote(other.create_ak().public, quoted, NONCE, quoted.pcrs)
    with pytest.raises(AttestationFailed, match="trailing bytes"):
        tpm.verify_quote(ak.public, dataclasses.replace(quoted, signature=quoted.signature + b"\0"), NONCE, quoted.pcrs)
    with pytest.raises(AttestationFailed, match="not a restricted signing key"):
        tpm.verify_quote(other.ek_public(), quoted, NONCE, quoted.pcrs)


def test_quote_input_checks(node: TpmClient) -> None:
    with pytest.raises(AttestationFailed, match="distinct indices"):
        node.quote(NONCE, [0, 0])
    with pytest.raises(AttestationFailed, match="distinct indices"):
        node.quote(NONCE, [24])
    with pytest.raises(AttestationFailed, match="nonce"):
        node.quote(b"", [0])


# ---- environment


def test_unreachable_tpm_is_no_tpm() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(NoTpm, match="no TPM reachable") as info:
            TpmClient(f"swtpm:host=127.0.0.1,port={port}")
    assert info.value.exit_code == 3
    with pytest.raises(NoTpm):
        TpmClient("device:/nonexistent/tpmrm0")


def test_closed_client_is_no_tpm(swtpm_a: SwTpm) -> None:
    client = TpmClient(swtpm_a.tcti)
    client.close()
    client.close()  # idempotent
    with pytest.raises(NoTpm, match="closed"):
        client.create_ak()


def test_leftover_objects_of_a_dead_client_are_reclaimed(swtpm_a: SwTpm, node: TpmClient, ak: AkInfo) -> None:
    """swtpm has no resource manager and 3 object slots: objects of a client that never flushed are
    reclaimed, while those of open clients (node) are spared."""
    from tpm2_pytss import ESAPI, ESYS_TR

    from qhx_edge.attest.tpm import _ak_template

    esys = ESAPI(swtpm_a.tcti)
    try:
        for _ in range(3):
            try:
                esys.create_primary(None, _ak_template(), ESYS_TR.ENDORSEMENT)
            except Exception:
                break  # the slots are full
    finally:
        esys.close()  # without flushing: as a crashed process would
    with TpmClient(swtpm_a.tcti) as fresh:
        assert fresh.create_ak() == ak
    assert node.quote(NONCE, [0]).pcrs == node.read_pcrs([0])  # node's AK survived
