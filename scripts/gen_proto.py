"""Generate the Python stubs for proto/moe_serve/v1/moe.proto: the one protoc call.

Run with grpcio-tools==1.84.0 (the `dev` extra pins it): its stubs carry
GRPC_GENERATED_VERSION = '1.84.0', so they import under grpcio 1.84 and newer.

    python scripts/gen_proto.py [--out DIR]   # default: the repository root
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("moe_serve/v1/moe.proto")


def generate(out: Path) -> None:
    """Write moe_pb2.py, moe_pb2.pyi and moe_pb2_grpc.py under out/moe_serve/v1/."""
    from grpc_tools import protoc

    (out / PROTO.parent).mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(ROOT / "proto" / PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    sys.exit(main())
