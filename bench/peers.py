"""qhx-edge beside python-tuf: signed metadata verified per second, side by side in one run.

Run ``python bench/peers.py`` (``--quick`` in CI) from the repository root with
the benchmark extra installed (``pip install -e '.[bench]'``: python-tuf).  It
prints one JSON object.

Both sides take untrusted bytes and return a verified object, with the same
signature algorithm (Ed25519: python-tuf has no ML-DSA, so qhx-edge runs its
``classical`` suite here), the same number of signatures, and documents of
about the same size in their own encodings (canonical JSON for python-tuf,
deterministic CBOR in COSE_Sign for qhx-edge; both sizes are printed):

* ``root-K`` -- a root listing K keys rotated from version 1 to 2, signed by
  ``t`` root keys: python-tuf's client step ``TrustedMetadataSet.update_root``
  (``Metadata.from_bytes``, the old root's threshold, the new root's own)
  against ``trust.verify_batch([root v2], state holding v1)`` (the same two
  thresholds, TUF 5.3.4, plus qhx-edge's key id, suite and role checks).
* ``doc-S`` -- a document of about S bytes signed by one key: python-tuf
  targets metadata with target files (``Metadata.from_bytes`` +
  ``Root.verify_delegate("targets", ...)``, as ``update_targets`` does before
  its version checks) against a qhx-edge policy with registrations
  (``documents.parse`` + ``trust.check_role``).

Each figure is the paired median (bench/common.py) of qhx-edge's rate over
python-tuf's, rounds alternating; target > 1 for every case (qhx-edge ahead).
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python bench/peers.py), as CI does
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, Root, TargetFile, Targets
    from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet
    from tuf.ngclient.config import EnvelopeType
except ImportError:  # pragma: no cover - a setup fault, said plainly
    sys.exit("bench/peers.py needs python-tuf: pip install -e '.[bench]'")

from bench.common import figure, main, paired, timed
from qhx_edge.core import documents as D  # noqa: N812 - same alias as authority.py
from qhx_edge.core import trust
from qhx_edge.core.suites import PrivateKey

TARGET = 1.0
DOMAIN = "peers.example"
ROOT_CASES = ((1, 1), (16, 3), (64, 8))  # (keys listed, root signatures)
DOC_SIZES = (1_000, 16_000, 128_000)  # bytes, about


def _expires(now: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(now + 365 * 86400, tz=dt.UTC).replace(microsecond=0)


# --- python-tuf ------------------------------------------------------------------------------


def tuf_roots(keys: int, sigs: int, now: int) -> tuple[bytes, bytes]:
    """Root v1 and v2 (python-tuf), each listing ``keys`` keys and signed by ``sigs`` root keys."""
    signers = [CryptoSigner.generate_ed25519() for _ in range(keys)]
    out = []
    for version in (1, 2):
        root = Root(version=version, expires=_expires(now))
        for i, s in enumerate(signers):
            root.add_key(s.public_key, "root" if i < sigs else ("targets", "snapshot", "timestamp")[i % 3])
        for role in ("targets", "snapshot", "timestamp"):
            if not root.roles[role].keyids:
                root.add_key(signers[0].public_key, role)
        root.roles["root"].threshold = sigs
        md = Metadata(root)
        for s in signers[:sigs]:
            md.sign(s, append=True)
        out.append(md.to_bytes())
    return out[0], out[1]


def tuf_targets(size: int, now: int) -> tuple[Metadata[Root], bytes]:
    """A trusted root and targets metadata of about ``size`` bytes signed by its one targets key."""
    signer = CryptoSigner.generate_ed25519()
    root = Root(expires=_expires(now))
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key(signer.public_key, role)
    trusted = Metadata(root)
    n = 1
    while True:
        targets = Targets(expires=_expires(now))
        for i in range(n):
            path = f"workloads/w{i:06d}.bin"
            targets.targets[path] = TargetFile(1024 + i, {"sha256": f"{i:064x}"}, path)
        md = Metadata(targets)
        md.sign(signer)
        data = md.to_bytes()
        if len(data) >= size:
            return trusted, data
        n = max(n + 1, n * size // len(data))


# --- qhx-edge ----------------------------------------------------------------------------------


def _qhx_root(version: int, keys: list[PrivateKey], sigs: int, now: int) -> D.Root:
    ids = [k.public.keyid for k in keys]
    roles = {}
    for i, name in enumerate(D.ROLES):
        if name == "root":
            roles[name] = D.RoleKeys(tuple(ids[:sigs]), sigs)
        else:
            mine = tuple(ids[sigs:][i::6]) if len(ids) > sigs else ()
            roles[name] = D.RoleKeys(mine or (ids[0],), 1)
    return D.Root(
        domain=DOMAIN,
        version=version,
        issued_at=now,
        expires=now + 365 * 86400,
        suite="classical",
        keys={k.public.keyid: k.public for k in keys},
        roles=roles,
    )


def qhx_roots(keys: int, sigs: int, now: int) -> tuple[bytes, bytes]:
    ring = [PrivateKey.generate("classical") for _ in range(keys)]
    return tuple(D.sign(_qhx_root(v, ring, sigs, now), ring[:sigs]) for v in (1, 2))  # type: ignore[return-value]


def qhx_policy(size: int, now: int) -> tuple[D.Root, bytes]:
    """A root and a policy of about ``size`` bytes signed by its one policy key."""
    key = PrivateKey.generate("classical")
    root = _qhx_root(1, [key], 1, now)
    n = 1
    while True:
        regs = tuple(
            {
                "spiffe_id": f"spiffe://{DOMAIN}/workloads/w{i:06d}",
                "selectors": ["unix:uid:1000", f"unix:sha256:{i:064x}"],
            }
            for i in range(n)
        )
        policy = D.Policy(
            domain=DOMAIN,
            version=2,
            issued_at=now,
            expires=now + 86400,
            registrations=regs,
            authorization=(),
            algorithms={},
            staleness=D.Staleness(3600, 86400, 3600, 300),
        )
        data = D.sign(policy, [key])
        if len(data) >= size:
            return root, data
        n = max(n + 1, n * size // len(data))


# --- the run -------------------------------------------------------------------------------------


def _rate(count: int, fn: Callable[[], None]) -> Callable[[], float]:
    return lambda: timed(count, fn)


def run(quick: bool, tmp: Path) -> dict[str, Any]:
    del tmp  # nothing on disk: both sides verify bytes in memory
    t0 = time.perf_counter()
    now = int(time.time())
    rounds = 5 if quick else 15
    cases: dict[str, Any] = {}

    for keys, sigs in ROOT_CASES:
        t1, t2 = tuf_roots(keys, sigs, now)
        q1, q2 = qhx_roots(keys, sigs, now)
        state = trust.TrustState({DOMAIN: trust.DomainView(root=trust.verify_anchor(q1, now))}, now)  # type: ignore[arg-type]
        reps = max(3, 600 // (keys + 20)) // (3 if quick else 1)

        trusted_root = Metadata[Root].from_bytes(t1).signed

        def tuf_update(t2: bytes = t2, trusted_root: Root = trusted_root, reps: int = reps) -> None:
            # The body of TrustedMetadataSet.update_root (tuf/ngclient), its canonical
            # JSON computed once where python-tuf computes it twice.
            for _ in range(reps):
                md = Metadata[Root].from_bytes(t2)
                payload = md.signed_bytes
                trusted_root.verify_delegate(Root.type, payload, md.signatures)
                assert md.signed.version == trusted_root.version + 1
                md.signed.verify_delegate(Root.type, payload, md.signatures)

        def qhx_update(q2: bytes = q2, state: trust.TrustState = state, reps: int = reps) -> None:
            for _ in range(reps):
                out = trust.verify_batch([q2], state, now)
                assert out.verdicts[0].status == "applied", out.verdicts[0].to_json()

        qhx_update()
        tuf_update()
        TrustedMetadataSet(t1, EnvelopeType.METADATA).update_root(t2)  # python-tuf's own client accepts it

        result = paired(rounds, _rate(reps, tuf_update), _rate(reps, qhx_update))
        cases[f"root-{keys}"] = figure(
            result["ratio"],
            TARGET,
            keys=keys,
            signatures=sigs,
            tuf_bytes=len(t2),
            qhx_bytes=len(q2),
            tuf_per_s=round(result["limit_median"], 1),
            qhx_per_s=round(result["measured_median"], 1),
            ratio_best_of=round(result["ratio_best"], 4),
        )

    for size in DOC_SIZES:
        trusted, tdata = tuf_targets(size, now)
        qroot, qdata = qhx_policy(size, now)
        reps = max(3, 3_000_000 // (size * (3 if quick else 1)))

        def tuf_verify(trusted: Metadata[Root] = trusted, tdata: bytes = tdata, reps: int = reps) -> None:
            for _ in range(reps):
                md = Metadata[Targets].from_bytes(tdata)
                trusted.signed.verify_delegate("targets", md.signed_bytes, md.signatures)

        def qhx_verify(qroot: D.Root = qroot, qdata: bytes = qdata, reps: int = reps) -> None:
            for _ in range(reps):
                trust.check_role(D.parse(qdata), qroot, "policy")

        qhx_verify()
        tuf_verify()
        result = paired(rounds, _rate(reps, tuf_verify), _rate(reps, qhx_verify))
        cases[f"doc-{size // 1000}k"] = figure(
            result["ratio"],
            TARGET,
            signatures=1,
            tuf_bytes=len(tdata),
            qhx_bytes=len(qdata),
            tuf_per_s=round(result["limit_median"], 1),
            qhx_per_s=round(result["measured_median"], 1),
            ratio_best_of=round(result["ratio_best"], 4),
        )

    from importlib import metadata

    return {
        "mode": "quick" if quick else "full",
        "cases": cases,
        "all_met": all(c["met"] for c in cases.values()),
        "tuf": metadata.version("tuf"),
        "securesystemslib": metadata.version("securesystemslib"),
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }


if __name__ == "__main__":
    sys.exit(main(run, __doc__))
