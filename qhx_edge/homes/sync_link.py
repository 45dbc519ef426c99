"""Sync over TCP with mutual TLS 1.3 between nodes (docs/architecture.md, "Sync links").

A sync link is a TLS 1.3 connection (:mod:`qhx_edge.links.tls`, pyOpenSSL through memory BIOs on trio)
that carries one contact of :mod:`qhx_edge.homes.sync_session`:

* each node presents its own X509-SVID for the registration of the selector :data:`SYNC_SELECTOR`
  (minted by its own issuer from its delegation, as the bundle endpoint's), and accepts a peer only
  if the peer's chain verifies under our domain's held bundle and names a SPIFFE ID that our current
  policy registers for that selector: the channel opens only to a peer we sync with;
* a partner's node is accepted as :meth:`Node.verify_svid` accepts a partner's SVID (the agreement,
  its accepted prefixes, the partner's held bundle, staleness and revocations), and is offered only
  our root chain, the agreement and what our side releases (:func:`sync_session.offer`);
* the key exchange is X25519MLKEM768 and nothing else (:data:`~qhx_edge.links.tls.PQ_GROUPS`: both
  ends are qhx-edge on the same OpenSSL, so there is no classical peer to fall back for); a peer that
  cannot do it gets ``downgrade``, audited, never a classical session.  Where our policy gives our
  sync identities ML-DSA certificates (``pq-strict``), a peer's chain must be ML-DSA throughout too,
  else ``downgrade``;
* a dialler resumes its last TLS session with the same listener (:mod:`qhx_edge.links.tls`,
  "Resumption"): the handshake then carries no certificates (about 3 KB instead of 31 KB with ML-DSA
  certificates) and still runs X25519MLKEM768; both ends check the peer's recorded chain again, under
  the bundle, revocations, policy and time of that moment;
* a refused peer (downgrade, a bad or foreign SVID, a broken handshake) is audited on the refusing
  node, and never holds up another peer: each connection is its own task with its own deadline.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from qhx_edge.core import svid
from qhx_edge.core.documents import Policy
from qhx_edge.core.errors import Downgrade, QhxError, ScopeViolation, Unreachable
from qhx_edge.core.spiffe import trust_domain_of
from qhx_edge.homes.sync_session import ContactResult, News, PeerMemory, contact
from qhx_edge.links import netwatch, tls
from qhx_edge.store import clock

log = logging.getLogger(__name__)

SYNC_SELECTOR = "qhx-edge:sync"
"""The selector of the registration that gives a node its sync identity.  No workload presents it
(workloads are attested by ``unix:`` selectors); the policy says which SPIFFE ID it is."""

RESUMPTION = 12 * 3600  # seconds a listener lets a dialler resume a session (each resumption checks again)
HANDSHAKE_TIMEOUT = 30.0
CONTACT_TIMEOUT = 600.0
KEEPALIVE_IDLE = 10  # s: a live link that is quiet this long is probed (TCP keepalive) ...
KEEPALIVE_PROBES = 3  # ... this many times, KEEPALIVE_IDLE / 2 apart, before it counts as cut
USER_TIMEOUT_MS = 30_000  # and data unacknowledged this long cuts it (TCP_USER_TIMEOUT)
MAX_CONNECTIONS = 256  # sync links a listener serves at once; more are closed at once
MAX_LIVE_LINKS = MAX_CONNECTIONS // 2  # links it keeps live at once; the others get plain contacts
MAX_PEER_MEMORIES = 256  # peers whose unfinished transfers a listener keeps


def sync_ids(policy: Policy) -> frozenset[str]:
    """The SPIFFE IDs the policy registers for :data:`SYNC_SELECTOR`: the identities we sync with."""
    return frozenset(str(r["spiffe_id"]) for r in policy.registrations if SYNC_SELECTOR in (r.get("selectors") or []))


def peer_verifier(home: Path, *, now: Callable[[], int] = clock.now) -> tls.PeerVerifier:
    """Accept a peer whose X509-SVID :meth:`Node.verify_svid` accepts (read at each handshake: a policy,
    bundle, revocation or agreement change applies to the next connection):

    * a node of our domain must present a sync identity of our current policy (else ``scope-violation``);
    * a partner's node must be within what our agreement with its domain accepts, under the
      partner's held bundle, its staleness budget and revocations (``no-agreement``, ``scope-violation``,
      ``stale``, ``revoked`` ...): the negotiators put its sync identity inside the accepted prefixes.
    """
    from qhx_edge.homes.node import Node
    from qhx_edge.issue.issuer import algorithm_for

    def verify(chain: list[bytes]) -> None:
        with Node(home) as n:
            got = n.verify_svid(chain, now())
            held = n.store.current(n.domain, "policy")
            domain = n.domain
        policy = held.payload if held is not None and isinstance(held.payload, Policy) else None
        allowed = sync_ids(policy) if policy is not None else frozenset()
        # pq-strict: where our sync identities are ML-DSA, so must the peer's chain be.
        pq = policy is not None and any(algorithm_for(i, policy.algorithms).startswith("ML-DSA") for i in allowed)
        if pq and not svid.post_quantum(chain):
            raise Downgrade(
                f"{got['spiffe_id']} presented a classical certificate chain; the policy of {domain} gives "
                "sync identities ML-DSA certificates and takes no less from a peer"
            )
        if got["relation"] != "home":
            return  # a partner's node, accepted by the agreement: offered only what it releases
        if got["spiffe_id"] not in allowed:
            raise ScopeViolation(
                f"{got['spiffe_id']} is not a sync identity of {domain} (the policy registers {sorted(allowed)})"
            )

    return verify


def peer_identity(stream: tls.TlsStream) -> bytes:
    """Which node a verified stream speaks with: the digest of the CA that issued its SVID (each node's
    own delegated CA; a node can mint many leaves, but has one CA), or of the leaf if it came alone."""
    import hashlib

    chain = stream.peer_chain
    return hashlib.sha256(chain[1] if len(chain) > 1 else chain[0]).digest()


def remembered(memory: PeerMemory, identity: bytes) -> PeerMemory:
    """``memory`` if it is of the node ``identity``; emptied first if it was of another (an address now
    answered by another node: its partials, and what it held and spoke, are not this one's)."""
    if memory.identity != identity:
        memory.partials, memory.peer_live, memory.peer_inventory = {}, False, None
        memory.identity = identity
    return memory


def peer_domain(stream: tls.TlsStream) -> str:
    """The trust domain of the peer a verified stream speaks with."""
    return trust_domain_of(svid.leaf_spiffe_id(stream.peer_chain[0]))


class SyncCredential:
    """This node's sync X509-SVID from its issuer (``homes.bundles.EndpointSvid`` for the sync selector)."""

    def __init__(self, home: Path, get_passphrase: Callable[[], bytes]) -> None:
        from qhx_edge.homes.bundles import EndpointSvid

        self._source = EndpointSvid(home, get_passphrase, selector=SYNC_SELECTOR, role="sync")

    def __call__(self) -> tls.Credential:
        return self._source()

    def close(self) -> None:
        self._source.close()


def _audit_refusal(home: Path, what: str, exc: QhxError) -> None:
    from qhx_edge.homes.node import Node
    from qhx_edge.store.trust_store import AuditEntry

    with Node(home) as n:
        n.store.audit(clock.now(), [AuditEntry("reject", f"{what}: {exc.message}", exc.kind)])


class RefusalLog:
    """How many refused links from one address the listener audits: ``per_minute`` a minute,
    then one entry saying how many more it refused unaudited.  A peer that hammers the listener with
    bad handshakes must not grow the audit log (each entry a durable write) at its own pace."""

    def __init__(self, per_minute: int = 10, addresses: int = 1024) -> None:
        self.per_minute, self.addresses = per_minute, addresses
        self._seen: dict[str, tuple[float, int, int]] = {}  # address -> (window start, audited, unaudited)

    def admit(self, address: str, now: float) -> tuple[bool, int]:
        """Whether to audit this refusal, and how many from ``address`` went unaudited before it."""
        start, audited, quiet = self._seen.get(address, (now, 0, 0))
        if now - start >= 60:
            start, audited = now, 0
        if address not in self._seen and len(self._seen) >= self.addresses:
            del self._seen[next(iter(self._seen))]
        if audited < self.per_minute:
            self._seen[address] = (start, audited + 1, 0)
            return True, quiet
        self._seen[address] = (start, audited, quiet + 1)
        return False, quiet + 1


def keep_alive(stream: Any) -> None:
    """Let the kernel tell a live link that went away (a radio out of range sends no FIN): TCP keepalive
    probes on a quiet link, and a cap on how long sent data may stay unacknowledged."""
    import socket

    tcp = getattr(stream, "transport", stream)
    sock = getattr(tcp, "socket", None)
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, KEEPALIVE_IDLE // 2))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


def _typed(exc: BaseException) -> QhxError:
    if isinstance(exc, QhxError):
        return exc
    return Unreachable(f"the link broke: {exc}")


async def dial(
    home: Path,
    host: str,
    port: int,
    credential: tls.Credential,
    *,
    memory: PeerMemory | None = None,
    groups: tuple[str, ...] = tls.PQ_GROUPS,
    now: Callable[[], int] = clock.now,
    timeout: float = CONTACT_TIMEOUT,
    refusals: RefusalLog | None = None,
    live: bool = False,
    news: News | None = None,
    on_settled: Callable[[ContactResult], None] | None = None,
    network: News | None = None,
) -> ContactResult:
    """Open a sync link to ``host:port`` and run one contact; a refused or failed link is a result
    with ``error`` set (nothing is trusted from it), never an exception.  A refusal is audited (at
    the rate ``refusals`` allows, when given)."""
    result = ContactResult()
    # A session resumes only on the client context that made it, with the same credential and groups.
    link = memory.link if memory is not None else None
    if link is not None and link[:2] == (credential, groups):
        context, session = link[2], link[3]
    else:
        context, session = tls.make_context(credential, server=False, groups=groups), None
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            stream = await tls.connect(host, port, context, peer_verifier(home, now=now), session=session)
    except (QhxError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as exc:
        if memory is not None:
            memory.link = None
        error = _typed(exc) if not isinstance(exc, trio.TooSlowError) else Unreachable("the handshake timed out")
        result.fail(error)
        audit = error.kind != "unreachable"  # a refused peer, not a link that did not answer
        if audit and refusals is not None:
            audit = refusals.admit(host, trio.current_time())[0]
        if audit:
            await trio.to_thread.run_sync(_audit_refusal, home, f"sync link to {host}:{port}", error)
        return result
    if live:
        keep_alive(stream)
    if memory is not None:
        remembered(memory, peer_identity(stream))
    async with stream:
        result = await contact(
            home, stream, memory=memory, now=now, source=f"sync {host}:{port}", timeout=timeout,
            peer_domain=peer_domain(stream), live=live, news=news, on_settled=on_settled, network=network,
        )  # fmt: skip
    result.resumed = stream.resumed
    if memory is not None:  # resumable only if the contact ended with close_notify both ways
        memory.link = (credential, groups, context, stream.session)
    return result


async def listen(
    home: Path,
    host: str,
    port: int,
    credential: Callable[[], tls.Credential],
    *,
    on_contact: Callable[[str, ContactResult], None] = lambda peer, result: None,
    groups: tuple[str, ...] = tls.PQ_GROUPS,
    now: Callable[[], int] = clock.now,
    contacts: int | float = math.inf,
    live: bool = False,
    news: News | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept sync links on ``host:port`` (``task_status.started((host, port))`` once listening) until
    cancelled or ``contacts`` contacts ended; every connection is its own task."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    sockname = listeners[0].socket.getsockname()
    ended = 0
    active = 0
    done = trio.Event()
    memories: dict[bytes, PeerMemory] = {}  # per peer node (its CA), not per address
    live_links: dict[bytes, trio.CancelScope] = {}  # per peer node, its live link: one each
    refusals = RefusalLog()
    contexts = tls.ServerContexts(groups=groups, require_client_certificate=True, resumption=RESUMPTION)

    async def handle(tcp: trio.SocketStream) -> None:
        nonlocal ended, active
        if active >= MAX_CONNECTIONS:  # no task, no TLS, no store for a connection over the cap
            await trio.aclose_forcefully(tcp)
            return
        active += 1
        try:
            where = "{}:{}".format(*tcp.socket.getpeername()[:2])
        except OSError:
            where = "a peer"
        result = ContactResult()
        try:
            stream = tls.TlsStream(
                tcp, contexts(credential()), server_side=True, verify_peer=peer_verifier(home, now=now)
            )
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await stream.do_handshake()
            except (QhxError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
                error = _typed(exc) if not isinstance(exc, trio.TooSlowError) else Unreachable("handshake timed out")
                result.fail(error)
                await trio.aclose_forcefully(stream)
                audit, unaudited = refusals.admit(where.rsplit(":", 1)[0], trio.current_time())
                if audit:
                    more = f" ({unaudited} more refused unaudited before this)" if unaudited else ""
                    await trio.to_thread.run_sync(_audit_refusal, home, f"sync link from {where}{more}", error)
                return
            contexts.verified()
            identity = peer_identity(stream)
            # Live links: one per peer node (a new one ends the old), and at most MAX_LIVE_LINKS, so that
            # slots stay for plain contacts; over the cap a link gets a plain contact.
            stale = live_links.pop(identity, None)
            if stale is not None:
                stale.cancel()
            live_here = live and len(live_links) < MAX_LIVE_LINKS
            if live_here:
                keep_alive(tcp)
            async with stream:
                if identity not in memories and len(memories) >= MAX_PEER_MEMORIES:
                    del memories[next(iter(memories))]  # the oldest: it only costs that peer a resend
                memory = memories.setdefault(identity, PeerMemory(identity=identity))
                with trio.CancelScope() as scope:
                    if live_here:
                        live_links[identity] = scope
                    try:
                        result = await contact(
                            home, stream, memory=memory, now=now, source=f"sync {where}", timeout=CONTACT_TIMEOUT,
                            peer_domain=peer_domain(stream), live=live_here, news=news,
                            on_settled=functools.partial(on_contact, where),
                        )  # fmt: skip
                    finally:
                        if live_links.get(identity) is scope:
                            del live_links[identity]
                if scope.cancelled_caught:
                    result.ended = "replaced"  # the same node opened a new live link
            result.resumed = stream.resumed
        except QhxError as exc:  # we cannot serve now (no sync identity, revoked, a locked store): this link only
            result.fail(exc)
            await trio.aclose_forcefully(tcp)
        except Exception as exc:  # one connection must never end the listener
            log.exception("sync link from %s failed", where)
            result.fail(Unreachable(f"the link failed: {type(exc).__name__}"))
            await trio.aclose_forcefully(tcp)
        finally:
            active -= 1
            with trio.CancelScope(shield=True):  # recorded (SQLite) off the event loop, even when cancelled
                try:
                    await trio.to_thread.run_sync(on_contact, where, result)
                except Exception:  # a status row lost, never the listener
                    log.exception("recording the sync contact with %s failed", where)
            ended += 1
            if ended >= contacts:
                done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(trio.serve_listeners, handle, listeners))
        task_status.started((str(sockname[0]), int(sockname[1])))
        await done.wait()
        nursery.cancel_scope.cancel()


# --- the long-running side: serve --sync-listen / --sync-peer ---------------------------------------

FIRST_RETRY = 5.0
LIVE_MIN = 60.0  # s a live link must have lasted to be redialled at once when it ends
NETWORK_GAP = 1.0  # s from one attempt to the next that a network change may bring, at least
MAX_RETRY = 300.0
DEFAULT_INTERVAL = 60.0


def next_retry(failures: int, *, first: float = FIRST_RETRY, cap: float = MAX_RETRY, jitter: float = 0.5) -> float:
    """Seconds before the next attempt after ``failures`` failures in a row: doubling from ``first``,
    capped, with up to ``jitter`` of it taken off at random (peers cut off together do not all come
    back in step)."""
    import random

    base = min(cap, first * 2 ** max(0, failures - 1))
    return float(base * (1 - jitter * random.random()))  # noqa: S311 - spreading retries, not a secret


def record(home: Path, peer: str, result: ContactResult) -> None:
    """Keep a contact's outcome for ``sync status`` (the node's store, bookkeeping only)."""
    from qhx_edge.homes.node import Node

    with Node(home) as n:
        n.store.record_sync(peer, clock.now(), result.to_record())


def _settled(home: Path, where: str, report: Callable[[str, ContactResult], None], result: ContactResult) -> None:
    """A live link's contact is over (the link stays open): ``sync status`` and the log hear of it now."""
    with contextlib.suppress(QhxError):
        record(home, where, result)
    report(where, result)


async def keep_dialling(
    home: Path,
    host: str,
    port: int,
    credential: Callable[[], tls.Credential],
    *,
    interval: float = DEFAULT_INTERVAL,
    report: Callable[[str, ContactResult], None] = lambda peer, result: None,
    record_unheard: bool = True,
    live: bool = False,
    news: News | None = None,
    network: News | None = None,
) -> None:
    """Dial one peer for ever: a contact every ``interval`` seconds while the link works, retries with
    capped exponential backoff and jitter while it does not.  With ``live``, a contact stays open while
    the link does, and its end (the link went away) is retried at once and then with the same backoff.
    A change of the node's network (``network``: :mod:`qhx_edge.links.netwatch`) ends any wait at once,
    so a link that comes back is dialled when it does.  Runs until cancelled; a peer that cannot be
    reached only ever delays itself (each peer is its own task)."""
    where = f"{host}:{port}"
    memory = PeerMemory()
    refusals = RefusalLog()
    failures = 0
    while True:
        began = trio.current_time()
        try:
            cred = await trio.to_thread.run_sync(credential)
            result = await dial(
                home, host, port, cred, memory=memory, refusals=refusals, live=live, news=news,
                on_settled=functools.partial(_settled, home, where, report), network=network,
            )  # fmt: skip
        except QhxError as exc:  # no identity now (revoked, stale), a locked store: this attempt only
            result = ContactResult()
            result.fail(exc)
        except Exception as exc:  # one peer's failure must never end the others' (or the service)
            log.exception("sync with %s failed", where)
            result = ContactResult()
            result.fail(Unreachable(f"the sync attempt failed: {type(exc).__name__}"))
        if record_unheard or result.peer is not None:  # a found address that never answered: no row
            with contextlib.suppress(QhxError):  # a locked store loses one status row, not the dialler
                await trio.to_thread.run_sync(record, home, where, result)
        report(where, result)
        if result.complete and result.live and trio.current_time() - began >= LIVE_MIN:
            failures = 1  # it stayed open until the link went (or was renewed): again at once
            continue
        # A live link that ended soon after it opened is a failure: backing off, so a peer that answers and
        # closes cannot make us dial in a loop.
        failures = 0 if result.complete and not result.live else failures + 1
        delay = interval if failures == 0 else next_retry(failures)
        if network is None or failures == 0:  # a working peer's interval is not cut short by network news
            await trio.sleep(delay)
        else:
            await network.wait(delay)
            await trio.sleep_until(began + NETWORK_GAP)  # a storm of changes brings one attempt per NETWORK_GAP s


class SyncService:
    """``serve``'s sync side: a listener and a dialler per peer, on a trio loop in a thread of its own
    (beside the Workload API's), every contact recorded for ``sync status``."""

    def __init__(
        self,
        home: Path,
        get_passphrase: Callable[[], bytes],
        *,
        listen_on: tuple[str, int] | None,
        peers: list[tuple[str, int]],
        interval: float = DEFAULT_INTERVAL,
        report: Callable[[str, ContactResult], None] = lambda peer, result: None,
        discover: bool = False,
        live: bool = True,
    ) -> None:
        import threading

        self.home, self.listen_on, self.peers, self.interval = home, listen_on, peers, interval
        self.report, self.discover, self.live = report, discover, live
        self.discovered: dict[str, trio.CancelScope] = {}  # a found peer's instance name -> its dialler
        self.credential = SyncCredential(home, get_passphrase)
        self.address: tuple[str, int] | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None

    def start(self) -> tuple[str, int] | None:
        """Start; the listener's bound address (None without one), or the error that stopped the start."""
        import threading

        self.credential()  # no sync identity: say so at once
        self._thread = threading.Thread(target=self._run, name="qhx-sync", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self.address

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # handed to start(), or ended with the server
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            if not self._ready.is_set():
                self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self.news = News()
        self.network = News()  # the node's network changed: diallers waiting to retry dial now

        def heard(peer: str, result: ContactResult) -> None:
            # Only a peer that passed the handshake (it said hello) gets a row, keyed by its address without
            # the ephemeral port; a refused connection is in the audit log, not in sync_peers.
            if result.peer is not None:
                record(self.home, peer.rsplit(":", 1)[0], result)
            self.report(peer, result)

        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                if self.listen_on is not None:
                    host, port = self.listen_on
                    self.address = await nursery.start(
                        functools.partial(
                            listen,
                            self.home,
                            host,
                            port,
                            self.credential,
                            on_contact=heard,
                            live=self.live,
                            news=self.news,
                        )
                    )
                if self.peers or self.discover:
                    await nursery.start(netwatch.watch, self.network.publish)
                for host, port in self.peers:
                    nursery.start_soon(self._dial, host, port, trio.CancelScope())
                if self.discover:
                    await self._start_discovery(nursery)
                self._ready.set()

    async def _dial(self, host: str, port: int, scope: trio.CancelScope, *, found: bool = False) -> None:
        with scope:
            await keep_dialling(
                self.home, host, port, self.credential, interval=self.interval, report=self.report,
                record_unheard=not found, live=self.live, news=self.news, network=self.network,
            )  # fmt: skip

    async def _start_discovery(self, nursery: trio.Nursery) -> None:
        """Advertise the listener and dial the peers of our domain found on the local link.  Of two
        nodes that both advertise, only the one with the smaller node id dials (one link per pair)."""
        from qhx_edge.homes.node import Node
        from qhx_edge.links.discovery import Discovery, Peer

        def identity() -> tuple[str, str]:
            with Node(self.home) as n:
                return n.node_id, n.domain

        node_id, domain = await trio.to_thread.run_sync(identity)
        token = trio.lowlevel.current_trio_token()
        advertising = self.address is not None

        def found(peer: Peer) -> None:  # on the zeroconf thread
            if advertising and peer.node_id < node_id:
                return  # it dials us
            scope = trio.CancelScope()
            self.discovered[peer.name] = scope
            dial = functools.partial(self._dial, peer.host, peer.port, scope, found=True)
            trio.from_thread.run_sync(nursery.start_soon, dial, trio_token=token)

        def lost(peer: Peer) -> None:
            scope = self.discovered.pop(peer.name, None)
            if scope is not None:
                trio.from_thread.run_sync(scope.cancel, trio_token=token)

        host = self.address[0] if self.address is not None else "0.0.0.0"  # noqa: S104 - every link we are on
        discovery = Discovery(
            domain=domain, node_id=node_id, address=host,
            port=self.address[1] if self.address is not None else None, on_found=found, on_lost=lost,
        )  # fmt: skip
        await trio.to_thread.run_sync(discovery.start)

        async def close_at_the_end() -> None:
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(discovery.close)

        nursery.start_soon(close_at_the_end)

    def stop(self) -> None:
        import contextlib

        if self._token is not None and self._scope is not None and self._thread is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
            self._thread.join(timeout=30)
        self.credential.close()
