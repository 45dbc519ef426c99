"""Tunnels: bulk throughput and connection set-up, against limits measured in the same run
(docs/architecture.md "Tunnels").

Run ``python bench/tunnel.py`` (``--quick`` for CI) from the repository root.  It prints one JSON
object; rates are paired medians (bench/common.py).  Each tunnel and each stunnel is a process of its
own; the client and the sink run in this process.  Our tunnels are the product's
(``homes.tunnel.inbound``/``outbound``, peers checked by ``Node.verify_svid`` and the policy's rules)
on a real node home whose issuer mints both SVIDs (ECDSA P-256).

* ``throughput_vs_stunnel``: bytes per second from a client through an outbound and an inbound tunnel
  to a sink, both over TLS 1.3 with TLS_AES_256_GCM_SHA384 and X25519 (the classical suite and key
  exchange stunnel's OpenSSL has), ÷ the same through two stunnel processes (Debian's stunnel4) with
  the same suite and group.  Target >= 0.5.
* ``throughput_vs_tcp``: the same ÷ the client straight to the sink over loopback TCP.
* ``throughput_vs_memory_tls``: the same ÷ one pyOpenSSL connection pair in memory sealing and opening
  the same bytes with the same suite (no socket, no event loop): the cipher's limit here.
* ``setup_ms``: a one-byte request and answer on a new connection through both tunnels, median of
  N: ``classical`` (X25519), ``pq`` (X25519MLKEM768, the tunnels' default) and ``resumed`` (pq, the
  outbound tunnel resuming its last session), with stunnel's classical set-up beside them.
* ``notary_ms``: one HTTP/1.1 request and response on a kept-alive connection through both tunnels,
  the inbound one a notary (``--notary``), median of N per route level, minus the same request through
  the same tunnels without the notary (paired, alternating): what recording costs a caller per request
  at ``workload-only``, ``log-request`` and ``sign-request``, and on a route no rule names (``none``).
  Each recorded level commits the receipt (SQLite, ``synchronous=FULL``) before the response's last
  bytes are released; ``sign-request`` also makes a hybrid signature (Ed25519 + ML-DSA-65) first.
* ``receipts_verified_per_s``: ``receipt verify``'s core (``core.receipts.verify`` against a history
  built once) on sign-request receipt files, one receipt per call, ÷ the raw signature verifications each
  needs, with the public keys loaded once (cryptography alone): the card's and the notary delegation's
  hybrid signatures, the tree head's and the receipt's, and the four ECDSA P-256 signatures of the two
  X509-SVID chains: 12 verifications per receipt.  Target >= 0.7.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python bench/tunnel.py), as CI does
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import figure, main, paired

PASSPHRASE = b"bench"
DOMAIN = "alpha.example"
DB = f"spiffe://{DOMAIN}/ns/db"
WEB = f"spiffe://{DOMAIN}/ns/web"
CLASSICAL = ("X25519",)
PQ = ("X25519MLKEM768",)
SUITE = "TLS_AES_256_GCM_SHA384"
LEVELS = ("workload-only", "log-request", "sign-request")


@dataclass(frozen=True)
class Sizes:
    megabytes: int
    rounds: int
    setups: int


FULL = Sizes(megabytes=256, rounds=5, setups=40)
QUICK = Sizes(megabytes=16, rounds=3, setups=8)


# --- the node, and one tunnel per process ---------------------------------------------------------


def make_node(tmp: Path) -> Path:
    """An attested node whose policy registers the db and web identities for two bench selectors."""
    from qhx_edge.core.policyfile import policy_fields
    from qhx_edge.homes import attestation, node
    from qhx_edge.homes.authority import Authority

    now = int(time.time())
    auth = Authority.init(tmp / "A", DOMAIN, suite="hybrid", root_keys=1, root_threshold=1, passphrase=PASSPHRASE,
                          now=now)  # fmt: skip
    regs = [{"spiffe_id": DB, "selectors": ["qhx-edge:bench-db"]},
            {"spiffe_id": WEB, "selectors": ["qhx-edge:bench-web"]}]  # fmt: skip
    rules = [{"to": DB, "allow": [WEB]}]
    routes = [{"service": DB, "route": f"/{level}", "level": level} for level in LEVELS]
    auth.publish_policy(policy_fields({"registrations": regs, "algorithms": {"/": "ES256"}, "authorization": rules,
                                       "notary": routes}), now)  # fmt: skip
    home = tmp / "N"
    node.init(home, auth.anchor(), now, passphrase=PASSPHRASE)
    with node.Node(home, lambda: PASSPHRASE) as n:
        attestation.join_in_process(auth, n, now)
    return home


def serve_tunnel(role: str, home: str, listen: str, target: str, groups: str, resume: str = "resume") -> None:
    """One tunnel in this process (``python bench/tunnel.py --serve ROLE ...``): prints its port, runs
    until SIGTERM."""
    import trio

    from qhx_edge.homes import tunnel
    from qhx_edge.homes.bundles import EndpointSvid

    keeper = None
    if role == "notary":  # an inbound tunnel with --notary
        from qhx_edge.homes.notary import Notary

        role, keeper = "inbound", Notary.open(Path(home), lambda: PASSPHRASE, int(time.time()))
    selector = "qhx-edge:bench-db" if role == "inbound" else "qhx-edge:bench-web"
    # Minted once, as the Workload API's stream hands a tunnel its SVID (X509Source.current is a read).
    minted = EndpointSvid(Path(home), lambda: PASSPHRASE, selector=selector, role=role)()
    me = DB if role == "inbound" else WEB

    def credential() -> Any:
        return minted, me

    host, port = listen.rsplit(":", 1)
    thost, tport = target.rsplit(":", 1)
    group = tuple(groups.split(","))

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            if role == "inbound":
                start: Any = lambda task_status: tunnel.inbound(  # noqa: E731
                    Path(home),
                    (host, int(port)),
                    (thost, int(tport)),
                    credential,
                    groups=group,
                    notary=keeper,
                    task_status=task_status,
                )
            else:
                start = lambda task_status: tunnel.outbound(  # noqa: E731
                    Path(home),
                    (host, int(port)),
                    (thost, int(tport)),
                    DB,
                    credential,
                    groups=group,
                    resume=resume == "resume",
                    task_status=task_status,
                )
            bound = await nursery.start(start)
            print(json.dumps({"port": bound[1]}), flush=True)
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(run)


def _spawn(args: list[str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"a bench tunnel did not start ({args})")
    return proc, int(json.loads(line)["port"])


def _stop(*procs: subprocess.Popen[Any]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class Pair:
    """An outbound and an inbound tunnel (ours, two processes) in front of ``sink_port``."""

    def __init__(
        self, home: Path, sink_port: int, groups: tuple[str, ...], *, resume: bool = True, notary: bool = False
    ) -> None:
        g = ",".join(groups)
        role = "notary" if notary else "inbound"
        self.inbound, in_port = _spawn(["--serve", role, str(home), "127.0.0.1:0", f"127.0.0.1:{sink_port}", g])
        self.outbound, self.port = _spawn(["--serve", "outbound", str(home), "127.0.0.1:0", f"127.0.0.1:{in_port}", g,
                                           "resume" if resume else "full"])  # fmt: skip

    def close(self) -> None:
        _stop(self.outbound, self.inbound)


class Stunnels:
    """stunnel4 as client and server, TLS 1.3 with the same suite and group, mutual certificates."""

    def __init__(self, tmp: Path, sink_port: int, cert: Path, key: Path, ca: Path) -> None:
        self.tmp = tmp
        self.procs = []
        server_port, self.port = _free_port(), _free_port()
        common = (f"foreground = yes\npid =\nsyslog = no\ndebug = 3\noutput = {tmp}/stunnel.log\n"
                  f"sslVersionMin = TLSv1.3\nciphersuites = {SUITE}\ncurves = X25519\n")  # fmt: skip
        server = (f"{common}[server]\naccept = 127.0.0.1:{server_port}\nconnect = 127.0.0.1:{sink_port}\n"
                  f"cert = {cert}\nkey = {key}\nCAfile = {ca}\nverifyChain = yes\n")  # fmt: skip
        client = (f"{common}[client]\nclient = yes\naccept = 127.0.0.1:{self.port}\nconnect = 127.0.0.1:{server_port}\n"
                  f"cert = {cert}\nkey = {key}\nCAfile = {ca}\nverifyChain = yes\n")  # fmt: skip
        for name, text, port in (("server", server, server_port), ("client", client, self.port)):
            conf = tmp / f"stunnel-{name}.conf"
            conf.write_text(text)
            self.procs.append(subprocess.Popen(["stunnel4", str(conf)], stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))  # fmt: skip
            _wait_port(port)

    def close(self) -> None:
        _stop(*self.procs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.02)
        else:
            return
    raise RuntimeError(f"nothing listens on {port}")


class Sink:
    """A TCP service in a thread: counts what it reads to the end, answers one byte to one byte."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            first = conn.recv(1 << 16)
            if first == b"?":  # a set-up probe: one byte each way
                conn.sendall(b"!")
                return
            total = len(first)
            while chunk := conn.recv(1 << 20):
                total += len(chunk)
            conn.sendall(total.to_bytes(8, "big"))

    def close(self) -> None:
        self.server.close()


def _push(port: int, size: int) -> float:
    """Bytes per second of ``size`` bytes sent to ``port`` until the sink says it read them all."""
    block = b"\x5a" * (1 << 20)
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as c:
        sent = 0
        while sent < size:
            c.sendall(block)
            sent += len(block)
        c.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := c.recv(16):
            got += chunk
    elapsed = time.perf_counter() - t
    if int.from_bytes(got, "big") != sent:
        raise RuntimeError(f"the sink read {int.from_bytes(got, 'big') if got else 0} of {sent} bytes")
    return sent / elapsed


def _setup_ms(port: int) -> float:
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"?")
        if c.recv(1) != b"!":
            raise RuntimeError("the set-up probe got no answer")
    return (time.perf_counter() - t) * 1000


def memory_tls_rate(size: int, cert: Path, key: Path) -> float:
    """Seal and open ``size`` bytes with one TLS 1.3 connection pair in memory (the same suite and group)."""
    from OpenSSL import SSL

    from qhx_edge.links import tls

    cred = tls.Credential.from_pem(cert.read_bytes(), key.read_bytes())
    sctx = tls.make_context(cred, server=True, groups=CLASSICAL)
    cctx = tls.make_context(server=False, groups=CLASSICAL)
    s, c = SSL.Connection(sctx, None), SSL.Connection(cctx, None)
    s.set_accept_state()
    c.set_connect_state()
    for _ in range(10):
        for me, other in ((c, s), (s, c)):
            with contextlib.suppress(SSL.WantReadError):
                me.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                other.bio_write(me.bio_read(1 << 20))
    assert c.get_cipher_name() == SUITE, c.get_cipher_name()
    block = b"\x5a" * (1 << 14)
    t = time.perf_counter()
    done = 0
    while done < size:
        c.sendall(block)
        s.bio_write(c.bio_read(1 << 20))
        done += len(s.recv(1 << 15))
    return done / (time.perf_counter() - t)


class HttpSink:
    """A kept-alive HTTP/1.1 service in a thread: answers every request with a small body."""

    def __init__(self) -> None:
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

            def do_GET(self) -> None:
                body = b"ok " + self.path.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class KeptAlive:
    """One client connection that sends GET requests one at a time and reads each whole response."""

    def __init__(self, port: int) -> None:
        import http.client

        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def ms(self, path: str) -> float:
        t = time.perf_counter()
        self.conn.request("GET", path)
        r = self.conn.getresponse()
        if r.status != 200 or not r.read().startswith(b"ok"):
            raise RuntimeError(f"{path}: {r.status}")
        return (time.perf_counter() - t) * 1000

    def close(self) -> None:
        self.conn.close()


def notary_latency(home: Path, sizes: Sizes) -> dict[str, Any]:
    """Per-request latency through a notary pair minus through a plain pair, per level (paired medians)."""
    service = HttpSink()
    plain = Pair(home, service.port, PQ)
    notarized = Pair(home, service.port, PQ, notary=True)
    a, b = KeptAlive(plain.port), KeptAlive(notarized.port)
    out: dict[str, Any] = {}
    try:
        for path in ("/none", *(f"/{level}" for level in LEVELS)):
            for _ in range(3):  # warm: the connection, the store, the signer
                a.ms(path)
                b.ms(path)
            pairs = [(a.ms(path), b.ms(path)) for _ in range(sizes.setups * 5)]
            added = statistics.median(n - p for p, n in pairs)
            out[path.strip("/")] = {
                "added_ms": round(added, 3),
                "notary_ms": round(statistics.median(n for _, n in pairs), 3),
                "plain_ms": round(statistics.median(p for p, _ in pairs), 3),
            }
    finally:
        a.close()
        b.close()
        notarized.close()
        plain.close()
        service.close()
    return out


def receipt_verification(home: Path, tmp: Path, count: int, rounds: int) -> dict[str, Any]:
    """Sign-request receipt files verified one per call, against the raw signature checks they need."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa

    from qhx_edge.core import cose, receipts, suites
    from qhx_edge.core.documents import parse
    from qhx_edge.core.receipts import Party
    from qhx_edge.homes import notary
    from qhx_edge.homes.bundles import EndpointSvid

    chains = {sid: list(EndpointSvid(home, lambda: PASSPHRASE, selector=sel, role="bench")().chain)
              for sid, sel in ((WEB, "qhx-edge:bench-web"), (DB, "qhx-edge:bench-db"))}  # fmt: skip
    from qhx_edge.homes import node

    with node.Node(home) as n:
        held = n.store.current(DOMAIN, "bundle")
        assert held is not None
        versions = {DOMAIN: {"bundle": held.payload.version}}
    now = int(time.time())
    keeper = notary.Notary.open(home, lambda: PASSPHRASE, now)
    try:
        certs = {hashlib.sha256(c).digest(): c for c in [*chains[WEB], *chains[DB]]}
        ctx = notary.Connection(DB, Party.of_chain(WEB, chains[WEB]), Party.of_chain(DB, chains[DB]), versions,
                                certs, ())  # fmt: skip
        start = keeper.log.size()
        for i in range(count):
            ex = notary.Exchange("GET", f"/sign-request/{i}", "sign-request", request=os.urandom(32), status=200,
                                 response=os.urandom(32))  # fmt: skip
            keeper.record(ctx, "sign-request", ex, now)
        keeper.sign_head(now)
    finally:
        keeper.close()
    files = [notary.export(home, start + i) for i in range(count)]
    history = notary.load_history(tmp / "A", [])
    assert all(receipts.verify(f, history)["verified"] for f in files)

    # The raw checks of each file, keys loaded once: (verify function, signature, message).
    def cose_checks(raw: bytes, keys: dict[bytes, Any]) -> list[tuple[Any, bytes, bytes]]:
        env = cose.Envelope.parse(raw, max_size=1 << 20)
        return [(keys[(s.kid, s.alg)], s.signature, env.to_be_signed(s.protected)) for s in env.signatures]

    def loaded(key: suites.PublicKey) -> dict[tuple[bytes, int], Any]:
        out = {}
        for alg, pub in key.parts:
            if alg == suites.ED25519:
                out[(bytes.fromhex(key.keyid), alg)] = ed25519.Ed25519PublicKey.from_public_bytes(pub).verify
            elif alg == suites.MLDSA65:
                out[(bytes.fromhex(key.keyid), alg)] = mldsa.MLDSA65PublicKey.from_public_bytes(pub).verify
        return out

    raw_checks = []
    for f in files:
        rf = receipts.ReceiptFile.from_bytes(f)
        from qhx_edge.core.cards import parse_card

        card = parse_card(rf.card)
        checks = cose_checks(rf.card, loaded(card.signing_key))
        root = history.domains[DOMAIN].root_at(parse(rf.notary).payload.issued_at).payload
        role_keys: dict[tuple[bytes, int], Any] = {}
        for kid in root.roles["notary"].keyids:
            role_keys.update(loaded(root.keys[kid]))
        checks += cose_checks(rf.notary, role_keys)
        checks += cose_checks(rf.tree_head, loaded(card.signing_key))
        assert rf.signature is not None
        checks += cose_checks(rf.signature, loaded(card.signing_key))
        authorities = {x509.load_der_x509_certificate(a).subject.public_bytes(): x509.load_der_x509_certificate(a)
                       for a in held.payload.x509_authorities}  # fmt: skip
        for chain in (chains[WEB], chains[DB]):
            parsed = [x509.load_der_x509_certificate(c) for c in chain]
            issuers = [*parsed[1:], authorities[parsed[-1].issuer.public_bytes()]]
            for cert, issuer in zip(parsed, issuers, strict=True):
                pub = issuer.public_key()
                assert isinstance(pub, ec.EllipticCurvePublicKey)
                checks.append((lambda sig, msg, pub=pub: pub.verify(sig, msg, ec.ECDSA(hashes.SHA256())),
                               cert.signature, cert.tbs_certificate_bytes))  # fmt: skip
        raw_checks.append(checks)
    per_receipt = len(raw_checks[0])

    def ours() -> float:
        t = time.perf_counter()
        for f in files:
            receipts.verify(f, history)
        return len(files) / (time.perf_counter() - t)

    def raw() -> float:
        t = time.perf_counter()
        for checks in raw_checks:
            for fn, sig, msg in checks:
                fn(sig, msg)
        return len(raw_checks) / (time.perf_counter() - t)

    ours()  # warm
    r = paired(rounds, raw, ours)
    return figure(r["ratio"], 0.7, receipts=count, signatures_per_receipt=per_receipt,
                  ours_per_s=round(r["measured_median"], 1), raw_per_s=round(r["limit_median"], 1))  # fmt: skip


def run(quick: bool, tmp: Path) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    t0 = time.perf_counter()
    out: dict[str, Any] = {"mode": "quick" if quick else "full"}
    home = make_node(tmp)
    # stunnel's certificate: an ECDSA P-256 SVID of the same node's issuer (the db identity).
    from cryptography.hazmat.primitives import serialization

    from qhx_edge.homes.bundles import EndpointSvid
    from qhx_edge.links import tls

    cred: tls.Credential = EndpointSvid(home, lambda: PASSPHRASE, selector="qhx-edge:bench-db", role="bench")()
    from cryptography import x509

    pem = b"".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in cred.chain)
    key = serialization.load_der_private_key(cred.key, None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_path, key_path, ca_path = tmp / "svid.pem", tmp / "svid.key", tmp / "ca.pem"
    cert_path.write_bytes(pem)
    key_path.write_bytes(key)
    os.chmod(key_path, 0o600)
    from qhx_edge.homes import node

    with node.Node(home) as n:  # the domain's X.509 authorities: what the chain leads to
        held = n.store.current(DOMAIN, "bundle")
        authorities = held.payload.x509_authorities if held is not None else ()
    ca_path.write_bytes(b"".join(x509.load_der_x509_certificate(a).public_bytes(serialization.Encoding.PEM)
                                 for a in authorities))  # fmt: skip
    size = sizes.megabytes << 20
    sink = Sink()
    ours = Pair(home, sink.port, CLASSICAL)
    theirs = Stunnels(tmp, sink.port, cert_path, key_path, ca_path)
    try:
        _push(ours.port, 1 << 20)  # warm both paths (first handshakes, page cache)
        _push(theirs.port, 1 << 20)
        vs_stunnel = paired(sizes.rounds, lambda: _push(theirs.port, size), lambda: _push(ours.port, size))
        vs_tcp = paired(sizes.rounds, lambda: _push(sink.port, size), lambda: _push(ours.port, size))
        vs_memory = paired(sizes.rounds, lambda: memory_tls_rate(size, cert_path, key_path),
                           lambda: _push(ours.port, size))  # fmt: skip
        mb = 1 << 20
        out["throughput_vs_stunnel"] = figure(
            vs_stunnel["ratio"], 0.5, megabytes=sizes.megabytes,
            ours_mb_s=round(vs_stunnel["measured_median"] / mb, 1),
            stunnel_mb_s=round(vs_stunnel["limit_median"] / mb, 1),
        )  # fmt: skip
        out["throughput_vs_tcp"] = {
            "value": round(vs_tcp["ratio"], 4),
            "tcp_mb_s": round(vs_tcp["limit_median"] / mb, 1),
        }
        out["throughput_vs_memory_tls"] = {
            "value": round(vs_memory["ratio"], 4),
            "memory_tls_mb_s": round(vs_memory["limit_median"] / mb, 1),
        }
        setup: dict[str, Any] = {}
        setup["stunnel_classical"] = statistics.median(_setup_ms(theirs.port) for _ in range(sizes.setups))
        _setup_ms(ours.port)
        setup["classical_resumed"] = statistics.median(_setup_ms(ours.port) for _ in range(sizes.setups))
    finally:
        ours.close()
        theirs.close()
    pq = Pair(home, sink.port, PQ)
    try:
        _setup_ms(pq.port)
        setup["pq_resumed"] = statistics.median(_setup_ms(pq.port) for _ in range(sizes.setups))
    finally:
        pq.close()
    for name, groups in (("classical", CLASSICAL), ("pq", PQ)):  # a full handshake on every connection
        full = Pair(home, sink.port, groups, resume=False)
        try:
            _setup_ms(full.port)
            setup[name] = statistics.median(_setup_ms(full.port) for _ in range(sizes.setups))
        finally:
            full.close()
    out["setup_ms"] = {k: round(v, 2) for k, v in setup.items()}
    sink.close()
    out["notary_ms"] = notary_latency(home, sizes)
    out["receipts_verified_per_s"] = receipt_verification(home, tmp, 20 if quick else 200, sizes.rounds)
    out["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve_tunnel(*sys.argv[2:8])
        sys.exit(0)
    if shutil.which("stunnel4") is None:
        sys.exit("bench/tunnel.py needs stunnel4 (Debian's stunnel4 package; .ci/setup installs it)")
    sys.exit(main(run, __doc__))
