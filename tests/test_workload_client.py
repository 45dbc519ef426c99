"""The Workload API client of tunnels (qhx_edge/issue/workload_client.py), in isolation: what it makes
of an answer, and that a withdrawn or expired SVID is never handed out.  (Against our real Workload
API: tests/test_tunnel.py.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from qhx_edge.core.errors import Expired, Malformed, NoIdentity
from qhx_edge.issue.proto import workload_pb2
from qhx_edge.issue.workload_client import X509Source, parse_response
from tests.pki import make_ca, make_leaf

ID = "spiffe://alpha.example/ns/db/main"


def _response(spiffe_id: str = ID) -> workload_pb2.X509SVIDResponse:
    ca = make_ca("alpha.example")
    leaf = make_leaf(ca, uri=ID)
    svid = workload_pb2.X509SVID(spiffe_id=spiffe_id, x509_svid=b"".join(leaf.der_chain), x509_svid_key=leaf.key_der,
                                 bundle=ca.der)  # fmt: skip
    return workload_pb2.X509SVIDResponse(svids=[svid])


def test_an_answer_gives_the_first_svid_named_by_its_certificate() -> None:
    got = parse_response(_response())
    assert got.spiffe_id == ID
    assert got.not_after > 0
    with pytest.raises(Malformed, match="names"):
        parse_response(_response("spiffe://alpha.example/ns/admin"))  # a field that lies about the certificate
    with pytest.raises(NoIdentity):
        parse_response(workload_pb2.X509SVIDResponse())


def test_a_withdrawn_or_expired_svid_is_never_handed_out(tmp_path: Path) -> None:
    source = X509Source(tmp_path / "none.sock")  # not started: its state is set by hand
    svid = parse_response(_response())
    source._latest = svid
    assert source.current(timeout=0).spiffe_id == ID
    source._fail(NoIdentity("the server attests this process to nothing now"))
    with pytest.raises(NoIdentity):
        source.current(timeout=0)
    source._latest, source._error = dataclasses.replace(svid, not_after=1), None
    with pytest.raises(Expired):
        source.current(timeout=0)
