"""Our Workload API interface is the standard one: services, messages, fields and numbers.

``qhx_edge/issue/proto/workload.proto`` was written from the SPIFFE specification; it
is compared here with spiffe/spiffe's ``standards/workloadapi.proto`` (read from
``../shared/vectors``, never copied), with the generated module actually
imported, and with the copy the stock ``spiffe`` client bundles.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from qhx_edge.issue.proto import workload_pb2
from tests.conftest import ROOT

protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (the dev extra) compiles the .proto files")

OURS = ROOT / "qhx_edge" / "issue" / "proto" / "workload.proto"


def compile_proto(path: Path, out: Path) -> descriptor_pb2.FileDescriptorProto:
    include = resources.files("grpc_tools") / "_proto"
    target = out / "set.pb"
    rc = protoc.main(["protoc", f"-I{path.parent}", f"-I{include}", f"--descriptor_set_out={target}", str(path.name)])
    assert rc == 0, f"protoc failed on {path}"
    fds = descriptor_pb2.FileDescriptorSet.FromString(target.read_bytes())
    (fdp,) = fds.file
    return fdp


def loaded(module: Any) -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(fdp)
    return fdp


def _message(m: descriptor_pb2.DescriptorProto) -> dict[str, Any]:
    return {
        "fields": {f.name: (f.number, f.label, f.type, f.type_name) for f in m.field},
        "nested": {n.name: _message(n) for n in m.nested_type},
        "enums": {e.name: [(v.name, v.number) for v in e.value] for e in m.enum_type},
        "oneofs": [o.name for o in m.oneof_decl],
        "map_entry": m.options.map_entry,
    }


def shape(fdp: descriptor_pb2.FileDescriptorProto) -> dict[str, Any]:
    """Everything that decides the wire format and the method paths; not file names or comments."""
    return {
        "syntax": fdp.syntax,
        "package": fdp.package,  # empty: the methods are /SpiffeWorkloadAPI/<Method>
        "dependencies": list(fdp.dependency),
        "services": {
            s.name: {m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming) for m in s.method}
            for s in fdp.service
        },
        "messages": {m.name: _message(m) for m in fdp.message_type},
        "enums": {e.name: [(v.name, v.number) for v in e.value] for e in fdp.enum_type},
    }


def test_our_proto_matches_the_standard(vectors: Path, tmp_path: Path) -> None:
    standard = shape(compile_proto(vectors / "spiffe" / "workloadapi.proto", tmp_path))
    ours = shape(compile_proto(OURS, tmp_path))
    assert ours == standard
    assert shape(loaded(workload_pb2)) == standard  # and so does the module the server imports
    assert standard["package"] == ""
    assert set(standard["services"]) == {"SpiffeWorkloadAPI"}


def test_the_stock_client_speaks_a_subset_of_ours() -> None:
    """The stock client's bundled interface (it predates the WIT profile) is contained in ours unchanged."""
    stock_pb2 = pytest.importorskip("spiffe._proto.workload_pb2")
    stock, ours = shape(loaded(stock_pb2)), shape(loaded(workload_pb2))
    assert stock["package"] == ours["package"] == ""
    for name, methods in stock["services"].items():
        for method, signature in methods.items():
            assert ours["services"][name][method] == signature
    for name, message in stock["messages"].items():
        assert ours["messages"][name] == message


def test_the_generated_module_is_the_proto(tmp_path: Path) -> None:
    """workload_pb2 was regenerated after the last change to workload.proto."""
    assert shape(loaded(workload_pb2)) == shape(compile_proto(OURS, tmp_path)), (
        "run: python -m qhx_edge.issue.proto.generate"
    )


def _toolchain(files: dict[str, str]) -> tuple[str, ...]:
    return tuple(
        line
        for text in files.values()
        for line in text.splitlines()
        if line.startswith(("# Protobuf Python Version:", "GRPC_GENERATED_VERSION"))
    )


def test_the_generated_files_are_reproducible() -> None:
    from qhx_edge.issue.proto import generate

    committed = {name: (generate.HERE / name).read_text(encoding="utf-8") for name in generate.OUTPUTS}
    rendered = generate.render()
    # The dev extra pins grpcio-tools to the generating version, so a mismatch is a broken install.
    assert _toolchain(rendered) == _toolchain(committed), "pip install -e '.[dev]' (grpcio-tools is pinned)"
    assert rendered == committed, "run: python -m qhx_edge.issue.proto.generate"


def test_our_messages_live_in_a_private_pool() -> None:
    """Importing qhx-edge next to another copy of the standard interface must not clash (see generate.py)."""
    from google.protobuf import descriptor_pool

    assert workload_pb2.DESCRIPTOR.pool is not descriptor_pool.Default()
    pytest.importorskip("spiffe._proto.workload_pb2")  # the stock client's copy, in the default pool
    assert workload_pb2.X509SVIDRequest.DESCRIPTOR.full_name == "X509SVIDRequest"
