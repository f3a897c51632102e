"""The committed stubs are exactly what scripts/gen_proto.py generates from the proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("moe_pb2.py", "moe_pb2.pyi", "moe_pb2_grpc.py")


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "moe_serve" / "v1" / name).read_text()
        committed = (ROOT / "moe_serve" / "v1" / name).read_text()
        assert fresh == committed, f"moe_serve/v1/{name} is stale: run scripts/gen_proto.py"


def test_stubs_declare_the_oldest_supported_grpcio() -> None:
    text = (ROOT / "moe_serve" / "v1" / "moe_pb2_grpc.py").read_text()
    assert "GRPC_GENERATED_VERSION = '1.84.0'" in text


def test_services_live_in_package_moe_serve_v1() -> None:
    from moe_serve.v1 import moe_pb2

    services = moe_pb2.DESCRIPTOR.services_by_name
    assert moe_pb2.DESCRIPTOR.package == "moe_serve.v1"
    assert set(services) == {"MoEMaster", "ExpertWorker"}
    assert {m.name for m in services["MoEMaster"].methods} == {
        "Infer",
        "GetInfo",
        "AttachRegion",
        "Reload",
    }
    assert {m.name for m in services["ExpertWorker"].methods} == {
        "Forward",
        "AttachRegion",
        "GetInfo",
        "Reload",
    }
