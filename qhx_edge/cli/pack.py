"""``qhx-edge pack ...``: documents and evidence between homes in pack files (docs/architecture.md,
"Packs, cards and sealing" and "Evidence").

Export (documents, a peer's delta with ``--since``, or ``--evidence``), import
(documents on a node home, evidence on an authority home) and the drop-folder
watcher.  Each command calls :mod:`qhx_edge.homes.node`,
:mod:`qhx_edge.homes.evidence` or :mod:`qhx_edge.homes.watch`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qhx_edge.cli import Ctx, pass_ctx, read_document, render
from qhx_edge.core.cards import Card, parse_card
from qhx_edge.core.errors import Malformed
from qhx_edge.homes import node
from qhx_edge.packs import pack, seal
from qhx_edge.store import clock


@click.group("pack")
def pack_group() -> None:
    """Move documents between homes in pack files."""


@pack_group.command("export")
@click.option("--to", "to", required=True, help="Pack file to write (atomically: temp name, fsync, rename).")
@click.option("--domain", default=None, help="Only this domain's documents.")
@click.option("--since", "since", default=None, help="Only what a peer lacks, given its 'doc summary' JSON.")
@click.option(
    "--for",
    "for_peer",
    default=None,
    metavar="CARD-OR-SUMMARY",
    help="Node homes: what this peer lacks, as a sync contact would send it (urgent first), from its card (it "
    "holds nothing we know of) or its 'doc summary' JSON; a partner's node gets only what the agreement releases.",
)
@click.option("--history", is_flag=True, help="Node homes: include every held version.")
@click.option("--seal-to", "seal_to", multiple=True, help="Encrypt to the node of this card (repeatable).")
@click.option("--evidence", is_flag=True, help="Node homes: export the audit log since the last evidence export.")
@click.option(
    "--partner", default=None, help="Authority homes: only what our agreement with this domain releases to it."
)
@pass_ctx
def pack_export(
    ctx: Ctx,
    to: str,
    domain: str | None,
    since: str | None,
    for_peer: str | None,
    history: bool,
    seal_to: tuple[str, ...],
    evidence: bool,
    partner: str | None,
) -> None:
    """Write this home's documents (or, with --evidence, its audit log) into one signed pack file, optionally sealed."""
    peer = node.load_summary(since) if since is not None else None
    cards = [parse_card(read_document(c)) for c in seal_to]
    now = clock.now()
    if evidence:
        _export_evidence(ctx, to, cards, now, conflicting=bool(domain or since or history))
        return
    if for_peer is not None:
        if since is not None or history or domain is not None or partner is not None:
            raise click.UsageError(
                "--for chooses the documents itself: it takes no --since, --history, --domain or --partner"
            )
        if ctx.is_authority():
            raise click.UsageError("--for writes what a sync contact would send; run it on a node home")
    if partner is not None and not ctx.is_authority():
        raise click.UsageError("--partner exports what an authority's agreement releases; run it on the authority")
    if ctx.is_authority():
        auth = ctx.authority()
        if partner is not None:
            from qhx_edge.homes import federation

            everything = federation.released_to(auth, partner, now)
        else:
            everything = auth.export_documents(now)
        docs = node.select(everything, domain=domain, since=peer)
        data = auth.export_pack(docs, now)
        recipients = [c.encryption_key for c in cards]
    else:
        from qhx_edge.homes.attestation import sealing_keys

        with ctx.node() as n:
            if for_peer is not None:
                docs = _for_peer(n, for_peer)
            else:
                docs = n.export_documents(history=history, domain=domain, since=peer)
            data = n.export_pack(docs, now)
            recipients = sealing_keys(n, cards)
    if cards:
        data = seal.seal(data, recipients)
    size = pack.write(Path(to), data)
    sealed_to = [c.node_id for c in cards]
    ctx.emit(
        {"pack": to, "documents": len(docs), "bytes": size, "sealed_to": sealed_to},
        f"wrote {len(docs)} document{'' if len(docs) == 1 else 's'} ({size} bytes) to {to}"
        + (f", sealed to {', '.join(sealed_to)}" if sealed_to else ""),
    )


def _for_peer(n: node.Node, path: str) -> list[bytes]:
    """``--for``: a peer's summary (JSON) or card (a signed document), then what a contact would send it."""
    import json

    from qhx_edge.homes.sync_session import held_catalog, one_way, peer_inventory

    data = read_document(path)
    summary = None
    if data[:1] == b"{":
        try:
            summary = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Malformed(f"{path}: not a JSON summary ({exc})") from exc
    if isinstance(summary, dict):
        held = peer_inventory(summary)
        peer_domain = summary.get("domain")
        if not isinstance(peer_domain, str):
            raise Malformed(f"{path}: the summary names no domain (make it with 'doc summary' on the peer's home)")
    else:
        card = parse_card(data)
        held, peer_domain = {}, card.domain
    return one_way(held_catalog(n.store.held_index()), our_domain=n.domain, peer_domain=peer_domain, held=held)


def _export_evidence(ctx: Ctx, to: str, cards: list[Card], now: int, *, conflicting: bool) -> None:
    from qhx_edge.homes import evidence

    if conflicting:
        raise click.UsageError("--evidence exports the audit log; it takes no --domain, --since or --history")
    if ctx.is_authority():
        raise Malformed("an authority home holds no node audit log; export evidence from a node home")
    from qhx_edge.homes.attestation import sealing_keys

    with ctx.node() as n:
        info = evidence.write_evidence(n, Path(to), now, recipients=sealing_keys(n, cards))
    info["sealed_to"] = [c.node_id for c in cards]
    ctx.emit(info, lambda: evidence.export_text(info))


def _import_evidence(ctx: Ctx, data: bytes, strict: bool) -> None:
    from qhx_edge.homes import evidence

    try:
        report = evidence.import_evidence(ctx.authority(), data, clock.now(), strict=strict)
    except evidence.EvidenceRejected as exc:
        render.rejected(ctx.json, exc.to_json(), exc.report.to_json(), exc.report.summary())
        sys.exit(1)
    ctx.emit(report.to_json(), report.summary)


@pack_group.command("import")
@click.argument("file")
@click.option("--strict", is_flag=True, help="Apply nothing unless every document (or evidence segment) is acceptable.")
@pass_ctx
def pack_import(ctx: Ctx, file: str, strict: bool) -> None:
    """Verify FILE and apply every acceptable newer document in one transaction.

    On an authority home FILE must be an evidence pack from a node of the domain.
    """
    data = pack.read(Path(file))
    if ctx.is_authority():
        _import_evidence(ctx, data, strict)
        return
    with ctx.node() as n:
        try:
            result = n.import_pack(data, clock.now(), source=f"pack {Path(file).name}", strict=strict)
        except node.ImportRejected as exc:
            report = exc.result.to_json()
            render.rejected(ctx.json, exc.to_json(), report, exc.result.summary(), render.rejected_documents(report))
            sys.exit(1)
    ctx.emit(result.to_json(), result.summary)


@pack_group.command("watch")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--interval", type=click.FloatRange(min=0.01), default=1.0, show_default=True, help="Seconds per poll.")
@click.option(
    "--settle",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Seconds a file's size and mtime must stay unchanged before it is read.",
)
@click.option(
    "--incomplete-timeout",
    type=click.FloatRange(min=0),
    default=600.0,
    show_default=True,
    help="Seconds an incomplete pack may stay unchanged before it is rejected.",
)
@click.option("--once", is_flag=True, help="One pass: wait for the present files to settle, handle them, exit.")
@pass_ctx
def pack_watch(
    ctx: Ctx, directory: Path, interval: float, settle: float, incomplete_timeout: float, once: bool
) -> None:
    """Import each pack that settles in DIRECTORY (a USB mount point or drop folder).

    Files directly in DIRECTORY are read once stable; hidden and temporary
    names are ignored. Each is moved to DIRECTORY/imported/ or
    DIRECTORY/rejected/ beside a NAME.reason file; a copy of a pack already
    imported is recognised by its SHA-256. A pack that ends early is waited
    for until --incomplete-timeout. Runs until SIGINT or SIGTERM (exit 0).

    With --json this long-running command prints one JSON object per line,
    one per event (watching, imported, duplicate, rejected, incomplete,
    deferred, unavailable, available), and a final 'stopped' line with counts.
    """
    from qhx_edge.homes import watch

    def emit(event: watch.Event) -> None:
        click.echo(render.dumps(event.to_json()) if ctx.json else event.text())

    with ctx.node() as n:
        watch.serve(
            n, directory, settle=settle, interval=interval, incomplete_timeout=incomplete_timeout, once=once, emit=emit
        )
