"""``audit verify`` and ``audit checkpoint``: a home's audit logs against their signed checkpoints.

A node home has one log (``node.sqlite``'s audit chain, checkpoints signed by
the node's key); an authority home has the rejections log of its evidence
store and the attempts log of its attestation store (checkpoints signed by the
authority's own key, the key of its card) and the node chains it holds as
evidence (checkpoints signed by each node's pinned key).  See
:mod:`qhx_edge.core.checkpoint` for the rules and the stable reasons of an
``audit-broken`` finding.

The key checkpoints are checked against is the one in the home's card; the
card sits in the same files an attacker would edit, so it is itself checked
against what the attacker cannot rewrite, as far as this command has it: the
keystore's signing key (when the passphrase is at hand), a fingerprint given
out of band (``--expect-fingerprint``), and on a node its delegation (the
authority signed the card fingerprint it delegated to).  The report says
which of these it checked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from qhx_edge.core import checkpoint
from qhx_edge.core.cards import Card, parse_card
from qhx_edge.core.documents import Delegation
from qhx_edge.core.errors import MissingFile, PassphraseError, QhxError
from qhx_edge.homes.layout import is_authority
from qhx_edge.store.identity import SIGNING_KEY
from qhx_edge.store.keystore import Keystore

PassphraseSource = Callable[[], bytes]
KEY_MISMATCH = "key-mismatch"  # the home's card is not its key's, or not the card it should be
UNPROTECTED = "unprotected"  # more rows beyond the last checkpoint than allowed (--max-unprotected)


def _key_basis(home: Path, card: Card, get_passphrase: PassphraseSource | None, expect: str | None) -> list[str]:
    basis = ["card"]
    if expect is not None:
        if expect.lower() != card.fingerprint:
            raise checkpoint.AuditBroken(
                KEY_MISMATCH, f"the home's card fingerprint {card.fingerprint} is not the expected {expect}"
            )
        basis.append("expected-fingerprint")
    if get_passphrase is not None:
        try:
            key = Keystore.open(home, get_passphrase).load(SIGNING_KEY)
        except (PassphraseError, MissingFile):
            key = None
        if key is not None:
            if key.public.keyid != card.signing_key.keyid:
                raise checkpoint.AuditBroken(KEY_MISMATCH, "the home's card does not carry the keystore's signing key")
            basis.append("keystore")
    return basis


def _fail_unprotected(report: dict[str, Any], limit: int | None) -> None:
    if limit is not None and report["unprotected"] > limit:
        exc = checkpoint.AuditBroken(
            UNPROTECTED,
            f"{report['unprotected']} audit rows are beyond the last checkpoint (at most {limit} allowed)",
            seq=(report["last_seq"] or 0) - report["unprotected"] + 1,
        )
        exc.report = {**report, "finding": exc.finding()}
        raise exc


def verify(
    home: Path,
    get_passphrase: PassphraseSource | None = None,
    *,
    expect: str | None = None,
    max_unprotected: int | None = None,
) -> dict[str, Any]:
    """Verify every audit log of the home; raises :class:`~qhx_edge.core.checkpoint.AuditBroken`."""
    home = Path(home)
    if is_authority(home):
        return _verify_authority(home, get_passphrase, expect, max_unprotected)
    return _verify_node(home, get_passphrase, expect, max_unprotected)


def _verify_node(
    home: Path, get_passphrase: PassphraseSource | None, expect: str | None, max_unprotected: int | None
) -> dict[str, Any]:
    from qhx_edge.store.trust_store import Store

    store = Store.open(home)
    try:
        card = parse_card(store.card())
        basis = _key_basis(home, card, get_passphrase, expect)
        try:
            held = store.current(store.node_info()["home_domain"], "delegation")
        except QhxError:
            held = None
        if held is not None and isinstance(held.payload, Delegation):
            if held.payload.card_fingerprint != card.fingerprint:
                raise checkpoint.AuditBroken(
                    KEY_MISMATCH, f"the held delegation v{held.payload.version} names another card than the home's"
                )
            basis.append("delegation")
        report = store.verify_audit(card.signing_key)
        _fail_unprotected(report, max_unprotected)
    finally:
        store.close()
    return {"home": "node", "key": _key_json(card, basis), "logs": {"node": report}}


def _verify_authority(
    home: Path, get_passphrase: PassphraseSource | None, expect: str | None, max_unprotected: int | None
) -> dict[str, Any]:
    from qhx_edge.homes import attestation, evidence
    from qhx_edge.homes.authority import CARD
    from qhx_edge.store.files import read_capped

    card = parse_card(read_capped(home / CARD, 1 << 20, "authority card"))
    basis = _key_basis(home, card, get_passphrase, expect)
    logs = {
        "evidence": evidence.verify_store(home, card.signing_key, card.node_id, card.domain),
        "attestation": attestation.verify_store(home, card.signing_key, card.node_id, card.domain),
    }
    for report in logs.values():
        if report.get("present"):
            _fail_unprotected(report, max_unprotected)
    return {"home": "authority", "key": _key_json(card, basis), "logs": logs}


def _key_json(card: Card, basis: list[str]) -> dict[str, Any]:
    return {"keyid": card.signing_key.keyid, "card_fingerprint": card.fingerprint, "checked_against": basis}


def checkpoint_now(home: Path, get_passphrase: PassphraseSource, now: int) -> dict[str, Any]:
    """Sign a checkpoint over the rows beyond the last one now (with the home's key, unlocked)."""
    home = Path(home)
    ident_key = Keystore.open(home, get_passphrase).load(SIGNING_KEY)
    if is_authority(home):
        from qhx_edge.homes import attestation, evidence
        from qhx_edge.homes.authority import CARD
        from qhx_edge.store.files import read_capped

        card = parse_card(read_capped(home / CARD, 1 << 20, "authority card"))
        return {
            "home": "authority",
            "logs": {
                "evidence": evidence.checkpoint_store(home, ident_key, card, now),
                "attestation": attestation.checkpoint_store(home, ident_key, card, now),
            },
        }
    from qhx_edge.store.trust_store import Store

    store = Store.open(home)
    try:
        last = store.checkpoint_audit(now, ident_key)
    finally:
        store.close()
    return {"home": "node", "logs": {"node": last}}


def text(result: dict[str, Any]) -> str:
    """``audit verify`` as text."""
    lines = []
    key = result["key"]
    lines.append(
        f"{result['home']} key {key['keyid'][:16]} (card {key['card_fingerprint'][:16]}), "
        f"checked against: {', '.join(key['checked_against'])}"
    )
    for name, r in result["logs"].items():
        if not r.get("present", True):
            lines.append(f"{name}: no {name} store yet")
            continue
        lines.append(_log_line(name, r))
        for node_id, nr in r.get("nodes", {}).items():
            lines.append("  " + _log_line(f"node {node_id}", nr))
    return "\n".join(lines)


def _log_line(name: str, r: dict[str, Any]) -> str:
    cp = r.get("last_checkpoint")
    where = f"checkpoint {cp['n']} at row {cp['seq']}" if cp else "no checkpoint"
    line = f"{name}: {r['entries']} rows verified, {r['checkpoints']} checkpoints, last {where}"
    if r["unprotected"]:
        line += f"; WARNING: {r['unprotected']} rows beyond the last checkpoint (protected by the hash chain only)"
    if r.get("latest_record") == "lagging":
        line += "; the checkpoint record beside the store lags (written after each commit)"
    return line


def failure_text(exc: checkpoint.AuditBroken) -> str:
    return f"audit log BROKEN ({exc.reason}{f' at row {exc.seq}' if exc.seq else ''}): {exc.message}"
