"""Fail when the checked-in gRPC code differs from a fresh generation of ``protos/``.

Run as ``python -m service.protocheck`` (part of ``make lint``); ``make proto`` regenerates.
"""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = "protos/affinity/v1/recommender.proto"
GENERATED = ("recommender_pb2.py", "recommender_pb2.pyi", "recommender_pb2_grpc.py")


def generate(out: Path) -> None:
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--pyi_out={out}",
        str(ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [
            name
            for name in GENERATED
            if not filecmp.cmp(
                Path(tmp) / "protos/affinity/v1" / name,
                ROOT / "protos/affinity/v1" / name,
                shallow=False,
            )
        ]
    if stale:
        print(f"generated code is stale: {', '.join(stale)}; run `make proto`", file=sys.stderr)
        return 1
    print("generated gRPC code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
