"""The notary under attack (review findings of issue 11), each test failing before its fix:

* the HTTP it carries, read by ``homes.notary.splice`` between in-memory streams (the caller's side and
  the service's side), with a recorder in place of the receipt log: request smuggling, route evasion,
  early responses, responses that end at close, targets a receipt cannot hold;
* the receipt log at the authority (``homes.evidence._apply_log`` through real evidence packs): a node
  that rewinds its log, claims a lost pack, or whose honest packs arrive out of order;
* the bundle history: a rotated-out notary key backdating a delegation, a forged copy of a root, and
  receipts exported after the notary role rotated.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from qhx_edge.core import authz, documents, receipts
from qhx_edge.core.errors import Expired, QhxError
from qhx_edge.core.receipts import Party, message_digest
from qhx_edge.homes import node, notary
from qhx_edge.store import clock
from tests.test_notary import DB, ROUTES, WEB, _append, _history, _made_receipts, _ok


class Recorder:
    """Stands in for a Notary: keeps what it is asked to record (or fails as told)."""

    def __init__(self, fail: QhxError | None = None) -> None:
        self.records: list[tuple[str, Any]] = []
        self.fail = fail
        self.caller_had: list[bytes] = []  # what the caller had received when each record was made
        self.seen: bytearray | None = None

    def record(self, ctx: Any, level: str, ex: Any, at: int) -> int:
        if self.seen is not None:
            self.caller_had.append(bytes(self.seen))
        if self.fail is not None:
            raise self.fail
        self.records.append((level, ex))
        return len(self.records) - 1


def _ctx() -> notary.Connection:
    chain = [b"a certificate"]
    return notary.Connection(DB, Party.of_chain(WEB, chain), Party.of_chain(DB, chain),
                             {"alpha.example": {"bundle": 1}}, {}, authz.parse_routes(ROUTES))  # fmt: skip


Script = Callable[[trio.testing.MemoryReceiveStream | Any, bytearray], Awaitable[None]]


def _run(caller: Script, service: Script, rec: Recorder) -> tuple[bytes, bytes, list[dict[str, Any]]]:
    """The splice between a caller and a service, each a script; (caller got, service got, events)."""
    events: list[dict[str, Any]] = []
    caller_got, service_got = bytearray(), bytearray()
    rec.seen = caller_got

    async def main() -> None:
        remote, caller_end = trio.testing.memory_stream_pair()
        local, service_end = trio.testing.memory_stream_pair()

        async def read_caller() -> None:
            while data := await caller_end.receive_some(65536):
                caller_got.extend(data)

        with trio.move_on_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(caller, caller_end, caller_got)
                n.start_soon(read_caller)
                n.start_soon(service, service_end, service_got)
                try:
                    await notary.splice(remote, local, rec, _ctx(), events.append)
                finally:
                    await remote.aclose()
                    await local.aclose()

    trio.run(main)
    return bytes(caller_got), bytes(service_got), events


async def _serve_one(stream: Any, got: bytearray, response: bytes, until: bytes) -> None:
    while until not in got:
        data = await stream.receive_some(65536)
        if not data:
            return
        got.extend(data)
    await stream.send_all(response)


def test_a_smuggled_request_never_reaches_the_service() -> None:
    """Transfer-Encoding beside Content-Length: h11 reads the chunked body, a Content-Length service reads
    another request inside it (a recorded route, run without a receipt).  Refused before any byte goes on."""
    inner = b"POST /orders HTTP/1.1\r\nHost: db\r\nContent-Length: 7\r\n\r\n"
    line = b"%x\r\n" % len(inner)
    smuggling = (b"POST /public HTTP/1.1\r\nHost: db\r\nTransfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n"
                 % len(line) + line + inner + b"\r\n0\r\n\r\n")  # fmt: skip

    async def caller(s: Any, _: bytearray) -> None:
        await s.send_all(smuggling)
        await trio.sleep(0.5)

    async def service(s: Any, got: bytearray) -> None:
        with trio.move_on_after(1):
            while data := await s.receive_some(65536):
                got.extend(data)

    rec = Recorder()
    _, service_got, events = _run(caller, service, rec)
    assert service_got == b""
    assert [e["event"] for e in events] == ["notary-refused"]
    assert "Transfer-Encoding and Content-Length" in events[0]["error"]["message"]
    # (Identical repeated Content-Length values are one value, as RFC 9110 §8.6 lets recipients read them.)
    for bad in (b"Content-Length: 5\r\nContent-Length: 6", b"Content-Length: +5", b"Content-Length: 5, 6"):
        request = b"POST /orders HTTP/1.1\r\nHost: db\r\n" + bad + b"\r\n\r\nhello"

        async def send(s: Any, _: bytearray, request: bytes = request) -> None:
            await s.send_all(request)
            await trio.sleep(0.3)

        _, service_got, events = _run(send, service, Recorder())
        assert service_got == b"", bad
        assert events[0]["event"] == "notary-refused", bad


@pytest.mark.parametrize("target", ["http://db/orders", "//orders", "/./orders", "/x/../orders", "/%6Frders"])
def test_a_route_is_matched_on_the_path_the_service_routes(target: str) -> None:
    routes = authz.parse_routes(ROUTES)
    assert authz.notary_level(routes, DB, "POST", target) == "sign-request"


@pytest.mark.parametrize("target", ["/%2Forders", "/a%5corders", "/a\\orders", "/%zzorders", "/a%00"])
def test_a_target_servers_read_in_more_than_one_way_is_refused(target: str) -> None:
    with pytest.raises(QhxError):
        authz.notary_level(authz.parse_routes(ROUTES), DB, "POST", target)
    with pytest.raises(QhxError):
        authz.parse_routes([{"service": DB, "route": "/a/../orders", "level": "log-request"}])


def test_an_early_response_keeps_request_and_response_digests_apart() -> None:
    """The service answers before the request body has all come: each digest covers its own message."""
    head, body = b"POST /orders HTTP/1.1\r\nHost: db\r\nContent-Length: 10\r\n\r\n", b"0123456789"
    resp_head, resp_body = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", b"ok"

    async def caller(s: Any, got: bytearray) -> None:
        await s.send_all(head)
        await trio.sleep(0.2)
        await s.send_all(body)
        await trio.sleep(0.5)

    async def service(s: Any, got: bytearray) -> None:
        await _serve_one(s, got, resp_head, b"\r\n\r\n")
        while not got.endswith(body):
            got.extend(await s.receive_some(65536))
        await s.send_all(resp_body)
        await trio.sleep(0.3)

    rec = Recorder()
    caller_got, _, _ = _run(caller, service, rec)
    assert caller_got == resp_head + resp_body
    (level, ex), = rec.records  # fmt: skip
    assert level == "sign-request"
    assert ex.request == message_digest(["POST", "/orders"], [(b"host", b"db"), (b"content-length", b"10")],
                                        hashlib.sha256(body).digest())  # fmt: skip
    assert ex.response == message_digest([200], [(b"content-length", b"2")], hashlib.sha256(resp_body).digest())


def test_a_response_that_ends_at_close_is_released_only_after_its_receipt() -> None:
    request = b"POST /orders HTTP/1.1\r\nHost: db\r\nContent-Length: 2\r\n\r\nhi"
    head, last = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nfirst part, ", b"and the end"

    async def caller(s: Any, _: bytearray) -> None:
        await s.send_all(request)
        await trio.sleep(1)

    async def service(s: Any, got: bytearray) -> None:
        await _serve_one(s, got, head, b"hi")
        await trio.sleep(0.2)
        await s.send_all(last)
        await trio.sleep(0.2)
        await s.send_eof()

    rec = Recorder()
    caller_got, _, _ = _run(caller, service, rec)
    assert caller_got == head + last
    assert len(rec.records) == 1
    assert last not in rec.caller_had[0]  # the end was held until the receipt was committed
    failing = Recorder(Expired("the notary delegation expired"))
    caller_got, _, events = _run(caller, service, failing)
    assert last not in caller_got  # never a complete unrecorded response
    assert events[-1]["event"] == "notary-refused"


def test_a_target_no_receipt_can_hold_is_refused_before_it_goes_on() -> None:
    async def caller(s: Any, _: bytearray) -> None:
        await s.send_all(b"POST /orders/" + b"a" * 3000 + b" HTTP/1.1\r\nHost: db\r\nContent-Length: 0\r\n\r\n")
        await trio.sleep(0.3)

    async def service(s: Any, got: bytearray) -> None:
        with trio.move_on_after(0.5):
            while data := await s.receive_some(65536):
                got.extend(data)

    _, service_got, events = _run(caller, service, Recorder())
    assert service_got == b""
    assert events[0]["event"] == "notary-refused"


# --- the receipt log at the authority ------------------------------------------------------------------


def _export(h: Any, tmp: Path, name: str) -> Path:
    path = tmp / name
    _ok("--home", h.node_home, "--json", "pack", "export", "--evidence", "--to", path)
    return path


def _import(h: Any, path: Path) -> dict[str, Any]:
    got = _ok("--home", h.a, "--json", "pack", "import", path)
    (n,) = got["nodes"].values()
    return dict(n["receipt_log"][0]) if n["receipt_log"] else {}


def test_a_node_that_rewinds_its_log_past_an_exported_head_is_a_fork(tmp_path: Path) -> None:
    """The authority holds heads 3 and 5.  The node drops receipts 3 and 4, moves its export mark back to
    3 and signs heads of 4 and 6: a pack from 3 passes over head 5 without containing it."""
    h, _ = _made_receipts(tmp_path)
    assert _import(h, _export(h, tmp_path, "e1.pack"))["status"] == "first"
    _append(h, ["workload-only"] * 2)
    assert _import(h, _export(h, tmp_path, "e2.pack"))["status"] == "accepted"
    db = sqlite3.connect(h.node_home / "receipts.sqlite")
    with db:
        db.execute("DELETE FROM leaves WHERE seq >= 3")
        db.execute("DELETE FROM heads WHERE size > 3")
        db.execute("UPDATE exported_head SET size = 3")
    db.close()
    _append(h, ["workload-only"])
    _append(h, ["workload-only"] * 2)
    result = _import(h, _export(h, tmp_path, "e3.pack"))
    assert result["status"] == "fork", result
    assert "tree head 5" in result["reason"]


def test_a_lost_pack_is_a_gap_until_it_comes_and_out_of_order_packs_are_no_fork(tmp_path: Path) -> None:
    h, _ = _made_receipts(tmp_path)
    first = _export(h, tmp_path, "e1.pack")
    _append(h, ["workload-only"])
    lost = _export(h, tmp_path, "e2.pack")
    _append(h, ["workload-only"])
    third = _export(h, tmp_path, "e3.pack")
    assert _import(h, first)["status"] == "first"
    got = _import(h, third)
    assert got["status"] == "gap"
    assert got["gaps"] == [[3, 4]]
    assert _ok("--home", h.a, "--json", "evidence", "status")["nodes"]
    closed = _import(h, lost)
    assert closed["status"] == "accepted", closed
    (n,) = _ok("--home", h.a, "--json", "evidence", "status")["nodes"].values()
    assert n["receipt_log"]["gaps"] == []
    assert n["receipt_log"]["forks"] == []
    assert n["receipt_log"]["head"]["size"] == 5


def test_a_node_that_claims_a_lost_pack_leaves_a_gap_on_record(tmp_path: Path) -> None:
    h, _ = _made_receipts(tmp_path)
    assert _import(h, _export(h, tmp_path, "e1.pack"))["status"] == "first"
    _append(h, ["workload-only"])
    _export(h, tmp_path, "never-delivered.pack")
    _append(h, ["workload-only"])
    assert _import(h, _export(h, tmp_path, "e3.pack"))["status"] == "gap"
    (n,) = _ok("--home", h.a, "--json", "evidence", "status")["nodes"].values()
    assert n["receipt_log"]["gaps"] == [[3, 4]]


# --- the bundle history ----------------------------------------------------------------------------------


def test_a_notary_key_rotated_out_cannot_backdate_a_delegation(tmp_path: Path) -> None:
    from qhx_edge.core.cards import EncryptionPrivateKey, make_card
    from qhx_edge.core.suites import PrivateKey

    h, data = _made_receipts(tmp_path)
    now = clock.now()
    old_key = h.authority._signers("notary")[0]
    rotated = now + 100
    h.authority.rotate_root(rotated, root_keys=None, root_threshold=None, roles=("notary",))
    history = _history(h)
    real = receipts.ReceiptFile.from_bytes(data[0])
    r = receipts.Receipt.from_bytes(real.receipt)
    evil = PrivateKey.generate("hybrid")
    card = make_card(r.domain, r.node_id, evil, EncryptionPrivateKey.generate().public, now)
    forged = documents.sign(documents.NotaryDelegation.from_dict(
        {"type": "notary", "domain": r.domain, "version": 999, "issued_at": rotated - 1,
         "expires": rotated + 10 * 365 * 86400, "node_id": r.node_id,
         "card_fingerprint": hashlib.sha256(card).hexdigest()}), [old_key])  # fmt: skip
    at = rotated + 200
    fake = receipts.Receipt(**{**r.__dict__, "seq": 0, "at": at}).to_bytes()
    head = receipts.sign_tree_head(receipts.TreeHead(r.domain, r.node_id, 1, receipts.merkle.leaf_hash(fake), at),
                                   evil)  # fmt: skip
    rf = receipts.ReceiptFile(fake, receipts.sign_receipt(fake, evil), head, (), card, forged, real.certs)
    with pytest.raises(QhxError) as exc:
        receipts.verify(rf.to_bytes(), history)
    assert exc.value.kind == "expired"
    assert "rotated out" in exc.value.message
    assert receipts.verify(data[0], history)["verified"]  # what it signed before the rotation still holds


def test_receipts_made_before_the_notary_role_rotated_still_verify(tmp_path: Path) -> None:
    h, _ = _made_receipts(tmp_path)
    later = clock.now() + 100
    h.authority.rotate_root(later, root_keys=None, root_threshold=None, roles=("notary",))
    with node.Node(h.node_home) as n:
        n.import_pack(h.authority.export_pack(h.authority.export_documents(), later), later)
        assert n.store.current(n.domain, "notary").payload.version == 2  # type: ignore[union-attr]
    again = notary.export(h.node_home, 0)
    for where in (h.a, h.node_home):
        assert receipts.verify(again, notary.load_history(where, []))["notary"]["delegation_version"] == 1


def test_a_forged_copy_of_a_root_in_the_history_hides_nothing(tmp_path: Path) -> None:
    import dataclasses

    from qhx_edge.core.suites import PrivateKey

    h, data = _made_receipts(tmp_path)
    docs = [p.read_bytes() for p in sorted((h.a / "published").glob("*/*.cbor"))]
    root1 = (h.a / "published" / "root" / "1.cbor").read_bytes()
    p = documents.parse(root1).payload
    forged = documents.sign(dataclasses.replace(p, expires=p.expires + 1), [PrivateKey.generate("hybrid")])
    anchor = hashlib.sha256(root1).hexdigest()
    for order in ([*docs, forged], [forged, *docs]):
        history = receipts.History(order, [anchor])
        assert receipts.verify(data[0], history)["verified"]
    stranger = documents.sign(dataclasses.replace(p, version=2), [PrivateKey.generate("hybrid")])
    history = receipts.History([*docs, stranger], [anchor])
    assert history.summary()["refused"]  # what did not verify is shown
