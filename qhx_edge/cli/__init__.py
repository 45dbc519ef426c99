"""The ``qhx-edge`` command line: the stable contract of DESIGN.md.

``qhx-edge [--home DIR] [--json] COMMAND ...``.  With ``--json`` every command
prints exactly one JSON object: ``{"ok": true, ...}`` or
``{"ok": false, "error": {"kind": ..., "message": ...}}``.  Exit codes: 0
success, 1 input rejected, 2 usage error, 3 environment error.

This package holds the root group, the shared context and the error handling;
each command group lives in its own module (:data:`COMMANDS`) and is imported
only when it runs, so a command pays for what it uses and nothing else
(``qhx-edge --help`` lists every group without importing one).  The commands
parse options, call one operation of :mod:`qhx_edge.homes` and render its
result with :mod:`qhx_edge.cli.render`; the rules live below them
(docs/architecture.md, "Layers").
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from qhx_edge.cli import render
from qhx_edge.core.errors import QhxError

if TYPE_CHECKING:
    from qhx_edge.homes.authority import Authority
    from qhx_edge.homes.node import Node

DEFAULT_HOME = "~/.local/share/qhx-edge"

# Every command of the root group: name -> ("module:attribute", its help).  The help is the
# command's own (a test checks they agree), so --help can list a command without importing it.
COMMANDS: dict[str, tuple[str, str]] = {
    "audit": ("qhx_edge.cli.audit:audit_group", "The audit log: verify it against its signed checkpoints."),
    "authority": (
        "qhx_edge.cli.authority:authority_group",
        "A trust domain's authority: root keys, CAs and published documents.",
    ),
    "bundle": (
        "qhx_edge.cli.bundle:bundle_group",
        "SPIFFE bundles: our trust bundle in the SPIFFE format, for SPIRE and other SPIFFE peers.",
    ),
    "doc": ("qhx_edge.cli.doc:doc_group", "Held documents."),
    "evidence": (
        "qhx_edge.cli.evidence:evidence_group",
        "Audit-log evidence: exported by nodes, kept per node by the authority.",
    ),
    "federation": (
        "qhx_edge.cli.federation:federation_group",
        "Agreements with partner trust domains: propose, accept, publish, revoke.",
    ),
    "node": ("qhx_edge.cli.node:node_group", "A field node's store of trust material."),
    "pack": ("qhx_edge.cli.pack:pack_group", "Move documents between homes in pack files."),
    "sync": (
        "qhx_edge.cli.sync:sync_group",
        "Sync links: exchange what the other node lacks, over mutual post-quantum TLS.",
    ),
    "receipt": (
        "qhx_edge.cli.receipt:receipt_group",
        "Notary receipts: list and export this node's, verify anyone's offline against the bundle history.",
    ),
    "scenario": (
        "qhx_edge.cli.scenario:scenario_group",
        "Partition scenarios: simulate a deployment's links, couriers and failures, report what breaks.",
    ),
    "serve": (
        "qhx_edge.cli.serve:serve",
        "Serve the SPIFFE Workload API on a Unix socket until SIGTERM or SIGINT.",
    ),
    "status": ("qhx_edge.cli.status:status", "Held versions, freshness, staleness and mode per domain."),
    "svid": ("qhx_edge.cli.svid:svid_group", "Verify X.509-SVIDs of our own domain and of partners."),
    "tunnel": (
        "qhx_edge.cli.tunnel:tunnel_group",
        "Identity-bound tunnels: a workload's plain TCP carried over mutual post-quantum TLS.",
    ),
}


class LazyGroup(click.Group):
    """A click group whose commands are named ``"module:attribute"`` and imported when resolved."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = self.lazy[cmd_name][0].partition(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command) or command.name != cmd_name:
            raise TypeError(f"{self.lazy[cmd_name][0]} is not the click command {cmd_name!r}")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of ``--help``, from the map's help texts (nothing is imported)."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            if name in self.lazy:
                # A stand-in with the same help shortens it exactly as the command would.
                rows.append((name, click.Command(name, help=self.lazy[name][1]).get_short_help_str(limit)))
            else:
                cmd = super().get_command(ctx, name)
                if cmd is not None and not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class Ctx:
    """What every command shares: the home directory, the output mode, and how to open a home."""

    def __init__(self, home: Path, as_json: bool) -> None:
        self.home = home
        self.json = as_json

    def emit(self, data: dict[str, Any], text: str | Callable[[], str]) -> None:
        render.emit(self.json, data, text)

    def passphrase(self, *, confirm: bool = False) -> bytes:
        """The passphrase for private keys: QHX_EDGE_PASSPHRASE(_FILE), or a prompt on a terminal."""
        from qhx_edge.store.keystore import passphrase_from_env

        return passphrase_from_env(_prompt, confirm=confirm)

    def is_authority(self) -> bool:
        from qhx_edge.homes.layout import is_authority

        return is_authority(self.home)

    def authority(self) -> Authority:
        from qhx_edge.homes.authority import Authority

        return Authority.open(self.home, self.passphrase)

    def node(self) -> Node:
        """The node home (a context manager: ``with ctx.node() as n``); keys unlock on first use."""
        from qhx_edge.homes.node import Node

        return Node(self.home, self.passphrase)


pass_ctx = click.make_pass_decorator(Ctx)


def _prompt(label: str, confirm: bool) -> str:
    return str(click.prompt(label, hide_input=True, confirmation_prompt=confirm, err=True))


def read_document(path: str) -> bytes:
    """A document-sized file named on the command line (anchor, card, certificate)."""
    from qhx_edge.core.documents import MAX_DOCUMENT_SIZE
    from qhx_edge.store.files import read_capped

    return read_capped(Path(path), MAX_DOCUMENT_SIZE, "document file")


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
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


# --- entry point ---------------------------------------------------------------------------


def _fail(as_json: bool, kind: str, message: str, code: int) -> NoReturn:
    render.failure(as_json, kind, message)
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
