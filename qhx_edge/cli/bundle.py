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


@bundle_group.command("import-spiffe")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--domain", required=True, help="the partner trust domain the bundle is of")
@click.option(
    "--reset-sequence",
    is_flag=True,
    help="The partner restarted its spiffe_sequence (e.g. a SPIRE server rebuilt): replace what is held, audited.",
)
@pass_ctx
def bundle_import_spiffe(ctx: Ctx, file: Path, domain: str, reset_sequence: bool) -> None:
    """Take a partner's unsigned SPIFFE bundle, where the agreement allows SPIFFE bundles.

    Ordered by spiffe_sequence (an older one is rollback, the same one already-imported); believed
    at lower assurance ("assurance": "spiffe-bundle" in status and svid verify).  Exit 1 with a
    stable kind: no-agreement, scope-violation, rollback, malformed, oversize, clock-rollback.

    \b
    Example:
      spire-server bundle show -format spiffe > beta.json
      qhx-edge --home NODE bundle import-spiffe beta.json --domain beta.example

    A partner whose sequence restarted (its server rebuilt on an empty datastore) gets rollback for
    every bundle until the operator, having checked the file out of band, takes it with
    --reset-sequence: it replaces every held bundle of the partner (status reset, audited).
    """
    from qhx_edge.core.spiffe_bundle import MAX_BUNDLE_BYTES
    from qhx_edge.homes.node import Node
    from qhx_edge.store import clock
    from qhx_edge.store.files import read_capped

    data = read_capped(file, MAX_BUNDLE_BYTES, "SPIFFE bundle")
    with Node(ctx.home) as n:
        out = n.import_spiffe_bundle(data, domain, clock.now(), source=str(file), reset=reset_sequence)
    ctx.emit(out, f"SPIFFE bundle of {domain}: sequence {out['sequence']} {out['status']} (lower assurance)")
