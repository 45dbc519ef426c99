"""Identity-bound tunnels: plain TCP on the workload's side, mutual TLS 1.3 between nodes (docs/architecture.md,
"Tunnels"; issue 11).

A tunnel is a sidecar that runs as its workload (the Workload API attests it as the workload) and takes
the workload's own X509-SVID from the node's Workload API (:class:`~qhx_edge.issue.workload_client.X509Source`):

* **outbound** (``qhx-edge tunnel outbound``): accepts the local workload's plain TCP and opens TLS to a
  peer node's inbound tunnel, accepting only a server whose SVID :meth:`Node.verify_svid` accepts (our
  domain, or a partner's under an agreement; revocations, staleness) and that names the expected
  SPIFFE ID or lies in the expected namespace;
* **inbound** (``qhx-edge tunnel inbound``): accepts TLS from outbound tunnels, verifies the caller's
  SVID the same way, authorizes the caller against the policy's ``authorization`` rules for this
  service (:mod:`qhx_edge.core.authz`, read at each connection: a policy change applies to the next
  one), and forwards to the local service.

Both ends use X25519MLKEM768 only (a classical peer gets ``downgrade``), and where our policy gives the
service's identity ML-DSA certificates the peer's chain must be ML-DSA too.  Each new connection takes
the newest SVID; live connections keep theirs, so a rotation drops nothing.  A refused connection
(downgrade, a foreign, revoked or unauthorized identity) is audited at a bounded rate and forwarded
nowhere: no byte reaches the service before the caller is authorized.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from qhx_edge.core import authz, svid
from qhx_edge.core.documents import Policy
from qhx_edge.core.errors import Downgrade, QhxError, ScopeViolation, Unreachable
from qhx_edge.core.spiffe import trust_domain_of
from qhx_edge.links import tls
from qhx_edge.store import clock

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0
CONNECT_TIMEOUT = 30.0
MAX_CONNECTIONS = 1024
BUFFER = 256 << 10  # bytes moved per read: up to sixteen TLS records


class WorkloadCredential:
    """The newest SVID of an X509Source as a TLS credential (converted once per SVID)."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self._made: tuple[Any, tls.Credential] | None = None

    def __call__(self) -> tuple[tls.Credential, str]:
        got = self.source.current()
        if self._made is None or self._made[0] is not got:
            self._made = (got, tls.Credential.from_der(got.chain, got.key))
        return self._made[1], got.spiffe_id


def _short(der: bytes) -> str:
    """A certificate's SHA-256, shortened: which SVID a connection presented, for the log."""
    return hashlib.sha256(der).hexdigest()[:16]


def _matches(pattern: str, spiffe_id: str) -> bool:
    return spiffe_id.startswith(pattern) if pattern.endswith("/") else spiffe_id == pattern


def peer_check(
    home: Path,
    *,
    service: str,
    expected: str | None = None,
    authorize: bool = False,
    now: Callable[[], int] = clock.now,
    seen: list[str] | None = None,
    record: dict[str, Any] | None = None,
) -> tls.PeerVerifier:
    """Verify a tunnel peer's SVID chain for ``service`` (our own SPIFFE ID): :meth:`Node.verify_svid`,
    then the expected server identity (outbound) or the policy's authorization rules (inbound), and
    ML-DSA throughout where our policy gives ``service`` ML-DSA certificates.  ``seen`` gets the
    peer's SPIFFE ID once it is known (for the audit); ``record`` what a notary's receipts name (the
    chain, the verification, our bundle and revocation versions, the policy's notary routes)."""
    from qhx_edge.homes.node import Node
    from qhx_edge.issue.issuer import algorithm_for

    def verify(chain: list[bytes]) -> None:
        with Node(home) as n:
            got = n.verify_svid(chain, now())
            held = n.store.current(n.domain, "policy")
            domain = n.domain
            if record is not None:
                versions = {}
                for kind in ("bundle", "revocation"):
                    doc = n.store.current(domain, kind)
                    if doc is not None:
                        versions[kind] = doc.payload.version
                record.update(chain=list(chain), result=got, home_domain=domain, home_versions=versions)
        caller = str(got["spiffe_id"])
        if seen is not None:
            seen.append(caller)
        policy = held.payload if held is not None and isinstance(held.payload, Policy) else None
        pq = policy is not None and algorithm_for(service, policy.algorithms).startswith("ML-DSA")
        if pq and not svid.post_quantum(chain):
            raise Downgrade(f"{caller} presented a classical certificate chain; the policy gives {service} ML-DSA")
        if expected is not None and not _matches(expected, caller):
            raise ScopeViolation(f"the peer is {caller}, not {expected}")
        if record is not None:
            record["routes"] = authz.parse_routes(policy.notary) if policy is not None else ()
        if authorize:
            rules = authz.parse_rules(policy.authorization) if policy is not None else ()
            labels = authz.registration_labels(policy.registrations, caller) if policy is not None else {}
            if trust_domain_of(caller) != domain:
                labels = {}  # our registrations bind labels to our own workloads only
            authz.authorize(rules, service, caller, labels)

    return verify


def _audit(home: Path, what: str, exc: QhxError) -> None:
    from qhx_edge.homes.node import Node
    from qhx_edge.store.trust_store import AuditEntry

    with Node(home) as n:
        n.store.audit(clock.now(), [AuditEntry("reject", f"{what}: {exc.message}", exc.kind)])


async def _pump(source: trio.abc.Stream, sink: trio.abc.Stream, counter: list[int]) -> None:
    """Copy ``source`` to ``sink`` until the source ends, then half-close the sink if it can."""
    while True:
        data = await source.receive_some(BUFFER)
        if not data:
            break
        counter[0] += len(data)
        await sink.send_all(data)
    if isinstance(sink, trio.abc.HalfCloseableStream):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await sink.send_eof()


async def _splice(a: trio.abc.Stream, b: trio.abc.Stream) -> tuple[int, int]:
    """Both directions until both end (or either breaks); bytes a->b, b->a."""
    up, down = [0], [0]

    async def guarded(src: trio.abc.Stream, dst: trio.abc.Stream, counter: list[int]) -> None:
        try:
            await _pump(src, dst, counter)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guarded, a, b, up)
        nursery.start_soon(guarded, b, a, down)
    return up[0], down[0]


class _Refusals:
    """At most ten audited refusals a minute per address (as sync links: homes/sync_link.RefusalLog)."""

    def __init__(self, home: Path) -> None:
        from qhx_edge.homes.sync_link import RefusalLog

        self.home, self.log = home, RefusalLog()

    async def refused(self, where: str, what: str, exc: QhxError) -> None:
        audit, unaudited = self.log.admit(where.rsplit(":", 1)[0], trio.current_time())
        if audit:
            more = f" ({unaudited} more refused unaudited before this)" if unaudited else ""
            await trio.to_thread.run_sync(_audit, self.home, f"{what}{more}", exc)


async def inbound(
    home: Path,
    listen: tuple[str, int],
    forward: tuple[str, int],
    credential: Callable[[], tuple[tls.Credential, str]],
    *,
    groups: tuple[str, ...] = tls.PQ_GROUPS,
    report: Callable[[dict[str, Any]], None] = lambda event: None,
    notary: Any = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept tunnel connections on ``listen``; forward each authorized one to ``forward``.  With a
    ``notary`` (:class:`qhx_edge.homes.notary.Notary`), its exchanges are recorded as the policy's
    notary routes say (:func:`qhx_edge.homes.notary.splice`)."""
    listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
    contexts = tls.ServerContexts(groups=groups, require_client_certificate=True)
    refusals = _Refusals(home)
    active = 0

    async def handle(tcp: trio.SocketStream) -> None:
        nonlocal active
        if active >= MAX_CONNECTIONS:
            await trio.aclose_forcefully(tcp)
            return
        active += 1
        try:
            where = "{}:{}".format(*tcp.socket.getpeername()[:2])
        except OSError:
            where = "a peer"
        seen: list[str] = []
        record: dict[str, Any] | None = {} if notary is not None else None
        try:
            cred, service = await trio.to_thread.run_sync(credential)
            verify = peer_check(home, service=service, authorize=True, seen=seen, record=record)
            stream = tls.TlsStream(tcp, contexts(cred), server_side=True, verify_peer=verify)
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await stream.do_handshake()
            except (QhxError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
                error = exc if isinstance(exc, QhxError) else Unreachable(f"the tunnel handshake failed: {exc}")
                await trio.aclose_forcefully(stream)
                caller = seen[0] if seen else where
                report({"event": "refused", "peer": where, "caller": caller, "error": error.to_json()})
                await refusals.refused(where, f"tunnel from {caller} at {where} to {service}", error)
                return
            contexts.verified()
            async with stream:
                try:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        local = await trio.open_tcp_stream(*forward)
                except (OSError, trio.TooSlowError) as exc:
                    report({"event": "unreachable", "caller": seen[0], "forward": f"{forward[0]}:{forward[1]}",
                            "error": str(exc)})  # fmt: skip
                    return
                async with local:
                    if notary is not None and record is not None:
                        from qhx_edge.homes.notary import Connection, splice

                        ctx = Connection.make(service, list(cred.chain), record)
                        up, down = await splice(stream, local, notary, ctx, report)
                    else:
                        up, down = await _splice(stream, local)
                report({"event": "closed", "caller": seen[0], "service": service, "bytes_in": up, "bytes_out": down,
                        "resumed": stream.resumed, "group": stream.group, "svid": _short(cred.chain[0])})  # fmt: skip
        except QhxError as exc:  # no SVID now, a locked store: this connection only
            report({"event": "failed", "peer": where, "error": exc.to_json()})
            await trio.aclose_forcefully(tcp)
        except Exception:  # one connection must never end the tunnel
            log.exception("tunnel connection from %s failed", where)
            await trio.aclose_forcefully(tcp)
        finally:
            active -= 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(trio.serve_listeners, handle, listeners))
        if notary is not None:
            from qhx_edge.homes.notary import sign_heads

            nursery.start_soon(sign_heads, notary)
        sockname = listeners[0].socket.getsockname()
        task_status.started((str(sockname[0]), int(sockname[1])))


async def outbound(
    home: Path,
    listen: tuple[str, int],
    peer: tuple[str, int],
    expected: str,
    credential: Callable[[], tuple[tls.Credential, str]],
    *,
    groups: tuple[str, ...] = tls.PQ_GROUPS,
    report: Callable[[dict[str, Any]], None] = lambda event: None,
    resume: bool = True,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept the local workload's TCP on ``listen``; carry each connection over TLS to ``peer``, whose
    SVID must name ``expected`` (a SPIFFE ID, or a namespace ending in ``/``)."""
    listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
    contexts: dict[Any, Any] = {}  # credential -> (client context, last session): resumption per peer

    async def handle(local: trio.SocketStream) -> None:
        seen: list[str] = []
        try:
            cred, me = await trio.to_thread.run_sync(credential)
            if cred not in contexts:
                contexts.clear()
                contexts[cred] = [tls.make_context(cred, server=False, groups=groups), None]
            entry = contexts[cred]
            verify = peer_check(home, service=me, expected=expected, seen=seen)
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    try:
                        stream = await tls.connect(peer[0], peer[1], entry[0], verify, session=entry[1])
                    except QhxError:
                        if entry[1] is None:
                            raise
                        # The resumed session recorded the server's old chain, which no longer passes
                        # (a new policy, a rotation): a full handshake shows its current one.
                        entry[1] = None
                        seen.clear()
                        stream = await tls.connect(peer[0], peer[1], entry[0], verify)
            except (QhxError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
                entry[1] = None
                error = exc if isinstance(exc, QhxError) else Unreachable(f"the tunnel to {peer[0]}:{peer[1]}: {exc}")
                report({"event": "refused", "peer": f"{peer[0]}:{peer[1]}", "error": error.to_json()})
                if not isinstance(error, Unreachable):
                    await trio.to_thread.run_sync(_audit, home, f"tunnel to {peer[0]}:{peer[1]}", error)
                await trio.aclose_forcefully(local)
                return
            async with stream, local:
                up, down = await _splice(local, stream)
            entry[1] = stream.session if resume else None
            report({"event": "closed", "peer": seen[0], "bytes_out": up, "bytes_in": down, "resumed": stream.resumed,
                    "group": stream.group, "svid": _short(cred.chain[0])})  # fmt: skip
        except QhxError as exc:
            report({"event": "failed", "error": exc.to_json()})
            await trio.aclose_forcefully(local)
        except Exception:
            log.exception("outbound tunnel connection failed")
            await trio.aclose_forcefully(local)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(trio.serve_listeners, handle, listeners))
        sockname = listeners[0].socket.getsockname()
        task_status.started((str(sockname[0]), int(sockname[1])))
