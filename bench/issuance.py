"""SVID issuance at one SVID per call against the raw minting limit, and Workload API latency.

Run ``python bench/issuance.py`` (``--quick`` for CI, ``--dir`` for where the
homes go: a real disk) from the repository root.  It prints one JSON object.
Every figure is a paired median (bench/common.py): rounds alternate the limit
and the measured side, each measured round is divided by the limit round
beside it, and the median of those ratios is the headline.

* ``x509.<alg>.concurrent`` (``p256``, ``mldsa65``): X.509-SVIDs per second
  through the real ``Issuer`` with its audit, **one SVID per call**, from 50
  threads at once (each call a caller with its own registration, so each
  mints: what a Workload API fetch by a workload not yet served costs) ÷ the
  raw minting limit of the same round: leaf key generation, the same
  certificate build (six extensions), signature, certificate DER and PKCS#8
  DER with ``cryptography`` alone, under the same node intermediate, the
  better of one thread and one thread per core (ML-DSA signing runs in
  parallel where ``cryptography`` releases the interpreter).  Every SVID is
  durably audited (a fsynced commit holding its entry) before its call
  returns; concurrent callers share commits (group commit:
  ``svids_per_commit``).  Target >= 0.70.
* ``x509.<alg>.alone``: the same, one call at a time (ratio, for scale), and
  ``lone_overhead_ms`` = time of one call - raw minting of one SVID - one
  fsync of the same SQLite file (its WAL, written where its next commit will
  write, then ``fsync``: :func:`fsync_seconds`), all three measured in the
  same round; target <= 0.3 ms.  ``cold_overhead_ms``: the same with the raw
  mint measured right after an fsync (a lone call's thread has just slept
  on its commit; on a shared machine its caches are then cold).
* ``workload_api``: ``qhx-edge serve`` and a minimal gRPC server (grpcio's
  ``grpc.aio``, generic handler, no attestation, returning the very bytes our
  server sent for the same request) each in its own process on a Unix socket
  in the same folder.  The stock ``spiffe`` package's generated stubs on
  ``grpc.aio`` open a connection per client (``grpc.use_local_subchannel_pool``)
  and time ``FetchX509SVID`` from the call to its first response (connect,
  HTTP/2 set-up, attestation, issuance, response).  ``single_client_p50``: 25
  fetches one after another per side per round; ``clients_200_p99``: 200
  concurrent clients per side per round.  Ratios ours ÷ minimal; targets
  <= 1.25 and <= 1.5.  All clients run as this uid and share one registration,
  so after the first fetch they are cache hits: this measures the transport,
  the attestation and the response, not minting.  The clients run in this
  process and their own CPU is part of every latency, on both sides.  This
  part runs first, on the real clock: the issuance rounds then move a
  simulated clock hours ahead, and a node issues nothing behind the latest
  time it has audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import os
import select
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python bench/issuance.py), as CI does
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography import x509
from cryptography.hazmat.backends.openssl import backend as openssl_backend
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID

from bench.common import figure, main, paired
from qhx_edge.core.cards import parse_card, spki
from qhx_edge.core.policyfile import policy_fields
from qhx_edge.core.suites import ES256, MLDSA65
from qhx_edge.core.x509ca import private_key_object
from qhx_edge.homes import node
from qhx_edge.homes.authority import Authority
from qhx_edge.issue.issuer import BACKDATE, Issuer, node_cas

CONCURRENT_TARGET = 0.70
LONE_OVERHEAD_TARGET_MS = 0.3
SINGLE_CLIENT_TARGET = 1.25
MANY_CLIENTS_TARGET = 1.5
THREADS = 50
CLIENTS = 200
DOMAIN = "bench.example"
PASSPHRASE = "bench passphrase"
HEADER = (("workload.spiffe.io", "true"),)
GID_BASE = {ES256: 1_000_000, MLDSA65: 2_000_000}  # registration i of an algorithm: selector unix:gid:BASE+i
ALG_NAMES = {ES256: "p256", MLDSA65: "mldsa65"}


@dataclass(frozen=True)
class Sizes:
    rounds: int  # paired rounds per figure (odd: the median is a round's own ratio)
    per_thread: dict[int, int]  # calls per thread per concurrent round, by algorithm
    lone: dict[int, int]  # calls per lone round
    api_rounds: int  # paired Workload API rounds
    api_alone: int  # sequential single-client fetches per side per round


FULL = Sizes(rounds=9, per_thread={ES256: 8, MLDSA65: 3}, lone={ES256: 100, MLDSA65: 30}, api_rounds=7, api_alone=25)
QUICK = Sizes(rounds=3, per_thread={ES256: 4, MLDSA65: 2}, lone={ES256: 40, MLDSA65: 12}, api_rounds=3, api_alone=15)


class Clock:
    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def _ids(alg: int, count: int) -> list[str]:
    prefix = "ec" if alg == ES256 else "pq"
    return [f"spiffe://{DOMAIN}/{prefix}/w{i}" for i in range(count)]


def setup(tmp: Path, count: dict[int, int], now: int) -> tuple[Path, str]:
    """An authority and an attested node whose policy registers ``count[alg]`` workloads per algorithm."""
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
    me = f"spiffe://{DOMAIN}/workload"
    regs = [
        {"spiffe_id": sid, "selectors": [f"unix:gid:{GID_BASE[alg] + i}"]}
        for alg, n in count.items()
        for i, sid in enumerate(_ids(alg, n))
    ]
    regs.append({"spiffe_id": me, "selectors": [f"unix:uid:{os.getuid()}"]})
    policy = {
        # Budgets far beyond the simulated time the rounds take (half an hour per measured round).
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
    return home, me


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


def _seconds(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fsync_seconds(db: Path) -> float:
    """One fsync of the store's WAL where its next commit will write (every commit of
    ``synchronous=FULL`` fsyncs the WAL once): one frame's worth of zeros written just past the last
    valid frame (the wal-index's ``mxFrame``), then ``fsync``.  Past ``mxFrame`` nothing is ever read, and
    recovery stops at the first invalid frame, so the content is unchanged; a frame appended at the
    file's end is truncated away again (untimed).  When the next commit will restart the WAL from its
    start (every frame checkpointed), it overwrites: its header's own bytes are rewritten in place instead.
    Only while no connection writes (the benchmark calls it between rounds)."""
    shm = Path(f"{db}-shm").read_bytes()[:136]  # WalIndexHdr (48 bytes, twice), then WalCkptInfo
    (page,) = struct.unpack_from("=H", shm, 14)
    (mx_frame,) = struct.unpack_from("=I", shm, 16)
    (backfilled,) = struct.unpack_from("=I", shm, 96)
    frame = 24 + (65536 if page == 1 else page)
    fd = os.open(f"{db}-wal", os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        at = 32 + mx_frame * frame
        if mx_frame and backfilled >= mx_frame and at + frame > size:
            header = os.pread(fd, 32, 0)
            start = time.perf_counter()
            os.pwrite(fd, header, 0)
            os.fsync(fd)
            return time.perf_counter() - start
        start = time.perf_counter()
        os.pwrite(fd, bytes(frame), at)
        os.fsync(fd)
        elapsed = time.perf_counter() - start
        if at + frame > size:
            os.ftruncate(fd, size)
        return elapsed
    finally:
        os.close(fd)


# --- issuance -----------------------------------------------------------------------------


class IssuanceBench:
    def __init__(self, home: Path, sizes: Sizes, now: int) -> None:
        self.sizes = sizes
        self.clk = Clock(now)
        self.iss = Issuer(home, PASSPHRASE.encode, now=self.clk)
        self.db = home / "node.sqlite"
        self.raw = {alg: raw_minter(home, alg) for alg in (ES256, MLDSA65)}
        self.minted = 0

    def close(self) -> None:
        self.iss.close()

    def _selectors(self, alg: int, count: int) -> list[frozenset[str]]:
        return [frozenset({f"unix:gid:{GID_BASE[alg] + i}"}) for i in range(count)]

    def _advance(self) -> None:
        self.clk.t += 1801  # past every cached SVID's half-life (TTL 1 h): every call below mints

    def _check(self, alg: int, got: list[Any], count: int) -> None:
        ids = _ids(alg, count)
        assert [s.spiffe_id for s in got] == ids, "every caller gets its own SVID"
        assert all(s.not_after == self.clk.t + 3600 for s in got), "freshly minted"
        self.minted += count

    def raw_rate(self, alg: int, count: int) -> float:
        ids = _ids(alg, count)
        return count / _seconds(lambda: self.raw[alg](ids, self.clk.t))

    def raw_limit(self, alg: int, count: int) -> float:
        """The machine's raw minting limit: the better of one thread and one thread per core (where
        ``cryptography`` releases the interpreter while it signs, minting runs in parallel)."""
        ids = _ids(alg, count)
        cores = os.cpu_count() or 1
        shares = [ids[i::cores] for i in range(cores)]

        def parallel() -> None:
            threads = [threading.Thread(target=self.raw[alg], args=(share, self.clk.t)) for share in shares]
            for th in threads:
                th.start()
            for th in threads:
                th.join()

        return max(self.raw_rate(alg, count), count / _seconds(parallel))

    def lone_rate(self, alg: int) -> float:
        count = self.sizes.lone[alg]
        sels = self._selectors(alg, count)
        self._advance()
        got: list[Any] = []
        elapsed = _seconds(lambda: [got.extend(self.iss.x509_svids(s)) for s in sels])
        self._check(alg, got, count)
        return count / elapsed

    def concurrent_rate(self, alg: int) -> float:
        per = self.sizes.per_thread[alg]
        count = THREADS * per
        sels = self._selectors(alg, count)
        self._advance()
        got: list[Any] = [None] * count
        failures: list[BaseException] = []
        start = threading.Barrier(THREADS + 1)

        def caller(t: int) -> None:
            start.wait()
            try:
                for k in range(per):
                    i = t * per + k
                    (got[i],) = self.iss.x509_svids(sels[i])
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=caller, args=(t,)) for t in range(THREADS)]
        for th in threads:
            th.start()
        gc.collect()
        t0 = time.perf_counter()
        start.wait()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - t0
        if failures:
            raise failures[0]
        self._check(alg, got, count)
        return count / elapsed

    def run(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for alg in (ES256, MLDSA65):  # warm-up: keys loaded, every registration minted and checked once
            n = max(self.sizes.lone[alg], THREADS * self.sizes.per_thread[alg])
            got = [s for sel in self._selectors(alg, n) for s in self.iss.x509_svids(sel)]
            self._check(alg, got, n)
        for alg in (ES256, MLDSA65):
            name = ALG_NAMES[alg]
            count = THREADS * self.sizes.per_thread[alg]
            commits0, calls0 = self.iss.audit_commits
            conc = paired(
                self.sizes.rounds, lambda a=alg, c=count: self.raw_limit(a, c), lambda a=alg: self.concurrent_rate(a)
            )
            commits1, calls1 = self.iss.audit_commits
            alone = paired(
                self.sizes.rounds,
                lambda a=alg: self.raw_rate(a, self.sizes.lone[a]),
                lambda a=alg: self.lone_rate(a),
            )
            out[name] = {
                "concurrent": figure(
                    conc["ratio"],
                    CONCURRENT_TARGET,
                    threads=THREADS,
                    svids_per_call=1,
                    svids_per_s=round(conc["measured_median"], 1),
                    raw_per_s=round(conc["limit_median"], 1),
                    ratio_best=round(conc["ratio_best"], 4),
                    rounds=conc["rounds"],
                    svids_per_commit=round((calls1 - calls0) / max(1, commits1 - commits0), 1),
                ),
                "alone": {
                    "ratio": round(alone["ratio"], 4),
                    "svids_per_s": round(alone["measured_median"], 1),
                    "raw_per_s": round(alone["limit_median"], 1),
                    "rounds": alone["rounds"],
                },
                "lone_overhead_ms": self.lone_overhead(alg),
            }
        return out

    def cold_raw_seconds(self, alg: int, count: int) -> float:
        """Raw minting of one SVID right after one fsync of the store's WAL, as a lone call mints: the
        thread has just slept, and on a shared machine its caches are cold (mean over ``count``)."""
        ids = _ids(alg, 1)
        total = 0.0
        mint = self.raw[alg]
        for _ in range(count):
            fsync_seconds(self.db)
            start = time.perf_counter()
            mint(ids, self.clk.t)
            total += time.perf_counter() - start
        return total / count

    def lone_overhead(self, alg: int) -> dict[str, Any]:
        """Per round: one call's time - one raw mint - one fsync (each the mean over the round's calls).

        ``cold_overhead_ms`` puts the raw mint measured right after an fsync in place of the raw mint
        measured back to back: what is left is the issuer's own cost."""
        count = self.sizes.lone[alg]
        overheads, colds, calls, raws, colds_raw, syncs = [], [], [], [], [], []
        for i in range(self.sizes.rounds):
            parts: dict[str, float] = {}
            order = ["call", "raw", "fsync", "cold"]
            for side in order[i % 4 :] + order[: i % 4]:  # rotate which side goes first
                if side == "call":
                    parts[side] = 1 / self.lone_rate(alg)
                elif side == "raw":
                    parts[side] = 1 / self.raw_rate(alg, count)
                elif side == "cold":
                    parts[side] = self.cold_raw_seconds(alg, count)
                else:
                    parts[side] = statistics.median(fsync_seconds(self.db) for _ in range(count))
            overheads.append(parts["call"] - parts["raw"] - parts["fsync"])
            colds.append(parts["call"] - parts["cold"] - parts["fsync"])
            calls.append(parts["call"])
            raws.append(parts["raw"])
            colds_raw.append(parts["cold"])
            syncs.append(parts["fsync"])
        ms = 1000.0
        return figure(
            statistics.median(overheads) * ms,
            LONE_OVERHEAD_TARGET_MS,
            higher_is_better=False,
            call_ms=round(statistics.median(calls) * ms, 3),
            raw_mint_ms=round(statistics.median(raws) * ms, 3),
            raw_mint_after_fsync_ms=round(statistics.median(colds_raw) * ms, 3),
            fsync_ms=round(statistics.median(syncs) * ms, 3),
            cold_overhead_ms=round(statistics.median(colds) * ms, 3),
            rounds=self.sizes.rounds,
        )


def issuance(home: Path, sizes: Sizes, now: int) -> dict[str, Any]:
    bench = IssuanceBench(home, sizes, now)
    issued = "SELECT count(*) FROM audit WHERE event = 'issue'"
    try:
        before = bench.iss._audit.store.conn.execute(issued).fetchone()[0]  # the Workload API's, if it ran first
        out = bench.run()
        audited = bench.iss._audit.store.conn.execute(issued).fetchone()[0] - before
        chain = bench.iss._audit.store.verify_audit_chain()
    finally:
        bench.close()
    assert audited == bench.minted, f"{audited} audit entries for {bench.minted} SVIDs"
    out["audited"] = {"svids_minted": bench.minted, "issue_entries": audited, "chain_entries": chain}
    return out


# --- Workload API latency -------------------------------------------------------------------

MINIMAL_SERVER = """
import asyncio, sys
import grpc
from grpc import aio

RESPONSE = open(sys.argv[2], "rb").read()


async def fetch(request, context):
    yield RESPONSE
    await asyncio.Event().wait()  # the stream stays open, as the Workload API's does


async def main():
    server = aio.server()
    handlers = {"FetchX509SVID": grpc.unary_stream_rpc_method_handler(fetch)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("SpiffeWorkloadAPI", handlers),))
    server.add_insecure_port("unix:" + sys.argv[1])
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


asyncio.run(main())
"""


def _stubs() -> tuple[Any, Any]:
    """The stock ``spiffe`` client's generated stubs."""
    from spiffe._proto import workload_pb2, workload_pb2_grpc

    return workload_pb2, workload_pb2_grpc


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


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    with log.open("w") as err:  # a file, not a pipe: a chatty server must never block on it
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)  # each prints one line once it accepts connections
    if not ready or not proc.stdout.readline():
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{cmd[:3]} did not start: {log.read_text()[-2000:]}")
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _response_bytes(sock: Path) -> bytes:
    """What our server sends for FetchX509SVID, as bytes (a generic call: no deserialiser)."""
    import grpc

    with grpc.insecure_channel(f"unix:{sock}") as ch:
        call = ch.unary_stream("/SpiffeWorkloadAPI/FetchX509SVID", request_serializer=None, response_deserializer=None)
        stream = call(b"", metadata=HEADER, timeout=30)
        raw: bytes = next(stream)
        stream.cancel()
    return raw


def workload_latency(home: Path, sizes: Sizes, expect: str, tmp: Path) -> dict[str, Any]:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    pb, pb_grpc = _stubs()
    ours, minimal = tmp / "workload.sock", tmp / "minimal.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QHX_EDGE_")}
    env["QHX_EDGE_PASSPHRASE"] = PASSPHRASE
    serve = _start(
        [sys.executable, "-m", "qhx_edge", "--home", str(home), "--json", "serve", "--socket", str(ours)],
        env,
        tmp / "serve.log",
    )
    procs = [serve]
    try:
        (tmp / "response.bin").write_bytes(_response_bytes(ours))
        procs.append(
            _start(
                [sys.executable, "-c", MINIMAL_SERVER, str(minimal), str(tmp / "response.bin")], env, tmp / "min.log"
            )
        )

        def p50(sock: Path) -> float:
            samples = [
                x for _ in range(sizes.api_alone) for x in asyncio.run(_wave(f"unix:{sock}", 1, expect, pb, pb_grpc))
            ]
            return statistics.median(samples)

        def p99(sock: Path) -> float:
            samples = sorted(asyncio.run(_wave(f"unix:{sock}", CLIENTS, expect, pb, pb_grpc)))
            return samples[min(len(samples) - 1, int(0.99 * len(samples)))]

        # paired() divides measured by limit rates: a rate of 1/latency gives minimal/ours, inverted below.
        alone = paired(sizes.api_rounds, lambda: 1 / p50(minimal), lambda: 1 / p50(ours))
        many = paired(sizes.api_rounds, lambda: 1 / p99(minimal), lambda: 1 / p99(ours))
    finally:
        for proc in procs:
            _stop(proc)
    ms = 1000.0
    return {
        "single_client_p50": figure(
            1 / alone["ratio"],
            SINGLE_CLIENT_TARGET,
            higher_is_better=False,
            ours_ms=round(ms / alone["measured_median"], 3),
            minimal_ms=round(ms / alone["limit_median"], 3),
            rounds=alone["rounds"],
            fetches_per_round=sizes.api_alone,
        ),
        "clients_200_p99": figure(
            1 / many["ratio"],
            MANY_CLIENTS_TARGET,
            higher_is_better=False,
            ours_ms=round(ms / many["measured_median"], 2),
            minimal_ms=round(ms / many["limit_median"], 2),
            rounds=many["rounds"],
            clients=CLIENTS,
        ),
        "measures": "FetchX509SVID from the call to its first response, a connection per client, "
        "ours ('qhx-edge serve') ÷ a minimal grpc.aio server returning the same bytes",
    }


def run(quick: bool, tmp: Path) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    t0 = time.perf_counter()
    now = int(time.time())
    count = {alg: max(sizes.lone[alg], THREADS * sizes.per_thread[alg]) for alg in (ES256, MLDSA65)}
    home, me = setup(tmp, count, now)
    out: dict[str, Any] = {"mode": "quick" if quick else "full"}
    # The server first, on the real clock: issuance below runs on a simulated clock hours ahead, and a
    # node refuses to issue behind the latest time it has audited (clock-rollback).
    out["workload_api"] = workload_latency(home, sizes, me, tmp)
    out["x509"] = issuance(home, sizes, int(time.time()))
    out["included"] = (
        "both sides: leaf key generation, certificate build (6 extensions), signature, certificate DER, "
        "PKCS#8 DER; the Issuer also matches registrations, applies the TTL rules, caches, and audits "
        "(every SVID in a fsynced SQLite commit before its call returns; concurrent calls share commits)"
    )
    out["openssl"] = openssl_backend.openssl_version_text()
    out["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return out


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main(run, __doc__))
