"""Regenerate the Workload API modules from ``workload.proto``.

    .venv/bin/python -m qhx_edge.issue.proto.generate          # rewrite the generated files
    .venv/bin/python -m qhx_edge.issue.proto.generate --check  # exit 1 if they are out of date

Needs ``grpcio-tools`` (the dev extra); the running package needs only
``grpcio`` and ``protobuf``.  Output is deterministic, so the generated files
are committed and a test checks they match this script's output.

One deliberate change to protoc's output: ``workload_pb2`` registers its file in
a *private* descriptor pool instead of the process-wide default one.  The
standard Workload API definition has no ``package``, so its messages are
top-level symbols (``X509SVIDRequest`` ...), and every SPIFFE client library
that bundles its own copy (the stock ``spiffe`` package does) registers the
same names in the default pool: protobuf refuses the second registration with
"duplicate symbol", which would make qhx-edge unimportable next to any such
client.  A ``package`` would avoid the clash but change the wire method names
(``/pkg.SpiffeWorkloadAPI/...``); the private pool keeps the standard names.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent.parent
PROTO = HERE / "workload.proto"
OUTPUTS = ("workload_pb2.py", "workload_pb2.pyi", "workload_pb2_grpc.py")

_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = (
    "# qhx-edge: a private pool, not the default one (see qhx_edge/issue/proto/generate.py).\n"
    "_POOL = _descriptor_pool.DescriptorPool()\n"
    "_POOL.AddSerializedFile(google_dot_protobuf_dot_struct__pb2.DESCRIPTOR.serialized_pb)\n"
    "DESCRIPTOR = _POOL.AddSerializedFile("
)


def render() -> dict[str, str]:
    """The generated files, by name, as this script would write them."""
    from grpc_tools import protoc

    include = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{ROOT}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(PROTO.relative_to(ROOT)),
            ]
        )
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        out_dir = Path(tmp) / PROTO.parent.relative_to(ROOT)
        files = {name: (out_dir / name).read_text(encoding="utf-8") for name in OUTPUTS}
    pb2 = files["workload_pb2.py"]
    if pb2.count(_DEFAULT_POOL) != 1:
        raise SystemExit("unexpected protoc output: cannot move workload_pb2 to a private descriptor pool")
    files["workload_pb2.py"] = pb2.replace(_DEFAULT_POOL, _PRIVATE_POOL)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed files are up to date")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = HERE / name
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(name)
        if not args.check:
            path.write_text(text, encoding="utf-8")
    if args.check and stale:
        print(f"out of date: {', '.join(stale)} (run python -m qhx_edge.issue.proto.generate)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
