"""The SPIFFE Workload API on a Unix socket (issue 4, point 6; docs/issuance.md §5).

Wire.  The standard ``SpiffeWorkloadAPI`` service (``qhx_edge/issue/proto/workload.proto``)
at ``/SpiffeWorkloadAPI/<Method>``, so stock SPIFFE clients work unchanged.
Every call must carry the metadata ``workload.spiffe.io: true``, else
INVALID_ARGUMENT (Workload Endpoint §3, §6).  ``FetchX509SVID``,
``FetchX509Bundles`` and ``FetchJWTBundles`` send the current message at once
and again whenever the issuer's ``change_token()`` changes (Workload API §4.3);
the WIT-SVID profile answers UNIMPLEMENTED (§7).  Bundles are keyed by the
trust domain's SPIFFE ID (``spiffe://td``).  A caller with no identity gets
PERMISSION_DENIED ``no identity issued``; bundles and JWT validation need an
attested caller but no identity (bundles are public; SPIRE's
``allow_unauthenticated_verifiers``).

Who is calling.  grpcio gives a handler no access to the connection's socket:
``context.peer()`` of a Unix socket client is just ``unix:``, and
``auth_context()``, even with local credentials, holds only the security level
-- grpc core never reads ``SO_PEERCRED`` (grpc/grpc#15511, #28755).  So the
server owns the public socket and hands each connection to gRPC itself::

    workload ─► public socket ─► accept proxy ─────────► private socket ─► grpc.aio server
                (mode 0666)      peercred.attest(conn)   (0700 directory)   context.peer()
                                 bind \\0qhx-edge-…, record peer → attestation

For each accepted connection the proxy attests the caller from the accepted
socket (:mod:`qhx_edge.issue.peercred`, at accept time), binds a fresh client socket
to a new abstract address, records ``unix-abstract:<name>`` → attestation,
connects to the private gRPC socket and pipes bytes both ways.  gRPC reports
that bound address as ``context.peer()`` of every call on the connection, so a
handler finds exactly the attestation of the connection its call came on.
One caller's credentials are never attributed to another:

* one public connection ↔ one private connection ↔ one name, and names are
  never reused (a counter plus 64 random bits), so no entry can outlive its
  connection into another's;
* an entry is recorded before the private connect and removed before its
  socket is closed, so while it exists the name is bound by our own socket
  and the kernel lets no other socket bind it;
* only the server's uid can reach the private socket (0700 directory); a call
  whose peer has no entry -- one that bypassed the proxy, or an unbound
  ``unix:`` peer -- is refused (PERMISSION_DENIED, ``attestation-failed``);
* the proxy and the handlers run on one event loop thread: no lock, no window.

Attestation is made once per connection, at accept time (so a pid cannot be
recycled under it); a long-lived stream keeps the identity its connection was
attested with until the client reconnects, as with any SO_PEERCRED attestor.

Threads.  One asyncio loop in one background thread runs the proxy, the
grpc.aio server and the change watcher.  Attestation (reading /proc, hashing)
runs in a small pool; every issuer call runs on *one* dedicated thread, which
also creates the issuer: the issuer is never called concurrently, and always
from the thread that made it (sqlite connections are bound to their thread).

Errors.  Typed errors map to statuses with ``kind: message`` as details:
``policy-denied`` → PERMISSION_DENIED; ``stale`` and ``clock-rollback`` →
UNAVAILABLE (the client keeps its SVID and retries: Workload Endpoint §6);
``malformed`` → INVALID_ARGUMENT; any other rejection → PERMISSION_DENIED
(INVALID_ARGUMENT when validating a JWT, as SPIRE); environment faults →
UNAVAILABLE; anything else → INTERNAL, details logged, not sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import tempfile
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from grpc import aio

from qhx_edge.core import spiffe
from qhx_edge.core.errors import (
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
from qhx_edge.issue.proto import workload_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SECURITY_HEADER = "workload.spiffe.io"
POLL_INTERVAL = 1.0  # longest wait between two change_token() checks
MIN_POLL_INTERVAL = 0.05
MAX_CONNECTIONS = 1024
MAX_REQUEST_SIZE = 1 << 20  # requests are a few hundred bytes; a JWT to validate a few KiB
_PIPE_CHUNK = 1 << 16
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

    The server creates the issuer on one dedicated thread and calls it only
    from there, one call at a time.  Refusals are :class:`Rejected` subclasses:
    ``PolicyDenied`` (no registration matches the selectors), ``Stale``
    (expired mode), ``ClockRollback``; ``validate_jwt`` raises any ``Rejected``
    for a bad token.  An optional ``close()`` is called on shutdown.
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
    """The gRPC status for an error raised while serving a call; details carry the error kind."""
    if isinstance(exc, PolicyDenied):
        return grpc.StatusCode.PERMISSION_DENIED, f"{exc.kind}: no identity issued ({exc.message})"
    if isinstance(exc, Stale | ClockRollback):
        return grpc.StatusCode.UNAVAILABLE, f"{exc.kind}: {exc.message}"
    if isinstance(exc, Malformed):
        return grpc.StatusCode.INVALID_ARGUMENT, f"{exc.kind}: {exc.message}"
    if isinstance(exc, Rejected):
        code = grpc.StatusCode.INVALID_ARGUMENT if validating else grpc.StatusCode.PERMISSION_DENIED
        return code, f"{exc.kind}: {exc.message}"
    if isinstance(exc, QhxError):  # environment faults: the node cannot serve right now
        return grpc.StatusCode.UNAVAILABLE, f"{exc.kind}: {exc.message}"
    return grpc.StatusCode.INTERNAL, "internal: the issuer failed (see the server log)"


async def _abort(context: Any, code: grpc.StatusCode, details: str) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("grpc abort returned")  # pragma: no cover


def _bundle_key(name_or_id: str) -> str:
    """Bundles are keyed by the trust domain's SPIFFE ID (Workload API §5.2.2)."""
    return spiffe.trust_domain_id(spiffe.trust_domain_of(name_or_id))


def _unique_hints(hints: list[str]) -> list[str]:
    # Workload API §5.2.1, §6.2.1: a hint, when set, is unique in a response; the first keeps it.
    seen: set[str] = set()
    out = []
    for hint in hints:
        out.append("" if hint in seen else hint)
        if hint:
            seen.add(hint)
    return out


# --- the gRPC service -------------------------------------------------------------------------


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


class _Service(pb_grpc.SpiffeWorkloadAPIServicer):
    def __init__(self, server: WorkloadApiServer) -> None:
        self._s = server

    async def FetchX509SVID(  # noqa: N802 - gRPC method names
        self, request: pb.X509SVIDRequest, context: Any
    ) -> AsyncIterator[pb.X509SVIDResponse]:
        selectors = await self._s.caller(context)
        async with contextlib.aclosing(self._s.stream(context, lambda: self._s.x509_svid_response(selectors))) as it:
            async for msg in it:
                yield msg

    async def FetchX509Bundles(  # noqa: N802
        self, request: pb.X509BundlesRequest, context: Any
    ) -> AsyncIterator[pb.X509BundlesResponse]:
        await self._s.caller(context)
        async with contextlib.aclosing(self._s.stream(context, self._s.x509_bundles_response)) as it:
            async for msg in it:
                yield msg

    async def FetchJWTSVID(self, request: pb.JWTSVIDRequest, context: Any) -> pb.JWTSVIDResponse:  # noqa: N802
        selectors = await self._s.caller(context)
        audience = list(request.audience)
        if not audience or not all(audience):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        wanted = request.spiffe_id or None
        if wanted is not None and not wanted.startswith("spiffe://"):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid requested SPIFFE ID")
        return await self._s.call(context, lambda: self._s.jwt_svid_response(selectors, audience, wanted))

    async def FetchJWTBundles(  # noqa: N802
        self, request: pb.JWTBundlesRequest, context: Any
    ) -> AsyncIterator[pb.JWTBundlesResponse]:
        await self._s.caller(context)
        async with contextlib.aclosing(self._s.stream(context, self._s.jwt_bundles_response)) as it:
            async for msg in it:
                yield msg

    async def ValidateJWTSVID(  # noqa: N802
        self, request: pb.ValidateJWTSVIDRequest, context: Any
    ) -> pb.ValidateJWTSVIDResponse:
        await self._s.caller(context)
        if not request.audience:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
        token, audience = request.svid, request.audience
        return await self._s.call(context, lambda: self._s.validate_response(token, audience), validating=True)

    async def FetchWITSVID(self, request: pb.WITSVIDRequest, context: Any) -> AsyncIterator[pb.WITSVIDResponse]:  # noqa: N802
        await self._s.check_header(context)
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "the WIT-SVID profile is not supported")
        yield pb.WITSVIDResponse()  # pragma: no cover - makes this an async generator

    async def FetchWITBundles(  # noqa: N802
        self, request: pb.WITBundlesRequest, context: Any
    ) -> AsyncIterator[pb.WITBundlesResponse]:
        await self._s.check_header(context)
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "the WIT-SVID profile is not supported")
        yield pb.WITBundlesResponse()  # pragma: no cover


# --- the server ------------------------------------------------------------------------------


class WorkloadApiServer:
    """The Workload API on ``socket_path``, served from a background thread.

    ``make_issuer`` is called once, on the issuer thread.  ``start()`` returns
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
        grace: float = 0.5,
    ) -> None:
        self.socket_path = Path(socket_path)
        self._make_issuer = make_issuer
        self._poll_interval = poll_interval
        self._max_connections = max_connections
        self._grace = grace
        self._issuer: IssuerLike | None = None
        self._issuer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qhx-issuer")
        self._attest_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="qhx-attest")
        self._peers: dict[str, peercred.Attestation] = {}
        self._names = itertools.count()
        self.accepted = 0  # connections attested and proxied since start
        self._conns: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._kick: asyncio.Event | None = None
        self._changes: _Changes | None = None
        self._listener: socket.socket | None = None
        self._listener_ino: int | None = None
        self._private_dir: str | None = None
        self._private_path = ""
        self._grpc: Any = None
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
        """Proxied connections currently open (for tests and status)."""
        return len(self._peers)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        finally:
            if self._issuer is not None and callable(getattr(self._issuer, "close", None)):
                with contextlib.suppress(Exception):
                    self._issuer_pool.submit(self._issuer.close).result()  # type: ignore[attr-defined]
            self._issuer_pool.shutdown(wait=True, cancel_futures=True)
            self._attest_pool.shutdown(wait=True, cancel_futures=True)
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
            token = await self._blocking(self._issuer.change_token)
        # The private gRPC socket, reachable only by this uid.
        self._private_dir = tempfile.mkdtemp(prefix="qhx-edge-wl-")
        self._private_path = os.path.join(self._private_dir, "grpc.sock")
        self._grpc = aio.server(options=[("grpc.max_receive_message_length", MAX_REQUEST_SIZE)])
        pb_grpc.add_SpiffeWorkloadAPIServicer_to_server(_Service(self), self._grpc)  # type: ignore[no-untyped-call]
        self._grpc.add_insecure_port("unix:" + self._private_path)
        await self._grpc.start()
        self._listener, self._listener_ino = _listen(self.socket_path)
        self._tasks = [asyncio.create_task(self._accept()), asyncio.create_task(self._watch(token))]

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(OSError):  # remove the socket file only if it is still ours
                if os.lstat(self.socket_path).st_ino == self._listener_ino:
                    os.unlink(self.socket_path)
        if self._grpc is not None:
            await self._grpc.stop(self._grace)
        for conn in list(self._conns):
            conn.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)

    # the accept proxy

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as exc:  # out of descriptors or memory: shed load, keep serving
                log.warning("workload socket: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if len(self._conns) >= self._max_connections:
                log.warning("workload socket: %d connections open, refusing one", len(self._conns))
                conn.close()
                continue
            task = asyncio.create_task(self._proxy(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _proxy(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        up: socket.socket | None = None
        peer = ""
        try:
            try:
                attestation = await loop.run_in_executor(self._attest_pool, peercred.attest, conn)
            except QhxError as exc:
                log.info("workload socket: %s", exc.message)
                return
            name = f"qhx-edge-{os.getpid()}-{next(self._names)}-{secrets.token_hex(8)}"
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            up.setblocking(False)
            up.bind("\0" + name)  # a name clash (EADDRINUSE) fails this connection, never shares a name
            peer = "unix-abstract:" + name  # how grpc reports this socket as the call's peer
            self._peers[peer] = attestation
            self.accepted += 1
            await loop.sock_connect(up, self._private_path)
            await asyncio.gather(self._pump(conn, up), self._pump(up, conn))
        except OSError as exc:
            log.info("workload socket: connection dropped: %s", exc)
        except Exception:
            log.exception("workload socket: connection failed")
        finally:
            self._peers.pop(peer, None)  # before `up` closes and its name can be bound again
            if up is not None:
                up.close()
            conn.close()

    @staticmethod
    async def _pump(src: socket.socket, dst: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await loop.sock_recv(src, _PIPE_CHUNK):
                await loop.sock_sendall(dst, data)
        except OSError:
            pass  # reset by either side: end this direction, the other follows
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    # change detection

    async def _watch(self, token: bytes | None) -> None:
        assert self._issuer is not None
        assert self._kick is not None
        assert self._changes is not None
        while True:
            delay = self._poll_interval
            try:
                current: bytes | None = await self._blocking(self._issuer.change_token)
            except Exception:  # an issuer that cannot tell is in a new state too: streams re-evaluate once
                if token is not None:
                    log.exception("workload API: the issuer's change token failed")
                current = None
            if current != token:
                token = current
                await self._changes.bump()
            with contextlib.suppress(Exception):
                delay = min(delay, await self._blocking(self._issuer.refresh_in))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), max(delay, MIN_POLL_INTERVAL))
            self._kick.clear()

    # helpers for the service

    async def _blocking(self, fn: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._issuer_pool, fn)

    async def check_header(self, context: Any) -> None:
        # Workload Endpoint §3: exactly the value "true" (case sensitive), else InvalidArgument (§6).
        values = [v for k, v in (context.invocation_metadata() or ()) if k == SECURITY_HEADER]
        if values != ["true"]:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")

    async def caller(self, context: Any) -> frozenset[str]:
        """The selectors of the caller of this call, after the security header check."""
        await self.check_header(context)
        attestation = self._peers.get(context.peer())
        if attestation is None:
            await _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "attestation-failed: caller not attested (connect through the workload socket)",
            )
        return attestation.selectors

    async def call(self, context: Any, fn: Callable[[], _T], *, validating: bool = False) -> _T:
        """Run ``fn`` on the issuer thread; an error becomes the call's status."""
        try:
            return await self._blocking(fn)
        except Exception as exc:
            code, details = status_for(exc, validating=validating)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("workload API: unexpected error")
            await _abort(context, code, details)

    async def stream(self, context: Any, build: Callable[[], _T]) -> AsyncGenerator[_T, None]:
        """The current message, then a new one after every change, until the client goes away."""
        assert self._changes is not None
        while True:
            seen = self._changes.generation  # read before building: a change meanwhile re-sends
            yield await self.call(context, build)
            await self._changes.wait_past(seen)

    # responses (run on the issuer thread)

    def _issuer_now(self) -> IssuerLike:
        assert self._issuer is not None
        return self._issuer

    def x509_svid_response(self, selectors: frozenset[str]) -> pb.X509SVIDResponse:
        issuer = self._issuer_now()
        svids = issuer.x509_svids(selectors)
        if not svids:
            raise PolicyDenied("no registration matches the caller")
        own = {spiffe.trust_domain_of(s.spiffe_id) for s in svids}
        federated = {
            _bundle_key(td): der for td, der in issuer.x509_bundles().items() if spiffe.trust_domain_of(td) not in own
        }
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
        svids = self._issuer_now().jwt_svids(selectors, audience, wanted)
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
        response.claims.update(claims)
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
