"""The SPIFFE Workload API on a Unix socket (issue 4, point 6; docs/issuance.md §5).

Wire.  The standard ``SpiffeWorkloadAPI`` service (``qhx_edge/issue/proto/workload.proto``)
at ``/SpiffeWorkloadAPI/<Method>``, so stock SPIFFE clients work unchanged.
Every call must carry the metadata ``workload.spiffe.io: true``, else
INVALID_ARGUMENT (Workload Endpoint §3, §6).  ``FetchX509SVID``,
``FetchX509Bundles`` and ``FetchJWTBundles`` send the current message at once
and again after a change of the issuer's ``change_token()`` that changed it
(Workload API §4.3): an SVID rotation wakes bundle streams, but they send only
when a bundle changed.  The WIT-SVID profile answers UNIMPLEMENTED (§7).
Bundles are keyed by the trust domain's SPIFFE ID (``spiffe://td``).  A caller
with no identity gets PERMISSION_DENIED ``no identity issued``; bundles and JWT
validation need an attested caller but no identity (bundles are public;
SPIRE's ``allow_unauthenticated_verifiers``).  A JWT-SVID request has at most
:data:`MAX_AUDIENCES` audiences of at most :data:`MAX_AUDIENCE_BYTES` bytes
(else INVALID_ARGUMENT ``malformed``); so has the audience of a validation.

Who is calling.  grpcio gives a handler no access to the connection's socket:
``context.peer()`` of a Unix socket client is just ``unix:``, and
``auth_context()``, even with local credentials, holds only the security level
-- grpc core never reads ``SO_PEERCRED`` (grpc/grpc#15511, #28755) -- and it
cannot serve a socket it did not accept itself.  So this module is its own gRPC
server: HTTP/2 from the ``h2`` library (state machine, HPACK, flow control), on
asyncio, handling only the Workload API's methods, their server streams and
the gRPC status trailers (gRPC over HTTP/2: ``:path /SpiffeWorkloadAPI/<Method>``,
``content-type application/grpc``, length-prefixed messages, ``grpc-status`` and
percent-encoded ``grpc-message`` trailers, Trailers-Only responses for errors)::

    workload ─► public socket (mode 0666) ─► accept() ─► _Connection: slot, attestation, HTTP/2, calls
                                              peercred.probe(the accepted socket), once;
                                              peercred.recheck at the first call

Slots.  A connection is admitted only while the server holds fewer than
``max_connections`` and its caller's uid (``SO_PEERCRED``, read at accept) fewer
than ``max_connections_per_uid`` (:data:`MAX_CONNECTIONS_PER_UID`); else it is
closed at once, so one local user cannot lock every workload out.  A
connection must send its whole HTTP/2 preface within ``handshake_timeout`` and
is closed (GOAWAY) once it has had no call open for ``idle_timeout`` (PINGs
are no call; a stream that stays open keeps its connection), so idle slots are
given back.  Refusals are logged at most once per :data:`REFUSAL_LOG_SECONDS`.

Attestation.  Each admitted connection is attested at once from the accepted
socket, on the event loop, before our HTTP/2 SETTINGS leave
(:func:`peercred.probe`: ``SO_PEERCRED``, ``SO_PEERPIDFD`` against pid reuse,
``/proc/PID`` through the pinned directory, the caller's mount namespace and
root against ours, the executable opened and its stat recorded).  Only the
hashing of an executable whose digest is not cached is left, and it runs on a
small pool on the descriptor already opened, at most one per uid at a time
(:class:`_Hashing`): what is attested is the program the caller ran at accept,
however long the pool takes, so keeping the pool busy no longer widens a
connect-then-exec window, and one uid's huge programs delay only its own
attestations.  When the connection's first call arrives the caller must still
run that executable (:func:`peercred.recheck`), else every call gets
PERMISSION_DENIED ``attestation-failed``.  Every call on the connection waits
for its attestation and uses it: one caller's credentials are never attributed
to another, since the attestation belongs to the connection object that owns
the socket.  A connection whose attestation failed gets PERMISSION_DENIED
``attestation-failed`` for every call that needs a caller; nothing is asked of
the issuer on its behalf.

A long-lived stream keeps the identity its connection was attested with until
the client reconnects, as with any SO_PEERCRED attestor; a caller that execs
another program after its first call, or passes its socket on, lends that
identity (docs/threat-model.md, adversary 01).

Threads.  One asyncio loop in one background thread runs the connections and
the change watcher.  Issuer calls that may write (``x509_svids``,
``jwt_svids``: minting is audited) run on a pool of :data:`ISSUER_THREADS`
threads (the issuer is thread-safe; concurrent first fetches share its audit
commits), which also creates and closes the issuer; calls that never write
(bundles, ``validate_jwt``, ``change_token``, ``refresh_in``) run on a pool of
:data:`READ_THREADS` of their own, so a store locked by another process delays
only the calls that must write, however many of them wait.  A
``FetchX509SVID`` or ``FetchJWTSVID`` the issuer can answer from its cache
(``cached_x509``, ``cached_jwt``, optional; they wait at most half a
millisecond for the issuer's lock and never write) is answered on the loop
itself; a ``FetchX509SVID`` within the HTTP/2 event that completed the
request, from the serialised response kept per selector set while the issuer
hands out the same SVID objects and bundles; the stream then waits, parked
with no task of its own, until a change resumes it.  Bundle responses are
built once per change generation for every stream.

Errors.  Typed errors map to statuses with ``kind: message`` as details:
``policy-denied`` → PERMISSION_DENIED; ``stale`` and ``clock-rollback`` →
UNAVAILABLE (the client keeps its SVID and retries: Workload Endpoint §6);
``malformed`` → INVALID_ARGUMENT; any other rejection → PERMISSION_DENIED
(INVALID_ARGUMENT when validating a JWT, a wrong audience included, as
SPIRE); environment faults → UNAVAILABLE; anything else → INTERNAL, details
logged, not sent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc  # the status codes; the server below is our own
import h2.errors
import h2.events
import h2.exceptions
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes, Settings

from qhx_edge.core import spiffe
from qhx_edge.core.errors import (
    AttestationFailed,
    ClockRollback,
    EnvironmentFault,
    Malformed,
    PolicyDenied,
    QhxError,
    Rejected,
    Stale,
)
from qhx_edge.issue import peercred
from qhx_edge.issue.proto import workload_pb2 as pb

log = logging.getLogger(__name__)

SECURITY_HEADER = "workload.spiffe.io"
POLL_INTERVAL = 1.0  # longest wait between two change_token() checks
MIN_POLL_INTERVAL = 0.05
MAX_CONNECTIONS = 1024
# Connections one uid may hold at once (the kernel's uid, read at accept), so one local user cannot take every
# slot; room for a burst of one service's short-lived processes (bench/issuance.py runs 200 at once).
MAX_CONNECTIONS_PER_UID = 256
HANDSHAKE_TIMEOUT = 5.0  # seconds a new connection has to send its whole HTTP/2 preface
IDLE_TIMEOUT = 60.0  # seconds a connection may stay open with no call (PINGs are no call)
MAX_STREAMS = 128  # concurrent calls per connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS)
MAX_HEADER_LIST_SIZE = 16 << 10
MAX_REQUEST_SIZE = 64 << 10  # requests are a few hundred bytes; a JWT to validate at most 16 KiB
# Request bytes one connection may hold before its calls start: every call's body is acknowledged at
# once (so flow control never pushes back), and a caller that never ends its streams must not make the
# server buffer 128 streams x MAX_REQUEST_SIZE per connection.
MAX_BUFFERED_PER_CONNECTION = 4 * MAX_REQUEST_SIZE
ISSUER_THREADS = 16  # issuer calls that may write (mint and audit) at once: concurrent first fetches share commits
READ_THREADS = 4  # issuer calls that never write (bundles, validation, change token): never queued behind writers
ATTEST_THREADS = 4  # executables hashed at once, at most one per uid
MAX_AUDIENCES = 32  # audiences of one JWT-SVID request
MAX_AUDIENCE_BYTES = 256  # UTF-8 bytes of one audience
REFUSAL_LOG_SECONDS = 10.0  # refused connections are logged at most this often (a flood must not flood the log)
BACKLOG = 512
_T = TypeVar("_T")


# --- the issuer interface ----------------------------------------------------------------


class X509SvidLike(Protocol):
    @property
    def spiffe_id(self) -> str: ...
    @property
    def cert_chain(self) -> list[bytes]: ...  # DER, leaf first
    @property
    def private_key(self) -> bytes: ...  # PKCS#8 DER, unencrypted
    @property
    def bundle(self) -> bytes: ...  # the SVID's trust domain bundle: concatenated DER certificates
    @property
    def hint(self) -> str: ...


class JwtSvidLike(Protocol):
    @property
    def spiffe_id(self) -> str: ...
    @property
    def token(self) -> str: ...
    @property
    def hint(self) -> str: ...


class IssuerLike(Protocol):
    """What the Workload API needs from :class:`qhx_edge.issue.issuer.Issuer`.

    The server calls it from several issuer threads at once: it must be
    thread-safe.  Refusals are :class:`Rejected` subclasses: ``PolicyDenied``
    (no registration matches the selectors), ``Stale`` (expired mode),
    ``ClockRollback``; ``validate_jwt`` raises any ``Rejected`` for a bad token.
    Optional: ``close()``, called on shutdown; ``cached_x509(selectors)``, which
    returns ``(x509_svids(selectors), x509_bundles())`` or None, and
    ``cached_jwt(selectors, audience, spiffe_id)``, which returns
    ``jwt_svids(...)`` or None, both without ever blocking or writing (called
    on the event loop).  ``x509_svids`` and ``jwt_svids`` may write (an audit
    commit); every other method must not, since it runs on threads that never
    wait for the store's write lock.
    """

    def x509_svids(self, selectors: frozenset[str]) -> Sequence[X509SvidLike]: ...

    def x509_bundles(self) -> dict[str, bytes]:
        """Trust domain name -> concatenated DER CA certificates."""
        ...

    def jwt_svids(
        self, selectors: frozenset[str], audience: list[str], spiffe_id: str | None
    ) -> Sequence[JwtSvidLike]: ...

    def jwt_bundles(self) -> dict[str, bytes]:
        """Trust domain name -> JWKS JSON."""
        ...

    def validate_jwt(self, token: str, audience: str) -> tuple[str, dict[str, Any]]:
        """(SPIFFE ID, claims) of a valid JWT-SVID for ``audience``."""
        ...

    def change_token(self) -> bytes:
        """Changes whenever what a stream would send changes (rotation, bundle change, mode change)."""
        ...

    def refresh_in(self) -> float:
        """Seconds until the next scheduled change (e.g. the half-life of the shortest SVID)."""
        ...


# --- errors --------------------------------------------------------------------------------


def status_for(exc: BaseException, *, validating: bool = False) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an error raised while serving a call; details carry the error kind.

    ``validating``: the error is about the token a caller asked us to validate (a wrong audience
    included), so any rejection of it is INVALID_ARGUMENT, as SPIRE answers."""
    if isinstance(exc, Stale | ClockRollback):
        return grpc.StatusCode.UNAVAILABLE, f"{exc.kind}: {exc.message}"
    if isinstance(exc, Malformed) or (validating and isinstance(exc, Rejected)):
        return grpc.StatusCode.INVALID_ARGUMENT, f"{exc.kind}: {exc.message}"
    if isinstance(exc, PolicyDenied):
        return grpc.StatusCode.PERMISSION_DENIED, f"{exc.kind}: no identity issued ({exc.message})"
    if isinstance(exc, Rejected):
        return grpc.StatusCode.PERMISSION_DENIED, f"{exc.kind}: {exc.message}"
    if isinstance(exc, QhxError):  # environment faults: the node cannot serve right now
        return grpc.StatusCode.UNAVAILABLE, f"{exc.kind}: {exc.message}"
    return grpc.StatusCode.INTERNAL, "internal: the issuer failed (see the server log)"


def _bundle_key(name_or_id: str) -> str:
    """Bundles are keyed by the trust domain's SPIFFE ID (Workload API §5.2.2)."""
    return spiffe.trust_domain_id(spiffe.trust_domain_of(name_or_id))


def check_audiences(audience: Sequence[str]) -> None:
    """At most :data:`MAX_AUDIENCES` audiences of at most :data:`MAX_AUDIENCE_BYTES` each, else ``malformed``."""
    if len(audience) > MAX_AUDIENCES:
        raise Malformed(f"{len(audience)} audiences requested; at most {MAX_AUDIENCES} are accepted")
    for a in audience:
        if len(a.encode("utf-8", "surrogatepass")) > MAX_AUDIENCE_BYTES:
            raise Malformed(f"an audience is longer than {MAX_AUDIENCE_BYTES} bytes")


def _wire(message: Any) -> bytes:
    """A response message as the bytes it is sent as (deterministic, so equal messages compare equal)."""
    return message if isinstance(message, bytes) else bytes(message.SerializeToString(deterministic=True))


def _unique_hints(hints: list[str]) -> list[str]:
    # Workload API §5.2.1, §6.2.1: a hint, when set, is unique in a response; the first keeps it.
    seen: set[str] = set()
    out = []
    for hint in hints:
        out.append("" if hint in seen else hint)
        if hint:
            seen.add(hint)
    return out


# --- change notification ---------------------------------------------------------------------


class _Changes:
    """A generation counter that streams wait on; bumped when the issuer's change token changes."""

    def __init__(self) -> None:
        self.generation = 0
        self._cond = asyncio.Condition()

    async def bump(self) -> None:
        async with self._cond:
            self.generation += 1
            self._cond.notify_all()

    async def wait_past(self, generation: int) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.generation != generation)


# --- gRPC over HTTP/2, served by us ---------------------------------------------------------------

_PATH_PREFIX = "/SpiffeWorkloadAPI/"
_RESPONSE_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]
_STREAMING = frozenset({"FetchX509SVID", "FetchX509Bundles", "FetchJWTBundles", "FetchWITSVID", "FetchWITBundles"})
_REQUESTS: dict[str, Any] = {
    "FetchX509SVID": pb.X509SVIDRequest,
    "FetchX509Bundles": pb.X509BundlesRequest,
    "FetchJWTSVID": pb.JWTSVIDRequest,
    "FetchJWTBundles": pb.JWTBundlesRequest,
    "ValidateJWTSVID": pb.ValidateJWTSVIDRequest,
    "FetchWITSVID": pb.WITSVIDRequest,
    "FetchWITBundles": pb.WITBundlesRequest,
}
_H2_SETTINGS = {
    SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
    SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
    SettingCodes.ENABLE_PUSH: 0,
}


# Inbound headers are validated (RFC 9113 §8.2); ours are constant and valid, so outbound checks are skipped.
_H2_CONFIG = H2Configuration(
    client_side=False, header_encoding="utf-8", validate_outbound_headers=False, normalize_outbound_headers=False
)


class _Abort(Exception):
    """End the call with this status (raised inside a handler)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _grpc_message(details: str) -> str:
    """Percent-encode a status message as gRPC over HTTP/2 requires (printable ASCII but '%' as is)."""
    out = []
    for byte in details.encode("utf-8"):
        out.append(chr(byte) if 0x20 <= byte <= 0x7E and byte != 0x25 else f"%{byte:02X}")
    return "".join(out)


class _Call:
    """One gRPC call: an HTTP/2 stream of one connection."""

    __slots__ = ("body", "headers_sent", "metadata", "method", "parked", "stream_id", "task")

    def __init__(self, stream_id: int, method: str, metadata: list[tuple[str, str]]) -> None:
        self.stream_id = stream_id
        self.method = method
        self.metadata = metadata
        self.body = bytearray()
        self.headers_sent = False
        self.task: asyncio.Task[None] | None = None
        self.parked: int | None = None  # first response sent at this change generation; no task until a change


class _Connection(asyncio.Protocol):
    """One caller's connection: its attestation, its HTTP/2 state, its calls.

    The socket is the one the kernel handed to ``accept()``: its peer credentials
    are the caller's, and the attestation made from them belongs to this object
    alone, so no call can be attributed to another connection's caller.
    """

    def __init__(self, server: WorkloadApiServer) -> None:
        self._server = server
        self._h2 = H2Connection(config=_H2_CONFIG)
        self._transport: asyncio.Transport | None = None
        self._sock: Any = None
        self._calls: dict[int, _Call] = {}
        self._window = asyncio.Event()
        self._flush_due = False
        self.uid: int | None = None  # the kernel's uid of the caller, counted against its cap once admitted
        self.admitted = False
        self.attestation: asyncio.Future[peercred.Attestation] | None = None
        self._pinned: peercred.Attestation | None = None  # what accept pinned (the executable), for recheck
        self._served_one = False  # the first call arrived (and the caller was re-checked then)
        self._greeted = False  # the client's HTTP/2 preface arrived
        self._timers: list[asyncio.TimerHandle] = []
        self._last_call = 0.0  # loop time the last call started or ended

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        server = self._server
        sock = self._sock = transport.get_extra_info("socket")
        loop = asyncio.get_running_loop()
        with contextlib.suppress(QhxError, OSError):
            self.uid = peercred.peer_cred(sock).uid
        refusal = server.admit(self)
        if refusal is not None:
            server.refused(refusal)
            transport.abort()
            return
        # Attest from the accepted socket itself, at once and before our SETTINGS leave (a client that has
        # them has been attested): everything but the hashing of an executable whose digest is not cached,
        # which goes to the attestation pool on the executable already opened here (peercred.probe), so
        # what is attested is the program the caller ran at accept, however long the pool takes.
        self.attestation = loop.create_future()
        try:
            probe = peercred.probe(sock)
        except (QhxError, OSError) as exc:
            self.attestation.set_exception(exc)
        else:
            done = probe.done
            if done is not None:
                self.attestation.set_result(done)
            else:
                self.attestation = server.hashing.submit(probe)
            self._pinned = done if done is not None else probe.partial
        self.attestation.add_done_callback(server.count_attested)
        self._h2.local_settings = Settings(client=False, initial_values=_H2_SETTINGS)
        self._h2.initiate_connection()
        self._write()  # the client waits for our SETTINGS before its first call
        self._last_call = loop.time()
        self._timers = [
            loop.call_later(server.handshake_timeout, self._handshake_due),
            loop.call_later(server.idle_timeout, self._idle_due),
        ]

    def _handshake_due(self) -> None:
        if not self._greeted:
            log.info(
                "workload socket: a connection sent no HTTP/2 preface in %.1f s: closed", self._server.handshake_timeout
            )
            self._close()

    def _idle_due(self) -> None:
        """Close the connection once no call has been open for the idle timeout (a GOAWAY first)."""
        if self._transport is None or self._transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        timeout = self._server.idle_timeout
        if any(c.task is not None or c.parked is not None for c in self._calls.values()):
            self._last_call = loop.time()
            due = timeout
        else:
            due = self._last_call + timeout - loop.time()
            if due <= 0:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self._h2.close_connection()
                self._close()
                return
        self._timers[1:] = [loop.call_later(due, self._idle_due)]

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except (h2.exceptions.ProtocolError, UnicodeDecodeError) as exc:  # a header that is not UTF-8 too
            log.info("workload socket: HTTP/2 protocol error: %s", exc)
            self._flush()
            self._close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._request(event)
            elif isinstance(event, h2.events.DataReceived):
                if not self._data(event):
                    return  # the connection was closed
            elif isinstance(event, h2.events.StreamEnded):
                self._start(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self._cancel(event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._greeted = True  # the preface ends with the client's SETTINGS (RFC 9113 §3.4)
                self._window.set()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._close()
                return
        self._write()  # acknowledgements, and a first response made above, in one write

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.release(self)
        for timer in self._timers:
            timer.cancel()
        for call in list(self._calls.values()):
            self._drop(call)
        self._calls.clear()
        self._window.set()
        if self.attestation is not None and not self.attestation.done():
            self.attestation.cancel()

    def pause_writing(self) -> None:
        """The caller reads slower than we write (asyncio's write buffer is past its high-water mark):
        read nothing more from it until it catches up, so a client that never reads (a PING flood)
        cannot make the buffer grow without bound."""
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    # HTTP/2 events

    def _request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        headers = [(str(k), str(v)) for k, v in event.headers or ()]
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        content_type = next((v for k, v in headers if k == "content-type"), "")
        if pseudo.get(":method") != "POST" or not content_type.startswith("application/grpc"):
            self._h2.send_headers(sid, [(":status", "415")], end_stream=True)  # gRPC over HTTP/2: not gRPC
            return
        path = pseudo.get(":path", "")
        method = path[len(_PATH_PREFIX) :] if path.startswith(_PATH_PREFIX) else ""
        metadata = [(k, v) for k, v in headers if not k.startswith(":")]
        self._calls[sid] = _Call(sid, method, metadata)

    def _data(self, event: h2.events.DataReceived) -> bool:
        """Buffer a request body; False if the connection had to be closed for what it buffers."""
        sid = event.stream_id
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._h2.acknowledge_received_data(event.flow_controlled_length, sid)
        call = self._calls.get(sid)
        if call is None or call.task is not None or call.parked is not None:
            return True
        call.body += event.data or b""
        if len(call.body) > MAX_REQUEST_SIZE + 5:
            del self._calls[sid]
            self._trailers(call, grpc.StatusCode.RESOURCE_EXHAUSTED, "request too large")
            return True
        waiting = sum(len(c.body) for c in self._calls.values() if c.task is None and c.parked is None)
        if waiting > MAX_BUFFERED_PER_CONNECTION:
            log.info("workload socket: a connection buffered %d request bytes without ending them: closed", waiting)
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            self._close()
            return False
        return True

    def _start(self, stream_id: int) -> None:
        call = self._calls.get(stream_id)
        if call is not None and call.task is None and call.parked is None:
            if not self._served_one:
                self._served_one = True
                self._recheck()
            self._last_call = asyncio.get_running_loop().time()
            sent = self._server.first_from_cache(self, call)
            if sent is not None:  # answered: the stream waits for a change with no task of its own
                call.parked = sent
                self._server.parked[call] = self
            else:
                call.task = asyncio.get_running_loop().create_task(self._serve(call))

    def _recheck(self) -> None:
        """The first call: the caller must still run the executable pinned at accept (peercred.recheck),
        else every call of this connection fails with ``attestation-failed``."""
        if self._pinned is None or self.attestation is None:
            return  # the attestation failed already
        try:
            peercred.recheck(self._sock, self._pinned)
        except (QhxError, OSError) as exc:
            failed: asyncio.Future[peercred.Attestation] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc if isinstance(exc, QhxError) else AttestationFailed(str(exc)))
            self.attestation.cancel()  # a hashing still queued is not needed any more
            self.attestation = failed
            log.info("workload socket: uid %s: %s", self.uid, exc)

    def resume(self, call: _Call) -> None:
        """A change after a parked stream's first response: serve it on from there, as a task."""
        if self._calls.get(call.stream_id) is call and call.task is None and call.parked is not None:
            call.task = asyncio.get_running_loop().create_task(self._serve(call, call.parked))

    def _cancel(self, stream_id: int) -> None:
        call = self._calls.pop(stream_id, None)
        if call is not None:
            self._drop(call)
            self._last_call = asyncio.get_running_loop().time()

    def _drop(self, call: _Call) -> None:
        if call.task is not None:
            call.task.cancel()
        else:
            self._server.parked.pop(call, None)

    # a call

    async def _serve(self, call: _Call, sent: int | None = None) -> None:
        try:
            request = self.parse(call)
            await self._server.handle(self, call, request, sent)
        except _Abort as abort:
            self._trailers(call, abort.code, abort.details)
        except asyncio.CancelledError:
            return  # reset by the client, connection gone, or shutdown: nobody to answer
        except h2.exceptions.StreamClosedError:
            return
        except Exception:
            log.exception("workload API: unexpected error")
            self._trailers(call, grpc.StatusCode.INTERNAL, "internal: the server failed (see its log)")
        else:
            self._trailers(call, grpc.StatusCode.OK, "")
        finally:
            if self._calls.get(call.stream_id) is call:
                del self._calls[call.stream_id]
            self._last_call = asyncio.get_running_loop().time()

    @staticmethod
    def parse(call: _Call) -> Any:
        cls = _REQUESTS.get(call.method)
        if cls is None:
            raise _Abort(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {call.method!r}")
        body = bytes(call.body)
        if len(body) < 5 or int.from_bytes(body[1:5], "big") != len(body) - 5:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed: the request is not one gRPC message")
        if body[0] != 0:
            raise _Abort(grpc.StatusCode.UNIMPLEMENTED, "compressed requests are not supported")
        try:
            return cls.FromString(body[5:])
        except DecodeError:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed: not a {cls.__name__}") from None

    def send_now(self, call: _Call, message: Any) -> bool:
        """Queue one response message (or its serialised bytes) at once if the flow-control window takes all of it."""
        payload = message if isinstance(message, bytes) else message.SerializeToString()
        data = b"\x00" + len(payload).to_bytes(4, "big") + payload
        if len(data) > self._h2.local_flow_control_window(call.stream_id):
            return False
        if not call.headers_sent:
            self._h2.send_headers(call.stream_id, _RESPONSE_HEADERS)
            call.headers_sent = True
        frame = self._h2.max_outbound_frame_size
        for at in range(0, len(data), frame):
            self._h2.send_data(call.stream_id, data[at : at + frame])
        return True

    async def send(self, call: _Call, message: Any) -> None:
        """Send one response message (or its serialised bytes), within HTTP/2 flow control."""
        payload = message if isinstance(message, bytes) else message.SerializeToString()
        data = memoryview(b"\x00" + len(payload).to_bytes(4, "big") + payload)
        if not call.headers_sent:
            self._h2.send_headers(call.stream_id, _RESPONSE_HEADERS)
            call.headers_sent = True
        while data:
            if self._transport is None or self._transport.is_closing():
                raise asyncio.CancelledError
            room = min(self._h2.local_flow_control_window(call.stream_id), self._h2.max_outbound_frame_size)
            if room <= 0:
                self._flush()
                self._window.clear()
                await self._window.wait()
                continue
            self._h2.send_data(call.stream_id, data[:room].tobytes())
            data = data[room:]
        self._flush()

    def _trailers(self, call: _Call, code: grpc.StatusCode, details: str) -> None:
        trailers = [("grpc-status", str(code.value[0]))]
        if details:
            trailers.append(("grpc-message", _grpc_message(details)))
        headers = trailers if call.headers_sent else _RESPONSE_HEADERS + trailers  # else Trailers-Only
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._h2.send_headers(call.stream_id, headers, end_stream=True)
            self._flush()

    def metadata(self, call: _Call) -> list[tuple[str, str]]:
        return call.metadata

    # the connection

    def _flush(self) -> None:
        """Write what HTTP/2 has to send, once per turn of the loop: the SETTINGS acknowledgement
        and a response made in the same turn leave in one write."""
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._write)

    def _write(self) -> None:
        self._flush_due = False
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _close(self) -> None:
        if self._transport is not None:
            self._write()  # what is due (a GOAWAY) leaves before the socket closes
            self._transport.close()

    def go_away(self) -> None:
        """Shutdown: tell the client no new calls are taken, end the open ones, close."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.close_connection()
        self._flush()
        for call in list(self._calls.values()):
            if call.task is not None:
                call.task.cancel()
        self._close()


class _Hashing:
    """Executables to hash (the rest of an attestation, :meth:`peercred.Probe.finish`) on a small pool,
    at most one at a time per uid, each uid's in arrival order: a uid that queues many large programs
    delays only its own attestations.  Event loop only."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._busy: set[int] = set()
        self._waiting: dict[int, collections.deque[tuple[peercred.Probe, asyncio.Future[peercred.Attestation]]]] = {}
        self.stopping = threading.Event()

    def submit(self, probe: peercred.Probe) -> asyncio.Future[peercred.Attestation]:
        future: asyncio.Future[peercred.Attestation] = asyncio.get_running_loop().create_future()
        if probe.uid in self._busy:
            self._waiting.setdefault(probe.uid, collections.deque()).append((probe, future))
        else:
            self._start(probe, future)
        return future

    def _start(self, probe: peercred.Probe, future: asyncio.Future[peercred.Attestation]) -> None:
        self._busy.add(probe.uid)
        inner = asyncio.get_running_loop().run_in_executor(self._pool, self._finish, probe)
        inner.add_done_callback(lambda done: self._done(probe, future, done))

    def _finish(self, probe: peercred.Probe) -> peercred.Attestation:
        if self.stopping.is_set():
            probe.close()
            raise AttestationFailed("the server is stopping")
        return probe.finish()

    def _done(
        self,
        probe: peercred.Probe,
        future: asyncio.Future[peercred.Attestation],
        inner: asyncio.Future[peercred.Attestation],
    ) -> None:
        if inner.cancelled():
            probe.close()
            if not future.done():
                future.cancel()
        elif not future.done():
            exc = inner.exception()
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(inner.result())
        else:
            inner.exception()  # retrieved: the connection went away meanwhile
        queue = self._waiting.get(probe.uid)
        while queue:
            nxt, nxt_future = queue.popleft()
            if nxt_future.done():  # its connection went away (or was refused at its first call)
                nxt.close()
                continue
            self._start(nxt, nxt_future)
            return
        self._waiting.pop(probe.uid, None)
        self._busy.discard(probe.uid)

    def close(self) -> None:
        """Shutdown: what is still queued is not hashed (what runs ends on its own)."""
        self.stopping.set()
        for queue in self._waiting.values():
            for probe, future in queue:
                probe.close()
                future.cancel()
        self._waiting.clear()


# --- the server ------------------------------------------------------------------------------


class WorkloadApiServer:
    """The Workload API on ``socket_path``, served from a background thread.

    ``make_issuer`` is called once, on an issuer thread.  ``start()`` returns
    once the socket accepts connections (or raises what went wrong);
    ``stop()`` closes the socket, ends the streams and removes the socket file.
    """

    def __init__(
        self,
        make_issuer: Callable[[], IssuerLike],
        socket_path: Path,
        *,
        poll_interval: float = POLL_INTERVAL,
        max_connections: int = MAX_CONNECTIONS,
        max_connections_per_uid: int = MAX_CONNECTIONS_PER_UID,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        grace: float = 0.5,
    ) -> None:
        self.socket_path = Path(socket_path)
        self._make_issuer = make_issuer
        self._poll_interval = poll_interval
        self.max_connections = max_connections
        self.max_connections_per_uid = max_connections_per_uid
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self._grace = grace
        self._issuer: IssuerLike | None = None
        self._issuer_pool = ThreadPoolExecutor(max_workers=ISSUER_THREADS, thread_name_prefix="qhx-issuer")
        self._read_pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="qhx-issuer-read")
        self.attest_pool = ThreadPoolExecutor(max_workers=ATTEST_THREADS, thread_name_prefix="qhx-attest")
        self.hashing = _Hashing(self.attest_pool)
        self.open_connections: set[_Connection] = set()
        self.per_uid: dict[int | None, int] = {}  # open connections by the caller's uid (None: unknown)
        self._refusals = 0  # refused connections not logged yet
        self._refusal_logged = 0.0
        # bundle responses by method, shared by every stream at one change generation (event loop only)
        self._shared: dict[str, tuple[int, asyncio.Future[bytes]]] = {}
        self.parked: dict[_Call, _Connection] = {}  # streams answered from the cache, waiting for a change
        # selectors -> (SVIDs, bundles, serialised response): see cached_x509_svid_response (event loop only)
        self._x509_wire: dict[frozenset[str], tuple[tuple[Any, ...], dict[str, bytes], bytes]] = {}
        self.accepted = 0  # connections attested since start
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._kick: asyncio.Event | None = None
        self._changes: _Changes | None = None
        self._listener: socket.socket | None = None
        self._listener_ino: int | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # lifecycle

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name="qhx-workload-api", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise self._startup_error

    def stop(self) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join()

    def notify(self) -> None:
        """Check the issuer's change token now rather than at the next poll (thread-safe)."""
        loop, kick = self._loop, self._kick
        if loop is not None and kick is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(kick.set)

    def __enter__(self) -> WorkloadApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connections(self) -> int:
        """Connections currently open (for tests and status)."""
        return len(self.open_connections)

    def count_attested(self, future: asyncio.Future[peercred.Attestation]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.accepted += 1

    def admit(self, conn: _Connection) -> str | None:
        """Take a slot for ``conn``, or say why not: the server's cap, or its uid's (event loop only)."""
        if len(self.open_connections) >= self.max_connections:
            return f"{len(self.open_connections)} connections open"
        held = self.per_uid.get(conn.uid, 0)
        if held >= self.max_connections_per_uid:
            return f"uid {conn.uid} holds {held} connections"
        self.open_connections.add(conn)
        self.per_uid[conn.uid] = held + 1
        conn.admitted = True
        return None

    def release(self, conn: _Connection) -> None:
        if conn.admitted:
            conn.admitted = False
            self.open_connections.discard(conn)
            left = self.per_uid.get(conn.uid, 1) - 1
            if left > 0:
                self.per_uid[conn.uid] = left
            else:
                self.per_uid.pop(conn.uid, None)

    def refused(self, reason: str) -> None:
        """Log refused connections, at most once per :data:`REFUSAL_LOG_SECONDS` (a flood is counted, not logged)."""
        self._refusals += 1
        now = asyncio.get_running_loop().time()
        if now - self._refusal_logged >= REFUSAL_LOG_SECONDS:
            log.warning("workload socket: refused %d connection(s), the last one because %s", self._refusals, reason)
            self._refusals = 0
            self._refusal_logged = now

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        finally:
            if self._issuer is not None and callable(getattr(self._issuer, "close", None)):
                with contextlib.suppress(Exception):
                    self._issuer_pool.submit(self._issuer.close).result()  # type: ignore[attr-defined]
            self._issuer_pool.shutdown(wait=True, cancel_futures=True)
            self._read_pool.shutdown(wait=True, cancel_futures=True)
            self.hashing.stopping.set()
            self.attest_pool.shutdown(wait=True)  # what is queued ends at once, closing what it holds
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._kick = asyncio.Event()
        self._changes = _Changes()
        try:
            await self._startup()
        except BaseException as exc:
            self._startup_error = exc
            await self._shutdown()
            return
        self._ready.set()
        await self._stopping.wait()
        await self._shutdown()

    async def _startup(self) -> None:
        loop = asyncio.get_running_loop()
        self._issuer = await loop.run_in_executor(self._issuer_pool, self._make_issuer)
        token: bytes | None = None
        with contextlib.suppress(Exception):  # the watcher logs it if it persists
            token = await self._reading(self._issuer.change_token)
        self._listener, self._listener_ino = _listen(self.socket_path)
        self._server = await loop.create_unix_server(lambda: _Connection(self), sock=self._listener, backlog=BACKLOG)
        self._tasks = [asyncio.create_task(self._watch(token))]

    async def _shutdown(self) -> None:
        self.hashing.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        elif self._listener is not None:
            self._listener.close()
        if self._listener is not None:
            with contextlib.suppress(OSError):  # remove the socket file only if it is still ours
                if os.lstat(self.socket_path).st_ino == self._listener_ino:
                    os.unlink(self.socket_path)
        for conn in list(self.open_connections):
            conn.go_away()
        await asyncio.sleep(0)  # let the transports close
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), self._grace)

    # change detection

    async def _watch(self, token: bytes | None) -> None:
        assert self._issuer is not None
        assert self._kick is not None
        assert self._changes is not None
        while True:
            delay = self._poll_interval
            try:
                current: bytes | None = await self._reading(self._issuer.change_token)
            except Exception:  # an issuer that cannot tell is in a new state too: streams re-evaluate once
                if token is not None:
                    log.exception("workload API: the issuer's change token failed")
                current = None
            if current != token:
                token = current
                await self._changes.bump()
                parked, self.parked = self.parked, {}
                for call, conn in parked.items():
                    conn.resume(call)
            with contextlib.suppress(Exception):
                delay = min(delay, await self._reading(self._issuer.refresh_in))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), max(delay, MIN_POLL_INTERVAL))
            self._kick.clear()

    # the service (on the event loop)

    def first_from_cache(self, conn: _Connection, call: _Call) -> int | None:
        """A FetchX509SVID's first response, sent from within the event that completed the request, when
        everything it needs is at hand: the connection attested, the security header right, the
        issuer's cache holding the caller's SVIDs (``cached_x509``), the window open.  Returns the
        change generation it was built at (the stream continues from there), or None: then the call
        is served from the start as any other, and says why it fails, if it does."""
        attestation = conn.attestation
        if (
            call.method != "FetchX509SVID"
            or self._changes is None
            or attestation is None
            or not attestation.done()
            or attestation.cancelled()
            or attestation.exception() is not None
        ):
            return None
        seen = self._changes.generation
        try:
            conn.parse(call)
            self.check_header(call)
            message = self.cached_x509_svid_response(attestation.result().selectors)
            if message is None or not conn.send_now(call, message):
                return None
        except Exception:  # the call's own task answers it properly
            return None
        return seen

    async def handle(self, conn: _Connection, call: _Call, request: Any, sent: int | None = None) -> None:
        """Serve one call; returning ends it with OK, :class:`_Abort` with that status.  ``sent``: a first
        FetchX509SVID response already went out (:meth:`first_from_cache`) at that change generation."""
        method = call.method
        if method in ("FetchWITSVID", "FetchWITBundles"):
            self.check_header(call)
            raise _Abort(grpc.StatusCode.UNIMPLEMENTED, "the WIT-SVID profile is not supported")
        if method == "FetchX509SVID":
            selectors = await self.caller(conn, call)
            await self.stream(
                conn,
                call,
                lambda: self.x509_svid_response(selectors),
                cached=lambda: self.cached_x509_svid_response(selectors),
                sent=sent,
            )
        elif method == "FetchX509Bundles":
            await self.caller(conn, call)
            await self.stream(conn, call, self.x509_bundles_response, shared=method)
        elif method == "FetchJWTBundles":
            await self.caller(conn, call)
            await self.stream(conn, call, self.jwt_bundles_response, shared=method)
        elif method == "FetchJWTSVID":
            selectors = await self.caller(conn, call)
            audience = list(request.audience)
            if not audience or not all(audience):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
            self.inline(lambda: check_audiences(audience))
            wanted = request.spiffe_id or None
            if wanted is not None and not wanted.startswith("spiffe://"):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid requested SPIFFE ID")
            message = self.inline(lambda: self.cached_jwt_svid_response(selectors, audience, wanted))
            if message is None:  # something to mint: on a thread that may wait for the store
                message = await self.call(lambda: self.jwt_svid_response(selectors, audience, wanted))
            await conn.send(call, message)
        elif method == "ValidateJWTSVID":
            await self.caller(conn, call)
            if not request.audience:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
            if not request.svid:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
            token, aud = request.svid, request.audience
            self.inline(lambda: check_audiences([aud]))
            await conn.send(
                call, await self.call(lambda: self.validate_response(token, aud), validating=True, reads=True)
            )
        else:  # pragma: no cover - parse refuses every other method
            raise _Abort(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method!r}")

    async def _blocking(self, fn: Callable[[], _T]) -> _T:
        """``fn`` on an issuer thread that may wait for the store's write lock (minting, auditing)."""
        return await asyncio.get_running_loop().run_in_executor(self._issuer_pool, fn)

    async def _reading(self, fn: Callable[[], _T]) -> _T:
        """``fn`` (which never writes) on a thread of its own pool: never queued behind calls that write."""
        return await asyncio.get_running_loop().run_in_executor(self._read_pool, fn)

    @staticmethod
    def check_header(call: _Call) -> None:
        # Workload Endpoint §3: exactly the value "true" (case sensitive), else InvalidArgument (§6).
        values = [v for k, v in call.metadata if k == SECURITY_HEADER]
        if values != ["true"]:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")

    async def caller(self, conn: _Connection, call: _Call) -> frozenset[str]:
        """The selectors of this call's caller (its connection's attestation), after the security header check."""
        self.check_header(call)
        assert conn.attestation is not None
        try:
            attestation = await asyncio.shield(conn.attestation)
        except QhxError as exc:
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED, f"{exc.kind}: {exc.message}") from None
        except OSError as exc:
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED, f"attestation-failed: {exc}") from None
        return attestation.selectors

    async def call(self, fn: Callable[[], _T], *, validating: bool = False, reads: bool = False) -> _T:
        """Run ``fn`` on an issuer thread (``reads``: one that never waits for writers); an error becomes
        the call's status."""
        try:
            return await (self._reading(fn) if reads else self._blocking(fn))
        except Exception as exc:
            code, details = status_for(exc, validating=validating)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("workload API: unexpected error")
            raise _Abort(code, details) from None

    async def stream(
        self,
        conn: _Connection,
        call: _Call,
        build: Callable[[], Any],
        *,
        cached: Callable[[], Any] | None = None,
        sent: int | None = None,
        shared: str | None = None,
    ) -> None:
        """The current message, then the message again after every change that changes it, until the
        client goes away.

        ``cached`` (non-blocking) may give the message on the event loop; when it gives None,
        ``build`` runs on an issuer thread.  ``sent``: the first message already went out, built at
        that change generation.  ``shared``: ``build`` never writes and gives every caller the same
        message (bundles): it is built once per change generation for every stream, on the read pool.
        A message equal to the one this stream sent last is not sent again: an SVID rotation does not
        wake bundle streams' clients."""
        assert self._changes is not None
        last: bytes | None = None
        if sent is not None:
            await self._changes.wait_past(sent)
        while True:
            seen = self._changes.generation  # read before building: a change meanwhile re-sends
            if shared is not None:
                payload = await self.shared_response(shared, seen, build)
            else:
                message = self.inline(cached) if cached is not None else None
                payload = _wire(message if message is not None else await self.call(build))
            if payload != last:
                await conn.send(call, payload)
                last = payload
            await self._changes.wait_past(seen)

    async def shared_response(self, key: str, generation: int, build: Callable[[], Any]) -> bytes:
        """``build()``'s bytes at this change generation, built once for every stream that asks."""
        held = self._shared.get(key)
        if held is None or held[0] != generation:
            future = asyncio.ensure_future(self._build_shared(build))
            held = self._shared[key] = (generation, future)

            def forget_failure(done: asyncio.Future[bytes], entry: tuple[int, asyncio.Future[bytes]] = held) -> None:
                failed = done.cancelled() or done.exception() is not None
                if failed and self._shared.get(key) is entry:  # a failure is not kept: the next stream asks again
                    del self._shared[key]

            future.add_done_callback(forget_failure)
        try:
            return await asyncio.shield(held[1])
        except _Abort as abort:
            raise _Abort(abort.code, abort.details) from None  # one exception object per stream

    async def _build_shared(self, build: Callable[[], Any]) -> bytes:
        return _wire(await self.call(build, reads=True))

    @staticmethod
    def inline(fn: Callable[[], _T]) -> _T:
        """Run a non-blocking issuer call on the event loop; an error becomes the call's status."""
        try:
            return fn()
        except Exception as exc:
            code, details = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("workload API: unexpected error")
            raise _Abort(code, details) from None

    # responses (run on the issuer thread)

    def _issuer_now(self) -> IssuerLike:
        assert self._issuer is not None
        return self._issuer

    def x509_svid_response(self, selectors: frozenset[str]) -> pb.X509SVIDResponse:
        issuer = self._issuer_now()
        return self._x509_svid_message(issuer.x509_svids(selectors), issuer.x509_bundles())

    def cached_x509_svid_response(self, selectors: frozenset[str]) -> bytes | None:
        """The serialised response from the issuer's cache, on the event loop, if it can give it without
        blocking.  The bytes are kept per selector set while the issuer hands out the very same SVID
        objects and bundles (the entry holds them, so they cannot be freed and their identity reused)."""
        cached = getattr(self._issuer_now(), "cached_x509", None)
        parts = cached(selectors) if cached is not None else None
        if parts is None:
            return None
        svids, bundles = parts
        held = self._x509_wire.get(selectors)
        if (
            held is not None
            and held[1] == bundles
            and len(held[0]) == len(svids)
            and all(a is b for a, b in zip(held[0], svids, strict=True))
        ):
            return held[2]
        wire: bytes = self._x509_svid_message(svids, bundles).SerializeToString()
        if len(self._x509_wire) >= self.max_connections:
            del self._x509_wire[next(iter(self._x509_wire))]
        self._x509_wire[selectors] = (tuple(svids), bundles, wire)
        return wire

    @staticmethod
    def _x509_svid_message(svids: Sequence[X509SvidLike], bundles: dict[str, bytes]) -> pb.X509SVIDResponse:
        if not svids:
            raise PolicyDenied("no registration matches the caller")
        own = {spiffe.trust_domain_of(s.spiffe_id) for s in svids}
        federated = {_bundle_key(td): der for td, der in bundles.items() if spiffe.trust_domain_of(td) not in own}
        hints = _unique_hints([s.hint for s in svids])
        return pb.X509SVIDResponse(
            svids=[
                pb.X509SVID(
                    spiffe_id=s.spiffe_id,
                    x509_svid=b"".join(s.cert_chain),
                    x509_svid_key=s.private_key,
                    bundle=s.bundle,
                    hint=hint,
                )
                for s, hint in zip(svids, hints, strict=True)
            ],
            federated_bundles=federated,
        )

    def x509_bundles_response(self) -> pb.X509BundlesResponse:
        bundles = {_bundle_key(td): der for td, der in self._issuer_now().x509_bundles().items()}
        if not bundles:
            raise PolicyDenied("no trust bundle is available yet")
        return pb.X509BundlesResponse(bundles=bundles)

    def jwt_svid_response(
        self, selectors: frozenset[str], audience: list[str], wanted: str | None
    ) -> pb.JWTSVIDResponse:
        return self._jwt_svid_message(self._issuer_now().jwt_svids(selectors, audience, wanted), wanted)

    def cached_jwt_svid_response(
        self, selectors: frozenset[str], audience: list[str], wanted: str | None
    ) -> pb.JWTSVIDResponse | None:
        """The response from the issuer's cache, on the event loop, if it can give it without blocking."""
        cached = getattr(self._issuer_now(), "cached_jwt", None)
        svids = cached(selectors, audience, wanted) if cached is not None else None
        return None if svids is None else self._jwt_svid_message(svids, wanted)

    @staticmethod
    def _jwt_svid_message(svids: Sequence[JwtSvidLike], wanted: str | None) -> pb.JWTSVIDResponse:
        if wanted is not None:
            svids = [s for s in svids if s.spiffe_id == wanted]
        if not svids:
            raise PolicyDenied("no registration matches the caller" + (f" for {wanted}" if wanted else ""))
        hints = _unique_hints([s.hint for s in svids])
        return pb.JWTSVIDResponse(
            svids=[
                pb.JWTSVID(spiffe_id=s.spiffe_id, svid=s.token, hint=hint) for s, hint in zip(svids, hints, strict=True)
            ]
        )

    def jwt_bundles_response(self) -> pb.JWTBundlesResponse:
        bundles = {_bundle_key(td): jwks for td, jwks in self._issuer_now().jwt_bundles().items()}
        if not bundles:
            raise PolicyDenied("no JWT bundle is available yet")
        return pb.JWTBundlesResponse(bundles=bundles)

    def validate_response(self, token: str, audience: str) -> pb.ValidateJWTSVIDResponse:
        spiffe_id, claims = self._issuer_now().validate_jwt(token, audience)
        response = pb.ValidateJWTSVIDResponse(spiffe_id=spiffe_id)
        try:
            response.claims.update(claims)
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # a claim Struct cannot hold
            raise Malformed(f"JWT-SVID claims cannot be returned: {exc}") from None
        return response


def _listen(path: Path) -> tuple[socket.socket, int]:
    """Bind the public socket (mode 0666), replacing a stale socket file but never a live server's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise EnvironmentFault(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            os.unlink(path)  # left behind by a server that is gone
        else:
            raise EnvironmentFault(f"{path}: another server is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o666)  # noqa: S103 - any local user may ask; attestation decides what it gets
        sock.listen(512)
        sock.setblocking(False)
        return sock, os.lstat(path).st_ino
    except OSError as exc:
        sock.close()
        raise EnvironmentFault(f"cannot listen on {path}: {exc.strerror or exc}") from exc


def serve_forever(make_issuer: Callable[[], IssuerLike], socket_path: Path, on_ready: Callable[[], None]) -> None:
    """Serve until SIGTERM or SIGINT (the ``serve`` command); call from the main thread."""
    _raise_fd_limit()
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with WorkloadApiServer(make_issuer, socket_path):
            # Everything made so far (the issuer's snapshot, modules) lives as long as the server:
            # leave it out of every later garbage collection, which then scans only per-call objects.
            gc.freeze()
            on_ready()
            while not stop.wait(1.0):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_fd_limit() -> None:
    # Each client holds three descriptors (public, proxy and gRPC ends): lift the soft limit to the hard one.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
