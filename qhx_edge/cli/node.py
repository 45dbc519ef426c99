"""``qhx-edge node ...``: a field node's home (docs/architecture.md, "Data flow").

Init from an anchor, cards (write one's own, pin a peer's) and the node side
of attestation (docs/issuance.md §1).  Each command calls
:mod:`qhx_edge.homes.node` or :mod:`qhx_edge.homes.attestation`.
"""

from __future__ import annotations

from pathlib import Path

import click

from qhx_edge.cli import Ctx, pass_ctx, read_document
from qhx_edge.core.cards import parse_card
from qhx_edge.homes import node
from qhx_edge.packs import pack
from qhx_edge.store import clock
from qhx_edge.store.files import atomic_write


@click.group("node")
def node_group() -> None:
    """A field node's store of trust material."""


@node_group.command("init")
@click.option("--anchor", required=True, help="Root document from the authority (out of band).")
@click.option("--expect-fingerprint", default=None, help="Refuse unless the anchor has this fingerprint.")
@click.option(
    "--clock-tolerance",
    type=click.IntRange(0, 86400),
    default=node.DEFAULT_CLOCK_TOLERANCE,
    show_default=True,
    help="Seconds the clock may lag trusted time.",
)
@click.option("--no-passphrase", is_flag=True, help="Store the node's private keys unencrypted (demos and tests only).")
@pass_ctx
def node_init(ctx: Ctx, anchor: str, expect_fingerprint: str | None, clock_tolerance: int, no_passphrase: bool) -> None:
    """Create a node store anchored to a root document (never trust on first use)."""
    data = read_document(anchor)
    secret = None if no_passphrase else ctx.passphrase(confirm=True)
    info = node.init(
        ctx.home, data, clock.now(), passphrase=secret, expect=expect_fingerprint, tolerance=clock_tolerance
    )
    ctx.emit(
        info,
        lambda: (
            f"node {info['node_id']} of {info['domain']} anchored to root v{info['root_version']}\n"
            f"anchor fingerprint: {info['fingerprint']}\n"
            "Compare it with the authority's fingerprint before relying on this node.\n"
            f"node card fingerprint: {info['card_fingerprint']}"
        ),
    )


@node_group.command("card")
@click.option("--to", "to", required=True, help="Where to write the card.")
@pass_ctx
def node_card(ctx: Ctx, to: str) -> None:
    """Write this home's public card (node id, domain, signing and encryption keys)."""
    if ctx.is_authority():
        data = ctx.authority().card()
    else:
        with ctx.node() as n:
            data = n.card()
    atomic_write(Path(to), data)
    card = parse_card(data)
    ctx.emit(
        {"card": to, **card.to_json()},
        f"card of {card.node_id} ({card.domain}) written to {to}\nfingerprint: {card.fingerprint}",
    )


@node_group.command("pin-card")
@click.argument("card")
@click.option("--expect-fingerprint", default=None, help="Refuse unless the card has this fingerprint.")
@pass_ctx
def node_pin_card(ctx: Ctx, card: str, expect_fingerprint: str | None) -> None:
    """Pin a peer node's card: its packs are then attributed to it, and only to its key."""
    with ctx.node() as n:
        info = n.pin_card(read_document(card), clock.now(), expect=expect_fingerprint)
    ctx.emit(info, f"pinned card of node {info['node_id']} ({info['domain']}): {info['fingerprint']}")


@node_group.group("attest")
def node_attest() -> None:
    """Prove this node to its authority (TPM or join token) to receive a delegation."""


@node_attest.command("request")
@click.option("--method", type=click.Choice(["tpm", "join-token"]), required=True)
@click.option("--token", default=None, help="The join token (method join-token).")
@click.option(
    "--tpm", "tcti", envvar="QHX_EDGE_TPM", default=None, help="TPM TCTI, e.g. swtpm:host=127.0.0.1,port=2321."
)
@click.option("--authority-card", required=True, help="The authority's card: the request is sealed to it.")
@click.option(
    "--expect-fingerprint",
    default=None,
    help="The authority card's fingerprint, given out of band (else the card must be countersigned by the "
    "freshness role of the root this node holds).",
)
@click.option("--to", "to", required=True, help="Where to write the request pack.")
@pass_ctx
def node_attest_request(
    ctx: Ctx,
    method: str,
    token: str | None,
    tcti: str | None,
    authority_card: str,
    expect_fingerprint: str | None,
    to: str,
) -> None:
    """Write an attestation request (sealed to the authority)."""
    from qhx_edge.homes import attestation

    card = parse_card(read_document(authority_card))
    now = clock.now()
    tpm = attestation.tpm_client(tcti) if method == "tpm" else None
    try:
        with ctx.node() as n:
            data = attestation.request_pack(
                n, card, method, now, token=token, tpm=tpm, expect_fingerprint=expect_fingerprint
            )
    finally:
        if tpm is not None:
            tpm.close()
    size = pack.write(Path(to), data)
    ctx.emit(
        {"request": to, "bytes": size, "method": method},
        f"attestation request written to {to} (sealed to the authority)",
    )


@node_attest.command("respond")
@click.argument("challenge")
@click.option("--tpm", "tcti", envvar="QHX_EDGE_TPM", default=None, help="TPM TCTI, as for the request.")
@click.option("--to", "to", required=True, help="Where to write the evidence pack.")
@pass_ctx
def node_attest_respond(ctx: Ctx, challenge: str, tcti: str | None, to: str) -> None:
    """Answer the authority's challenge with evidence (sealed to the authority)."""
    from qhx_edge.homes import attestation

    raw, card = attestation.challenge_card(pack.read(Path(challenge)))
    now = clock.now()
    with ctx.node() as n:
        data = attestation.evidence_pack(n, raw, card, now, tcti=tcti)
    size = pack.write(Path(to), data)
    ctx.emit({"evidence": to, "bytes": size}, f"attestation evidence written to {to} (sealed to the authority)")
