"""The README's first command (``bash .ci/demo``) on a machine without the TPM software stack.

``tpm2_pytss`` is made unimportable (a package of that name that raises
ImportError comes first on ``PYTHONPATH``), as on a machine where the extra
``qhx-edge[tpm]`` could not be installed: the whole demo must still run, and a
TPM command must exit 3 with the kind ``no-tpm``, naming the extra and the
system package.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _no_tss(tmp_path: Path) -> dict[str, str]:
    blocker = tmp_path / "blocker" / "tpm2_pytss"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("no TPM software stack on this machine (test)")\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("QHX_EDGE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocker.parent), os.environ.get("PYTHONPATH")]))
    return env


def test_the_demo_runs_without_tpm2_pytss(tmp_path: Path) -> None:
    env = _no_tss(tmp_path)
    probe = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-c", "import tpm2_pytss"], env=env, capture_output=True, check=False
    )
    assert probe.returncode != 0, "the blocker must make tpm2_pytss unimportable"

    demo = tmp_path / "demo"
    env |= {"QHX_SKIP_SETUP": "1", "QHX_DEMO_DIR": str(demo)}
    r = subprocess.run(
        ["bash", str(ROOT / ".ci" / "demo")], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "spiffe://alpha.example/demo/web  signed with ECDSA P-256" in out
    assert "spiffe://alpha.example/pq/ledger  signed with ML-DSA-65" in out
    assert "(exit code 1)" in out  # the replayed stick is refused

    # A TPM command on the same machine: exit 3, kind no-tpm, and how to get TPM support.
    q = ROOT / ".venv" / "bin" / "qhx-edge"
    env["QHX_EDGE_PASSPHRASE_FILE"] = str(demo / "passphrase")
    r = subprocess.run(
        [str(q), "--json", "--home", str(demo / "node2"), "node", "attest", "request", "--method", "tpm",
         "--tpm", "swtpm:host=127.0.0.1,port=9", "--authority-card", str(demo / "stick" / "alpha.card"),
         "--to", str(tmp_path / "req.pack")],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 3, r.stdout + r.stderr
    error = json.loads(r.stdout)["error"]
    assert error["kind"] == "no-tpm"
    assert "qhx-edge[tpm]" in error["message"]
    assert "libtss2-dev" in error["message"]
    assert not (tmp_path / "req.pack").exists()
