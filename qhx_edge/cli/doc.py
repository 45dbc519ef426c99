"""``qhx-edge doc ...``: the documents a home holds.

``doc summary`` is what a peer hands to ``pack export --since``; calls
:mod:`qhx_edge.homes.node` (and :mod:`qhx_edge.homes.authority` on an
authority home).
"""

from __future__ import annotations

import click

from qhx_edge.cli import Ctx, pass_ctx, render
from qhx_edge.homes import node


@click.group("doc")
def doc_group() -> None:
    """Held documents."""


@doc_group.command("list")
@pass_ctx
def doc_list(ctx: Ctx) -> None:
    """List held documents (domain, type, version, digest)."""
    n = node.Node(ctx.home)
    try:
        docs = n.store.list_documents()
    finally:
        n.close()
    ctx.emit({"documents": docs}, lambda: render.document_list_text(docs))


@doc_group.command("summary")
@pass_ctx
def doc_summary(ctx: Ctx) -> None:
    """Print what this home holds, newest version per domain and type (for 'pack export --since')."""
    if ctx.is_authority():
        auth = ctx.authority()
        summ = node.summary_of(auth.export_documents(), node="authority", domain=auth.domain)
    else:
        with ctx.node() as n:
            summ = n.summary()
    # The summary is itself the output: a peer saves it with '--json doc summary > peer.json'.
    if ctx.json:
        click.echo(render.dumps({"ok": True, **summ}))
    else:
        for line in render.summary_lines(summ):
            click.echo(line)
