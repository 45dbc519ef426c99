"""``qhx-edge status``: held versions, freshness, staleness and mode (docs/architecture.md,
"Freshness and modes").

The most frequent command, so this module imports only what it needs: on a
node home the node store and the status operation of
:mod:`qhx_edge.homes.node`; the authority's operations only on an authority
home.  No passphrase is asked for: status reads no private key.
"""

from __future__ import annotations

import click

from qhx_edge.cli import Ctx, pass_ctx, render


@click.command("status")
@pass_ctx
def status(ctx: Ctx) -> None:
    """Held versions, freshness, staleness and mode per domain."""
    if ctx.is_authority():
        st = ctx.authority().status()
        ctx.emit({"authority": st}, lambda: render.authority_status_text(st))
        return
    from qhx_edge.homes.node import Node
    from qhx_edge.store import clock

    n = Node(ctx.home)
    try:
        mine = n.status(clock.now())
    finally:
        n.close()
    ctx.emit(mine, lambda: render.node_status_text(mine))
