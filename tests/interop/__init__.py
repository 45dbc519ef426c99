"""Interop peers: SPIRE and the go-spiffe v2 program ``spiffeprobe``, real processes for the tests.

``tests/interop/build.sh`` builds them into a cache folder outside the repository (docs/architecture.md,
"Interop peers"); this module finds what it built, runs ``spiffeprobe`` (one JSON object per run),
and starts a SPIRE server and agent in a temporary folder: loopback TCP between them, Unix sockets
for their APIs, a sqlite datastore, disk key managers, join-token node attestation and the unix
workload attestor. Missing peers skip the tests that need them, or fail them under
``QHX_REQUIRE_TOOLS=1`` (:func:`tests.conftest.need`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, need

BUILD = ROOT / "tests" / "interop" / "build.sh"
SPIRE_TD = "beta.example"


# --- the binaries -----------------------------------------------------------------------------


@functools.cache
def _build(*, spire: bool) -> tuple[dict[str, str], str]:
    """What ``build.sh`` prints (``KEY=PATH``), and why not when it failed (empty when it did not).

    spiffeprobe is built on demand (seconds). SPIRE takes many minutes the first time, so a local
    run only uses a SPIRE already built; under ``QHX_REQUIRE_TOOLS=1`` it is built here if
    ``.ci/setup`` did not.
    """
    if shutil.which("go") is None:
        return {}, "go is not installed (the interop peers are built with it: tests/interop/build.sh)"
    env = dict(os.environ)
    if not spire:
        env["QHX_INTEROP_SKIP_SPIRE"] = "1"
    args = [str(BUILD)]
    if spire and os.environ.get("QHX_REQUIRE_TOOLS") != "1":
        # Build spiffeprobe if needed, then only look for SPIRE.
        _, why = _build(spire=False)
        if why:
            return {}, why
        args.append("--check")
    proc = subprocess.run(["bash", *args], capture_output=True, text=True, env=env, timeout=3600, check=False)
    if proc.returncode == 3 and "--check" in args:
        return {}, "SPIRE is not built yet: run tests/interop/build.sh (many minutes the first time)"
    if proc.returncode != 0:
        return {}, f"tests/interop/build.sh failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
    paths = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return paths, ""


def spiffeprobe() -> Path:
    """The built ``spiffeprobe``; skips (or fails, see :func:`need`) where it cannot be built."""
    paths, why = _build(spire=False)
    need(not why, why)
    return Path(paths["SPIFFEPROBE"])


def spire_binaries() -> tuple[Path, Path]:
    """``spire-server`` and ``spire-agent`` as built by ``build.sh``."""
    paths, why = _build(spire=True)
    need(not why, why)
    return Path(paths["SPIRE_SERVER"]), Path(paths["SPIRE_AGENT"])


@dataclass
class Probe:
    code: int
    out: dict[str, Any]
    stderr: str


def probe(*args: str | Path, timeout: float = 30) -> Probe:
    """Run ``spiffeprobe ARGS``: its exit code and the one JSON object it printed."""
    proc = subprocess.run(
        [str(spiffeprobe()), *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False
    )
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"spiffeprobe printed no JSON (exit {proc.returncode}): {proc.stderr}") from exc
    return Probe(proc.returncode, out, proc.stderr)


def probe_ok(*args: str | Path, timeout: float = 30) -> dict[str, Any]:
    r = probe(*args, timeout=timeout)
    assert r.code == 0, (r.out, r.stderr)
    return r.out


# --- processes --------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (SPIRE's agent must be told the server's port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Process:
    """A peer started in its own process group, so that stopping it stops its children too."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def stop(self, grace: float = 5) -> None:
        """SIGTERM to the group, SIGKILL to what is left of it after ``grace`` seconds.

        The leader is reaped only at the end: until then its pid, the group's id, cannot be
        reused, so the signals reach only our own processes.
        """
        if self.proc.returncode is not None:
            return  # already reaped (it exited by itself): its group id may belong to someone else now
        pid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                break  # exited, not reaped
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # whatever of the group is left
        self.proc.wait()


def start(name: str, cmd: list[str | Path], log: Path) -> Process:
    with log.open("wb") as out:
        argv = [str(c) for c in cmd]
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Process(name, proc, log)


def wait_until(what: str, ok: Any, *, timeout: float, proc: Process | None = None, step: float = 0.2) -> Any:
    """Poll ``ok()`` until it returns something true; fail with ``what`` (and the log) at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = ok()
        if result:
            return result
        if proc is not None and not proc.alive():
            raise AssertionError(f"{proc.name} exited ({proc.proc.returncode}) before {what}:\n{proc.log_text()}")
        if time.monotonic() > deadline:
            log = proc.log_text() if proc is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{log}")
        time.sleep(step)


# --- SPIRE ------------------------------------------------------------------------------------


def _hcl(value: str | Path) -> str:
    return json.dumps(str(value))  # an HCL string literal (HCL strings use JSON's escapes)


@dataclass
class Spire:
    """A SPIRE server and agent for trust domain ``beta.example``, in ``root`` (a short temp folder).

    With ``bundle_profile`` the server also runs its SPIFFE bundle endpoint on 127.0.0.1
    (SPIFFE Federation §5): ``https_spiffe`` (served with the server's own X.509-SVID, ID
    :attr:`server_id`) or ``https_web`` (served with ``web_cert``, a certificate and key PEM file).
    ``federation_hcl`` is added to the server's ``federation`` block (``federates_with ...``).
    """

    root: Path
    server_bin: Path
    agent_bin: Path
    trust_domain: str = SPIRE_TD
    port: int = 0
    running: list[Process] = field(default_factory=list)
    agent_id: str = ""
    bundle_profile: str | None = None
    web_cert: tuple[Path, Path] | None = None
    bundle_port: int = 0
    federation_hcl: str = ""

    @property
    def server_id(self) -> str:
        return f"spiffe://{self.trust_domain}/spire/server"

    @property
    def bundle_url(self) -> str:
        return f"https://127.0.0.1:{self.bundle_port}"

    @property
    def server_socket(self) -> Path:
        return self.root / "server" / "api.sock"

    @property
    def workload_socket(self) -> Path:
        return self.root / "agent" / "public" / "api.sock"

    def server(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``spire-server ARGS -socketPath <ours>``."""
        proc = subprocess.run(
            [str(self.server_bin), *args, "-socketPath", str(self.server_socket)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check:
            assert proc.returncode == 0, f"spire-server {' '.join(args)}: {proc.stdout}{proc.stderr}"
        return proc

    def _write_server_conf(self) -> Path:
        data = self.root / "server" / "data"
        data.mkdir(parents=True)
        conf = self.root / "server" / "server.conf"
        conf.write_text(
            f"""server {{
  bind_address = "127.0.0.1"
  bind_port = "{self.port}"
  socket_path = {_hcl(self.server_socket)}
  trust_domain = "{self.trust_domain}"
  data_dir = {_hcl(data)}
  log_level = "WARN"
  ca_ttl = "24h"
  default_x509_svid_ttl = "1h"
  default_jwt_svid_ttl = "5m"
  experimental {{
    # A new entry reaches agents after the next reload of the server's entry cache (5 s by default).
    cache_reload_interval = "500ms"
  }}
{self._federation_hcl()}}}
plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "sqlite3"
      connection_string = {_hcl(data / "datastore.sqlite3")}
    }}
  }}
  KeyManager "disk" {{
    plugin_data {{
      keys_path = {_hcl(data / "keys.json")}
    }}
  }}
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
}}
"""
        )
        return conf

    def _federation_hcl(self) -> str:
        if self.bundle_profile is None and not self.federation_hcl:
            return ""
        endpoint = ""
        if self.bundle_profile == "https_spiffe":
            profile = 'profile "https_spiffe" {}'
        elif self.bundle_profile == "https_web":
            assert self.web_cert is not None, "https_web needs web_cert"
            cert, key = self.web_cert
            profile = f"""profile "https_web" {{
        serving_cert_file {{
          cert_file_path = {_hcl(cert)}
          key_file_path = {_hcl(key)}
          file_sync_interval = "1h"  # required: SPIRE 1.13 has no default for it
        }}
      }}"""
        else:
            assert self.bundle_profile is None, f"unknown bundle endpoint profile {self.bundle_profile}"
        if self.bundle_profile is not None:
            self.bundle_port = free_port()
            endpoint = f"""  bundle_endpoint {{
      address = "127.0.0.1"
      port = {self.bundle_port}
      refresh_hint = "1m"
      {profile}
    }}
"""
        return f"""  federation {{
  {endpoint}{self.federation_hcl}
  }}
"""

    def _write_agent_conf(self, token: str) -> Path:
        data = self.root / "agent" / "data"
        data.mkdir(parents=True)
        self.workload_socket.parent.mkdir(parents=True)
        conf = self.root / "agent" / "agent.conf"
        conf.write_text(
            f"""agent {{
  data_dir = {_hcl(data)}
  log_level = "WARN"
  server_address = "127.0.0.1"
  server_port = "{self.port}"
  socket_path = {_hcl(self.workload_socket)}
  trust_domain = "{self.trust_domain}"
  insecure_bootstrap = true
  join_token = "{token}"
  experimental {{
    sync_interval = "1s"  # how often the agent asks the server for its entries (5 s by default)
  }}
}}
plugins {{
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "disk" {{
    plugin_data {{
      directory = {_hcl(data)}
    }}
  }}
  WorkloadAttestor "unix" {{
    plugin_data {{}}
  }}
}}
"""
        )
        return conf

    def start_server(self) -> None:
        self.port = free_port()
        conf = self._write_server_conf()
        proc = start("spire-server", [self.server_bin, "run", "-config", conf], self.root / "server.log")
        self.running.append(proc)

        def healthy() -> bool:
            return self.server_socket.exists() and self.server("healthcheck", check=False).returncode == 0

        wait_until("spire-server healthcheck", healthy, timeout=60, proc=proc)
        if self.bundle_port:

            def listening() -> bool:
                with socket.socket() as sock:
                    return sock.connect_ex(("127.0.0.1", self.bundle_port)) == 0

            wait_until("the SPIRE bundle endpoint", listening, timeout=30, proc=proc)

    def join_token(self) -> str:
        out = self.server("token", "generate", "-ttl", "600", "-output", "json").stdout
        token = json.loads(out)["value"]
        assert isinstance(token, str)
        assert token
        return token

    def start_agent(self, token: str) -> None:
        """Attest an agent with ``token`` (SPIRE's join_token node attestor) and wait until it is healthy."""
        self.agent_id = f"spiffe://{self.trust_domain}/spire/agent/join_token/{token}"
        conf = self._write_agent_conf(token)
        proc = start("spire-agent", [self.agent_bin, "run", "-config", conf], self.root / "agent.log")
        self.running.append(proc)

        def healthy() -> bool:
            if not self.workload_socket.exists():
                return False
            check = [str(self.agent_bin), "healthcheck", "-socketPath", str(self.workload_socket)]
            return subprocess.run(check, capture_output=True, timeout=30, check=False).returncode == 0

        wait_until("spire-agent healthcheck", healthy, timeout=60, proc=proc)

    def register(self, spiffe_id: str, *selectors: str, parent: str | None = None) -> None:
        """A registration entry: ``spiffe_id`` for workloads with ``selectors`` under the agent."""
        args = ["entry", "create", "-parentID", parent or self.agent_id, "-spiffeID", spiffe_id]
        for sel in selectors:
            args += ["-selector", sel]
        self.server(*args)

    def stop(self) -> None:
        for proc in reversed(self.running):
            proc.stop()
        self.running.clear()


@contextlib.contextmanager
def spire(entries: Sequence[tuple[str, Sequence[str]]] = (), *, agent: bool = True, **server: Any) -> Iterator[Spire]:
    """A SPIRE server and agent (see :class:`Spire`; ``server`` are its options), stopped and
    their folder removed afterwards.

    The agent is attested with a join token issued before it starts, so its SPIFFE ID is known
    beforehand and ``entries`` (SPIFFE ID, selectors), registered under it first, are in its first
    sync with the server. ``agent=False``: the server alone.
    """
    server_bin, agent_bin = spire_binaries()
    root = Path(tempfile.mkdtemp(prefix="qhx-spire-"))  # short: Unix socket paths have 107 bytes
    s = Spire(root, server_bin, agent_bin, **server)
    try:
        s.start_server()
        if not agent:
            yield s
            return
        # The agent id is known before the agent runs, so an entry made now is in its first sync.
        token = s.join_token()
        s.agent_id = f"spiffe://{s.trust_domain}/spire/agent/join_token/{token}"
        for spiffe_id, selectors in entries:
            s.register(spiffe_id, *selectors)
        s.start_agent(token)
        yield s
    finally:
        s.stop()
        shutil.rmtree(root, ignore_errors=True)
