"""What every benchmark shares: paired medians, figures against targets, an on-disk work folder.

The rules (bench/README.md):

* A figure is a **ratio** of the measured side to a limit measured in the same
  run, at the granularity a user pays, and the headline is the **paired
  median**: rounds alternate limit / measured, each measured round is divided
  by the limit round beside it, and the median of those ratios is reported
  (best-of figures flatter; a paired median sees the same machine load on both
  sides).  Best-of values may be printed beside it, never instead of it.
* Every figure carries its target and whether it was met: :func:`figure`.
* Stores live on a real disk: :func:`work_dir` refuses a tmpfs, where an fsync
  costs nothing and import figures would be fiction.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cryptography

# File systems whose fsync does not reach a disk (statfs f_type, linux/magic.h).
_MEMORY_FS = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}


def timed(count: int, fn: Callable[[], None]) -> float:
    """Items per second of one call of ``fn`` that handles ``count`` items."""
    gc.collect()
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def paired(rounds: int, limit: Callable[[], float], measured: Callable[[], float]) -> dict[str, float]:
    """Alternate ``limit`` and ``measured`` (each returns a rate); the paired median ratio and its parts.

    The order flips every round so neither side always runs first (caches,
    frequency scaling).
    """
    ratios, limits, values = [], [], []
    for i in range(rounds):
        if i % 2:
            v = measured()
            lim = limit()
        else:
            lim = limit()
            v = measured()
        limits.append(lim)
        values.append(v)
        ratios.append(v / lim)
    return {
        "ratio": statistics.median(ratios),
        "limit_median": statistics.median(limits),
        "measured_median": statistics.median(values),
        "ratio_best": max(values) / max(limits),
        "rounds": rounds,
    }


def figure(value: float, target: float, *, higher_is_better: bool = True, **detail: Any) -> dict[str, Any]:
    """A reported figure: its value, its target and whether it was met."""
    met = value >= target if higher_is_better else value <= target
    return {"value": round(value, 4), "target": target, "met": met, **detail}


def fs_type(path: Path) -> str | None:
    """``tmpfs``/``ramfs`` when ``path`` lies on a memory file system, else None."""
    best, kind = -1, None
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    resolved = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (resolved == mnt or resolved.startswith(mnt.rstrip("/") + "/")) and len(mnt) > best:
            best, kind = len(mnt), parts[2]
    return kind if kind in _MEMORY_FS.values() else None


@contextlib.contextmanager
def work_dir(parent: Path | None) -> Iterator[Path]:
    """A temporary folder on a real disk (in ``parent``, or the system's temp folder); refuses tmpfs."""
    parent = parent or Path(tempfile.gettempdir())
    kind = fs_type(parent)
    if kind is not None:
        raise SystemExit(f"{parent} is on {kind}: fsync costs nothing there; pass --dir on a real disk")
    with tempfile.TemporaryDirectory(prefix="qhx-bench-", dir=parent) as tmp:
        yield Path(tmp)


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


def main(run: Callable[[bool, Path], dict[str, Any]], doc: str | None) -> int:
    """The command line of every benchmark: ``--quick`` (CI) and ``--dir``; prints one JSON object."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="small samples (CI)")
    parser.add_argument("--dir", type=Path, default=None, help="where to make the temporary homes (a real disk)")
    args = parser.parse_args()
    with work_dir(args.dir) as tmp:
        out = run(args.quick, tmp)
    out.setdefault("environment", environment())
    json.dump(out, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0
