"""``qhx-edge serve``: the SPIFFE Workload API on a Unix socket (docs/issuance.md).

Calls :mod:`qhx_edge.issue.workload_api` with an :class:`~qhx_edge.issue.issuer.Issuer`
for the node home.
"""

from __future__ import annotations

from pathlib import Path

import click

from qhx_edge.cli import Ctx, pass_ctx


@click.command("serve")
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Workload API socket (default: HOME/workload.sock).",
)
@pass_ctx
def serve(ctx: Ctx, socket_path: Path | None) -> None:
    """Serve the SPIFFE Workload API on a Unix socket until SIGTERM or SIGINT."""
    from qhx_edge.issue import workload_api
    from qhx_edge.issue.issuer import Issuer

    home = ctx.home
    path = (socket_path or home / "workload.sock").absolute()
    workload_api.serve_forever(
        lambda: Issuer(home, ctx.passphrase),
        path,
        on_ready=lambda: ctx.emit({"socket": str(path)}, f"serving the SPIFFE Workload API on {path}"),
    )
