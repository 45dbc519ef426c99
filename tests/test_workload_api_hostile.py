"""The Workload API under a hostile neighbour (issue 8, point 10), through the real Unix socket.

Each test reproduces an attack a local process can make on the socket: holding
connection slots, lying about its program from another mount namespace or root,
exec'ing another program between connect and its first call, oversized or
malformed JWT inputs, a locked store, and bundle streams woken by every SVID
rotation.  Callers are real processes, attested from their real peer credentials.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import queue
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import h2.exceptions
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from qhx_edge.core.x509ca import private_key_object
from qhx_edge.homes import node
from qhx_edge.issue.issuer import Issuer
from qhx_edge.issue.proto import workload_pb2 as pb
from qhx_edge.issue.workload_api import WorkloadApiServer
from qhx_edge.store import clock
from tests import test_issuance as ti
from tests.conftest import PASSPHRASE, ROOT, Homes, make_homes, need, need_tool
from tests.test_workload_api import (
    CHILD,
    HEADER,
    ME,
    NOBODY,
    NOBODY_ID,
    TD,
    FakeIssuer,
    _ca,
    _closed_by_server,
    _h2_client,
    _request_headers,
    fetch_svid_der,
    raw_stub,
    rpc_error,
)

EXE = os.path.realpath(sys.executable)
TRUSTED_ID = f"spiffe://{TD}/trusted-program"


def need_root() -> None:
    need(os.geteuid() == 0, "this test changes uid or namespaces, which needs root (tests run as root in CI)")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory (Unix socket paths are limited to 107 bytes) that other uids may traverse."""
    d = Path(tempfile.mkdtemp(prefix="qhx-wh-"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def issuer() -> FakeIssuer:
    return FakeIssuer(
        {
            frozenset({f"unix:uid:{os.getuid()}", f"unix:path:{EXE}"}): ME,
            frozenset({f"unix:uid:{NOBODY}"}): NOBODY_ID,
        }
    )


def child_env() -> dict[str, str]:
    """The environment of a child Python that may run from a copied or bind-mounted interpreter:
    it finds this venv's packages and the repository by PYTHONPATH, not by its own location."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *(p for p in sys.path if p and os.path.isdir(p))])
    return env


FETCH = textwrap.dedent(
    """
    import json, os, sys
    import grpc
    from qhx_edge.issue.proto import workload_pb2 as pb, workload_pb2_grpc as pb_grpc

    path = sys.argv[1]
    grpc.insecure_channel("unix:" + path).close()  # grpc imports the rest of itself lazily: do it here
    if len(sys.argv) > 2:  # chroot first (everything is imported already); the socket is inside the new root
        os.chroot(sys.argv[2])
        os.chdir("/")
        path = "/" + os.path.basename(path)
    channel = grpc.insecure_channel("unix:" + path, options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        stream = pb_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            pb.X509SVIDRequest(), metadata=(("workload.spiffe.io", "true"),), timeout=20
        )
        print(json.dumps({"ids": [s.spiffe_id for s in next(stream).svids]}))
        stream.cancel()
    except grpc.RpcError as exc:
        print(json.dumps({"code": exc.code().name, "details": exc.details()}))
    """
)


def run_child(cmd: list[str]) -> dict[str, Any]:
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --- 1. connection slots ------------------------------------------------------------------------------------


def _hog(path: Path) -> socket.socket:
    """A connection that sends its preface and then nothing; the server may have closed it already."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused at once: seen below
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    return sock


def _still_open(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    return not _closed_by_server(sock)


def test_one_uid_at_its_connection_cap_does_not_lock_out_other_uids(issuer: FakeIssuer, sock_dir: Path) -> None:
    """Before: 1,024 idle connections from one uid took every slot, and every workload was refused."""
    need_root()
    with WorkloadApiServer(
        lambda: issuer,
        sock_dir / "cap.sock",
        poll_interval=0.1,
        grace=0.1,
        max_connections=16,
        max_connections_per_uid=4,
    ) as server:
        hogs = [_hog(server.socket_path) for _ in range(16)]  # every slot the server has
        try:
            kept = [s for s in hogs if _still_open(s, 0.3)]
            assert len(kept) == 4, "one uid kept more connections than its cap"
            # Another uid is served while this one is at its cap...
            child = subprocess.run(
                [sys.executable, "-c", CHILD, str(server.socket_path), str(NOBODY), "3"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert child.returncode == 0, child.stderr
            assert json.loads(child.stdout) == [NOBODY_ID] * 3
            # ... and this uid's next connection is refused, until it lets one go.
            extra = _hog(server.socket_path)
            assert not _still_open(extra, 2)
            extra.close()
        finally:
            for s in hogs:
                s.close()
        deadline = time.monotonic() + 10
        while server.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fetch_svid_der(server.socket_path)


def test_a_connection_that_sends_no_preface_is_closed(issuer: FakeIssuer, sock_dir: Path) -> None:
    """Before: a connection that never said a word held its slot for ever."""
    with WorkloadApiServer(
        lambda: issuer, sock_dir / "pre.sock", grace=0.1, handshake_timeout=0.5, idle_timeout=30
    ) as server:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(str(server.socket_path))
        # A slow client: the preface one byte at a time, far slower than the timeout allows.
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.connect(str(server.socket_path))
        started = time.monotonic()
        slow.settimeout(0.1)
        closed_slow = False
        for byte in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 9:
            try:
                slow.send(bytes([byte]))
                if slow.recv(65536) == b"":
                    closed_slow = True
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed_slow = True
                break
        silent.settimeout(5)
        assert _closed_by_server(silent), "a silent connection was kept"
        assert closed_slow or _closed_by_server(slow), "a preface dribbled byte by byte was waited for"
        assert time.monotonic() - started < 4
        silent.close()
        slow.close()
        assert fetch_svid_der(server.socket_path)  # a client that speaks is served as before


def test_an_idle_connection_is_closed_but_an_open_stream_keeps_its_own(issuer: FakeIssuer, sock_dir: Path) -> None:
    """Before: a connection with no call open (pinging, or silent after one call) was kept for ever."""
    with WorkloadApiServer(
        lambda: issuer, sock_dir / "idle.sock", poll_interval=0.1, grace=0.1, handshake_timeout=5, idle_timeout=0.6
    ) as server:
        # One unary call, then nothing but PINGs: idle.
        idle, conn = _h2_client(server.socket_path)
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, _request_headers("FetchJWTSVID"))
        body = pb.JWTSVIDRequest(audience=["db"]).SerializeToString()
        conn.send_data(sid, b"\x00" + len(body).to_bytes(4, "big") + body, end_stream=True)
        idle.sendall(conn.data_to_send())
        # A stream that stays open: its connection is not idle.
        streaming, sconn = _h2_client(server.socket_path)
        ssid = sconn.get_next_available_stream_id()
        sconn.send_headers(ssid, _request_headers("FetchJWTBundles"))
        sconn.send_data(ssid, b"\x00\x00\x00\x00\x00", end_stream=True)
        streaming.sendall(sconn.data_to_send())
        started = time.monotonic()
        idle.settimeout(0.1)
        closed = False
        while time.monotonic() - started < 5 and not closed:
            try:
                data = idle.recv(65536)
                if not data:
                    closed = True
                    break
                conn.receive_data(data)
            except TimeoutError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            with contextlib.suppress(h2.exceptions.ProtocolError):  # after the server's GOAWAY
                conn.ping(b"\x00" * 8)  # keepalive PINGs are no activity
            try:
                idle.sendall(conn.data_to_send())
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        elapsed = time.monotonic() - started
        assert closed, "an idle connection (no call open) was kept"
        assert elapsed >= 0.4  # closed for idleness, not at once
        assert _still_open(streaming, 2.0), "a connection with an open stream was closed as idle"
        idle.close()
        streaming.close()


# --- 2. attestation: namespaces, root directory, exec before the first call -------------------------------------


def _trusted_program(sock_dir: Path) -> Path:
    target = sock_dir / "trusted-program"
    shutil.copy("/bin/true", target)
    return target


@pytest.mark.parametrize("userns", [False, True], ids=["mount-ns", "user-and-mount-ns"])
def test_a_caller_in_another_mount_namespace_gets_no_path_or_digest(sock_dir: Path, userns: bool) -> None:
    """Before: a bind mount in a private mount namespace made the interpreter pass for the trusted program."""
    need_root()
    need_tool("unshare", "util-linux")
    target = _trusted_program(sock_dir)
    issuer = FakeIssuer({frozenset({f"unix:uid:{os.getuid()}", f"unix:path:{target}"}): TRUSTED_ID})
    with WorkloadApiServer(lambda: issuer, sock_dir / "ns.sock", grace=0.1) as server:
        flags = ["--user", "--map-root-user", "--mount"] if userns else ["--mount"]
        script = 'mount --bind "$1" "$2" && exec "$2" -c "$3" "$4"'
        result = run_child(
            ["unshare", *flags, "--propagation", "private", "sh", "-c", script, "sh", EXE, str(target), FETCH,
             str(server.socket_path)]
        )  # fmt: skip
    assert result.get("code") == "PERMISSION_DENIED", result
    assert result["details"].startswith("policy-denied"), result
    (seen,) = issuer.seen
    assert f"unix:uid:{os.getuid()}" in seen  # the kernel's uid still counts
    assert not [s for s in seen if s.startswith(("unix:path:", "unix:sha256:"))], seen


def test_a_caller_with_another_root_directory_gets_no_path_or_digest(issuer: FakeIssuer, sock_dir: Path) -> None:
    """Before: a chrooted caller's executable was attested by a path that means something else in its root."""
    need_root()
    with WorkloadApiServer(lambda: issuer, sock_dir / "root.sock", grace=0.1) as server:
        result = run_child([EXE, "-c", FETCH, str(server.socket_path), str(sock_dir)])
        assert result.get("code") == "PERMISSION_DENIED", result
        (seen,) = issuer.seen
        assert not [s for s in seen if s.startswith(("unix:path:", "unix:sha256:"))], seen
        # In our own root the same program is attested by path, and gets its identity.
        assert run_child([EXE, "-c", FETCH, str(server.socket_path)]) == {"ids": [ME]}


CONNECT_THEN_EXEC = textwrap.dedent(
    """
    import os, socket, sys
    path, program, script, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.settimeout(20)
        s.recv(9, socket.MSG_PEEK)  # the server's SETTINGS: it has accepted (and attested) this connection
        socks.append(s)
    last = socks[-1]
    os.set_inheritable(last.fileno(), True)
    os.execv(program, [program, "-c", script, str(last.fileno())])
    """
)

CALL_ON_INHERITED = textwrap.dedent(
    """
    import json, socket, sys
    import h2.config, h2.connection, h2.events
    from qhx_edge.issue.proto import workload_pb2 as pb

    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.settimeout(20)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
                            (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers"),
                            ("workload.spiffe.io", "true")])
    conn.send_data(sid, b"\\x00\\x00\\x00\\x00\\x00", end_stream=True)
    sock.sendall(conn.data_to_send())
    data, out = b"", None
    while out is None:
        chunk = sock.recv(65536)
        if not chunk:
            out = {"closed": True}
            break
        for ev in conn.receive_data(chunk):
            if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                headers = dict(ev.headers)
                if "grpc-status" in headers:
                    out = {"status": int(headers["grpc-status"]), "message": headers.get("grpc-message", "")}
            elif isinstance(ev, h2.events.DataReceived):
                data += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[1:5], "big"):
                    response = pb.X509SVIDResponse.FromString(data[5:])
                    out = {"ids": [s.spiffe_id for s in response.svids]}
        sock.sendall(conn.data_to_send())
    print(json.dumps(out))
    """
)


def _copy_of_python(sock_dir: Path, name: str, pad: int = 0) -> Path:
    """Another program: a copy of the interpreter (another file, so another executable), optionally padded
    so that hashing it takes a while."""
    copy = sock_dir / name
    shutil.copy(EXE, copy)
    if pad:
        with copy.open("ab") as f:
            f.truncate(copy.stat().st_size + pad)
    return copy


def test_a_caller_that_execs_another_program_before_its_first_call_is_refused(
    issuer: FakeIssuer, sock_dir: Path
) -> None:
    """Before: the registered interpreter connected, exec'd another program, which called with its identity."""
    other = _copy_of_python(sock_dir, "other-program")
    with WorkloadApiServer(lambda: issuer, sock_dir / "exec.sock", grace=0.1) as server:
        assert fetch_svid_der(server.socket_path)  # this interpreter is registered, and its digest now cached
        result = run_child([EXE, "-c", CONNECT_THEN_EXEC, str(server.socket_path), str(other), CALL_ON_INHERITED, "1"])
        assert result.get("status") == grpc.StatusCode.PERMISSION_DENIED.value[0], result
        assert result["message"].startswith("attestation-failed"), result
        # The registered program calling on its own connection is still served.
        assert run_child([EXE, "-c", FETCH, str(server.socket_path)]) == {"ids": [ME]}


def test_a_busy_attestation_pool_does_not_widen_the_connect_then_exec_window(
    issuer: FakeIssuer, sock_dir: Path
) -> None:
    """Before: a program whose digest was not cached was attested later, in a pool; a caller that kept the pool
    busy hashing, then exec'd the registered program, was attested as that program."""
    evil = _copy_of_python(sock_dir, "evil-program", pad=48 << 20)  # not cached: hashed afresh every time
    with WorkloadApiServer(lambda: issuer, sock_dir / "pool.sock", grace=0.1) as server:
        result = run_child([str(evil), "-c", CONNECT_THEN_EXEC, str(server.socket_path), EXE, CALL_ON_INHERITED, "6"])
    assert result.get("status") == grpc.StatusCode.PERMISSION_DENIED.value[0], result
    assert result["message"].startswith("attestation-failed"), result
    assert all(f"unix:path:{EXE}" not in seen for seen in issuer.seen)


# --- 3. JWT inputs, against the real issuer ---------------------------------------------------------------------

WEB = ti.WEB


@pytest.fixture
def real(tmp_path: Path, sock_dir: Path) -> Iterator[tuple[Homes, Issuer, WorkloadApiServer]]:
    """The real issuer of an attested node home, behind the real server; this uid is registered as WEB."""
    homes = make_homes(tmp_path)
    policy = dict(ti.POLICY, registrations=[{"spiffe_id": WEB, "selectors": [f"unix:uid:{os.getuid()}"]}])
    ti.attested(homes, clock.now(), policy)
    made: list[Issuer] = []

    def make() -> Issuer:
        made.append(Issuer(homes.node_home, PASSPHRASE.encode))
        return made[0]

    with WorkloadApiServer(make, sock_dir / "real.sock", poll_interval=0.1, grace=0.1) as server:
        yield homes, made[0], server


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed_token(homes: Homes, header: dict[str, Any], claims: bytes) -> str:
    """A JWT signed with this node's own JWT-SVID key (so only the part under test can make it fail)."""
    n = node.Node(homes.node_home, PASSPHRASE.encode)
    try:
        key = private_key_object(n.identity.jwt_key())
    finally:
        n.close()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(claims)
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return signing_input + "." + _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def test_jwt_audiences_are_capped_in_count_and_length(real: tuple[Homes, Issuer, WorkloadApiServer]) -> None:
    """Before: a request could carry thousands of audiences (64 KiB), each minted, cached and audited."""
    _, _, server = real
    channel, stub = raw_stub(server.socket_path)
    with channel:
        most = [f"{i:03d}" + "a" * 253 for i in range(32)]  # 32 audiences of 256 bytes: allowed
        (svid,) = stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=most), metadata=HEADER, timeout=20).svids
        assert svid.spiffe_id == WEB
        for audience in ([*most, "one-more"], ["a" * 257], ["db", "é" * 129]):  # 33; 257 bytes; 258 bytes
            err = rpc_error(lambda a=audience: stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=a), metadata=HEADER))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, audience
            assert err.details().startswith("malformed: "), err.details()
        err = rpc_error(
            lambda: stub.ValidateJWTSVID(pb.ValidateJWTSVIDRequest(audience="a" * 257, svid=svid.svid), metadata=HEADER)
        )
        assert (err.code(), err.details().split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "malformed")


def test_the_audit_records_a_digest_of_the_audience_list(real: tuple[Homes, Issuer, WorkloadApiServer]) -> None:
    homes, _, server = real
    audience = ["db", "secret-service-name-" + "x" * 200]
    channel, stub = raw_stub(server.socket_path)
    with channel:
        stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=audience), metadata=HEADER, timeout=20)
    (entry,) = [e for e in ti.audit_issues(homes) if e["detail"].startswith("jwt-svid ")]
    digest = hashlib.sha256(json.dumps(audience, separators=(",", ":")).encode()).hexdigest()
    assert f" aud sha256:{digest} " in entry["detail"], entry["detail"]
    assert "secret-service-name" not in entry["detail"]
    assert len(entry["detail"]) < 300


def test_the_jwt_cache_is_bounded_in_bytes(real: tuple[Homes, Issuer, WorkloadApiServer]) -> None:
    """Before: 1,024 cached JWT-SVIDs whatever their size (each as large as its request allowed)."""
    _, iss, server = real
    iss.jwt_cache_bytes = 128 << 10
    channel, stub = raw_stub(server.socket_path)
    with channel:
        for i in range(24):  # ~11 KiB tokens: twice what the bound holds
            audience = [f"{i:04d}-{j:02d}" + "b" * 249 for j in range(32)]
            stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=audience), metadata=HEADER, timeout=20)
        held = list(iss._jwt.values())
    assert held  # the newest stay cached
    assert sum(len(c.value.token) for c in held) <= 128 << 10
    assert iss.status()["cached"]["jwt_bytes"] <= 128 << 10


def test_validate_refuses_nesting_crit_and_a_wrong_audience_with_invalid_argument(
    real: tuple[Homes, Issuer, WorkloadApiServer],
) -> None:
    """Before: deep nesting or a huge number was INTERNAL (a traceback in the log), a validly signed token with
    a `crit` header was accepted, and a wrong audience was PERMISSION_DENIED `no identity issued`."""
    homes, _, server = real
    kid = ti.held(homes, "delegation").jwt_key["kid"]
    header = {"alg": "ES256", "kid": kid, "typ": "JWT"}
    now = clock.now()
    claims = {"sub": WEB, "aud": ["db"], "exp": now + 60, "iat": now}
    good = _signed_token(homes, header, json.dumps(claims).encode())
    nested = _signed_token(
        homes, header, json.dumps(claims).encode()[:-1] + b', "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    )
    digits = _signed_token(homes, header, json.dumps(claims).encode()[:-1] + b', "x": 1' + b"0" * 5000 + b"}")
    crit = _signed_token(homes, {**header, "crit": ["qhx-ext"], "qhx-ext": 1}, json.dumps(claims).encode())
    channel, stub = raw_stub(server.socket_path)
    with channel:
        ok = stub.ValidateJWTSVID(pb.ValidateJWTSVIDRequest(audience="db", svid=good), metadata=HEADER, timeout=20)
        assert ok.spiffe_id == WEB
        for token, audience, kind in [
            (nested, "db", "malformed"),
            (digits, "db", "malformed"),
            (crit, "db", "malformed"),
            (good, "somebody-else", "policy-denied"),
        ]:
            err = rpc_error(
                lambda t=token, a=audience: stub.ValidateJWTSVID(
                    pb.ValidateJWTSVIDRequest(audience=a, svid=t), metadata=HEADER, timeout=20
                )
            )
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (kind, err.details())
            assert err.details().startswith(f"{kind}: "), err.details()
            assert "no identity issued" not in err.details()


# --- 4. a locked store, bundle streams --------------------------------------------------------------------------


def test_a_locked_store_delays_only_the_calls_that_must_write(real: tuple[Homes, Issuer, WorkloadApiServer]) -> None:
    """Before: calls that had to write (new JWT audiences) waited for the lock on every issuer thread, and cache
    hits, bundles and validation queued behind them."""
    homes, _, server = real
    path = server.socket_path
    svid = fetch_svid_der(path)  # minted and cached
    channel, stub = raw_stub(path)
    with channel:
        token = stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=["warm"]), metadata=HEADER, timeout=20).svids[0].svid
    holder = sqlite3.connect(homes.node_home / "node.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's write transaction, as a long import holds it
    holder.execute("UPDATE observed SET high_water = high_water")
    writers: list[Any] = []

    def write(i: int) -> None:
        ch, st = raw_stub(path)
        with ch:
            try:
                writers.append(st.FetchJWTSVID(pb.JWTSVIDRequest(audience=[f"new-{i}"]), metadata=HEADER, timeout=30))
            except grpc.RpcError as exc:
                writers.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(24)]  # more than there are issuer threads
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)  # they are waiting for the lock now
        assert not writers, "a call that must write did not wait for the store's lock"
        channel, stub = raw_stub(path)
        with channel:
            timings = {}
            started = time.monotonic()
            assert fetch_svid_der(path) == svid
            timings["cached FetchX509SVID"] = time.monotonic() - started
            started = time.monotonic()
            again = stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=["warm"]), metadata=HEADER, timeout=20)
            timings["cached FetchJWTSVID"] = time.monotonic() - started
            assert again.svids[0].svid == token
            for name, request in (
                ("FetchX509Bundles", pb.X509BundlesRequest()),
                ("FetchJWTBundles", pb.JWTBundlesRequest()),
            ):
                started = time.monotonic()
                stream = getattr(stub, name)(request, metadata=HEADER, timeout=20)
                assert next(stream).bundles
                timings[name] = time.monotonic() - started
                stream.cancel()
            started = time.monotonic()
            stub.ValidateJWTSVID(pb.ValidateJWTSVIDRequest(audience="warm", svid=token), metadata=HEADER, timeout=20)
            timings["ValidateJWTSVID"] = time.monotonic() - started
        slow = {name: round(t, 3) for name, t in timings.items() if t > 0.5}
        assert not slow, f"calls that write nothing waited for the store's lock: {slow}"
    finally:
        holder.execute("COMMIT")
        holder.close()
        for t in threads:
            t.join(60)
    assert len(writers) == 24
    assert all(not isinstance(w, grpc.RpcError) for w in writers), [w for w in writers if isinstance(w, grpc.RpcError)]


def _collect(stream: Any, into: queue.Queue[Any]) -> None:
    try:
        for message in stream:
            into.put(message)
    except grpc.RpcError:
        pass


def test_bundle_streams_send_only_when_a_bundle_changes(issuer: FakeIssuer, sock_dir: Path) -> None:
    """Before: every SVID rotation (a change token bump) re-sent every bundle stream its unchanged bundles."""
    with WorkloadApiServer(lambda: issuer, sock_dir / "b.sock", poll_interval=0.05, grace=0.1) as server:
        channel, stub = raw_stub(server.socket_path)
        with channel:
            got: dict[str, queue.Queue[Any]] = {}
            streams = {}
            for name, request in (
                ("FetchX509Bundles", pb.X509BundlesRequest()),
                ("FetchJWTBundles", pb.JWTBundlesRequest()),
                ("FetchX509SVID", pb.X509SVIDRequest()),
            ):
                got[name] = queue.Queue()
                streams[name] = getattr(stub, name)(request, metadata=HEADER, timeout=60)
                threading.Thread(target=_collect, args=(streams[name], got[name]), daemon=True).start()
                got[name].get(timeout=10)  # the first message
            for _ in range(5):  # five SVID rotations; no bundle changes
                issuer.token += 1
                server.notify()
                got["FetchX509SVID"].get(timeout=10)  # the SVID stream follows each one
            time.sleep(0.5)
            assert got["FetchX509Bundles"].empty(), "the X.509 bundle stream re-sent unchanged bundles"
            assert got["FetchJWTBundles"].empty(), "the JWT bundle stream re-sent unchanged bundles"
            # A bundle change is sent, once.
            _, issuer.ca = _ca(TD)
            issuer.jwt_key = ec.generate_private_key(ec.SECP256R1())
            issuer.token += 1
            server.notify()
            x509_update = got["FetchX509Bundles"].get(timeout=10)
            jwt_update = got["FetchJWTBundles"].get(timeout=10)
            assert x509_update.bundles[f"spiffe://{TD}"] == FakeIssuer._der(issuer.ca)
            assert jwt_update.bundles[f"spiffe://{TD}"] == issuer.jwt_bundles()[TD]
            time.sleep(0.3)
            assert got["FetchX509Bundles"].empty()
            assert got["FetchJWTBundles"].empty()
            for stream in streams.values():
                stream.cancel()
