"""``qhx-edge receipt ...``: the notary's receipts (docs/architecture.md, "Notary").

Calls :mod:`qhx_edge.homes.notary` and :mod:`qhx_edge.core.receipts`.  ``receipt verify`` needs no
home and no network: a receipt file and a bundle history (a node or authority home, or a pack with
the fingerprint of the root it is trusted from).  It exits 0 when everything the receipt says is
proven, 1 otherwise: with the kind of the check that failed, or ``missing-history`` (with what it
did prove) when the history lacks a document the receipt names.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from qhx_edge.cli import Ctx, pass_ctx, render


@click.group("receipt")
def receipt_group() -> None:
    """Notary receipts: list and export this node's, verify anyone's offline against the bundle history."""


@receipt_group.command("list")
@click.option("--since", type=click.IntRange(min=0), default=0, show_default=True, help="First receipt index.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@pass_ctx
def receipt_list(ctx: Ctx, since: int, limit: int) -> None:
    """The receipts in this node's log, and its newest signed tree head."""
    from qhx_edge.homes import notary

    out = notary.listing(ctx.home, since=since, limit=limit)

    def text() -> str:
        lines = [f"receipt log: {out['size']} receipts" + (
            f", newest tree head {out['tree_head']['size']} at {render.when(out['tree_head']['at'])}"
            if out["tree_head"] else ", no signed tree head yet")]  # fmt: skip
        for r in out["receipts"]:
            what = f" {r['method']} {r['target']} -> {r['status']}" if "method" in r else ""
            lines.append(f"  {r['seq']}: {render.when(r['at'])} {r['level']} {r['caller']} -> {r['callee']}{what}")
        return "\n".join(lines)

    ctx.emit(out, text)


@receipt_group.command("export")
@click.argument("seq", type=click.IntRange(min=0))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The file to write.")
@pass_ctx
def receipt_export(ctx: Ctx, seq: int, out: Path) -> None:
    """Write receipt SEQ as a self-contained receipt file (with its inclusion proof).

    A receipt that no signed tree head holds yet gets one now (this needs the node's key).

    \b
    Example:
      qhx-edge receipt export 41 --out transfer-41.receipt
    """
    from qhx_edge.homes import notary
    from qhx_edge.homes.node import Node
    from qhx_edge.store.files import atomic_write

    def key() -> Any:
        with Node(ctx.home, ctx.passphrase) as n:
            return n.identity.signer

    data = notary.export(ctx.home, seq, key=key)
    atomic_write(out, data)
    ctx.emit(
        {"receipt": seq, "file": str(out), "bytes": len(data)}, f"wrote receipt {seq} to {out} ({len(data)} bytes)"
    )


def _verified_text(r: dict[str, Any]) -> str:
    rc, caller, callee, no = r["receipt"], r["caller"], r["callee"], r["notary"]
    lines = [
        f"receipt {rc['seq']} of node {rc['node_id']} ({rc['domain']}), {rc['level']}, at {render.when(rc['at'])}:",
        f"  caller {caller['id']}" + (f" (bundle v{caller['bundle_version']} of {caller['domain']})"
                                      if "bundle_version" in caller else ""),
        f"  callee {callee['id']}" + (f" (bundle v{callee['bundle_version']} of {callee['domain']})"
                                      if "bundle_version" in callee else ""),
    ]  # fmt: skip
    if "exchange" in r:
        ex = r["exchange"]
        lines.append(f"  {ex['method']} {ex['target']} -> {ex['status']}")
        lines.append(f"  request sha256 {ex['request_sha256']}")
        lines.append(f"  response sha256 {ex['response_sha256']}")
    lines.append(
        f"  notary: delegation v{no['delegation_version']} under root v{no['root_version']}, "
        f"{'signed on its own and ' if no['signed'] else ''}in tree head {r['log']['tree_size']} "
        f"signed at {render.when(r['log']['signed_at'])}"
    )
    for item in r["could_not"]:
        lines.append(f"  NOT PROVEN: {item}")
    lines.append("verified" if r["verified"] else "not verified")
    return "\n".join(lines)


@receipt_group.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--history",
    "history",
    type=click.Path(exists=True, path_type=Path),
    help="The bundle history: a node or authority home, or an unsealed pack (default: --home).",
)
@click.option("--anchor", "anchors", multiple=True, metavar="FINGERPRINT", help="A root trusted as the chain's start.")
@pass_ctx
def receipt_verify(ctx: Ctx, file: Path, history: Path | None, anchors: tuple[str, ...]) -> None:
    """Verify a receipt file offline: who called whom, when, which bytes, under which bundle versions.

    Every signature must have been made while the node's notary delegation held and before any revocation
    of its key; each chain must have been valid at the receipt's time under the bundle version the
    receipt names, with no revocation of one of its CAs from before then.  Works after every credential
    involved has expired.

    \b
    Examples:
      qhx-edge receipt verify transfer-41.receipt --history /srv/authority
      qhx-edge receipt verify transfer-41.receipt --history coalition.pack --anchor 3f2a...
    """
    from qhx_edge.core import receipts
    from qhx_edge.core.errors import MissingHistory
    from qhx_edge.homes import notary
    from qhx_edge.store.files import read_capped

    data = read_capped(file, receipts.MAX_FILE, "receipt file")
    hist = notary.load_history(history or ctx.home, list(anchors))
    try:
        report = receipts.verify(data, hist)
    except MissingHistory as exc:
        result = exc.report or {}
        render.rejected(ctx.json, exc.to_json(), {"report": result, "history": hist.summary()},
                        _verified_text(result) if result else exc.message)  # fmt: skip
        sys.exit(1)
    ctx.emit({"report": report, "history": hist.summary()}, lambda: _verified_text(report))
