"""Finding sync peers on the local link with DNS-SD over multicast DNS (RFC 6763, RFC 6762; docs/architecture.md,
"Sync links").

A node that listens for sync links advertises the service type :data:`SERVICE_TYPE` with its
address, port, trust domain and node id (TXT keys ``td``, ``node``, ``v``), and browses for the
same type.  Discovery only suggests where to dial: nothing in an advertisement is trusted, since
anyone on the link can send one.  The TLS handshake of the link itself decides who the peer is
(:mod:`qhx_edge.homes.sync_link`).  What an advertisement may cost us is capped:

* only advertisements of our own trust domain, with a well-formed node id and port and an IPv4
  address, are reported, and never our own;
* at most :data:`MAX_PEERS` are held at once (more are ignored until one goes away), so a flood of
  forged advertisements costs at most that many diallers, each backing off on its own.

The :mod:`zeroconf` library runs its own thread; ``on_found`` and ``on_lost`` are called from it.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SERVICE_TYPE = "_qhx-sync._tcp.local."
PROTOCOL = "1"
MAX_PEERS = 64
LOOKUP_MS = 3000  # how long to wait for a found service's address and TXT record
_NODE = re.compile(r"[0-9a-f]{16,64}")


@dataclass(frozen=True)
class Peer:
    """A sync peer an advertisement suggests (unauthenticated: the link checks who it is)."""

    name: str  # the DNS-SD instance name
    host: str
    port: int
    node_id: str


def _text(props: dict[bytes, bytes | None], key: bytes) -> str | None:
    value = props.get(key)
    if value is None or len(value) > 253:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def parse_advertisement(name: str, info: Any, domain: str, *, loopback: bool = False) -> Peer | None:
    """The peer an advertisement (a :class:`zeroconf.ServiceInfo`) names, or None if it is not a
    well-formed advertisement of a sync peer of ``domain``.  A loopback or link-local address counts
    only where we ourselves are on loopback (``loopback``): elsewhere it would point our dialler at
    ourselves, or at whatever a forger chose on this host."""
    if info is None or not isinstance(info.port, int) or not 0 < info.port < 65536:
        return None
    props = info.properties or {}
    if _text(props, b"v") != PROTOCOL or _text(props, b"td") != domain:
        return None
    node_id = _text(props, b"node")
    if node_id is None or not _NODE.fullmatch(node_id):
        return None
    for address in info.parsed_addresses():
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        if ip.version != 4 or ip.is_multicast or ip.is_unspecified:
            continue
        if (ip.is_loopback or ip.is_link_local) and not loopback:
            continue
        return Peer(name=name, host=str(ip), port=info.port, node_id=node_id)
    return None


class Discovery:
    """Advertise this node's sync listener (if ``port`` is given) and report the sync peers of
    ``domain`` that others advertise, on the interface of ``address`` (an IPv4 address; ``0.0.0.0``
    for every interface)."""

    def __init__(
        self,
        *,
        domain: str,
        node_id: str,
        address: str,
        port: int | None,
        on_found: Callable[[Peer], None],
        on_lost: Callable[[Peer], None],
    ) -> None:
        self.domain, self.node_id, self.address, self.port = domain, node_id, address, port
        self.on_found, self.on_lost = on_found, on_lost
        self.peers: dict[str, Peer] = {}
        self._on_loopback = ipaddress.ip_address(address).is_loopback
        self._lock = threading.Lock()
        self._zc: Any = None
        self._browser: Any = None
        self._info: Any = None

    def start(self) -> None:
        from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceInfo, Zeroconf

        everywhere = ipaddress.ip_address(self.address).is_unspecified
        interfaces: Any = InterfaceChoice.All if everywhere else [self.address]
        self._zc = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        if self.port is not None:
            from zeroconf import get_all_addresses  # type: ignore[attr-defined]  # public, not in __all__

            # Listening everywhere: advertise every address of this host but loopback ones.
            shown = [self.address]
            if everywhere:
                shown = [a for a in get_all_addresses() if not ipaddress.ip_address(a).is_loopback]
            self._info = ServiceInfo(
                SERVICE_TYPE,
                f"qhx-edge-{self.node_id}.{SERVICE_TYPE}",
                addresses=[socket.inet_aton(a) for a in shown],
                port=self.port,
                properties={"v": PROTOCOL, "td": self.domain, "node": self.node_id},
            )
            self._zc.register_service(self._info)
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._changed])

    def _changed(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        from zeroconf import ServiceStateChange

        try:
            if state_change is ServiceStateChange.Removed:
                with self._lock:
                    gone = self.peers.pop(name, None)
                if gone is not None:
                    self.on_lost(gone)
                return
            if state_change is not ServiceStateChange.Added:
                return
            with self._lock:
                if name in self.peers or len(self.peers) >= MAX_PEERS:
                    return
            info = zeroconf.get_service_info(service_type, name, timeout=LOOKUP_MS)
            peer = parse_advertisement(name, info, self.domain, loopback=self._on_loopback)
            if peer is None or peer.node_id == self.node_id:
                return
            with self._lock:
                if name in self.peers or len(self.peers) >= MAX_PEERS:
                    return
                self.peers[name] = peer
            self.on_found(peer)
        except Exception:  # an advertisement must never end discovery
            log.exception("a sync peer advertisement (%s) could not be handled", name)

    def close(self) -> None:
        if self._zc is None:
            return
        if self._browser is not None:
            self._browser.cancel()
        if self._info is not None:
            self._zc.unregister_service(self._info)
        self._zc.close()
        self._zc = None
