"""SVID issuance throughput against the raw certificate-signing limit, and Workload API latency.

Run ``python -m bench.issuance`` (or ``--quick``) from the repository root.  It
prints one JSON object.

* ``p256`` / ``mldsa65``: X.509-SVIDs per second through ``Issuer.x509_svids``
  (a caller whose selectors match N registrations, every cached SVID past its
  half-life, so each call mints N) ÷ the raw limit measured in the same run,
  interleaved round by round: building and signing the same certificate with
  ``cryptography`` directly, under the same node intermediate key.  Both sides
  include the leaf key generation, the certificate build with the same six
  extensions, the signature, the certificate's DER and the private key's PKCS#8
  DER.  The Issuer adds registration matching, the TTL rules, the cache, and
  the audit entries with their SQLite transaction (one per call, fsynced:
  ``synchronous=FULL``).  Target >= 0.70.
* ``workload_api``: ``qhx-edge serve`` in its own process (so the clients do
  not share its interpreter), and 200 concurrent gRPC clients, each on its own
  connection (``grpc.use_local_subchannel_pool``) with the stock ``spiffe``
  package's generated stubs: the latency from starting ``FetchX509SVID`` to its
  first response (connect, peer-credential attestation, issuance, response),
  p50 / p99 over every client of every round.  All clients run as this uid, so
  they share one registration: the first one mints, the rest are cache hits.

Each throughput figure is the best of several rounds; ``paired_median`` is the
median ratio of each Issuer round to the raw round next to it (their order alternates).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import gc
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cryptography
from cryptography import x509
from cryptography.hazmat.backends.openssl import backend as openssl_backend
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID

from qhx_edge.core.cards import parse_card, spki
from qhx_edge.core.policyfile import policy_fields
from qhx_edge.core.suites import ES256, MLDSA65
from qhx_edge.core.x509ca import private_key_object
from qhx_edge.homes import node
from qhx_edge.homes.authority import Authority
from qhx_edge.issue.issuer import BACKDATE, Issuer, node_cas

TARGET = 0.70
DOMAIN = "bench.example"
PASSPHRASE = "bench passphrase"
HEADER = (("workload.spiffe.io", "true"),)


@dataclass(frozen=True)
class Sizes:
    rounds: int  # interleaved raw / Issuer rounds per algorithm
    p256: int  # SVIDs per call (registrations matched by one caller)
    mldsa: int
    clients: int  # concurrent Workload API clients
    waves: int  # rounds of concurrent clients


FULL = Sizes(rounds=40, p256=400, mldsa=150, clients=200, waves=10)
QUICK = Sizes(rounds=16, p256=200, mldsa=80, clients=200, waves=3)


class Clock:
    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def setup(tmp: Path, sizes: Sizes, now: int) -> tuple[Path, list[str], list[str], str]:
    """An authority, an attested node holding a policy with the bench's registrations."""
    auth = Authority.init(
        tmp / "authority",
        DOMAIN,
        suite="hybrid",
        root_keys=1,
        root_threshold=1,
        passphrase=PASSPHRASE.encode(),
        now=now,
    )
    home = tmp / "node"
    node.init(home, auth.anchor(), now, passphrase=PASSPHRASE.encode())
    ec_ids = [f"spiffe://{DOMAIN}/ec/w{i}" for i in range(sizes.p256)]
    pq_ids = [f"spiffe://{DOMAIN}/pq/w{i}" for i in range(sizes.mldsa)]
    me = f"spiffe://{DOMAIN}/workload"
    regs = [{"spiffe_id": s, "selectors": ["unix:gid:990001"]} for s in ec_ids]
    regs += [{"spiffe_id": s, "selectors": ["unix:gid:990002"]} for s in pq_ids]
    regs.append({"spiffe_id": me, "selectors": [f"unix:uid:{os.getuid()}"]})
    policy = {
        # Budgets far beyond the simulated time the rounds take (half an hour per round).
        "staleness": {"soft": "30d", "hard": "60d", "svid_ttl": "1h", "ttl_floor": "5m"},
        "algorithms": {"/": "ES256", "/pq/": "ML-DSA-65"},
        "registrations": regs,
    }
    docs = auth.publish_policy(policy_fields(policy), now)
    n = node.Node(home, PASSPHRASE.encode)
    try:
        ident = n.identity
        docs += auth.issue_delegation(
            node_id=n.node_id,
            card_fingerprint=parse_card(n.card()).fingerprint,
            ca_spkis={alg: spki(ident.ca_key(alg, create=True)) for alg in (ES256, MLDSA65)},
            jwt_spki=spki(ident.jwt_key(create=True)),
            attestation={"method": "join-token"},
            now=now,
        )
        n.import_pack(auth.export_pack(docs, now), now)
    finally:
        n.close()
    return home, ec_ids, pq_ids, me


def raw_minter(home: Path, alg: int) -> Callable[[list[str], int], None]:
    """Build and sign the same certificates as the Issuer, with ``cryptography`` alone."""
    n = node.Node(home, PASSPHRASE.encode)
    try:
        ca_key = private_key_object(n.identity.ca_key(alg))
        held = n.store.current(n.domain, "delegation")
        assert held is not None
        ca = node_cas(held.payload)[alg]
    finally:
        n.close()
    empty = x509.Name([])
    basic = x509.BasicConstraints(ca=False, path_length=None)
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    digest = hashes.SHA256() if alg == ES256 else None

    def mint(ids: list[str], now: int) -> None:
        for sid in ids:
            key: ec.EllipticCurvePrivateKey | mldsa.MLDSA65PrivateKey
            key = ec.generate_private_key(ec.SECP256R1()) if alg == ES256 else mldsa.MLDSA65PrivateKey.generate()
            pub = key.public_key()
            cert = (
                x509.CertificateBuilder()
                .subject_name(empty)
                .issuer_name(ca.cert.subject)
                .public_key(pub)
                .serial_number(x509.random_serial_number())
                .not_valid_before(dt.datetime.fromtimestamp(now - BACKDATE, dt.UTC))
                .not_valid_after(dt.datetime.fromtimestamp(now + 3600, dt.UTC))
                .add_extension(basic, critical=True)
                .add_extension(usage, critical=True)
                .add_extension(eku, critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid)]), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
                .add_extension(ca.aki, critical=False)
                .sign(ca_key, digest)
            )
            cert.public_bytes(Encoding.DER)
            key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())

    return mint


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def throughput(home: Path, sizes: Sizes, ec_ids: list[str], pq_ids: list[str], now: int) -> dict[str, Any]:
    clk = Clock(now)
    groups = {
        "p256": (ES256, frozenset({"unix:gid:990001"}), ec_ids),
        "mldsa65": (MLDSA65, frozenset({"unix:gid:990002"}), pq_ids),
    }
    raws = {name: raw_minter(home, alg) for name, (alg, _, _) in groups.items()}
    rates: dict[str, dict[str, list[float]]] = {name: {"raw": [], "issuer": [], "paired": []} for name in groups}
    out: dict[str, Any] = {}
    with Issuer(home, PASSPHRASE.encode, now=clk) as iss:
        for _, sel, ids in groups.values():  # warm-up: keys loaded, every ID minted and checked once
            svids = iss.x509_svids(sel)
            assert [s.spiffe_id for s in svids] == ids
        for i in range(sizes.rounds):
            clk.t += 1801  # every cached SVID is past its half-life (TTL 1 h): each call re-mints all
            for name, (_, sel, ids) in groups.items():
                # Alternate which side runs first, so neither always inherits the other's warm caches.
                issue = functools.partial(iss.x509_svids, sel)
                raw_mint = functools.partial(raws[name], ids, clk.t)
                if i % 2:
                    iss_s, svids = _timed(issue)
                    raw_s, _ = _timed(raw_mint)
                else:
                    raw_s, _ = _timed(raw_mint)
                    iss_s, svids = _timed(issue)
                assert len(svids) == len(ids)
                assert all(s.not_after == clk.t + 3600 for s in svids), "not freshly minted"
                r = rates[name]
                r["raw"].append(len(ids) / raw_s)
                r["issuer"].append(len(ids) / iss_s)
                r["paired"].append(raw_s / iss_s)
        audited = iss._store.conn.execute("SELECT count(*) FROM audit WHERE event = 'issue'").fetchone()[0]
    for name, (_, _, ids) in groups.items():
        r = rates[name]
        raw, issued = max(r["raw"]), max(r["issuer"])
        out[name] = {
            "svids_per_s": round(issued, 1),
            "raw_per_s": round(raw, 1),
            "ratio": round(issued / raw, 3),
            "paired_median": round(statistics.median(r["paired"]), 3),
            "meets_target": issued / raw >= TARGET,
            "svids_per_call": len(ids),
        }
    out["audited_issuances"] = audited
    return out


# --- Workload API latency ----------------------------------------------------------------------


def _stubs() -> tuple[Any, Any, str]:
    """The stock ``spiffe`` client's generated stubs, else the project's copy of the same proto."""
    import importlib

    for package, label in (
        ("spiffe._proto", "spiffe (stock client's stubs)"),
        ("qhx_edge.issue.proto", "qhx_edge.issue.proto"),
    ):
        try:
            pb = importlib.import_module(f"{package}.workload_pb2")
            pb_grpc = importlib.import_module(f"{package}.workload_pb2_grpc")
        except ImportError:
            continue
        return pb, pb_grpc, label
    raise ImportError("no Workload API stubs")


async def _wave(target: str, clients: int, expect: str, pb: Any, pb_grpc: Any) -> list[float]:
    import grpc

    async def one() -> float:
        async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = pb_grpc.SpiffeWorkloadAPIStub(ch)
            start = time.perf_counter()
            call = stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER)
            resp = await call.read()
            elapsed = time.perf_counter() - start
            call.cancel()
        if resp is grpc.aio.EOF or [s.spiffe_id for s in resp.svids] != [expect]:
            raise RuntimeError(f"unexpected first response: {resp!r}")
        return elapsed

    return list(await asyncio.gather(*(one() for _ in range(clients))))


def workload_latency(home: Path, sizes: Sizes, expect: str, tmp: Path) -> dict[str, Any]:
    try:
        import grpc  # noqa: F401

        import qhx_edge.issue.workload_api  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"Workload API not available: {exc}"}
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    pb, pb_grpc, stubs = _stubs()
    sock = tmp / "workload.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QHX_EDGE_")}
    env["QHX_EDGE_PASSPHRASE"] = PASSPHRASE
    cmd = [sys.executable, "-m", "qhx_edge", "--home", str(home), "--json", "serve", "--socket", str(sock)]
    log = tmp / "serve.log"  # a file, not a pipe: a chatty server must never block on it
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout is not None
        # The server prints one JSON line once it accepts connections.
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        if not ready or not proc.stdout.readline():
            return {"skipped": f"'qhx-edge serve' did not start: {log.read_text()[-2000:]}"}
        # One client at a time first: the latency without contention, for scale.
        alone = sorted(x for _ in range(20) for x in asyncio.run(_wave(f"unix:{sock}", 1, expect, pb, pb_grpc)))
        waves: list[list[float]] = []
        for _ in range(sizes.waves):
            waves.append(asyncio.run(_wave(f"unix:{sock}", sizes.clients, expect, pb, pb_grpc)))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    samples = sorted(x for w in waves for x in w)

    def pct(p: float) -> float:
        return round(samples[min(len(samples) - 1, int(p * len(samples)))] * 1000, 2)

    return {
        "clients": sizes.clients,
        "waves": sizes.waves,
        "samples": len(samples),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(samples[-1] * 1000, 2),
        "single_client_p50_ms": round(alone[len(alone) // 2] * 1000, 2),
        "first_wave_p99_ms": round(sorted(waves[0])[int(0.99 * len(waves[0]))] * 1000, 2),
        "stubs": stubs,
        "measures": "FetchX509SVID start to first response, each client on its own connection, "
        "server in its own process ('qhx-edge serve')",
    }


def run(sizes: Sizes, tmp: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    now = int(time.time())
    home, ec_ids, pq_ids, me = setup(tmp, sizes, now)
    out: dict[str, Any] = {"mode": "quick" if sizes is QUICK else "full", "target": TARGET}
    out.update(throughput(home, sizes, ec_ids, pq_ids, now))
    out["included"] = (
        "both sides: leaf key generation, certificate build (6 extensions), signature, certificate DER, "
        "PKCS#8 DER; the Issuer also matches registrations, applies the TTL rules, caches, and audits "
        "(one fsynced SQLite transaction per call)"
    )
    out["workload_api"] = workload_latency(home, sizes, me, tmp)
    out["versions"] = {
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "openssl": openssl_backend.openssl_version_text(),
    }
    out["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small samples (CI): under ~20 s")
    parser.add_argument("--dir", type=Path, default=None, help="where to make the temporary homes (on disk)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qhx-bench-", dir=args.dir) as tmp:
        out = run(QUICK if args.quick else FULL, Path(tmp))
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
