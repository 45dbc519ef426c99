"""TLS 1.3 over any trio stream: pyOpenSSL through memory BIOs (RFC 8446; docs/architecture.md, "Bundle endpoint").

:class:`TlsStream` is a :class:`trio.abc.HalfCloseableStream` over another trio stream (a TCP
connection, or a memory stream in tests).  OpenSSL never touches a socket: it is given the
bytes that arrive (``bio_write``) and hands back the bytes to send (``bio_read``), and this
module moves them over the transport.  The rules:

* **TLS 1.3 only**, both ways: a peer that offers or accepts only older versions is refused
  with ``downgrade``.  Key exchange groups are configurable (:data:`DEFAULT_GROUPS`, or
  :data:`PQ_GROUPS` for X25519MLKEM768 alone, draft-ietf-tls-ecdhe-mlkem); a peer with no
  group in common is refused with ``downgrade`` too.  :attr:`TlsStream.group` says which group
  was negotiated.
* **Credentials** (:class:`Credential`) come from PEM: a certificate chain (leaf first) and an
  unencrypted PKCS#8 key, ECDSA or ML-DSA (ML-DSA signature schemes in TLS 1.3:
  draft-ietf-tls-mldsa).  The key must be the leaf's.
* **Peer verification** is the caller's: OpenSSL is told to accept any chain, and once the
  handshake is complete, before any application byte is read or written, the stream hands the
  peer's DER chain (leaf first) to a :data:`PeerVerifier` (in a worker thread: it may read a
  store), which raises a typed error to refuse it.  OpenSSL still checks the peer's proof of
  possession (CertificateVerify).  A client must have a verifier; :func:`spiffe_verifier` checks
  an X509-SVID against a trust bundle and an expected SPIFFE ID (SPIFFE X509-SVID §5,
  :mod:`qhx_edge.core.svid`), :func:`web_verifier` a Web PKI certificate against CA certificates
  and a host name or IP address (RFC 6125, RFC 5280, with ``cryptography``'s path validation).  A
  server with a verifier requires a client certificate (mutual TLS).
* **Resumption** (RFC 8446 §2.2, ``psk_dhe_ke`` only: every resumed handshake still runs the
  configured key exchange, so it keeps forward secrecy and X25519MLKEM768): a server context made
  with ``resumption=SECONDS`` keeps the sessions of completed handshakes in its own memory (stateful
  tickets: a ticket is only an identity, where a stateless one would carry the peer's certificate
  and cost the link its bytes again), and :class:`ServerContexts` bounds how many it keeps.  A
  client passes the :attr:`TlsStream.session` of an earlier connection to :func:`connect`.  A
  resumed handshake sends no certificate, but the peer verifier still runs, on the chain the
  session recorded, under the verifier's current trust, revocations and time: resumption saves
  bytes and signatures, never a check.  A session ended without close_notify is not resumable.
* **Closing**: :meth:`TlsStream.send_eof` sends close_notify and the stream may go on
  receiving (TLS 1.3 allows half-close, RFC 8446 §6.1); :meth:`TlsStream.aclose` sends
  close_notify unless that is impossible (a send in progress, a broken stream), then closes
  the transport.  A transport that ends without the peer's close_notify is
  ``BrokenResourceError`` (a truncation), never a clean end.

Handshake failures are typed (:mod:`qhx_edge.core.errors`): ``downgrade`` (no TLS 1.3, no
common group or signature scheme), ``bad-signature`` (a certificate or signature OpenSSL
refused), ``malformed`` (anything else, e.g. a peer that does not speak TLS); the verifier's
own errors pass unchanged.  A transport that fails or ends mid-handshake is trio's
``BrokenResourceError``, as it is after the handshake.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import verification
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib

from qhx_edge.core import svid
from qhx_edge.core.errors import BadSignature, Downgrade, Expired, Malformed, NotYetValid, ScopeViolation
from qhx_edge.store import clock

PQ_GROUPS = ("X25519MLKEM768",)
# Post-quantum first; the classical groups for peers that lack it (Go offers X25519MLKEM768 by default).
DEFAULT_GROUPS = ("X25519MLKEM768", "X25519", "secp256r1")
RECEIVE_SIZE = 65536  # bytes asked of the transport at a time (four full TLS records)
MAX_PEM = 256 * 1024
ALERT_SECONDS = 1.0  # how long a refused handshake may take to send its alert

PeerVerifier = Callable[[list[bytes]], None]
"""Called with the peer's DER chain (leaf first) after the handshake; raises a typed error to refuse it."""


# --- credentials and contexts ---------------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """A certificate chain (DER, leaf first) and its private key (PKCS#8 DER, unencrypted)."""

    chain: tuple[bytes, ...]
    key: bytes

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> Credential:
        """From PEM files: the chain (leaf first) and an unencrypted private key; ``malformed`` otherwise."""
        if len(cert_pem) > MAX_PEM or len(key_pem) > MAX_PEM:
            raise Malformed("certificate or key file too large")
        chain = svid.load_chain(cert_pem)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise Malformed(f"not an unencrypted PEM private key: {exc}") from exc
        der = key.private_bytes(Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        return cls.from_der(chain, der)

    @classmethod
    def from_der(cls, chain: Sequence[bytes], key: bytes) -> Credential:
        """From a DER chain (leaf first) and a PKCS#8 DER key, which must be the leaf's."""
        if not chain:
            raise Malformed("a credential needs at least one certificate")
        try:
            leaf = x509.load_der_x509_certificate(chain[0])
            private = serialization.load_der_private_key(key, password=None)
        except (ValueError, TypeError) as exc:
            raise Malformed(f"not a certificate and key: {exc}") from exc
        spki = PublicFormat.SubjectPublicKeyInfo
        if private.public_key().public_bytes(Encoding.DER, spki) != leaf.public_key().public_bytes(Encoding.DER, spki):
            raise Malformed("the private key is not the key of the certificate")
        return cls(tuple(chain), key)

    @property
    def not_after(self) -> int:
        return int(x509.load_der_x509_certificate(self.chain[0]).not_valid_after_utc.timestamp())

    @property
    def not_before(self) -> int:
        return int(x509.load_der_x509_certificate(self.chain[0]).not_valid_before_utc.timestamp())


def _accept_any(conn: SSL.Connection, cert: Any, errnum: int, depth: int, ok: int) -> bool:
    return True  # the PeerVerifier decides, on the whole chain, once the handshake is complete


def _groups(groups: Sequence[str]) -> bytes:
    if not groups or any(not g or not g.isascii() or ":" in g or not g.isprintable() for g in groups):
        raise Malformed(f"TLS groups must be a non-empty list of group names, not {list(groups)!r}")
    return ":".join(groups).encode("ascii")


def make_context(
    credential: Credential | None = None,
    *,
    server: bool,
    groups: Sequence[str] = DEFAULT_GROUPS,
    require_client_certificate: bool = False,
    resumption: int = 0,
) -> SSL.Context:
    """An OpenSSL context for TLS 1.3 only, with ``groups`` and ``credential``; ``malformed`` for an
    unknown group or a key that does not fit.  A server context with ``resumption`` > 0 lets clients
    resume its sessions for that many seconds (see the module docstring); a client needs nothing."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    if server and resumption > 0:
        ctx.set_options(SSL.OP_NO_TICKET)  # in TLS 1.3: stateful tickets, the session stays here
        ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        ctx.set_session_id(b"qhx-edge")  # required with client certificates; names what resumes
        ctx.set_timeout(resumption)
    else:
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)  # a client resumes only the session it is given
    if _lib.SSL_CTX_set1_curves_list(ctx._context, _groups(groups)) != 1:  # = SSL_CTX_set1_groups_list
        raise Malformed(f"this OpenSSL does not know every TLS group of {list(groups)}")
    mode = SSL.VERIFY_PEER
    if server and require_client_certificate:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    if not server or require_client_certificate:
        ctx.set_verify(mode, _accept_any)
    if credential is not None:
        certs = [x509.load_der_x509_certificate(d) for d in credential.chain]
        try:
            ctx.use_certificate(certs[0])
            for c in certs[1:]:
                ctx.add_extra_chain_cert(c)
            pkey = crypto.load_privatekey(crypto.FILETYPE_ASN1, credential.key)  # any key OpenSSL reads: ML-DSA too
            # pyOpenSSL's use_privatekey takes only classical cryptography keys (or a deprecated PKey).
            if _lib.SSL_CTX_use_PrivateKey(ctx._context, pkey._pkey) != 1:
                raise Malformed("OpenSSL refused the private key")
            ctx.check_privatekey()
        except (SSL.Error, crypto.Error) as exc:
            raise Malformed(f"OpenSSL refused the certificate or key: {exc}") from exc
    return ctx


class ServerContexts:
    """Server contexts that resume sessions, one for the current credential, with a bound on what
    they keep: OpenSSL's session cache holds the peer chains of up to 20,480 sessions, so after
    ``generation`` verified handshakes (the caller says so with :meth:`verified`) the next connection
    starts a fresh context (the old cache goes with the connections still using it; its clients make
    one full handshake again).  Refused connections do not count: their sessions leave the cache
    when they end without close_notify, and a flood of them must not push verified peers' sessions
    out.  A new credential also starts a fresh context.  Call it from one thread (a listener's event
    loop)."""

    def __init__(
        self,
        *,
        groups: Sequence[str] = DEFAULT_GROUPS,
        require_client_certificate: bool = False,
        resumption: int = 12 * 3600,
        generation: int = 2048,
    ) -> None:
        self.groups, self.require_client_certificate = tuple(groups), require_client_certificate
        self.resumption, self.generation = resumption, generation
        self._credential: Credential | None = None
        self._context: SSL.Context | None = None
        self._served = 0
        self.generations = 0

    def __call__(self, credential: Credential) -> SSL.Context:
        """The context for one new connection with ``credential``."""
        if self._context is None or credential != self._credential or self._served >= self.generation:
            self._context = make_context(
                credential, server=True, groups=self.groups,
                require_client_certificate=self.require_client_certificate, resumption=self.resumption,
            )  # fmt: skip
            self._credential, self._served = credential, 0
            self.generations += 1
        return self._context

    def verified(self) -> None:
        """A handshake on the current context passed its peer verifier: its session stays cached."""
        self._served += 1


# --- verifiers ------------------------------------------------------------------------------


def spiffe_verifier(
    authorities: Sequence[bytes], expected_id: str, *, now: Callable[[], int] = clock.now
) -> PeerVerifier:
    """Accept an X509-SVID chain that verifies up to one of ``authorities`` (DER, the X.509 authorities
    of the expected ID's trust domain) and names exactly ``expected_id`` (SPIFFE Federation §5.2.2.4)."""
    roots = tuple(authorities)

    def verify(chain: list[bytes]) -> None:
        got = svid.verify_x509_svid(chain, roots, now())
        if got != expected_id:
            raise ScopeViolation(f"the peer presented an SVID for {got}, not for {expected_id}")

    return verify


def web_verifier(cas: Sequence[bytes], host: str, *, now: Callable[[], int] = clock.now) -> PeerVerifier:
    """Accept a server certificate chain that leads to one of ``cas`` (DER) and names ``host`` (a DNS
    name or an IP address) in its subject alternative names (RFC 6125, RFC 5280)."""
    try:
        store = verification.Store([x509.load_der_x509_certificate(c) for c in cas])
    except ValueError as exc:
        raise Malformed(f"not a CA certificate: {exc}") from exc
    subject: x509.DNSName | x509.IPAddress
    try:
        subject = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = x509.DNSName(host)

    def verify(chain: list[bytes]) -> None:
        try:
            certs = [x509.load_der_x509_certificate(c) for c in chain]
        except ValueError as exc:
            raise Malformed(f"the server's certificate does not parse: {exc}") from exc
        when = dt.datetime.fromtimestamp(now(), dt.UTC)
        leaf = certs[0]
        if when < leaf.not_valid_before_utc:
            raise NotYetValid(
                f"the server's certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"
            )
        if when >= leaf.not_valid_after_utc:
            raise Expired(f"the server's certificate expired at {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
        verifier = verification.PolicyBuilder().store(store).time(when).build_server_verifier(subject)
        try:
            verifier.verify(leaf, certs[1:])
        except verification.VerificationError as exc:
            raise BadSignature(f"the server's certificate does not verify for {host}: {exc}") from exc

    return verify


# --- the stream -----------------------------------------------------------------------------


def _reasons(exc: SSL.Error) -> str:
    args = exc.args[0] if exc.args else None
    if isinstance(args, list) and args and all(isinstance(a, tuple) and len(a) == 3 for a in args):
        return "; ".join(str(a[2]) for a in args)
    return str(exc) or type(exc).__name__


def _handshake_error(exc: SSL.Error) -> BaseException:
    if isinstance(exc, SSL.SysCallError):
        return trio.BrokenResourceError("the peer closed the connection during the TLS handshake")
    why = _reasons(exc)
    low = why.lower()
    if any(k in low for k in ("unsupported protocol", "alert protocol version", "no protocols available")):
        return Downgrade(f"TLS handshake refused: the peer does not speak TLS 1.3 ({why})")
    if any(k in low for k in ("key share", "shared group", "handshake failure", "no shared", "signature algorithm")):
        return Downgrade(
            f"TLS handshake refused: no key exchange group or signature scheme in common with the peer ({why})"
        )
    if any(k in low for k in ("certificate", "signature", "decrypt error")):
        return BadSignature(f"TLS handshake refused: {why}")
    return Malformed(f"TLS handshake failed: {why}")


_OK, _BROKEN, _CLOSED = "ok", "broken", "closed"


class TlsStream(trio.abc.HalfCloseableStream):
    """TLS 1.3 over ``transport`` (see the module docstring).

    The handshake runs on :meth:`do_handshake`, or on the first send or receive.  One task may
    send (``send_all``, ``send_eof``, ``wait_send_all_might_not_block``) while another receives;
    two at once on one side is ``BusyResourceError``.  A cancelled send breaks the stream (part
    of a record may have gone out); a cancelled receive loses nothing.
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        context: SSL.Context,
        *,
        server_side: bool,
        verify_peer: PeerVerifier | None = None,
        server_hostname: str | None = None,
        session: SSL.Session | None = None,
    ) -> None:
        if not server_side and verify_peer is None:
            raise ValueError("a TLS client must verify its peer (verify_peer)")
        self.transport = transport
        self._conn = SSL.Connection(context, None)
        if server_side:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()
            if session is not None:
                self._conn.set_session(session)
            if server_hostname:
                try:
                    ipaddress.ip_address(server_hostname)
                except ValueError:  # a DNS name: send it as SNI (RFC 6066 §3 allows no IP literal there)
                    self._conn.set_tlsext_host_name(server_hostname.encode("idna"))
        self._verify = verify_peer
        self._server_side = server_side
        self._handshake_lock = trio.Lock()
        self._send_lock = trio.Lock()  # records leave in the order OpenSSL wrote them
        self._handshook = False
        self._sending = False
        self._receiving = False
        self._eof_sent = False
        self._eof_received = False
        self._state = _OK
        self.peer_chain: tuple[bytes, ...] = ()

    # --- what was negotiated -----------------------------------------------------------------

    @property
    def group(self) -> str | None:
        """The key exchange group of the handshake (``X25519MLKEM768``, ``x25519``, ...)."""
        return self._conn.get_group_name()

    @property
    def version(self) -> str:
        return self._conn.get_protocol_version_name()

    @property
    def cipher(self) -> str | None:
        return self._conn.get_cipher_name()

    @property
    def resumed(self) -> bool:
        """Whether the handshake resumed an earlier session (no certificates crossed the link)."""
        return bool(_lib.SSL_session_reused(self._conn._ssl))

    @property
    def session(self) -> SSL.Session | None:
        """A client's session to resume on the next :func:`connect` to the same server: only after a
        verified handshake and while the stream is not broken (OpenSSL forgets a session that ends
        without close_notify); None otherwise.  Take it after the server has sent something (its
        session tickets come with its first send)."""
        if self._server_side or not self._handshook or self._state == _BROKEN:
            return None
        return self._conn.get_session()

    # --- moving bytes --------------------------------------------------------------------------

    def _check(self) -> None:
        if self._state == _CLOSED:
            raise trio.ClosedResourceError("this TLS stream is closed")
        if self._state == _BROKEN:
            raise trio.BrokenResourceError("this TLS stream is broken")

    def _failed(self, exc: BaseException) -> BaseException:
        if self._state == _CLOSED:
            return trio.ClosedResourceError("this TLS stream was closed")
        self._state = _BROKEN
        return trio.BrokenResourceError(f"the transport under this TLS stream failed: {exc!r}")

    async def _flush(self) -> None:
        """Send everything OpenSSL has written, in order."""
        async with self._send_lock:
            while True:
                try:
                    data = self._conn.bio_read(1 << 20)
                except SSL.WantReadError:
                    return
                try:
                    await self.transport.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise self._failed(exc) from exc
                except BaseException:
                    if self._state == _OK:
                        self._state = _BROKEN  # part of a record may have left
                    raise

    async def _feed(self) -> None:
        """Give OpenSSL the next bytes from the transport (its end, at the transport's end)."""
        try:
            data = await self.transport.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._failed(exc) from exc
        if data:
            self._conn.bio_write(data)
        else:
            self._conn.bio_shutdown()

    # --- the handshake ---------------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the handshake and the peer verification (once; later calls return at once)."""
        self._check()
        async with self._handshake_lock:
            if self._handshook:
                return
            self._check()
            try:
                await self._handshake()
            except BaseException as exc:
                if self._state == _CLOSED and not isinstance(exc, trio.Cancelled):
                    raise trio.ClosedResourceError("this TLS stream was closed during the handshake") from exc
                if self._state == _OK:
                    self._state = _BROKEN
                raise
            self._handshook = True

    async def _handshake(self) -> None:
        while True:
            try:
                self._conn.do_handshake()
                done = True
            except SSL.WantReadError:
                done = False
            except SSL.Error as exc:
                failure = _handshake_error(exc)
                self._state = _BROKEN
                with trio.move_on_after(ALERT_SECONDS):  # tell the peer why (the alert OpenSSL wrote)
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self._flush_raw()
                raise failure from exc
            if done:
                if not self._server_side:
                    await self._flush()  # the client's Finished
                # A server's last write is its session tickets: they leave with its first send, so a
                # client that reads nothing yet never holds the server up.
                break
            await self._flush()
            await self._feed()
        self.peer_chain = self._peer_der_chain()
        if self._verify is not None:
            if not self.peer_chain:
                raise BadSignature("the peer presented no certificate")
            # Off the event loop: a verifier may read a store (and wait on its lock), and OpenSSL hands
            # it any chain, even a stranger's self-signed one; other connections must go on meanwhile.
            await trio.to_thread.run_sync(self._verify, list(self.peer_chain))

    async def _flush_raw(self) -> None:
        while True:
            try:
                data = self._conn.bio_read(1 << 20)
            except SSL.WantReadError:
                return
            await self.transport.send_all(data)

    def _peer_der_chain(self) -> tuple[bytes, ...]:
        leaf = self._conn.get_peer_certificate(as_cryptography=True)
        if leaf is None:
            return ()
        first = leaf.public_bytes(Encoding.DER)
        # A client's view of the chain holds the leaf, a server's does not (SSL_get_peer_cert_chain).
        rest = [c.public_bytes(Encoding.DER) for c in self._conn.get_peer_cert_chain(as_cryptography=True) or []]
        if rest and rest[0] == first:
            rest = rest[1:]
        return (first, *rest)

    async def _ready(self) -> None:
        if self._handshook:
            await trio.lowlevel.checkpoint()
        else:
            await self.do_handshake()
        self._check()

    # --- trio.abc.HalfCloseableStream ------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        self._sending = True
        try:
            self._check()
            await self._ready()
            if self._eof_sent:
                raise trio.ClosedResourceError("this TLS stream has sent its close_notify (send_eof)")
            if data:
                try:
                    self._conn.sendall(bytes(data))
                except SSL.Error as exc:
                    self._state = _BROKEN
                    raise trio.BrokenResourceError(f"TLS failed: {_reasons(exc)}") from exc
            await self._flush()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        self._sending = True
        try:
            self._check()
            try:
                await self.transport.wait_send_all_might_not_block()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._failed(exc) from exc
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        self._sending = True
        try:
            self._check()
            await self._ready()
            if self._eof_sent:
                return
            self._eof_sent = True
            try:
                self._conn.shutdown()
            except SSL.Error as exc:
                self._state = _BROKEN
                raise trio.BrokenResourceError(f"TLS failed: {_reasons(exc)}") from exc
            await self._flush()
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = RECEIVE_SIZE
        else:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be at least 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this TLS stream")
        self._receiving = True
        try:
            self._check()
            await self._ready()
            while True:
                if self._eof_received:
                    return b""
                try:
                    data: bytes = self._conn.recv(max_bytes)
                    data += self._more(max_bytes - len(data))
                except SSL.WantReadError:
                    pass
                except SSL.ZeroReturnError:  # the peer's close_notify: a clean end
                    self._eof_received = True
                    return b""
                except SSL.SysCallError as exc:
                    self._state = _BROKEN
                    raise trio.BrokenResourceError("the transport ended without a TLS close_notify") from exc
                except SSL.Error as exc:
                    self._state = _BROKEN
                    raise trio.BrokenResourceError(f"TLS failed: {_reasons(exc)}") from exc
                else:
                    return data
                # What the read side wrote (a KeyUpdate answer) leaves with the next send.
                await self._feed()
        finally:
            self._receiving = False

    def _more(self, room: int) -> bytes:
        """Whatever further records already arrived, up to ``room`` bytes: one call returns up to
        ``max_bytes`` of what is buffered, not a record at a time (fewer trips through the event loop)."""
        parts = []
        while room > 0:
            try:
                more = self._conn.recv(room)
            except SSL.Error:
                break  # nothing more now; an end or a failure is seen by the next call
            if not more:
                break
            parts.append(more)
            room -= len(more)
        return b"".join(parts)

    async def aclose(self) -> None:
        if self._state == _CLOSED:
            await trio.lowlevel.checkpoint()
            return
        polite = self._state == _OK and self._handshook and not self._eof_sent and not self._send_lock.locked()
        self._state = _CLOSED
        try:
            if polite:
                try:
                    self._conn.shutdown()
                    await self._flush()
                except (SSL.Error, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        finally:
            await self.transport.aclose()


async def connect(
    host: str,
    port: int,
    context: SSL.Context,
    verify_peer: PeerVerifier,
    *,
    server_name: str | None = None,
    session: SSL.Session | None = None,
) -> TlsStream:
    """A TCP connection to ``host:port`` with the TLS handshake and peer verification done; with
    ``session`` (a :attr:`TlsStream.session`), the client offers to resume it."""
    try:
        tcp = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise trio.BrokenResourceError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
    stream = TlsStream(
        tcp, context, server_side=False, verify_peer=verify_peer, server_hostname=server_name or host, session=session
    )
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream
