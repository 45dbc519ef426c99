"""Pack throughput (sealing, export, the sneakernet hop) against raw primitives, as paired medians.

Run ``python bench/packs.py`` (``--quick`` in CI, ``--dir`` for a real disk)
from the repository root.  It prints one JSON object.  Each figure is a paired
median (bench/common.py) of the measured side over a raw limit doing the same
work with ``cryptography``'s primitives alone, keys loaded once, over the same
bytes, in rounds alternating with the measured ones.

The pack is realistic: 1,000 hybrid-signed documents (bundle v2..v1000 with
the authority's real CA certificates, and a freshness naming v1000), exported
by the authority (manifest signed by its freshness key), about 10 MB.

* ``seal``: ``seal.seal(pack, [recipient])`` against its raw work: one HPKE
  encryption (ML-KEM-768 + X25519, HKDF-SHA256) of a 32-byte content key and
  ChaCha20-Poly1305 over the pack.  Target >= 0.70.
* ``open``: ``seal.open_sealed(sealed, key)`` against one HPKE decryption of
  the wrapped key and ChaCha20-Poly1305 decryption of the pack.  Target >= 0.70.
  ``container_decode_mb_per_s`` is ``seal.split`` alone: the framed format
  checks only the header, so this share of opening does not grow with the pack.
* ``export``: ``Authority.export_pack`` of the 1,000 documents (the manifest
  with 1,000 digests, one hybrid manifest signature, the exporter's sequence
  saved) against SHA-256 of the 1,000 documents and one Ed25519 + ML-DSA-65
  signature over a message of the manifest's size.  No target.
* ``hop``: the whole sneakernet hop -- export, write to a file (temporary name,
  fsync, rename), read back, ``Node.import_pack`` into a fresh node -- against
  the raw export work plus one Ed25519 + ML-DSA-65 verification per document.
  No target (``bench/verify.py`` holds the import targets).
"""

from __future__ import annotations

import hashlib
import secrets
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python bench/packs.py), as CI does
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from bench.common import main, paired, timed
from bench.verify import PACK_DOCS, Fixture, _import, quiet, raw_pairs, summary
from qhx_edge.core import cbor, suites
from qhx_edge.core.cards import parse_card
from qhx_edge.homes import node
from qhx_edge.packs import pack, seal

SEAL_TARGET = 0.70
OPEN_TARGET = 0.70


def run(quick: bool, tmp: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    rounds, hops = (5, 3) if quick else (25, 9)
    fx = Fixture(tmp, int(time.time()))
    now = fx.now
    out: dict[str, Any] = {"mode": "quick" if quick else "full"}

    batch = fx.batch(2, PACK_DOCS, 2)
    assert len(batch) == PACK_DOCS
    pack_bytes = fx.export(batch)
    size = len(pack_bytes)
    mb = 1e6

    # --- sealing against one KEM operation and the cipher over the same bytes ----------------
    home = fx.fresh_node()
    with quiet():
        n = node.Node(home)
        try:
            key = n.identity.encryption
            recipient = parse_card(n.card()).encryption_key
        finally:
            n.close()
    public, private = recipient.hpke_key(), key.hpke_key()  # loaded once: the honest limit
    sealed = seal.seal(pack_bytes, [recipient])
    assert seal.open_sealed(sealed, key) == pack_bytes
    frame = seal.split(sealed)
    head = frame.head

    def raw_seal() -> None:
        content_key = ChaCha20Poly1305.generate_key()
        seal.SUITE.encrypt(content_key, public, info=seal.INFO)
        ChaCha20Poly1305(content_key).encrypt(secrets.token_bytes(12), pack_bytes, head)

    content_key = ChaCha20Poly1305.generate_key()
    wrapped = seal.SUITE.encrypt(content_key, public, info=seal.INFO)
    nonce = secrets.token_bytes(12)
    ciphertext = ChaCha20Poly1305(content_key).encrypt(nonce, pack_bytes, head)

    def raw_open() -> None:
        k = seal.SUITE.decrypt(wrapped, private, info=seal.INFO)
        ChaCha20Poly1305(k).decrypt(nonce, ciphertext, head)

    def rate(fn: Any) -> Any:
        return lambda: timed(size, fn)

    for name, limit, measured, target in (
        ("seal", raw_seal, lambda: seal.seal(pack_bytes, [recipient]), SEAL_TARGET),
        ("open", raw_open, lambda: seal.open_sealed(sealed, key), OPEN_TARGET),
    ):
        result = paired(rounds, rate(limit), rate(measured))
        out[name] = summary(result, target)
        out[name]["limit_mb_per_s"] = round(result["limit_median"] / mb, 1)
        out[name]["measured_mb_per_s"] = round(result["measured_median"] / mb, 1)
        for k in ("limit_docs_per_s", "measured_docs_per_s"):
            del out[name][k]
    out["container_decode_mb_per_s"] = round(
        max(timed(size, lambda: seal.split(sealed)) for _ in range(rounds)) / mb, 1
    )

    # --- export against its own raw work: hashing and one manifest signature -----------------
    (signer,) = fx.freshness
    parts = dict(signer.parts)
    ed_priv = ed25519.Ed25519PrivateKey.from_private_bytes(parts[suites.ED25519])
    ml_priv = mldsa.MLDSA65PrivateKey.from_seed_bytes(parts[suites.MLDSA65])
    manifest_size = len(pack.parse(pack_bytes).manifest.raw)
    message = secrets.token_bytes(manifest_size)

    def raw_export() -> None:
        for d in batch:
            hashlib.sha256(d).digest()
        ed_priv.sign(message)
        ml_priv.sign(message)

    def export() -> None:
        fx.export(batch)

    out["export"] = summary(
        paired(rounds, lambda: timed(PACK_DOCS, raw_export), lambda: timed(PACK_DOCS, export)), None
    )

    # --- the sneakernet hop: export, file, read, import into a fresh node --------------------
    pairs = raw_pairs(fx.root, batch)

    def raw_hop() -> float:
        def go() -> None:
            raw_export()
            for p in pairs:
                p.ed_key.verify(p.ed_sig, p.ed_msg)
                p.ml_key.verify(p.ml_sig, p.ml_msg)

        return timed(PACK_DOCS, go)

    stick = tmp / "stick"
    stick.mkdir()
    counts: dict[str, int] = {}

    def hop() -> float:
        target_home = fx.fresh_node()
        path = stick / f"hop-{secrets.token_hex(4)}.pack"
        result: list[node.ImportResult] = []

        def go() -> None:
            pack.write(path, fx.export(batch))
            result.append(_import(target_home, pack.read(path), now))

        r = timed(PACK_DOCS, go)
        counts.update(result[0].to_json()["counts"])
        assert result[0].applied, counts
        assert result[0].exporter["verified"], result[0].exporter
        return r

    out["hop"] = summary(paired(hops, raw_hop, hop), None)
    out["hop"]["counts"] = counts
    assert counts == {"history": PACK_DOCS - 2, "applied": 2}, counts

    out.update(
        pack_documents=PACK_DOCS,
        pack_bytes=size,
        sealed_bytes=len(sealed),
        manifest_bytes=manifest_size,
        header_bytes=len(cbor.encode(frame.header)),
        elapsed_s=round(time.perf_counter() - t0, 2),
    )
    return out


if __name__ == "__main__":
    sys.exit(main(run, __doc__))
