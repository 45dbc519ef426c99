"""``qhx-edge scenario ...``: plan a deployment before the network fails it (docs/simulation.md; issue 12).

Calls :mod:`qhx_edge.homes.scenario`, which runs :mod:`qhx_edge.sim.engine`.  Needs no home.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from qhx_edge.cli import Ctx, pass_ctx


@click.group("scenario")
def scenario_group() -> None:
    """Partition scenarios: simulate a deployment's links, couriers and failures, report what breaks."""


@scenario_group.command("run")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Report folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--live",
    is_flag=True,
    help="Also play it for real (as root, up to 6 nodes, in real time): qhx-edge serve in network namespaces, "
    "links cut on schedule, compared with the simulation in live.json (exit 1, live-mismatch, if they differ).",
)
@pass_ctx
def scenario_run(ctx: Ctx, file: Path, out: Path, quiet: bool, live: bool) -> None:
    """Run a scenario: report.json, summary.md and plots in --out.

    Deterministic: the same file gives the same report.json, byte for byte.  Exit 1 (kind
    invariant) when a run breaks an invariant: an SVID past its bound, a rollback or a forged document
    accepted, a revoked identity accepted after the revocation reached the node.

    \b
    Example:
      qhx-edge scenario run scenarios/courier-patrol.toml --out reports/patrol
      sudo qhx-edge scenario run scenarios/live-relay.toml --out reports/live --live
    """
    from qhx_edge.homes import scenario, scenario_live

    if live:  # refuse what cannot be played before simulating anything
        scenario_live.check(scenario.load(file))
        scenario_live.preflight()
    if quiet or ctx.json or not sys.stderr.isatty():
        result = scenario.run(file, out)
        if live:
            result["live"] = _live_figures(scenario_live.run_live(scenario.load(file), out))
    else:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                      TimeElapsedColumn(), transient=True) as bar:  # fmt: skip
            task = bar.add_task(f"simulating {file.name}", total=1.0)

            def progress(at: int, total: int) -> None:
                bar.update(task, completed=at / total if total else 1.0)

            result = scenario.run(file, out, progress)
            if live:
                task = bar.add_task(f"playing {file.name} live", total=1.0)
                result["live"] = _live_figures(scenario_live.run_live(scenario.load(file), out, progress))

    def text() -> str:
        f: dict[str, Any] = result["figures"]
        return (
            f"{result['scenario']}: report in {result['out']}\n"
            f"  delivery ratio {f['delivery_ratio']} (baseline {f['baseline_delivery_ratio']}), "
            f"over the bound: median {f['over_bound']['median']}, p99 {f['over_bound']['p99']}\n"
            f"  issuance available {f['issuance_available_mean']} (baseline {f['baseline_issuance_available_mean']})\n"
            f"  invariants held"
            + (f"\n  live: matches the simulation ({result['live']['delivered_both']} deliveries, at most "
               f"{result['live']['max_difference_ms']} ms apart)" if "live" in result else "")
        )  # fmt: skip

    ctx.emit(result, text)


def _live_figures(live: dict[str, Any]) -> dict[str, Any]:
    return {k: live[k] for k in ("matches", "delivered_both", "max_difference_ms", "tolerance_ms")}
