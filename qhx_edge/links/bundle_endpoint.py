"""The SPIFFE bundle endpoint: our domain's SPIFFE bundle over HTTPS, and a client for one
(SPIFFE Federation §4, §5; docs/architecture.md, "Bundle endpoint").

Server (:class:`BundleEndpoint`): answers ``GET <path>`` with the bundle its ``bundle`` source
returns at that moment (the source re-reads the store when the held bundle changed), as
``application/json``; the TLS credential comes from its ``credential`` source, polled every
:data:`CREDENTIAL_POLL` seconds and, for a short-lived SVID, at half its lifetime, so a
rotated SVID (or a replaced certificate file) is served before the old one expires.  The two
profiles (§5.2) differ only in that credential: ``https_spiffe`` an X509-SVID of our domain,
``https_web`` an operator's certificate (:class:`FileCredential`).  TLS is
:mod:`qhx_edge.links.tls`: TLS 1.3 only (stricter than the Mozilla intermediate profile §5
asks for: SPIRE and go-spiffe speak TLS 1.3), no client authentication (§5.2.1.3, §5.2.2.3).

HTTP/1.1, minimal and strict, one request per connection (``Connection: close``):

* the handshake and the whole request head must arrive within :data:`REQUEST_TIMEOUT` seconds
  (else the connection is closed, with ``408`` once TLS is up);
* a request line over :data:`MAX_REQUEST_LINE` bytes is ``414``, a head over
  :data:`MAX_HEAD` bytes or :data:`MAX_HEADERS` fields ``431``;
* a malformed request line or field, an obsolete line folding, a missing or repeated ``Host``,
  any body (``Content-Length`` other than 0, ``Transfer-Encoding``) is ``400``; a version other
  than HTTP/1.0 or 1.1 ``505``; a method other than ``GET`` ``405`` (with ``Allow: GET``); a
  path other than the configured one ``404`` (a query is ignored);
* at most :data:`MAX_CONNECTIONS` connections at once; more are closed at once;
* the response is sent, then close_notify, then the server waits up to :data:`LINGER_SECONDS`
  for the client to close, so the response is never lost to a reset.

Client (:func:`fetch`): ``https`` URLs without userinfo (§5.2.1.1, §5.2.2.1); ``https_web``
verifies the server certificate against the given CA certificates and the URL's host (RFC
6125); ``https_spiffe`` verifies the server's X509-SVID against the given bundle's X.509
authorities and the expected endpoint SPIFFE ID (§5.2.2.4).  Redirects are not followed (§7.5.1
lets a client disable them); any status but 200 is refused; the body is read strictly as a
SPIFFE bundle (:func:`qhx_edge.core.spiffe_bundle.parse`).  Which bundle authenticates the next
fetch (the last one fetched, for a self-serving endpoint) is the caller's choice.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import re
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import trio
from OpenSSL import SSL

from qhx_edge.core import spiffe_bundle
from qhx_edge.core.errors import EnvironmentFault, Malformed, Oversize, QhxError, Unreachable, printable
from qhx_edge.links import tls
from qhx_edge.store import clock
from qhx_edge.store.files import read_capped

log = logging.getLogger(__name__)

HTTPS_WEB = "https_web"
HTTPS_SPIFFE = "https_spiffe"
PROFILES = (HTTPS_WEB, HTTPS_SPIFFE)
DEFAULT_PATH = "/"
MAX_REQUEST_LINE = 2048
MAX_HEAD = 8192
MAX_HEADERS = 32
REQUEST_TIMEOUT = 10.0
LINGER_SECONDS = 2.0
MAX_CONNECTIONS = 64
CREDENTIAL_POLL = 30.0  # seconds between two looks at the credential source
CREDENTIAL_RETRY = 5.0  # after a failed look
MAX_RESPONSE = spiffe_bundle.MAX_BUNDLE_BYTES + MAX_HEAD
FETCH_TIMEOUT = 30.0

BundleSource = Callable[[], bytes]
"""The SPIFFE bundle to serve now (JWK Set bytes); may block (it reads the store), run on a thread."""
CredentialSource = Callable[[], tls.Credential]
"""The TLS credential to serve with now; may block (minting an SVID), run on a thread."""

_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class HttpRefusal(Exception):
    """A request the endpoint answers with an error status (``status``, a one-line ``message``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


def _is_token(text: str) -> bool:
    return bool(text) and all(c in _TOKEN for c in text)


def parse_head(head: bytes) -> Request:
    """The request line and fields of ``head`` (without the final empty line); :class:`HttpRefusal`
    for everything the module docstring refuses (RFC 9112 §2-§6)."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError as exc:
        raise HttpRefusal(400, "the request head is not ASCII") from exc
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _is_token(parts[0]) or not parts[1]:
        raise HttpRefusal(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/"):
            raise HttpRefusal(505, f"{version} is not served (HTTP/1.1)")
        raise HttpRefusal(400, "malformed request line")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpRefusal(431, f"more than {MAX_HEADERS} header fields")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            raise HttpRefusal(400, "obsolete line folding is not accepted")
        name, sep, value = line.partition(":")
        if not sep or not _is_token(name):
            raise HttpRefusal(400, "malformed header field")
        value = value.strip(" \t")
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
            raise HttpRefusal(400, "control characters in a header field")
        headers.append((name.lower(), value))
    names = [n for n, _ in headers]
    if version == "HTTP/1.1" and names.count("host") != 1:
        raise HttpRefusal(400, "an HTTP/1.1 request carries exactly one Host field")
    if "transfer-encoding" in names or any(n == "content-length" and v != "0" for n, v in headers):
        raise HttpRefusal(400, "a bundle request has no body")
    if method != "GET":
        raise HttpRefusal(405, f"{method} is not served: only GET")
    if not target.startswith("/"):
        raise HttpRefusal(400, "the request target must be a path (origin-form)")
    return Request(method, target, version, tuple(headers))


def response(status: int, body: bytes, content_type: str, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{k}: {v}" for k, v in extra),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def _refusal(exc: HttpRefusal) -> bytes:
    extra = [("Allow", "GET")] if exc.status == 405 else []
    return response(exc.status, (exc.message + "\n").encode(), "text/plain; charset=utf-8", extra)


async def _read_head(stream: trio.abc.ReceiveStream) -> bytes:
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            if end > MAX_HEAD:
                raise HttpRefusal(431, f"the request head exceeds {MAX_HEAD} bytes")
            head = bytes(buf[:end])
            first = head.find(b"\r\n")
            if (first if first >= 0 else len(head)) > MAX_REQUEST_LINE:
                raise HttpRefusal(414, f"the request line exceeds {MAX_REQUEST_LINE} bytes")
            return head
        line_end = buf.find(b"\r\n")
        if (line_end < 0 and len(buf) > MAX_REQUEST_LINE) or line_end > MAX_REQUEST_LINE:
            raise HttpRefusal(414, f"the request line exceeds {MAX_REQUEST_LINE} bytes")
        if len(buf) > MAX_HEAD:
            raise HttpRefusal(431, f"the request head exceeds {MAX_HEAD} bytes")
        data = await stream.receive_some(4096)
        if not data:
            raise HttpRefusal(400, "the connection ended before the request head did")
        buf += data


class FileCredential:
    """An ``https_web`` credential from PEM files (chain, leaf first; unencrypted key), re-read at each
    look, so a replaced certificate is served from the next poll on."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key

    def __call__(self) -> tls.Credential:
        try:
            cert = read_capped(self.cert, tls.MAX_PEM, "certificate file")
            key = read_capped(self.key, tls.MAX_PEM, "key file")
        except OSError as exc:
            raise EnvironmentFault(f"cannot read the endpoint's certificate or key: {exc}") from exc
        return tls.Credential.from_pem(cert, key)


class BundleEndpoint:
    """The bundle endpoint on ``host:port`` (``port`` 0: any free port; :attr:`address` once serving)."""

    def __init__(
        self,
        bundle: BundleSource,
        credential: CredentialSource,
        *,
        host: str,
        port: int,
        path: str = DEFAULT_PATH,
        groups: Sequence[str] = tls.DEFAULT_GROUPS,
        request_timeout: float = REQUEST_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        credential_poll: float = CREDENTIAL_POLL,
    ) -> None:
        if not path.startswith("/"):
            raise Malformed(f"the bundle endpoint path must start with '/', not {path!r}")
        tls.make_context(server=True, groups=groups)  # an unknown group fails here, not per connection
        self._bundle, self._credential = bundle, credential
        self.host, self.port, self.path, self.groups = host, port, path, tuple(groups)
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.credential_poll = credential_poll
        self.address: tuple[str, int] | None = None
        self.credential: tls.Credential | None = None
        self._context: SSL.Context | None = None
        self._active = 0
        self._limiter = trio.CapacityLimiter(2)  # store reads and minting, off the event loop
        self.served = 0

    async def _look(self) -> None:
        cred = await trio.to_thread.run_sync(self._credential, limiter=self._limiter)
        if self.credential is None or cred.chain != self.credential.chain:
            self._context = tls.make_context(cred, server=True, groups=self.groups)
            self.credential = cred
            log.info("bundle endpoint: serving with a certificate valid until %s", cred.not_after)

    def _next_look(self) -> float:
        cred = self.credential
        if cred is None:
            return CREDENTIAL_RETRY
        half = cred.not_before + (cred.not_after - cred.not_before) // 2
        return max(1.0, min(self.credential_poll, half - clock.now()))

    async def _keep_credential(self) -> None:
        while True:
            await trio.sleep(self._next_look())
            try:
                await self._look()
            except QhxError as exc:
                cred = self.credential
                left = cred.not_after - clock.now() if cred is not None else 0
                log.warning("bundle endpoint: no new credential (%s: %s); the held one has %d s left",
                            exc.kind, exc.message, left)  # fmt: skip
                await trio.sleep(CREDENTIAL_RETRY)

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started((host, port))`` once listening with a credential."""
        await self._look()  # no credential at all: the typed error stops the start
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        except OSError as exc:
            raise EnvironmentFault(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        sockname = listeners[0].socket.getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_credential)
            task_status.started(self.address)
            await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    async def _connection(self, tcp: trio.SocketStream) -> None:
        if self._active >= self.max_connections or self._context is None:
            await trio.aclose_forcefully(tcp)
            return
        self._active += 1
        stream = tls.TlsStream(tcp, self._context, server_side=True)
        try:
            await self._exchange(stream)
        finally:
            self._active -= 1
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: tls.TlsStream) -> None:
        answer: bytes | None = None
        with trio.move_on_after(self.request_timeout):
            try:
                await stream.do_handshake()
            except (QhxError, trio.BrokenResourceError) as exc:
                log.debug("bundle endpoint: handshake refused: %s", exc)
                return
            try:
                answer = await self._answer(stream)
            except HttpRefusal as exc:
                log.info("bundle endpoint: refused a request: %s %s", exc.status, exc.message)
                answer = _refusal(exc)
            except trio.BrokenResourceError:
                return
        if answer is None:  # the deadline passed first
            answer = _refusal(HttpRefusal(408, f"the request did not arrive within {self.request_timeout:g} s"))
        with trio.move_on_after(self.request_timeout), contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(answer)
            await stream.send_eof()
            with trio.move_on_after(LINGER_SECONDS):  # until the client closes: a reset must not eat the answer
                while await stream.receive_some():
                    pass

    async def _answer(self, stream: tls.TlsStream) -> bytes:
        request = parse_head(await _read_head(stream))
        if request.path != self.path:
            raise HttpRefusal(404, "no bundle here")
        return await self._bundle_response()

    async def _bundle_response(self) -> bytes:
        try:
            body = await trio.to_thread.run_sync(self._bundle, limiter=self._limiter)
        except QhxError as exc:
            log.warning("bundle endpoint: no bundle to serve (%s: %s)", exc.kind, exc.message)
            raise HttpRefusal(503, "no bundle to serve") from exc
        self.served += 1
        return response(200, body, "application/json")


class EndpointThread:
    """A :class:`BundleEndpoint` on a trio loop in a thread of its own, beside the Workload API's."""

    def __init__(self, endpoint: BundleEndpoint) -> None:
        self.endpoint = endpoint
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None

    def start(self) -> tuple[str, int]:
        """Start serving; the bound address, or the error that stopped the start."""
        self._thread = threading.Thread(target=self._run, name="qhx-bundle-endpoint", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        assert self.endpoint.address is not None
        return self.endpoint.address

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # handed to start(), or logged once serving
            if not self._ready.is_set():
                while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                    exc = exc.exceptions[0]
                self._error = exc
            else:
                log.exception("bundle endpoint stopped")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                await nursery.start(self.endpoint.serve)
                self._ready.set()

    def stop(self) -> None:
        if self._token is not None and self._scope is not None and self._thread is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> EndpointThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the client -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetched:
    """A SPIFFE bundle fetched from an endpoint: its bytes, what they say, and the TLS it came over."""

    data: bytes
    bundle: spiffe_bundle.SpiffeBundle
    group: str | None
    peer_chain: tuple[bytes, ...]


def _split_url(url: str) -> tuple[str, int, str]:
    try:
        parts = urllib.parse.urlsplit(url)
        port = 443 if parts.port is None else parts.port
    except ValueError as exc:
        raise Malformed(f"not a bundle endpoint URL: {url!r} ({exc})") from exc
    if parts.scheme != "https" or not parts.hostname:
        raise Malformed(f"a bundle endpoint URL is https://HOST[:PORT][/PATH], not {url!r}")
    if "@" in parts.netloc:
        raise Malformed("a bundle endpoint URL has no userinfo (SPIFFE Federation §5.2.1.1)")
    if not 0 < port < 65536:
        raise Malformed(f"a bundle endpoint URL's port is 1 to 65535, not {port}")
    try:
        ipaddress.ip_address(parts.hostname)
    except ValueError:
        if not _HOST.fullmatch(parts.hostname):
            raise Malformed(
                f"a bundle endpoint host is an IP address or an ASCII DNS name (IDNA A-labels), not {parts.hostname!r}"
            ) from None
    if not _URL_CHARS.fullmatch(parts.path + parts.query):
        raise Malformed(f"a bundle endpoint URL's path and query are RFC 3986 characters: {url!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, target


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})*", re.ASCII)
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*", re.ASCII)


def _parse_response(data: bytes, url: str, target: str = "/") -> bytes:
    """The body of the whole HTTP/1.1 response ``data`` (the server closed after it), read by h11:
    ``Content-Length`` or ``chunked`` (Go's net/http, hence SPIRE, chunks a bundle over 2 KiB), a
    truncated body refused; a redirect or any status but 200 is ``malformed``."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    conn.send(h11.Request(method="GET", target=target, headers=[("Host", "endpoint")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")  # the connection ended after these bytes
    response: h11.Response | None = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise Malformed(f"{url} sent a malformed HTTP response: {exc}") from exc
        if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            raise Malformed(f"{url} ended its HTTP response early")
        if isinstance(event, h11.Response):
            response = event
            names = {name for name, _ in event.headers}
            if b"transfer-encoding" in names and b"content-length" in names:  # RFC 9112 §6.3: an error
                raise Malformed(f"{url} sent both Transfer-Encoding and Content-Length (response splitting?)")
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    assert response is not None
    if conn.trailing_data[0]:
        raise Malformed(f"{url} sent {len(conn.trailing_data[0])} bytes after its HTTP response")
    status = response.status_code
    if 300 <= status < 400:
        location = printable(dict(response.headers).get(b"location", b"").decode("latin-1"))
        raise Malformed(f"{url} redirects ({status}) to {location!r}: redirects are not followed")
    if status != 200:
        # The endpoint's own words, shown but never able to drive the operator's terminal.
        said = printable(bytes(body[:200]).decode("utf-8", "replace").strip())
        raise Malformed(f"{url} answered {status} {printable(response.reason.decode('latin-1'))}: {said}")
    return bytes(body)


async def fetch_async(
    url: str,
    profile: str,
    *,
    ca_certs: Sequence[bytes] = (),
    endpoint_bundle: spiffe_bundle.SpiffeBundle | None = None,
    endpoint_id: str | None = None,
    groups: Sequence[str] = tls.DEFAULT_GROUPS,
    timeout: float = FETCH_TIMEOUT,
    now: Callable[[], int] = clock.now,
) -> Fetched:
    """Fetch the SPIFFE bundle at ``url`` over ``profile`` (see the module docstring)."""
    host, port, target = _split_url(url)
    if profile == HTTPS_WEB:
        if not ca_certs:
            raise Malformed("https_web needs the CA certificates that vouch for the endpoint")
        verify = tls.web_verifier(ca_certs, host, now=now)
    elif profile == HTTPS_SPIFFE:
        if endpoint_bundle is None or endpoint_id is None:
            raise Malformed("https_spiffe needs the endpoint's SPIFFE ID and the bundle of its trust domain")
        verify = tls.spiffe_verifier(endpoint_bundle.x509_authorities, endpoint_id, now=now)
    else:
        raise Malformed(f"unknown bundle endpoint profile {profile!r} (https_web or https_spiffe)")
    authority = f"[{host}]" if ":" in host else host
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {authority}:{port}\r\nAccept: application/json\r\n"
        "Cache-Control: no-cache\r\nUser-Agent: qhx-edge\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    context = tls.make_context(server=False, groups=groups)
    with trio.move_on_after(timeout) as scope:
        stream = await tls.connect(host, port, context, verify)
        async with stream:
            await stream.send_all(request)
            data = bytearray()
            with contextlib.suppress(trio.BrokenResourceError):  # an unclean end: the length check decides
                while chunk := await stream.receive_some():
                    data += chunk
                    if len(data) > MAX_RESPONSE:
                        raise Oversize(f"{url} sent more than {MAX_RESPONSE} bytes")
        body = _parse_response(bytes(data), url, target)
        return Fetched(body, spiffe_bundle.parse(body), stream.group, stream.peer_chain)
    assert scope.cancelled_caught
    raise Unreachable(f"{url}: no bundle within {timeout:g} s")


def check_url(url: str) -> str:
    """``url`` if it is a bundle endpoint URL (``https``, a host, no userinfo), else :class:`Malformed`."""
    _split_url(url)
    return url


def fetch(url: str, profile: str, **options: Any) -> Fetched:
    """:func:`fetch_async` on a trio loop of its own; connection failures are ``unreachable``."""
    try:
        return trio.run(functools.partial(fetch_async, url, profile, **options))
    except (trio.BrokenResourceError, OSError) as exc:
        raise Unreachable(f"{url}: {exc}") from exc
