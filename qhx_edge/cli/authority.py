"""``qhx-edge authority ...``: a trust domain's authority home (docs/architecture.md, "Data flow").

Init, publishing, root and CA rotation, join tokens, TPM manufacturer CAs,
the attestation exchange (docs/issuance.md §1) and the anchor.  Each command
calls :mod:`qhx_edge.homes.authority` or :mod:`qhx_edge.homes.attestation`.
"""

from __future__ import annotations

from pathlib import Path

import click

from qhx_edge.cli import Ctx, pass_ctx, read_document, render
from qhx_edge.core import policyfile
from qhx_edge.core.documents import parse
from qhx_edge.core.errors import AlreadyInitialised
from qhx_edge.core.suites import DEFAULT_SUITE, SUITES
from qhx_edge.homes.authority import Authority, fingerprint
from qhx_edge.packs import pack
from qhx_edge.store import clock
from qhx_edge.store.files import atomic_write, read_capped


@click.group("authority")
def authority_group() -> None:
    """A trust domain's authority: root keys, CAs and published documents."""


@authority_group.command("init")
@click.option("--domain", required=True, help="Trust domain name, e.g. alpha.example.")
@click.option("--suite", type=click.Choice(sorted(SUITES)), default=DEFAULT_SUITE, show_default=True)
@click.option("--root-keys", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--root-threshold", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--no-passphrase", is_flag=True, help="Store private keys unencrypted (demos and tests only).")
@pass_ctx
def authority_init(ctx: Ctx, domain: str, suite: str, root_keys: int, root_threshold: int, no_passphrase: bool) -> None:
    """Create root and role keys, the domain CAs, and root, bundle, policy and freshness v1."""
    if root_threshold > root_keys:
        raise click.UsageError("--root-threshold cannot exceed --root-keys")
    if Authority.exists(ctx.home):
        raise AlreadyInitialised(f"{ctx.home} already holds an authority")
    secret = None if no_passphrase else ctx.passphrase(confirm=True)
    auth = Authority.init(
        ctx.home,
        domain,
        suite=suite,
        root_keys=root_keys,
        root_threshold=root_threshold,
        passphrase=secret,
        now=clock.now(),
    )
    st = auth.status()
    ctx.emit(
        st,
        lambda: (
            f"authority for {domain} created in {ctx.home} (suite {suite}, root {root_threshold}-of-{root_keys})\n"
            f"root fingerprint: {st['root_fingerprint']}"
        ),
    )


def _emit_published(ctx: Ctx, docs: list[bytes], what: str) -> None:
    items = []
    for raw in docs:
        d = parse(raw)
        items.append({"type": d.type, "version": d.payload.version, "digest": d.digest.hex()})
    ctx.emit({"published": items}, lambda: render.published_text(items, what))


@authority_group.group("publish")
def authority_publish() -> None:
    """Publish a new version of a document."""


@authority_publish.command("bundle")
@pass_ctx
def publish_bundle(ctx: Ctx) -> None:
    """Re-issue the trust bundle (and a freshness epoch naming it)."""
    _emit_published(ctx, ctx.authority().publish_bundle(clock.now()), "bundle")


@authority_publish.command("freshness")
@click.option("--lifetime", default=None, help="Expiry after issue (default: the policy's hard budget), e.g. 72h.")
@pass_ctx
def publish_freshness(ctx: Ctx, lifetime: str | None) -> None:
    """Issue a new freshness epoch for the current versions."""
    life = policyfile.duration(lifetime, "--lifetime") if lifetime is not None else None
    _emit_published(ctx, ctx.authority().publish_freshness(clock.now(), life), "freshness")


@authority_publish.command("policy")
@click.argument("file")
@pass_ctx
def publish_policy(ctx: Ctx, file: str) -> None:
    """Publish the policy in FILE.toml (and a freshness epoch naming it)."""
    fields = policyfile.parse_policy_file(read_capped(Path(file), policyfile.MAX_POLICY_FILE, "policy file"), file)
    _emit_published(ctx, ctx.authority().publish_policy(fields, clock.now()), "policy")


@authority_group.command("rotate-root")
@click.option("--root-keys", type=click.IntRange(1, 64), default=None)
@click.option("--root-threshold", type=click.IntRange(1, 64), default=None)
@click.option(
    "--rotate-role",
    "roles",
    multiple=True,
    type=click.Choice(["pki", "policy", "freshness", "federation", "notary"]),
    help="Also replace this role's key (repeatable).",
)
@pass_ctx
def rotate_root(ctx: Ctx, root_keys: int | None, root_threshold: int | None, roles: tuple[str, ...]) -> None:
    """Issue root v+1 with new root keys, signed by the old and the new thresholds."""
    auth = ctx.authority()
    docs = auth.rotate_root(clock.now(), root_keys=root_keys, root_threshold=root_threshold, roles=roles)
    _emit_published(ctx, docs, "rotate-root")


@authority_group.command("rotate-ca")
@pass_ctx
def rotate_ca(ctx: Ctx) -> None:
    """Make a new CA generation; the bundle carries the new and the previous one."""
    _emit_published(ctx, ctx.authority().rotate_ca(clock.now()), "rotate-ca")


@authority_group.command("revoke-node")
@click.argument("node_id")
@pass_ctx
def revoke_node(ctx: Ctx, node_id: str) -> None:
    """Revoke every key this authority ever delegated to NODE_ID, from now.

    Publishes a revocation (applied by nodes and partners at once: chains through the node's CA
    are refused as revoked), a bundle without the node's JWT keys and a freshness naming both;
    carry them with 'pack export' (revocations travel first).

    \b
    Example:
      qhx-edge --home A authority revoke-node 3f2a9c0d1e4b5a69
    """
    _emit_published(ctx, ctx.authority().revoke(clock.now(), node_id=node_id), "revoke-node")


@authority_group.command("revoke-delegation")
@click.argument("version", type=click.IntRange(min=1))
@pass_ctx
def revoke_delegation(ctx: Ctx, version: int) -> None:
    """Revoke the keys of one delegation (by its version), from now; the node keeps any later one."""
    _emit_published(ctx, ctx.authority().revoke(clock.now(), delegation=version), "revoke-delegation")


@authority_group.group("join-token")
def join_token_group() -> None:
    """Single-use join tokens for nodes without a TPM."""


@join_token_group.command("create")
@click.option("--ttl", default="1h", show_default=True, help="How long the token stays valid.")
@pass_ctx
def join_token_create(ctx: Ctx, ttl: str) -> None:
    """Create a join token (stored hashed; give it to the node operator out of band)."""
    from qhx_edge.homes import attestation

    seconds = policyfile.duration(ttl, "--ttl")
    now = clock.now()
    token = attestation.create_join_token(ctx.authority(), now, seconds)
    ctx.emit(
        {"token": token, "expires": now + seconds}, f"{token}\n(single use, valid until {render.when(now + seconds)})"
    )


@authority_group.command("tpm-ca")
@click.argument("file")
@pass_ctx
def tpm_ca_add(ctx: Ctx, file: str) -> None:
    """Trust FILE (PEM or DER) as a TPM manufacturer CA for endorsement key certificates."""
    from qhx_edge.homes import attestation

    ca = attestation.load_manufacturer_ca(read_document(file), file)
    info = attestation.trust_manufacturer_ca(ctx.authority(), ca)
    ctx.emit(info, f"trusting TPM manufacturer CA {info['subject']}")


@authority_group.group("attest")
def authority_attest() -> None:
    """Attest nodes: answer their requests with challenges, their evidence with delegations."""


@authority_attest.command("challenge")
@click.argument("request")
@click.option("--to", "to", required=True, help="Where to write the challenge pack.")
@pass_ctx
def authority_attest_challenge(ctx: Ctx, request: str, to: str) -> None:
    """Check a node's attestation request and write a challenge for it."""
    from qhx_edge.homes import attestation

    auth = ctx.authority()
    now = clock.now()
    raw = attestation.read_message(auth, Path(request))
    size = pack.write(Path(to), attestation.challenge_pack(auth, raw, now))
    ctx.emit({"challenge": to, "bytes": size}, f"challenge written to {to}")


@authority_attest.command("finish")
@click.argument("evidence")
@click.option("--to", "to", required=True, help="Where to write the delegation pack.")
@click.option("--lifetime", default=None, help="Delegation validity (default 7d).")
@pass_ctx
def authority_attest_finish(ctx: Ctx, evidence: str, to: str, lifetime: str | None) -> None:
    """Check a node's evidence; on success write its delegation (a documents pack for the node)."""
    from qhx_edge.homes import attestation

    auth = ctx.authority()
    now = clock.now()
    raw = attestation.read_message(auth, Path(evidence))
    life = policyfile.duration(lifetime, "--lifetime") if lifetime is not None else None
    out, count = attestation.delegation_pack(auth, raw, now, lifetime=life)
    size = pack.write(Path(to), out)
    ctx.emit({"delegation": to, "bytes": size, "documents": count}, f"node attested; delegation written to {to}")


@authority_group.command("anchor")
@click.option("--to", "to", required=True, help="Where to write the root document.")
@pass_ctx
def authority_anchor(ctx: Ctx, to: str) -> None:
    """Write the current root document: a node's out-of-band trust anchor."""
    data = ctx.authority().anchor()
    atomic_write(Path(to), data)
    fp = fingerprint(data)
    ctx.emit(
        {"anchor": to, "fingerprint": fp},
        f"anchor written to {to}\nfingerprint: {fp}\n"
        "Give the fingerprint to the node operator through a separate channel.",
    )
