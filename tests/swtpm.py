"""Real software TPMs for tests: ``swtpm`` manufactured by ``swtpm_setup`` with a private CA.

Each :func:`running_swtpm` gets its own manufacturer CA: a ``swtpm_localca``
configuration pointing at a fresh CA directory, so ``swtpm_localca`` creates a
new root ("CN=swtpm-localca-rootca") and issuing intermediate
("CN=swtpm-localca") there on first use.  Both carry the same names in every
CA directory, with different keys: a TPM from another session's CA is an
"unknown manufacturer" whose certificate names look right.

Usage, in a test module::

    from tests.swtpm import SwTpm, running_swtpm

    @pytest.fixture(scope="module")
    def tpm_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwTpm]:
        with running_swtpm(tmp_path_factory.mktemp("tpm-a")) as t:
            yield t

or import the ready-made module-scoped fixtures :func:`swtpm_a` and
:func:`swtpm_b` (two TPMs under two different manufacturer CAs).

Where ``swtpm`` or ``swtpm_setup`` is missing the test is skipped, unless
``QHX_REQUIRE_TOOLS=1``, as in CI (then it fails).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.conftest import need, need_module

TOOLS = ("swtpm", "swtpm_setup", "swtpm_localca")
ROOT_CA = "swtpm-localca-rootca-cert.pem"  # swtpm_localca's self-signed root, created in the CA dir
ISSUER_CA = "issuercert.pem"  # the intermediate that signs EK and platform certificates
HOST = "127.0.0.1"


@dataclass(frozen=True)
class SwTpm:
    """A running swtpm."""

    tcti: str  # for TpmClient / tpm2-pytss, e.g. "swtpm:host=127.0.0.1,port=40321"
    root_ca: bytes  # DER of the manufacturer root CA
    issuer_ca: bytes  # DER of the manufacturer intermediate that issued the EK certificate
    state_dir: Path
    ca_dir: Path
    port: int  # the TPM command port; the control channel is port + 1

    @property
    def manufacturer_cas(self) -> list[bytes]:
        """What an authority configures for this manufacturer: root and issuing intermediate (DER)."""
        return [self.root_ca, self.issuer_ca]


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def require_swtpm() -> None:
    """Skip the test where swtpm is not installed, or fail when CI requires it (``QHX_REQUIRE_TOOLS=1``)."""
    need_module("tpm2_pytss", "TPM support is the extra qhx-edge[tpm] (it builds against Debian's libtss2-dev)")
    missing = missing_tools()
    if not missing:
        return
    need(False, f"swtpm tests need {', '.join(missing)} (Debian packages swtpm and swtpm-tools)")


def _pem_to_der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)


def _write_config(work: Path, ca_dir: Path) -> Path:
    """swtpm_setup.conf -> swtpm-localca.conf -> a private CA directory (the Debian defaults point at
    /var/lib/swtpm-localca, shared by every user of the machine)."""
    localca = work / "swtpm-localca.conf"
    localca.write_text(
        f"statedir = {ca_dir}\n"
        f"signingkey = {ca_dir / 'signkey.pem'}\n"
        f"issuercert = {ca_dir / ISSUER_CA}\n"
        f"certserial = {ca_dir / 'certserial'}\n"
    )
    options = work / "swtpm-localca.options"
    options.write_text("--platform-manufacturer qhx-test\n--platform-version 2.1\n--platform-model swtpm\n")
    setup = work / "swtpm_setup.conf"
    setup.write_text(
        f"create_certs_tool = {shutil.which('swtpm_localca')}\n"
        f"create_certs_tool_config = {localca}\n"
        f"create_certs_tool_options = {options}\n"
        "active_pcr_banks = sha256\n"
    )
    return setup


def manufacture(work: Path, ca_dir: Path | None = None) -> tuple[Path, Path]:
    """Run swtpm_setup: a TPM 2.0 state with RSA and ECC EKs, their certificates and a platform
    certificate, issued by the CA in ``ca_dir`` (created under ``work`` when None).  (state, ca_dir)."""
    require_swtpm()
    ca_dir = ca_dir or work / "ca"
    ca_dir.mkdir(parents=True, exist_ok=True)
    state = work / "state"
    state.mkdir(parents=True, exist_ok=True)
    log = work / "swtpm_setup.log"
    proc = subprocess.run(
        [
            "swtpm_setup",
            "--tpm2",
            "--create-ek-cert",
            "--create-platform-cert",
            "--tpmstate",
            str(state),
            "--config",
            str(_write_config(work, ca_dir)),
            "--logfile",
            str(log),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        detail = log.read_text() if log.exists() else ""
        raise RuntimeError(f"swtpm_setup failed ({proc.returncode}): {proc.stderr}{proc.stdout}\n{detail}")
    return state, ca_dir


def _free_port_pair() -> int:
    """A port P with P and P + 1 free on loopback (swtpm's command and control channels)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind((HOST, port))
                b.bind((HOST, port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free loopback port pair for swtpm")


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection((HOST, port + 1), timeout=0.5):
            return True  # the control channel accepts: swtpm is up (not touching the one-client command port)
        time.sleep(0.02)
    return False


@contextlib.contextmanager
def running_swtpm(work: Path, ca_dir: Path | None = None) -> Iterator[SwTpm]:
    """Manufacture a TPM in ``work`` and run it on loopback until the block ends.

    ``ca_dir`` shares a manufacturer CA between TPMs (by default each gets its
    own).  swtpm runs with ``not-need-init,startup-clear``: ready for commands
    without a power-on through the control channel.
    """
    state, ca_dir = manufacture(work, ca_dir)
    root_ca, issuer_ca = _pem_to_der(ca_dir / ROOT_CA), _pem_to_der(ca_dir / ISSUER_CA)
    log = work / "swtpm.log"
    for _attempt in range(5):  # another process may grab the ports between the probe and swtpm's bind
        port = _free_port_pair()
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [
                    "swtpm",
                    "socket",
                    "--tpm2",
                    "--server",
                    f"type=tcp,port={port},bindaddr={HOST}",
                    "--ctrl",
                    f"type=tcp,port={port + 1},bindaddr={HOST}",
                    "--flags",
                    "not-need-init,startup-clear",
                    "--tpmstate",
                    f"dir={state}",
                    "--log",
                    f"file={work / 'swtpm-tpm.log'}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if _wait_listening(proc, port):
            break
        _stop(proc)
    else:
        raise RuntimeError(f"swtpm did not start: {log.read_text(errors='replace')}")
    try:
        yield SwTpm(
            tcti=f"swtpm:host={HOST},port={port}",
            root_ca=root_ca,
            issuer_ca=issuer_ca,
            state_dir=state,
            ca_dir=ca_dir,
            port=port,
        )
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def swtpm_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwTpm]:
    """A running swtpm under manufacturer CA "A" (one per test module)."""
    require_swtpm()
    with running_swtpm(tmp_path_factory.mktemp("swtpm-a")) as t:
        yield t


@pytest.fixture(scope="module")
def swtpm_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwTpm]:
    """A second, independent swtpm under a different manufacturer CA "B": an unknown manufacturer to A's."""
    require_swtpm()
    with running_swtpm(tmp_path_factory.mktemp("swtpm-b")) as t:
        yield t
