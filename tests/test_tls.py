"""TLS 1.3 over trio streams (qhx_edge/links/tls.py): trio's generic stream checks over real loopback
TCP, refusals of older versions and foreign groups, ML-DSA-65 certificates, X25519MLKEM768, and the
peer verifiers (SPIFFE X509-SVID against a bundle and an expected ID; Web PKI with a host check)."""

from __future__ import annotations

import datetime as dt
import gc
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from OpenSSL import SSL

from qhx_edge.core.errors import BadSignature, Downgrade, Expired, Malformed, QhxError, ScopeViolation
from qhx_edge.links import tls
from tests.pki import Ca, Leaf, make_ca, make_leaf

SERVER_ID = "spiffe://alpha.example/qhx-edge/bundle-endpoint"


def _server(leaf: Leaf, groups: tuple[str, ...] = tls.DEFAULT_GROUPS) -> SSL.Context:
    return tls.make_context(tls.Credential.from_der(leaf.der_chain, leaf.key_der), server=True, groups=groups)


def _client(groups: tuple[str, ...] = tls.DEFAULT_GROUPS) -> SSL.Context:
    return tls.make_context(server=False, groups=groups)


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return client, server


async def _handshake(
    client_ctx: SSL.Context,
    server_ctx: SSL.Context,
    verify: tls.PeerVerifier,
    transports: tuple[trio.abc.Stream, trio.abc.Stream] | None = None,
) -> tuple[tls.TlsStream, tls.TlsStream]:
    c_raw, s_raw = transports or await _tcp_pair()
    client = tls.TlsStream(c_raw, client_ctx, server_side=False, verify_peer=verify)
    server = tls.TlsStream(s_raw, server_ctx, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, server


async def _failing_handshake(
    client_ctx: SSL.Context, server_ctx: SSL.Context, verify: tls.PeerVerifier
) -> dict[str, BaseException]:
    c_raw, s_raw = await _tcp_pair()
    client = tls.TlsStream(c_raw, client_ctx, server_side=False, verify_peer=verify)
    server = tls.TlsStream(s_raw, server_ctx, server_side=True)
    errors: dict[str, BaseException] = {}

    async def run(name: str, stream: tls.TlsStream) -> None:
        try:
            with trio.fail_after(10):
                await stream.do_handshake()
                await stream.receive_some()  # a client refused after its handshake learns it here
        except (QhxError, trio.BrokenResourceError) as exc:
            errors[name] = exc
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "client", client)
        nursery.start_soon(run, "server", server)
    return errors


@pytest.fixture(scope="module")
def ca() -> Ca:
    return make_ca("alpha.example")


@pytest.fixture(scope="module")
def svid(ca: Ca) -> Leaf:
    return make_leaf(ca, uri=SERVER_ID)


def _run(fn: Callable[[], Awaitable[object]]) -> None:
    trio.run(fn)


def test_tls_stream_passes_trios_half_closeable_stream_checks(ca: Ca, svid: Leaf) -> None:
    server_ctx, client_ctx = _server(svid), _client()
    verify = tls.spiffe_verifier([ca.der], SERVER_ID)

    async def over_tcp() -> tuple[tls.TlsStream, tls.TlsStream]:
        return await _handshake(client_ctx, server_ctx, verify)

    async def clogged() -> tuple[tls.TlsStream, tls.TlsStream]:
        # lockstep: a send blocks until the other side receives (trio.testing)
        return await _handshake(client_ctx, server_ctx, verify, trio.testing.lockstep_stream_pair())

    _run(lambda: trio.testing.check_half_closeable_stream(over_tcp, clogged))


def test_mldsa65_certificate_and_x25519mlkem768_are_negotiated(ca: Ca) -> None:
    pq_ca = make_ca("alpha.example pq", alg="ML-DSA-65")
    leaf = make_leaf(pq_ca, uri=SERVER_ID, alg="ML-DSA-65")
    seen: list[list[bytes]] = []
    check = tls.spiffe_verifier([pq_ca.der], SERVER_ID)

    def verify(chain: list[bytes]) -> None:
        seen.append(chain)
        check(chain)

    async def main() -> None:
        client, server = await _handshake(_client(tls.PQ_GROUPS), _server(leaf), verify)
        async with client, server:
            assert client.version == server.version == "TLSv1.3"
            assert client.group == server.group == "X25519MLKEM768"
            await client.send_all(b"ping")
            assert await server.receive_some() == b"ping"
        assert seen == [leaf.der_chain]

    _run(main)


def test_default_groups_prefer_x25519mlkem768(svid: Leaf, ca: Ca) -> None:
    async def main() -> None:
        client, server = await _handshake(_client(), _server(svid), tls.spiffe_verifier([ca.der], SERVER_ID))
        async with client, server:
            assert client.group == "X25519MLKEM768"
        # a classical-only peer still meets the default server
        client, server = await _handshake(_client(("X25519",)), _server(svid), tls.spiffe_verifier([ca.der], SERVER_ID))
        async with client, server:
            assert client.group == server.group == "x25519"

    _run(main)


def test_a_peer_without_a_common_group_is_refused_as_downgrade(svid: Leaf, ca: Ca) -> None:
    async def main() -> None:
        errors = await _failing_handshake(
            _client(("secp384r1",)), _server(svid, tls.PQ_GROUPS), tls.spiffe_verifier([ca.der], SERVER_ID)
        )
        assert isinstance(errors["server"], Downgrade), errors
        assert isinstance(errors["client"], Downgrade), errors
        assert "group" in errors["server"].message

    _run(main)


def test_a_tls12_only_peer_is_refused_as_downgrade(svid: Leaf, ca: Ca) -> None:
    old = SSL.Context(SSL.TLS_METHOD)  # a TLS 1.2-only client, beside our TLS 1.3-only server
    old.set_max_proto_version(SSL.TLS1_2_VERSION)
    old.set_verify(SSL.VERIFY_PEER, lambda *a: True)

    async def main() -> None:
        errors = await _failing_handshake(old, _server(svid), tls.spiffe_verifier([ca.der], SERVER_ID))
        assert isinstance(errors["server"], Downgrade), errors
        assert "TLS 1.3" in errors["server"].message
        assert isinstance(errors["client"], Downgrade), errors

    _run(main)


def test_the_spiffe_verifier_refuses_the_wrong_id_an_expired_svid_and_another_ca(ca: Ca, svid: Leaf) -> None:
    async def refused(leaf: Leaf, verify: tls.PeerVerifier) -> BaseException:
        errors = await _failing_handshake(_client(), _server(leaf), verify)
        return errors["client"]

    async def main() -> None:
        wrong = await refused(svid, tls.spiffe_verifier([ca.der], "spiffe://alpha.example/someone-else"))
        assert isinstance(wrong, ScopeViolation)
        assert SERVER_ID in wrong.message
        past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
        expired = make_leaf(ca, uri=SERVER_ID, not_before=past - dt.timedelta(hours=1), not_after=past)
        assert isinstance(await refused(expired, tls.spiffe_verifier([ca.der], SERVER_ID)), Expired)
        other = make_ca("alpha.example impostor")
        assert isinstance(
            await refused(make_leaf(other, uri=SERVER_ID), tls.spiffe_verifier([ca.der], SERVER_ID)), BadSignature
        )

    _run(main)


def test_the_web_verifier_checks_the_ca_and_the_host(ca: Ca) -> None:
    web = make_leaf(ca, host="127.0.0.1")

    async def main() -> None:
        client, server = await _handshake(_client(), _server(web), tls.web_verifier([ca.der], "127.0.0.1"))
        await client.aclose()
        await server.aclose()
        errors = await _failing_handshake(_client(), _server(web), tls.web_verifier([ca.der], "127.0.0.2"))
        assert isinstance(errors["client"], BadSignature)
        errors = await _failing_handshake(_client(), _server(web), tls.web_verifier([make_ca().der], "127.0.0.1"))
        assert isinstance(errors["client"], BadSignature)

    _run(main)


def test_a_client_must_verify_and_credentials_must_fit(ca: Ca, svid: Leaf) -> None:
    a, _ = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError, match="verify"):
        tls.TlsStream(a, _client(), server_side=False)
    with pytest.raises(Malformed, match="group"):
        tls.make_context(server=True, groups=("NOT-A-GROUP",))
    with pytest.raises(Malformed, match="not the key"):
        tls.Credential.from_der(svid.der_chain, make_leaf(ca, uri=SERVER_ID).key_der)
    with pytest.raises(Malformed):
        tls.Credential.from_pem(svid.chain_pem, b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    pq = make_leaf(make_ca(alg="ML-DSA-65"), uri=SERVER_ID, alg="ML-DSA-65")
    cred = tls.Credential.from_pem(pq.chain_pem, pq.key_pem)  # ML-DSA-65 keys load from PEM
    assert cred.chain == tuple(pq.der_chain)
    tls.make_context(cred, server=True)


def test_a_truncated_stream_is_broken_not_a_clean_end(ca: Ca, svid: Leaf) -> None:
    async def main() -> None:
        client, server = await _handshake(_client(), _server(svid), tls.spiffe_verifier([ca.der], SERVER_ID))
        await server.send_all(b"partial")
        await server.transport.aclose()  # no close_notify
        assert await client.receive_some() == b"partial"
        with pytest.raises(trio.BrokenResourceError):
            await client.receive_some()
        await client.aclose()

    _run(main)


def test_resumption_sends_no_certificate_checks_again_and_stays_bounded(ca: Ca, svid: Leaf) -> None:
    """A client that offers its last session resumes it (the server's certificate does not cross
    again, the verifier still sees the recorded chain); a session that ended without close_notify is
    not resumed; ServerContexts starts a fresh context (and cache) after ``generation`` connections."""
    contexts = tls.ServerContexts(resumption=3600, generation=5)
    credential = tls.Credential.from_der(svid.der_chain, svid.key_der)
    client_ctx = _client()
    seen: list[list[bytes]] = []
    check = tls.spiffe_verifier([ca.der], SERVER_ID)

    def verify(chain: list[bytes]) -> None:
        seen.append(chain)
        check(chain)

    async def once(session: SSL.Session | None, *, polite: bool = True) -> tuple[bool, SSL.Session | None]:
        c_raw, s_raw = await _tcp_pair()
        client = tls.TlsStream(c_raw, client_ctx, server_side=False, verify_peer=verify, session=session)
        server = tls.TlsStream(s_raw, contexts(credential), server_side=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        contexts.verified()
        await server.send_all(b"tickets come with this")
        assert await client.receive_some() == b"tickets come with this"
        if polite:
            await client.aclose()
            await server.aclose()
        else:
            await trio.aclose_forcefully(client.transport)
            await trio.aclose_forcefully(server.transport)
        assert client.resumed == server.resumed
        return client.resumed, client.session

    async def main() -> list[bool]:
        got = []
        session = None
        for polite in (True, True, False, True, True, True):
            resumed, session = await once(session, polite=polite)
            gc.collect()  # OpenSSL forgets an impolite session when its connection is freed
            got.append(resumed)
        return got

    got = trio.run(main)
    # full; resumed; resumed, but ended without close_notify; so full; resumed; a new generation: full
    assert got == [False, True, True, False, True, False]
    assert contexts.generations == 2
    for _ in range(20):  # connections that never pass verification start no new generation
        contexts(credential)
    assert contexts.generations == 2
    assert all(chain == seen[0] for chain in seen)
    assert len(seen) == 6  # every handshake, resumed or not, was checked


def test_a_slow_peer_verifier_does_not_stall_other_connections(ca: Ca, svid: Leaf) -> None:
    """Review finding: the verifier ran on the event loop, and a real one opens a store (waiting on its
    lock for up to seconds) for any chain a stranger presents, stalling every other connection.  Now
    it runs in a worker thread: an established connection keeps exchanging while another handshake's
    verifier blocks for a second."""
    import threading
    import time

    check = tls.spiffe_verifier([ca.der], SERVER_ID)
    slow_started = threading.Event()

    def slow(chain: list[bytes]) -> None:
        slow_started.set()
        time.sleep(1.0)  # a blocking wait, as on a locked SQLite file
        check(chain)

    async def main() -> float:
        client, server = await _handshake(_client(), _server(svid), check)
        async with client, server, trio.open_nursery() as nursery:
            c_raw, s_raw = await _tcp_pair()
            other = tls.TlsStream(c_raw, _client(), server_side=False, verify_peer=slow)
            other_server = tls.TlsStream(s_raw, _server(svid), server_side=True)
            t = trio.current_time()
            nursery.start_soon(other.do_handshake)
            nursery.start_soon(other_server.do_handshake)
            while not slow_started.is_set():
                await trio.sleep(0.005)
            for i in range(10):
                await client.send_all(b"ping %d" % i)
                assert await server.receive_some() == b"ping %d" % i
            elapsed = trio.current_time() - t
        await other.aclose()
        await other_server.aclose()
        return elapsed

    assert trio.run(main) < 0.5
