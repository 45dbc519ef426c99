"""``federation fetch``: a node fetches a partner's SPIFFE bundle from its bundle endpoint
(qhx_edge/homes/partner_fetch.py; docs/architecture.md "Fetching a partner's bundle endpoint").

The partner here is SPIRE-like: it has no signed bundle documents, only a CA and a SPIFFE bundle
served over a real TLS 1.3 bundle endpoint on 127.0.0.1 (our own server code, in a thread, with the
bundle it serves under the test's control, so it can replay an old one).  alpha's node is a real home
driven through the real command line.  What SPIRE gets wrong, we must not: an older
``spiffe_sequence`` is ``rollback``; the fetched bundle persists across processes; its age counts
against the agreement's budget, and only an authenticated fetch refreshes it, never a replayed file.
tests/test_interop_spire.py does the same against a real SPIRE server.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qhx_edge.core import spiffe_bundle
from qhx_edge.core.errors import Malformed, QhxError
from qhx_edge.homes.node import Node
from qhx_edge.links import bundle_endpoint as be
from qhx_edge.links import tls
from tests.conftest import _cli_env, faketime_prefix, find_libfaketime, need, run_cli, stop_process
from tests.pki import Ca, make_ca, make_leaf
from tests.test_federation import ALPHA, BETA, TERMS, _pem, agree, authority, fails, ok, trust_digest

ENDPOINT_ID = "spiffe://beta.example/spire/server"
INSIDE = "spiffe://beta.example/ns/logistics/api"


def bundle_json(cas: list[Ca], sequence: int, hint: int = 300) -> bytes:
    data, _ = spiffe_bundle.to_json(spiffe_bundle.SpiffeBundle(tuple(c.der for c in cas), (), sequence, hint))
    return data


@dataclass
class Partner:
    """beta's side: its CA, what its endpoint serves now, and the endpoint's TLS credential."""

    ca: Ca
    serving: bytes = b""
    credential: tls.Credential | None = None
    fetches: int = 0
    extra: list[Ca] = field(default_factory=list)
    endpoint: be.BundleEndpoint | None = None  # serving, inside endpoint()

    def bundle(self) -> bytes:
        self.fetches += 1
        return self.serving

    def present(self, credential: tls.Credential) -> None:
        """Serve with ``credential`` from the next connection on: wait until the endpoint took it (it
        looks again every second at the most often; a fixed sleep made the test flaky under load)."""
        self.credential = credential
        deadline = time.monotonic() + 30
        while (
            self.endpoint is None
            or self.endpoint.credential is None
            or (self.endpoint.credential.chain != credential.chain)
        ):
            assert time.monotonic() < deadline, "the endpoint never took the new credential"
            time.sleep(0.05)

    def cred(self) -> tls.Credential:
        assert self.credential is not None
        return self.credential


@contextlib.contextmanager
def endpoint(partner: Partner) -> Iterator[str]:
    ep = be.BundleEndpoint(partner.bundle, partner.cred, host="127.0.0.1", port=0, credential_poll=0.1)
    partner.endpoint = ep
    with be.EndpointThread(ep):
        assert ep.address is not None
        host, port = ep.address
        yield f"https://{host}:{port}/"


def svid_credential(ca: Ca, spiffe_id: str) -> tls.Credential:
    leaf = make_leaf(ca, uri=spiffe_id)
    return tls.Credential.from_pem(leaf.chain_pem, leaf.key_pem)


def setup(tmp: Path, *extra: str) -> tuple[Path, Path]:
    """alpha and beta authorities under TERMS (+ ``extra``), an alpha node holding the agreement; (A, N)."""
    a, b = authority(tmp, "A", ALPHA), authority(tmp, "B", BETA)
    n = tmp / "N"
    ok("--home", n, "--json", "node", "init", "--anchor", a[1], "--expect-fingerprint", a[2])
    agree(tmp, a, b, BETA, *TERMS, *extra)
    pack = tmp / "a.pack"
    ok("--home", a[0], "--json", "pack", "export", "--to", pack)
    ok("--home", n, "--json", "pack", "import", pack)
    return a[0], n


def fetch(n: Path, *args: str | Path) -> list[str | Path]:
    return ["--home", str(n), "--json", "federation", "fetch", "--partner", BETA, *args]


def test_fetch_takes_newer_refuses_older_and_persists(tmp_path: Path) -> None:
    _a, n = setup(tmp_path, "--allow-spiffe-bundles")
    partner = Partner(make_ca("beta CA"))
    partner.credential = svid_credential(partner.ca, ENDPOINT_ID)
    partner.serving = bundle_json([partner.ca], 1)
    first = tmp_path / "beta-1.json"
    first.write_bytes(partner.serving)

    with endpoint(partner) as url:
        spiffe = ("--url", url, "--profile", "https_spiffe", "--endpoint-id", ENDPOINT_ID)
        # Nothing held to authenticate the endpoint with yet: bootstrap first (as SPIRE's bundle set).
        out = run_cli(*fetch(n, *spiffe))
        assert (out.code, out.json["error"]["kind"]) == (3, "not-initialised"), out.stdout
        assert partner.fetches == 0
        assert ok("--home", n, "--json", "bundle", "import-spiffe", first, "--domain", BETA)["status"] == "new"

        got = ok(*fetch(n))  # the endpoint was recorded with the first attempt
        assert (got["status"], got["sequence"], got["profile"]) == ("confirmed", 1, "https_spiffe")
        assert got["tls_group"] == "X25519MLKEM768"
        held = ok("--home", n, "--json", "status")["domains"][BETA]["spiffe_bundle"]
        assert held["confirmed_at"] is not None
        assert held["fresh_at"] >= held["imported_at"]

        # The partner rotates its CA: a higher sequence enters.
        partner.extra.append(make_ca("beta CA 2"))
        partner.serving = bundle_json([partner.ca, *partner.extra], 2)
        got = ok(*fetch(n))
        assert (got["status"], got["sequence"], got["x509_authorities"]) == ("new", 2, 2)

        # A replayed older bundle, or the same sequence with other content, is rollback; nothing moves.
        before = trust_digest(n)
        partner.serving = first.read_bytes()
        fails("rollback", *fetch(n))
        partner.serving = bundle_json([partner.ca], 2)
        fails("rollback", *fetch(n))
        assert trust_digest(n) == before
        # ... and so is the old file carried by hand.
        fails("rollback", "--home", n, "--json", "bundle", "import-spiffe", first, "--domain", BETA)

        # An endpoint with another SPIFFE ID, or an SVID of another CA, is refused before any bundle is read.
        partner.serving = bundle_json([partner.ca, *partner.extra], 3)
        partner.present(svid_credential(partner.ca, "spiffe://beta.example/not/the/endpoint"))
        fails("scope-violation", *fetch(n))
        partner.present(svid_credential(make_ca("impostor"), ENDPOINT_ID))
        fails("bad-signature", *fetch(n))
        assert trust_digest(n) == before
        assert partner.fetches == 4  # four bundles served; the bootstrap-less try and the refused SVIDs got none

    # The endpoint is gone (a link down): unreachable, exit 3, trust unchanged and still usable.
    out = run_cli(*fetch(n))
    assert (out.code, out.json["error"]["kind"]) == (3, "unreachable"), out.stdout
    assert trust_digest(n) == before
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(_pem(make_leaf(partner.extra[0], uri=INSIDE).der_chain))
    got = ok("--home", n, "--json", "svid", "verify", leaf)  # a new process: the bundle persisted
    assert (got["assurance"], got["spiffe_sequence"], got["relation"]) == ("spiffe-bundle", 2, "partner")
    fails("scope-violation", "--home", n, "--json", "federation", "check", "spiffe://beta.example/ns/other")


def test_only_an_authenticated_fetch_keeps_a_spiffe_bundle_fresh(tmp_path: Path) -> None:
    """TERMS give beta a 1 h budget.  A fetch 50 minutes on confirms the held bundle, so 90 minutes on
    beta is still trusted; the same file imported again at 50 minutes refreshes nothing."""
    need(find_libfaketime() is not None, "faketime moves the node's clock (Debian faketime)")
    partner = Partner(make_ca("beta CA"))
    partner.credential = svid_credential(partner.ca, ENDPOINT_ID)
    partner.serving = bundle_json([partner.ca], 7)
    for name, confirm_by_fetch in (("fetched", True), ("file", False)):
        _a, n = setup(tmp_path / name, "--allow-spiffe-bundles")
        file = tmp_path / name / "beta.json"
        file.write_bytes(partner.serving)
        ok("--home", n, "--json", "bundle", "import-spiffe", file, "--domain", BETA)
        later = faketime_prefix("+50m")
        with endpoint(partner) as url:
            spiffe = ("--url", url, "--profile", "https_spiffe", "--endpoint-id", ENDPOINT_ID)
            if confirm_by_fetch:
                assert ok(*fetch(n, *spiffe), prefix=later)["status"] == "confirmed"
            else:
                again = ok("--home", n, "--json", "bundle", "import-spiffe", file, "--domain", BETA, prefix=later)
                assert again["status"] == "already-imported"
        check = ("--home", n, "--json", "federation", "check", INSIDE)
        if confirm_by_fetch:
            assert ok(*check, prefix=faketime_prefix("+90m"))["assurance"] == "spiffe-bundle"
        else:
            fails("stale", *check, prefix=faketime_prefix("+90m"))


def test_a_fetch_whose_authentication_changed_meanwhile_is_not_taken(tmp_path: Path) -> None:
    """Review finding: a fetch authenticated by a partner bundle that was replaced while it ran still
    counted.  beta drops its CA 1 (its key is out: a file carries sequence 3 with CA 3 alone) while our
    fetch is talking to an endpoint that proves itself with CA 1 and serves sequence 5 naming CA 1.
    Before, sequence 5 entered; now the fetch is made again on the new basis, where CA 1 proves nothing."""
    from qhx_edge.homes import partner_fetch

    _a, n = setup(tmp_path, "--allow-spiffe-bundles")
    old, new = make_ca("beta CA 1"), make_ca("beta CA 3")
    partner = Partner(old, credential=svid_credential(old, ENDPOINT_ID))
    boot, rotated = tmp_path / "boot.json", tmp_path / "rotated.json"
    boot.write_bytes(bundle_json([old], 1))
    rotated.write_bytes(bundle_json([new], 3))
    ok("--home", n, "--json", "bundle", "import-spiffe", boot, "--domain", BETA)
    partner.serving = bundle_json([old], 5)
    calls = []

    def racing_fetch(*args: Any, **kwargs: Any) -> be.Fetched:
        got = be.fetch(*args, **kwargs)
        if not calls:  # the rotation lands while the first fetch is in flight
            ok("--home", n, "--json", "bundle", "import-spiffe", rotated, "--domain", BETA)
        calls.append(got)
        return got

    with endpoint(partner) as url:
        partner_fetch.configure(n, BETA, url, "https_spiffe", endpoint_id=ENDPOINT_ID)
        with pytest.raises(QhxError) as refused:
            partner_fetch.fetch_once(n, BETA, fetch=racing_fetch)
    assert refused.value.kind == "bad-signature"  # the second attempt: CA 1 no longer vouches
    assert len(calls) == 1
    with Node(n) as node:
        held = node.store.spiffe_bundle(BETA)
    assert held is not None
    assert held.sequence == 3


def test_no_fetch_without_an_agreement_that_allows_spiffe_bundles(tmp_path: Path) -> None:
    _a, n = setup(tmp_path)  # TERMS without --allow-spiffe-bundles
    before = trust_digest(n)
    partner = Partner(make_ca("beta CA"), serving=b"{}")
    partner.credential = svid_credential(partner.ca, ENDPOINT_ID)
    with endpoint(partner) as url:
        fails("scope-violation", *fetch(n, "--url", url, "--profile", "https_spiffe", "--endpoint-id", ENDPOINT_ID))
    assert partner.fetches == 0  # refused before connecting
    # Malformed endpoint descriptions are refused before anything is recorded.
    fails(
        "scope-violation", *fetch(n, "--url", url, "--profile", "https_spiffe", "--endpoint-id", "spiffe://x.example/e")
    )
    fails(
        "malformed",
        *fetch(n, "--url", "http://127.0.0.1:1/", "--profile", "https_spiffe", "--endpoint-id", ENDPOINT_ID),
    )
    fails(
        "malformed",
        *fetch(n, "--url", "https://u@127.0.0.1:1/", "--profile", "https_spiffe", "--endpoint-id", ENDPOINT_ID),
    )
    assert run_cli(*fetch(n, "--profile", "https_web")).code == 2
    assert run_cli(*fetch(n, "--interval", "5m")).code == 2
    with_url = ("--url", url, "--profile", "https_spiffe", "--endpoint-id", ENDPOINT_ID)
    assert run_cli(*fetch(n, *with_url, "--interval", "5m")).code == 2
    # Every refusal above changed nothing: no endpoint was recorded for a fetch that may not happen.
    assert trust_digest(n) == before
    with Node(n) as node:
        assert node.store.bundle_endpoint(BETA) is None


def test_https_web_and_polling(tmp_path: Path) -> None:
    """https_web with the operator's CA; ``--poll`` reports each attempt as a JSON line, takes a new
    sequence at the next poll, retries an endpoint that went away, and stops cleanly on SIGTERM."""
    _a, n = setup(tmp_path, "--allow-spiffe-bundles")
    web_ca = make_ca("web CA")
    ca_file = tmp_path / "web-ca.pem"
    # The operator's file also holds a private key: only the certificate may reach the store.
    ca_file.write_bytes(web_ca.pem + make_leaf(web_ca, host="x").key_pem)
    server = make_leaf(web_ca, host="127.0.0.1")
    partner = Partner(make_ca("beta CA"))
    partner.credential = tls.Credential.from_pem(server.chain_pem, server.key_pem)
    partner.serving = bundle_json([partner.ca], 1)

    with contextlib.ExitStack() as stack:
        served = stack.enter_context(contextlib.ExitStack())  # closed early, to cut the link
        url = served.enter_context(endpoint(partner))
        other = make_ca("not the web CA")
        wrong = tmp_path / "other.pem"
        wrong.write_bytes(other.pem)
        fails("bad-signature", *fetch(n, "--url", url, "--profile", "https_web", "--ca", wrong))
        got = ok(*fetch(n, "--url", url, "--profile", "https_web", "--ca", ca_file))
        assert (got["status"], got["sequence"], got["profile"]) == ("new", 1, "https_web")
        with Node(n) as node:
            recorded = node.store.bundle_endpoint(BETA)
        assert recorded is not None
        assert recorded["ca_pem"] == web_ca.pem

        cmd = [sys.executable, "-m", "qhx_edge", *map(str, fetch(n, "--poll", "--interval", "5s"))]
        proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        stack.callback(stop_process, proc)

        def line() -> dict[str, Any]:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, "no poll report within 30 s"
            out: dict[str, Any] = json.loads(proc.stdout.readline())
            return out

        first = line()
        assert (first["status"], first["sequence"], first["next_in"]) == ("confirmed", 1, 5)
        partner.serving = bundle_json([partner.ca], 2)
        assert line()["status"] == "new"
        served.close()
        gone = line()  # the endpoint stopped: the poller reports it and retries
        assert (gone["error"]["kind"], gone["retry_in"]) == ("unreachable", 5)
        assert stop_process(proc) == 0  # SIGTERM ends the loop cleanly
    assert ok("--home", n, "--json", "status")["domains"][BETA]["spiffe_bundle"]["sequence"] == 2


@pytest.mark.parametrize("bad", [b"not json", b'{"keys": []}', b"{" * 70000])
def test_a_bad_body_is_refused_and_changes_nothing(tmp_path: Path, bad: bytes) -> None:
    _a, n = setup(tmp_path, "--allow-spiffe-bundles")
    partner = Partner(make_ca("beta CA"))
    partner.credential = svid_credential(partner.ca, ENDPOINT_ID)
    boot = tmp_path / "boot.json"
    boot.write_bytes(bundle_json([partner.ca], 1))
    ok("--home", n, "--json", "bundle", "import-spiffe", boot, "--domain", BETA)
    partner.serving = boot.read_bytes()
    with endpoint(partner) as url:
        assert ok(*fetch(n, "--url", url, "--profile", "https_spiffe", "--endpoint-id", ENDPOINT_ID))["status"]
        before = trust_digest(n)
        partner.serving = bad
        out = run_cli(*fetch(n))
    assert out.code == 1, out.stdout
    assert out.json["error"]["kind"] in ("malformed", "oversize")
    assert trust_digest(n) == before
    with Node(n) as node:  # the refusal is audited
        last = node.store.audit_entries()[-1]
    assert (last["event"], last["kind"], last["domain"]) == ("reject", out.json["error"]["kind"], BETA)


def test_the_client_reads_chunked_and_refuses_truncated_responses() -> None:
    """Go's net/http (so SPIRE's endpoint) sends a bundle over 2 KiB chunked, without Content-Length:
    before the client used h11 it failed on SPIRE's bundle once SPIRE held two X.509 authorities."""
    body = bundle_json([make_ca("beta CA"), make_ca("beta CA 2")], 2)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 1000]), body[i : i + 1000]) for i in range(0, len(body), 1000)
    )
    assert be._parse_response(head + chunks + b"0\r\n\r\n", "u") == body
    with pytest.raises(Malformed):
        be._parse_response(head + chunks, "u")  # no last chunk: cut short
    sized = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    assert be._parse_response(sized + body, "u") == body
    with pytest.raises(Malformed):
        be._parse_response(sized + body[:-1], "u")
    with pytest.raises(Malformed, match="redirects"):
        be._parse_response(b"HTTP/1.1 302 Found\r\nLocation: https://x/\r\nContent-Length: 0\r\n\r\n", "u")


def test_the_client_refuses_ambiguous_framing_and_shows_no_escapes() -> None:
    """Review findings: bytes after the response, and Content-Length beside Transfer-Encoding (RFC 9112
    §6.3, "ought to be handled as an error"), were taken; an endpoint's error body reached the operator's
    terminal with its escape sequences."""
    body = bundle_json([make_ca("beta CA")], 2)
    sized = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    with pytest.raises(Malformed, match="bytes after"):
        be._parse_response(sized + body + b"HTTP/1.1 200 OK\r\n", "u")
    both = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    with pytest.raises(Malformed, match="both Transfer-Encoding and Content-Length"):
        be._parse_response(both + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body), "u")
    evil = b"\x1b]0;owned\x07\x1b[2Jgone"
    with pytest.raises(Malformed) as caught:
        be._parse_response(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n%s" % (len(evil), evil), "u")
    assert "\x1b" not in caught.value.message
    assert "\x07" not in caught.value.message
    assert "\\x1b]0;owned" in caught.value.message


@pytest.mark.parametrize(
    "url",
    [
        "https://bücher.example/",
        "https://a_b.example/",
        "https://h.example./",
        "https://x.example/a b",
        "https://x.example/a\x01b",
        "https://x.example:0/",
        "https://x.example:99999/",
    ],
)
def test_urls_that_no_request_could_carry_are_malformed(url: str) -> None:
    """Before, these passed the URL check and failed later as untyped errors (UnicodeEncodeError,
    ValueError, h11's LocalProtocolError), killing a --poll loop; port 0 silently became 443."""
    with pytest.raises(Malformed):
        be.check_url(url)
    with pytest.raises(Malformed):
        be.fetch(url, be.HTTPS_WEB, ca_certs=[make_ca("web").der])


def test_the_poll_interval_is_the_operators_not_the_partners() -> None:
    """A partner's refresh hint of 1 s would have had us write a confirmation and an audit entry every
    5 s (review finding); the hint counts from 60 s, an operator's --interval from 5 s."""
    from qhx_edge.homes.partner_fetch import next_interval

    assert next_interval(1, None) == 60
    assert next_interval(None, None) == 300
    assert next_interval(3600, None) == 3600
    assert next_interval(10**9, None) == 86400
    assert next_interval(1, 5) == 5
    assert next_interval(1, 1) == 5


def test_a_node_held_open_sees_what_other_processes_commit(tmp_path: Path) -> None:
    """Verification reuses what it read from the store until anything commits to it (Store.memo):
    a long-lived node (the Workload API's, a poller's) must see another process's import at once."""
    _a, n = setup(tmp_path, "--allow-spiffe-bundles")
    old, new = make_ca("beta CA 1"), make_ca("beta CA 2")
    first, second = tmp_path / "1.json", tmp_path / "2.json"
    first.write_bytes(bundle_json([old], 1))
    second.write_bytes(bundle_json([new], 2))
    ok("--home", n, "--json", "bundle", "import-spiffe", first, "--domain", BETA)
    chain = make_leaf(old, uri=INSIDE).der_chain
    with Node(n) as node:
        for _ in range(3):
            assert node.verify_svid(chain, int(time.time()))["spiffe_sequence"] == 1
        ok("--home", n, "--json", "bundle", "import-spiffe", second, "--domain", BETA)  # another process
        with pytest.raises(QhxError) as refused:
            node.verify_svid(chain, int(time.time()))
        assert refused.value.kind == "bad-signature"
        assert node.verify_svid(make_leaf(new, uri=INSIDE).der_chain, int(time.time()))["spiffe_sequence"] == 2


def test_serve_fetches_the_recorded_partner_endpoints(tmp_path: Path) -> None:
    """``serve --fetch-partners`` polls each endpoint ``federation fetch`` recorded, beside the Workload
    API, as ``federation fetch --poll`` does: a new sequence enters while it serves; SIGTERM stops all."""
    _a, n = setup(tmp_path, "--allow-spiffe-bundles")
    partner = Partner(make_ca("beta CA"))
    partner.credential = svid_credential(partner.ca, ENDPOINT_ID)
    boot = tmp_path / "boot.json"
    boot.write_bytes(bundle_json([partner.ca], 1, hint=60))
    ok("--home", n, "--json", "bundle", "import-spiffe", boot, "--domain", BETA)
    partner.serving = bundle_json([partner.ca], 2, hint=60)
    with endpoint(partner) as url:
        ok(*fetch(n, "--url", url, "--profile", "https_spiffe", "--endpoint-id", ENDPOINT_ID))
        partner.serving = bundle_json([partner.ca], 3, hint=60)
        log = tmp_path / "serve.log"
        cmd = [sys.executable, "-m", "qhx_edge", "--json", "--home", str(n), "serve", "--socket",
               str(tmp_path / "w.sock"), "--fetch-partners"]  # fmt: skip
        with log.open("w") as err:
            proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.PIPE, stderr=err, text=True)
            try:
                assert proc.stdout is not None
                ready, _, _ = select.select([proc.stdout], [], [], 60)
                assert ready, log.read_text()
                assert json.loads(proc.stdout.readline())["fetching"] == [BETA]
                deadline = time.monotonic() + 30
                while '"sequence": 3' not in log.read_text() and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert '"status": "new"' in log.read_text(), log.read_text()
            finally:
                assert stop_process(proc) == 0, log.read_text()
    assert ok("--home", n, "--json", "status")["domains"][BETA]["spiffe_bundle"]["sequence"] == 3


def test_a_poller_outlives_an_error_no_fetch_should_raise(tmp_path: Path) -> None:
    """Review finding: ``poll`` caught typed errors only, so one untyped error (a certificate
    cryptography would not decode) ended the thread ``serve --fetch-partners`` runs it in: the partner
    silently went stale.  It is reported, and the next attempt comes."""
    import threading

    from qhx_edge.homes import partner_fetch

    _a, n = setup(tmp_path, "--allow-spiffe-bundles")
    partner_fetch.configure(n, BETA, "https://127.0.0.1:1/", "https_spiffe", endpoint_id=ENDPOINT_ID)
    boot = tmp_path / "boot.json"
    boot.write_bytes(bundle_json([make_ca("beta CA")], 1))
    ok("--home", n, "--json", "bundle", "import-spiffe", boot, "--domain", BETA)
    stop, reports = threading.Event(), []

    def broken(*args: Any, **kwargs: Any) -> be.Fetched:
        raise ValueError("a name cryptography will not decode")

    def report(line: dict[str, Any]) -> None:
        reports.append(line)
        if len(reports) == 2:
            stop.set()

    partner_fetch.FIRST_RETRY, saved = 0, partner_fetch.FIRST_RETRY
    try:
        thread = threading.Thread(target=partner_fetch.poll, args=(n, BETA, report, stop), kwargs={"fetch": broken})
        thread.start()
        thread.join(30)
    finally:
        partner_fetch.FIRST_RETRY = saved
    assert not thread.is_alive()
    assert [r["error"]["kind"] for r in reports] == ["internal", "internal"]


def test_an_operator_resets_a_partners_restarted_sequence(tmp_path: Path) -> None:
    """A SPIRE server rebuilt on an empty datastore counts its sequence from 1 again: every bundle it
    serves is rollback (as it must be: the node cannot tell that from a replay).  The operator, having
    checked the file out of band, takes it with --reset-sequence; the reset is audited, and a fetch can
    never reset anything."""
    _a, n = setup(tmp_path, "--allow-spiffe-bundles")
    old, rebuilt = make_ca("beta CA"), make_ca("beta CA rebuilt")
    held, restarted = tmp_path / "held.json", tmp_path / "restarted.json"
    held.write_bytes(bundle_json([old], 40))
    restarted.write_bytes(bundle_json([rebuilt], 1))
    ok("--home", n, "--json", "bundle", "import-spiffe", held, "--domain", BETA)
    imp = ("--home", n, "--json", "bundle", "import-spiffe", restarted, "--domain", BETA)
    fails("rollback", *imp)
    got = ok(*imp, "--reset-sequence")
    assert (got["status"], got["sequence"]) == ("reset", 1)
    status = ok("--home", n, "--json", "status")["domains"][BETA]["spiffe_bundle"]
    assert status["sequence"] == 1
    chain = make_leaf(rebuilt, uri=INSIDE).der_chain
    with Node(n) as node:
        assert node.verify_svid(chain, int(time.time()))["spiffe_sequence"] == 1
        entries = [e for e in node.store.audit_entries() if "operator reset" in (e["detail"] or "")]
    assert len(entries) == 1
    assert "held sequence 40" in entries[0]["detail"]
    # The flag is moot for a bundle that would enter anyway, and changes nothing for one refused otherwise.
    assert ok(*imp, "--reset-sequence")["status"] == "already-imported"
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    fails("malformed", "--home", n, "--json", "bundle", "import-spiffe", junk, "--domain", BETA, "--reset-sequence")
