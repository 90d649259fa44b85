"""The committed stubs in moe_runtime/dispatch/proto/ are exactly what `make proto` generates from
protos/expert.proto (same protoc, same relative-import fix): regenerate into a temp dir and compare."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos"
STUB_DIR = ROOT / "moe_runtime" / "dispatch" / "proto"


def _makefile_sed() -> tuple[str, str]:
    """The relative-import fix, read from the Makefile's `proto` target so the test and `make proto` agree."""
    text = (ROOT / "Makefile").read_text()
    m = re.search(r"sed -i 's/(.+?)/(.+?)/' moe_runtime/dispatch/proto/expert_pb2_grpc\.py", text)
    assert m, "Makefile proto target no longer has the relative-import sed"
    return m.group(1), m.group(2)


def test_committed_stubs_match_regenerated(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    rc = protoc.main([
        "grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
        str(PROTO_DIR / "expert.proto"),
    ])  # fmt: skip
    assert rc == 0, "protoc failed on protos/expert.proto"
    pattern, repl = _makefile_sed()
    grpc_file = tmp_path / "expert_pb2_grpc.py"
    fixed = re.sub(pattern.replace("\\", ""), repl.replace("\\", ""), grpc_file.read_text(), flags=re.MULTILINE)
    assert fixed != grpc_file.read_text(), "the relative-import fix did not apply"
    grpc_file.write_text(fixed)
    for name in ("expert_pb2.py", "expert_pb2_grpc.py"):
        committed = (STUB_DIR / name).read_text()
        assert (tmp_path / name).read_text() == committed, (
            f"moe_runtime/dispatch/proto/{name} is stale: run `make proto` and commit the result"
        )
    assert (STUB_DIR / "__init__.py").exists()


def test_stubs_import_and_describe_the_service():
    from moe_runtime.dispatch.proto import expert_pb2, expert_pb2_grpc

    service = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"]
    assert [m.name for m in service.methods] == ["Dispatch", "Backward", "DispatchStream", "BackwardStream", "Health",
                                               "EndStep"]
    assert service.full_name == "moe_runtime.expert.ExpertService"
    assert [f.name for f in expert_pb2.Frame.DESCRIPTOR.fields] == ["data", "pad"]
    assert hasattr(expert_pb2_grpc, "ExpertServiceStub") and hasattr(expert_pb2_grpc, "add_ExpertServiceServicer_to_server")
