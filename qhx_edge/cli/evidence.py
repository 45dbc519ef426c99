"""``qhx-edge evidence ...``: audit-log evidence (docs/architecture.md, "Evidence").

Calls :mod:`qhx_edge.homes.evidence`; exporting and importing evidence are
``pack export --evidence`` and ``pack import`` (:mod:`qhx_edge.cli.pack`).
"""

from __future__ import annotations

import click

from qhx_edge.cli import Ctx, pass_ctx


@click.group("evidence")
def evidence_group() -> None:
    """Audit-log evidence: exported by nodes, kept per node by the authority."""


@evidence_group.command("status")
@pass_ctx
def evidence_status(ctx: Ctx) -> None:
    """Authority: each node's chain (entries, last seq, head, gaps, forks). Node: what awaits export."""
    from qhx_edge.homes import evidence
    from qhx_edge.homes.node import Node

    if not ctx.is_authority():
        n = Node(ctx.home)
        try:
            mine = evidence.node_status(n)
        finally:
            n.close()
        ctx.emit(
            mine,
            f"node {mine['node_id']}: {mine['audit_entries']} audit entries, exported as evidence up to "
            f"{mine['evidence_mark']}, {mine['pending']} pending",
        )
        return
    st = evidence.status(ctx.home)
    ctx.emit(st, lambda: evidence.status_text(st))
