"""Identity-bound tunnels (qhx_edge/homes/tunnel.py, issue 11), end to end with real processes: a node's
``qhx-edge serve`` (the Workload API), an HTTP server, an inbound tunnel running as the server's
workload and an outbound tunnel running as the client's (told apart by their group ids, which the
policy's registrations select), and a plain HTTP client.

* The client reaches the server through both tunnels, each with its own SVID from the Workload API.
* A policy whose rules no longer let the client's identity reach the server's denies the next
  connection (``policy-denied``, audited) without restarting anything; no byte reaches the server.
* A peer offering only classical key exchange gets ``downgrade``, audited.
* The tunnels speak standard SPIFFE mTLS: go-spiffe's ``spiffetls`` client (tests/interop/
  spiffeprobe, with its SVID from our Workload API) reaches a service through our inbound tunnel,
  and our outbound tunnel reaches a ``spiffetls`` server.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import select
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio

from qhx_edge.core.policyfile import policy_fields
from qhx_edge.homes import node
from qhx_edge.links import tls
from qhx_edge.store import clock
from tests.conftest import PASSPHRASE, Homes, _cli_env, attest_node, make_homes, need, stop_process, wait_until

DB = "spiffe://alpha.example/ns/db/main"
WEB = "spiffe://alpha.example/ns/web/frontend"
DB_GID, WEB_GID = 41001, 41002
REGISTRATIONS = [
    {"spiffe_id": DB, "selectors": [f"unix:gid:{DB_GID}"]},
    {"spiffe_id": WEB, "selectors": [f"unix:gid:{WEB_GID}"], "labels": {"tier": "frontend"}},
]


def _policy(rules: list[dict[str, Any]]) -> dict[str, Any]:
    return policy_fields({"registrations": REGISTRATIONS, "algorithms": {"/": "ES256"}, "authorization": rules})


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        body = f"hello {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    _Handler.hits = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def _start(cmd: list[str], log: Path, gid: int | None = None) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.PIPE, stderr=err, text=True, group=gid)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready, log.read_text()
    line = proc.stdout.readline()
    assert line, log.read_text()
    return proc, json.loads(line)


def _exchange(address: str, data: bytes) -> bytes:
    """Send ``data`` to HOST:PORT, close the sending side, and return everything that comes back."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as c:
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := c.recv(65536):
            got += chunk
    return got


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return str(r.read().decode())


def test_a_client_reaches_a_server_through_two_tunnels_and_policy_decides(tmp_path: Path, http_server: int) -> None:
    need(
        os.geteuid() == 0, "the tunnels run under their own group ids (set by root) for the Workload API to tell apart"
    )
    rules = [{"to": DB, "allow": ["spiffe://alpha.example/ns/web/"]}]
    procs: list[subprocess.Popen[str]] = []
    with _node_serving(tmp_path, rules) as (h, sock, qhx):
        try:
            inbound, info_in = _start(
                [*qhx, "tunnel", "inbound", "--listen", "127.0.0.1:0", "--forward", f"127.0.0.1:{http_server}",
                 "--socket", str(sock)], tmp_path / "in.log", DB_GID,
            )  # fmt: skip
            procs.append(inbound)
            assert info_in["spiffe_id"] == DB
            outbound, info_out = _start(
                [*qhx, "tunnel", "outbound", "--listen", "127.0.0.1:0", "--peer", info_in["listening"],
                 "--peer-id", DB, "--socket", str(sock)], tmp_path / "out.log", WEB_GID,
            )  # fmt: skip
            procs.append(outbound)
            assert info_out["spiffe_id"] == WEB
            port = int(info_out["listening"].rsplit(":", 1)[1])

            assert _get(port, "/first") == "hello /first"
            assert _get(port, "/second") == "hello /second"  # a second connection (a resumed session)
            wait_until(lambda: '"event": "closed"' in (tmp_path / "in.log").read_text(), "no closed event logged")
            closed = [
                json.loads(x)["tunnel"] for x in (tmp_path / "in.log").read_text().splitlines() if '"closed"' in x
            ]
            assert closed[0]["caller"] == WEB
            assert closed[0]["group"] == "X25519MLKEM768"

            # The policy stops letting web reach db: the next connection is denied, nothing restarted.
            h.authority.publish_policy(_policy([{"to": DB, "allow": ["spiffe://alpha.example/ns/ops/"]}]), clock.now())
            now = clock.now()
            with node.Node(h.node_home) as n:
                n.import_pack(h.authority.export_pack(h.authority.export_documents(), now), now)
            hits = len(_Handler.hits)
            with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
                _get(port, "/denied")
            assert len(_Handler.hits) == hits  # no byte reached the server
            wait_until(
                lambda: "policy-denied" in (tmp_path / "in.log").read_text(), "the inbound tunnel logged no denial"
            )

            def denial_audited() -> bool:
                with node.Node(h.node_home) as n:
                    return any(e["kind"] == "policy-denied" and WEB in e["detail"] for e in n.store.audit_entries())

            wait_until(denial_audited, "the denial was not audited")

            # A classical-only peer (X25519 alone) gets downgrade, audited.
            async def classical() -> str:
                ctx = tls.make_context(server=False, groups=("X25519",))
                host, p = info_in["listening"].rsplit(":", 1)
                try:
                    await tls.connect(host, int(p), ctx, lambda chain: None)
                except Exception as exc:
                    return type(exc).__name__
                return "connected"

            assert trio.run(classical) != "connected"
            wait_until(lambda: '"downgrade"' in (tmp_path / "in.log").read_text(), "no downgrade logged")
        finally:
            codes = [stop_process(p) for p in reversed(procs)]
    assert codes == [0] * len(procs), [(tmp_path / n).read_text()[-1500:] for n in ("in.log", "out.log", "serve.log")]


def test_tunnels_need_an_identity(tmp_path: Path) -> None:
    """A tunnel whose process the Workload API gives no SVID says so and exits (no-identity)."""
    h = make_homes(tmp_path, suite="hybrid")
    h.authority.publish_policy(_policy([]), clock.now())
    attest_node(h, h.node_home)
    sock = tmp_path / "workload.sock"
    qhx = [sys.executable, "-m", "qhx_edge", "--json", "--home", str(h.node_home)]
    serve, _ = _start([*qhx, "serve", "--socket", str(sock)], tmp_path / "serve.log")
    try:
        cmd = [*qhx, "tunnel", "inbound", "--listen", "127.0.0.1:0", "--forward", "127.0.0.1:9", "--socket", str(sock)]
        r = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 3, r.stdout + r.stderr
        assert json.loads(r.stdout)["error"]["kind"] == "no-identity"
    finally:
        assert stop_process(serve) == 0


def test_the_workload_apis_concatenated_der_is_split_strictly() -> None:
    """The Workload API sends chains and bundles as concatenated DER (Workload API §5.2.1)."""
    from qhx_edge.core.errors import Malformed
    from qhx_edge.core.svid import split_der
    from tests.pki import make_ca, make_leaf

    ca = make_ca("alpha.example")
    leaf = make_leaf(ca, uri=DB)
    joined = b"".join(leaf.der_chain)
    assert split_der(joined) == list(leaf.der_chain)
    assert split_der(b"") == []
    for bad in (joined[:-1], b"\x31" + joined[1:], joined + b"\x30", joined + b"\x30\x85\x00\x00\x00\x00\x01"):
        with pytest.raises(Malformed):
            split_der(bad)
    with pytest.raises(Malformed):
        split_der(joined * 5, limit=len(leaf.der_chain) * 5 - 1)


@contextlib.contextmanager
def _node_serving(tmp: Path, rules: list[dict[str, Any]]) -> Iterator[tuple[Homes, Path, list[str]]]:
    """An attested node under a policy with REGISTRATIONS and ``rules``, its Workload API served."""
    h = make_homes(tmp, suite="hybrid")
    h.authority.publish_policy(_policy(rules), clock.now())
    attest_node(h, h.node_home)
    sock = tmp / "workload.sock"
    qhx = [sys.executable, "-m", "qhx_edge", "--json", "--home", str(h.node_home)]
    serve, _ = _start([*qhx, "serve", "--socket", str(sock)], tmp / "serve.log")
    try:
        yield h, sock, qhx
    finally:
        assert stop_process(serve) == 0, (tmp / "serve.log").read_text()[-1500:]


@contextlib.contextmanager
def _echo_service() -> Iterator[int]:
    """A plain TCP service: reads to the end, answers "echo: " and what it read."""
    srv = socket.create_server(("127.0.0.1", 0))

    def answer(conn: socket.socket) -> None:
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(b"echo: " + data)

    def run() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()  # each connection its own

    threading.Thread(target=run, daemon=True).start()
    try:
        yield int(srv.getsockname()[1])
    finally:
        srv.close()


def test_gospiffe_spiffetls_client_and_server_speak_with_our_tunnels(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "the workloads run under their own group ids (set by root) for the Workload API")
    from tests.interop import spiffeprobe

    probe = str(spiffeprobe())
    with _node_serving(tmp_path, [{"to": DB, "allow": [WEB]}]) as (_h, sock, qhx), _echo_service() as echo:
        inbound, info = _start(
            [*qhx, "tunnel", "inbound", "--listen", "127.0.0.1:0", "--forward", f"127.0.0.1:{echo}",
             "--socket", str(sock)], tmp_path / "in.log", DB_GID,
        )  # fmt: skip
        try:
            # go-spiffe's spiffetls client, as the web workload, through our inbound tunnel.
            r = subprocess.run(
                [probe, "tls-dial", "-socket", str(sock), "-addr", info["listening"], "-peer-id", DB, "-send", "ping"],
                capture_output=True, text=True, timeout=60, check=False, group=WEB_GID,
            )  # fmt: skip
            assert r.returncode == 0, (r.stdout, r.stderr, (tmp_path / "in.log").read_text())
            assert json.loads(r.stdout)["received"] == "echo: ping"
        finally:
            assert stop_process(inbound) == 0
        # Our outbound tunnel, as the web workload, to go-spiffe's spiffetls server as the db workload.
        server = subprocess.Popen(
            [probe, "tls-serve", "-socket", str(sock), "-addr", "127.0.0.1:0", "-peer-id", WEB],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, group=DB_GID,
        )  # fmt: skip
        assert server.stdout is not None
        listening = json.loads(server.stdout.readline())["listening"]
        outbound, out_info = _start(
            [*qhx, "tunnel", "outbound", "--listen", "127.0.0.1:0", "--peer", listening, "--peer-id", DB,
             "--socket", str(sock)], tmp_path / "out.log", WEB_GID,
        )  # fmt: skip
        try:
            got = _exchange(out_info["listening"], b"pong")
            assert got == b"echo: pong", (tmp_path / "out.log").read_text()
            out, err = server.communicate(timeout=30)
            assert server.returncode == 0, (out, err)
            assert json.loads(out.splitlines()[-1])["received"] == "pong"
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
            assert stop_process(outbound) == 0


def test_a_revoked_nodes_workloads_are_refused_at_the_next_connection(tmp_path: Path) -> None:
    """The client's tunnel runs on a second node.  Once the authority revokes that node and the server's
    node imports the revocation, the next connection is refused as ``revoked`` (the revoked node still
    holds its SVIDs: it never heard), audited, and never reaches the service."""
    need(os.geteuid() == 0, "the workloads run under their own group ids (set by root) for the Workload API")
    with _node_serving(tmp_path, [{"to": DB, "allow": [WEB]}]) as (h, sock, qhx), _echo_service() as echo:
        second = tmp_path / "N2"
        node.init(second, h.authority.anchor(), clock.now(), passphrase=PASSPHRASE.encode())
        attest_node(h, second)
        qhx2 = [sys.executable, "-m", "qhx_edge", "--json", "--home", str(second)]
        sock2 = tmp_path / "w2.sock"
        procs = []
        try:
            procs.append(_start([*qhx2, "serve", "--socket", str(sock2)], tmp_path / "serve2.log")[0])
            inbound, info = _start(
                [*qhx, "tunnel", "inbound", "--listen", "127.0.0.1:0", "--forward", f"127.0.0.1:{echo}",
                 "--socket", str(sock)], tmp_path / "in.log", DB_GID,
            )  # fmt: skip
            procs.append(inbound)
            outbound, out = _start(
                [*qhx2, "tunnel", "outbound", "--listen", "127.0.0.1:0", "--peer", info["listening"],
                 "--peer-id", DB, "--socket", str(sock2)], tmp_path / "out.log", WEB_GID,
            )  # fmt: skip
            procs.append(outbound)

            def call(data: bytes) -> bytes:
                return _exchange(out["listening"], data)

            assert call(b"before") == b"echo: before"
            with node.Node(second) as n:
                h.authority.revoke(clock.now(), node_id=n.node_id)
            now = clock.now()
            with node.Node(h.node_home) as n:
                n.import_pack(h.authority.export_pack(h.authority.export_documents(), now), now)
            assert call(b"after") == b""  # refused: nothing came back
            wait_until(lambda: '"revoked"' in (tmp_path / "in.log").read_text(), "the inbound tunnel did not refuse")
        finally:
            codes = [stop_process(p) for p in reversed(procs)]
        assert codes == [0] * len(procs)


def partner_homes(tmp: Path, alpha: dict[str, Any], beta: dict[str, Any]) -> tuple[Homes, Homes]:
    """alpha.example and beta.example under an agreement, each with an attested node holding what the
    other releases: alpha accepts beta's ns/logistics, beta accepts alpha's ns/db.  ``alpha`` and
    ``beta`` are each authority's policy (policy file tables)."""
    from tests.test_federation import ALPHA, BETA, agree, ok

    sides = {}
    for name, domain, fields in (("alpha", ALPHA, alpha), ("beta", BETA, beta)):
        h = make_homes(tmp / name, suite="hybrid", domain=domain, import_first=False)
        h.authority.publish_policy(policy_fields(fields), clock.now())
        anchor = tmp / f"{name}.anchor"
        fp = ok("--home", h.a, "--json", "authority", "anchor", "--to", anchor)["fingerprint"]
        sides[name] = (h, (h.a, anchor, fp))
    (ha, a), (hb, b) = sides["alpha"], sides["beta"]
    agree(tmp, a, b, BETA, "--accept", "spiffe://beta.example/ns/logistics", "--release", "bundle",
          "--release", "freshness", "--max-staleness", "1h", "--expires", "30d",
          "--partner-accept", "spiffe://alpha.example/ns/db")  # fmt: skip
    for h, partner in ((ha, hb), (hb, ha)):
        attest_node(h, h.node_home)
        theirs = tmp / f"from-{partner.authority.domain}.pack"
        ok("--home", partner.a, "--json", "pack", "export", "--partner", h.authority.domain, "--to", theirs)
        ok("--home", h.node_home, "--json", "pack", "import", theirs)
    return ha, hb


def test_a_partners_workload_reaches_ours_under_the_agreement(tmp_path: Path) -> None:
    """Two domains under an agreement: alpha accepts beta's ns/logistics, beta accepts alpha's ns/db.
    A beta workload on a beta node reaches an alpha service on an alpha node through the two tunnels;
    each side checks the other's SVID under the partner's bundle that the agreement released, and
    alpha's rules name the partner's namespace.  A beta identity outside what alpha accepts is refused."""
    need(os.geteuid() == 0, "the workloads run under their own group ids (set by root) for the Workload API")
    api = "spiffe://beta.example/ns/logistics/api"
    stranger = "spiffe://beta.example/ns/finance/report"
    stranger_gid = 41003
    ha, hb = partner_homes(
        tmp_path,
        {"registrations": [REGISTRATIONS[0]], "algorithms": {"/": "ES256"},
         "authorization": [{"to": DB, "allow": ["spiffe://beta.example/ns/logistics/"]}]},
        {"registrations": [{"spiffe_id": api, "selectors": [f"unix:gid:{WEB_GID}"]},
                           {"spiffe_id": stranger, "selectors": [f"unix:gid:{stranger_gid}"]}],
         "algorithms": {"/": "ES256"}},
    )  # fmt: skip
    qa = [sys.executable, "-m", "qhx_edge", "--json", "--home", str(ha.node_home)]
    qb = [sys.executable, "-m", "qhx_edge", "--json", "--home", str(hb.node_home)]
    sa, sb = tmp_path / "wa.sock", tmp_path / "wb.sock"
    procs = []
    with _echo_service() as echo:
        try:
            procs.append(_start([*qa, "serve", "--socket", str(sa)], tmp_path / "serve-a.log")[0])
            procs.append(_start([*qb, "serve", "--socket", str(sb)], tmp_path / "serve-b.log")[0])
            inbound, info = _start(
                [*qa, "tunnel", "inbound", "--listen", "127.0.0.1:0", "--forward", f"127.0.0.1:{echo}",
                 "--socket", str(sa)], tmp_path / "in.log", DB_GID,
            )  # fmt: skip
            procs.append(inbound)
            for gid, log in ((WEB_GID, "out.log"), (stranger_gid, "stranger.log")):
                proc, out = _start(
                    [*qb, "tunnel", "outbound", "--listen", "127.0.0.1:0", "--peer", info["listening"],
                     "--peer-id", DB, "--socket", str(sb)], tmp_path / log, gid,
                )  # fmt: skip
                procs.append(proc)
                got = _exchange(out["listening"], b"from beta")
                assert got == (b"echo: from beta" if gid == WEB_GID else b""), (tmp_path / "in.log").read_text()
            events = [json.loads(x)["tunnel"] for x in (tmp_path / "in.log").read_text().splitlines()]
            assert any(e["event"] == "closed" and e["caller"] == api for e in events), events
            wait_until(lambda: "scope-violation" in (tmp_path / "in.log").read_text(), "the stranger was not refused")
        finally:
            codes = [stop_process(p) for p in reversed(procs)]
        assert codes == [0] * len(procs)


def test_a_service_with_ml_dsa_svids_takes_only_ml_dsa_callers(tmp_path: Path) -> None:
    """pq-strict for one namespace: the policy gives ns/db ML-DSA-65 SVIDs and everything else ES256.
    A caller presenting its ES256 SVID gets ``downgrade`` at the db's inbound tunnel; once the policy
    gives every identity ML-DSA-65, the same caller (with its new SVID) gets through."""
    need(os.geteuid() == 0, "the workloads run under their own group ids (set by root) for the Workload API")
    rules = [{"to": DB, "allow": [WEB]}]
    with _node_serving(tmp_path, rules) as (h, sock, qhx), _echo_service() as echo:

        def publish(algorithms: dict[str, str]) -> None:
            fields = policy_fields({"registrations": REGISTRATIONS, "algorithms": algorithms, "authorization": rules})
            h.authority.publish_policy(fields, clock.now())
            now = clock.now()
            with node.Node(h.node_home) as n:
                n.import_pack(h.authority.export_pack(h.authority.export_documents(), now), now)

        publish({"/": "ES256", "/ns/db/": "ML-DSA-65"})
        procs = []
        try:
            inbound, info = _start(
                [*qhx, "tunnel", "inbound", "--listen", "127.0.0.1:0", "--forward", f"127.0.0.1:{echo}",
                 "--socket", str(sock)], tmp_path / "in.log", DB_GID,
            )  # fmt: skip
            procs.append(inbound)
            outbound, out = _start(
                [*qhx, "tunnel", "outbound", "--listen", "127.0.0.1:0", "--peer", info["listening"],
                 "--peer-id", DB, "--socket", str(sock)], tmp_path / "out.log", WEB_GID,
            )  # fmt: skip
            procs.append(outbound)

            def call() -> bytes:
                return _exchange(out["listening"], b"x")

            assert call() == b""
            wait_until(lambda: "classical certificate" in (tmp_path / "in.log").read_text(), "no downgrade logged")
            publish({"/": "ML-DSA-65"})
            # The Workload API streams the web workload its ML-DSA SVID; the tunnel takes it for new connections.
            wait_until(lambda: call() == b"echo: x", "the ML-DSA caller never got through", 60)
        finally:
            codes = [stop_process(p) for p in reversed(procs)]
        assert codes == [0] * len(procs)


def test_a_rotation_takes_new_connections_and_drops_no_live_one(tmp_path: Path) -> None:
    """A connection is open through both tunnels when the policy changes every SVID (ES256 to
    ML-DSA-65): new connections present the new SVIDs, and the open one carries on to its end."""
    need(os.geteuid() == 0, "the workloads run under their own group ids (set by root) for the Workload API")
    rules = [{"to": DB, "allow": [WEB]}]
    with _node_serving(tmp_path, rules) as (h, sock, qhx), _echo_service() as echo:
        procs = []
        try:
            inbound, info = _start(
                [*qhx, "tunnel", "inbound", "--listen", "127.0.0.1:0", "--forward", f"127.0.0.1:{echo}",
                 "--socket", str(sock)], tmp_path / "in.log", DB_GID,
            )  # fmt: skip
            procs.append(inbound)
            outbound, out = _start(
                [*qhx, "tunnel", "outbound", "--listen", "127.0.0.1:0", "--peer", info["listening"],
                 "--peer-id", DB, "--socket", str(sock)], tmp_path / "out.log", WEB_GID,
            )  # fmt: skip
            procs.append(outbound)
            address = out["listening"].rsplit(":", 1)

            def closed() -> list[dict[str, Any]]:
                lines = (tmp_path / "in.log").read_text().splitlines()
                return [e for e in (json.loads(x)["tunnel"] for x in lines) if e["event"] == "closed"]

            def probe() -> bool:
                """One short connection; True if it went through (and was logged)."""
                before = len(closed())
                try:
                    got = _exchange(out["listening"], b"probe")
                except OSError:
                    return False
                if got != b"echo: probe":
                    return False
                wait_until(lambda: len(closed()) > before, "a connection's end was not logged")
                return True

            assert probe()
            old = closed()[-1]["svid"]
            live = socket.create_connection((address[0], int(address[1])), timeout=30)
            live.sendall(b"begun ")
            fields = policy_fields({"registrations": REGISTRATIONS, "algorithms": {"/": "ML-DSA-65"},
                                    "authorization": rules})  # fmt: skip
            h.authority.publish_policy(fields, clock.now())
            now = clock.now()
            with node.Node(h.node_home) as n:
                n.import_pack(h.authority.export_pack(h.authority.export_documents(), now), now)
            # Until both tunnels hold their ML-DSA SVIDs a probe may be refused (downgrade); then it passes.
            wait_until(lambda: probe() and closed()[-1]["svid"] != old, "no connection with the new SVIDs", 60)
            live.sendall(b"and finished")
            live.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := live.recv(65536):
                got += chunk
            live.close()
            assert got == b"echo: begun and finished"  # the live connection was not dropped
            wait_until(lambda: closed()[-1]["svid"] == old, "the live connection's end was not logged")
        finally:
            codes = [stop_process(p) for p in reversed(procs)]
        assert codes == [0] * len(procs)
