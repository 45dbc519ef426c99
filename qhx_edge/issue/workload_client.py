"""A SPIFFE Workload API client for this process's own X509-SVID (Workload API §5.2; docs/architecture.md,
"Tunnels").

:class:`X509Source` keeps the stream ``FetchX509SVID`` open on the Workload API's Unix socket (ours,
``qhx-edge serve``, or any conforming server) in a thread of its own, and holds the newest answer:
the default SVID (chain and key, DER), its trust domain's bundle and the federated bundles.  A new
answer replaces the old for whoever asks next: a server using it takes the new SVID for its next
connection and leaves live ones alone.  A broken stream is opened again, backing off from 1 s to
30 s; until the first answer, :meth:`X509Source.current` waits (a server starting late is waited
for), then says why it has none: ``unreachable``, or at once ``no-identity`` when the server
attests us to no registration.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qhx_edge.core import svid
from qhx_edge.core.errors import Expired, Malformed, NoIdentity, QhxError, Unreachable
from qhx_edge.store import clock

MAX_MESSAGE = 4 << 20
MAX_BUNDLE = 64  # certificates in one bundle


@dataclass(frozen=True)
class WorkloadSvid:
    spiffe_id: str
    chain: tuple[bytes, ...]  # DER, leaf first
    key: bytes  # PKCS#8 DER
    bundle: tuple[bytes, ...]  # DER X.509 authorities of the SVID's trust domain
    federated: dict[str, tuple[bytes, ...]] = field(default_factory=dict)  # trust domain -> authorities
    not_after: int = 0  # the leaf's expiry


def parse_response(response: Any) -> WorkloadSvid:
    """The default (first) SVID of an ``X509SVIDResponse``; ``malformed`` or ``no-identity``."""
    if not response.svids:
        raise NoIdentity("the Workload API answered with no SVID for this process")
    first = response.svids[0]
    chain = tuple(svid.split_der(first.x509_svid))
    if not chain or not first.x509_svid_key:
        raise NoIdentity("the Workload API's SVID has no certificate or no key")
    federated = {
        str(domain): tuple(svid.split_der(der, limit=MAX_BUNDLE)) for domain, der in response.federated_bundles.items()
    }
    spiffe_id = svid.leaf_spiffe_id(chain[0])  # the certificate's word, not the response field's
    if spiffe_id != first.spiffe_id:
        raise Malformed(f"the Workload API's SVID names {spiffe_id}, its response field {first.spiffe_id!r}")
    return WorkloadSvid(
        spiffe_id=spiffe_id,
        chain=chain,
        not_after=svid.not_after(chain[0]),
        key=bytes(first.x509_svid_key),
        bundle=tuple(svid.split_der(first.bundle, limit=MAX_BUNDLE)),
        federated=federated,
    )


class X509Source:
    """This process's X509-SVID from the Workload API at ``socket``, kept current (module docstring)."""

    def __init__(self, socket: Path, *, first_retry: float = 1.0, max_retry: float = 30.0) -> None:
        self.socket = Path(socket)
        self.first_retry, self.max_retry = first_retry, max_retry
        self._latest: WorkloadSvid | None = None
        self._error: QhxError | None = None
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._call: Any = None
        self._thread: threading.Thread | None = None
        self.updates = 0

    def start(self) -> X509Source:
        self._thread = threading.Thread(target=self._run, name="qhx-workload-client", daemon=True)
        self._thread.start()
        return self

    def current(self, timeout: float = 30.0) -> WorkloadSvid:
        """The newest SVID; waits up to ``timeout`` for the first one, then raises why there is none."""

        def settled() -> bool:  # an SVID, or a definite no (a server that attests us to nothing)
            return self._latest is not None or isinstance(self._error, NoIdentity) or self._closed.is_set()

        with self._changed:
            self._changed.wait_for(settled, timeout)
            if self._latest is not None:
                if clock.now() >= self._latest.not_after:
                    raise Expired(f"the Workload API's last SVID for this process expired at {self._latest.not_after}")
                return self._latest
            raise self._error or Unreachable(f"no answer from the Workload API at {self.socket} within {timeout} s")

    def _run(self) -> None:
        import grpc

        from qhx_edge.issue.proto import workload_pb2, workload_pb2_grpc

        delay = self.first_retry
        while not self._closed.is_set():
            options = [("grpc.max_receive_message_length", MAX_MESSAGE)]
            try:
                with grpc.insecure_channel(f"unix:{self.socket}", options=options) as channel:
                    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]
                    self._call = stub.FetchX509SVID(
                        workload_pb2.X509SVIDRequest(), metadata=[("workload.spiffe.io", "true")]
                    )
                    for response in self._call:
                        got = parse_response(response)
                        with self._changed:
                            self._latest, self._error = got, None
                            self.updates += 1
                            self._changed.notify_all()
                        delay = self.first_retry
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                details = exc.details() if hasattr(exc, "details") else str(exc)
                if code == grpc.StatusCode.PERMISSION_DENIED:
                    error: QhxError = NoIdentity(f"the Workload API gives this process no identity: {details}")
                else:
                    error = Unreachable(f"the Workload API at {self.socket}: {details}")
                self._fail(error)
            except QhxError as exc:
                self._fail(exc)
            if self._closed.wait(delay):
                return
            delay = min(self.max_retry, delay * 2)

    def _fail(self, error: QhxError) -> None:
        with self._changed:
            self._error = error
            if isinstance(error, NoIdentity):
                self._latest = None  # withdrawn: never present it again (a broken link keeps it)
            self._changed.notify_all()

    def close(self) -> None:
        self._closed.set()
        with self._changed:
            self._changed.notify_all()
        if self._call is not None:
            self._call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=10)
