"""The SPIFFE bundle endpoint of ``qhx-edge serve --bundle-endpoint`` (qhx_edge/links/bundle_endpoint.py;
SPIFFE Federation §4, §5), as a real process on 127.0.0.1: our own client and go-spiffe's
``federation.FetchBundle`` fetch over ``https_spiffe`` (the node's own X509-SVID, registered for the
selector ``qhx-edge:bundle-endpoint``) and ``https_web`` (a certificate from files); a wrong endpoint
ID, an expired SVID, a foreign CA, oversized heads and methods other than GET are refused; SPIRE
federates with the endpoint and follows a newly published bundle."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from qhx_edge.core import spiffe_bundle
from qhx_edge.core.errors import BadSignature, Expired, ScopeViolation
from qhx_edge.core.svid import leaf_spiffe_id
from qhx_edge.homes import authority as authority_module
from qhx_edge.homes import bundles, node
from qhx_edge.links import bundle_endpoint as be
from qhx_edge.links import tls
from qhx_edge.store import clock
from tests.conftest import PASSPHRASE, Homes, _cli_env
from tests.interop import probe, probe_ok, spiffeprobe, spire, wait_until
from tests.pki import make_ca, make_leaf
from tests.test_end_to_end import _attested

DOMAIN = "alpha.example"
ENDPOINT_ID = f"spiffe://{DOMAIN}/qhx-edge/bundle-endpoint"
REFRESH_HINT = 20  # seconds: SPIRE refetches every max(hint, 60 s) / 4


@dataclass
class Served:
    info: dict[str, Any]
    proc: subprocess.Popen[str]

    @property
    def url(self) -> str:
        return str(self.info["bundle_endpoint"]["url"])


@contextlib.contextmanager
def serving(home: Path, sock: Path, *args: str | Path) -> Iterator[Served]:
    """``qhx-edge --json serve --bundle-endpoint 127.0.0.1:0 ARGS``; its ready line; SIGTERM, exit 0."""
    cmd = [sys.executable, "-m", "qhx_edge", "--json", "--home", str(home), "serve", "--socket", str(sock)]
    cmd += ["--bundle-endpoint", "127.0.0.1:0", *map(str, args)]
    log = sock.with_suffix(".log")
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            line = proc.stdout.readline() if ready else ""
            assert line, f"serve printed nothing (exit {proc.poll()}): {log.read_text()}"
            yield Served(json.loads(line), proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                assert proc.wait(15) == 0, log.read_text()  # SIGTERM stops both servers cleanly
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()


def _publish_bundle(homes: Homes) -> int:
    """A new bundle version (and the freshness naming it), imported by the node; its version."""
    now = clock.now()
    homes.authority.publish_bundle(now)
    n = node.Node(homes.node_home, PASSPHRASE.encode)
    try:
        n.import_pack(homes.authority.export_pack(homes.authority.export_documents(), now), now)
    finally:
        n.close()
    _, info = bundles.export_spiffe(homes.node_home, None, classical=True)
    return int(info["sequence"])


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> Homes:
    tmp = tmp_path_factory.mktemp("endpoint")
    h = _attested(tmp, [{"spiffe_id": ENDPOINT_ID, "selectors": [bundles.ENDPOINT_SELECTOR]}])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(authority_module, "REFRESH_HINT", REFRESH_HINT)
        _publish_bundle(h)
    return h


@pytest.fixture(scope="module")
def ours(homes: Homes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our domain's SPIFFE bundle, classical (what SPIRE and go-spiffe read), as a file."""
    path = tmp_path_factory.mktemp("bundle") / "alpha.json"
    path.write_bytes(bundles.export_spiffe(homes.node_home, None, classical=True)[0])
    return path


@pytest.fixture(scope="module")
def spiffe_served(homes: Homes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    sock = tmp_path_factory.mktemp("sock") / "w.sock"
    with serving(homes.node_home, sock, "--bundle-endpoint-classical") as served:
        yield served


def test_serve_reports_the_endpoint_and_its_svid(spiffe_served: Served) -> None:
    ep = spiffe_served.info["bundle_endpoint"]
    assert ep["profile"] == "https_spiffe"
    assert ep["spiffe_id"] == ENDPOINT_ID
    assert ep["url"].startswith("https://127.0.0.1:")
    assert ep["url"].endswith("/")


def test_our_client_fetches_over_https_spiffe_and_refuses_a_wrong_id_or_an_expired_svid(
    spiffe_served: Served, ours: Path, homes: Homes
) -> None:
    anchor = spiffe_bundle.parse(ours.read_bytes())
    got = be.fetch(spiffe_served.url, be.HTTPS_SPIFFE, endpoint_bundle=anchor, endpoint_id=ENDPOINT_ID)
    assert got.data == ours.read_bytes()
    assert got.bundle.sequence == anchor.sequence
    assert got.bundle.refresh_hint == REFRESH_HINT
    assert got.group == "X25519MLKEM768"
    assert leaf_spiffe_id(got.peer_chain[0]) == ENDPOINT_ID
    with pytest.raises(ScopeViolation, match=r"not for spiffe://alpha\.example/somebody"):
        be.fetch(spiffe_served.url, be.HTTPS_SPIFFE, endpoint_bundle=anchor, endpoint_id=f"spiffe://{DOMAIN}/somebody")
    later = clock.now() + 30 * 86400  # past the SVID's notAfter (the policy TTL is an hour)
    with pytest.raises(Expired):
        be.fetch(spiffe_served.url, be.HTTPS_SPIFFE, endpoint_bundle=anchor, endpoint_id=ENDPOINT_ID, now=lambda: later)
    impostor = spiffe_bundle.SpiffeBundle((make_ca(DOMAIN).der,), (), 1, None)
    with pytest.raises(BadSignature):
        be.fetch(spiffe_served.url, be.HTTPS_SPIFFE, endpoint_bundle=impostor, endpoint_id=ENDPOINT_ID)


def test_go_spiffe_fetches_over_https_spiffe(spiffe_served: Served, ours: Path) -> None:
    spiffeprobe()
    args = ("fetch-bundle", "-trust-domain", DOMAIN, "-url", spiffe_served.url, "-endpoint-bundle", ours)
    out = probe_ok(*args, "-endpoint-id", ENDPOINT_ID)
    shown = json.loads(ours.read_text())
    assert out["profile"] == "https_spiffe"
    assert out["trust_domain"] == DOMAIN
    assert out["sequence_number"] == shown["spiffe_sequence"]
    assert out["refresh_hint_seconds"] == REFRESH_HINT
    got = {der for k in out["bundle"]["keys"] if k["use"] == "x509-svid" for der in k["x5c"]}
    assert got == {der for k in shown["keys"] if k["use"] == "x509-svid" for der in k["x5c"]}
    wrong = probe(*args, "-endpoint-id", f"spiffe://{DOMAIN}/not-the-endpoint")
    assert wrong.code == 1
    assert "unexpected ID" in wrong.out["error"]


async def _raw(url: str, ours: Path, request: bytes) -> bytes:
    host, port, _ = be._split_url(url)
    anchor = spiffe_bundle.parse(ours.read_bytes())
    verify = tls.spiffe_verifier(anchor.x509_authorities, ENDPOINT_ID)
    stream = await tls.connect(host, port, tls.make_context(server=False), verify)
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(15):
            while chunk := await stream.receive_some():
                data += chunk
        return data


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"405"),
        (b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
        (b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
        (b"GET / HTTP/1.1\r\n\r\n", b"400"),  # no Host
        (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", b"400"),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", b"505"),
        (b"GET /" + b"a" * 4000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", b"431"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 40 + b"\r\n", b"431"),
    ],
)
def test_the_endpoint_answers_get_only_and_refuses_what_is_not_a_small_get(
    spiffe_served: Served, ours: Path, request_bytes: bytes, status: bytes
) -> None:
    data = trio.run(_raw, spiffe_served.url, ours, request_bytes)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == status, data[:300]
    if status == b"200":
        assert b"Content-Type: application/json" in head
        assert json.loads(body)["keys"]
    else:
        assert body.strip()  # a one-line reason
    if status == b"405":
        assert b"Allow: GET" in head


def test_a_new_bundle_is_served_at_the_next_request(spiffe_served: Served, homes: Homes, ours: Path) -> None:
    anchor = spiffe_bundle.parse(ours.read_bytes())
    before = be.fetch(spiffe_served.url, be.HTTPS_SPIFFE, endpoint_bundle=anchor, endpoint_id=ENDPOINT_ID)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(authority_module, "REFRESH_HINT", REFRESH_HINT)
        version = _publish_bundle(homes)
    after = be.fetch(spiffe_served.url, be.HTTPS_SPIFFE, endpoint_bundle=anchor, endpoint_id=ENDPOINT_ID)
    assert before.bundle.sequence is not None
    assert after.bundle.sequence == version == before.bundle.sequence + 1


def test_https_web_serves_the_operators_certificate_to_both_clients(homes: Homes, tmp_path: Path) -> None:
    ca = make_ca("web CA")
    cert, key = make_leaf(ca, host="127.0.0.1").write(tmp_path, "web")
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    args = ("--bundle-endpoint-profile", "https_web", "--bundle-endpoint-cert", cert, "--bundle-endpoint-key", key)
    with serving(homes.node_home, tmp_path / "w.sock", *args, "--bundle-endpoint-classical") as served:
        assert served.info["bundle_endpoint"]["profile"] == "https_web"
        got = be.fetch(served.url, be.HTTPS_WEB, ca_certs=[ca.der])
        assert got.bundle.sequence is not None
        with pytest.raises(BadSignature):
            be.fetch(served.url, be.HTTPS_WEB, ca_certs=[make_ca("another CA").der])
        wrong_host = served.url.replace("127.0.0.1", "localhost")
        with pytest.raises(BadSignature):
            be.fetch(wrong_host, be.HTTPS_WEB, ca_certs=[ca.der])
        spiffeprobe()
        out = probe_ok("fetch-bundle", "-trust-domain", DOMAIN, "-url", served.url, "-web-roots", tmp_path / "ca.pem")
        assert out["profile"] == "https_web"
        assert out["sequence_number"] == got.bundle.sequence


def test_serve_refuses_an_endpoint_without_a_registered_identity(tmp_path: Path) -> None:
    h = _attested(tmp_path, [{"spiffe_id": f"spiffe://{DOMAIN}/web", "selectors": ["unix:uid:0"]}])
    cmd = [sys.executable, "-m", "qhx_edge", "--json", "--home", str(h.node_home), "serve"]
    cmd += ["--socket", str(tmp_path / "w.sock"), "--bundle-endpoint", "127.0.0.1:0"]
    proc = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["error"]["kind"] == "policy-denied"
    assert bundles.ENDPOINT_SELECTOR in proc.stdout


def _rotate_ca(homes: Homes) -> dict[str, Any]:
    """A new CA generation, imported by the node: the bundle its endpoint serves now lists one more
    X.509 authority (returned, as the endpoint serves it)."""
    now = clock.now()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(authority_module, "REFRESH_HINT", REFRESH_HINT)
        homes.authority.rotate_ca(now)
    n = node.Node(homes.node_home, PASSPHRASE.encode)
    try:
        n.import_pack(homes.authority.export_pack(homes.authority.export_documents(), now), now)
    finally:
        n.close()
    served: dict[str, Any] = json.loads(bundles.export_spiffe(homes.node_home, None, classical=True)[0])
    return served


def _x5c(bundle: dict[str, Any]) -> set[str]:
    return {der for k in bundle["keys"] if k["use"] == "x509-svid" for der in k["x5c"]}


def _spire_holds(s: Any) -> dict[str, Any] | None:
    r = s.server("bundle", "list", "-id", f"spiffe://{DOMAIN}", "-format", "spiffe", check=False)
    if r.returncode != 0:
        return None
    text = r.stdout.strip()
    start = text.find("{")
    return json.loads(text[start:]) if start >= 0 else None


def test_spire_federates_with_our_endpoint_and_follows_a_new_bundle(
    spiffe_served: Served, homes: Homes, ours: Path
) -> None:
    with spire(agent=False) as s:
        # The relationship and its bootstrap bundle in one step (SPIRE's federation API): SPIRE fetches
        # from our endpoint at once, then every max(refresh hint, 60 s) / 4 = 15 s.
        s.server(
            "federation", "create", "-trustDomain", DOMAIN, "-bundleEndpointURL", spiffe_served.url,
            "-bundleEndpointProfile", "https_spiffe", "-endpointSpiffeID", ENDPOINT_ID,
            "-trustDomainBundlePath", str(ours), "-trustDomainBundleFormat", "spiffe",
        )  # fmt: skip
        first = wait_until("SPIRE to hold alpha.example's bundle", lambda: _spire_holds(s), timeout=30)
        assert _x5c(first) == _x5c(json.loads(ours.read_text()))
        assert first["spiffe_refresh_hint"] == REFRESH_HINT
        served = _rotate_ca(homes)
        assert len(_x5c(served)) > len(_x5c(first))

        def refreshed() -> dict[str, Any] | None:
            held = _spire_holds(s)
            return held if held is not None and _x5c(held) == _x5c(served) else None

        t0 = time.monotonic()
        held = wait_until("SPIRE to fetch the new bundle from our endpoint", refreshed, timeout=60, step=1)
        print(f"SPIRE followed the new bundle (v{served['spiffe_sequence']}) in {time.monotonic() - t0:.1f} s")
        assert held["spiffe_refresh_hint"] == REFRESH_HINT


def test_the_endpoint_rotates_a_short_lived_credential_before_it_expires(tmp_path: Path) -> None:
    """In process: a credential source handing out 4-second SVIDs is asked again at half-life, and the
    next connection gets the new one (what the issuer's re-mint at half-life gives serve)."""
    ca = make_ca(DOMAIN)
    handed: list[tls.Credential] = []

    def credential() -> tls.Credential:
        now = dt.datetime.now(dt.UTC)
        leaf = make_leaf(ca, uri=ENDPOINT_ID, not_before=now, not_after=now + dt.timedelta(seconds=4))
        handed.append(tls.Credential.from_der(leaf.der_chain, leaf.key_der))
        return handed[-1]

    body = json.dumps({"keys": [], "spiffe_sequence": 7}).encode()
    server = be.BundleEndpoint(lambda: body, credential, host="127.0.0.1", port=0)
    anchor = spiffe_bundle.SpiffeBundle((ca.der,), (), 1, None)
    with be.EndpointThread(server):
        assert server.address is not None
        url = f"https://127.0.0.1:{server.address[1]}/"
        first = be.fetch(url, be.HTTPS_SPIFFE, endpoint_bundle=anchor, endpoint_id=ENDPOINT_ID)
        assert first.bundle.sequence == 7
        assert first.peer_chain == handed[0].chain
        time.sleep(3)  # past half of the first one's life, before its end
        second = be.fetch(url, be.HTTPS_SPIFFE, endpoint_bundle=anchor, endpoint_id=ENDPOINT_ID)
        assert len(handed) >= 2
        assert second.peer_chain != first.peer_chain
        assert second.peer_chain in [c.chain for c in handed[1:]]


@pytest.mark.slow
def test_spire_with_a_federates_with_block_and_bundle_set_fetches_from_our_endpoint(
    spiffe_served: Served, homes: Homes, ours: Path
) -> None:
    """SPIRE configured as an operator would: a ``federates_with`` block in server.conf, then
    ``bundle set`` with our ``--classical`` bundle. SPIRE's first try at start finds no local bundle
    and waits its one-minute MinimumRefreshHint, so this takes about a minute."""
    hcl = f"""federates_with "{DOMAIN}" {{
      bundle_endpoint_url = "{spiffe_served.url}"
      bundle_endpoint_profile "https_spiffe" {{
        endpoint_spiffe_id = "{ENDPOINT_ID}"
      }}
    }}"""
    served = _rotate_ca(homes)  # the endpoint serves more than the bootstrap bundle says
    assert _x5c(served) != _x5c(json.loads(ours.read_text()))
    with spire(agent=False, federation_hcl=hcl) as s:
        t0 = time.monotonic()
        s.server("bundle", "set", "-format", "spiffe", "-id", f"spiffe://{DOMAIN}", "-path", str(ours))

        def refreshed() -> bool:
            held = _spire_holds(s)
            return held is not None and _x5c(held) == _x5c(served)

        wait_until("SPIRE to fetch from our endpoint", refreshed, timeout=150, step=1)
        print(f"SPIRE (federates_with) fetched from our endpoint {time.monotonic() - t0:.1f} s after bundle set")
