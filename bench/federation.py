"""Partner X.509-SVID verification and SPIFFE bundle import on a node, against their raw limits, as paired medians.

Run ``python bench/federation.py`` (``--quick`` for CI, ``--dir`` for where the
homes go: a real disk) from the repository root.  It prints one JSON object.
Every figure is a paired median (bench/common.py): rounds alternate the limit
and the measured side, each measured round is divided by the limit round
beside it, and the median of those ratios is the headline.

Set-up (not timed) is the product's own flow, by files only, through the real
command line run in this process (``qhx_edge.cli.main``): a beta.example
authority (hybrid suite, so its bundle holds an ES256 and an ML-DSA-65 domain
CA) publishes a policy, attests its node with a join token (request,
challenge, evidence, delegation pack) and that node's real ``Issuer`` mints
X.509-SVIDs, written as PEM files and read back as ``svid verify`` reads them;
an alpha.example authority (classical, as tests/test_federation.py) and beta
make the agreement of tests/test_federation.py (``TERMS``, plus
``--allow-spiffe-bundles``: propose, accept, publish on both sides); one alpha
node imports alpha's pack and beta's release for alpha (the partner is
``connected``), another only alpha's pack (it takes beta's bundle in the
SPIFFE format).

* ``partner_x509_verify.<alg>`` (``p256``, ``mldsa65``): partner chains
  (leaf, the beta node's delegated intermediate) of ``spiffe://beta.example/
  ns/logistics/...`` verified per second through ``Node.verify_svid(chain,
  now)``, **one chain per call** (the clock checks, the agreement gate, scope
  and staleness, the held bundle, then ``core.svid.verify_x509_svid``) ÷ the
  raw limit of the same round: exactly the signatures the chain has (the leaf
  under the intermediate's key, the intermediate under the bundle's domain CA
  key) checked with ``cryptography`` alone, public keys loaded once, over the
  certificates' own TBS bytes.  Target >= 0.70.  ``core``: the same for
  ``core.svid.verify_x509_svid`` alone (the held bundle's authorities passed
  in), so the node's share is visible (``node_us_per_chain`` -
  ``core_us_per_chain``).  ``spiffe_bundle_node``: ``Node.verify_svid`` on the
  node whose trust in beta comes from an imported SPIFFE bundle (the
  lower-assurance path), no target.
* ``spiffe_bundle_import``: ``Node.import_spiffe_bundle(data, "beta.example",
  now)`` per second, each bundle a new higher ``spiffe_sequence`` (a partner's
  rotations; beta's real authorities, written by ``core.spiffe_bundle.to_json``)
  ÷ the limit of the same round: ``core.spiffe_bundle.parse`` of the same bytes
  plus one fsynced SQLite commit inserting them (WAL, ``synchronous=FULL``, a
  database in the same folder as the node's).  Target >= 0.5 (see
  ``IMPORT_TARGET``); ``measured_imports_per_s`` is the absolute rate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python bench/federation.py), as CI does
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography import x509
from cryptography.hazmat.backends.openssl import backend as openssl_backend
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.hazmat.primitives.serialization import Encoding

from bench.common import figure, main, paired, timed
from qhx_edge import cli
from qhx_edge.core import spiffe_bundle, svid
from qhx_edge.core.documents import Bundle
from qhx_edge.homes.node import Node
from qhx_edge.issue.issuer import Issuer

VERIFY_TARGET = 0.70
# Both sides of an import pay the strict parse and a durable SQLite commit of the same bytes; the node
# adds the agreement gate (reads of its agreement, epoch and policy), the content digest and a
# hash-chained audit entry in the same transaction, and, where the store can sign, a signed audit
# checkpoint kept beside the store after the commit (docs/architecture.md "Audit checkpoints"): one
# atomic file write, two more fsyncs.  Not met today (about 0.3, ~430 imports/s on this machine's disk):
# the checkpoint record is the difference, and it stays, as every trust change is checkpointed at once.
IMPORT_TARGET = 0.5
ALPHA, BETA = "alpha.example", "beta.example"
SCOPE = f"spiffe://{BETA}/ns/logistics"
# tests/test_federation.py TERMS: what alpha accepts from beta, releases, and its staleness budget.
TERMS = (
    "--accept", SCOPE, "--release", "bundle", "--release", "freshness",
    "--max-staleness", "1h", "--expires", "30d", "--partner-accept", f"spiffe://{ALPHA}/ns/ops",
)  # fmt: skip
ALGS = {"p256": ("ES256", f"{SCOPE}/api"), "mldsa65": ("ML-DSA-65", f"{SCOPE}/pq/api")}
GID_BASE = 3_000_000  # registration i: selector unix:gid:GID_BASE+i


@dataclass(frozen=True)
class Sizes:
    rounds: int  # paired rounds per verification figure (odd: the median is a round's own ratio)
    calls: dict[str, int]  # chains verified per round, by algorithm
    chains: int  # distinct SVIDs per algorithm, cycled
    import_rounds: int  # paired rounds of the SPIFFE bundle import
    imports: int  # bundles imported per round


FULL = Sizes(rounds=9, calls={"p256": 240, "mldsa65": 160}, chains=8, import_rounds=9, imports=60)
QUICK = Sizes(rounds=5, calls={"p256": 80, "mldsa65": 60}, chains=4, import_rounds=5, imports=15)


# --- set-up: the real command line, in this process ----------------------------------------------


def qhx(*args: str | Path) -> dict[str, Any]:
    """``qhx-edge --json ARGS`` through the real entry point (``cli.main``); its JSON object (exit 0 only)."""
    argv = [str(a) for a in args]
    at = argv.index("--home") + 2 if "--home" in argv else 0
    argv.insert(at, "--json")
    out, err = io.StringIO(), io.StringIO()
    code: Any = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(argv)
        except SystemExit as exc:
            code = exc.code
    if code not in (0, None):
        raise RuntimeError(f"qhx-edge {' '.join(argv)} exited {code}: {out.getvalue()} {err.getvalue()[-2000:]}")
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


def authority(tmp: Path, name: str, domain: str, suite: str) -> tuple[Path, Path, str]:
    """An authority home (keys unencrypted: set-up speed), its anchor file and fingerprint."""
    home = tmp / name
    qhx("--home", home, "authority", "init", "--domain", domain, "--suite", suite, "--no-passphrase")
    anchor = tmp / f"{name}-root.cbor"
    return home, anchor, qhx("--home", home, "authority", "anchor", "--to", anchor)["fingerprint"]


def node_home(tmp: Path, name: str, auth: tuple[Path, Path, str]) -> Path:
    home = tmp / name
    qhx("--home", home, "node", "init", "--anchor", auth[1], "--expect-fingerprint", auth[2], "--no-passphrase")
    return home


def carry(src: Path, dst: Path, pack_file: Path, *export: str) -> None:
    """``pack export`` on ``src`` and ``pack import`` of that file on ``dst``."""
    qhx("--home", src, "pack", "export", *export, "--to", pack_file)
    qhx("--home", dst, "pack", "import", pack_file)


def registrations(chains: int) -> list[tuple[str, str, int]]:
    """(algorithm name, SPIFFE ID, gid of its selector) of beta's registrations: ``chains`` per algorithm."""
    items = [(name, prefix) for name, (_, prefix) in ALGS.items() for _ in range(chains)]
    return [(name, f"{prefix}-{i}", GID_BASE + i) for i, (name, prefix) in enumerate(items)]


def beta_policy(path: Path, chains: int) -> None:
    lines = [
        '[staleness]\nsoft = "12h"\nhard = "96h"\nsvid_ttl = "1h"\nttl_floor = "5m"\n',
        '[algorithms]\n"/" = "ES256"\n"/ns/logistics/pq/" = "ML-DSA-65"\n',
    ]
    for _, spiffe_id, gid in registrations(chains):
        lines.append(f'[[registrations]]\nspiffe_id = "{spiffe_id}"\nselectors = ["unix:gid:{gid}"]\n')
    path.write_text("\n".join(lines))


def attest(tmp: Path, auth: Path, home: Path) -> None:
    """The join-token attestation of .ci/demo, by pack files: request, challenge, evidence, delegation."""
    token = qhx("--home", auth, "authority", "join-token", "create", "--ttl", "15m")["token"]
    card, req, chal, ev, dele = (tmp / f"attest-{n}" for n in ("card", "req.pack", "chal.pack", "ev.pack", "del.pack"))
    qhx("--home", auth, "node", "card", "--to", card)
    qhx("--home", home, "node", "attest", "request", "--method", "join-token", "--token", token,
        "--authority-card", card, "--to", req)  # fmt: skip
    qhx("--home", auth, "authority", "attest", "challenge", req, "--to", chal)
    qhx("--home", home, "node", "attest", "respond", chal, "--to", ev)
    qhx("--home", auth, "authority", "attest", "finish", ev, "--to", dele)
    qhx("--home", home, "pack", "import", dele)


def agree(tmp: Path, a: tuple[Path, Path, str], b: tuple[Path, Path, str], partner: str, *terms: str) -> None:
    """tests/test_federation.py ``agree``: ``a`` proposes, ``b`` accepts, both publish."""
    proposal, agreement = tmp / "ab-proposal.pack", tmp / "ab-agreement.pack"
    qhx("--home", a[0], "federation", "propose", "--partner", partner, "--partner-anchor", b[1],
        "--expect-fingerprint", b[2], *terms, "--to", proposal)  # fmt: skip
    qhx("--home", b[0], "federation", "accept", proposal, "--expect-fingerprint", a[2], "--to", agreement)
    qhx("--home", b[0], "federation", "publish", agreement)
    qhx("--home", a[0], "federation", "publish", agreement)


def mint(tmp: Path, home: Path, chains: int) -> dict[str, list[list[bytes]]]:
    """Beta's SVIDs from its node's real Issuer, as PEM files, read back as ``svid verify`` reads them
    (the loud no-passphrase warning of the set-up keystore swallowed)."""
    out: dict[str, list[list[bytes]]] = {name: [] for name in ALGS}
    now = int(time.time())
    with contextlib.redirect_stderr(io.StringIO()), Issuer(home, lambda: b"", now=lambda: now) as iss:
        for name, spiffe_id, gid in registrations(chains):
            (s,) = iss.x509_svids(frozenset({f"unix:gid:{gid}"}))
            assert s.spiffe_id == spiffe_id, s.spiffe_id
            leaf = x509.load_der_x509_certificate(s.cert_chain[0])
            assert leaf.signature_algorithm_oid == _SIG_OIDS[ALGS[name][0]], leaf.signature_algorithm_oid
            pem = tmp / "svids" / f"{name}-{gid}.pem"
            pem.parent.mkdir(exist_ok=True)
            pem.write_bytes(
                b"".join(x509.load_der_x509_certificate(c).public_bytes(Encoding.PEM) for c in s.cert_chain)
            )
            out[name].append(svid.load_chain(pem.read_bytes()))
    return out


_SIG_OIDS = {
    "ES256": x509.ObjectIdentifier("1.2.840.10045.4.3.2"),
    "ML-DSA-65": x509.ObjectIdentifier("2.16.840.1.101.3.4.3.18"),
}


@dataclass
class Fixture:
    verify_home: Path  # alpha node: beta connected by its signed bundle
    spiffe_home: Path  # alpha node: beta's bundle only in the SPIFFE format
    chains: dict[str, list[list[bytes]]]
    bundle: Bundle  # beta's signed bundle as the verifying node holds it
    setup_s: float


def setup(tmp: Path, sizes: Sizes) -> Fixture:
    t0 = time.perf_counter()
    b = authority(tmp, "B", BETA, "hybrid")
    policy = tmp / "beta-policy.toml"
    beta_policy(policy, sizes.chains)
    qhx("--home", b[0], "authority", "publish", "policy", policy)
    bn = node_home(tmp, "BN", b)
    carry(b[0], bn, tmp / "b-own.pack")
    attest(tmp, b[0], bn)
    chains = mint(tmp, bn, sizes.chains)

    a = authority(tmp, "A", ALPHA, "classical")
    n, s = node_home(tmp, "N", a), node_home(tmp, "S", a)
    agree(tmp, a, b, BETA, *TERMS, "--allow-spiffe-bundles")
    carry(a[0], n, tmp / "a.pack")
    qhx("--home", s, "pack", "import", tmp / "a.pack")
    carry(b[0], n, tmp / "b-for-alpha.pack", "--partner", ALPHA)
    status = qhx("--home", n, "status")["domains"][BETA]
    assert status["mode"] == "connected", status
    with Node(n) as node:
        held = node.store.current(BETA, "bundle")
    assert held is not None
    assert isinstance(held.payload, Bundle)
    return Fixture(n, s, chains, held.payload, time.perf_counter() - t0)


# --- the raw limits --------------------------------------------------------------------------------


def raw_checks(
    chain: Sequence[bytes], authorities: Sequence[bytes], keys: dict[bytes, Any]
) -> list[Callable[[], None]]:
    """The signature checks ``chain`` needs (each certificate under the next, the top under its bundle CA),
    with ``cryptography`` alone; public keys loaded once (``keys``, by issuer DER)."""
    certs = [x509.load_der_x509_certificate(c) for c in chain]
    roots = [x509.load_der_x509_certificate(c) for c in authorities]
    anchor = None
    for r in roots:  # set-up only: which of the bundle's CAs issued the top
        with contextlib.suppress(Exception):
            certs[-1].verify_directly_issued_by(r)
            anchor = r
            break
    assert anchor is not None
    out: list[Callable[[], None]] = []
    for cert, issuer in zip(certs, [*certs[1:], anchor], strict=True):
        der = issuer.public_bytes(Encoding.DER)
        if der not in keys:
            keys[der] = issuer.public_key()
        key = keys[der]
        if isinstance(key, ec.EllipticCurvePublicKey):
            hash_alg = cert.signature_hash_algorithm
            assert hash_alg is not None
            check = partial(key.verify, cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_alg))
        else:
            assert isinstance(key, mldsa.MLDSA65PublicKey), type(key)
            check = partial(key.verify, cert.signature, cert.tbs_certificate_bytes)
        check()  # every raw check must pass, or the limit measures nothing
        out.append(check)
    return out


def fsynced_table(path: Path) -> sqlite3.Connection:
    """A WAL-mode SQLite database with ``synchronous=FULL``, as a node store opens its own."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS bundles (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    return conn


# --- figures ----------------------------------------------------------------------------------------


def summary(result: dict[str, float], target: float | None, unit: str) -> dict[str, Any]:
    detail = {
        f"limit_{unit}_per_s": round(result["limit_median"], 1),
        f"measured_{unit}_per_s": round(result["measured_median"], 1),
        "ratio_best_of": round(result["ratio_best"], 4),
        "rounds": result["rounds"],
    }
    if target is None:
        return {"value": round(result["ratio"], 4), "target": None, **detail}
    return figure(result["ratio"], target, **detail)


def verify_figures(fx: Fixture, sizes: Sizes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    authorities = fx.bundle.x509_authorities
    keys: dict[bytes, Any] = {}
    with Node(fx.verify_home) as n, Node(fx.spiffe_home) as s:
        for name, chains in fx.chains.items():
            calls = sizes.calls[name]
            seq = [chains[i % len(chains)] for i in range(calls)]
            checks = {id(c): raw_checks(c, authorities, keys) for c in chains}
            flat = [f for c in seq for f in checks[id(c)]]

            def limit(flat: list[Callable[[], None]] = flat, calls: int = calls) -> float:
                def go() -> None:
                    for f in flat:
                        f()

                return timed(calls, go)

            def node_rate(node: Node, seq: list[list[bytes]] = seq, calls: int = calls) -> Callable[[], float]:
                def go() -> None:
                    now = int(time.time())
                    for c in seq:
                        node.verify_svid(c, now)

                return lambda: timed(calls, go)

            def core_rate(seq: list[list[bytes]] = seq, calls: int = calls) -> float:
                def go() -> None:
                    now = int(time.time())
                    for c in seq:
                        svid.verify_x509_svid(c, authorities, now)

                return timed(calls, go)

            got = n.verify_svid(seq[0], int(time.time()))  # warm-up, and what the node says of the chain
            assert (got["relation"], got["assurance"], got["domain"]) == ("partner", "signed", BETA), got
            node_fig = summary(paired(sizes.rounds, limit, node_rate(n)), VERIFY_TARGET, "chains")
            core_fig = summary(paired(sizes.rounds, limit, core_rate), VERIFY_TARGET, "chains")
            node_us = 1e6 / node_fig["measured_chains_per_s"]
            core_us = 1e6 / core_fig["measured_chains_per_s"]
            entry: dict[str, Any] = {
                **node_fig,
                "core": core_fig,
                "node_us_per_chain": round(node_us, 1),
                "core_us_per_chain": round(core_us, 1),
                "raw_us_per_chain": round(1e6 / node_fig["limit_chains_per_s"], 1),
                "signatures_per_chain": len(checks[id(seq[0])]),
                "chain_bytes": sum(map(len, seq[0])),
                "distinct_chains": len(chains),
                "spiffe_id": got["spiffe_id"],
            }
            # The node that holds beta's bundle only in the SPIFFE format (imported by the import figure).
            got = s.verify_svid(seq[0], int(time.time()))
            assert got["assurance"] == "spiffe-bundle", got
            entry["spiffe_bundle_node"] = summary(paired(sizes.rounds, limit, node_rate(s)), None, "chains")
            out[name] = entry
    out["all_met"] = all(out[name]["met"] for name in fx.chains)
    return out


def import_figure(fx: Fixture, sizes: Sizes, tmp: Path) -> dict[str, Any]:
    base = spiffe_bundle.from_document(fx.bundle)
    first = 1000
    total = 1 + sizes.import_rounds * sizes.imports
    bundles = [spiffe_bundle.to_json(dataclasses.replace(base, sequence=first + i))[0] for i in range(total)]
    raw_db = fsynced_table(tmp / "raw-spiffe.sqlite")
    counter = iter(range(total))
    with Node(fx.spiffe_home) as s:
        warm = s.import_spiffe_bundle(bundles[next(counter)], BETA, int(time.time()), source="bench")
        assert warm["status"] == "new", warm

        def batch() -> list[bytes]:
            return [bundles[next(counter)] for _ in range(sizes.imports)]

        pending: list[list[bytes]] = []

        def next_batch() -> list[bytes]:
            # One batch per round, shared by the limit and the measured side of that round.
            if not pending:
                got = batch()
                pending.extend([got, got])
            return pending.pop()

        def limit() -> float:
            data = next_batch()

            def go() -> None:
                for d in data:
                    spiffe_bundle.parse(d)
                    raw_db.execute("BEGIN IMMEDIATE")
                    raw_db.execute("INSERT INTO bundles (body) VALUES (?)", (d,))
                    raw_db.execute("COMMIT")

            return timed(len(data), go)

        def measured() -> float:
            data = next_batch()
            results: list[dict[str, Any]] = []

            def go() -> None:
                now = int(time.time())
                for d in data:
                    results.append(s.import_spiffe_bundle(d, BETA, now, source="bench"))

            rate = timed(len(data), go)
            assert {r["status"] for r in results} == {"new"}, results[:2]
            return rate

        result = paired(sizes.import_rounds, limit, measured)
        # A store that can sign without asking (unencrypted keys, or the passphrase in the environment)
        # signs an audit checkpoint in every import's transaction and keeps it beside the store.
        checkpointed = s.store.checkpoint_signer() is not None
    raw_db.close()
    fig = summary(result, IMPORT_TARGET, "imports")
    fig.update(
        status=warm["status"],
        bundle_bytes=len(bundles[0]),
        x509_authorities=warm["x509_authorities"],
        jwt_authorities=warm["jwt_authorities"],
        imports_per_round=sizes.imports,
        audit_checkpoint_per_import=checkpointed,
    )
    return fig


def run(quick: bool, tmp: Path) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    t0 = time.perf_counter()
    fx = setup(tmp, sizes)
    out: dict[str, Any] = {"mode": "quick" if quick else "full", "setup_s": round(fx.setup_s, 2)}
    out["spiffe_bundle_import"] = import_figure(fx, sizes, tmp)
    out["partner_x509_verify"] = verify_figures(fx, sizes)
    out.update(
        included=(
            "verify: both sides check the chain's signatures (leaf under the node intermediate, intermediate "
            "under beta's domain CA); the node also parses the DER, checks SAN, key usage, CA flags, path "
            "length, name constraints, validity, the clock, the agreement gate, scope and staleness. import: "
            "both sides parse strictly and commit the bytes durably; the node also decides under the agreement "
            "and audits in the same transaction"
        ),
        cores=len(os.sched_getaffinity(0)),
        openssl=openssl_backend.openssl_version_text(),
        sqlite=sqlite3.sqlite_version,
        elapsed_s=round(time.perf_counter() - t0, 2),
    )
    return out


if __name__ == "__main__":
    sys.exit(main(run, __doc__))
