"""Shared fixtures: external vectors, the real CLI, and ready-made homes."""

from __future__ import annotations

import functools
import glob
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qhx_edge.core.suites import PrivateKey
from qhx_edge.homes import node
from qhx_edge.homes.authority import Authority
from qhx_edge.packs import pack
from qhx_edge.store import clock

ROOT = Path(__file__).resolve().parent.parent
VECTORS = Path(os.environ.get("QHX_VECTORS_DIR", ROOT.parent / "shared" / "vectors"))
PASSPHRASE = "correct horse battery staple"


def need(ok: bool, reason: str) -> None:
    """Go on if ``ok``; otherwise skip with ``reason``, or fail when CI requires every outside tool.

    ``.ci/run`` sets ``QHX_REQUIRE_TOOLS=1``: there, a test that needs faketime,
    openssl, swtpm, tpm2-pytss or the stock SPIFFE client fails instead of
    skipping, so nothing the suite needs can go missing unnoticed.
    """
    if ok:
        return
    if os.environ.get("QHX_REQUIRE_TOOLS") == "1":
        pytest.fail(f"QHX_REQUIRE_TOOLS=1 but {reason}")
    pytest.skip(reason)


def need_tool(tool: str, package: str) -> None:
    need(shutil.which(tool) is not None, f"{tool} is not installed (Debian package {package})")


def need_module(module: str, how: str) -> Any:
    """The module ``module``, imported; skip or fail (see :func:`need`) if it cannot be."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        need(False, f"{module} cannot be imported ({exc}): {how}")
        raise  # pragma: no cover - need() raised


@pytest.fixture(scope="session")
def vectors() -> Path:
    """The external test vectors (../shared/vectors); skipped where absent, unless CI requires them."""
    if not VECTORS.is_dir():
        if os.environ.get("QHX_REQUIRE_VECTORS") == "1":
            pytest.fail(f"QHX_REQUIRE_VECTORS=1 but {VECTORS} is missing")
        pytest.skip(f"external vectors not found at {VECTORS} (a clone without ../shared)")
    return VECTORS


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)


def _cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QHX_EDGE_")}
    env["QHX_EDGE_PASSPHRASE"] = PASSPHRASE
    env.update(extra or {})
    return env


def run_cli(
    *args: str | Path, env: dict[str, str] | None = None, prefix: list[str] | None = None, timeout: float = 120
) -> Result:
    """Run the real ``qhx-edge`` console entry point in a subprocess."""
    cmd = [*(prefix or []), sys.executable, "-m", "qhx_edge", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_cli_env(env), timeout=timeout, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli() -> Callable[..., Result]:
    return run_cli


@dataclass
class Homes:
    """An authority home and a node home anchored to it, in a temporary folder."""

    tmp: Path
    authority: Authority
    node_home: Path

    @property
    def a(self) -> Path:
        return self.authority.home

    def export(self, name: str = "pack.cbor") -> Path:
        from qhx_edge.packs import pack

        path = self.tmp / name
        pack.write(path, self.authority.export_pack(self.authority.export_documents(), clock.now()))
        return path


def make_homes(
    tmp: Path,
    *,
    suite: str = "hybrid",
    root_keys: int = 1,
    root_threshold: int = 1,
    domain: str = "alpha.example",
    import_first: bool = True,
) -> Homes:
    now = clock.now()
    auth = Authority.init(
        tmp / "A",
        domain,
        suite=suite,
        root_keys=root_keys,
        root_threshold=root_threshold,
        passphrase=PASSPHRASE.encode(),
        now=now,
    )
    node.init(tmp / "N", auth.anchor(), now, passphrase=PASSPHRASE.encode())
    homes = Homes(tmp, auth, tmp / "N")
    if import_first:
        n = node.Node(homes.node_home)
        try:
            n.import_pack(auth.export_pack(auth.export_documents(), now), now)
        finally:
            n.close()
    return homes


@pytest.fixture
def homes(tmp_path: Path) -> Homes:
    return make_homes(tmp_path)


@functools.cache
def _relay_key() -> PrivateKey:
    return PrivateKey.generate("classical")


def make_pack(
    docs: list[bytes],
    *,
    signer: PrivateKey | None = None,
    node_name: str = "relay",
    domain: str = "relay.example",
    sequence: int = 1,
    now: int | None = None,
) -> bytes:
    """A v1 pack of ``docs`` exported by an unknown relay (or ``signer``): for tests that craft packs."""
    return pack.build(
        docs,
        signer or _relay_key(),
        domain=domain,
        node=node_name,
        sequence=sequence,
        now=clock.now() if now is None else now,
    )


def find_libfaketime() -> str | None:
    """libfaketime.so.1 of the faketime package (QHX_LIBFAKETIME overrides)."""
    if os.environ.get("QHX_LIBFAKETIME"):
        return os.environ["QHX_LIBFAKETIME"]
    for pattern in (
        "/usr/lib/*/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/lib64/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
    ):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def faketime_prefix(spec: str) -> list[str]:
    """A command prefix that runs a program on a faked clock: ``+100d``, ``-1d`` or an absolute time.

    libfaketime is preloaded directly rather than through the ``faketime``
    wrapper: the wrapper keeps a semaphore and shared memory named after its
    pid in /dev/shm, and a stale one left by a killed run makes a later wrapper
    with a recycled pid fail at random.
    """
    lib = find_libfaketime()
    assert lib is not None, "libfaketime.so.1 not found"
    return ["env", f"LD_PRELOAD={lib}", f"FAKETIME={spec}", "FAKETIME_DONT_FAKE_MONOTONIC=1"]


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def stop_process(proc: subprocess.Popen[str]) -> int:
    """SIGTERM a long-running ``qhx-edge`` process (unless it ended), its exit code; stdout closed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


def wait_until(check: Callable[[], Any], what: str, seconds: float = 30) -> None:
    """Poll ``check`` until it is true; fail with ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def attest_node(h: Homes, home: Path) -> None:
    """The join-token attestation of ``home`` by ``h``'s authority, in process; the node imports the
    delegation with everything current."""
    from qhx_edge.homes import attestation

    with node.Node(home, PASSPHRASE.encode) as n:
        attestation.join_in_process(h.authority, n, clock.now())


# Files that take minutes, started first: with pytest-xdist's --dist loadfile a worker takes whole files
# in collection order, and one of these begun near the end would keep the suite waiting on it alone.
SLOW_FILES = ("test_scenario_live.py", "test_packs.py", "test_crash_safety.py", "test_federation.py",
              "test_bundle_endpoint.py", "test_partner_fetch.py", "test_federation_lifecycle.py")  # fmt: skip


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: the order within a file holds
