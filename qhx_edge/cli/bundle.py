"""``qhx-edge bundle ...``: SPIFFE bundles for SPIFFE software (SPIRE, go-spiffe), from
:mod:`qhx_edge.homes.bundles`.

``bundle export --format spiffe`` writes what SPIRE's ``spire-server bundle
show -format spiffe`` writes, so ``spire-server bundle set -format spiffe``
takes it; ``--classical`` leaves out what classical SPIFFE software cannot read
(ML-DSA authorities), and says so.
"""

from __future__ import annotations

from pathlib import Path

import click

from qhx_edge.cli import Ctx, pass_ctx, render


@click.group("bundle")
def bundle_group() -> None:
    """SPIFFE bundles: our trust bundle in the SPIFFE format, for SPIRE and other SPIFFE peers."""


@bundle_group.command("export")
@click.option(
    "--format", "fmt", type=click.Choice(["spiffe"]), default="spiffe", show_default=True, help="the bundle format"
)
@click.option("--domain", help="a domain this home holds a bundle for (default: its own)")
@click.option(
    "--classical", is_flag=True, help="only authorities classical SPIFFE software reads (no ML-DSA), e.g. for SPIRE"
)
@click.option("--to", "to", type=click.Path(dir_okay=False, path_type=Path), help="write it here, not to stdout")
@pass_ctx
def bundle_export(ctx: Ctx, fmt: str, domain: str | None, classical: bool, to: Path | None) -> None:
    """Write a held trust bundle as a SPIFFE bundle (a JWK Set).

    \b
    Examples:
      qhx-edge --home A bundle export --format spiffe --classical --to alpha.spiffe.json
      spire-server bundle set -format spiffe -id spiffe://alpha.example -path alpha.spiffe.json
      qhx-edge --home NODE bundle export --domain beta.example > beta.json
    """
    from qhx_edge.homes.bundles import export_spiffe

    data, info = export_spiffe(ctx.home, domain, classical=classical)
    if to is not None:
        from qhx_edge.store.files import atomic_write

        atomic_write(to, data)
        ctx.emit({**info, "format": fmt, "to": str(to)}, lambda: render.spiffe_export_text(info, to))
    elif ctx.json:
        import json

        ctx.emit({**info, "format": fmt, "bundle": json.loads(data)}, "")
    else:
        click.echo(data.decode(), nl=False)
        for line in info["left_out"]:
            click.echo(f"left out: {line}", err=True)
