"""``qhx-edge tunnel ...``: identity-bound tunnels between workloads on nodes (docs/architecture.md, "Tunnels").

Calls :mod:`qhx_edge.homes.tunnel`.  A tunnel runs as its workload: the node's Workload API (``qhx-edge
serve``) attests it and gives it the workload's SVID.  It prints one JSON line when it listens (stdout)
and one per connection (stderr), and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import click

from qhx_edge.cli import Ctx, pass_ctx
from qhx_edge.cli.sync import _address


@click.group("tunnel")
def tunnel_group() -> None:
    """Identity-bound tunnels: a workload's plain TCP carried over mutual post-quantum TLS."""


def _run(ctx: Ctx, socket_path: Path | None, start: Any, info: dict[str, Any]) -> None:
    import trio

    from qhx_edge.homes.tunnel import WorkloadCredential
    from qhx_edge.issue.workload_client import X509Source

    source = X509Source((socket_path or ctx.home / "workload.sock").absolute()).start()
    try:
        credential = WorkloadCredential(source)
        _, me = credential()  # no identity: say so before listening
        info["spiffe_id"] = me

        def report(event: dict[str, Any]) -> None:
            print(json.dumps({"tunnel": event}, sort_keys=True), file=sys.stderr, flush=True)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(lambda task_status: start(credential, report, task_status))
                info["listening"] = f"{bound[0]}:{bound[1]}"
                ctx.emit(info, f"tunnel for {me} listening on {bound[0]}:{bound[1]}")
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        break

        trio.run(main)
    finally:
        source.close()


@tunnel_group.command("inbound")
@click.option("--listen", "listen", required=True, metavar="HOST:PORT", help="Accept tunnel connections here.")
@click.option("--forward", "forward", required=True, metavar="HOST:PORT", help="The local service to forward to.")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), help="The Workload API socket.")
@click.option(
    "--notary",
    is_flag=True,
    help="Read the HTTP/1.1 carried and record exchanges as receipts, as the policy's [[notary]] routes say.",
)
@pass_ctx
def tunnel_inbound(ctx: Ctx, listen: str, forward: str, socket_path: Path | None, notary: bool) -> None:
    """Accept mutual TLS from outbound tunnels and forward each authorized caller to a local service.

    The caller's SVID must verify (our domain, or a partner's under an agreement) and the policy's
    [[authorization]] rules must let it reach this workload's SPIFFE ID; anything else is refused,
    audited, and never reaches the service.  With --notary, each exchange on a route the policy's
    [[notary]] rules name becomes a receipt in the node's receipt log (see `qhx-edge receipt`),
    committed before the response is released; it signs with the node's key (the passphrase is asked
    once, or taken from QHX_EDGE_PASSPHRASE).
    """
    from qhx_edge.homes import tunnel
    from qhx_edge.store import clock

    listen_at, forward_to = _address(listen), _address(forward)
    info: dict[str, Any] = {"mode": "inbound", "forward": forward, "notary": notary}
    keeper = None
    if notary:
        from qhx_edge.homes.notary import Notary

        keeper = Notary.open(ctx.home, ctx.passphrase, clock.now())
        info["notary_until"] = keeper.expires

    def start(credential: Any, report: Any, task_status: Any) -> Any:
        return tunnel.inbound(
            ctx.home, listen_at, forward_to, credential, report=report, notary=keeper, task_status=task_status
        )

    try:
        _run(ctx, socket_path, start, info)
    finally:
        if keeper is not None:
            keeper.close()


@tunnel_group.command("outbound")
@click.option("--listen", "listen", required=True, metavar="HOST:PORT", help="Accept the workload's TCP here.")
@click.option("--peer", "peer", required=True, metavar="HOST:PORT", help="The peer node's inbound tunnel.")
@click.option(
    "--peer-id", "peer_id", required=True, help="The SPIFFE ID the peer must present (or a namespace ending in '/')."
)
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), help="The Workload API socket.")
@pass_ctx
def tunnel_outbound(ctx: Ctx, listen: str, peer: str, peer_id: str, socket_path: Path | None) -> None:
    """Carry the local workload's TCP connections over mutual TLS to a peer's inbound tunnel."""
    from qhx_edge.core.authz import parse_rules
    from qhx_edge.homes import tunnel

    parse_rules([{"to": peer_id, "allow": peer_id}])  # a SPIFFE ID or namespace, or malformed now
    listen_at, peer_at = _address(listen), _address(peer)
    info: dict[str, Any] = {"mode": "outbound", "peer": peer, "peer_id": peer_id}

    def start(credential: Any, report: Any, task_status: Any) -> Any:
        return tunnel.outbound(
            ctx.home, listen_at, peer_at, peer_id, credential, report=report, task_status=task_status
        )

    _run(ctx, socket_path, start, info)
