"""rpc_schema/<method>.json: the JSON Schema of every method's params and result, generated from
the registry (pydantic models).  ``python -m vhostd.rpc.schema`` writes the files; ``--check``
exits 1 if the checked-in files differ (a test runs it)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import TypeAdapter

from . import methods as _methods  # noqa: F401  (registers every method)
from .registry import REGISTRY, MethodSpec, State

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "rpc_schema"


def method_schema(spec: MethodSpec) -> dict:
    states = [s.name for s in (State.STARTUP, State.RUNTIME) if spec.states & s]
    if spec.params is None:
        params = {"type": "null", "description": "no params (absent or null)"}
    else:
        params = spec.params.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "method": spec.name,
        "description": spec.description,
        "aliases": list(spec.aliases),
        "states": states,
        "params": params,
        "result": TypeAdapter(spec.result).json_schema() if spec.result is not None else {},
        "decode_error": {"code": spec.decode_error[0], "message": spec.decode_error[1]},
    }


def render_all() -> dict[str, str]:
    return {"%s.json" % name: json.dumps(method_schema(spec), indent=2, sort_keys=False) + "\n"
            for name, spec in sorted(REGISTRY.methods.items())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if rpc_schema/ is stale")
    ap.add_argument("--dir", type=Path, default=SCHEMA_DIR)
    args = ap.parse_args(argv)
    wanted = render_all()
    existing = {p.name: p.read_text() for p in args.dir.glob("*.json")} if args.dir.is_dir() else {}
    if args.check:
        stale = sorted(n for n in set(wanted) | set(existing) if wanted.get(n) != existing.get(n))
        if stale:
            print("rpc_schema is stale (run python -m vhostd.rpc.schema): %s" % ", ".join(stale))
            return 1
        return 0
    args.dir.mkdir(exist_ok=True)
    for name in set(existing) - set(wanted):
        (args.dir / name).unlink()
    for name, text in wanted.items():
        (args.dir / name).write_text(text)
    print("wrote %d schemas to %s" % (len(wanted), args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
