"""``qhx-edge federation ...``: agreements between trust domains (docs/architecture.md, "Agreements").

Propose, show, accept, publish, list and revoke on an authority home, and
``check`` on a node home.  Each command calls :mod:`qhx_edge.homes.federation`
(the rules are :mod:`qhx_edge.core.agreements`) and renders the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from qhx_edge.cli import Ctx, pass_ctx, read_document, render
from qhx_edge.core import policyfile
from qhx_edge.core.documents import RELEASES
from qhx_edge.core.errors import NotInitialised
from qhx_edge.packs import pack
from qhx_edge.store import clock


def _authority(ctx: Ctx) -> Any:
    if not ctx.is_authority():
        raise NotInitialised(f"{ctx.home} is not an authority home; agreements are made by authorities")
    return ctx.authority()


def _show_text(info: dict[str, Any]) -> str:
    lines = [
        f"agreement v{info['version']} between {info['proposer']} (proposer) and {info['partner']}: {info['status']}"
        + (" (EXPIRED)" if info.get("expired") else ""),
        f"  valid {render.when(info['issued_at'])} to {render.when(info['expires'])}",
    ]
    for side, g in info["grants"].items():
        signed = info.get("signed_by", {}).get(side)
        lines.append(f"  {side} grants {g['to']}:" + (f" (signed: {signed})" if signed else ""))
        lines.append(f"    accepts from {g['to']}: {', '.join(g['accepts_from_partner']) or 'nothing'}")
        lines.append(f"    releases to {g['to']}: {', '.join(g['releases_to_partner'])}")
        lines.append(
            f"    staleness budget for {g['to']}: {g['max_staleness']} s; "
            f"SPIFFE-format bundles accepted: {'yes' if g['allow_spiffe_bundles'] else 'no'}"
        )
        lines.append(f"    root of {side} pinned: {info['roots'][side]}")
    return "\n".join(lines)


@click.group("federation")
def federation_group() -> None:
    """Agreements with partner trust domains: propose, accept, publish, revoke.

    \b
    Example, over files only:
      A$ qhx-edge --home A federation propose --partner beta.example \\
           --partner-anchor beta-root.cbor --expect-fingerprint FP_BETA \\
           --accept spiffe://beta.example/ns/logistics --release bundle --release freshness \\
           --max-staleness 24h --expires 30d --to proposal.pack
      B$ qhx-edge --home B federation show proposal.pack
      B$ qhx-edge --home B federation accept proposal.pack --expect-fingerprint FP_ALPHA --to agreement.pack
      B$ qhx-edge --home B federation publish agreement.pack
      A$ qhx-edge --home A federation publish agreement.pack
    """


@federation_group.command("propose")
@click.option("--partner", required=True, help="The partner's trust domain, e.g. beta.example.")
@click.option("--partner-anchor", required=True, help="The partner's root document (obtained out of band).")
@click.option("--expect-fingerprint", required=True, help="The partner root's fingerprint, from its operator.")
@click.option("--accept", "accept", multiple=True, help="A partner SPIFFE ID prefix we accept (repeatable).")
@click.option(
    "--release", "release", multiple=True, type=click.Choice(RELEASES), help="What we release to them (repeatable)."
)
@click.option("--max-staleness", required=True, help="Our budget for the partner's freshness, e.g. 24h.")
@click.option("--expires", "expires", required=True, help="How long the agreement is valid, e.g. 30d.")
@click.option(
    "--allow-spiffe-bundles", is_flag=True, help="Also take the partner's bundle in SPIFFE format (e.g. SPIRE)."
)
@click.option("--partner-accept", multiple=True, help="Our SPIFFE ID prefix the partner accepts (repeatable).")
@click.option(
    "--partner-release",
    multiple=True,
    type=click.Choice(RELEASES),
    help="What the partner releases to us (repeatable; default: bundle, freshness and revocation).",
)
@click.option("--partner-max-staleness", default=None, help="The partner's budget for ours (default: ours).")
@click.option("--to", "to", required=True, help="Where to write the proposal (a pack: our root and the proposal).")
@pass_ctx
def federation_propose(
    ctx: Ctx,
    partner: str,
    partner_anchor: str,
    expect_fingerprint: str,
    accept: tuple[str, ...],
    release: tuple[str, ...],
    max_staleness: str,
    expires: str,
    allow_spiffe_bundles: bool,
    partner_accept: tuple[str, ...],
    partner_release: tuple[str, ...],
    partner_max_staleness: str | None,
    to: str,
) -> None:
    """Sign a proposal of an agreement with our federation role.

    The partner's root is pinned by fingerprint. Our terms: the partner IDs we
    accept (--accept), what we release to them (--release), our staleness
    budget for their trust material. Their terms (--partner-*) are proposed
    too: the partner reviews both with 'federation show' and countersigns with
    'federation accept', or proposes other terms itself.

    \b
    Example:
      qhx-edge --home A federation propose --partner beta.example \\
        --partner-anchor beta-root.cbor --expect-fingerprint 3f2a... \\
        --accept spiffe://beta.example/ns/logistics --release bundle --release freshness \\
        --max-staleness 24h --expires 30d --to proposal.pack
    """
    from qhx_edge.homes import federation

    auth = _authority(ctx)
    budget = policyfile.duration(max_staleness, "--max-staleness")
    lifetime = policyfile.duration(expires, "--expires")
    if budget < 1 or lifetime < 1:
        raise click.UsageError("--max-staleness and --expires must be at least one second")
    theirs_budget = (
        policyfile.duration(partner_max_staleness, "--partner-max-staleness") if partner_max_staleness else budget
    )
    ours = federation.terms(
        accept=accept, release=release, max_staleness=budget, allow_spiffe_bundles=allow_spiffe_bundles, other=partner
    )
    theirs = federation.terms(
        accept=partner_accept,
        # Revocations by default: without them a partner node's revoked CA stays trusted for as long as
        # the partner's freshness and our budget allow.
        release=partner_release or ("bundle", "freshness", "revocation"),
        max_staleness=max(1, theirs_budget),
        allow_spiffe_bundles=False,
        other=auth.domain,
    )
    now = clock.now()
    data, doc = federation.propose(
        auth,
        partner=partner,
        partner_anchor=read_document(partner_anchor),
        expect_fingerprint=expect_fingerprint,
        ours=ours,
        theirs=theirs,
        lifetime=lifetime,
        now=now,
    )
    size = pack.write(Path(to), data)
    info = federation.show(data, now)
    ctx.emit(
        {"proposal": to, "bytes": size, "agreement": info},
        lambda: f"proposal v{doc.payload.version} to {partner} written to {to}\n{_show_text(info)}",
    )


@federation_group.command("show")
@click.argument("file")
@pass_ctx
def federation_show(ctx: Ctx, file: str) -> None:
    """Print what the agreement in FILE grants, both ways, and whose signatures it carries.

    \b
    Example:
      qhx-edge federation show proposal.pack
    """
    from qhx_edge.homes import federation

    info = federation.show(pack.read(Path(file)), clock.now())
    ctx.emit({"agreement": info}, lambda: _show_text(info))


@federation_group.command("accept")
@click.argument("file")
@click.option("--expect-fingerprint", required=True, help="The proposer root's fingerprint, from its operator.")
@click.option("--to", "to", required=True, help="Where to write the doubly signed agreement (a pack).")
@pass_ctx
def federation_accept(ctx: Ctx, file: str, expect_fingerprint: str, to: str) -> None:
    """Countersign the proposal in FILE with our federation role (the partner runs it).

    The proposer's root must be the one its operator named (--expect-fingerprint)
    and carry its federation threshold; the agreement must be about us.

    \b
    Example:
      qhx-edge --home B federation accept proposal.pack --expect-fingerprint 9c1e... --to agreement.pack
    """
    from qhx_edge.homes import federation

    now = clock.now()
    data, doc = federation.accept(
        _authority(ctx), pack.read(Path(file)), expect_fingerprint=expect_fingerprint, now=now
    )
    size = pack.write(Path(to), data)
    info = federation.show(data, now)
    ctx.emit(
        {"agreement": info, "to": to, "bytes": size},
        lambda: f"agreement v{doc.payload.version} with {doc.payload.domain} countersigned: {to}\n{_show_text(info)}",
    )


@federation_group.command("publish")
@click.argument("file")
@pass_ctx
def federation_publish(ctx: Ctx, file: str) -> None:
    """Add the doubly signed agreement in FILE to our documents, named by the next freshness epoch.

    \b
    Example:
      qhx-edge --home A federation publish agreement.pack
    """
    from qhx_edge.cli.authority import _emit_published
    from qhx_edge.homes import federation

    docs = federation.publish(_authority(ctx), pack.read(Path(file)), clock.now())
    _emit_published(ctx, docs, "federation publish")


@federation_group.command("list")
@pass_ctx
def federation_list(ctx: Ctx) -> None:
    """List agreements by partner: version, status, expiry, what each side grants.

    \b
    Example:
      qhx-edge --home A --json federation list
    """
    from qhx_edge.homes import federation

    items = federation.listing(_authority(ctx), clock.now())
    ctx.emit(
        {"agreements": items},
        lambda: (
            "\n".join(
                f"{i['partner']:<24} v{i['version'] or '-'} {i['status']}"
                + (f" expires {render.when(i.get('expires'))}" if i.get("expires") else "")
                for i in items
            )
            or "no agreements"
        ),
    )


@federation_group.command("revoke")
@click.option("--partner", required=True, help="The partner domain whose agreement ends.")
@pass_ctx
def federation_revoke(ctx: Ctx, partner: str) -> None:
    """End the agreement with a partner: a terminated version and a freshness that no longer names it.

    Our nodes stop trusting the partner with the pack that carries them.

    \b
    Example:
      qhx-edge --home A federation revoke --partner beta.example
    """
    from qhx_edge.cli.authority import _emit_published
    from qhx_edge.homes import federation

    docs = federation.revoke(_authority(ctx), partner, clock.now())
    _emit_published(ctx, docs, "federation revoke")


@federation_group.command("check")
@click.argument("spiffe_id")
@pass_ctx
def federation_check(ctx: Ctx, spiffe_id: str) -> None:
    """On a node home: may a partner workload with SPIFFE_ID be trusted now?

    Exit 1 with no-agreement, scope-violation or stale when it may not.

    \b
    Example:
      qhx-edge --home N federation check spiffe://beta.example/ns/logistics/api
    """
    from qhx_edge.homes.node import Node

    with Node(ctx.home) as n:
        info = n.check_partner_identity(spiffe_id, clock.now())
    ctx.emit({"trusted": True, **info}, f"{spiffe_id}: trusted under agreement v{info['agreement_version']}")


def _fetch_text(out: dict[str, Any]) -> str:
    if "error" in out:
        return f"{out['domain']}: {out['error']['kind']}: {out['error']['message']} (again in {out['retry_in']} s)"
    text = f"SPIFFE bundle of {out['domain']} from {out['url']}: sequence {out['sequence']} {out['status']}"
    return text + (f" (next fetch in {out['next_in']} s)" if "next_in" in out else "")


@federation_group.command("fetch")
@click.option("--partner", required=True, help="The partner domain whose bundle endpoint is fetched.")
@click.option("--url", help="Its bundle endpoint, https://HOST[:PORT][/PATH] (recorded for later fetches).")
@click.option(
    "--profile",
    type=click.Choice(["https_spiffe", "https_web"]),
    help="How the endpoint is authenticated (with --url): its SVID, or a Web PKI certificate.",
)
@click.option("--endpoint-id", help="https_spiffe: the endpoint's SPIFFE ID, in the partner's domain.")
@click.option(
    "--ca",
    "ca",
    type=click.Path(dir_okay=False, path_type=Path),
    help="https_web: the CA certificates (PEM) that vouch for the endpoint's host.",
)
@click.option("--poll", is_flag=True, help="Keep fetching at the bundle's refresh hint until SIGTERM or SIGINT.")
@click.option("--interval", help="With --poll: fetch this often instead of at the refresh hint, e.g. 5m.")
@pass_ctx
def federation_fetch(
    ctx: Ctx,
    partner: str,
    url: str | None,
    profile: str | None,
    endpoint_id: str | None,
    ca: Path | None,
    poll: bool,
    interval: str | None,
) -> None:
    """On a node home: fetch a partner's SPIFFE bundle from its bundle endpoint (a partner running SPIRE).

    Only under a live agreement whose terms allow SPIFFE bundles.  Unlike SPIRE, a bundle enters only
    with a higher spiffe_sequence (an older one is rollback), stays in the store across restarts, and
    counts against the agreement's staleness budget from its import or last confirmation (the same
    bundle fetched again over the authenticated channel).  https_spiffe authenticates the endpoint with
    the partner bundle the node holds: bootstrap it once with 'bundle import-spiffe'.  Exit 1 with a
    stable kind (rollback, no-agreement, scope-violation, malformed, bad-signature, ...), 3 when the
    endpoint cannot be reached (unreachable).  With --poll, one line per attempt (JSON lines with --json).

    \b
    Example:
      spire-server bundle show -format spiffe > beta.json        # on the partner, once, out of band
      qhx-edge --home N bundle import-spiffe beta.json --domain beta.example
      qhx-edge --home N federation fetch --partner beta.example --url https://beta.example:8443 \\
          --profile https_spiffe --endpoint-id spiffe://beta.example/spire/server
      qhx-edge --home N federation fetch --partner beta.example --poll
    """
    import signal
    import threading

    from qhx_edge.homes import partner_fetch
    from qhx_edge.store.files import read_capped

    # Every usage check first: a refused command records nothing.
    if url is not None and profile is None:
        raise click.UsageError("--url needs --profile (https_spiffe or https_web)")
    if url is None and (profile is not None or endpoint_id is not None or ca is not None):
        raise click.UsageError("--profile, --endpoint-id and --ca describe an endpoint: give them with --url")
    if interval is not None and not poll:
        raise click.UsageError("--interval is for --poll")
    every = policyfile.duration(interval, "--interval") if interval is not None else None
    if url is not None:
        assert profile is not None
        ca_pem = read_capped(ca, partner_fetch.MAX_CA_PEM, "CA certificates") if ca is not None else None
        partner_fetch.configure(ctx.home, partner, url, profile, endpoint_id=endpoint_id, ca_pem=ca_pem)
    if not poll:
        out = partner_fetch.fetch_once(ctx.home, partner)
        ctx.emit(out, _fetch_text(out))
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def report(out: dict[str, Any]) -> None:
        if ctx.json:
            import json

            click.echo(json.dumps(out, sort_keys=True))
        else:
            click.echo(_fetch_text(out))

    partner_fetch.poll(ctx.home, partner, report, stop, interval=every)
