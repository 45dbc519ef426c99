"""``qhx-edge audit ...``: a home's audit logs against their signed checkpoints.

Calls :mod:`qhx_edge.homes.audit` (docs/architecture.md, "Audit checkpoints").
``audit verify`` exits 1 with kind ``audit-broken`` (and a stable ``reason``)
when a row or checkpoint was edited, removed, reordered, truncated or forged.
"""

from __future__ import annotations

import sys

import click

from qhx_edge.cli import Ctx, pass_ctx, render


@click.group("audit")
def audit_group() -> None:
    """The audit log: verify it against its signed checkpoints."""


@audit_group.command("verify")
@click.option("--expect-fingerprint", "expect", help="The home's card fingerprint, known out of band.")
@click.option(
    "--max-unprotected",
    type=click.IntRange(min=0),
    default=None,
    help="Fail if more rows than this are beyond the last checkpoint.",
)
@click.option("--no-keystore", is_flag=True, help="Do not unlock the keystore to check the card's key.")
@pass_ctx
def audit_verify(ctx: Ctx, expect: str | None, max_unprotected: int | None, no_keystore: bool) -> None:
    """Check every audit row, its hash chain and the signed checkpoints over it.

    \b
    Examples:
      qhx-edge audit verify
      qhx-edge --json audit verify --max-unprotected 0
    """
    from qhx_edge.core.checkpoint import AuditBroken
    from qhx_edge.homes import audit

    try:
        result = audit.verify(
            ctx.home, None if no_keystore else ctx.passphrase, expect=expect, max_unprotected=max_unprotected
        )
    except AuditBroken as exc:
        error = {**exc.to_json(), "reason": exc.reason, "seq": exc.seq}
        render.rejected(ctx.json, error, {"audit": exc.report}, audit.failure_text(exc))
        sys.exit(1)
    ctx.emit(result, lambda: audit.text(result))


@audit_group.command("checkpoint")
@pass_ctx
def audit_checkpoint(ctx: Ctx) -> None:
    """Sign a checkpoint over the rows written since the last one (needs the home's key).

    \b
    Example:
      qhx-edge audit checkpoint
    """
    from qhx_edge.homes import audit
    from qhx_edge.store import clock

    result = audit.checkpoint_now(ctx.home, ctx.passphrase, clock.now())

    def text() -> str:
        parts = []
        for name, last in result["logs"].items():
            parts.append(
                f"{name}: " + (f"checkpoint {last['n']} covers rows up to {last['seq']}" if last else "no rows")
            )
        return "\n".join(parts)

    ctx.emit(result, text)
