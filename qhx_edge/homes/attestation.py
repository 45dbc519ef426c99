"""Node attestation: the two-trip exchange that earns a node its delegation.

::

    node                                    authority
     request   ── attestation pack ──►      challenge   (EK chain / join token; pending row)
               ◄─ attestation pack ──
     respond   ── attestation pack ──►      finish      (activation + quote / token proof)
               ◄─ documents pack ────                   (delegation, bundle, freshness)

Messages are COSE_Sign documents with their own content type, carried one per
pack (kind ``attestation``), so the exchange runs the same on one machine or
by USB stick.  The request is signed by the node key named in the node's card
and sealed to the authority's card (a join token is a secret); the challenge
is signed by the authority's freshness role key, which the node finds in the
root it holds; the evidence is signed by the node key and sealed to the
authority card carried in the challenge pack.

What the authority checks (docs/issuance.md §1):

* ``tpm``: the EK certificate chains to a configured manufacturer CA; the EK
  public area matches it; the AK is a restricted signing key; the AK is bound
  to the EK by credential activation (the node must return the secret that
  MakeCredential sealed to this EK for this AK name); a quote by the AK over
  the PCRs the policy names carries this challenge's nonce and the policy's
  values.  The nonce is single use and expires: a replayed quote fails.
* ``join-token``: the token exists, is unexpired and unused (stored as its
  SHA-256 only) when the challenge is made, and is spent when the exchange
  finishes (a challenge that expires on a courier's way leaves it usable).

A node id is bound to the card of its first successful attestation: a second
node claiming that id with another card fails, and a node accepts only a
delegation that names its own card.  A challenge stays answerable for the
policy's ``attestation.challenge_ttl`` (three days by default: a courier's
round trip).

Every failure is ``attestation-failed`` and leaves nothing issued; attempts are
recorded in the authority's ``attestation.sqlite``, an audit log (``attestation``)
hash-chained and checkpointed with the authority's own key in each attempt's
transaction (docs/architecture.md, "Audit checkpoints").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qhx_edge.core import cbor, cose
from qhx_edge.core.cards import Card, EncryptionPublicKey, parse_card, spki
from qhx_edge.core.documents import Policy, Root, parse
from qhx_edge.core.errors import (
    AnchorMismatch,
    AttestationFailed,
    BadSignature,
    Malformed,
    MissingFile,
    PassphraseError,
    Rejected,
    StoreCorrupt,
)
from qhx_edge.core.spiffe import check_trust_domain
from qhx_edge.core.suites import PrivateKey, PublicKey, ca_algs
from qhx_edge.packs import pack, seal
from qhx_edge.store import audit as audit_log
from qhx_edge.store.files import atomic_write
from qhx_edge.store.sqlitefile import SqliteFile

if TYPE_CHECKING:
    from cryptography import x509

    from qhx_edge.attest.tpm import TpmClient
    from qhx_edge.homes.authority import Authority
    from qhx_edge.homes.node import Node

CONTENT_TYPE = "application/qhx-edge-attest+cbor"
MAX_MESSAGE = 1 << 20
METHODS = ("tpm", "join-token")
CHALLENGE_TTL = 3 * 86400  # a courier's round trip; the policy's attestation.challenge_ttl overrides it
AUTHORITY_NODE_ID = "authority"  # the node id of every authority's own card
DB = "attestation.sqlite"
TPM_CAS = "tpm-cas"  # the authority's trusted TPM manufacturer CAs, DER, one file each

MIGRATIONS = (
    """
    CREATE TABLE join_tokens (
        digest BLOB PRIMARY KEY,
        created_at INTEGER NOT NULL,
        expires INTEGER NOT NULL,
        used_at INTEGER,
        used_by TEXT
    );
    CREATE TABLE pending (
        challenge_id BLOB PRIMARY KEY,
        node_id TEXT NOT NULL,
        method TEXT NOT NULL,
        nonce BLOB NOT NULL,
        secret_digest BLOB,
        request BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        expires INTEGER NOT NULL,
        finished_at INTEGER
    );
    CREATE TABLE attempts (
        seq INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        node_id TEXT,
        step TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    """,
    # 2: a join token is spent when its exchange finishes (not at the challenge); a node id is bound
    # to the card of its first successful attestation.
    """
    ALTER TABLE pending ADD COLUMN token_digest BLOB;
    CREATE TABLE bindings (
        node_id TEXT PRIMARY KEY,
        card_fingerprint TEXT NOT NULL,
        bound_at INTEGER NOT NULL
    );
    """,
    # 3: audit checkpoints.  The attempts log hash-chained from the first attempt after this migration
    # (those before predate the chain: audit_base) and checkpointed with the authority's own signing key.
    audit_log.chain_existing_log("attempts", "seq"),
)
ATTEMPT_COLUMNS = ("at", "node_id", "step", "outcome", "detail")
LOG = "attestation"  # the checkpoints' "log"


# --- messages ---------------------------------------------------------------------------------


def sign_message(payload: dict[str, Any], signer: PrivateKey) -> bytes:
    return cose.sign(cbor.encode(payload), [signer], content_type=CONTENT_TYPE)


@dataclass(frozen=True)
class Message:
    raw: bytes
    env: cose.Envelope
    body: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.body.get("type"))


def parse_message(raw: bytes, expected: str) -> Message:
    msg = cose.parse_signed(
        raw,
        content_type=CONTENT_TYPE,
        max_size=MAX_MESSAGE,
        what=f"qhx-edge attestation {expected} message",
        types=frozenset({expected}),
    )
    return Message(msg.raw, msg.envelope, msg.body)


def _bytes(d: dict[str, Any], key: str, size: int | None = None) -> bytes:
    v = d.get(key)
    if not isinstance(v, bytes) or (size is not None and len(v) != size):
        raise Malformed(f"{key} must be a byte string" + (f" of {size} bytes" if size else ""))
    return v


def wrap(
    message: bytes,
    signer: PrivateKey,
    *,
    domain: str,
    node: str,
    now: int,
    sequence: int = 0,
    documents: Sequence[bytes] = (),
) -> bytes:
    """A message (and e.g. the authority's card) in a pack of kind ``attestation``."""
    docs = [message, *documents]
    return pack.build(docs, signer, domain=domain, node=node, sequence=sequence, now=now, kind="attestation")


def unwrap(data: bytes) -> bytes:
    p = pack.parse(data)
    if p.manifest.kind != "attestation" or len(p.documents) not in (1, 2):
        raise Malformed("expected an attestation pack")
    return p.documents[0]


def unwrap_all(data: bytes) -> list[bytes]:
    p = pack.parse(data)
    if p.manifest.kind != "attestation":
        raise Malformed("expected an attestation pack")
    return p.documents


# --- node side --------------------------------------------------------------------------------


def make_request(node: Node, method: str, now: int, *, token: str | None = None, tpm: TpmClient | None = None) -> bytes:
    """The node's signed attestation request (keys are made on first use)."""
    if method not in METHODS:
        raise Malformed(f"unknown attestation method {method!r}")
    ident = node.identity
    root = node.store.current(node.domain, "root")
    assert root is not None
    assert isinstance(root.payload, Root)
    body: dict[str, Any] = {
        "type": "attest-request",
        "domain": node.domain,
        "node_id": node.node_id,
        "card": node.card(),
        "method": method,
        "created_at": now,
        "ca_keys": {str(alg): spki(ident.ca_key(alg, create=True)) for alg in ca_algs(root.payload.suite)},
        "jwt_key": spki(ident.jwt_key(create=True)),
    }
    if method == "join-token":
        if not token:
            raise Malformed("a join-token attestation needs --token")
        body["token"] = token
    else:
        if tpm is None:
            raise Malformed("a tpm attestation needs a TPM (--tpm TCTI)")
        ak = tpm.create_ak()
        body["tpm"] = {
            "ek_cert": tpm.ek_certificate(),
            "ek_public": tpm.ek_public(),
            "ak_public": ak.public,
            "ak_name": ak.name,
        }
    return sign_message(body, ident.signer)


def respond(node: Node, challenge_raw: bytes, now: int, *, tpm: TpmClient | None = None) -> bytes:
    """Answer a challenge: check it comes from our authority, then prove what it asks."""
    msg = parse_message(challenge_raw, "attest-challenge")
    root = node.store.current(node.domain, "root")
    assert root is not None
    assert isinstance(root.payload, Root)
    keys = root.payload.role_keys("freshness")
    if not any(_signed_by(msg.env, k) for k in keys.values()):
        raise AttestationFailed("the challenge is not signed by this domain's authority")
    b = msg.body
    if b.get("node_id") != node.node_id or b.get("domain") != node.domain:
        raise AttestationFailed("the challenge is for another node")
    if not isinstance(b.get("expires"), int) or now >= b["expires"]:
        raise AttestationFailed("the challenge has expired")
    nonce = _bytes(b, "nonce", 32)
    body: dict[str, Any] = {
        "type": "attest-evidence",
        "domain": node.domain,
        "node_id": node.node_id,
        "challenge_id": _bytes(b, "challenge_id", 16),
        "nonce": nonce,
        "created_at": now,
    }
    if b.get("method") == "tpm":
        if tpm is None:
            raise Malformed("this challenge needs the node's TPM (--tpm TCTI)")
        secret = tpm.activate_credential(_bytes(b, "credential_blob"), _bytes(b, "encrypted_secret"))
        pcrs = b.get("pcrs")
        if not isinstance(pcrs, list) or not all(isinstance(i, int) and 0 <= i < 24 for i in pcrs):
            raise Malformed("challenge PCR selection is malformed")
        q = tpm.quote(nonce, pcrs)
        body["tpm"] = {
            "secret": secret,
            "attest": q.attest,
            "signature": q.signature,
            "pcrs": {str(i): v for i, v in sorted(q.pcrs.items())},
        }
    return sign_message(body, node.identity.signer)


def tpm_client(tcti: str | None) -> TpmClient | None:
    """The TPM named by ``tcti`` (``None``: no TPM); ``no-tpm`` without the optional tpm2-pytss."""
    if tcti is None:
        return None
    from qhx_edge.attest.tpm import TpmClient

    return TpmClient(tcti)


def check_authority_card(node: Node, card: Card, expect_fingerprint: str | None = None) -> None:
    """Refuse to seal anything to ``card`` unless it is this node's authority's (before any secret goes in).

    Either ``expect_fingerprint`` (given out of band, as for an anchor) names
    exactly this card, or the card is countersigned by a key of the freshness
    role of the root the node holds.  A card a courier swapped in carries
    neither: ``bad-signature`` (``anchor-mismatch`` for a wrong fingerprint).
    """
    if card.domain != node.domain or card.node_id != AUTHORITY_NODE_ID:
        raise BadSignature(f"the card is {card.node_id} of {card.domain}, not the authority of {node.domain}")
    if expect_fingerprint is not None:
        if not hmac.compare_digest(expect_fingerprint.lower(), card.fingerprint):
            raise AnchorMismatch(
                f"authority card fingerprint {card.fingerprint} is not the expected {expect_fingerprint}"
            )
        return
    root = node.store.current(node.domain, "root")
    assert root is not None
    assert isinstance(root.payload, Root)
    env = cose.Envelope.parse(card.raw, max_size=MAX_MESSAGE)
    if not any(_signed_by(env, k) for k in root.payload.role_keys("freshness").values()):
        raise BadSignature(
            "the authority card is not countersigned by this domain's freshness role "
            "(a card from another authority, or swapped on the way); check its fingerprint with --expect-fingerprint"
        )


def sealing_keys(node: Node, cards: Sequence[Card]) -> list[EncryptionPublicKey]:
    """The keys to seal a node's pack to: an authority's card must first pass :func:`check_authority_card`.

    Node cards are public and self-signed; an authority's is where secrets go
    (join tokens, evidence), so it is never taken on the courier's word.
    """
    for card in cards:
        if card.node_id == AUTHORITY_NODE_ID:
            check_authority_card(node, card)
    return [c.encryption_key for c in cards]


def request_pack(
    node: Node,
    authority_card: Card,
    method: str,
    now: int,
    *,
    token: str | None = None,
    tpm: TpmClient | None = None,
    expect_fingerprint: str | None = None,
) -> bytes:
    """``node attest request``: the signed request in an attestation pack, sealed to the authority's card."""
    check_authority_card(node, authority_card, expect_fingerprint)
    raw = make_request(node, method, now, token=token, tpm=tpm)
    data = wrap(raw, node.identity.signer, domain=node.domain, node=node.node_id, now=now)
    return seal.seal(data, [authority_card.encryption_key])


def challenge_card(challenge_data: bytes) -> tuple[bytes, Card]:
    """The challenge and the authority's card from a challenge pack (checked against the node later)."""
    docs = unwrap_all(challenge_data)
    if len(docs) != 2:
        raise Malformed("a challenge pack holds the challenge and the authority's card")
    return docs[0], parse_card(docs[1])


def evidence_pack(
    node: Node, challenge_raw: bytes, authority_card: Card, now: int, *, tcti: str | None = None
) -> bytes:
    """``node attest respond``: the evidence in an attestation pack, sealed to the card the challenge carried.

    The TPM named by ``tcti`` is opened only once the card is known to be this domain's authority.
    """
    check_authority_card(node, authority_card)
    tpm = tpm_client(tcti)
    try:
        # The AK is a primary key of the endorsement hierarchy made from a fixed
        # template, so this TPM yields the same AK as for the request.
        raw = respond(node, challenge_raw, now, tpm=tpm)
    finally:
        if tpm is not None:
            tpm.close()
    data = wrap(raw, node.identity.signer, domain=node.domain, node=node.node_id, now=now)
    return seal.seal(data, [authority_card.encryption_key])


def _signed_by(env: cose.Envelope, key: PublicKey) -> bool:
    try:
        cose.require_signed_by(env, key, "message")
    except Rejected:
        return False
    return True


# --- authority side ---------------------------------------------------------------------------


class AttestationStore(SqliteFile):
    """The authority's attestation state: join tokens (hashed), pending challenges, attempts.

    The attempts are an audit log (``attestation``): hash-chained, and each
    attempt checkpointed in its own transaction with the authority's signing key
    (the key of its card) when ``signer_source`` yields it (see
    :mod:`qhx_edge.store.audit`; ``audit verify`` on an authority home checks it).
    """

    MIGRATIONS = MIGRATIONS
    WHAT = "attestation"

    def __init__(
        self, home: Path, *, signer_source: Callable[[], tuple[PrivateKey, str, str] | None] | None = None
    ) -> None:
        path = Path(home) / DB
        super().__init__(self.connect(path), path)
        # The authority's signing key and its card's (node id, domain), looked up when an attempt is
        # written.  None: attempts stay beyond the last checkpoint until a later one covers them.
        self.signer_source = signer_source
        try:
            self.migrate()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open_existing(cls, home: Path) -> AttestationStore | None:
        """The store if the home has one (migrated), ``None`` otherwise (nothing is created)."""
        return cls(home) if (Path(home) / DB).exists() else None

    @property
    def log(self) -> audit_log.Log:
        """The attempts log as :mod:`qhx_edge.store.audit` sees it."""
        row = self.conn.execute("SELECT base FROM audit_base").fetchone()
        return audit_log.Log(LOG, "attempts", "seq", ATTEMPT_COLUMNS, "audit_checkpoints", int(row[0]) if row else 0)

    def attempt(self, now: int, node_id: str | None, step: str, outcome: str, detail: str) -> None:
        """Record an attempt, chained, and checkpoint it in the same transaction (with the key)."""
        signer = self.signer_source() if self.signer_source is not None else None
        record = None
        with self.transaction() as c:
            log = self.log
            audit_log.append(c, log, [(now, node_id, step, outcome, detail)])
            if signer is not None:
                record = audit_log.write_checkpoint(c, log, signer[0], signer[1], signer[2], now)
        if record is not None:
            audit_log.write_record(self.path, record)

    def attempts(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT at, node_id, step, outcome, detail FROM attempts ORDER BY seq")
        return [dict(zip(ATTEMPT_COLUMNS, r, strict=True)) for r in rows]


def authority_signer(auth: Authority) -> tuple[PrivateKey, str, str] | None:
    """The authority's signing key (its card's) for the attempts log's checkpoints.

    The exchange has the keystore open already (it unseals the request and signs
    the challenge); a key that cannot be had leaves the attempt unprotected
    rather than hiding the attempt's own outcome behind a passphrase error.
    """
    try:
        return auth.identity.signer, AUTHORITY_NODE_ID, auth.domain
    except (PassphraseError, MissingFile, StoreCorrupt):
        return None


def verify_store(home: Path, key: PublicKey, node_id: str, domain: str) -> dict[str, Any]:
    """``audit verify`` of the authority's attempts log against its checkpoints (signed by ``key``).

    Raises :class:`~qhx_edge.core.checkpoint.AuditBroken` at the first finding.
    """
    store = AttestationStore.open_existing(home)
    if store is None:
        return {"log": LOG, "present": False}
    try:
        return {**audit_log.verify(store.conn, store.log, key, node_id, domain, store.path), "present": True}
    finally:
        store.close()


def checkpoint_store(home: Path, signer: PrivateKey, card: Card, now: int) -> dict[str, Any] | None:
    """Checkpoint the attempts log now with the authority's key (``audit checkpoint``)."""
    store = AttestationStore.open_existing(home)
    if store is None:
        return None
    return audit_log.checkpoint_now(store, store.log, signer, card.node_id, card.domain, now)


def load_manufacturer_ca(data: bytes, what: str) -> x509.Certificate:
    """A TPM manufacturer CA certificate, PEM or DER (``malformed`` if it is neither)."""
    from cryptography import x509

    try:
        if data.lstrip().startswith(b"-----"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise Malformed(f"{what}: not an X.509 certificate ({exc})") from exc


def trust_manufacturer_ca(auth: Authority, cert: x509.Certificate) -> dict[str, str]:
    """Trust ``cert`` for EK certificate chains: kept as DER in ``tpm-cas/``, named by its SHA-256."""
    from cryptography.hazmat.primitives.serialization import Encoding

    der = cert.public_bytes(Encoding.DER)
    name = hashlib.sha256(der).hexdigest()[:16]
    atomic_write(auth.home / TPM_CAS / f"{name}.der", der)
    return {"tpm_ca": name, "subject": cert.subject.rfc4514_string()}


def manufacturer_cas(auth: Authority) -> list[bytes]:
    """The TPM manufacturer CAs the authority trusts (DER), in a stable order."""
    folder = auth.home / TPM_CAS
    return [p.read_bytes() for p in sorted(folder.glob("*.der"))] if folder.is_dir() else []


def _policy(auth: Authority) -> Policy:
    policy = parse(auth.current("policy")).payload
    assert isinstance(policy, Policy)
    return policy


def read_message(auth: Authority, path: Path) -> bytes:
    """The attestation message in the pack file at ``path`` (opened if it is sealed to the authority)."""
    my_kid = parse_card(auth.card()).encryption_key.kid
    data, _ = pack.unseal_if_sealed(pack.read(path), my_kid, lambda: auth.identity.encryption)
    return unwrap(data)


def challenge_pack(auth: Authority, request_raw: bytes, now: int) -> bytes:
    """``authority attest challenge``: :func:`challenge` under the authority's TPM CAs and policy PCRs,
    in an attestation pack signed by the freshness role beside the authority's card."""
    policy = _policy(auth)
    raw = challenge(
        auth,
        request_raw,
        now,
        manufacturer_cas=manufacturer_cas(auth),
        pcrs=sorted(policy.tpm_pcrs()),
        ttl=policy.challenge_ttl(CHALLENGE_TTL),
    )
    signer = auth._signers("freshness")[0]
    return wrap(raw, signer, domain=auth.domain, node="authority", now=now, documents=[auth.card()])


def delegation_pack(
    auth: Authority, evidence_raw: bytes, now: int, *, lifetime: int | None = None
) -> tuple[bytes, int]:
    """``authority attest finish``: :func:`finish` against the policy's PCR values; the documents pack
    for the node (the delegation and everything current) and how many documents it holds."""
    docs = finish(auth, evidence_raw, now, expected_pcrs=_policy(auth).tpm_pcrs(), lifetime=lifetime)
    # The delegation with everything current (the new bundle names the node's JWT key,
    # and the freshness naming it), so the node can apply it whatever it held before.
    docs = [docs[0], *(d for d in auth.export_documents(now) if d != docs[0])]
    return auth.export_pack(docs, now), len(docs)


def _check_binding(conn: sqlite3.Connection, node_id: str, card_fingerprint: str) -> None:
    """A node id belongs to the card of its first successful attestation: another card claiming it fails."""
    row = conn.execute("SELECT card_fingerprint FROM bindings WHERE node_id = ?", (node_id,)).fetchone()
    if row is not None and not hmac.compare_digest(str(row[0]), card_fingerprint):
        raise AttestationFailed(f"node id {node_id} is bound to another card since its first attestation")


def create_join_token(auth: Authority, now: int, ttl: int) -> str:
    """A single-use join token; only its SHA-256 is stored."""
    token = "qhx1-" + base64.b32encode(secrets.token_bytes(20)).decode().lower().rstrip("=")
    store = AttestationStore(auth.home)
    try:
        with store.transaction() as c:
            c.execute(
                "INSERT INTO join_tokens VALUES (?,?,?,NULL,NULL)",
                (hashlib.sha256(token.encode()).digest(), now, now + ttl),
            )
    finally:
        store.close()
    return token


@dataclass(frozen=True)
class Request:
    msg: Message
    card: Card
    method: str
    ca_keys: dict[int, bytes]
    jwt_key: bytes


def _parse_request(auth: Authority, raw: bytes) -> Request:
    msg = parse_message(raw, "attest-request")
    b = msg.body
    card = parse_card(_bytes(b, "card"))
    cose.require_signed_by(msg.env, card.signing_key, "attestation request")
    if card.node_id != b.get("node_id") or check_trust_domain(b.get("domain")) != card.domain:
        raise AttestationFailed("the request does not match the card it carries")
    if card.domain != auth.domain:
        raise AttestationFailed(f"node {card.node_id} belongs to {card.domain}, not {auth.domain}")
    method = b.get("method")
    if method not in METHODS:
        raise Malformed(f"unknown attestation method {method!r}")
    raw_keys = b.get("ca_keys")
    if not isinstance(raw_keys, dict) or not raw_keys:
        raise Malformed("the request names no CA keys")
    ca_keys = {int(k): v for k, v in raw_keys.items() if isinstance(v, bytes)}
    expected = set(ca_algs(auth.state["suite"]))
    if set(ca_keys) != expected:
        raise Malformed(f"the request must name CA keys for algorithms {sorted(expected)}")
    return Request(msg, card, str(method), ca_keys, _bytes(b, "jwt_key"))


def challenge(
    auth: Authority,
    request_raw: bytes,
    now: int,
    *,
    manufacturer_cas: Sequence[bytes] = (),
    pcrs: Sequence[int] | None = None,
    ttl: int = CHALLENGE_TTL,
) -> bytes:
    """Check a request and answer with a challenge (recorded as pending)."""
    store = AttestationStore(auth.home, signer_source=lambda: authority_signer(auth))
    node_id: str | None = None
    try:
        req = _parse_request(auth, request_raw)
        node_id = req.card.node_id
        _check_binding(store.conn, node_id, req.card.fingerprint)
        nonce = secrets.token_bytes(32)
        challenge_id = secrets.token_bytes(16)
        body: dict[str, Any] = {
            "type": "attest-challenge",
            "domain": auth.domain,
            "node_id": node_id,
            "method": req.method,
            "challenge_id": challenge_id,
            "nonce": nonce,
            "expires": now + ttl,
        }
        secret_digest: bytes | None = None
        token_digest: bytes | None = None
        with store.transaction() as c:
            if req.method == "join-token":
                token = req.msg.body.get("token")
                if not isinstance(token, str):
                    raise AttestationFailed("no join token")
                digest = hashlib.sha256(token.encode()).digest()
                row = c.execute("SELECT expires, used_at FROM join_tokens WHERE digest = ?", (digest,)).fetchone()
                if row is None:
                    raise AttestationFailed("unknown join token")
                if row[1] is not None:
                    raise AttestationFailed("join token already used")
                if now >= row[0]:
                    raise AttestationFailed("join token expired")
                # Not spent yet: only a finished exchange spends it, so a challenge that expires
                # on the courier's way leaves the token usable for a new one.
                token_digest = digest
            else:
                from qhx_edge.attest import tpm

                t = req.msg.body.get("tpm")
                if not isinstance(t, dict):
                    raise Malformed("a tpm request carries its TPM evidence")
                if not manufacturer_cas:
                    raise AttestationFailed("no TPM manufacturer CA is configured (authority tpm-ca add)")
                tpm.verify_ek_certificate(_bytes(t, "ek_cert"), manufacturer_cas, now)
                tpm.ek_public_matches_certificate(_bytes(t, "ek_public"), t["ek_cert"])
                tpm.ak_is_restricted_signing_key(_bytes(t, "ak_public"))
                # The name must be this public area's: otherwise a node could bind one
                # key's name to the EK and quote with another.
                tpm.verify_ak_name(t["ak_public"], _bytes(t, "ak_name"))
                secret = secrets.token_bytes(32)
                blob, encrypted = tpm.make_credential(t["ek_public"], _bytes(t, "ak_name"), secret)
                secret_digest = hashlib.sha256(secret).digest()
                if not pcrs:
                    raise AttestationFailed("the policy names no PCRs for TPM attestation")
                body.update(credential_blob=blob, encrypted_secret=encrypted, pcrs=sorted(pcrs))
            c.execute(
                "INSERT INTO pending VALUES (?,?,?,?,?,?,?,?,NULL,?)",
                (challenge_id, node_id, req.method, nonce, secret_digest, request_raw, now, now + ttl, token_digest),
            )
        store.attempt(now, node_id, "challenge", "ok", f"{req.method} challenge issued")
        return sign_message(body, auth._signers("freshness")[0])
    except Rejected as exc:
        store.attempt(now, node_id, "challenge", exc.kind, exc.message)
        if isinstance(exc, AttestationFailed):
            raise
        raise AttestationFailed(f"request refused: {exc.message}") from exc
    finally:
        store.close()


def finish(
    auth: Authority,
    evidence_raw: bytes,
    now: int,
    *,
    expected_pcrs: dict[int, bytes] | None = None,
    lifetime: int | None = None,
) -> list[bytes]:
    """Check the evidence for a pending challenge and, if it holds, issue the delegation."""
    store = AttestationStore(auth.home, signer_source=lambda: authority_signer(auth))
    node_id: str | None = None
    try:
        msg = parse_message(evidence_raw, "attest-evidence")
        b = msg.body
        challenge_id = _bytes(b, "challenge_id", 16)
        with store.transaction() as c:
            row = c.execute(
                "SELECT node_id, method, nonce, secret_digest, request, expires, finished_at, token_digest "
                "FROM pending WHERE challenge_id = ?",
                (challenge_id,),
            ).fetchone()
            if row is None:
                raise AttestationFailed("no such challenge (never issued, or from another authority)")
            node_id, method, nonce, secret_digest, request_raw, expires, finished, token_digest = row
            if finished is not None:
                raise AttestationFailed("this challenge was already answered (replay)")
            if now >= expires:
                raise AttestationFailed("the challenge expired before the evidence arrived")
            # Single use from here on, whatever the outcome.
            c.execute("UPDATE pending SET finished_at = ? WHERE challenge_id = ?", (now, challenge_id))
        req = _parse_request(auth, bytes(request_raw))
        cose.require_signed_by(msg.env, req.card.signing_key, "attestation evidence")
        if b.get("node_id") != node_id or not hmac.compare_digest(_bytes(b, "nonce", 32), bytes(nonce)):
            raise AttestationFailed("the evidence answers another challenge")
        summary: dict[str, Any] = {"method": method}
        if method == "tpm":
            from qhx_edge.attest import tpm

            t = b.get("tpm")
            rt = req.msg.body["tpm"]
            if not isinstance(t, dict):
                raise Malformed("tpm evidence missing")
            if not hmac.compare_digest(hashlib.sha256(_bytes(t, "secret")).digest(), bytes(secret_digest)):
                raise AttestationFailed("credential activation failed: the AK is not bound to this EK")
            raw_pcrs = t.get("pcrs")
            if not isinstance(raw_pcrs, dict):
                raise Malformed("tpm evidence PCR values missing")
            quote = tpm.Quote(_bytes(t, "attest"), _bytes(t, "signature"), {int(k): v for k, v in raw_pcrs.items()})
            if not expected_pcrs:
                raise AttestationFailed("the policy names no PCR values to check a TPM quote against")
            tpm.verify_quote(rt["ak_public"], quote, bytes(nonce), expected_pcrs)
            summary["ek_certificate_sha256"] = hashlib.sha256(rt["ek_cert"]).hexdigest()
            summary["pcrs"] = {str(k): v.hex() for k, v in sorted(quote.pcrs.items())}
        with store.transaction() as c:
            # The exchange holds: bind the node id to this card (first attestation) and spend the
            # token, atomically, before anything is signed.
            _check_binding(c, str(node_id), req.card.fingerprint)
            c.execute("INSERT OR IGNORE INTO bindings VALUES (?,?,?)", (str(node_id), req.card.fingerprint, now))
            if method == "join-token":
                spent = c.execute(
                    "UPDATE join_tokens SET used_at = ?, used_by = ? WHERE digest = ? AND used_at IS NULL",
                    (now, node_id, token_digest),
                )
                if spent.rowcount != 1:
                    raise AttestationFailed("join token already used (by another exchange that finished first)")
        kwargs: dict[str, Any] = {} if lifetime is None else {"lifetime": lifetime}
        docs = auth.issue_delegation(
            node_id=str(node_id),
            card_fingerprint=req.card.fingerprint,
            ca_spkis=req.ca_keys,
            jwt_spki=req.jwt_key,
            attestation=summary,
            now=now,
            **kwargs,
        )
    except Rejected as exc:
        store.attempt(now, node_id, "finish", exc.kind, exc.message)
        if isinstance(exc, AttestationFailed):
            raise
        raise AttestationFailed(f"evidence refused: {exc.message}") from exc
    else:
        store.attempt(now, node_id, "finish", "ok", f"{method} attestation succeeded; delegation issued")
        return docs
    finally:
        store.close()


def join_in_process(auth: Authority, node: Node, now: int) -> None:
    """Attest ``node`` to ``auth`` by a fresh join token, both in this process (the simulated field of
    ``scenario run --live``, tests, benchmarks), and import the delegation with everything current: the
    whole exchange that ``node attest`` and ``authority attest`` carry over packs."""
    token = create_join_token(auth, now, 600)
    chal = challenge(auth, make_request(node, "join-token", now, token=token), now)
    docs = finish(auth, respond(node, chal, now), now)
    node.import_pack(auth.export_pack(auth.export_documents() + docs, now), now)
