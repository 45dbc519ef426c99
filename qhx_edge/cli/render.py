"""What the command line prints: one JSON object with ``--json``, text otherwise.

The contract stated in :mod:`qhx_edge.cli`: success is ``{"ok": true,
...}`` on standard output; a failure is ``{"ok": false, "error": {"kind": ...,
"message": ...}}`` with ``--json``, else ``error [KIND]: MESSAGE`` on standard
error.  Keys are sorted, so the output of a command is stable byte for byte.

This module formats and prints; it decides nothing.  It imports only the
standard library and click, because every command, ``status`` first, loads it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True)


def emit(as_json: bool, data: dict[str, Any], text: str | Callable[[], str]) -> None:
    """A success: ``{"ok": true, **data}``, or ``text`` (called only when text is printed)."""
    if as_json:
        click.echo(dumps({"ok": True, **data}))
    else:
        click.echo(text() if callable(text) else text)


def failure(as_json: bool, kind: str, message: str) -> None:
    """A failure of kind ``kind`` (the caller chooses the exit code)."""
    if as_json:
        click.echo(dumps({"ok": False, "error": {"kind": kind, "message": message}}))
    else:
        click.echo(f"error [{kind}]: {message}", err=True)


def rejected(
    as_json: bool, error: dict[str, Any], report: dict[str, Any], summary: str, details: Iterable[str] = ()
) -> None:
    """A rejection that carries a report (an import): the report with the error, or its summary and details."""
    if as_json:
        click.echo(dumps({"ok": False, "error": error, **report}))
        return
    click.echo(summary)
    for line in details:
        click.echo(line, err=True)
    click.echo(f"error [{error['kind']}]: {error['message']}", err=True)


def when(ts: int | None) -> str:
    """A Unix time as ``YYYY-MM-DD HH:MM:SSZ`` (UTC); ``-`` for none."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# --- views of operation results ---------------------------------------------------------------


def published_text(items: list[dict[str, Any]], what: str) -> str:
    return "\n".join(f"published {i['type']} v{i['version']} ({what})" for i in items)


def rejected_documents(report: dict[str, Any]) -> list[str]:
    """One line per rejected document of an import report."""
    lines = []
    for d in report["documents"]:
        if d["report"].startswith("rejected"):
            what = f"{d.get('type', '?')} v{d.get('version', '?')}" if "type" in d else f"document {d['index']}"
            lines.append(f"  {what}: {d['report']}: {d['error']['message']}")
    return lines


def authority_status_text(st: dict[str, Any]) -> str:
    lines = [f"authority for {st['domain']} (suite {st['suite']}, CA generation {st['ca_generation']})"]
    lines.append(f"root fingerprint: {st['root_fingerprint']}")
    for t, d in st["documents"].items():
        lines.append(f"  {t:<10} v{d['version']:<4} issued {when(d['issued_at'])}  expires {when(d['expires'])}")
    roles = ", ".join(f"{r} {s['threshold']}-of-{s['keys']}" for r, s in st["roles"].items())
    lines.append(f"roles: {roles}")
    return "\n".join(lines)


def node_status_text(st: dict[str, Any]) -> str:
    lines = [f"node {st['node_id']} ({st['home_domain']})  clock: {st['clock']}"]
    if st.get("clock_reason"):
        lines.append(f"  clock: {st['clock_reason']}")
    dg = st.get("delegation", {})
    if dg.get("present"):
        state = "EXPIRED" if dg["expired"] else f"valid until {when(dg['expires'])}"
        lines.append(f"  delegation v{dg['version']} ({dg['method']}, {', '.join(dg['algorithms'])}): {state}")
    else:
        lines.append("  delegation: none (not attested: 'node attest request' to issue SVIDs)")
    for dom, d in st["domains"].items():
        v = d["versions"]
        lines.append(
            f"  {dom} [{d['relation']}] mode {d['mode']}, staleness {d['staleness']} s, max TTL {d['max_ttl']} s\n"
            f"    root v{v['root']} bundle v{v['bundle']} policy v{v['policy']} freshness v{v['freshness']}"
            f" issued {when(d['freshness_issued_at'])}"
        )
        for t, end in d.get("expired_documents", {}).items():
            lines.append(f"    EXPIRED: the held {t} expired {when(end)}; import newer material")
        ag = d.get("agreement")
        if ag:
            lines.append(
                f"    agreement v{ag['version']} ({ag['status']}, until {when(ag['expires'])}), "
                f"budget {ag['max_staleness']} s, accepts {', '.join(ag['accepts']) or 'nothing'}"
                + (f": {ag['reason']}" if ag.get("reason") else "")
            )
    return "\n".join(lines)


def document_list_text(docs: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{d['domain']:<24} {d['type']:<10} v{d['version']:<5} {d['digest'][:16]}"
        + (" current" if d["current"] else "")
        for d in docs
    )


def summary_lines(summ: dict[str, Any]) -> list[str]:
    return [
        f"{dom:<24} {t:<10} v{d['version']:<5} {d['digest'][:16]}"
        for dom, types in summ["domains"].items()
        for t, d in sorted(types.items())
    ]


def spiffe_export_text(info: dict[str, Any], to: Path) -> str:
    """What ``bundle export --to`` wrote."""
    lines = [
        f"wrote the SPIFFE bundle of {info['domain']} (sequence {info['sequence']}, "
        f"{info['x509_authorities']} X.509 and {info['jwt_authorities']} JWT authorities) to {to}"
    ]
    lines += [f"left out: {line}" for line in info["left_out"]]
    return "\n".join(lines)
