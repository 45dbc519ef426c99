"""SPIFFE bundles as JWK Sets (qhx_edge/core/spiffe_bundle.py): go-spiffe's vectors, our own export,
and what a hostile or sloppy bundle must not get past (SPIFFE Trust Domain and Bundle §4, §6.3;
X509-SVID §6; JWT-SVID §6)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from qhx_edge.core import documents as D  # noqa: N812
from qhx_edge.core import spiffe_bundle as sb
from qhx_edge.core.errors import Malformed, Oversize
from qhx_edge.homes.authority import Authority
from tests.conftest import Homes, Result


def _load(vectors: Path, name: str) -> bytes:
    return (vectors / "spiffe" / "bundles" / name).read_bytes()


def test_valid_vectors_parse_and_round_trip(vectors: Path) -> None:
    one = sb.parse(_load(vectors, "spiffebundle_valid_1.json"))
    assert len(one.x509_authorities) == 1
    assert [a.kid for a in one.jwt_authorities] == ["C6vs25welZOx6WksNYfbMfiw9l96pMnD"]
    assert one.sequence is None
    assert one.refresh_hint is None
    two = sb.parse(_load(vectors, "spiffebundle_valid_2.json"))
    assert (two.sequence, two.refresh_hint) == (1, 60)
    assert len(two.jwt_authorities) == 6
    assert len(two.x509_authorities) == 1
    for parsed in (one, two):
        written, left_out = sb.to_json(parsed)
        assert left_out == []
        again = sb.parse(written)
        assert again == parsed
        assert sb.to_json(again)[0] == written  # stable bytes


def test_vectors_refused_as_named(vectors: Path) -> None:
    with pytest.raises(Malformed, match="without a kid"):
        sb.parse(_load(vectors, "spiffebundle_missing_kid.json"))
    with pytest.raises(Malformed, match="no 'keys'"):
        sb.parse(_load(vectors, "spiffebundle_no_keys.json"))


def _vector(vectors: Path) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(_load(vectors, "spiffebundle_valid_2.json"))
    return value


def test_repeated_member_is_malformed(vectors: Path) -> None:
    """§6.3: duplicate names must be detected, not resolved by whichever the parser keeps."""
    text = _load(vectors, "spiffebundle_valid_2.json").decode()
    doubled = text.replace('"spiffe_sequence": 1', '"spiffe_sequence": 1, "spiffe_sequence": 9', 1)
    assert doubled != text
    with pytest.raises(Malformed, match="repeats the member 'spiffe_sequence'"):
        sb.parse(doubled.encode())


def test_repeated_kid_and_bad_members_are_malformed(vectors: Path) -> None:
    d = _vector(vectors)
    jwt = [k for k in d["keys"] if k["use"] == "jwt-svid"]
    jwt[1]["kid"] = jwt[0]["kid"]
    with pytest.raises(Malformed, match="repeats the jwt-svid kid"):
        sb.parse(json.dumps(d).encode())
    d = _vector(vectors)
    d["keys"][1]["x"] = d["keys"][1]["x"][:-3]  # a coordinate of the wrong length (40 characters: 30 bytes)
    with pytest.raises(Malformed, match="coordinates"):
        sb.parse(json.dumps(d).encode())
    d = _vector(vectors)
    d["spiffe_sequence"] = -1
    with pytest.raises(Malformed, match="spiffe_sequence"):
        sb.parse(json.dumps(d).encode())
    d = _vector(vectors)
    d["spiffe_sequence"] = 1.0
    with pytest.raises(Malformed, match="spiffe_sequence"):
        sb.parse(json.dumps(d).encode())


def test_x509_key_members_must_describe_the_certificate(vectors: Path) -> None:
    """RFC 7517 §4.7: a JWK whose key members name another key than its x5c certificate is refused."""
    d = _vector(vectors)
    other = sb.jwk_of(ec.generate_private_key(ec.SECP384R1()).public_key())
    assert other is not None
    d["keys"][0].update(other)
    with pytest.raises(Malformed, match="do not match its certificate"):
        sb.parse(json.dumps(d).encode())


def test_ignored_entries_are_reported(vectors: Path) -> None:
    """Unknown uses and key types, and x509-svid entries without x5c, are ignored (and said so)."""
    d = _vector(vectors)
    first = dict(d["keys"][0])
    d["keys"] += [
        {"use": "wit-svid", "kty": "EC"},
        {"kty": "EC", "crv": "P-256"},
        {"use": "jwt-svid", "kid": "k", "kty": "oct", "k": "AAAA"},
        {"use": "x509-svid", "kty": "EC"},
        {**first, "x5c": [*first["x5c"], first["x5c"][0]]},
    ]
    parsed = sb.parse(json.dumps(d).encode())
    assert len(parsed.x509_authorities) == 1  # the same certificate twice counts once
    assert len(parsed.jwt_authorities) == 6
    assert len(parsed.ignored) == 5, parsed.ignored


def test_caps() -> None:
    with pytest.raises(Oversize):
        sb.parse(b" " * (sb.MAX_BUNDLE_BYTES + 1))
    many = json.dumps({"keys": [{}] * (sb.MAX_KEYS + 1)}).encode()
    with pytest.raises(Oversize):
        sb.parse(many)
    deep = b'{"keys": [' + b"[" * 50 + b"]" * 50 + b"]}"
    with pytest.raises(Malformed, match="nests deeper"):
        sb.parse(deep)
    with pytest.raises(Malformed):
        sb.parse(b'{"keys": [], "spiffe_sequence": NaN}')
    with pytest.raises(Malformed):
        sb.parse(b"[]")


def test_our_bundle_document_exports_as_spire_writes(tmp_path: Path) -> None:
    """A hybrid authority's bundle: x509-svid keys with exactly one x5c and no kid, jwt-svid keys with
    their kid, spiffe_sequence = the bundle's version; classical leaves the ML-DSA CA out, saying so."""
    auth = Authority.init(
        tmp_path / "a",
        "alpha.example",
        suite="hybrid",
        root_keys=1,
        root_threshold=1,
        passphrase=None,
        now=1_800_000_000,
    )
    doc = D.parse(auth.current("bundle")).payload
    assert isinstance(doc, D.Bundle)
    bundle = sb.from_document(doc)
    written, left_out = sb.to_json(bundle)
    assert left_out == []
    jwks = json.loads(written)
    assert jwks["spiffe_sequence"] == doc.version
    assert jwks["spiffe_refresh_hint"] == doc.refresh_hint
    x509s = [k for k in jwks["keys"] if k["use"] == "x509-svid"]
    assert len(x509s) == len(doc.x509_authorities) == 2
    for k in x509s:
        assert "kid" not in k
        assert len(k["x5c"]) == 1
        x509.load_der_x509_certificate(base64.b64decode(k["x5c"][0]))
    assert {k["kty"] for k in x509s} == {"EC", "AKP"}
    jwts = [k for k in jwks["keys"] if k["use"] == "jwt-svid"]
    assert [k["kid"] for k in jwts] == [a["kid"] for a in doc.jwt_authorities]
    assert sb.parse(written) == bundle  # what we write, we read back as it was

    classical, left_out = sb.to_json(bundle, classical=True)
    assert len(left_out) == 1
    assert "ML-DSA-65" in left_out[0]
    back = sb.parse(classical)
    assert len(back.x509_authorities) == 1
    cert = x509.load_der_x509_certificate(back.x509_authorities[0])
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def test_cli_export_from_authority_and_node(homes: Homes, cli: Callable[..., Result]) -> None:
    """``bundle export`` through the real command line: the same bundle from the authority and from the
    node that imported it; ``--to`` writes a file, ``--json`` reports, an unknown domain is refused."""
    out = homes.tmp / "alpha.json"
    r = cli("--home", homes.a, "--json", "bundle", "export", "--format", "spiffe", "--classical", "--to", out)
    assert r.code == 0, r.stderr
    report = r.json
    assert report["domain"] == "alpha.example"
    assert len(report["left_out"]) == 1
    from_authority = sb.parse(out.read_bytes())
    assert from_authority.sequence == report["sequence"]

    r = cli("--home", homes.node_home, "bundle", "export", "--classical")
    assert r.code == 0, r.stderr
    assert "left out:" in r.stderr
    assert sb.parse(r.stdout.encode()) == from_authority  # the node serves what the authority published

    r = cli("--home", homes.node_home, "--json", "bundle", "export")
    assert r.code == 0, r.stderr
    assert {k["kty"] for k in r.json["bundle"]["keys"] if k["use"] == "x509-svid"} == {"EC", "AKP"}

    r = cli("--home", homes.node_home, "--json", "bundle", "export", "--domain", "nowhere.example")
    assert r.code == 1
    assert r.json["error"]["kind"] == "unknown-domain"
    r = cli("--home", homes.a, "--json", "bundle", "export", "--domain", "beta.example")
    assert r.code == 1
    assert r.json["error"]["kind"] == "unknown-domain"


def test_unreadable_authorities_are_left_out_not_fatal(tmp_path: Path) -> None:
    """A partner's signed bundle may carry bytes that are no certificate or no readable key: writing it
    as a SPIFFE bundle leaves them out and says so; the issuer serves only readable CA certificates."""
    from qhx_edge.issue.issuer import _readable_authorities

    auth = Authority.init(
        tmp_path / "a",
        "alpha.example",
        suite="classical",
        root_keys=1,
        root_threshold=1,
        passphrase=None,
        now=1_800_000_000,
    )
    doc = D.parse(auth.current("bundle")).payload
    assert isinstance(doc, D.Bundle)
    bad = sb.SpiffeBundle(
        (b"not a certificate", *doc.x509_authorities),
        (sb.JwtAuthority("junk", b"\x30\x03\x02\x01\x00"),),
        3,
        60,
    )
    written, left_out = sb.to_json(bad)
    assert len(left_out) == 2
    assert len(sb.parse(written).x509_authorities) == 1
    import dataclasses

    mixed = dataclasses.replace(doc, x509_authorities=(b"not a certificate", *doc.x509_authorities))
    assert _readable_authorities(mixed.x509_authorities) == b"".join(doc.x509_authorities)
