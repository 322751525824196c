#!/usr/bin/env python3
"""Completes the install of SPDK's Storage Management Agent (PyPI `spdk`): compiles the gRPC API
(tests/e2e/sma_proto/*.proto) into the installed spdk/sma/proto package.

The wheel ships spdk-sma without the modules SPDK's build generates there (sma_pb2, sma_pb2_grpc,
...), so `spdk-sma` cannot start without them. This runs grpc_tools.protoc as SPDK's proto/Makefile
does; SMA's own code is not touched. Idempotent: a stamp holds a hash of the .proto files and the
grpcio-tools version, and nothing is done while it matches.

usage: build-sma-protos.py [--check]   (--check: exit 1 if the modules are missing or stale)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parents[1] / "tests" / "e2e" / "sma_proto"
STAMP = ".vhostd-stamp"


def installed_proto_dir() -> Path:
    """spdk/sma/proto of the installed `spdk` (found without importing spdk.sma, which needs the
    modules this script makes)."""
    spec = importlib.util.find_spec("spdk")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("build-sma-protos: the `spdk` package is not installed")
    target = Path(list(spec.submodule_search_locations)[0]) / "sma" / "proto"
    if not target.is_dir():
        raise SystemExit(f"build-sma-protos: {target} missing: this `spdk` has no SMA")
    return target


def wanted_stamp(protos: list[Path]) -> str:
    digest = hashlib.sha256()
    for proto in protos:
        digest.update(proto.name.encode() + b"\0" + proto.read_bytes())
    return f"{digest.hexdigest()} grpcio-tools {importlib.metadata.version('grpcio-tools')}\n"


def main(argv: list[str]) -> int:
    protos = sorted(PROTO_DIR.glob("*.proto"))
    target = installed_proto_dir()
    stamp = wanted_stamp(protos)
    stamp_path = target / STAMP
    if stamp_path.exists() and stamp_path.read_text() == stamp:
        return 0
    if "--check" in argv:
        print(f"build-sma-protos: {target} lacks the compiled SMA API", file=sys.stderr)
        return 1
    from grpc_tools import protoc
    include = Path(importlib.util.find_spec("grpc_tools").submodule_search_locations[0]) / "_proto"
    rc = protoc.main(["protoc", f"--proto_path={PROTO_DIR}", f"--proto_path={include}",
                      f"--python_out={target}", f"--grpc_python_out={target}",
                      *map(str, protos)])
    if rc != 0:
        print(f"build-sma-protos: protoc failed ({rc})", file=sys.stderr)
        return 1
    stamp_path.write_text(stamp)
    print(f"build-sma-protos: compiled {len(protos)} protos into {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
