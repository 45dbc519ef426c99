"""``qhx-edge scenario run``: run a scenario file and write its report (docs/simulation.md; issue 12).

The engine (:mod:`qhx_edge.sim.engine`) is pure and deterministic; this module reads the file and
writes what a planner reads: ``report.json`` (sorted keys: two runs of one scenario give the same
bytes), ``summary.md``, and PNG plots (matplotlib, imported only here): staleness per node over time,
the mode timeline, issuance availability beside the baseline, each revocation's arrival against its
bound, and revocation delays beside the baseline's.  A broken invariant fails the run (``invariant``,
exit 1) after the report is written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qhx_edge.core.errors import Malformed, Rejected
from qhx_edge.sim import engine, scenario
from qhx_edge.store.files import atomic_write, read_capped

PLOT_SIZE = (8.0, 4.5)  # inches, at PLOT_DPI: 800 x 450 pixels
PLOT_DPI = 100
PLOTS = ("staleness.png", "modes.png", "availability.png", "propagation.png", "baseline.png")


class InvariantBroken(Rejected):
    """A run broke an invariant the product promises (its report says which)."""

    kind = "invariant"


def load(path: Path) -> scenario.Scenario:
    raw = read_capped(path, scenario.MAX_SCENARIO_FILE, "scenario file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Malformed(f"{path}: a scenario file is UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return scenario.load(text, str(path))


def run(path: Path, out: Path, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run ``path``, write the report into ``out``; what was written."""
    sc = load(path)
    report = engine.run(sc, progress)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.json", (json.dumps(report, sort_keys=True, indent=1) + "\n").encode())
    atomic_write(out / "summary.md", summary(report).encode())
    plots(report, out)
    written = {"report": str(out / "report.json"), "summary": str(out / "summary.md"),
               "plots": [str(out / p) for p in PLOTS]}  # fmt: skip
    result = {"scenario": sc.name, "out": str(out), "written": written, "figures": headline(report)}
    if not report["invariants"]["held"]:
        broken = report["invariants"]["broken"]
        raise InvariantBroken(f"{len(broken)} invariant(s) broken, first: {broken[0]} (see {out / 'report.json'})")
    return result


def headline(r: dict[str, Any]) -> dict[str, Any]:
    avail = list(r["issuance_available"].values())
    base = list(r["baseline"]["issuance_available"].values())
    return {
        "delivery_ratio": r["delivery_ratio"],
        "delivery_ratio_reachable": r["delivery_ratio_reachable"],
        "over_bound": r["over_bound"],
        "issuance_available_mean": round(sum(avail) / len(avail), 4) if avail else None,
        "baseline_issuance_available_mean": round(sum(base) / len(base), 4) if base else None,
        "baseline_delivery_ratio": r["baseline"]["delivery_ratio"],
        "invariants_held": r["invariants"]["held"],
    }


def _h(ms: int | None) -> str:
    return "never" if ms is None else f"{ms / 3_600_000:.2f} h"


def summary(r: dict[str, Any]) -> str:
    """The Markdown a planner reads first."""
    h = headline(r)
    lines = [
        f"# Scenario {r['scenario']}",
        "",
        f"{r['nodes']} nodes, {r['contacts']} contacts, {r['duration_ms'] / 3_600_000:g} h simulated, "
        f"seed {r['seed']}; {r['events']} events, {r['sync_contacts']} sync contacts.",
        "",
        "| | qhx-edge | SPIRE-like baseline |",
        "|---|---|---|",
        f"| delivery ratio | {h['delivery_ratio']} ({h['delivery_ratio_reachable']} of what the contacts allow) | "
        f"{h['baseline_delivery_ratio']} |",
        f"| issuance available (mean over nodes) | {h['issuance_available_mean']} | "
        f"{h['baseline_issuance_available_mean']} |",
        f"| median latency | {_h(r['latency_ms']['median'])} | {_h(r['baseline']['latency_ms_median'])} |",
        "",
        f"Propagation over the earliest-arrival bound: median {r['over_bound']['median']}, "
        f"p99 {r['over_bound']['p99']}. Overhead ratio (bytes moved per document byte): {r['overhead_ratio']}.",
        "",
    ]
    for key, rev in sorted(r["revocations"].items()):
        lines += [f"## Revocation {key}", "", "| node | qhx-edge | bound | baseline |", "|---|---|---|---|"]
        base = r["baseline"]["revocations"].get(key, {})
        t0 = rev["published_ms"]
        for node, got in sorted(rev["arrivals_ms"].items()):
            b = base.get(node)
            bound = rev["bound_ms"].get(node)
            cells = [_h(None if x is None else x - t0) for x in (got, bound, b)]
            lines.append(f"| {node} | " + " | ".join(cells) + " |")
        lines.append("")
    if r.get("requests"):
        lines += ["## Workload requests", "", "| node | made | refused by qhx-edge | refused by the baseline |",
                  "|---|---|---|---|"]  # fmt: skip
        for node, q in sorted(r["requests"].items()):
            lines.append(f"| {node} | {q['made']} | {q['refused']} | {q['refused_baseline']} |")
        lines.append("")
    lines.append("Invariants: " + ("all held." if r["invariants"]["held"] else "BROKEN:"))
    lines += [f"- {b}" for b in r["invariants"]["broken"]]
    return "\n".join(lines) + "\n"


def plots(r: dict[str, Any], out: Path) -> None:
    """The five plots, each PLOT_SIZE at PLOT_DPI, with no timestamp in their metadata."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    s = r["series"]
    hours = s["hours"]

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=PLOT_DPI, metadata={"Software": None})
        plt.close(fig)

    fig, ax = plt.subplots(figsize=PLOT_SIZE)
    if "staleness_h" in s:
        for node, ys in s["staleness_h"].items():
            ax.plot(hours, [float("nan") if y is None else y for y in ys], label=node, linewidth=1)
        if len(s["staleness_h"]) <= 12:
            ax.legend(fontsize="small", ncol=3)
    else:
        for k, ys in s["staleness_h_quantiles"].items():
            ax.plot(hours, [float("nan") if y is None else y for y in ys], label=k)
        ax.legend(fontsize="small")
    ax.set(xlabel="simulated time (h)", ylabel="staleness (h)", title="Staleness per node")
    save(fig, "staleness.png")

    fig, ax = plt.subplots(figsize=PLOT_SIZE)
    modes = s["modes"]
    ax.stackplot(hours, modes["connected"], modes["degraded"], modes["expired"],
                 labels=["connected", "degraded", "expired"], colors=["#4c9a2a", "#e0a526", "#c0392b"])  # fmt: skip
    ax.set(xlabel="simulated time (h)", ylabel="nodes", title="Issuance mode over time")
    ax.legend(loc="upper right", fontsize="small")
    save(fig, "modes.png")

    fig, ax = plt.subplots(figsize=PLOT_SIZE)
    names = sorted(r["issuance_available"])
    shown = names if len(names) <= 40 else names[:: max(1, len(names) // 40)]
    x = range(len(shown))
    ax.bar([i - 0.2 for i in x], [r["issuance_available"][n] for n in shown], width=0.4, label="qhx-edge")
    ax.bar([i + 0.2 for i in x], [r["baseline"]["issuance_available"][n] for n in shown], width=0.4,
           label="SPIRE-like baseline")  # fmt: skip
    ax.set_xticks(list(x), shown, rotation=90 if len(shown) > 8 else 0, fontsize="small")
    ax.set(ylabel="share of samples able to issue", ylim=(0, 1.05), title="Issuance availability")
    ax.legend(fontsize="small")
    save(fig, "availability.png")

    fig, ax = plt.subplots(figsize=PLOT_SIZE)
    top = 0.0
    for key, rev in sorted(r["revocations"].items()):
        t0 = rev["published_ms"]
        pts = [((b - t0) / 3_600_000, (g - t0) / 3_600_000) for n, g in rev["arrivals_ms"].items()
               if g is not None and (b := rev["bound_ms"].get(n)) is not None]  # fmt: skip
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=key, s=12)
            top = max(top, *(max(p) for p in pts))
    ax.plot([0, top or 1], [0, top or 1], color="grey", linewidth=0.8, label="the bound")
    ax.set(xlabel="earliest possible arrival (h after publication)", ylabel="arrival (h after publication)",
           title="Revocation propagation against the earliest-arrival bound")  # fmt: skip
    ax.legend(fontsize="small")
    save(fig, "propagation.png")

    fig, ax = plt.subplots(figsize=PLOT_SIZE)
    horizon = r["duration_ms"] / 3_600_000
    rows = []
    for key, rev in sorted(r["revocations"].items()):
        t0 = rev["published_ms"]
        base = r["baseline"]["revocations"].get(key, {})
        for n, g in sorted(rev["arrivals_ms"].items()):
            b = base.get(n)
            rows.append((f"{n}", horizon if g is None else (g - t0) / 3_600_000,
                         horizon if b is None else (b - t0) / 3_600_000))  # fmt: skip
    rows = rows[:40]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [q for _, q, _ in rows], width=0.4, label="qhx-edge")
    ax.bar([i + 0.2 for i in x], [b for _, _, b in rows], width=0.4, label="SPIRE-like baseline (never: full height)")
    ax.set_xticks(list(x), [n for n, _, _ in rows], rotation=90 if len(rows) > 8 else 0, fontsize="small")
    ax.set(ylabel="hours after publication", title="Revocation delay: qhx-edge against the baseline")
    ax.legend(fontsize="small")
    save(fig, "baseline.png")
