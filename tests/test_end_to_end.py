"""End to end with real parts: attest a node (join token), serve the Workload API from the real
``qhx-edge serve`` process, fetch SVIDs with the stock ``spiffe`` client, verify chains with
``openssl verify`` (ECDSA) and ``cryptography`` (ML-DSA-65)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import TrustDomain, WorkloadApiClient
from spiffe.workloadapi.errors import FetchX509SvidError

from qhx_edge.core.policyfile import policy_fields
from qhx_edge.homes import attestation, node
from qhx_edge.store import clock
from tests.conftest import PASSPHRASE, Homes, _cli_env, make_homes

DOMAIN = "alpha.example"


def _attested(tmp: Path, registrations: list[dict[str, object]]) -> Homes:
    homes = make_homes(tmp, suite="hybrid")
    auth, now = homes.authority, clock.now()
    fields = policy_fields({"registrations": registrations, "algorithms": {"/": "ES256", "/pq/": "ML-DSA-65"}})
    auth.publish_policy(fields, now)
    token = attestation.create_join_token(auth, now, 600)
    n = node.Node(homes.node_home, PASSPHRASE.encode)
    try:
        chal = attestation.challenge(auth, attestation.make_request(n, "join-token", now, token=token), now)
        docs = attestation.finish(auth, attestation.respond(n, chal, now), now)
        n.import_pack(auth.export_pack(auth.export_documents() + docs, now), now)
    finally:
        n.close()
    return homes


@contextlib.contextmanager
def serving(home: Path, sock: Path) -> Iterator[Path]:
    """The real ``qhx-edge serve`` process on ``sock``, stopped with SIGTERM afterwards."""
    log = sock.with_suffix(".log")
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qhx_edge", "--home", str(home), "serve", "--socket", str(sock)],
            env=_cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "serve did not start"
                time.sleep(0.05)
            yield sock
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                assert proc.wait(10) == 0, log.read_text()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Path]:
    me = os.getuid()
    homes = _attested(
        tmp_path,
        [
            {"spiffe_id": f"spiffe://{DOMAIN}/web", "selectors": [f"unix:uid:{me}"]},
            {"spiffe_id": f"spiffe://{DOMAIN}/pq/ledger", "selectors": [f"unix:uid:{me}"]},
            {"spiffe_id": f"spiffe://{DOMAIN}/someone-else", "selectors": [f"unix:uid:{me + 4242}"]},
        ],
    )
    with serving(homes.node_home, tmp_path / "workload.sock") as sock:
        yield sock


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


def test_stock_client_gets_svids_that_verify(served: Path, tmp_path: Path) -> None:
    sock = served
    with WorkloadApiClient(socket_path=f"unix:{sock}", default_timeout=20) as client:
        context = client.fetch_x509_context()
        by_id = {str(s.spiffe_id): s for s in context.x509_svids}
        assert set(by_id) == {f"spiffe://{DOMAIN}/web", f"spiffe://{DOMAIN}/pq/ledger"}  # not someone-else's
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(DOMAIN))
        assert bundle is not None
        roots = list(bundle.x509_authorities)

    # ECDSA: the real openssl verifies leaf <- node intermediate <- domain CA.
    web = by_id[f"spiffe://{DOMAIN}/web"]
    leaf, *intermediates = web.cert_chain
    (tmp_path / "leaf.pem").write_bytes(_pem(leaf))
    (tmp_path / "inter.pem").write_bytes(b"".join(_pem(c) for c in intermediates))
    (tmp_path / "roots.pem").write_bytes(b"".join(_pem(c) for c in roots))
    openssl = shutil.which("openssl")
    assert openssl is not None
    r = subprocess.run(
        [openssl, "verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", tmp_path / "roots.pem",
         "-untrusted", tmp_path / "inter.pem", tmp_path / "leaf.pem"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert leaf.not_valid_after_utc.timestamp() <= time.time() + 3600 + 5

    # ML-DSA-65: cryptography verifies each link of the chain.
    pq = by_id[f"spiffe://{DOMAIN}/pq/ledger"]
    pq_leaf, pq_inter = pq.cert_chain
    assert pq_leaf.signature_algorithm_oid.dotted_string == "2.16.840.1.101.3.4.3.18"  # ML-DSA-65
    pq_leaf.verify_directly_issued_by(pq_inter)
    pq_root = next(c for c in roots if c.subject == pq_inter.issuer)
    pq_inter.verify_directly_issued_by(pq_root)


def test_an_unregistered_caller_gets_no_identity(tmp_path: Path) -> None:
    homes = _attested(tmp_path, [{"spiffe_id": f"spiffe://{DOMAIN}/web", "selectors": [f"unix:uid:{os.getuid() + 1}"]}])
    with serving(homes.node_home, tmp_path / "w.sock") as sock:
        client = WorkloadApiClient(socket_path=f"unix:{sock}", default_timeout=10)
        with client, pytest.raises(FetchX509SvidError):
            client.fetch_x509_svid()
