"""Start-up cost of the command line: ``qhx-edge status`` against Python with its crypto and CBOR libraries.

Run ``python bench/startup.py`` (or ``python -m bench.startup``, ``--quick`` in
CI) from the repository root.  It prints one JSON object.

``status`` is what an operator or a monitoring script runs most, and on a
node it is mostly start-up: open the store, derive staleness and mode, print.
Its floor is starting Python and importing the libraries every command needs,
so the limit is the wall time of the subprocess
``python -c "import cryptography.hazmat.primitives.asymmetric.ed25519, cryptography.x509, cbor2"``
and the measured side the wall time of the subprocess
``qhx-edge --home NODE --json status`` on an initialised node home that holds
a root, bundle, policy and freshness.

* ``status_over_python_import``: the paired median (bench/README.md) of
  status time ÷ baseline time; target <= 2.0 (issue 7).  Rounds alternate the
  two commands; the rates are 1/seconds.
* ``status_median_s``, ``baseline_median_s``: the medians of each side.

Both sides run with the same environment and a private bytecode cache
(``PYTHONPYCACHEPREFIX`` in the work folder) filled by an untimed run of each,
so the figure counts imports as an installed package pays them (bytecode
written at install), not the compilation of every module at every start that
``PYTHONDONTWRITEBYTECODE`` would add to both sides.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python bench/startup.py), as CI does
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import figure, main, paired
from qhx_edge.homes import node
from qhx_edge.homes.authority import Authority
from qhx_edge.store import clock

TARGET = 2.0
BASELINE = "import cryptography.hazmat.primitives.asymmetric.ed25519, cryptography.x509, cbor2"
DOMAIN = "bench.example"
PASSPHRASE = b"bench passphrase"
QUICK_ROUNDS = 9  # odd, so the median of the ratios is one measured ratio
FULL_ROUNDS = 41


def node_home(tmp: Path) -> Path:
    """An authority and a node home anchored to it holding the authority's current documents."""
    now = clock.now()
    auth = Authority.init(
        tmp / "A", DOMAIN, suite="hybrid", root_keys=1, root_threshold=1, passphrase=PASSPHRASE, now=now
    )
    node.init(tmp / "N", auth.anchor(), now, passphrase=PASSPHRASE)
    with node.Node(tmp / "N") as n:
        n.import_pack(auth.export_pack(auth.export_documents(), now), now)
    return tmp / "N"


def child_env(tmp: Path) -> dict[str, str]:
    """The environment of both sides: no QHX_EDGE_* settings, bytecode cached in the work folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QHX_EDGE_") and k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    return env


def wall(cmd: list[str], env: dict[str, str]) -> float:
    """Seconds of one run of ``cmd`` (output discarded; a failure stops the benchmark)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr.decode(errors='replace')[-2000:]}")
    return seconds


def run(quick: bool, tmp: Path) -> dict[str, Any]:
    home = node_home(tmp)
    env = child_env(tmp)
    script = Path(sys.executable).with_name("qhx-edge")
    if not script.exists():
        raise SystemExit(f"no qhx-edge beside {sys.executable}: run this with the project's venv (pip install -e .)")
    status = [str(script), "--home", str(home), "--json", "status"]
    baseline = [sys.executable, "-c", BASELINE]
    # Untimed: fill the bytecode cache, and check that status works on this home.
    subprocess.run(baseline, env=env, check=True)
    out = subprocess.run(status, env=env, capture_output=True, text=True, check=True)
    shown = json.loads(out.stdout)
    if not shown.get("ok") or shown["domains"][DOMAIN]["mode"] != "connected":
        raise SystemExit(f"status on the benchmark's node home is not a connected node: {out.stdout}")
    p = paired(
        QUICK_ROUNDS if quick else FULL_ROUNDS,
        lambda: 1 / wall(baseline, env),
        lambda: 1 / wall(status, env),
    )
    # p["ratio"] is the paired median of status rate / baseline rate, i.e. of baseline time / status time.
    return {
        "status_over_python_import": figure(
            1 / p["ratio"],
            TARGET,
            higher_is_better=False,
            rounds=p["rounds"],
            best_of=round(1 / p["ratio_best"], 4),
        ),
        "status_median_s": round(1 / p["measured_median"], 4),
        "baseline_median_s": round(1 / p["limit_median"], 4),
        "baseline": f'python -c "{BASELINE}"',
        "measured": "qhx-edge --home NODE --json status",
    }


if __name__ == "__main__":
    sys.exit(main(run, __doc__))
