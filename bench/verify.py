"""Verification and import throughput against the raw signature limit, as paired medians.

Run ``python bench/verify.py`` (``--quick`` in CI, ``--dir`` for a real disk)
from the repository root.  It prints one JSON object.  Every figure is a
paired median (bench/common.py): rounds alternate the raw limit and the
measured side, each measured round is divided by the limit round beside it,
and the headline is the median of those ratios.  The raw limit is always one
Ed25519 and one ML-DSA-65 verification per document, with key objects loaded
once, over **the same documents'** own ``Sig_structure`` bytes and signatures,
on one core.

* ``verify``: ``trust.verify_batch`` of distinct hybrid-signed bundle
  documents (v2..vN, the authority's real CA certificates) and a freshness
  naming the newest, against a real node's trust state, signatures checked on
  the calling thread.  Target >= 0.90.
* ``verify_parallel``: the same batch with ``homes.node.spread_checks`` (the
  checker a node's import uses: signature checks spread over the cores,
  verdicts decided afterwards on one thread), against the same single-core
  limit.  Target >= 1.5 (two cores).
* ``check_role``: ``documents.parse`` + ``trust.check_role`` per document (no
  batch logic), single core: where the per-document overhead is.
* ``import_steady``: ``Node.import_pack`` of a 1,000-document pack into a node
  store already holding ``held`` documents (10,000; 500 with ``--quick``),
  imported as packs beforehand, copied afresh for every round.  The manifest
  signature and digests, the SQLite transaction (``synchronous=FULL``) and the
  audit entries are all inside.  Target >= 0.85.
* ``import_fresh``: the same pack into a node holding only the authority's
  current documents.
* ``cli_import``: ``qhx-edge pack import`` of the same pack file as a
  subprocess (interpreter start, imports, the command, its JSON report)
  against the same raw limit: what an operator waits for.  No target.
* ``import_sealed_passphrase``: the pack sealed to a node whose keys are under
  a passphrase: ``Node.import_pack`` pays the Argon2id unlock, the key file,
  one HPKE decapsulation, the cipher over the pack and the import.  Its limit
  is the same raw primitives: Argon2id with the keystore's parameters, the
  ChaCha20-Poly1305 opens of the check value and key file, one HPKE decrypt of
  the wrapped content key, ChaCha20-Poly1305 over the pack, and the raw pairs.
  No target.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python bench/verify.py), as CI does
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cbor2
from cryptography.hazmat.backends.openssl import backend as openssl_backend
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from bench.common import figure, main, paired, timed
from qhx_edge.core import documents as D  # noqa: N812 - same alias as authority.py
from qhx_edge.core import suites, trust
from qhx_edge.core.cards import parse_card
from qhx_edge.homes import node
from qhx_edge.homes.authority import Authority
from qhx_edge.packs import pack, seal
from qhx_edge.store import keystore

VERIFY_TARGET = 0.90
PARALLEL_TARGET = 1.5
IMPORT_TARGET = 0.85
DOMAIN = "bench.example"
PACK_DOCS = 1000
PASSPHRASE = b"bench passphrase"


@dataclass(frozen=True)
class Sizes:
    rounds: int  # paired rounds of the in-process figures
    docs: int  # documents of the verify batch (bundles and one freshness)
    held: int  # documents a steady-state node holds before the measured import
    imports: int  # paired rounds of the steady-state import
    others: int  # paired rounds of the fresh, command-line and sealed imports


FULL = Sizes(rounds=15, docs=300, held=10_000, imports=7, others=5)
QUICK = Sizes(rounds=3, docs=60, held=500, imports=2, others=1)


def quiet() -> contextlib.AbstractContextManager[Any]:
    """Swallow the loud no-passphrase warning of a demo keystore (not what is measured)."""
    return contextlib.redirect_stderr(io.StringIO())


class Fixture:
    """An authority home (hybrid, no passphrase), its pki and freshness signers, and node homes on disk."""

    def __init__(self, tmp: Path, now: int) -> None:
        self.tmp = tmp
        self.now = now
        with quiet():
            self.auth = Authority.init(
                tmp / "authority", DOMAIN, suite="hybrid", root_keys=1, root_threshold=1, passphrase=None, now=now
            )
            self.pki = self.auth._signers("pki")
            self.freshness = self.auth._signers("freshness")
        root = D.parse(self.auth.anchor()).payload
        bundle = D.parse(self.auth.current("bundle")).payload
        policy = D.parse(self.auth.current("policy")).payload
        assert isinstance(root, D.Root)
        assert isinstance(bundle, D.Bundle)
        assert isinstance(policy, D.Policy)
        self.root, self.bundle1, self.policy = root, bundle, policy
        self._homes = 0

    def bundle_doc(self, version: int) -> bytes:
        """Bundle ``version``: the authority's real CA certificates, signed by the pki key (hybrid)."""
        b = self.bundle1
        payload = D.Bundle(
            domain=b.domain,
            version=version,
            issued_at=self.now,
            expires=self.now + 90 * 86400,
            x509_authorities=b.x509_authorities,
            jwt_authorities=b.jwt_authorities,
            refresh_hint=b.refresh_hint,
        )
        return D.sign(payload, self.pki)

    def bundle_docs(self, versions: Sequence[int]) -> list[bytes]:
        """Many bundles, signed on every core (fixture only: signing is not measured)."""
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            return list(pool.map(self.bundle_doc, versions, chunksize=64))

    def freshness_doc(self, version: int, bundle_version: int) -> bytes:
        payload = D.Freshness(
            domain=DOMAIN,
            version=version,
            issued_at=self.now,
            expires=self.now + self.policy.staleness.hard,
            versions={"root": self.root.version, "bundle": bundle_version, "policy": self.policy.version},
            agreements={},
        )
        return D.sign(payload, self.freshness)

    def batch(self, first: int, last: int, freshness_version: int) -> list[bytes]:
        """Bundles ``first``..``last`` and a freshness naming ``last``."""
        return [*self.bundle_docs(range(first, last + 1)), self.freshness_doc(freshness_version, last)]

    def export(self, docs: list[bytes]) -> bytes:
        with quiet():
            return self.auth.export_pack(docs, self.now)

    def fresh_node(self, passphrase: bytes | None = None) -> Path:
        """A new node home anchored to the authority, holding its current documents."""
        self._homes += 1
        home = self.tmp / f"node-{self._homes}"
        with quiet():
            node.init(home, self.auth.anchor(), self.now, passphrase=passphrase)
            n = node.Node(home)
            try:
                n.import_pack(self.export(self.auth.export_documents()), self.now)
            finally:
                n.close()
        return home


@dataclass(frozen=True)
class RawPair:
    """One document's Ed25519 and ML-DSA-65 signature checks, key objects loaded once."""

    ed_key: ed25519.Ed25519PublicKey
    ed_sig: bytes
    ed_msg: bytes
    ml_key: mldsa.MLDSA65PublicKey
    ml_sig: bytes
    ml_msg: bytes


def raw_pairs(root: D.Root, docs: Sequence[bytes]) -> list[RawPair]:
    """The raw checks of ``docs`` (each signed by one hybrid key of ``root``)."""
    loaded: dict[bytes, Any] = {}

    def load(cls: Any, raw: bytes) -> Any:
        if raw not in loaded:
            loaded[raw] = cls.from_public_bytes(raw)
        return loaded[raw]

    out = []
    for raw_doc in docs:
        doc = D.parse(raw_doc)
        sigs = {s.alg: s for s in doc.envelope.signatures}
        ed, ml = sigs[suites.ED25519], sigs[suites.MLDSA65]
        parts = dict(root.keys[ed.kid.hex()].parts)
        out.append(
            RawPair(
                load(ed25519.Ed25519PublicKey, parts[suites.ED25519]),
                ed.signature,
                doc.envelope.to_be_signed(ed.protected),
                load(mldsa.MLDSA65PublicKey, parts[suites.MLDSA65]),
                ml.signature,
                doc.envelope.to_be_signed(ml.protected),
            )
        )
    for p in out:  # every raw check must pass, or the limit measures nothing
        p.ed_key.verify(p.ed_sig, p.ed_msg)
        p.ml_key.verify(p.ml_sig, p.ml_msg)
    return out


def raw_rate(pairs: Sequence[RawPair]) -> Callable[[], float]:
    """Documents per second of the raw single-core limit over ``pairs``."""

    def run() -> None:
        for p in pairs:
            p.ed_key.verify(p.ed_sig, p.ed_msg)
            p.ml_key.verify(p.ml_sig, p.ml_msg)

    return lambda: timed(len(pairs), run)


def summary(result: dict[str, float], target: float | None) -> dict[str, Any]:
    """A paired result as a figure (with its target) or, without one, as a plain ratio."""
    detail = {
        "limit_docs_per_s": round(result["limit_median"], 1),
        "measured_docs_per_s": round(result["measured_median"], 1),
        "ratio_best_of": round(result["ratio_best"], 4),
        "rounds": result["rounds"],
    }
    if target is None:
        return {"value": round(result["ratio"], 4), "target": None, **detail}
    return figure(result["ratio"], target, **detail)


def _import(
    home: Path, data: bytes, now: int, get_passphrase: node.PassphraseSource | None = None
) -> node.ImportResult:
    with quiet():
        n = node.Node(home, get_passphrase) if get_passphrase is not None else node.Node(home)
        try:
            return n.import_pack(data, now)
        finally:
            n.close()


def _copy_home(src: Path, dst: Path) -> Path:
    """A copy of a home, on disk before it is used: an fsync in the measured import must not
    pay for writing back the copy (a steady-state store has long been on disk)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    for path in [dst, *dst.rglob("*")]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return dst


def run(quick: bool, tmp: Path) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    t0 = time.perf_counter()
    fx = Fixture(tmp, int(time.time()))
    now = fx.now
    out: dict[str, Any] = {"mode": "quick" if quick else "full"}

    # --- verification of a batch ------------------------------------------------------------
    batch = fx.batch(2, sizes.docs, 2)  # sizes.docs - 1 bundles and one freshness
    pairs = raw_pairs(fx.root, batch)
    home = fx.fresh_node()
    with quiet():
        n = node.Node(home)
        try:
            state = n.store.trust_state()
        finally:
            n.close()
    expected = {"history": len(batch) - 2, "applied": 2}

    def verify_rate(checker: trust.Checker) -> Callable[[], float]:
        def go() -> None:
            outcome = trust.verify_batch(batch, state, now, checker=checker)
            counts: dict[str, int] = {}
            for v in outcome.verdicts:
                counts[v.status] = counts.get(v.status, 0) + 1
            assert counts == expected, counts

        return lambda: timed(len(batch), go)

    def check_role_rate() -> float:
        def go() -> None:
            for d in batch[:-1]:
                trust.check_role(D.parse(d), fx.root, "pki")

        return timed(len(batch) - 1, go)

    limit = raw_rate(pairs)
    verify_rate(trust.check_signatures)()  # warm-up, and a check of every verdict
    out["verify"] = summary(paired(sizes.rounds, limit, verify_rate(trust.check_signatures)), VERIFY_TARGET)
    out["verify_parallel"] = summary(paired(sizes.rounds, limit, verify_rate(node.spread_checks)), PARALLEL_TARGET)
    out["check_role"] = summary(paired(sizes.rounds, raw_rate(pairs[:-1]), check_role_rate), None)

    # --- the 1,000-document pack and a steady-state node ------------------------------------
    held_docs = sizes.held
    first = 2 + held_docs  # the held bundles are v2..v(first - 1), in packs of 999 and a freshness
    held_packs = [(lo, min(lo + PACK_DOCS - 2, first - 1)) for lo in range(2, first, PACK_DOCS - 1)]
    pack_docs = fx.batch(first, first + PACK_DOCS - 2, 2 + len(held_packs))
    assert len(pack_docs) == PACK_DOCS
    pack_bytes = fx.export(pack_docs)
    pack_pairs = raw_pairs(fx.root, pack_docs)
    pack_limit = raw_rate(pack_pairs)
    expected_counts = {"history": PACK_DOCS - 2, "applied": 2}

    steady_src = fx.fresh_node()
    for i, (lo, hi) in enumerate(held_packs):
        result = _import(steady_src, fx.export(fx.batch(lo, hi, 2 + i)), now)
        assert result.applied, result.to_json()["counts"]
    with sqlite3.connect(steady_src / "node.sqlite") as db:
        held_count = db.execute("SELECT count(*) FROM documents").fetchone()[0]
    assert held_count >= held_docs, held_count

    def import_rate(make_home: Callable[[], Path], data: bytes) -> Callable[[], float]:
        def measured() -> float:
            target_home = make_home()
            result: list[node.ImportResult] = []
            rate = timed(PACK_DOCS, lambda: result.append(_import(target_home, data, now)))
            counts = result[0].to_json()["counts"]
            assert result[0].applied, counts
            assert counts == expected_counts, counts
            return rate

        return measured

    steady_home = tmp / "steady"
    out["import_steady"] = summary(
        paired(sizes.imports, pack_limit, import_rate(lambda: _copy_home(steady_src, steady_home), pack_bytes)),
        IMPORT_TARGET,
    )
    out["import_steady"]["held_documents"] = held_count
    out["import_fresh"] = summary(paired(sizes.others, pack_limit, import_rate(fx.fresh_node, pack_bytes)), None)

    # --- the command line, end to end ---------------------------------------------------------
    pack_file = tmp / "bench.pack"
    pack.write(pack_file, pack_bytes)
    exe = Path(sys.executable).with_name("qhx-edge")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "qhx_edge.cli"]

    def cli_rate() -> float:
        target_home = fx.fresh_node()
        cmd = [*cli, "--home", str(target_home), "--json", "pack", "import", str(pack_file)]
        proc: list[subprocess.CompletedProcess[bytes]] = []
        rate = timed(PACK_DOCS, lambda: proc.append(subprocess.run(cmd, capture_output=True, check=False)))
        assert proc[0].returncode == 0, proc[0].stderr.decode()[-2000:]
        return rate

    out["cli_import"] = summary(paired(sizes.others, pack_limit, cli_rate), None)

    # --- a sealed pack into a passphrase-protected node -----------------------------------------
    sealed_home = fx.fresh_node(PASSPHRASE)
    ks = cbor2.loads((sealed_home / keystore.KEYSTORE).read_bytes())
    key_file = cbor2.loads((sealed_home / "keys" / "node-encryption.key").read_bytes())
    with quiet():
        n = node.Node(sealed_home, lambda: PASSPHRASE)
        try:
            enc_key = n.identity.encryption
            recipient = parse_card(n.card()).encryption_key
        finally:
            n.close()
    sealed = seal.seal(pack_bytes, [recipient])
    frame = seal.split(sealed)
    (entry,) = frame.header["recipients"]
    hpke_private = enc_key.hpke_key()

    def sealed_limit() -> float:
        def go() -> None:
            kdf = ks["kdf"]
            key = Argon2id(
                salt=ks["salt"],
                length=32,
                iterations=kdf["iterations"],
                lanes=kdf["lanes"],
                memory_cost=kdf["memory_kib"],
            ).derive(PASSPHRASE)
            aead = ChaCha20Poly1305(key)
            aead.decrypt(ks["check"][0], ks["check"][1], b"check")
            aead.decrypt(key_file["nonce"], key_file["ct"], b"key/node-encryption")
            content_key = seal.SUITE.decrypt(entry["wrapped"], hpke_private, info=seal.INFO)
            ChaCha20Poly1305(content_key).decrypt(frame.header["nonce"], frame.payload, frame.head)
            for p in pack_pairs:
                p.ed_key.verify(p.ed_sig, p.ed_msg)
                p.ml_key.verify(p.ml_sig, p.ml_msg)

        return timed(PACK_DOCS, go)

    def sealed_rate() -> float:
        target_home = _copy_home(sealed_home, tmp / "sealed-round")
        result: list[node.ImportResult] = []
        rate = timed(PACK_DOCS, lambda: result.append(_import(target_home, sealed, now, lambda: PASSPHRASE)))
        assert result[0].applied, result[0].to_json()["counts"]
        assert result[0].sealed
        return rate

    out["import_sealed_passphrase"] = summary(paired(sizes.others, sealed_limit, sealed_rate), None)

    out.update(
        document_bytes=len(batch[0]),
        pack_bytes=len(pack_bytes),
        batch_documents=len(batch),
        cores=len(os.sched_getaffinity(0)),
        openssl=openssl_backend.openssl_version_text(),
        sqlite=sqlite3.sqlite_version,
        elapsed_s=round(time.perf_counter() - t0, 2),
    )
    return out


if __name__ == "__main__":
    sys.exit(main(run, __doc__))
