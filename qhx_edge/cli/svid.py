"""``qhx-edge svid ...``: verify workload identities on a node home (docs/architecture.md, "Agreements").

``svid verify CHAIN.pem`` checks an X.509-SVID chain against the held bundle of
its trust domain; for a partner domain, only under a live agreement, inside the
prefixes our side accepts, and while the partner's freshness is within our
budget.  The rules are :mod:`qhx_edge.core.svid` and :mod:`qhx_edge.core.agreements`.
"""

from __future__ import annotations

from pathlib import Path

import click

from qhx_edge.cli import Ctx, pass_ctx


@click.group("svid")
def svid_group() -> None:
    """Verify X.509-SVIDs of our own domain and of partners."""


@svid_group.command("verify")
@click.argument("chain")
@pass_ctx
def svid_verify(ctx: Ctx, chain: str) -> None:
    """Verify the X.509-SVID chain in CHAIN (PEM, leaf first) against the held bundles.

    Exit 1 with a stable kind when it may not be trusted: no-agreement,
    scope-violation, stale (partners), bad-signature, expired, malformed.

    \b
    Example:
      qhx-edge --home N --json svid verify peer-chain.pem
    """
    from qhx_edge.core import svid
    from qhx_edge.homes.node import Node
    from qhx_edge.store import clock
    from qhx_edge.store.files import read_capped

    certs = svid.load_chain(read_capped(Path(chain), svid.MAX_PEM, "certificate chain"))
    with Node(ctx.home) as n:
        info = n.verify_svid(certs, clock.now())
    ctx.emit({"verified": True, **info}, f"{info['spiffe_id']}: verified ({info['relation']} {info['domain']})")
