"""Coalition federation with a partner that runs SPIRE (issue 9 point 4; docs/architecture.md "Fetching
a partner's bundle endpoint", "Interop peers").

alpha.example is ours: an authority and an attested node running ``qhx-edge serve`` with its Workload
API and its SPIFFE bundle endpoint (``https_spiffe``).  beta.example runs SPIRE (a real server and
agent, tests/interop/); its operators keep a qhx-edge authority only for the federation role that
countersigns the agreement (the agreement allows SPIFFE-format bundles: SPIRE has no signed ones).

* SPIRE federates with our endpoint (``bundle set`` with our ``--classical`` SPIFFE bundle, then
  ``federation create``); a workload attested by SPIRE's agent gets from SPIRE's own Workload API an
  SVID that our node accepts under the agreement, and a bundle set in which our node's SVID (from our
  Workload API) verifies with go-spiffe's ``x509svid.Verify``.
* Our node bootstraps beta's bundle from ``spire-server bundle show -format spiffe`` (``bundle
  import-spiffe``), fetches SPIRE's endpoint (``federation fetch``, https_spiffe), takes SPIRE's next
  sequence after a CA preparation and refuses the older one, and still verifies beta SVIDs after a
  restart of our node and with SPIRE stopped, until the agreement's budget runs out: then ``stale``.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qhx_edge.homes import bundles
from tests.conftest import faketime_prefix, find_libfaketime, need, run_cli
from tests.interop import SPIRE_TD, Spire, probe, probe_ok, spire, wait_until
from tests.test_bundle_endpoint import Served, serving
from tests.test_end_to_end import _attested
from tests.test_federation import agree, authority, fails, ok

ALPHA = "alpha.example"
BETA = SPIRE_TD
ENDPOINT_ID = f"spiffe://{ALPHA}/qhx-edge/bundle-endpoint"
OUR_WORKLOAD = f"spiffe://{ALPHA}/ns/ops/api"
THEIR_WORKLOAD = f"spiffe://{BETA}/logistics/api"
BUDGET = "1h"


def _pem_file(path: Path, pem: str) -> Path:
    path.write_text(pem)
    return path


@dataclass
class Coalition:
    tmp: Path
    node: Path
    served: Served  # our serve: Workload API and bundle endpoint
    socket: Path
    ours: Path  # our classical SPIFFE bundle (what SPIRE is bootstrapped with)


def _alpha(tmp: Path) -> Path:
    """alpha's attested node holding the agreement with beta (which allows SPIFFE bundles); its home."""
    uid = os.getuid()
    homes = _attested(
        tmp,
        [
            {"spiffe_id": ENDPOINT_ID, "selectors": [bundles.ENDPOINT_SELECTOR]},
            {"spiffe_id": OUR_WORKLOAD, "selectors": [f"unix:uid:{uid}"]},
        ],
    )
    a_anchor = tmp / "alpha-root.cbor"
    a_fp = ok("--home", homes.a, "--json", "authority", "anchor", "--to", a_anchor)["fingerprint"]
    b = authority(tmp, "B", BETA)  # beta's federation role only: SPIRE is its PKI
    agree(
        tmp, (homes.a, a_anchor, a_fp), b, BETA,
        "--accept", f"spiffe://{BETA}/logistics", "--max-staleness", BUDGET, "--expires", "30d",
        "--allow-spiffe-bundles", "--partner-accept", f"spiffe://{ALPHA}/ns/ops",
    )  # fmt: skip
    pack = tmp / "alpha.pack"
    ok("--home", homes.a, "--json", "pack", "export", "--to", pack)
    ok("--home", homes.node_home, "--json", "pack", "import", pack)
    return homes.node_home


@pytest.fixture
def coalition(tmp_path: Path) -> Iterator[Coalition]:
    node = _alpha(tmp_path)
    ours = tmp_path / "alpha.spiffe.json"
    ok("--home", node, "--json", "bundle", "export", "--classical", "--to", ours)
    sock = tmp_path / "w.sock"
    with serving(node, sock, "--bundle-endpoint-classical") as served:
        yield Coalition(tmp_path, node, served, sock, ours)


def _x509_from_spire(s: Spire) -> dict[str, Any]:
    def fetched() -> dict[str, Any] | None:
        r = probe("x509", "-socket", s.workload_socket, "-timeout", "5s")
        if r.code != 0:
            return None
        return r.out if ALPHA in r.out["bundles"] else None

    out: dict[str, Any] = wait_until("a SPIRE SVID with alpha's federated bundle", fetched, timeout=60, step=0.5)
    return out


def _svid_from(s: Spire) -> dict[str, Any]:
    def fetched() -> dict[str, Any] | None:
        r = probe("x509", "-socket", s.workload_socket, "-timeout", "5s")
        return r.out["svids"][0] if r.code == 0 else None

    out: dict[str, Any] = wait_until("an SVID from SPIRE's agent", fetched, timeout=60, step=0.5)
    return out


def _bundle_file(path: Path, der: list[str]) -> Path:
    """A SPIFFE bundle (JWKS) of the X.509 authorities SPIRE's Workload API handed its workload."""
    keys = [{"use": "x509-svid", "kty": "EC", "x5c": [d]} for d in der]
    from cryptography import x509

    for key, d in zip(keys, der, strict=True):
        pub = x509.load_der_x509_certificate(base64.b64decode(d)).public_key()
        nums = pub.public_numbers()  # type: ignore[union-attr]
        key |= {
            "crv": "P-256",
            "x": base64.urlsafe_b64encode(nums.x.to_bytes(32, "big")).rstrip(b"=").decode(),
            "y": base64.urlsafe_b64encode(nums.y.to_bytes(32, "big")).rstrip(b"=").decode(),
        }
    path.write_text(json.dumps({"keys": keys}))
    return path


def test_spire_and_our_node_federate_both_ways(coalition: Coalition) -> None:
    c, tmp = coalition, coalition.tmp
    with spire(bundle_profile="https_spiffe") as s:
        # SPIRE takes our exported bundle with its own tool, then federates with our endpoint.
        s.server("bundle", "set", "-format", "spiffe", "-id", f"spiffe://{ALPHA}", "-path", str(c.ours))
        s.server(
            "federation", "create", "-trustDomain", ALPHA, "-bundleEndpointURL", c.served.url,
            "-bundleEndpointProfile", "https_spiffe", "-endpointSpiffeID", ENDPOINT_ID,
        )  # fmt: skip
        s.server(
            "entry", "create", "-parentID", s.agent_id, "-spiffeID", THEIR_WORKLOAD,
            "-selector", f"unix:uid:{os.getuid()}", "-federatesWith", f"spiffe://{ALPHA}",
        )  # fmt: skip
        theirs = _x509_from_spire(s)
        (svid,) = theirs["svids"]
        assert svid["verified_id"] == THEIR_WORKLOAD  # go-spiffe verified it against SPIRE's own bundle

        # Our node: beta's bundle from SPIRE's own tool, then from SPIRE's bundle endpoint.
        shown = tmp / "beta-1.json"
        shown.write_text(s.server("bundle", "show", "-format", "spiffe").stdout)
        first = ok("--home", c.node, "--json", "bundle", "import-spiffe", shown, "--domain", BETA)
        assert first["status"] == "new"
        got = ok(
            "--home", c.node, "--json", "federation", "fetch", "--partner", BETA, "--url", s.bundle_url,
            "--profile", "https_spiffe", "--endpoint-id", s.server_id,
        )  # fmt: skip
        assert (got["status"], got["sequence"]) == ("confirmed", first["sequence"])

        # SPIRE's workload, accepted by our node under the agreement (lower assurance: unsigned bundle).
        chain = _pem_file(tmp / "beta-svid.pem", svid["chain_pem"])
        verified = ok("--home", c.node, "--json", "svid", "verify", chain)
        assert (verified["spiffe_id"], verified["relation"]) == (THEIR_WORKLOAD, "partner")
        assert verified["assurance"] == "spiffe-bundle"

        # Our workload's SVID, from our Workload API, verifies in the bundle set SPIRE gave its workload.
        mine = probe_ok("x509", "-socket", c.socket)
        (our_svid,) = [v for v in mine["svids"] if v["spiffe_id"] == OUR_WORKLOAD]
        ours_chain = _pem_file(tmp / "alpha-svid.pem", our_svid["chain_pem"])
        their_view = _bundle_file(tmp / "alpha-from-spire.json", theirs["bundles"][ALPHA]["der"])
        checked = probe_ok("verify", "-chain", ours_chain, "-bundle", their_view, "-trust-domain", ALPHA)
        assert checked["spiffe_id"] == OUR_WORKLOAD

        # Our Workload API hands our workloads beta's bundle too (the agreement allows it).
        wait_until(
            "beta's bundle in our Workload API's bundle set",
            lambda: BETA in probe_ok("x509-bundles", "-socket", c.socket)["bundles"],
            timeout=30,
        )


def test_our_node_fetches_spire_refuses_older_and_outlives_spire_until_the_budget(tmp_path: Path) -> None:
    node = _alpha(tmp_path)
    with spire([(THEIR_WORKLOAD, [f"unix:uid:{os.getuid()}"])], bundle_profile="https_spiffe") as s:
        shown = tmp_path / "beta-old.json"
        shown.write_text(s.server("bundle", "show", "-format", "spiffe").stdout)
        ok("--home", node, "--json", "bundle", "import-spiffe", shown, "--domain", BETA)
        fetch = (
            "--home", node, "--json", "federation", "fetch", "--partner", BETA, "--url", s.bundle_url,
            "--profile", "https_spiffe", "--endpoint-id", s.server_id,
        )  # fmt: skip
        assert ok(*fetch)["status"] == "confirmed"
        # SPIRE prepares its next X.509 authority: its bundle grows and its sequence moves on.
        s.server("localauthority", "x509", "prepare")
        newer = ok(*fetch)
        assert (newer["status"], newer["x509_authorities"]) == ("new", 2)
        assert newer["sequence"] > json.loads(shown.read_text())["spiffe_sequence"]
        fails("rollback", "--home", node, "--json", "bundle", "import-spiffe", shown, "--domain", BETA)

        svid = _svid_from(s)
        chain = _pem_file(tmp_path / "beta-svid-2.pem", svid["chain_pem"])
        assert ok("--home", node, "--json", "svid", "verify", chain)["spiffe_sequence"] == newer["sequence"]

    # SPIRE is gone: the fetch says so (exit 3); every new process of our node still verifies beta SVIDs.
    down = run_cli(*fetch)
    assert (down.code, down.json["error"]["kind"]) == (3, "unreachable")
    assert ok("--home", node, "--json", "svid", "verify", chain)["assurance"] == "spiffe-bundle"
    status = ok("--home", node, "--json", "status")["domains"][BETA]
    assert status["mode"] == "connected"
    assert status["spiffe_bundle"]["sequence"] == newer["sequence"]
    # ... until the agreement's budget (1 h) runs out.
    need(find_libfaketime() is not None, "faketime moves the node's clock past the budget (Debian faketime)")
    fails("stale", "--home", node, "--json", "svid", "verify", chain, prefix=faketime_prefix("+2h"))
