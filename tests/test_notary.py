"""The notary (qhx_edge/homes/notary.py, core/receipts.py, issue 11), end to end with real processes: an
HTTP client and an HTTP server in two workloads of a node, an outbound tunnel and an inbound tunnel with
``--notary``; receipts written at the levels the policy's routes give, exported, verified offline
(also with the clock a year ahead, after every credential expired), refused when any byte changes or
when the history lacks what they name; and a receipt dropped from the log found at the authority.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import h11
import pytest

from qhx_edge.core import cbor, receipts
from qhx_edge.core.errors import MissingHistory, QhxError
from qhx_edge.core.policyfile import policy_fields
from qhx_edge.homes import node, notary
from qhx_edge.store import clock
from tests.conftest import (
    Homes,
    attest_node,
    faketime_prefix,
    find_libfaketime,
    make_homes,
    need,
    run_cli,
    stop_process,
)
from tests.test_tunnel import DB, DB_GID, REGISTRATIONS, WEB, WEB_GID, _start

ROUTES = [
    {"service": DB, "route": "/orders", "methods": ["POST"], "level": "sign-request"},
    {"service": DB, "route": "/log", "level": "log-request"},
    {"service": DB, "route": "/", "level": "workload-only"},
    {"service": DB, "route": "/quiet", "level": "workload-only", "methods": ["PUT"]},
]


def _policy(routes: list[dict[str, Any]], rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    rules = rules if rules is not None else [{"to": DB, "allow": [WEB]}]
    return policy_fields({"registrations": REGISTRATIONS, "algorithms": {"/": "ES256"}, "authorization": rules,
                          "notary": routes})  # fmt: skip


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: several exchanges on one tunnel connection
    hits: ClassVar[list[str]] = []

    def _answer(self, body: bytes) -> None:
        type(self).hits.append(f"{self.command} {self.path}")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(f"got {self.path}".encode())

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        self._answer(b"posted " + self.rfile.read(n))

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _http_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    _Handler.hits = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


class _Client:
    """HTTP/1.1 over one TCP connection, driven by h11, so the test knows the exact headers it sent."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.conn = h11.Connection(h11.CLIENT)

    def request(self, method: str, target: str, body: bytes = b"") -> tuple[int, bytes, bytes, bytes]:
        """(status, response body, the request digest a receipt names, the response digest)."""
        headers = [("Host", "db"), ("Content-Length", str(len(body)))]
        out = self.conn.send(h11.Request(method=method, target=target, headers=headers))
        out += self.conn.send(h11.Data(data=body)) if body else b""
        out += self.conn.send(h11.EndOfMessage())
        self.sock.sendall(out)
        status, got, resp_headers = 0, b"", []
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(ev, h11.Response):
                status, resp_headers = ev.status_code, list(ev.headers)
            elif isinstance(ev, h11.Data):
                got += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
        self.conn.start_next_cycle()
        sent = [(n.encode().lower(), v.encode()) for n, v in headers]
        request = receipts.message_digest([method, target], sent, hashlib.sha256(body).digest())
        response = receipts.message_digest([status], resp_headers, hashlib.sha256(got).digest())
        return status, got, request, response

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def _notarized(tmp: Path, routes: list[dict[str, Any]]) -> Iterator[tuple[Homes, list[str], str]]:
    """Two nodes of one domain, each serving its Workload API: on the first an HTTP server behind an
    inbound tunnel with --notary (as the db workload), on the second an outbound tunnel to it (as the web
    workload): (homes, the first node's qhx command, the client's address)."""
    import sys

    from tests.conftest import PASSPHRASE

    h = make_homes(tmp, suite="hybrid")
    h.authority.publish_policy(_policy(routes), clock.now())
    attest_node(h, h.node_home)
    second = tmp / "N2"
    node.init(second, h.authority.anchor(), clock.now(), passphrase=PASSPHRASE.encode())
    attest_node(h, second)
    with _tunnels(tmp, h.node_home, second) as client:
        yield h, [sys.executable, "-m", "qhx_edge", "--json", "--home", str(h.node_home)], client


@contextlib.contextmanager
def _tunnels(tmp: Path, server_home: Path, client_home: Path) -> Iterator[str]:
    """Both nodes' Workload APIs served; on the server's node an HTTP server behind an inbound tunnel with
    --notary (as the db workload), on the client's an outbound tunnel to it (as the web workload): the
    address the client's workload calls."""
    import sys

    qa, qb = ([sys.executable, "-m", "qhx_edge", "--json", "--home", str(h)] for h in (server_home, client_home))
    sa, sb = tmp / "wa.sock", tmp / "wb.sock"
    procs = []
    with _http_server() as port:
        try:
            procs.append(_start([*qa, "serve", "--socket", str(sa)], tmp / "serve.log")[0])
            procs.append(_start([*qb, "serve", "--socket", str(sb)], tmp / "serve2.log")[0])
            inbound, info = _start(
                [*qa, "tunnel", "inbound", "--notary", "--listen", "127.0.0.1:0", "--forward", f"127.0.0.1:{port}",
                 "--socket", str(sa)], tmp / "in.log", DB_GID,
            )  # fmt: skip
            procs.append(inbound)
            assert info["notary"] is True
            outbound, out = _start(
                [*qb, "tunnel", "outbound", "--listen", "127.0.0.1:0", "--peer", info["listening"], "--peer-id", DB,
                 "--socket", str(sb)], tmp / "out.log", WEB_GID,
            )  # fmt: skip
            procs.append(outbound)
            yield out["listening"]
        finally:
            codes = [stop_process(p) for p in reversed(procs)]
        assert codes == [0] * len(procs), [(tmp / n).read_text()[-2000:] for n in ("in.log", "out.log", "serve.log")]


def _ok(*args: Any) -> dict[str, Any]:
    r = run_cli(*args)
    assert r.code == 0, (r.stdout, r.stderr)
    return dict(json.loads(r.stdout))


def test_exchanges_through_a_notary_become_receipts_that_verify_offline(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "the tunnels run under their own group ids (set by root) for the Workload API")
    need(find_libfaketime() is not None, "libfaketime (Debian faketime) runs the verifier with the clock a year ahead")
    with _notarized(tmp_path, ROUTES) as (h, _qhx, address):
        client = _Client(address)
        try:  # three exchanges on one connection: one per level
            order = client.request("POST", "/orders?id=7", b"buy 3 crates")
            log = client.request("GET", "/log/today")
            health = client.request("GET", "/health")
        finally:
            client.close()
        assert order[:2] == (200, b"posted buy 3 crates")
        assert log[:2] == (200, b"got /log/today")
        assert health[:2] == (200, b"got /health")
        listed = _ok("--home", h.node_home, "--json", "receipt", "list")
        assert [(r["seq"], r["level"], r["signed"]) for r in listed["receipts"]] == [
            (0, "sign-request", True), (1, "log-request", False), (2, "workload-only", False)]  # fmt: skip
        assert {r["caller"] for r in listed["receipts"]} == {WEB}
        assert listed["receipts"][0]["method"] == "POST"
        assert "method" not in listed["receipts"][2]  # workload-only: who called whom, not what

        # A policy change applies to the next connection: web may no longer reach db; nothing is
        # forwarded and nothing recorded.
        hits = len(_Handler.hits)
        h.authority.publish_policy(_policy(ROUTES, [{"to": DB, "allow": ["spiffe://alpha.example/ns/ops/"]}]),
                                   clock.now())  # fmt: skip
        now = clock.now()
        with node.Node(h.node_home) as n:
            n.import_pack(h.authority.export_pack(h.authority.export_documents(), now), now)
        denied = _Client(address)
        try:
            with pytest.raises((OSError, h11.ProtocolError)):
                denied.request("POST", "/orders", b"more")
        finally:
            denied.close()
        assert len(_Handler.hits) == hits
        assert _ok("--home", h.node_home, "--json", "receipt", "list")["size"] == 3
    # Every process stopped: the inbound tunnel signed a last tree head over all three.
    assert _ok("--home", h.node_home, "--json", "receipt", "list")["tree_head"]["size"] == 3

    files = {}
    for seq in (0, 1, 2):
        files[seq] = tmp_path / f"r{seq}.receipt"
        _ok("--home", h.node_home, "--json", "receipt", "export", str(seq), "--out", files[seq])
    got = _ok("--json", "receipt", "verify", files[0], "--history", h.a)["report"]
    assert got["verified"] is True
    assert (got["caller"]["id"], got["callee"]["id"]) == (WEB, DB)
    assert got["exchange"]["method"] == "POST"
    assert got["exchange"]["target"] == "/orders?id=7"
    # The digests are what the client itself computes over what it sent and what it got.
    assert got["exchange"]["request_sha256"] == order[2].hex()
    assert got["exchange"]["response_sha256"] == order[3].hex()
    assert got["notary"]["signed"] is True
    assert _ok("--json", "receipt", "verify", files[1], "--history", h.a)["report"]["exchange"][
        "response_sha256"] == log[3].hex()  # fmt: skip
    assert "exchange" not in _ok("--json", "receipt", "verify", files[2], "--history", h.a)["report"]
    # The node's own home is a history too (the roots it holds are the ones it verified).
    assert _ok("--json", "receipt", "verify", files[0], "--history", h.node_home)["report"]["verified"]

    # A year and a month ahead: the SVIDs, the delegation, the notary key's card and every bundle have
    # expired; the receipt is checked at its own time and still verifies.
    r = run_cli("--json", "receipt", "verify", files[0], "--history", h.a, prefix=faketime_prefix("+400d"))
    assert r.code == 0, (r.stdout, r.stderr)
    assert json.loads(r.stdout)["report"]["verified"] is True
    with node.Node(h.node_home) as n:
        held = n.store.current(n.domain, "notary")
        assert held is not None
        assert held.payload.expires < clock.now() + 400 * 86400  # the notary delegation too

    # The history lacks the bundle version the receipt names: it says so, and what it did prove.
    anchor = tmp_path / "anchor.pack"
    from qhx_edge.packs import pack

    pack.write(anchor, h.authority.export_pack([h.authority.anchor()], clock.now()))
    fp = hashlib.sha256(h.authority.anchor()).hexdigest()
    r = run_cli("--json", "receipt", "verify", files[0], "--history", anchor, "--anchor", fp)
    assert r.code == 1, (r.stdout, r.stderr)
    out = json.loads(r.stdout)
    assert out["error"]["kind"] == "missing-history"
    assert "lacks bundle v" in out["error"]["message"]
    assert out["report"]["notary"]["delegation_version"] >= 1  # the signatures and the log were proven
    r = run_cli("--json", "receipt", "verify", files[0], "--history", anchor)
    assert r.code == 1
    assert json.loads(r.stdout)["error"]["kind"] == "malformed"  # a pack is trusted only from an anchor


def _history(h: Homes) -> receipts.History:
    return notary.load_history(h.a, [])


def test_a_receipt_with_any_byte_changed_fails(tmp_path: Path) -> None:
    """Built in process: a receipt of each level, then bytes changed all over the file (every byte of the
    receipt itself, and a stride through the rest): each variant is refused with a typed error."""
    h, data = _made_receipts(tmp_path)
    history = _history(h)
    for raw in data:
        assert receipts.verify(raw, history)["verified"]
        body = receipts.ReceiptFile.from_bytes(raw)
        start = raw.index(body.receipt)
        positions = set(range(start, start + len(body.receipt))) | set(range(0, len(raw), 37))
        for i in sorted(positions):
            changed = bytearray(raw)
            changed[i] ^= 0x01
            with pytest.raises(QhxError):
                receipts.verify(bytes(changed), history)


def _made_receipts(tmp: Path) -> tuple[Homes, list[bytes]]:
    """One receipt of each level appended by a Notary in process (the exchange itself is the e2e test's)."""
    h = make_homes(tmp, suite="hybrid")
    h.authority.publish_policy(_policy(ROUTES), clock.now())
    attest_node(h, h.node_home)
    seqs = _append(h, ["sign-request", "log-request", "workload-only"])
    return h, [notary.export(h.node_home, s) for s in seqs]


def _svid_chains(h: Homes) -> dict[str, list[bytes]]:
    """X509-SVID chains for WEB and DB minted by the node's issuer, as the Workload API would give them."""
    from qhx_edge.issue.issuer import Issuer
    from tests.conftest import PASSPHRASE

    out = {}
    with Issuer(h.node_home, PASSPHRASE.encode) as iss:
        for gid, sid in ((WEB_GID, WEB), (DB_GID, DB)):
            (svid,) = iss.x509_svids(frozenset({f"unix:gid:{gid}"}))
            assert svid.spiffe_id == sid
            out[sid] = list(svid.cert_chain)
    return out


def _append(h: Homes, levels: list[str], at: int | None = None) -> list[int]:
    """Receipts of ``levels`` appended by the node's Notary in process, then a tree head."""
    from qhx_edge.core.receipts import Party
    from tests.conftest import PASSPHRASE

    chains = _svid_chains(h)
    now = clock.now() if at is None else at
    keeper = notary.Notary.open(h.node_home, PASSPHRASE.encode, now)
    try:
        with node.Node(h.node_home) as n:
            held = n.store.current(n.domain, "bundle")
            assert held is not None
            versions = {n.domain: {"bundle": held.payload.version}}
        certs = {hashlib.sha256(c).digest(): c for c in [*chains[WEB], *chains[DB]]}
        ctx = notary.Connection(DB, Party.of_chain(WEB, chains[WEB]), Party.of_chain(DB, chains[DB]), versions,
                                certs, ())  # fmt: skip
        ex = notary.Exchange("POST", "/orders", "sign-request", request=b"\x01" * 32, status=201,
                             response=b"\x02" * 32)  # fmt: skip
        seqs = [keeper.record(ctx, level, ex if level != "workload-only" else None, now) for level in levels]
        keeper.sign_head(now)
    finally:
        keeper.close()
    return seqs


def test_a_history_without_the_named_bundle_says_so_in_process(tmp_path: Path) -> None:
    h, data = _made_receipts(tmp_path)
    docs = [p.read_bytes() for p in sorted((h.a / "published").glob("*/*.cbor"))]
    without = [d for d in docs if not _is(d, "bundle")]
    history = receipts.History(without, [hashlib.sha256(h.authority.anchor()).hexdigest()])
    with pytest.raises(MissingHistory) as exc:
        receipts.verify(data[0], history)
    assert "lacks bundle v" in exc.value.message
    assert exc.value.report is not None
    assert exc.value.report["verified"] is False


def _is(raw: bytes, kind: str) -> bool:
    from qhx_edge.core.documents import parse

    return parse(raw).type == kind


def test_a_receipt_dropped_from_the_log_is_detected_at_the_authority(tmp_path: Path) -> None:
    """Evidence packs carry the receipt log's tree heads with consistency proofs.  A node that drops a
    receipt after exporting a head over it, and signs its rewritten log again, cannot prove the new head
    consistent with the old one: the authority records a fork."""
    h, _ = _made_receipts(tmp_path)
    ev1 = tmp_path / "ev1.pack"
    _ok("--home", h.node_home, "--json", "pack", "export", "--evidence", "--to", ev1)
    got = _ok("--home", h.a, "--json", "pack", "import", ev1)
    node_id = next(iter(got["nodes"]))
    assert got["nodes"][node_id]["receipt_log"][0]["status"] == "first"
    assert got["nodes"][node_id]["receipt_log"][0]["size"] == 3

    # Honest growth: the next head is consistent with the held one.
    _append(h, ["workload-only"] * 2)
    ev2 = tmp_path / "ev2.pack"
    _ok("--home", h.node_home, "--json", "pack", "export", "--evidence", "--to", ev2)
    got = _ok("--home", h.a, "--json", "pack", "import", ev2)
    assert got["nodes"][node_id]["receipt_log"][0] == {"index": got["nodes"][node_id]["receipt_log"][0]["index"],
                                                       "status": "accepted", "size": 5}  # fmt: skip

    # The node drops receipt 1, renumbers the rest, signs its log again from scratch, and goes on.
    db = sqlite3.connect(h.node_home / "receipts.sqlite")
    with db:
        db.execute("DELETE FROM leaves WHERE seq = 1")
        db.execute("UPDATE leaves SET seq = seq - 1 WHERE seq > 1")
        db.execute("DELETE FROM heads")
    db.close()
    _append(h, ["workload-only"] * 2)  # new heads over the rewritten log (sizes past the exported one)
    ev3 = tmp_path / "ev3.pack"
    _ok("--home", h.node_home, "--json", "pack", "export", "--evidence", "--to", ev3)
    got = _ok("--home", h.a, "--json", "pack", "import", ev3)
    result = got["nodes"][node_id]["receipt_log"][0]
    assert result["status"] == "fork", result
    status = _ok("--home", h.a, "--json", "evidence", "status")
    forks = status["nodes"][node_id]["receipt_log"]["forks"]
    assert len(forks) == 1
    assert status["nodes"][node_id]["receipt_log"]["head"]["size"] == 5  # the held log is kept as it was


def test_receipts_and_tree_heads_refuse_what_is_not_theirs() -> None:
    with pytest.raises(QhxError):
        receipts.Receipt.from_bytes(cbor.encode({"type": "receipt"}))
    with pytest.raises(QhxError):
        receipts.ReceiptFile.from_bytes(cbor.encode({"format": "qhx-edge-receipt", "version": 2}))
    with pytest.raises(QhxError):
        receipts.ReceiptFile.from_bytes(b"\x00" * (receipts.MAX_FILE + 1))


def test_notary_routes_choose_the_longest_match() -> None:
    from qhx_edge.core import authz

    routes = authz.parse_routes(ROUTES)
    assert authz.notary_level(routes, DB, "POST", "/orders/7?x=1") == "sign-request"
    assert authz.notary_level(routes, DB, "GET", "/orders/7") == "workload-only"  # POST only
    assert authz.notary_level(routes, DB, "GET", "/ordersX") == "workload-only"  # a segment boundary
    assert authz.notary_level(routes, DB, "PUT", "/log") == "log-request"
    assert authz.notary_level(routes, WEB, "GET", "/log") is None
    for bad in ({"service": DB, "route": "x", "level": "log-request"},
                {"service": DB, "route": "/", "level": "everything"},
                {"service": DB, "route": "/", "level": "log-request", "methods": ["get"]},
                {"service": "https://db", "route": "/", "level": "log-request"},
                {"service": DB, "route": "/", "level": "log-request", "extra": 1}):  # fmt: skip
        with pytest.raises(QhxError):
            authz.parse_routes([bad])
    with pytest.raises(QhxError):
        policy_fields({"notary": [{"service": DB, "route": "/", "level": "nope"}]})


def test_a_node_without_a_notary_delegation_starts_no_notary(tmp_path: Path) -> None:
    from tests.conftest import PASSPHRASE

    h = make_homes(tmp_path, suite="hybrid")
    with pytest.raises(QhxError) as exc:
        notary.Notary.open(h.node_home, PASSPHRASE.encode, clock.now())
    assert exc.value.kind == "not-initialised"


def test_a_partners_call_through_a_notary_names_both_domains(tmp_path: Path) -> None:
    """A beta workload on a beta node calls an alpha service through a notary on an alpha node (two
    domains under an agreement).  The receipt names beta's bundle version beside alpha's, verifies
    against the alpha node's home (which holds what beta released), and says what it cannot prove
    against alpha's authority home alone (which never held beta's bundles)."""
    need(os.geteuid() == 0, "the workloads run under their own group ids (set by root) for the Workload API")

    from tests.test_tunnel import partner_homes

    api = "spiffe://beta.example/ns/logistics/api"
    ha, hb = partner_homes(
        tmp_path,
        {"registrations": [REGISTRATIONS[0]], "algorithms": {"/": "ES256"},
         "authorization": [{"to": DB, "allow": ["spiffe://beta.example/ns/logistics/"]}],
         "notary": [{"service": DB, "route": "/", "level": "log-request"}]},
        {"registrations": [{"spiffe_id": api, "selectors": [f"unix:gid:{WEB_GID}"]}], "algorithms": {"/": "ES256"}},
    )  # fmt: skip
    with _tunnels(tmp_path, ha.node_home, hb.node_home) as address:
        client = _Client(address)
        try:
            status, body, _, response = client.request("POST", "/manifest", b"12 pallets")
        finally:
            client.close()
        assert (status, body) == (200, b"posted 12 pallets")
    receipt = tmp_path / "partner.receipt"
    _ok("--home", ha.node_home, "--json", "receipt", "export", "0", "--out", receipt)
    got = _ok("--json", "receipt", "verify", receipt, "--history", ha.node_home)["report"]
    assert got["caller"]["id"] == api
    assert got["caller"]["domain"] == "beta.example"
    assert got["caller"]["bundle_version"] >= 1
    assert got["callee"]["domain"] == "alpha.example"
    assert got["exchange"]["response_sha256"] == response.hex()
    r = run_cli("--json", "receipt", "verify", receipt, "--history", ha.a)
    assert r.code == 1, r.stdout
    out = json.loads(r.stdout)
    assert out["error"]["kind"] == "missing-history"
    assert "beta.example" in out["error"]["message"]
    assert out["report"]["callee"]["bundle_version"] >= 1  # alpha's side was proven


def test_a_revoked_notary_key_proves_nothing_after_its_revocation(tmp_path: Path) -> None:
    """Receipts made before the node's revocation still verify against a history holding the revocation;
    a receipt (or tree head) dated after it does not, whatever its signatures."""
    h = make_homes(tmp_path, suite="hybrid")
    h.authority.publish_policy(_policy(ROUTES), clock.now())
    attest_node(h, h.node_home)
    t0 = clock.now()
    (seq,) = _append(h, ["sign-request"], at=t0)
    early = notary.export(h.node_home, seq)
    with node.Node(h.node_home) as n:
        h.authority.revoke(t0 + 2, node_id=n.node_id)  # revoked from two seconds after the receipt
    history = _history(h)
    assert receipts.verify(early, history)["revocation_version"] == 1
    (late,) = _append(h, ["sign-request"], at=t0 + 3)
    with pytest.raises(QhxError) as exc:
        receipts.verify(notary.export(h.node_home, late), history)
    assert exc.value.kind == "revoked"
