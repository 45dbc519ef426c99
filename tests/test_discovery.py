"""What a sync peer's mDNS advertisement may make us do (qhx_edge/links/discovery.py): anyone on the
link can send one, so only well-formed advertisements of our trust domain count, never our own, and
at most MAX_PEERS at once.  (Discovery over a real link: tests/test_sync_netns.py.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zeroconf import ServiceStateChange

from qhx_edge.links import discovery
from qhx_edge.links.discovery import Discovery, Peer, parse_advertisement

NODE = "0123456789abcdef"


@dataclass
class Info:
    """The parts of a zeroconf ServiceInfo that parse_advertisement reads."""

    port: Any = 7443
    properties: dict[bytes, bytes | None] = field(
        default_factory=lambda: {b"v": b"1", b"td": b"alpha.example", b"node": NODE.encode()}
    )
    addresses: list[str] = field(default_factory=lambda: ["10.0.0.7"])

    def parsed_addresses(self) -> list[str]:
        return self.addresses


def test_a_well_formed_advertisement_of_our_domain_is_a_peer() -> None:
    assert parse_advertisement("n", Info(), "alpha.example") == Peer("n", "10.0.0.7", 7443, NODE)
    local = Info(addresses=["127.0.0.1"])
    assert parse_advertisement("n", local, "alpha.example", loopback=True) == Peer("n", "127.0.0.1", 7443, NODE)


def test_anything_else_is_ignored() -> None:
    def props(**kw: bytes | None) -> dict[bytes, bytes | None]:
        base: dict[bytes, bytes | None] = {b"v": b"1", b"td": b"alpha.example", b"node": NODE.encode()}
        base.update({k.encode(): v for k, v in kw.items()})
        return base

    bad = [
        None,
        Info(port=0),
        Info(port=70000),
        Info(port="7443"),
        Info(properties=props(td=b"beta.example")),  # another domain's node
        Info(properties=props(v=b"2")),  # a protocol we do not speak
        Info(properties=props(node=b"../../etc")),
        Info(properties=props(node=None)),
        Info(properties=props(td=b"\xff" * 10)),
        Info(properties=props(td=b"a" * 300)),
        Info(addresses=["224.0.0.251"]),
        Info(addresses=["0.0.0.0"]),
        Info(addresses=["fe80::1", "not an address"]),
        Info(addresses=["127.0.1.1"]),  # loopback: only for a node that is on loopback itself
        Info(addresses=["169.254.0.9"]),
    ]
    for info in bad:
        assert parse_advertisement("n", info, "alpha.example") is None, info


class FakeZeroconf:
    def __init__(self, infos: dict[str, Info]) -> None:
        self.infos = infos

    def get_service_info(self, service_type: str, name: str, timeout: int) -> Info | None:
        return self.infos.get(name)


def test_our_own_advertisement_is_not_a_peer_and_peers_are_capped(monkeypatch: Any) -> None:
    monkeypatch.setattr(discovery, "MAX_PEERS", 3)
    found: list[Peer] = []
    lost: list[Peer] = []
    d = Discovery(domain="alpha.example", node_id=NODE, address="127.0.0.1", port=1, on_found=found.append,
                  on_lost=lost.append)  # fmt: skip
    infos = {"self": Info()}
    for i in range(6):
        infos[f"p{i}"] = Info(properties={b"v": b"1", b"td": b"alpha.example", b"node": f"{i:016x}".encode()})
    zc = FakeZeroconf(infos)
    for name in infos:
        d._changed(zc, discovery.SERVICE_TYPE, name, ServiceStateChange.Added)
    assert [p.name for p in found] == ["p0", "p1", "p2"]  # not ourselves; three at most
    d._changed(zc, discovery.SERVICE_TYPE, "p1", ServiceStateChange.Removed)
    assert [p.name for p in lost] == ["p1"]
    d._changed(zc, discovery.SERVICE_TYPE, "p4", ServiceStateChange.Added)  # room again
    assert [p.name for p in found] == ["p0", "p1", "p2", "p4"]
    d._changed(zc, discovery.SERVICE_TYPE, "p0", ServiceStateChange.Added)  # already held: once
    assert len(found) == 4
