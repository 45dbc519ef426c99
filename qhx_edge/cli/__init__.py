"""The ``qhx-edge`` command line: the stable contract of DESIGN.md.

``qhx-edge [--home DIR] [--json] COMMAND ...``.  With ``--json`` every command
prints exactly one JSON object: ``{"ok": true, ...}`` or
``{"ok": false, "error": {"kind": ..., "message": ...}}``.  Exit codes: 0
success, 1 input rejected, 2 usage error, 3 environment error.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from qhx_edge.core import policyfile
from qhx_edge.core.cards import Card, parse_card
from qhx_edge.core.documents import MAX_DOCUMENT_SIZE
from qhx_edge.core.errors import AlreadyInitialised, Malformed, QhxError
from qhx_edge.core.suites import DEFAULT_SUITE, SUITES
from qhx_edge.homes import node
from qhx_edge.homes.authority import Authority, fingerprint
from qhx_edge.packs import pack, seal
from qhx_edge.store import clock
from qhx_edge.store.files import atomic_write, read_capped
from qhx_edge.store.keystore import passphrase_from_env

DEFAULT_HOME = "~/.local/share/qhx-edge"


class Ctx:
    def __init__(self, home: Path, as_json: bool) -> None:
        self.home = home
        self.json = as_json

    def emit(self, data: dict[str, Any], text: str | Callable[[], str]) -> None:
        if self.json:
            click.echo(json.dumps({"ok": True, **data}, sort_keys=True))
        else:
            click.echo(text() if callable(text) else text)


pass_ctx = click.make_pass_decorator(Ctx)


def _prompt(label: str, confirm: bool) -> str:
    return str(click.prompt(label, hide_input=True, confirmation_prompt=confirm, err=True))


def _open_authority(ctx: Ctx) -> Authority:
    return Authority.open(ctx.home, lambda: passphrase_from_env(_prompt))


def _read(path: str) -> bytes:
    return read_capped(Path(path), MAX_DOCUMENT_SIZE, "document file")


def _when(ts: int | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _published(docs: list[bytes]) -> list[dict[str, Any]]:
    from qhx_edge.core.documents import parse

    out = []
    for raw in docs:
        d = parse(raw)
        out.append({"type": d.type, "version": d.payload.version, "digest": d.digest.hex()})
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="QHX_EDGE_HOME",
    default=DEFAULT_HOME,
    show_default=True,
    help="Home directory (QHX_EDGE_HOME).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def cli(cctx: click.Context, home: Path, as_json: bool) -> None:
    """qhx-edge: offline-first workload trust gateway for field nodes."""
    cctx.obj = Ctx(home.expanduser(), as_json)


# --- authority -------------------------------------------------------------------------


@cli.group()
def authority() -> None:
    """A trust domain's authority: root keys, CAs and published documents."""


@authority.command("init")
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
    secret = None if no_passphrase else passphrase_from_env(_prompt, confirm=True)
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
    items = _published(docs)
    ctx.emit({"published": items}, lambda: "\n".join(f"published {i['type']} v{i['version']} ({what})" for i in items))


@authority.group("publish")
def authority_publish() -> None:
    """Publish a new version of a document."""


@authority_publish.command("bundle")
@pass_ctx
def publish_bundle(ctx: Ctx) -> None:
    """Re-issue the trust bundle (and a freshness epoch naming it)."""
    _emit_published(ctx, _open_authority(ctx).publish_bundle(clock.now()), "bundle")


@authority_publish.command("freshness")
@click.option("--lifetime", default=None, help="Expiry after issue (default: the policy's hard budget), e.g. 72h.")
@pass_ctx
def publish_freshness(ctx: Ctx, lifetime: str | None) -> None:
    """Issue a new freshness epoch for the current versions."""
    life = policyfile.duration(lifetime, "--lifetime") if lifetime is not None else None
    _emit_published(ctx, _open_authority(ctx).publish_freshness(clock.now(), life), "freshness")


@authority_publish.command("policy")
@click.argument("file")
@pass_ctx
def publish_policy(ctx: Ctx, file: str) -> None:
    """Publish the policy in FILE.toml (and a freshness epoch naming it)."""
    fields = policyfile.parse_policy_file(read_capped(Path(file), policyfile.MAX_POLICY_FILE, "policy file"), file)
    _emit_published(ctx, _open_authority(ctx).publish_policy(fields, clock.now()), "policy")


@authority.command("rotate-root")
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
    auth = _open_authority(ctx)
    docs = auth.rotate_root(clock.now(), root_keys=root_keys, root_threshold=root_threshold, roles=roles)
    _emit_published(ctx, docs, "rotate-root")


@authority.command("rotate-ca")
@pass_ctx
def rotate_ca(ctx: Ctx) -> None:
    """Make a new CA generation; the bundle carries the new and the previous one."""
    _emit_published(ctx, _open_authority(ctx).rotate_ca(clock.now()), "rotate-ca")


@authority.group("join-token")
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
    token = attestation.create_join_token(_open_authority(ctx), now, seconds)
    ctx.emit({"token": token, "expires": now + seconds}, f"{token}\n(single use, valid until {_when(now + seconds)})")


@authority.command("tpm-ca")
@click.argument("file")
@pass_ctx
def tpm_ca_add(ctx: Ctx, file: str) -> None:
    """Trust FILE (PEM or DER) as a TPM manufacturer CA for endorsement key certificates."""
    from cryptography import x509

    data = _read(file)
    try:
        cert = (
            x509.load_pem_x509_certificate(data)
            if data.lstrip().startswith(b"-----")
            else x509.load_der_x509_certificate(data)
        )
    except ValueError as exc:
        raise Malformed(f"{file}: not an X.509 certificate ({exc})") from exc
    from cryptography.hazmat.primitives.serialization import Encoding

    der = cert.public_bytes(Encoding.DER)
    auth = _open_authority(ctx)
    name = hashlib.sha256(der).hexdigest()[:16]
    atomic_write(auth.home / "tpm-cas" / f"{name}.der", der)
    ctx.emit(
        {"tpm_ca": name, "subject": cert.subject.rfc4514_string()},
        f"trusting TPM manufacturer CA {cert.subject.rfc4514_string()}",
    )


def _manufacturer_cas(auth: Authority) -> list[bytes]:
    folder = auth.home / "tpm-cas"
    return [p.read_bytes() for p in sorted(folder.glob("*.der"))] if folder.is_dir() else []


def _authority_policy(auth: Authority) -> Any:
    from qhx_edge.core.documents import Policy, parse

    policy = parse(auth.current("policy")).payload
    assert isinstance(policy, Policy)
    return policy


@authority.group("attest")
def authority_attest() -> None:
    """Attest nodes: answer their requests with challenges, their evidence with delegations."""


@authority_attest.command("challenge")
@click.argument("request")
@click.option("--to", "to", required=True, help="Where to write the challenge pack.")
@pass_ctx
def authority_attest_challenge(ctx: Ctx, request: str, to: str) -> None:
    """Check a node's attestation request and write a challenge for it."""
    from qhx_edge.homes import attestation

    auth = _open_authority(ctx)
    now = clock.now()
    my_kid = parse_card(auth.card()).encryption_key.kid
    data, _ = pack.unseal_if_sealed(pack.read(Path(request)), my_kid, lambda: auth.identity.encryption)
    raw = attestation.unwrap(data)
    pcrs = sorted(_authority_policy(auth).tpm_pcrs())
    challenge = attestation.challenge(auth, raw, now, manufacturer_cas=_manufacturer_cas(auth), pcrs=pcrs)
    signer = auth._signers("freshness")[0]
    out = attestation.wrap(challenge, signer, domain=auth.domain, node="authority", now=now, documents=[auth.card()])
    size = pack.write(Path(to), out)
    ctx.emit({"challenge": to, "bytes": size}, f"challenge written to {to}")


@authority_attest.command("finish")
@click.argument("evidence")
@click.option("--to", "to", required=True, help="Where to write the delegation pack.")
@click.option("--lifetime", default=None, help="Delegation validity (default 7d).")
@pass_ctx
def authority_attest_finish(ctx: Ctx, evidence: str, to: str, lifetime: str | None) -> None:
    """Check a node's evidence; on success write its delegation (a documents pack for the node)."""
    from qhx_edge.homes import attestation

    auth = _open_authority(ctx)
    now = clock.now()
    my_kid = parse_card(auth.card()).encryption_key.kid
    data, _ = pack.unseal_if_sealed(pack.read(Path(evidence)), my_kid, lambda: auth.identity.encryption)
    raw = attestation.unwrap(data)
    life = policyfile.duration(lifetime, "--lifetime") if lifetime is not None else None
    docs = attestation.finish(auth, raw, now, expected_pcrs=_authority_policy(auth).tpm_pcrs(), lifetime=life)
    # The delegation with everything current (the new bundle names the node's JWT key,
    # and the freshness naming it), so the node can apply it whatever it held before.
    docs = [docs[0], *auth.export_documents()]
    size = pack.write(Path(to), auth.export_pack(docs, now))
    ctx.emit({"delegation": to, "bytes": size, "documents": len(docs)}, f"node attested; delegation written to {to}")


@authority.command("anchor")
@click.option("--to", "to", required=True, help="Where to write the root document.")
@pass_ctx
def authority_anchor(ctx: Ctx, to: str) -> None:
    """Write the current root document: a node's out-of-band trust anchor."""
    data = _open_authority(ctx).anchor()
    atomic_write(Path(to), data)
    fp = fingerprint(data)
    ctx.emit(
        {"anchor": to, "fingerprint": fp},
        f"anchor written to {to}\nfingerprint: {fp}\n"
        "Give the fingerprint to the node operator through a separate channel.",
    )


# --- node ------------------------------------------------------------------------------


@cli.group("node")
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
    data = _read(anchor)
    secret = None if no_passphrase else passphrase_from_env(_prompt, confirm=True)
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
    if Authority.exists(ctx.home):
        data = _open_authority(ctx).card()
    else:
        with _open_node(ctx) as n:
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
    with _open_node(ctx) as n:
        info = n.pin_card(_read(card), clock.now(), expect=expect_fingerprint)
    ctx.emit(info, f"pinned card of node {info['node_id']} ({info['domain']}): {info['fingerprint']}")


@node_group.group("attest")
def node_attest() -> None:
    """Prove this node to its authority (TPM or join token) to receive a delegation."""


def _tpm_client(tcti: str | None) -> Any:
    if tcti is None:
        return None
    from qhx_edge.attest.tpm import TpmClient

    return TpmClient(tcti)


@node_attest.command("request")
@click.option("--method", type=click.Choice(["tpm", "join-token"]), required=True)
@click.option("--token", default=None, help="The join token (method join-token).")
@click.option(
    "--tpm", "tcti", envvar="QHX_EDGE_TPM", default=None, help="TPM TCTI, e.g. swtpm:host=127.0.0.1,port=2321."
)
@click.option("--authority-card", required=True, help="The authority's card: the request is sealed to it.")
@click.option("--to", "to", required=True, help="Where to write the request pack.")
@pass_ctx
def node_attest_request(
    ctx: Ctx, method: str, token: str | None, tcti: str | None, authority_card: str, to: str
) -> None:
    """Write an attestation request (sealed to the authority)."""
    from qhx_edge.homes import attestation

    card = parse_card(_read(authority_card))
    now = clock.now()
    tpm = _tpm_client(tcti) if method == "tpm" else None
    with _open_node(ctx) as n:
        if card.domain != n.domain:
            raise Malformed(f"the authority card is for {card.domain}, this node belongs to {n.domain}")
        try:
            raw = attestation.make_request(n, method, now, token=token, tpm=tpm)
        finally:
            if tpm is not None:
                tpm.close()
        data = attestation.wrap(raw, n.identity.signer, domain=n.domain, node=n.node_id, now=now)
    size = pack.write(Path(to), seal.seal(data, [card.encryption_key]))
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

    docs = attestation.unwrap_all(pack.read(Path(challenge)))
    if len(docs) != 2:
        raise Malformed("a challenge pack holds the challenge and the authority's card")
    card = parse_card(docs[1])
    now = clock.now()
    with _open_node(ctx) as n:
        if card.domain != n.domain or card.node_id != "authority":
            raise Malformed("the challenge pack carries a card that is not this domain's authority")
        tpm = _tpm_client(tcti)
        try:
            # The AK is a primary key of the endorsement hierarchy made from a fixed
            # template, so this TPM yields the same AK as for the request.
            raw = attestation.respond(n, docs[0], now, tpm=tpm)
        finally:
            if tpm is not None:
                tpm.close()
        data = attestation.wrap(raw, n.identity.signer, domain=n.domain, node=n.node_id, now=now)
    size = pack.write(Path(to), seal.seal(data, [card.encryption_key]))
    ctx.emit({"evidence": to, "bytes": size}, f"attestation evidence written to {to} (sealed to the authority)")


def _open_node(ctx: Ctx) -> node.Node:
    """The node home of ``ctx`` (a context manager: ``with _open_node(ctx) as n``)."""
    return node.Node(ctx.home, lambda: passphrase_from_env(_prompt))


# --- packs -------------------------------------------------------------------------------


@cli.group("pack")
def pack_group() -> None:
    """Move documents between homes in pack files."""


def _load_summary(path: str) -> dict[str, Any]:
    try:
        value = json.loads(read_capped(Path(path), 16 << 20, "summary file"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Malformed(f"{path}: not a JSON summary ({exc})") from exc
    if not isinstance(value, dict):
        raise Malformed(f"{path}: not a JSON summary")
    return value


@pack_group.command("export")
@click.option("--to", "to", required=True, help="Pack file to write (atomically: temp name, fsync, rename).")
@click.option("--domain", default=None, help="Only this domain's documents.")
@click.option("--since", "since", default=None, help="Only what a peer lacks, given its 'doc summary' JSON.")
@click.option("--history", is_flag=True, help="Node homes: include every held version.")
@click.option("--seal-to", "seal_to", multiple=True, help="Encrypt to the node of this card (repeatable).")
@click.option("--evidence", is_flag=True, help="Node homes: export the audit log since the last evidence export.")
@pass_ctx
def pack_export(
    ctx: Ctx, to: str, domain: str | None, since: str | None, history: bool, seal_to: tuple[str, ...], evidence: bool
) -> None:
    """Write this home's documents (or, with --evidence, its audit log) into one signed pack file, optionally sealed."""
    peer = _load_summary(since) if since is not None else None
    cards = [parse_card(_read(c)) for c in seal_to]
    now = clock.now()
    if evidence:
        _export_evidence(ctx, to, cards, now, conflicting=bool(domain or since or history))
        return
    if Authority.exists(ctx.home):
        auth = _open_authority(ctx)
        docs = node.select(auth.export_documents(), domain=domain, since=peer)
        data = auth.export_pack(docs, now)
    else:
        with _open_node(ctx) as n:
            docs = n.export_documents(history=history, domain=domain, since=peer)
            data = n.export_pack(docs, now)
    if cards:
        data = seal.seal(data, [c.encryption_key for c in cards])
    size = pack.write(Path(to), data)
    sealed_to = [c.node_id for c in cards]
    ctx.emit(
        {"pack": to, "documents": len(docs), "bytes": size, "sealed_to": sealed_to},
        f"wrote {len(docs)} document{'' if len(docs) == 1 else 's'} ({size} bytes) to {to}"
        + (f", sealed to {', '.join(sealed_to)}" if sealed_to else ""),
    )


def _export_evidence(ctx: Ctx, to: str, cards: list[Card], now: int, *, conflicting: bool) -> None:
    from qhx_edge.homes import evidence

    if conflicting:
        raise click.UsageError("--evidence exports the audit log; it takes no --domain, --since or --history")
    if Authority.exists(ctx.home):
        raise Malformed("an authority home holds no node audit log; export evidence from a node home")
    with _open_node(ctx) as n:
        info = evidence.write_evidence(n, Path(to), now, recipients=[c.encryption_key for c in cards])
    info["sealed_to"] = [c.node_id for c in cards]
    ctx.emit(info, lambda: evidence.export_text(info))


def _import_evidence(ctx: Ctx, data: bytes, strict: bool) -> None:
    from qhx_edge.homes import evidence

    try:
        report = evidence.import_evidence(_open_authority(ctx), data, clock.now(), strict=strict)
    except evidence.EvidenceRejected as exc:
        if ctx.json:
            click.echo(json.dumps({"ok": False, "error": exc.to_json(), **exc.report.to_json()}, sort_keys=True))
        else:
            click.echo(exc.report.summary())
            click.echo(f"error [{exc.kind}]: {exc.message}", err=True)
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
    if Authority.exists(ctx.home):
        _import_evidence(ctx, data, strict)
        return
    with _open_node(ctx) as n:
        try:
            result = n.import_pack(data, clock.now(), source=f"pack {Path(file).name}", strict=strict)
        except node.ImportRejected as exc:
            report = exc.result.to_json()
            if ctx.json:
                click.echo(json.dumps({"ok": False, "error": exc.to_json(), **report}, sort_keys=True))
            else:
                click.echo(exc.result.summary())
                for d in report["documents"]:
                    if d["report"].startswith("rejected"):
                        what = (
                            f"{d.get('type', '?')} v{d.get('version', '?')}"
                            if "type" in d
                            else f"document {d['index']}"
                        )
                        click.echo(f"  {what}: {d['report']}: {d['error']['message']}", err=True)
                click.echo(f"error [{exc.kind}]: {exc.message}", err=True)
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
        click.echo(json.dumps(event.to_json(), sort_keys=True) if ctx.json else event.text())

    with _open_node(ctx) as n:
        watch.serve(
            n, directory, settle=settle, interval=interval, incomplete_timeout=incomplete_timeout, once=once, emit=emit
        )


# --- evidence ------------------------------------------------------------------------------


@cli.group("evidence")
def evidence_group() -> None:
    """Audit-log evidence: exported by nodes, kept per node by the authority."""


@evidence_group.command("status")
@pass_ctx
def evidence_status(ctx: Ctx) -> None:
    """Authority: each node's chain (entries, last seq, head, gaps, forks). Node: what awaits export."""
    from qhx_edge.homes import evidence

    if not Authority.exists(ctx.home):
        n = node.Node(ctx.home)
        try:
            mine = evidence.node_status(n)
        finally:
            n.close()
        ctx.emit(
            mine,
            f"node {mine['node_id']}: {mine['audit_entries']} audit entries, exported as evidence up to "
            f"{mine['evidence_mark']}, {mine['pending']} pending",
        )
        return
    st = evidence.status(ctx.home)
    ctx.emit(st, lambda: evidence.status_text(st))


# --- status and documents -------------------------------------------------------------------


@cli.command()
@pass_ctx
def status(ctx: Ctx) -> None:
    """Held versions, freshness, staleness and mode per domain."""
    if Authority.exists(ctx.home):
        st = _open_authority(ctx).status()

        def authority_text() -> str:
            lines = [f"authority for {st['domain']} (suite {st['suite']}, CA generation {st['ca_generation']})"]
            lines.append(f"root fingerprint: {st['root_fingerprint']}")
            for t, d in st["documents"].items():
                lines.append(
                    f"  {t:<10} v{d['version']:<4} issued {_when(d['issued_at'])}  expires {_when(d['expires'])}"
                )
            roles = ", ".join(f"{r} {s['threshold']}-of-{s['keys']}" for r, s in st["roles"].items())
            lines.append(f"roles: {roles}")
            return "\n".join(lines)

        ctx.emit({"authority": st}, authority_text)
        return
    n = node.Node(ctx.home)
    try:
        st = n.status(clock.now())
    finally:
        n.close()

    def text() -> str:
        lines = [f"node {st['node_id']} ({st['home_domain']})  clock: {st['clock']}"]
        dg = st.get("delegation", {})
        if dg.get("present"):
            state = "EXPIRED" if dg["expired"] else f"valid until {_when(dg['expires'])}"
            lines.append(f"  delegation v{dg['version']} ({dg['method']}, {', '.join(dg['algorithms'])}): {state}")
        else:
            lines.append("  delegation: none (not attested: 'node attest request' to issue SVIDs)")
        for dom, d in st["domains"].items():
            v = d["versions"]
            lines.append(
                f"  {dom} [{d['relation']}] mode {d['mode']}, staleness {d['staleness']} s, max TTL {d['max_ttl']} s\n"
                f"    root v{v['root']} bundle v{v['bundle']} policy v{v['policy']} freshness v{v['freshness']}"
                f" issued {_when(d['freshness_issued_at'])}"
            )
        return "\n".join(lines)

    ctx.emit(st, text)


@cli.group("doc")
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
    ctx.emit(
        {"documents": docs},
        lambda: "\n".join(
            f"{d['domain']:<24} {d['type']:<10} v{d['version']:<5} {d['digest'][:16]}"
            + (" current" if d["current"] else "")
            for d in docs
        ),
    )


@doc_group.command("summary")
@pass_ctx
def doc_summary(ctx: Ctx) -> None:
    """Print what this home holds, newest version per domain and type (for 'pack export --since')."""
    if Authority.exists(ctx.home):
        auth = _open_authority(ctx)
        summ = node.summary_of(auth.export_documents(), node="authority", domain=auth.domain)
    else:
        with _open_node(ctx) as n:
            summ = n.summary()
    # The summary is itself the output: a peer saves it with '--json doc summary > peer.json'.
    if ctx.json:
        click.echo(json.dumps({"ok": True, **summ}, sort_keys=True))
    else:
        for dom, types in summ["domains"].items():
            for t, d in sorted(types.items()):
                click.echo(f"{dom:<24} {t:<10} v{d['version']:<5} {d['digest'][:16]}")


# --- the Workload API ------------------------------------------------------------------------


@cli.command()
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
        lambda: Issuer(home, lambda: passphrase_from_env(_prompt)),
        path,
        on_ready=lambda: ctx.emit({"socket": str(path)}, f"serving the SPIFFE Workload API on {path}"),
    )


# --- entry point ---------------------------------------------------------------------------


def _fail(as_json: bool, kind: str, message: str, code: int) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"ok": False, "error": {"kind": kind, "message": message}}, sort_keys=True))
    else:
        click.echo(f"error [{kind}]: {message}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args[: args.index("--") if "--" in args else len(args)]
    try:
        cli.main(args=args, prog_name="qhx-edge", standalone_mode=False)
    except QhxError as exc:
        _fail(as_json, exc.kind, exc.message, exc.exit_code)
    except click.exceptions.Abort:
        _fail(as_json, "aborted", "aborted", 2)
    except click.ClickException as exc:
        if not as_json:
            exc.show()
            sys.exit(2)
        _fail(as_json, "usage", exc.format_message(), 2)
    except OSError as exc:
        _fail(as_json, "os-error", f"{exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}".strip(), 3)
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
