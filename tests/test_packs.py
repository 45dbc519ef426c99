"""Sneakernet packs (issue 3): round trips, damage, sealing, replays, reports, attribution, fuzzing.

The acceptance of issue 3 except ``pack watch`` and evidence packs:

* two- and three-home round trips through pack files, in Python and through the
  real CLI (delta exports against a peer's ``doc summary``, ``--domain``);
* every byte of a small pack flipped and every truncation: rejected with a typed
  error, or accepted with exactly the outcome of the untouched pack;
* sealed packs: ``not-recipient`` for other nodes and nothing about the content
  in any error; the same trust state as an unsealed import for a recipient;
* replays: an older pack after a newer one is ``rollback`` with the state
  unchanged; the same pack again is a no-op that says so;
* the per-document ``--json`` report of ``pack import`` and ``--strict``;
* exporter attribution (authority key from the held root, pinned node cards);
* hypothesis fuzzing of the pack decoders: only typed errors escape.

``QHX_PACK_FUZZ_EXAMPLES`` sets the number of fuzzing examples (default
10,000, the issue's floor for CI's quick mode).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qhx_edge.core import cbor, cose, trust
from qhx_edge.core import documents as D  # noqa: N812 - the package's own alias
from qhx_edge.core.cards import EncryptionPrivateKey, parse_card
from qhx_edge.core.errors import Malformed, NotRecipient, QhxError, Rejected, all_kinds
from qhx_edge.core.suites import PrivateKey
from qhx_edge.homes import node
from qhx_edge.homes.authority import Authority
from qhx_edge.homes.node import ImportRejected, Node
from qhx_edge.packs import pack, seal
from qhx_edge.store import clock
from qhx_edge.store.trust_store import Store

from .conftest import PASSPHRASE, Homes, Result, make_homes, make_pack, run_cli

A = "alpha.example"
B = "bravo.example"
FUZZ_EXAMPLES = int(os.environ.get("QHX_PACK_FUZZ_EXAMPLES", "10000"))
# The stable kinds an input can be refused with (not the abstract base "rejected").
REJECT_KINDS = frozenset(k for k, cls in all_kinds().items() if issubclass(cls, Rejected)) - {"rejected"}


# --- helpers -----------------------------------------------------------------------------------


def open_node(home: Path) -> Node:
    return Node(home, PASSPHRASE.encode)


def opened(home: Path) -> Node:
    return open_node(home)


def new_node(home: Path, auth: Authority, now: int, *, passphrase: bytes | None = PASSPHRASE.encode()) -> Path:
    """A node home anchored to ``auth``'s current root, holding nothing else yet."""
    with contextlib.redirect_stderr(io.StringIO()):  # the no-passphrase warning
        node.init(home, auth.anchor(), now, passphrase=passphrase)
    return home


def trust_digest(home: Path) -> str:
    store = Store.open(home)
    try:
        return store.trust_digest()
    finally:
        store.close()


@dataclass(frozen=True)
class Held:
    """What a node trusts, independent of who it is: documents, marks, trusted time."""

    documents: tuple[tuple[Any, ...], ...]
    marks: tuple[tuple[str, str, int, bytes], ...]
    clock_high_water: int


def held(home: Path) -> Held:
    store = Store.open(home)
    try:
        docs = tuple(tuple(d.values()) for d in store.list_documents())
        marks = tuple(
            (d["domain"], t, m.version, m.digest)
            for d in store.domains()
            for t, m in sorted(store.marks(d["domain"]).items())
        )
        return Held(docs, marks, store.clock_high_water())
    finally:
        store.close()


def held_documents(home: Path) -> list[bytes]:
    store = Store.open(home)
    try:
        return store.held_documents(history=True)
    finally:
        store.close()


def import_into(home: Path, data: bytes, now: int, **kw: Any) -> node.ImportResult:
    with opened(home) as n:
        return n.import_pack(data, now, **kw)


def reports(result: node.ImportResult) -> list[str]:
    return [d["report"] for d in result.to_json()["documents"]]


def described(raw: bytes) -> tuple[str, str, int]:
    d = D.parse(raw)
    return d.payload.domain, d.type, d.payload.version


def pack_contents(path: Path) -> list[tuple[str, str, int]]:
    return [described(raw) for raw in pack.parse(pack.read(path)).documents]


def cli_ok(*args: str | Path) -> dict[str, Any]:
    r = run_cli(*args)
    assert r.code == 0, (args, r.code, r.stdout, r.stderr)
    out: dict[str, Any] = r.json
    assert out["ok"] is True, out
    return out


def cli_fails(kind: str, *args: str | Path, code: int = 1) -> tuple[dict[str, Any], Result]:
    r = run_cli(*args)
    assert r.code == code, (args, r.code, r.stdout, r.stderr)
    out: dict[str, Any] = r.json  # exactly one JSON object
    assert out["ok"] is False, out
    assert out["error"]["kind"] == kind, out
    assert out["error"]["message"]
    return out, r


def cli_doc_list(home: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = cli_ok("--home", home, "--json", "doc", "list")["documents"]
    return docs


def say_nothing_about(text: str, secrets_: list[str]) -> None:
    """``text`` (an error message or audit detail) mentions none of ``secrets_`` and no long hex string."""
    low = text.lower()
    for s in secrets_:
        assert s.lower() not in low, (s, text)
    assert not re.search(r"[0-9a-f]{16,}", low), text


def content_words(docs: list[bytes], p: bytes) -> list[str]:
    """What a sealed pack must not reveal: domains, types, versions, digests, its pack id."""
    words = {"bundle", "freshness", "policy", "root", "version"}
    for raw in docs:
        d = D.parse(raw)
        words |= {d.payload.domain, d.digest.hex()[:16]}
    words.add(pack.parse(p).manifest.pack_id.hex())
    return sorted(words)


# --- round trips -------------------------------------------------------------------------------


def test_two_home_round_trip_through_a_pack_file(tmp_path: Path) -> None:
    homes = make_homes(tmp_path, import_first=False)
    auth, now = homes.authority, clock.now()
    auth.publish_bundle(now)  # bundle v2 + freshness v2: the node starts with root v1 only
    path = homes.export("alpha.pack")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary file was left behind"

    result = import_into(homes.node_home, pack.read(path), now)
    assert result.applied
    assert result.pack_status == "new"
    assert reports(result) == ["already-held", "applied", "applied", "applied"]  # root v1 was the anchor
    # The node now holds exactly what the authority exported, byte for byte.
    assert sorted(held_documents(homes.node_home)) == sorted(auth.export_documents())
    with opened(homes.node_home) as n:
        assert n.summary()["domains"] == node.summary_of(auth.export_documents())["domains"]
        assert n.status(now)["domains"][A]["mode"] == "connected"


@pytest.mark.parametrize("history", [False, True], ids=["current", "history"])
def test_three_home_relay_authority_node1_node2(tmp_path: Path, history: bool) -> None:
    """authority -> node1 -> node2: node2 ends with the documents node1 holds, rotations included."""
    homes = make_homes(tmp_path)
    auth, n1 = homes.authority, homes.node_home
    now = clock.now()
    n2 = new_node(tmp_path / "N2", auth, now)  # anchored to root v1 and never sees the authority

    def relay() -> node.ImportResult:
        with opened(n1) as a:
            data = a.export_pack(a.export_documents(history=history), now)
        result = import_into(n2, data, now)
        assert held(n2) == held(n1)
        return result

    first = relay()
    assert first.applied
    assert first.exporter["verified"] is False  # node1's card is not pinned on node2
    assert first.exporter["basis"] == "no pinned card for this node"

    # A root rotation that also replaces the pki key (marks reset on every node),
    # then a new bundle epoch: node2 walks the chain from node1's pack alone.
    auth.rotate_root(now, root_keys=2, root_threshold=2, roles=("pki",))
    auth.publish_bundle(now)
    import_into(n1, auth.export_pack(auth.export_documents(), now), now)
    second = relay()
    assert second.applied
    by_doc = {(d["type"], d["version"]): d["report"] for d in second.to_json()["documents"]}
    assert by_doc[("root", 1)] == "already-held"
    assert by_doc[("root", 2)] == "applied"
    assert by_doc[("bundle", 3)] == "applied"
    with opened(n2) as b:
        st = b.status(now)["domains"][A]
    assert st["versions"] == {"root": 2, "bundle": 3, "policy": 1, "freshness": 3}
    assert st["mode"] == "connected"

    # The same relay again changes nothing.
    before = trust_digest(n2)
    with opened(n1) as a:
        again = import_into(n2, a.export_pack(a.export_documents(history=history), now), now)
    assert not again.applied
    assert set(reports(again)) == {"already-held"}
    # A new pack id is recorded only when something is applied: the trust state is untouched.
    assert trust_digest(n2) == before


def test_cli_round_trips_two_and_three_homes(homes: Homes, tmp_path: Path) -> None:
    stick = tmp_path / "stick"
    fp = cli_ok("--home", homes.a, "--json", "authority", "anchor", "--to", stick / "anchor.cbor")["fingerprint"]
    n2 = tmp_path / "N2"
    cli_ok("--home", n2, "--json", "node", "init", "--anchor", stick / "anchor.cbor", "--expect-fingerprint", fp)
    cli_ok("--home", homes.a, "--json", "authority", "publish", "bundle")

    # Two homes: authority -> node1.
    out = cli_ok("--home", homes.a, "--json", "pack", "export", "--to", stick / "alpha.pack")
    assert out["documents"] == 4
    assert out["sealed_to"] == []
    assert out["bytes"] == (stick / "alpha.pack").stat().st_size
    imp = cli_ok("--home", homes.node_home, "--json", "pack", "import", stick / "alpha.pack")
    assert imp["applied"] is True
    assert imp["exporter"]["verified"] is True
    assert imp["counts"] == {"already-held": 2, "applied": 2}  # root v1 and policy v1 were held

    # Three homes: node1 -> node2 (which has only its anchor), history included.
    out = cli_ok("--home", homes.node_home, "--json", "pack", "export", "--history", "--to", stick / "relay.pack")
    assert out["documents"] == 6  # root v1, bundle v1 v2, policy v1, freshness v1 v2
    imp = cli_ok("--home", n2, "--json", "pack", "import", stick / "relay.pack")
    assert imp["applied"] is True
    assert imp["exporter"]["verified"] is False
    assert imp["pack"]["exporter"]["node"] == cli_ok("--home", homes.node_home, "--json", "status")["node_id"]
    assert cli_doc_list(n2) == cli_doc_list(homes.node_home)
    assert held(n2) == held(homes.node_home)
    assert sorted(p.name for p in stick.iterdir()) == ["alpha.pack", "anchor.cbor", "relay.pack"]


def test_cli_delta_export_carries_only_what_the_peer_lacks(homes: Homes, tmp_path: Path) -> None:
    n1 = homes.node_home
    n2 = new_node(tmp_path / "N2", homes.authority, clock.now())
    cli_ok("--home", n2, "--json", "pack", "import", homes.export())
    assert held(n2) == held(n1)

    def summary(home: Path, name: str) -> Path:
        r = run_cli("--home", home, "--json", "doc", "summary")  # as a user would: '> peer.json'
        assert r.code == 0, r.stderr
        path = tmp_path / name
        path.write_text(r.stdout)
        return path

    peer = summary(n2, "n2.json")
    assert json.loads(peer.read_text())["format"] == "qhx-edge-summary"
    cli_ok("--home", homes.a, "--json", "authority", "publish", "bundle")  # bundle v2, freshness v2

    # The authority's delta for node2: the new bundle and freshness, not root or policy.
    out = cli_ok("--home", homes.a, "--json", "pack", "export", "--since", peer, "--to", tmp_path / "d.pack")
    assert out["documents"] == 2
    assert pack_contents(tmp_path / "d.pack") == [(A, "bundle", 2), (A, "freshness", 2)]
    imp = cli_ok("--home", n2, "--json", "pack", "import", tmp_path / "d.pack")
    assert imp["counts"] == {"applied": 2}

    # Node-to-node: node2 answers node1's summary with exactly what node1 lacks.
    mine = summary(n1, "n1.json")
    out = cli_ok("--home", n2, "--json", "pack", "export", "--since", mine, "--to", tmp_path / "n.pack")
    assert pack_contents(tmp_path / "n.pack") == [(A, "bundle", 2), (A, "freshness", 2)]
    assert cli_ok("--home", n1, "--json", "pack", "import", tmp_path / "n.pack")["counts"] == {"applied": 2}
    assert held(n1) == held(n2)

    # Against an up-to-date peer the delta is empty, and importing it changes nothing.
    now_same = summary(n1, "n1-again.json")
    out = cli_ok("--home", n2, "--json", "pack", "export", "--since", now_same, "--to", tmp_path / "e.pack")
    assert out["documents"] == 0
    before = trust_digest(n1)
    imp = cli_ok("--home", n1, "--json", "pack", "import", tmp_path / "e.pack")
    assert imp["applied"] is False
    assert imp["documents"] == []
    assert trust_digest(n1) == before

    # A file that is not a summary is refused before anything is written.
    bogus = tmp_path / "bogus.json"
    bogus.write_text(json.dumps({"format": "something-else"}))
    cli_fails("malformed", "--home", homes.a, "--json", "pack", "export", "--since", bogus, "--to", tmp_path / "x")
    (tmp_path / "garbage.json").write_text("{not json")
    cli_fails(
        "malformed",
        "--home",
        n1,
        "--json",
        "pack",
        "export",
        "--since",
        tmp_path / "garbage.json",
        "--to",
        tmp_path / "x",
    )
    assert not (tmp_path / "x").exists()


def test_cli_domain_filter(homes: Homes, tmp_path: Path) -> None:
    for home in (homes.a, homes.node_home):
        out = cli_ok("--home", home, "--json", "pack", "export", "--domain", A, "--to", tmp_path / "a.pack")
        assert out["documents"] == 4
        assert {d for d, _, _ in pack_contents(tmp_path / "a.pack")} == {A}
        out = cli_ok("--home", home, "--json", "pack", "export", "--domain", B, "--to", tmp_path / "b.pack")
        assert out["documents"] == 0
        assert pack_contents(tmp_path / "b.pack") == []


def test_select_by_domain_and_since_over_two_domains(tmp_path: Path) -> None:
    now = clock.now()
    alpha = make_homes(tmp_path / "a", import_first=False).authority
    bravo = Authority.init(
        tmp_path / "B", B, suite="classical", root_keys=1, root_threshold=1, passphrase=PASSPHRASE.encode(), now=now
    )
    bravo.publish_bundle(now)
    docs = alpha.export_documents() + bravo.export_documents()
    assert {described(d)[0] for d in node.select(docs, domain=B)} == {B}
    assert node.select(docs, domain=A) == alpha.export_documents()
    assert node.select(docs, domain="charlie.example") == []
    # A peer that holds all of alpha and bravo's v1 epoch lacks only bravo's bundle and freshness v2.
    peer = node.summary_of(alpha.export_documents() + [bravo.published(t, 1) for t in ("root", "bundle", "policy")])
    assert [described(d) for d in node.select(docs, since=peer)] == [(B, "bundle", 2), (B, "freshness", 2)]
    assert [described(d) for d in node.select(docs, domain=A, since=peer)] == []


# --- every byte flipped, every truncation ------------------------------------------------------


def outcome_key(o: trust.Outcome) -> tuple[Any, ...]:
    """Everything an outcome would change: verdicts, marks, resets, trusted time."""
    verdicts = tuple(
        (v.index, v.status, v.doc.digest if v.doc else None, v.error.kind if v.error else None) for v in o.verdicts
    )
    return verdicts, tuple(sorted(o.marks.items())), tuple(sorted(o.resets)), o.clock_high_water


def pure_import(data: bytes, state: trust.TrustState, now: int, key: EncryptionPrivateKey) -> trust.Outcome:
    """Node.import_pack without the store writes: the same checks in the same order."""
    trust.check_clock(now, state.clock_high_water)
    data, _ = pack.unseal_if_sealed(data, key.public.kid, lambda: key)
    p = pack.parse(data)
    if p.manifest.kind != "documents":
        raise Malformed(f"a {p.manifest.kind} pack is for an authority home, not a node")
    return trust.verify_batch(p.documents, state, now)


def assert_typed(exc: BaseException) -> str:
    assert isinstance(exc, Rejected), f"{type(exc).__name__} escaped: {exc}"
    assert exc.kind in REJECT_KINDS, exc.kind
    return exc.kind


@dataclass
class Small:
    """The smallest realistic pack: a classical authority's one new freshness document."""

    tmp: Path
    pristine: Path  # a node home holding root, bundle, policy and freshness v1; only ever copied
    state: trust.TrustState  # that node's trust state
    key: EncryptionPrivateKey  # that node's encryption key
    now: int
    pack: bytes  # freshness v2 from the authority
    held_pack: bytes  # everything the node holds already, exported by a relay
    sealed: bytes  # ``pack`` sealed to the node
    sealed_other: bytes  # ``held_pack`` sealed to another node
    copies: int = 0

    def copy(self) -> Path:
        self.copies += 1
        dest = self.tmp / f"copy-{self.copies}"
        shutil.copytree(self.pristine, dest)
        return dest


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Small:
    tmp = tmp_path_factory.mktemp("small")
    now = clock.now()
    with contextlib.redirect_stderr(io.StringIO()):  # no-passphrase warnings
        auth = Authority.init(tmp / "A", A, suite="classical", root_keys=1, root_threshold=1, passphrase=None, now=now)
        home = new_node(tmp / "pristine", auth, now, passphrase=None)
        import_into(home, auth.export_pack(auth.export_documents(), now), now)
        held_pack = make_pack(auth.export_documents(), now=now)
        fresh = auth.export_pack(auth.publish_freshness(now + 5), now + 5)
        n = Node(shutil.copytree(home, tmp / "view"))
        try:
            key, state = n.identity.encryption, n.store.trust_state()
        finally:
            n.close()
    other = EncryptionPrivateKey.generate().public
    return Small(
        tmp,
        home,
        state,
        key,
        now + 10,
        fresh,
        held_pack,
        seal.seal(fresh, [key.public]),
        seal.seal(held_pack, [other]),
    )


def test_small_pack_is_small_and_applies(small: Small) -> None:
    assert len(small.pack) < 1024, len(small.pack)
    o = pure_import(small.pack, small.state, small.now, small.key)
    assert [(v.status, v.doc.type if v.doc else None) for v in o.verdicts] == [("applied", "freshness")]
    assert outcome_key(pure_import(small.sealed, small.state, small.now, small.key)) == outcome_key(o)
    assert {v.status for v in pure_import(small.held_pack, small.state, small.now, small.key).verdicts} == {
        "already-held"
    }


def _sweep(small: Small, data: bytes, mutations: Callable[[bytes], Iterator[tuple[str, bytes]]]) -> dict[str, int]:
    """Run every mutation of ``data`` through the pure import; return how each ended."""
    base = outcome_key(pure_import(data, small.state, small.now, small.key))
    seen: dict[str, int] = {}
    for label, mutated in mutations(data):
        assert mutated != data, label
        try:
            got = pure_import(mutated, small.state, small.now, small.key)
        except QhxError as exc:
            kind = assert_typed(exc)
        else:
            assert outcome_key(got) == base, f"{label}: accepted with a different outcome"
            kind = "same-outcome"
        seen[kind] = seen.get(kind, 0) + 1
    return seen


def every_flip(data: bytes) -> Iterator[tuple[str, bytes]]:
    """At every position: each single-bit flip and the whole byte inverted."""
    for i in range(len(data)):
        for mask in (*(1 << b for b in range(8)), 0xFF):
            b = bytearray(data)
            b[i] ^= mask
            yield f"byte {i} ^ {mask:#04x}", bytes(b)


def every_truncation(data: bytes) -> Iterator[tuple[str, bytes]]:
    for n in range(len(data)):
        yield f"first {n} bytes", data[:n]


def test_every_byte_of_a_small_pack_flipped(small: Small) -> None:
    seen = _sweep(small, small.pack, every_flip)
    assert sum(seen.values()) == 9 * len(small.pack)
    # The manifest signature covers the documents' digests: nothing gets through changed.
    assert "same-outcome" not in seen, seen
    assert seen.get("bad-signature", 0) > len(small.pack), seen


def test_every_truncation_of_a_small_pack(small: Small) -> None:
    seen = _sweep(small, small.pack, every_truncation)
    assert seen == {"malformed": len(small.pack)}
    extended = _sweep(small, small.pack, lambda d: iter([("one more byte", d + b"\x00"), ("twice", d + d)]))
    assert extended == {"malformed": 2}


def test_every_byte_of_a_small_sealed_pack_flipped(small: Small) -> None:
    def flips(data: bytes) -> Iterator[tuple[str, bytes]]:
        for i in range(len(data)):
            for mask in (0x01, 0x80, 0xFF):
                b = bytearray(data)
                b[i] ^= mask
                yield f"byte {i} ^ {mask:#04x}", bytes(b)

    seen = _sweep(small, small.sealed, flips)
    assert "same-outcome" not in seen, seen
    assert {"malformed", "not-recipient"} <= set(seen), seen  # a flipped key id names somebody else
    assert _sweep(small, small.sealed, every_truncation) == {"malformed": len(small.sealed)}


def _full_import(small: Small, data: bytes) -> tuple[str, Held]:
    """Import ``data`` with the real Node.import_pack into a fresh copy of the node."""
    home = small.copy()
    before = trust_digest(home)
    n = Node(home)
    error: QhxError | None = None
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            n.import_pack(data, small.now, source="sample")
    except QhxError as exc:
        error = exc
    finally:
        n.close()
    if error is None:
        return "applied", held(home)
    kind = assert_typed(error)
    if isinstance(error, ImportRejected) and error.result.applied:
        return "partly-applied", held(home)
    assert trust_digest(home) == before, f"a rejected import ({kind}) changed the trust state"
    return kind, held(home)


def test_sample_of_flips_and_truncations_through_the_real_import(small: Small) -> None:
    kind, expected = _full_import(small, small.pack)
    assert kind == "applied"
    assert expected != held(small.copy())
    n = len(small.pack)
    positions = sorted({0, 1, 2, n // 2, n - 2, n - 1, *range(3, n, max(1, n // 24))})
    cases = []
    for i in positions:
        b = bytearray(small.pack)
        b[i] ^= 0x01 if i % 2 else 0xFF
        cases.append(bytes(b))
    cases += [small.pack[: i * n // 8] for i in range(8)]
    cases += [small.sealed[:-1], bytes([small.sealed[0] ^ 0x01]) + small.sealed[1:], small.sealed_other]
    kinds = set()
    for data in cases:
        kind, state = _full_import(small, data)
        kinds.add(kind)
        if kind in ("applied", "partly-applied"):
            assert state == expected
    # A tampered or truncated pack is detected before any document is parsed (issue 3).
    assert kinds <= REJECT_KINDS, kinds
    # And the untouched sealed pack ends exactly where the unsealed one does.
    home = small.copy()
    with contextlib.redirect_stderr(io.StringIO()):
        result = import_into(home, small.sealed, small.now)
    assert result.sealed
    assert held(home) == expected


# --- sealing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sealing:
    now: int
    docs: list[bytes]
    pack: bytes  # unsealed, from the authority
    recipients: list[Path]  # node homes the pack is sealed to
    outsider: Path  # a node of the same domain that is not a recipient

    def card(self, home: Path) -> Any:
        with opened(home) as n:
            return parse_card(n.card())


@pytest.fixture(scope="module")
def sealing_template(tmp_path_factory: pytest.TempPathFactory) -> Sealing:
    """Three nodes holding alpha's first epoch, and a pack of its second (made once per module)."""
    homes = make_homes(tmp_path_factory.mktemp("sealing"))
    now = clock.now()
    auth = homes.authority
    others = []
    for name in ("N2", "X"):
        home = new_node(homes.tmp / name, auth, now)
        import_into(home, auth.export_pack(auth.export_documents(), now), now)
        others.append(home)
    docs = auth.publish_bundle(now)
    return Sealing(now, docs, auth.export_pack(docs, now), [homes.node_home, others[0]], others[1])


@pytest.fixture
def sealing(sealing_template: Sealing, tmp_path: Path) -> Sealing:
    """A private copy of the template's node homes."""
    t = sealing_template

    def copy(home: Path) -> Path:
        return Path(shutil.copytree(home, tmp_path / home.name))

    return Sealing(t.now, t.docs, t.pack, [copy(h) for h in t.recipients], copy(t.outsider))


def test_sealed_pack_hides_its_content_from_the_courier(sealing: Sealing) -> None:
    cards = [sealing.card(h) for h in sealing.recipients]
    sealed = seal.seal(sealing.pack, [c.encryption_key for c in cards])
    assert sealed != sealing.pack
    assert A.encode() not in sealed
    for raw in sealing.docs:
        assert raw[-64:] not in sealed
        assert D.parse(raw).digest not in sealed
    assert pack.parse(sealing.pack).manifest.pack_id not in sealed
    assert seal.is_sealed(sealed)
    assert seal.recipients_of(sealed) == sorted(c.encryption_key.kid for c in cards)


def test_sealed_pack_opened_by_a_non_recipient(sealing: Sealing) -> None:
    sealed = seal.seal(sealing.pack, [sealing.card(sealing.recipients[0]).encryption_key])
    before = trust_digest(sealing.outsider)
    with opened(sealing.outsider) as n, pytest.raises(NotRecipient) as info:
        n.import_pack(sealed, sealing.now, source="pack courier.pack")
    assert info.value.kind == "not-recipient"
    secret_words = content_words(sealing.docs, sealing.pack)
    say_nothing_about(info.value.message, secret_words)
    assert trust_digest(sealing.outsider) == before
    with opened(sealing.outsider) as n:
        last = n.store.audit_entries()[-1]
    assert (last["event"], last["kind"], last["domain"], last["type"]) == ("reject", "not-recipient", None, None)
    say_nothing_about(last["detail"], secret_words)


def test_sealed_pack_opened_by_a_recipient_gives_the_unsealed_state(sealing: Sealing, tmp_path: Path) -> None:
    home = sealing.recipients[0]
    twin = tmp_path / "twin"
    shutil.copytree(home, twin)  # the same node, keys and all
    assert trust_digest(twin) == trust_digest(home)
    sealed = seal.seal(sealing.pack, [sealing.card(home).encryption_key])

    got = import_into(home, sealed, sealing.now)
    plain = import_into(twin, sealing.pack, sealing.now)
    assert got.sealed
    assert not plain.sealed
    assert got.applied
    assert {**got.to_json(), "sealed": False} == plain.to_json()
    assert trust_digest(home) == trust_digest(twin)


def test_sealed_pack_to_several_recipients(sealing: Sealing) -> None:
    cards = [sealing.card(h) for h in sealing.recipients]
    # A recipient named twice is listed once.
    sealed = seal.seal(sealing.pack, [cards[0].encryption_key, cards[1].encryption_key, cards[0].encryption_key])
    assert len(seal.recipients_of(sealed)) == 2
    expected = None
    for home in sealing.recipients:
        with opened(home) as n:
            assert seal.open_sealed(sealed, n.identity.encryption) == sealing.pack
        result = import_into(home, sealed, sealing.now)
        assert result.applied
        assert result.sealed
        assert expected is None or held(home).documents == expected
        expected = held(home).documents
    before = trust_digest(sealing.outsider)
    with pytest.raises(NotRecipient):
        import_into(sealing.outsider, sealed, sealing.now)
    assert trust_digest(sealing.outsider) == before


def _tampered(sealed: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """Re-frame a sealed pack after ``change`` (the strongest forger: the frame stays well-formed)."""
    frame = seal.split(sealed)
    value = {**frame.header, "ciphertext": bytes(frame.payload), "version": 1}
    change(value)
    if value.pop("version") != 1:
        return cbor.encode("qhx-edge-sealed/2") + sealed[len(seal.MAGIC) :]
    payload = value.pop("ciphertext")
    value["length"] = len(payload)
    return seal.MAGIC + cbor.encode(value) + payload


def _flip(b: bytes, i: int) -> bytes:
    out = bytearray(b)
    out[i] ^= 0x01
    return bytes(out)


def _swap_wrapped(entries: list[dict[str, bytes]]) -> None:
    entries[0]["wrapped"], entries[1]["wrapped"] = entries[1]["wrapped"], entries[0]["wrapped"]


TAMPERINGS: dict[str, tuple[Callable[[dict[str, Any], int, bytes], None], str]] = {
    # (change(value, my_index, attacker_kid), kind the genuine recipient gets)
    "my-kid-replaced": (lambda v, i, k: v["recipients"][i].update(kid=k), "not-recipient"),
    "other-kid-replaced": (lambda v, i, k: v["recipients"][1 - i].update(kid=k), "malformed"),
    "my-wrapped-key-flipped": (
        lambda v, i, k: v["recipients"][i].update(wrapped=_flip(v["recipients"][i]["wrapped"], 40)),
        "malformed",
    ),
    "my-wrapped-key-truncated": (
        lambda v, i, k: v["recipients"][i].update(wrapped=v["recipients"][i]["wrapped"][:-1]),
        "malformed",
    ),
    "wrapped-keys-swapped": (lambda v, i, k: _swap_wrapped(v["recipients"]), "malformed"),
    "other-recipient-stripped": (lambda v, i, k: v.update(recipients=[v["recipients"][i]]), "malformed"),
    "attacker-recipient-added": (
        lambda v, i, k: v["recipients"].append({"kid": k, "wrapped": v["recipients"][i]["wrapped"]}),
        "malformed",
    ),
    "ciphertext-flipped": (
        lambda v, i, k: v.update(ciphertext=_flip(v["ciphertext"], len(v["ciphertext"]) // 2)),
        "malformed",
    ),
    "tag-flipped": (lambda v, i, k: v.update(ciphertext=_flip(v["ciphertext"], len(v["ciphertext"]) - 1)), "malformed"),
    "ciphertext-truncated": (lambda v, i, k: v.update(ciphertext=v["ciphertext"][:-16]), "malformed"),
    "nonce-changed": (lambda v, i, k: v.update(nonce=_flip(v["nonce"], 0)), "malformed"),
    "version-changed": (lambda v, i, k: v.update(version=2), "malformed"),
}


@pytest.mark.parametrize("name", sorted(TAMPERINGS))
def test_tampered_sealed_pack(sealing: Sealing, name: str) -> None:
    change, kind = TAMPERINGS[name]
    me = sealing.recipients[0]
    mine = sealing.card(me).encryption_key
    sealed = seal.seal(sealing.pack, [mine, sealing.card(sealing.recipients[1]).encryption_key])
    index = seal.recipients_of(sealed).index(mine.kid)
    attacker = EncryptionPrivateKey.generate().public.kid
    forged = _tampered(sealed, lambda v: change(v, index, attacker))
    assert forged != sealed

    before = trust_digest(me)
    with opened(me) as n:
        with pytest.raises(Rejected) as info:
            n.import_pack(forged, sealing.now)
        assert info.value.kind == kind
        say_nothing_about(info.value.message, content_words(sealing.docs, sealing.pack))
        assert n.store.trust_digest() == before
        # The genuine sealed pack still opens afterwards.
        assert n.import_pack(sealed, sealing.now).applied


def test_sealed_inner_must_be_a_plain_pack(sealing: Sealing) -> None:
    key = sealing.card(sealing.recipients[0]).encryption_key
    with opened(sealing.recipients[0]) as n:
        for inner in (b"not a pack", cbor.encode({"format": "qhx-edge-pack"}), seal.seal(sealing.pack, [key])):
            with pytest.raises(Rejected) as info:
                n.import_pack(seal.seal(inner, [key]), sealing.now)
            assert info.value.kind == "malformed"
    with pytest.raises(Rejected) as info:
        seal.seal(sealing.pack, [])
    assert info.value.kind == "malformed"


def test_cli_sealed_export_with_cards(homes: Homes, tmp_path: Path) -> None:
    now = clock.now()
    n2 = new_node(tmp_path / "N2", homes.authority, now)
    outsider = new_node(tmp_path / "X", homes.authority, now)
    for home in (n2, outsider):
        import_into(home, homes.authority.export_pack(homes.authority.export_documents(), now), now)
    cli_ok("--home", homes.a, "--json", "authority", "publish", "bundle")
    cards = {}
    for name, home in (("n1", homes.node_home), ("n2", n2), ("authority", homes.a)):
        out = cli_ok("--home", home, "--json", "node", "card", "--to", tmp_path / f"{name}.card")
        card = parse_card((tmp_path / f"{name}.card").read_bytes())
        assert out["node_id"] == card.node_id
        assert out["fingerprint"] == card.fingerprint
        assert out["encryption_kid"] == card.encryption_key.kid.hex()
        cards[name] = card
    assert cards["authority"].node_id == "authority"

    sealed_path = tmp_path / "sealed.pack"
    out = cli_ok(
        "--home", homes.a, "--json", "pack", "export",
        "--seal-to", tmp_path / "n1.card", "--seal-to", tmp_path / "n2.card", "--to", sealed_path,
    )  # fmt: skip
    assert out["sealed_to"] == [cards["n1"].node_id, cards["n2"].node_id]
    assert out["documents"] == 4
    data = sealed_path.read_bytes()
    assert A.encode() not in data
    assert seal.recipients_of(data) == sorted(cards[n].encryption_key.kid for n in ("n1", "n2"))

    before = trust_digest(outsider)
    err, _ = cli_fails("not-recipient", "--home", outsider, "--json", "pack", "import", sealed_path)
    assert set(err) == {"ok", "error"}, err  # no per-document report: nothing was read
    say_nothing_about(err["error"]["message"], [A, "bundle", "freshness", "root", "policy"])
    assert trust_digest(outsider) == before
    text = run_cli("--home", outsider, "pack", "import", sealed_path)
    assert text.code == 1
    assert "not-recipient" in text.stderr
    assert A not in text.stdout + text.stderr

    for home in (homes.node_home, n2):
        imp = cli_ok("--home", home, "--json", "pack", "import", sealed_path)
        assert imp["sealed"] is True
        assert imp["applied"] is True
        assert imp["exporter"]["verified"] is True
        assert imp["counts"] == {"already-held": 2, "applied": 2}
    assert cli_doc_list(n2) == cli_doc_list(homes.node_home)

    # A card that is not a card cannot be sealed to.
    (tmp_path / "bad.card").write_bytes(b"\x00" * 40)
    cli_fails(
        "malformed",
        "--home",
        homes.a,
        "--json",
        "pack",
        "export",
        "--seal-to",
        tmp_path / "bad.card",
        "--to",
        tmp_path / "y",
    )
    assert not (tmp_path / "y").exists()


# --- replays -----------------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", ["authority", "relay-node"])
def test_older_pack_after_a_newer_one_is_rollback(homes: Homes, tmp_path: Path, exporter: str) -> None:
    auth, now = homes.authority, clock.now()
    if exporter == "authority":

        def export() -> bytes:
            return auth.export_pack(auth.export_documents(), now)

        target = homes.node_home
    else:
        target = new_node(tmp_path / "N2", auth, now)

        def export() -> bytes:
            import_into(homes.node_home, auth.export_pack(auth.export_documents(), now), now)
            with opened(homes.node_home) as n:
                return n.export_pack(n.export_documents(), now)

    auth.publish_bundle(now)  # bundle/freshness v2
    older = export()
    auth.publish_bundle(now)  # v3
    newer = export()
    assert import_into(target, newer, now).applied
    before = trust_digest(target)

    with pytest.raises(ImportRejected) as info:
        import_into(target, older, now)
    assert info.value.kind == "rollback"
    by_doc = {(d["type"], d["version"]): d["report"] for d in info.value.result.to_json()["documents"]}
    assert by_doc == {
        ("root", 1): "already-held",
        ("bundle", 2): "rejected:rollback",
        ("policy", 1): "already-held",
        ("freshness", 2): "rejected:rollback",
    }
    assert not info.value.result.applied
    assert trust_digest(target) == before
    with opened(target) as n:
        rejects = [(e["type"], e["version"], e["kind"]) for e in n.store.audit_entries() if e["event"] == "reject"]
        assert n.status(now)["domains"][A]["versions"]["bundle"] == 3
    assert rejects[-2:] == [("bundle", 2, "rollback"), ("freshness", 2, "rollback")]


def test_replaying_a_pack_imported_before_a_newer_one(homes: Homes) -> None:
    auth, now = homes.authority, clock.now()
    auth.publish_bundle(now)
    older = auth.export_pack(auth.export_documents(), now)
    assert import_into(homes.node_home, older, now).applied
    auth.publish_bundle(now)
    assert import_into(homes.node_home, auth.export_pack(auth.export_documents(), now), now).applied
    before = trust_digest(homes.node_home)
    # The node holds bundle v2 as history, but the pack carries it without the current v3: a replay.
    with pytest.raises(ImportRejected) as info:
        import_into(homes.node_home, older, now)
    assert info.value.kind == "rollback"
    assert info.value.result.pack_status == "already-imported"
    assert trust_digest(homes.node_home) == before


def test_same_pack_again_is_a_noop_that_says_so(homes: Homes, tmp_path: Path) -> None:
    auth, now = homes.authority, clock.now()
    auth.publish_bundle(now)
    path = tmp_path / "p.pack"
    pack.write(path, auth.export_pack(auth.export_documents(), now))
    first = cli_ok("--home", homes.node_home, "--json", "pack", "import", path)
    assert first["pack_status"] == "new"
    assert first["changed"] is True
    before = trust_digest(homes.node_home)

    again = cli_ok("--home", homes.node_home, "--json", "pack", "import", path)
    assert again["pack_status"] == "already-imported"
    assert again["applied"] is False
    assert again["changed"] is False
    assert again["pack"]["pack_id"] == first["pack"]["pack_id"]
    assert [d["report"] for d in again["documents"]] == ["already-held"] * 4
    assert again["counts"] == {"already-held": 4}
    assert trust_digest(homes.node_home) == before
    with opened(homes.node_home) as n:
        last = n.store.audit_entries()[-1]
    assert (last["event"], last["detail"]) == ("noop", f"pack {path.name}: every document already held")
    text = run_cli("--home", homes.node_home, "pack", "import", path)
    assert text.code == 0
    assert "imported before" in text.stdout


# --- the per-document report -------------------------------------------------------------------


def _mixed_pack(homes: Homes, tmp_path: Path) -> tuple[Path, list[tuple[str, str, int]]]:
    """Alpha's new epoch (two held, two new documents) and bravo's root, which the node does not trust."""
    now = clock.now()
    bravo = Authority.init(
        tmp_path / "B", B, suite="classical", root_keys=1, root_threshold=1, passphrase=PASSPHRASE.encode(), now=now
    )
    homes.authority.publish_bundle(now)
    docs = [*homes.authority.export_documents(), bravo.anchor()]
    path = tmp_path / "mixed.pack"
    path.write_bytes(make_pack(docs))
    return path, [described(d) for d in docs]


def test_cli_per_document_report(homes: Homes, tmp_path: Path) -> None:
    path, docs = _mixed_pack(homes, tmp_path)
    strict_home = tmp_path / "strict"
    shutil.copytree(homes.node_home, strict_home)
    before = trust_digest(homes.node_home)

    out, _ = cli_fails("unknown-domain", "--home", homes.node_home, "--json", "pack", "import", path)
    assert out["applied"] is True
    assert out["changed"] is True
    assert out["pack_status"] == "new"
    assert out["exporter"] == {**out["exporter"], "node": "relay", "verified": False}
    got = [((d["domain"], d["type"], d["version"]), d["report"]) for d in out["documents"]]
    assert got == list(
        zip(docs, ["already-held", "applied", "already-held", "applied", "rejected:unknown-domain"], strict=True)
    )
    assert [d["index"] for d in out["documents"]] == list(range(5))
    assert out["documents"][4]["error"]["kind"] == "unknown-domain"
    assert out["counts"] == {"already-held": 2, "applied": 2, "rejected:unknown-domain": 1}
    assert trust_digest(homes.node_home) != before
    assert cli_ok("--home", homes.node_home, "--json", "status")["domains"][A]["versions"]["bundle"] == 2

    # Text mode says the same on stderr, exit code 1.
    text = run_cli("--home", strict_home, "pack", "import", "--strict", path)
    assert text.code == 1
    assert "rejected:unknown-domain" in text.stderr
    assert "root v1: rejected:unknown-domain" in text.stderr

    # --strict: nothing applied when anything is rejected.
    before = trust_digest(strict_home)
    out, _ = cli_fails("unknown-domain", "--home", strict_home, "--json", "pack", "import", "--strict", path)
    assert out["applied"] is False
    assert out["changed"] is False
    assert out["documents"][4]["report"] == "rejected:unknown-domain"
    assert trust_digest(strict_home) == before
    with opened(strict_home) as n:
        last = n.store.audit_entries()[-1]
    assert (last["event"], last["kind"]) == ("reject", "unknown-domain")
    assert "strict import, nothing applied" in last["detail"]

    # --strict with nothing wrong applies like a plain import.
    clean = tmp_path / "clean.pack"
    clean.write_bytes(make_pack(homes.authority.export_documents()))
    out = cli_ok("--home", strict_home, "--json", "pack", "import", "--strict", clean)
    assert out["applied"] is True
    assert [d["report"] for d in out["documents"]] == ["already-held", "applied", "already-held", "applied"]
    assert held(strict_home) == held(homes.node_home)


def test_report_of_forged_and_history_documents(homes: Homes, tmp_path: Path) -> None:
    """History versions report ``applied``; a forged copy ``rejected:bad-signature`` beside the genuine one."""
    auth, now = homes.authority, clock.now()
    auth.publish_bundle(now)
    auth.publish_bundle(now)
    docs = [auth.published("bundle", 2), auth.published("bundle", 3), auth.published("freshness", 3)]
    forged = bytearray(auth.published("bundle", 3))
    forged[-10] ^= 0x01  # inside the last signature (ML-DSA-65): still well-formed
    path = tmp_path / "p.pack"
    path.write_bytes(make_pack([*docs, bytes(forged)]))
    out, _ = cli_fails("bad-signature", "--home", homes.node_home, "--json", "pack", "import", path)
    assert [d["report"] for d in out["documents"]] == ["applied", "applied", "applied", "rejected:bad-signature"]
    assert [d["status"] for d in out["documents"][:3]] == ["history", "applied", "applied"]


# --- exporter attribution ----------------------------------------------------------------------


def test_authority_pack_is_attributed_to_the_authority(homes: Homes) -> None:
    auth, now = homes.authority, clock.now()
    auth.publish_bundle(now)
    result = import_into(homes.node_home, auth.export_pack(auth.export_documents(), now), now)
    assert result.exporter["verified"] is True
    assert result.exporter["basis"] == "freshness role of the held root"
    assert (result.exporter["domain"], result.exporter["node"]) == (A, "authority")
    # Somebody else calling itself the authority is not attributed to it; its documents
    # still authenticate themselves (store-and-forward).
    auth.publish_bundle(now)
    stranger = make_pack(auth.export_documents(), node_name="authority", domain=A)
    result = import_into(homes.node_home, stranger, now)
    assert result.exporter["verified"] is False
    assert result.exporter["basis"] == "key not in the held root"
    assert result.applied


def test_node_pack_attributed_through_a_pinned_card(homes: Homes, tmp_path: Path) -> None:
    now = clock.now()
    n1, auth = homes.node_home, homes.authority
    n2 = new_node(tmp_path / "N2", auth, now)
    n3 = new_node(tmp_path / "N3", auth, now)

    # Unpinned: imported, but unattributed.
    cli_ok("--home", n1, "--json", "pack", "export", "--to", tmp_path / "n1-a.pack")
    imp = cli_ok("--home", n2, "--json", "pack", "import", tmp_path / "n1-a.pack")
    assert imp["exporter"]["verified"] is False

    card = cli_ok("--home", n1, "--json", "node", "card", "--to", tmp_path / "n1.card")
    cli_fails(
        "anchor-mismatch",
        "--home",
        n2,
        "--json",
        "node",
        "pin-card",
        tmp_path / "n1.card",
        "--expect-fingerprint",
        "00" * 32,
    )
    pinned = cli_ok(
        "--home", n2, "--json", "node", "pin-card", tmp_path / "n1.card", "--expect-fingerprint", card["fingerprint"]
    )
    assert (pinned["node_id"], pinned["fingerprint"]) == (card["node_id"], card["fingerprint"])

    auth.publish_bundle(now)
    import_into(n1, auth.export_pack(auth.export_documents(), now), now)
    cli_ok("--home", n1, "--json", "pack", "export", "--to", tmp_path / "n1-b.pack")
    imp = cli_ok("--home", n2, "--json", "pack", "import", tmp_path / "n1-b.pack")
    assert imp["exporter"]["verified"] is True
    assert imp["exporter"]["basis"] == f"pinned card {card['fingerprint'][:16]}"
    assert imp["pack"]["sequence"] == 2  # node1's second export
    assert imp["applied"] is True

    # Impersonation: node3's real key (and a stranger's) claiming node1's id, and
    # node1's own key claiming another domain, are refused whole.
    auth.publish_bundle(now)
    docs = auth.export_documents()
    with opened(n3) as n:
        n3_key = n.identity.signer
    with opened(n1) as n:
        n1_key = n.identity.signer
    forgeries = {
        "node3-key": make_pack(docs, signer=n3_key, node_name=card["node_id"], domain=A),
        "stranger-key": make_pack(docs, signer=PrivateKey.generate("hybrid"), node_name=card["node_id"], domain=A),
        "other-domain": make_pack(docs, signer=n1_key, node_name=card["node_id"], domain=B),
    }
    before = trust_digest(n2)
    for name, data in forgeries.items():
        path = tmp_path / f"{name}.pack"
        path.write_bytes(data)
        out, _ = cli_fails("bad-signature", "--home", n2, "--json", "pack", "import", path)
        assert set(out) == {"ok", "error"}, (name, out)
        assert card["node_id"] in out["error"]["message"]
        assert trust_digest(n2) == before, name
    # The genuine node1 pack of the same documents is attributed and applied.
    genuine = make_pack(docs, signer=n1_key, node_name=card["node_id"], domain=A, sequence=3)
    result = import_into(n2, genuine, now)
    assert result.exporter["verified"] is True
    assert result.applied


# --- fuzzing the decoders ----------------------------------------------------------------------


@dataclass(frozen=True)
class FuzzBase:
    small: Small
    bases: tuple[bytes, ...]
    allowed: frozenset[tuple[Any, ...]]  # outcomes a decoded input may have
    inputs: st.SearchStrategy[bytes]


@pytest.fixture(scope="module")
def fuzz_base(small: Small) -> FuzzBase:
    bases = (small.pack, small.held_pack, small.sealed, small.sealed_other)
    allowed = frozenset(outcome_key(pure_import(b, small.state, small.now, small.key)) for b in bases[:3])
    assert len(allowed) == 2
    return FuzzBase(small, bases, allowed, _mutants(bases))


def _restructure(data: bytes, other: bytes, op: int, n: int) -> bytes:
    """Structure-aware mutations of a plain pack: valid CBOR, wrong content."""
    try:
        v = cbor.decode(data, max_size=1 << 20)
        w = cbor.decode(other, max_size=1 << 20)
    except QhxError:
        return data[: n % (len(data) + 1)]
    if not isinstance(v, dict) or "documents" not in v or not isinstance(w, dict):
        return data[::-1]
    docs = list(v["documents"])
    ops: list[Callable[[], None]] = [
        lambda: v.update(manifest=w.get("manifest", b"")),  # another pack's manifest
        lambda: v.update(documents=w.get("documents", [])),  # another pack's documents
        lambda: v.update(documents=[*docs, *docs]),  # every document twice
        lambda: v.update(documents=docs[:-1]),  # one dropped
        lambda: v.update(documents=[*docs[::-1], b""]),
        lambda: v.update(version=n % 4),
        lambda: v.update(extra=n),
        lambda: v.update(documents=[d[: n % (len(d) + 1)] for d in docs]),
        lambda: v.update(manifest=v["manifest"][: n % (len(v["manifest"]) + 1)]),
        lambda: v.pop(("format", "version", "manifest", "documents")[n % 4]),
        lambda: v.update(format="qhx-edge-sealed"),
        lambda: v.update(documents=n),
    ]
    ops[op % len(ops)]()
    return cbor.encode(v)


def _resigned(data: bytes, field: int, n: int) -> bytes:
    """A stranger re-signs the manifest after changing one field: the signature is valid."""
    try:
        p = pack.parse(data)
    except QhxError:
        return data
    env = cbor.decode(p.manifest.raw, max_size=1 << 20, tags=frozenset({98}))
    m = cbor.decode(env.value[2], max_size=1 << 20)
    change = (
        ("sequence", n),
        ("created_at", n),
        ("kind", "evidence"),
        ("pack_id", hashlib.sha256(str(n).encode()).digest()[:16]),
        ("exporter", {**m["exporter"], "node": f"n{n}"}),
        ("documents", m["documents"][:-1]),
        ("type", "card"),
    )[field % 7]
    m[change[0]] = change[1]
    signer = _STRANGER
    m["exporter"]["key"] = signer.public.to_cbor()
    manifest = cose.sign(cbor.encode(m), [signer], content_type=pack.MANIFEST_CONTENT_TYPE)
    return cbor.encode({"format": pack.FORMAT, "version": 1, "manifest": manifest, "documents": p.documents})


_STRANGER = PrivateKey.generate("classical")
_pos = st.integers(min_value=0, max_value=1 << 16)


def _mutants(bases: tuple[bytes, ...]) -> st.SearchStrategy[bytes]:
    base = st.sampled_from(bases)
    plain = st.sampled_from(bases[:2])

    def flips(b: bytes, edits: list[tuple[int, int]]) -> bytes:
        out = bytearray(b)
        for i, mask in edits:
            out[i % len(out)] ^= mask
        return bytes(out)

    def insert(b: bytes, i: int, x: bytes) -> bytes:
        i %= len(b) + 1
        return b[:i] + x + b[i:]

    def delete(b: bytes, i: int, k: int) -> bytes:
        i %= len(b) + 1
        return b[:i] + b[i + k :]

    def splice(a: bytes, b: bytes, i: int, j: int) -> bytes:
        return a[: i % (len(a) + 1)] + b[j % (len(b) + 1) :]

    return st.one_of(
        st.builds(flips, base, st.lists(st.tuples(_pos, st.integers(1, 255)), min_size=1, max_size=4)),
        st.builds(lambda b, i: b[: i % len(b)], base, _pos),
        st.builds(insert, base, _pos, st.binary(min_size=1, max_size=16)),
        st.builds(delete, base, _pos, st.integers(1, 64)),
        st.builds(splice, base, base, _pos, _pos),
        st.builds(_restructure, plain, plain, st.integers(0, 63), _pos),
        st.builds(_resigned, plain, st.integers(0, 6), _pos),
        st.binary(max_size=1024),
    )


def _only_typed(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except QhxError as exc:
        event(f"rejected: {assert_typed(exc)}")
        return exc


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fuzz_pack_decoders_raise_only_typed_errors(fuzz_base: FuzzBase, data: st.DataObject) -> None:
    small = fuzz_base.small
    blob = data.draw(fuzz_base.inputs, label="pack")
    _only_typed(lambda: pack.outer(blob))
    _only_typed(lambda: pack.parse(blob))
    _only_typed(lambda: seal.open_sealed(blob, small.key))
    got = _only_typed(lambda: pure_import(blob, small.state, small.now, small.key))
    if isinstance(got, trust.Outcome):
        event("accepted")
        assert outcome_key(got) in fuzz_base.allowed, "a mutated pack was accepted with a different outcome"


def test_strict_refusal_reports_acceptable_documents_as_not_applied(homes: Homes, tmp_path: Path) -> None:
    now = clock.now()
    homes.authority.publish_bundle(now)
    docs = [*homes.authority.export_documents(), b"\xa0not a document"]
    before = trust_digest(homes.node_home)
    with opened(homes.node_home) as n, pytest.raises(ImportRejected) as info:
        n.import_pack(make_pack(docs), now, strict=True)
    report = info.value.result.to_json()
    assert report["applied"] is False
    kinds = {d["report"] for d in report["documents"]}
    assert "applied" not in kinds
    assert {"not-applied", "rejected:malformed"} <= kinds
    assert trust_digest(homes.node_home) == before


def test_a_pack_that_changed_nothing_is_remembered(homes: Homes) -> None:
    """A pack whose documents were all held is recorded, so a re-import says it was seen."""
    now = clock.now()
    data = homes.authority.export_pack(homes.authority.export_documents(), now)  # nothing new for the node
    with opened(homes.node_home) as n:
        first = n.import_pack(data, now)
        assert (first.applied, first.pack_status) == (False, "new")
        before = n.store.trust_digest()
        again = n.import_pack(data, now)
        assert (again.applied, again.pack_status) == (False, "already-imported")
        assert n.store.trust_digest() == before
