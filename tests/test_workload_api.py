"""The SPIFFE Workload API server, driven by the stock ``spiffe`` client and by raw gRPC.

The server runs for real on a Unix socket, with a fake in-process issuer that
mints real certificates and JWTs; callers are attested from their real peer
credentials.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from spiffe import JwtSource, SpiffeId, TrustDomain, WorkloadApiClient, X509Source
from spiffe.svid.jwt_svid import JwtSvid
from spiffe.workloadapi.errors import FetchJwtSvidError, FetchX509SvidError, ValidateJwtSvidError

from qhx_edge.core import errors
from qhx_edge.core.errors import BadSignature, ClockRollback, EnvironmentFault, Expired, PolicyDenied, Stale
from qhx_edge.issue.proto import workload_pb2 as pb
from qhx_edge.issue.proto import workload_pb2_grpc as pb_grpc
from qhx_edge.issue.workload_api import WorkloadApiServer, status_for
from tests.conftest import ROOT, run_cli

TD = "alpha.example"
FOREIGN_TD = "beta.example"
ME = f"spiffe://{TD}/workload"
NOBODY_ID = f"spiffe://{TD}/nobody"
HEADER = (("workload.spiffe.io", "true"),)
NOBODY = 65534


# --- a fake issuer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeX509Svid:
    spiffe_id: str
    cert_chain: list[bytes]
    private_key: bytes
    bundle: bytes
    hint: str = ""


@dataclass(frozen=True)
class FakeJwtSvid:
    spiffe_id: str
    token: str
    hint: str = ""


def _ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),  # keyCertSign, cRLSign
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{name}")]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


class FakeIssuer:
    """An IssuerLike that mints real SVIDs: registrations map selector sets to SPIFFE IDs."""

    def __init__(self, registrations: dict[frozenset[str], str]) -> None:
        self.registrations = dict(registrations)
        self.ca_key, self.ca = _ca(TD)
        _, self.foreign_ca = _ca(FOREIGN_TD)
        self.jwt_key = ec.generate_private_key(ec.SECP256R1())
        self.kid = "fake-kid-1"
        self.token = 0
        self.fail: Exception | None = None
        self.seen: list[frozenset[str]] = []
        self.threads: set[str] = set()
        self.closed = False

    def _enter(self) -> None:
        self.threads.add(threading.current_thread().name)
        if self.fail is not None:
            raise self.fail

    def _match(self, selectors: frozenset[str]) -> list[str]:
        return sorted({sid for need, sid in self.registrations.items() if need <= selectors})

    def x509_svids(self, selectors: frozenset[str]) -> list[FakeX509Svid]:
        self._enter()
        self.seen.append(selectors)
        ids = self._match(selectors)
        if not ids:
            raise PolicyDenied("no registration matches the caller's selectors")
        return [self._mint(sid) for sid in ids]

    def _mint(self, spiffe_id: str) -> FakeX509Svid:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        pkcs8 = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return FakeX509Svid(spiffe_id, [cert.public_bytes(serialization.Encoding.DER)], pkcs8, self._der(self.ca))

    @staticmethod
    def _der(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.DER)

    def x509_bundles(self) -> dict[str, bytes]:
        self._enter()
        return {TD: self._der(self.ca), FOREIGN_TD: self._der(self.foreign_ca)}

    def jwt_svids(self, selectors: frozenset[str], audience: list[str], spiffe_id: str | None) -> list[FakeJwtSvid]:
        self._enter()
        self.seen.append(selectors)
        ids = [sid for sid in self._match(selectors) if spiffe_id in (None, sid)]
        if not ids:
            raise PolicyDenied("no registration matches the caller's selectors")
        now = int(time.time())
        return [
            FakeJwtSvid(
                sid,
                jwt.encode(
                    {"sub": sid, "aud": audience, "iat": now, "exp": now + 300},
                    self.jwt_key,
                    algorithm="ES256",
                    headers={"kid": self.kid, "typ": "JWT"},
                ),
            )
            for sid in ids
        ]

    def jwt_bundles(self) -> dict[str, bytes]:
        self._enter()
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.jwt_key.public_key()))
        jwk.update({"kid": self.kid, "use": "jwt-svid"})
        return {TD: json.dumps({"keys": [jwk]}).encode()}

    def validate_jwt(self, token: str, audience: str) -> tuple[str, dict[str, Any]]:
        self._enter()
        try:
            claims = jwt.decode(token, self.jwt_key.public_key(), algorithms=["ES256"], audience=audience)
        except jwt.ExpiredSignatureError as exc:
            raise Expired(f"JWT-SVID expired: {exc}") from exc
        except jwt.InvalidTokenError as exc:
            raise BadSignature(f"invalid JWT-SVID: {exc}") from exc
        return claims["sub"], claims

    def change_token(self) -> bytes:
        self.threads.add(threading.current_thread().name)
        return str(self.token).encode()

    def refresh_in(self) -> float:
        return 30.0

    def close(self) -> None:
        self.closed = True


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory (Unix socket paths are limited to 107 bytes) that other uids may traverse."""
    d = Path(tempfile.mkdtemp(prefix="qhx-wl-"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def issuer() -> FakeIssuer:
    return FakeIssuer(
        {
            frozenset({f"unix:uid:{os.getuid()}", f"unix:path:{os.path.realpath(sys.executable)}"}): ME,
            frozenset({f"unix:uid:{NOBODY}"}): NOBODY_ID,
        }
    )


@pytest.fixture
def server(issuer: FakeIssuer, sock_dir: Path) -> Iterator[WorkloadApiServer]:
    srv = WorkloadApiServer(lambda: issuer, sock_dir / "workload.sock", poll_interval=0.1, grace=0.1)
    srv.start()
    yield srv
    srv.stop()


def client_of(server: WorkloadApiServer) -> WorkloadApiClient:
    return WorkloadApiClient(socket_path=f"unix:{server.socket_path}", default_timeout=10)


def raw_stub(path: Path | str) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(f"unix:{path}")
    return channel, pb_grpc.SpiffeWorkloadAPIStub(channel)


def rpc_error(call: Any) -> grpc.RpcError:
    """The error of a unary call, or of a stream's first message."""
    try:
        result = call()
        if hasattr(result, "__next__"):
            next(result)
    except grpc.RpcError as exc:
        return exc
    pytest.fail("the call succeeded")


ALL_RPCS = {
    "FetchX509SVID": pb.X509SVIDRequest(),
    "FetchX509Bundles": pb.X509BundlesRequest(),
    "FetchJWTSVID": pb.JWTSVIDRequest(audience=["db"]),
    "FetchJWTBundles": pb.JWTBundlesRequest(),
    "ValidateJWTSVID": pb.ValidateJWTSVIDRequest(audience="db", svid="x.y.z"),
    "FetchWITSVID": pb.WITSVIDRequest(),
    "FetchWITBundles": pb.WITBundlesRequest(),
}


# --- the stock client ----------------------------------------------------------------------


def test_stock_client_fetches_an_x509_svid_and_bundles(server: WorkloadApiServer, issuer: FakeIssuer) -> None:
    with client_of(server) as client:
        svid = client.fetch_x509_svid()
        assert str(svid.spiffe_id) == ME
        svid.leaf.verify_directly_issued_by(issuer.ca)  # the chain verifies against our trust domain's CA
        assert svid.leaf.public_key() == svid.private_key.public_key()

        context = client.fetch_x509_context()
        assert [str(s.spiffe_id) for s in context.x509_svids] == [ME]
        own = context.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(TD))
        foreign = context.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(FOREIGN_TD))
        assert own is not None
        assert own.x509_authorities == {issuer.ca}
        assert foreign is not None  # sent as a federated bundle
        assert foreign.x509_authorities == {issuer.foreign_ca}

        bundles = client.fetch_x509_bundles()
        assert {str(b.trust_domain) for b in bundles.bundles} == {TD, FOREIGN_TD}

    with X509Source(socket_path=f"unix:{server.socket_path}", timeout_in_seconds=10) as source:
        assert str(source.get_x509_context().default_svid.spiffe_id) == ME
        assert source.get_bundle_for_trust_domain(TrustDomain(TD)) is not None


def test_stock_client_fetches_and_validates_jwt_svids(server: WorkloadApiServer) -> None:
    with client_of(server) as client:
        svid = client.fetch_jwt_svid({"db", "cache"})
        assert str(svid.spiffe_id) == ME
        assert svid.audience == {"db", "cache"}
        bundles = client.fetch_jwt_bundles()
        bundle = bundles.get_bundle_for_trust_domain(TrustDomain(TD))
        assert bundle is not None
        assert str(JwtSvid.parse_and_validate(svid.token, bundle, {"db"}).spiffe_id) == ME  # verified locally
        assert str(client.validate_jwt_svid(svid.token, "db").spiffe_id) == ME  # and by the server
        with pytest.raises(ValidateJwtSvidError, match="INVALID_ARGUMENT"):
            client.validate_jwt_svid(svid.token, "somebody-else")
        with pytest.raises(FetchJwtSvidError, match="PERMISSION_DENIED"):
            client.fetch_jwt_svid({"db"}, subject=SpiffeId(NOBODY_ID))  # not entitled to that one

    with JwtSource(socket_path=f"unix:{server.socket_path}", timeout_in_seconds=10) as source:
        assert str(source.fetch_svid({"db"}).spiffe_id) == ME
        assert source.get_bundle_for_trust_domain(TrustDomain(TD)) is not None


def test_validate_returns_the_claims(server: WorkloadApiServer, issuer: FakeIssuer) -> None:
    token = issuer.jwt_svids(frozenset({f"unix:uid:{NOBODY}"}), ["db"], None)[0].token
    channel, stub = raw_stub(server.socket_path)
    with channel:
        response = stub.ValidateJWTSVID(pb.ValidateJWTSVIDRequest(audience="db", svid=token), metadata=HEADER)
        assert response.spiffe_id == NOBODY_ID
        assert response.claims["sub"] == NOBODY_ID
        assert list(response.claims["aud"]) == ["db"]
        for request, message in [
            (pb.ValidateJWTSVIDRequest(audience="db"), "svid must be specified"),
            (pb.ValidateJWTSVIDRequest(svid=token), "audience must be specified"),
            (pb.ValidateJWTSVIDRequest(audience="db", svid=token + "x"), "bad-signature: "),
        ]:
            err = rpc_error(lambda r=request: stub.ValidateJWTSVID(r, metadata=HEADER))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in err.details()
        err = rpc_error(lambda: stub.FetchJWTSVID(pb.JWTSVIDRequest(), metadata=HEADER))
        assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")


# --- the security header, attestation, identity ------------------------------------------------


@pytest.mark.parametrize("metadata", [(), (("workload.spiffe.io", "True"),), (("workload.spiffe.io", "1"),)])
def test_calls_without_the_security_header_are_refused(server: WorkloadApiServer, metadata: Any) -> None:
    channel, stub = raw_stub(server.socket_path)
    with channel:
        for name, request in ALL_RPCS.items():
            err = rpc_error(lambda n=name, r=request: getattr(stub, n)(r, metadata=metadata))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert err.details() == "security header missing from request"


def test_wit_profile_is_unimplemented(server: WorkloadApiServer) -> None:
    channel, stub = raw_stub(server.socket_path)
    with channel:
        for name in ("FetchWITSVID", "FetchWITBundles"):
            err = rpc_error(lambda n=name: getattr(stub, n)(ALL_RPCS[n], metadata=HEADER))
            assert err.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_caller_matching_no_registration_gets_no_identity(sock_dir: Path) -> None:
    issuer = FakeIssuer({frozenset({f"unix:uid:{os.getuid()}", "unix:path:/usr/bin/not-this-program"}): ME})
    with WorkloadApiServer(lambda: issuer, sock_dir / "s", poll_interval=0.1, grace=0.1) as server:
        with client_of(server) as client:
            with pytest.raises(FetchX509SvidError, match="PERMISSION_DENIED"):
                client.fetch_x509_svid()
            with pytest.raises(FetchJwtSvidError, match="PERMISSION_DENIED"):
                client.fetch_jwt_svid({"db"})
            assert client.fetch_x509_bundles().bundles  # bundles are public: any attested caller
        channel, stub = raw_stub(server.socket_path)
        with channel:
            err = rpc_error(lambda: stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.details().startswith("policy-denied: no identity issued")
    # The caller was attested from its peer credentials, read by the kernel.
    assert issuer.seen
    assert f"unix:uid:{os.getuid()}" in issuer.seen[0]
    assert f"unix:path:{os.path.realpath(sys.executable)}" in issuer.seen[0]


def test_a_caller_whose_attestation_fails_gets_nothing(
    server: WorkloadApiServer, issuer: FakeIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qhx_edge.issue import peercred

    def gone(sock: Any) -> Any:
        raise errors.AttestationFailed("the caller exited before attestation")

    monkeypatch.setattr(peercred, "probe", gone)  # what the server attests each accepted connection with
    channel, stub = raw_stub(server.socket_path)
    with channel:
        for name in ("FetchX509SVID", "FetchX509Bundles", "FetchJWTSVID", "FetchJWTBundles", "ValidateJWTSVID"):
            err = rpc_error(lambda n=name: getattr(stub, n)(ALL_RPCS[n], metadata=HEADER))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, name
            assert err.details() == "attestation-failed: the caller exited before attestation", name
    assert issuer.seen == []  # the issuer was never asked on behalf of an unattested caller
    assert server.accepted == 0


def test_socket_file(server: WorkloadApiServer, issuer: FakeIssuer, sock_dir: Path) -> None:
    assert stat.S_IMODE(os.stat(server.socket_path).st_mode) == 0o666
    other = FakeIssuer({})
    with pytest.raises(EnvironmentFault, match="another server is listening"):
        WorkloadApiServer(lambda: other, server.socket_path).start()
    (sock_dir / "plain").write_text("x")
    with pytest.raises(EnvironmentFault, match="not a socket"):
        WorkloadApiServer(lambda: other, sock_dir / "plain").start()
    assert other.closed  # a server that failed to start released its issuer
    assert server.socket_path.exists()  # and left the running server's socket alone
    assert not issuer.closed
    server.stop()
    assert not server.socket_path.exists()
    assert issuer.closed
    assert issuer.threads  # every issuer call ran on an issuer thread, never on the event loop's
    assert all(name.startswith(("qhx-issuer_", "qhx-issuer-read_")) for name in issuer.threads), issuer.threads


def test_a_stale_socket_file_is_replaced(issuer: FakeIssuer, sock_dir: Path) -> None:
    import socket

    path = sock_dir / "s"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # a socket file nobody listens on
    with WorkloadApiServer(lambda: issuer, path, grace=0.1) as server, client_of(server) as client:
        assert str(client.fetch_x509_svid().spiffe_id) == ME


# --- gRPC over HTTP/2 -------------------------------------------------------------------------------


def test_unknown_methods_and_malformed_requests_get_grpc_statuses(server: WorkloadApiServer) -> None:
    channel = grpc.insecure_channel(f"unix:{server.socket_path}")
    with channel:
        unknown = channel.unary_unary("/SpiffeWorkloadAPI/FetchNothing", request_serializer=None)
        err = rpc_error(lambda: unknown(b"", metadata=HEADER, timeout=10))
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        other = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None)
        assert rpc_error(lambda: other(b"", metadata=HEADER, timeout=10)).code() == grpc.StatusCode.UNIMPLEMENTED
        raw = channel.unary_stream("/SpiffeWorkloadAPI/FetchX509SVID", request_serializer=None)
        err = rpc_error(lambda: raw(b"\xff\xff\xff", metadata=HEADER, timeout=10))  # not a protobuf message
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith("malformed: ")
        ok = raw(b"", metadata=HEADER, timeout=10)  # an empty X509SVIDRequest: the same connection still serves
        assert pb.X509SVIDResponse.FromString(next(ok)).svids[0].spiffe_id == ME
        ok.cancel()


def test_a_response_larger_than_the_flow_control_window_arrives_whole(sock_dir: Path) -> None:
    ids = [f"spiffe://{TD}/many/w{i}" for i in range(150)]
    issuer = FakeIssuer({})
    issuer._match = lambda selectors: ids  # type: ignore[method-assign] # 150 identities for any caller
    with WorkloadApiServer(lambda: issuer, sock_dir / "big.sock", grace=0.1) as server:
        # A client that opens its window 16 KiB at a time, so the server must wait for WINDOW_UPDATEs.
        small_window = [("grpc.http2.lookahead_bytes", 16384), ("grpc.http2.bdp_probe", 0)]
        channel = grpc.insecure_channel(f"unix:{server.socket_path}", options=small_window)
        stub = pb_grpc.SpiffeWorkloadAPIStub(channel)
        with channel:
            stream = stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER, timeout=30)
            first = next(stream)
            stream.cancel()
    assert [s.spiffe_id for s in first.svids] == ids
    assert first.ByteSize() > 8 * 16384  # beyond the client's window: sent as the client opened it
    for s in first.svids:
        x509.load_der_x509_certificate(s.x509_svid).verify_directly_issued_by(issuer.ca)


class CachingIssuer(FakeIssuer):
    """A FakeIssuer with the Issuer's optional non-blocking cache path: the same SVID objects until a rotation."""

    def __init__(self, registrations: dict[frozenset[str], str]) -> None:
        super().__init__(registrations)
        self.memo: dict[frozenset[str], list[FakeX509Svid]] = {}
        self.cached_calls = 0

    def x509_svids(self, selectors: frozenset[str]) -> list[FakeX509Svid]:
        if selectors not in self.memo:
            self.memo[selectors] = super().x509_svids(selectors)
        return self.memo[selectors]

    def cached_x509(self, selectors: frozenset[str]) -> tuple[list[FakeX509Svid], dict[str, bytes]] | None:
        self.cached_calls += 1
        held = self.memo.get(selectors)
        return None if held is None else (held, self.x509_bundles())

    def rotate(self) -> None:
        self.memo.clear()
        self.token += 1


def test_fetches_answered_from_the_issuers_cache_follow_its_rotation(sock_dir: Path) -> None:
    issuer = CachingIssuer({frozenset({f"unix:uid:{os.getuid()}"}): ME})
    with WorkloadApiServer(lambda: issuer, sock_dir / "c.sock", poll_interval=0.1, grace=0.1) as server:
        first = fetch_svid_der(server.socket_path)  # minted on an issuer thread (nothing cached yet)
        again = [fetch_svid_der(server.socket_path) for _ in range(3)]  # answered from the cache
        assert again == [first] * 3
        assert issuer.cached_calls >= 3
        channel, stub = raw_stub(server.socket_path)
        with channel:
            stream = stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER, timeout=30)
            assert next(stream).svids[0].x509_svid == first  # answered from the cache, then waiting
            issuer.rotate()
            rotated = next(stream).svids[0].x509_svid  # pushed on the change, minted on an issuer thread
            stream.cancel()
        from_cache = fetch_svid_der(server.socket_path)  # from the cache: the new SVID, not the old bytes
    assert rotated != first
    assert from_cache == rotated  # a rotated SVID is never answered with the bytes of the one before
    assert len(issuer.seen) == 2  # x509_svids minted twice, once per SVID; every other fetch came from the cache


def fetch_svid_der(path: Path) -> bytes:
    channel = grpc.insecure_channel(f"unix:{path}", options=[("grpc.use_local_subchannel_pool", 1)])
    with channel:
        stream = pb_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER, timeout=30)
        der = next(stream).svids[0].x509_svid
        stream.cancel()
    return der


# --- streams -------------------------------------------------------------------------------------


def test_streams_send_again_when_the_change_token_changes(server: WorkloadApiServer, issuer: FakeIssuer) -> None:
    channel, stub = raw_stub(server.socket_path)
    with channel:
        svids = stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER, timeout=20)
        x509_bundles = stub.FetchX509Bundles(pb.X509BundlesRequest(), metadata=HEADER, timeout=20)
        jwt_bundles = stub.FetchJWTBundles(pb.JWTBundlesRequest(), metadata=HEADER, timeout=20)
        first = next(svids)
        assert [s.spiffe_id for s in first.svids] == [ME]
        assert set(first.federated_bundles) == {f"spiffe://{FOREIGN_TD}"}  # keyed by trust domain SPIFFE ID
        assert set(next(x509_bundles).bundles) == {f"spiffe://{TD}", f"spiffe://{FOREIGN_TD}"}
        assert set(next(jwt_bundles).bundles) == {f"spiffe://{TD}"}
        issuer.token += 1  # a rotation: the server polls the token every 0.1 s here
        second = next(svids)
        assert second.svids[0].x509_svid != first.svids[0].x509_svid  # a freshly minted SVID
        _, issuer.foreign_ca = _ca(FOREIGN_TD)  # a bundle change: bundle streams send only those
        issuer.jwt_key = ec.generate_private_key(ec.SECP256R1())
        issuer.token += 1
        assert next(x509_bundles).bundles[f"spiffe://{FOREIGN_TD}"] == FakeIssuer._der(issuer.foreign_ca)
        assert next(jwt_bundles).bundles[f"spiffe://{TD}"] == issuer.jwt_bundles()[TD]
        assert next(svids).svids  # the SVID stream follows every change
        # Expired mode: the stream ends, and the client keeps its SVID until it expires and retries.
        issuer.fail = Stale("expired mode: freshness too old")
        issuer.token += 1
        err = rpc_error(lambda: svids)
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert err.details() == "stale: expired mode: freshness too old"


def test_notify_pushes_without_waiting_for_the_poll(issuer: FakeIssuer, sock_dir: Path) -> None:
    with WorkloadApiServer(lambda: issuer, sock_dir / "s", poll_interval=60, grace=0.1) as server:
        updates = threading.Semaphore(0)
        with X509Source(socket_path=f"unix:{server.socket_path}", timeout_in_seconds=10) as source:
            source.subscribe_for_updates(updates.release)
            before = source.get_x509_context().default_svid.leaf.serial_number
            issuer.token += 1
            server.notify()
            assert updates.acquire(timeout=10)
            assert source.get_x509_context().default_svid.leaf.serial_number != before


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code", "details"),
    [
        (Stale("expired mode"), grpc.StatusCode.UNAVAILABLE, "stale: expired mode"),
        (ClockRollback("clock behind trusted time"), grpc.StatusCode.UNAVAILABLE, "clock-rollback: clock behind"),
        (errors.StoreLocked("busy"), grpc.StatusCode.UNAVAILABLE, "store-locked: busy"),
        (errors.Malformed("bad id"), grpc.StatusCode.INVALID_ARGUMENT, "malformed: bad id"),
        (errors.ScopeViolation("no"), grpc.StatusCode.PERMISSION_DENIED, "scope-violation: no"),
        (RuntimeError("secret detail"), grpc.StatusCode.INTERNAL, "internal: the issuer failed"),
    ],
)
def test_issuer_errors_become_statuses(
    server: WorkloadApiServer, issuer: FakeIssuer, error: Exception, code: grpc.StatusCode, details: str
) -> None:
    issuer.fail = error
    channel, stub = raw_stub(server.socket_path)
    with channel:
        for name in ("FetchX509SVID", "FetchX509Bundles", "FetchJWTSVID", "FetchJWTBundles"):
            err = rpc_error(lambda n=name: getattr(stub, n)(ALL_RPCS[n], metadata=HEADER))
            assert err.code() == code, name
            assert err.details().startswith(details), name
            assert "secret detail" not in err.details()


def test_status_mapping() -> None:
    assert status_for(PolicyDenied("x"))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert status_for(BadSignature("x"))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert status_for(BadSignature("x"), validating=True) == (grpc.StatusCode.INVALID_ARGUMENT, "bad-signature: x")
    for kind, cls in errors.all_kinds().items():  # every typed error maps, with its kind in the details
        code, details = status_for(cls("m"))
        assert code != grpc.StatusCode.INTERNAL
        assert details.startswith(f"{kind}: ")


# --- concurrency and other callers ---------------------------------------------------------------------


def test_concurrent_callers_each_get_their_own_attestation(server: WorkloadApiServer, issuer: FakeIssuer) -> None:
    results: list[str] = []
    failures: list[BaseException] = []

    def fetch() -> None:
        try:
            results.extend(fetch_own_connection(server.socket_path))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures
    assert results == [ME] * 50
    assert server.accepted >= 50
    deadline = time.monotonic() + 10
    while server.connections and time.monotonic() < deadline:  # closed clients leave no attestation behind
        time.sleep(0.05)
    assert server.connections == 0


CHILD = textwrap.dedent(
    """
    import json, os, sys
    import grpc
    from qhx_edge.issue.proto import workload_pb2 as pb, workload_pb2_grpc as pb_grpc

    def connect():  # a connection of its own per call (not grpc's shared subchannel pool)
        channel = grpc.insecure_channel("unix:" + sys.argv[1], options=[("grpc.use_local_subchannel_pool", 1)])
        return channel, pb_grpc.SpiffeWorkloadAPIStub(channel)

    connect()[0].close()  # everything imported while still root: this interpreter lives under /root
    request = pb.X509SVIDRequest()
    os.setgroups([])
    os.setgid(int(sys.argv[2]))
    os.setuid(int(sys.argv[2]))
    ids = []
    for _ in range(int(sys.argv[3])):
        channel, stub = connect()
        with channel:
            stream = stub.FetchX509SVID(request, metadata=(("workload.spiffe.io", "true"),), timeout=20)
            ids += [s.spiffe_id for s in next(stream).svids]
            stream.cancel()
    print(json.dumps(ids))
    """
)


def fetch_own_connection(path: Path) -> list[str]:
    channel = grpc.insecure_channel(f"unix:{path}", options=[("grpc.use_local_subchannel_pool", 1)])
    with channel:
        stream = pb_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER, timeout=30)
        ids = [s.spiffe_id for s in next(stream).svids]
        stream.cancel()
    return ids


@pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root (tests run as root in CI)")
def test_another_uid_gets_its_own_selectors_even_concurrently(server: WorkloadApiServer, issuer: FakeIssuer) -> None:
    # The child starts as root (this interpreter lives under /root), imports, then drops to nobody.
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(server.socket_path), str(NOBODY), "20"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    mine: list[str] = []

    def fetch() -> None:
        mine.extend(fetch_own_connection(server.socket_path))

    threads = [threading.Thread(target=fetch) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert json.loads(out) == [NOBODY_ID] * 20
    assert mine == [ME] * 20
    assert server.accepted >= 40  # a connection per call, interleaved between the two uids
    exe = os.path.realpath(sys.executable)
    digest = hashlib.sha256(Path(exe).read_bytes()).hexdigest()
    nobody = pwd.getpwuid(NOBODY).pw_name
    assert (
        frozenset(
            {
                f"unix:uid:{NOBODY}",
                f"unix:gid:{NOBODY}",
                f"unix:user:{nobody}",
                f"unix:path:{exe}",
                f"unix:sha256:{digest}",
            }
        )
        in issuer.seen
    )


# --- serving from the command line --------------------------------------------------------------


SERVE = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from qhx_edge.issue import workload_api
    from tests.test_workload_api import ME, FakeIssuer
    issuer = FakeIssuer({frozenset({f"unix:uid:{os.getuid()}"}): ME})
    workload_api.serve_forever(lambda: issuer, Path(sys.argv[1]), on_ready=lambda: print("ready", flush=True))
    print("closed" if issuer.closed else "not closed", flush=True)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_forever_stops_cleanly_on_signals(sock_dir: Path, sig: signal.Signals) -> None:
    path = sock_dir / "serve.sock"
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        with WorkloadApiClient(socket_path=f"unix:{path}", default_timeout=10) as client:
            assert str(client.fetch_x509_svid().spiffe_id) == ME
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert out.strip() == "closed"
    assert not path.exists()


def test_cli_serve_answers_with_typed_statuses_and_stops_on_sigterm(tmp_path: Path, sock_dir: Path) -> None:
    """The real `serve` command on a fresh node home: it serves, and refuses with a kind it can name."""
    from tests.conftest import _cli_env, make_homes

    homes = make_homes(tmp_path)
    path = sock_dir / "cli.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qhx_edge", "--json", "--home", str(homes.node_home), "serve", "--socket", str(path)],
        cwd=ROOT,
        env=_cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert json.loads(line) == {"ok": True, "socket": str(path)}, proc.stderr.read() if proc.stderr else ""
        channel, stub = raw_stub(path)
        with channel:  # a node that is not attested yet has no identity to give, whatever the caller
            err = rpc_error(lambda: stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER, timeout=20))
        assert err.details().split(":", 1)[0] in errors.all_kinds(), err.details()
        assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED), err.details()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert not path.exists()


def test_cli_serve_help() -> None:
    result = run_cli("serve", "--help")
    assert result.code == 0
    assert "--socket" in result.stdout


# --- a hostile neighbour on the socket (findings of an adversarial review) ---------------------------------------


def _h2_client(path: Path) -> tuple[socket.socket, Any]:
    import h2.config
    import h2.connection

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def _request_headers(method: str = "FetchJWTBundles") -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", f"/SpiffeWorkloadAPI/{method}".encode()),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"workload.spiffe.io", b"true"),
    ]


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_a_connection_that_buffers_request_bodies_without_ending_them_is_closed(server: WorkloadApiServer) -> None:
    # Before: every byte was acknowledged at once and kept, up to 128 streams x 1 MiB per connection.
    import h2.exceptions

    sock, conn = _h2_client(server.socket_path)
    sock.settimeout(0.2)
    sent, closed = 0, False
    streams = [conn.get_next_available_stream_id()]
    conn.send_headers(streams[0], _request_headers())
    try:
        while sent < 8 << 20 and not closed:
            sid = streams[-1]
            room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if room > 0:
                conn.send_data(sid, b"\0" * room)  # no END_STREAM: the calls never start
                sent += room
                if sent // (48 << 10) >= len(streams) and len(streams) < 120:
                    streams.append(conn.get_next_available_stream_id())
                    conn.send_headers(streams[-1], _request_headers())
            sock.sendall(conn.data_to_send())
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                closed = True
            else:
                conn.receive_data(data)
                sock.sendall(conn.data_to_send())
    except (BrokenPipeError, ConnectionResetError, h2.exceptions.ProtocolError):
        closed = True
    closed = closed or _closed_by_server(sock)
    sock.close()
    assert closed, f"the server kept a connection that buffered {sent} bytes of unfinished requests"
    assert sent < 1 << 20  # closed soon after the per-connection cap (256 KiB), not after megabytes
    assert fetch_svid_der(server.socket_path)  # others are still served


def test_a_header_that_is_not_utf8_closes_only_that_connection_without_a_traceback(
    server: WorkloadApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    sock, conn = _h2_client(server.socket_path)
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [*_request_headers("FetchX509SVID"), (b"x-bad", b"\xff\xfe")], end_stream=True)
    sock.sendall(conn.data_to_send())
    assert _closed_by_server(sock)
    sock.close()
    assert not [r for r in caplog.records if r.exc_info], "an exception escaped the protocol handler"
    assert fetch_svid_der(server.socket_path)


def test_a_client_that_never_reads_cannot_grow_the_servers_write_buffer(server: WorkloadApiServer) -> None:
    # Before: PING after PING was answered into asyncio's write buffer, which grew without bound.
    sock, conn = _h2_client(server.socket_path)
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 4
    while sent < 8 << 20 and time.monotonic() < deadline:
        for i in range(2000):
            conn.ping(i.to_bytes(8, "big"))
        data = conn.data_to_send()
        try:
            sent += sock.send(data)  # whatever the kernel takes; the rest is dropped (we only flood)
        except BlockingIOError:
            time.sleep(0.01)  # the server stopped reading us: what back-pressure looks like from here
    time.sleep(0.5)
    buffered = max((c._transport.get_write_buffer_size() for c in list(server.open_connections) if c._transport),
                   default=0)  # fmt: skip
    sock.close()
    assert buffered < 1 << 20, f"the server buffered {buffered} bytes for a client that never reads"
    assert fetch_svid_der(server.socket_path)
