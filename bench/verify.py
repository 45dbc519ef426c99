"""Verification throughput as ratios against the raw signature primitives.

Run ``python -m bench.verify`` (or ``--quick``) from the repository root.  It
prints one JSON object.  Absolute rates on a small shared machine are noise;
the ratios are not, because the raw limit is measured in the same run, over
the same message, signatures and keys as the documents verified.

* ``raw_pairs_per_s``: one Ed25519 and one ML-DSA-65 verification with key
  objects loaded once (the honest limit), over the exact ``Sig_structure`` of
  a real hybrid-signed bundle document.
* ``hybrid_docs_verified_per_s``: ``documents.parse`` + ``trust.check_role``
  (pki, threshold 1) of distinct hybrid-signed bundle documents.
* ``import_1000_docs_per_s``: ``node.Node(home).import_pack`` end to end of a
  1,000-document pack (bundle v2..v1000 and a freshness naming v1000) into a
  fresh on-disk SQLite node store.

Each figure is the best of several rounds; raw and document rounds are
interleaved so that both see the same machine load.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import cryptography
from cryptography.hazmat.backends.openssl import backend as openssl_backend
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa

from qhx_edge.core import documents as D  # noqa: N812 - same alias as authority.py
from qhx_edge.core import suites, trust
from qhx_edge.homes import node
from qhx_edge.homes.authority import Authority

VERIFY_TARGET = 0.80
IMPORT_TARGET = 0.60
DOMAIN = "bench.example"
PACK_DOCS = 1000


@dataclass(frozen=True)
class Sizes:
    rounds: int  # interleaved raw / document rounds
    pairs: int  # raw pairs per round
    docs: int  # distinct documents verified per round
    imports: int  # 1,000-document imports (each into a fresh node)


# Many short rounds rather than a few long ones: on a shared machine the best
# round is the one that ran undisturbed, and short rounds find one more often.
FULL = Sizes(rounds=40, pairs=200, docs=200, imports=8)
QUICK = Sizes(rounds=12, pairs=100, docs=100, imports=3)


def _rate(count: int, fn: Callable[[], None]) -> float:
    """Items per second of one timed call of ``fn`` (which handles ``count`` items)."""
    gc.collect()
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


class Fixture:
    """An authority home, its pki and freshness signers, and node homes on disk."""

    def __init__(self, tmp: Path, now: int) -> None:
        self.tmp = tmp
        self.now = now
        # No passphrase: Argon2id is not what is measured here.  Its warning goes to stderr.
        with contextlib.redirect_stderr(io.StringIO()):
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

    def fresh_node(self) -> Path:
        """A new node home anchored to the authority, holding its current documents."""
        self._homes += 1
        home = self.tmp / f"node-{self._homes}"
        node.init(home, self.auth.anchor(), self.now)
        n = node.Node(home)
        try:
            n.import_pack(self.auth.export_pack(self.auth.export_documents(), self.now), self.now)
        finally:
            n.close()
        return home


@dataclass(frozen=True)
class RawInputs:
    """The exact messages, signatures and public keys of one real hybrid-signed document."""

    ed_msg: bytes
    ed_public: bytes
    ed_sig: bytes
    ml_msg: bytes
    ml_public: bytes
    ml_sig: bytes


def raw_inputs(root: D.Root, doc: bytes) -> RawInputs:
    signed = D.parse(doc)
    sigs = {s.alg: s for s in signed.envelope.signatures}
    ed, ml = sigs[suites.ED25519], sigs[suites.MLDSA65]
    (key,) = root.role_keys("pki").values()
    parts = dict(key.parts)
    return RawInputs(
        signed.envelope.to_be_signed(ed.protected),
        parts[suites.ED25519],
        ed.signature,
        signed.envelope.to_be_signed(ml.protected),
        parts[suites.MLDSA65],
        ml.signature,
    )


def run(sizes: Sizes, tmp: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    now = int(time.time())
    fx = Fixture(tmp, now)

    # --- documents ------------------------------------------------------------------
    docs = [fx.bundle_doc(v) for v in range(2, 2 + sizes.docs)]
    r = raw_inputs(fx.root, docs[0])
    msg, ed_raw, ed_sig, ml_msg, ml_raw, ml_sig = r.ed_msg, r.ed_public, r.ed_sig, r.ml_msg, r.ml_public, r.ml_sig
    ed_key = ed25519.Ed25519PublicKey.from_public_bytes(ed_raw)
    ml_key = mldsa.MLDSA65PublicKey.from_public_bytes(ml_raw)
    ed_key.verify(ed_sig, msg)
    ml_key.verify(ml_sig, ml_msg)

    try:
        import nacl
        import nacl.signing

        nacl_key: Any = nacl.signing.VerifyKey(ed_raw)
        nacl_key.verify(msg, ed_sig)
        nacl_version: str | None = nacl.__version__
    except ImportError:
        nacl_key, nacl_version = None, None

    n = sizes.pairs

    def pairs() -> None:
        for _ in range(n):
            ed_key.verify(ed_sig, msg)
            ml_key.verify(ml_sig, ml_msg)

    def ed_only() -> None:
        for _ in range(n):
            ed_key.verify(ed_sig, msg)

    def ml_only() -> None:
        for _ in range(n):
            ml_key.verify(ml_sig, ml_msg)

    def nacl_only() -> None:
        for _ in range(n):
            nacl_key.verify(msg, ed_sig)

    def registry_pairs() -> None:  # what suites.py does per signature: load from raw bytes, then verify
        ed, ml = suites.get(suites.ED25519), suites.get(suites.MLDSA65)
        for _ in range(n):
            assert ed.verify(ed_raw, ed_sig, msg)
            assert ml.verify(ml_raw, ml_sig, ml_msg)

    root = fx.root

    def verify_docs() -> None:
        for d in docs:
            trust.check_role(D.parse(d), root, "pki")

    rates: dict[str, list[float]] = {}
    paired: dict[str, list[float]] = {"verify": [], "import": []}  # ratio to the raw round just before

    def measure(name: str, count: int, fn: Callable[[], None]) -> float:
        rate = _rate(count, fn)
        rates.setdefault(name, []).append(rate)
        return rate

    verify_docs()  # warm-up, and a check that every document verifies
    registry_pairs()
    for _ in range(sizes.rounds):
        raw_round = measure("pairs", n, pairs)
        paired["verify"].append(measure("docs", len(docs), verify_docs) / raw_round)
        measure("registry", n, registry_pairs)
        measure("ed", n, ed_only)
        measure("ml", n, ml_only)
        if nacl_key is not None:
            measure("nacl", n, nacl_only)

    # --- 1,000-document import ------------------------------------------------------------
    batch = [fx.bundle_doc(v) for v in range(2, PACK_DOCS + 1)] + [fx.freshness_doc(2, PACK_DOCS)]
    assert len(batch) == PACK_DOCS
    # Signed like any authority export: the manifest check (signature + 1,000
    # digests) is part of the measured import.
    pack_bytes = fx.auth.export_pack(batch, fx.now)
    counts: dict[str, int] = {}
    for _ in range(sizes.imports):
        home = fx.fresh_node()
        raw_round = measure("pairs", n, pairs)  # the limit, under the same load as this import
        gc.collect()
        start = time.perf_counter()
        n_ = node.Node(home)
        try:
            result = n_.import_pack(pack_bytes, now)
        finally:
            n_.close()
        elapsed = time.perf_counter() - start
        rates.setdefault("import", []).append(PACK_DOCS / elapsed)
        paired["import"].append(PACK_DOCS / elapsed / raw_round)
        counts = result.to_json()["counts"]
        # verify_batch accepts the shape: v1000 and the freshness current, v2..v999 history.
        assert result.applied, "the pack was not applied"
        assert counts == {"history": PACK_DOCS - 2, "applied": 2}, counts

    best = {name: max(values) for name, values in rates.items()}
    raw = best["pairs"]
    verify_ratio = best["docs"] / raw
    import_ratio = best["import"] / raw
    return {
        "mode": "quick" if sizes is QUICK else "full",
        "raw_pairs_per_s": round(raw, 1),
        "raw_ed25519_openssl_per_s": round(best["ed"], 1),
        "raw_ed25519_pynacl_per_s": round(best["nacl"], 1) if "nacl" in best else None,
        "raw_mldsa65_per_s": round(best["ml"], 1),
        "registry_pairs_per_s": round(best["registry"], 1),
        "registry_ratio": round(best["registry"] / raw, 3),
        "hybrid_docs_verified_per_s": round(best["docs"], 1),
        "verify_ratio": round(verify_ratio, 3),
        "verify_target": VERIFY_TARGET,
        "verify_meets_target": verify_ratio >= VERIFY_TARGET,
        "verify_ratio_paired_median": round(statistics.median(paired["verify"]), 3),
        "import_1000_docs_per_s": round(best["import"], 1),
        "import_ratio": round(import_ratio, 3),
        "import_target": IMPORT_TARGET,
        "import_meets_target": import_ratio >= IMPORT_TARGET,
        "import_ratio_paired_median": round(statistics.median(paired["import"]), 3),
        "import_counts": counts,
        "message_bytes": len(msg),
        "document_bytes": len(docs[0]),
        "pack_bytes": len(pack_bytes),
        "samples": {"rounds": sizes.rounds, "pairs": n, "docs": len(docs), "imports": sizes.imports},
        "versions": {
            "python": platform.python_version(),
            "cryptography": cryptography.__version__,
            "openssl": openssl_backend.openssl_version_text(),
            "cbor2": _version("cbor2", cbor2),
            "sqlite": sqlite3.sqlite_version,
            "pynacl": nacl_version,
        },
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }


def _version(name: str, module: Any) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return getattr(module, "__version__", None)


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
    sys.exit(main())
