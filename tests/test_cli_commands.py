"""The command line's lazy command map: every group is listed, resolves, and loads only when it runs.

``qhx_edge.cli.COMMANDS`` names each command as ``"module:attribute"`` with its
help; ``--help`` lists them from the map without importing them.  A typo in
the map, or a help text that drifted from the command's own, fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest

from qhx_edge.cli import COMMANDS, LazyGroup, cli
from tests.conftest import Homes, _cli_env, run_cli

EXPECTED = {
    "audit",
    "authority",
    "bundle",
    "doc",
    "evidence",
    "federation",
    "node",
    "pack",
    "receipt",
    "scenario",
    "serve",
    "status",
    "svid",
    "sync",
    "tunnel",
}


def _walk(command: click.Command, path: str = "") -> list[tuple[str, click.Command]]:
    out = [(path, command)]
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, f"{path} {name}"
            out.extend(_walk(sub, f"{path} {name}".strip()))
    return out


def test_help_lists_every_command_group() -> None:
    r = run_cli("--help")
    assert r.code == 0, r.stderr
    listed = r.stdout.split("Commands:\n", 1)[1].splitlines()
    names = {line.split()[0] for line in listed if line.startswith("  ") and not line.startswith("   ")}
    assert names == set(COMMANDS) == EXPECTED


def test_every_lazy_command_resolves_to_its_command_with_the_same_help() -> None:
    ctx = click.Context(cli)
    for name, (target, help_text) in COMMANDS.items():
        command = cli.get_command(ctx, name)
        assert isinstance(command, click.Command), target
        assert command.name == name
        assert command.help is not None
        # The map's help is the command's own first paragraph, so --help says what the command says.
        assert command.help.split("\n\n")[0] == help_text, name


def test_every_command_below_the_root_resolves_and_has_help() -> None:
    commands = _walk(cli)
    assert len(commands) > len(COMMANDS) + 10  # the subcommands were reached, not only the groups
    for path, command in commands[1:]:
        assert command.help, path


def test_a_typo_in_the_lazy_map_fails_to_resolve() -> None:
    ctx = click.Context(cli)
    for target, error in (
        ("qhx_edge.cli.statsu:status", ModuleNotFoundError),
        ("qhx_edge.cli.status:stauts", AttributeError),
        ("qhx_edge.cli.doc:doc_group", TypeError),  # a command, but not the one named "status"
        ("qhx_edge.cli.render:when", TypeError),  # not a click command at all
    ):
        group = LazyGroup(lazy={"status": (target, "Held versions.")})
        with pytest.raises(error):
            group.get_command(ctx, "status")


def _modules_after(args: list[str], env: dict[str, str] | None = None) -> tuple[int, set[str]]:
    """Run the command line in a fresh interpreter; its exit code and every module it imported."""
    code = (
        "import json, sys\n"
        "from qhx_edge.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "sys.stderr.write(json.dumps([code, sorted(sys.modules)]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_cli_env(env), timeout=120, check=False
    )
    exit_code, modules = json.loads(proc.stderr.splitlines()[-1])
    return exit_code, set(modules)


def test_help_imports_no_command_module() -> None:
    code, modules = _modules_after(["--help"])
    assert code == 0
    loaded = {m for m in modules if m.startswith("qhx_edge.")}
    assert loaded <= {"qhx_edge.cli", "qhx_edge.cli.render", "qhx_edge.core", "qhx_edge.core.errors"}, loaded


def test_status_on_a_node_imports_only_what_status_needs(homes: Homes) -> None:
    code, modules = _modules_after(["--home", str(homes.node_home), "--json", "status"])
    assert code == 0
    assert "qhx_edge.cli.status" in modules
    assert "qhx_edge.homes.node" in modules
    unneeded = {
        "sqlite_utils",  # used only by Store.trust_digest
        "qhx_edge.homes.authority",
        "qhx_edge.homes.attestation",
        "qhx_edge.homes.evidence",
        "qhx_edge.homes.watch",
        "qhx_edge.packs.pack",
        "qhx_edge.core.policyfile",
        "qhx_edge.issue.workload_api",
        "grpc",
    } | {target.partition(":")[0] for name, (target, _) in COMMANDS.items() if name != "status"}
    assert modules.isdisjoint(unneeded), sorted(modules & unneeded)


def test_the_module_scan_sees_an_import(homes: Homes) -> None:
    # The check above is not vacuous: a command that needs the authority's operations loads them.
    code, modules = _modules_after(["--home", str(homes.a), "--json", "status"])
    assert code == 0
    assert "qhx_edge.homes.authority" in modules
