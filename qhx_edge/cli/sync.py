"""``qhx-edge sync ...``: sync links between nodes of one domain over mutual TLS 1.3.

Calls :mod:`qhx_edge.homes.sync_link` (docs/architecture.md, "Sync links").  Each node needs its
sync identity: the policy registers a SPIFFE ID for the selector ``qhx-edge:sync``, and the node is
attested (its issuer mints the SVID).  One line of JSON per contact with ``--json``.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import click

from qhx_edge.cli import Ctx, pass_ctx


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:7443, [::1]:7443)")
    return host, int(port)


def _line(ctx: Ctx, peer: str, result: Any) -> None:
    from qhx_edge.core.errors import printable

    out = {"peer_address": peer, **result.to_json()}
    # The node id in a hello is the peer's own word: shown escaped, never able to drive a terminal.
    result.peer = printable(result.peer) if result.peer is not None else None
    if ctx.json:
        click.echo(json.dumps(out, sort_keys=True), nl=True)
        return
    if result.error is not None:
        click.echo(f"{peer}: {result.error['kind']}: {result.error['message']}")
    elif result.in_sync:
        click.echo(f"{peer} ({result.peer}): in sync ({result.bytes_in + result.bytes_out} bytes)")
    else:
        click.echo(
            f"{peer} ({result.peer}): sent {result.sent}, received {result.received} documents "
            f"({result.bytes_in} bytes in, {result.bytes_out} out)"
        )


@click.group("sync")
def sync_group() -> None:
    """Sync links: exchange what the other node lacks, over mutual post-quantum TLS."""


@sync_group.command("listen")
@click.argument("address", metavar="HOST:PORT")
@click.option("--contacts", type=click.IntRange(min=1), default=None, help="Stop after this many contacts.")
@pass_ctx
def sync_listen(ctx: Ctx, address: str, contacts: int | None) -> None:
    """Accept sync links from nodes of our domain until SIGTERM or SIGINT (or --contacts).

    \b
    Examples:
      qhx-edge --home N sync listen 0.0.0.0:7443
      qhx-edge --home N --json sync listen 127.0.0.1:7443 --contacts 1
    """
    import trio

    from qhx_edge.homes.sync_link import SyncCredential, listen

    host, port = _address(address)
    home: Path = ctx.home
    credential = SyncCredential(home, ctx.passphrase)
    try:
        credential()  # no sync identity: say so now, not at the first peer

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                where = await nursery.start(
                    lambda task_status: listen(
                        home, host, port, credential, on_contact=lambda peer, r: _line(ctx, peer, r),
                        contacts=contacts if contacts is not None else math.inf, task_status=task_status,
                    )
                )  # fmt: skip
                shown = f"[{where[0]}]" if ":" in where[0] else where[0]
                ctx.emit({"listening": f"{shown}:{where[1]}"}, f"sync: listening on {shown}:{where[1]}")

        with contextlib.suppress(KeyboardInterrupt):
            trio.run(run)
    finally:
        credential.close()


@sync_group.command("dial")
@click.argument("address", metavar="HOST:PORT")
@pass_ctx
def sync_dial(ctx: Ctx, address: str) -> None:
    """Open a sync link to a node of our domain and run one contact.  Exit 3 (unreachable) when the
    link could not be made or broke, 1 with the kind when the peer was refused.

    \b
    Example:
      qhx-edge --home N sync dial 10.0.0.2:7443
    """
    import trio

    from qhx_edge.homes.sync_link import SyncCredential, dial

    host, port = _address(address)
    source = SyncCredential(ctx.home, ctx.passphrase)
    try:
        credential = source()
    finally:
        source.close()
    result = trio.run(lambda: dial(ctx.home, host, port, credential))
    if result.failure is not None:
        raise result.failure
    _line(ctx, address, result)


@sync_group.command("status")
@pass_ctx
def sync_status(ctx: Ctx) -> None:
    """Each sync peer: its node, the last attempt and contact, the last error, documents and bytes.

    \b
    Example:
      qhx-edge --home N --json sync status
    """
    from qhx_edge.core.errors import printable
    from qhx_edge.homes.node import Node
    from qhx_edge.store import clock

    with Node(ctx.home) as n:
        peers = n.store.sync_peers()
        summary = n.summary()
    out = {"now": clock.now(), "peers": peers, "held": summary["domains"]}

    def text() -> str:
        if not peers:
            return "no sync peer yet"
        lines = []
        for p in peers:
            state = f"last error {p['last_error']}" if p["last_error"] else "ok"
            node_id = printable(p["node_id"]) if p["node_id"] else "unknown node"
            state = printable(state)
            lines.append(
                f"{p['peer']} ({node_id}): {state}; last contact {p['last_contact']}, "
                f"{p['contacts']} contacts, {p['failures']} failures, {p['received']} received, {p['sent']} sent, "
                f"{p['bytes_in']} B in, {p['bytes_out']} B out"
            )
        return "\n".join(lines)

    ctx.emit(out, text)
