"""rpc_schema/<method>.json (the JSON Schema of every method's params and result) and docs/rpc.md
(the RPC reference), generated from the registry (pydantic models and handler docstrings).
``python -m vhostd.rpc.schema`` writes them; ``--check`` exits 1 if the checked-in files differ (a
test runs it)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import TypeAdapter

from . import methods as _methods  # noqa: F401  (registers every method)
from .registry import REGISTRY, MethodSpec, State

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "rpc_schema"
RPC_DOC = Path(__file__).resolve().parents[2] / "docs" / "rpc.md"

DOC_HEADER = """# JSON-RPC reference

Generated from the method registry by `python -m vhostd.rpc.schema` (a test fails when this page
or `rpc_schema/` is stale); `rpc_schema/<method>.json` holds the full JSON Schema of each method.

vhostd speaks JSON-RPC 2.0 as SPDK does: on the Unix socket given with `-r` (default
`/var/tmp/spdk.sock`; requests and responses are JSON objects back to back, no delimiter needed),
and, with `--http HOST:PORT`, as `POST /` bodies (single or batch; HTTP Basic auth from
`--http-auth`, loopback only without it). SPDK's own client works unmodified:
`spdk-rpc -s SOCKET METHOD ...`; `vhostd-rpc` (`scripts/rpc.py`) is ours.

Errors follow SPDK: unknown method -32601 `Method not found`; a method not allowed in the current
state (STARTUP until `framework_start_init` with `--wait-for-rpc`) -32604; params that do not decode
(unknown keys, wrong types, missing required ones) get the method family's decode error listed
below; a failing operation gets -32602 with `strerror` of its errno for the bdev and vhost
families. Legacy names are aliases with the same params.

Controllers: `vhost_delete_controller` with a front-end connected replies once the front-end has
left (SPDK re-queues the request until the controller is idle); deleting a scsi controller removes
its targets. A bdev used by a scsi target is claimed: it cannot be deleted or used by a second target
until the target is removed. A bdev deleted under a blk controller is hot-removed: the guest's I/O
fails, the controller stays.

RBD (`bdev_rbd_*`, Ceph 16.2's librbd loaded at run time): params, results and codes are SPDK's.
`config_param` and `config` are objects of string values. Where SPDK answers a bare -1, vhostd
answers -1 with the reason after `Operation not permitted: ` (duplicate or unknown cluster, cluster
in use, unreadable `config_file`/`key_file`, bad `core_mask`, connect/pool/image/open failures, an
operation that did not finish within 30 s, librbd not installed). `bdev_rbd_get_clusters_info`
without clusters or with an unknown name: -2; `bdev_rbd_create` with `block_size` 0: -22, a taken
name: -17, an image already open in this process: -16 `Device or resource busy: image POOL/IMAGE is
already open as bdev NAME` (see [rbd.md](rbd.md#one-open-per-image-per-process));
`bdev_rbd_delete` of a missing or non-rbd bdev: -19; `bdev_rbd_resize` (MiB) of a missing bdev -19,
of another kind or smaller than now -22.
"""


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


def _type_text(prop: dict) -> str:
    if "anyOf" in prop:
        return " or ".join(_type_text(p) for p in prop["anyOf"] if p.get("type") != "null")
    if "enum" in prop:
        return " \\| ".join("`%s`" % v for v in prop["enum"])
    if "const" in prop:
        return "`%s`" % prop["const"]
    if prop.get("type") == "array":
        return "array of %s" % _type_text(prop.get("items", {}))
    return prop.get("type", "any")


def render_doc() -> str:
    """docs/rpc.md: one section per method, in name order."""
    blocks = [DOC_HEADER.rstrip("\n")]
    for name, spec in sorted(REGISTRY.methods.items()):
        schema = method_schema(spec)
        blocks.append("## `%s`" % name)
        if spec.description:
            blocks.append(" ".join(spec.description.split()))
        facts = ["aliases: " + ", ".join("`%s`" % a for a in spec.aliases)] if spec.aliases else []
        facts.append("states: " + ", ".join(schema["states"]))
        facts.append("decode error: %d `%s`" % spec.decode_error)
        blocks.append("; ".join(facts) + ".")
        params = schema["params"]
        props = params.get("properties", {})
        if props:
            required = set(params.get("required", []))
            rows = ["| param | type | required | default |", "|---|---|---|---|"]
            for key, prop in props.items():
                default = "" if key in required or "default" not in prop else "`%s`" % json.dumps(prop["default"])
                rows.append("| `%s` | %s | %s | %s |" % (key, _type_text(prop), "yes" if key in required else "",
                                                          default))
            blocks.append("\n".join(rows))
        else:
            blocks.append("No params.")
        if schema["result"]:
            blocks.append("Result: %s." % _type_text(schema["result"]))
    return "\n\n".join(blocks) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if rpc_schema/ is stale")
    ap.add_argument("--dir", type=Path, default=SCHEMA_DIR)
    args = ap.parse_args(argv)
    wanted = render_all()
    existing = {p.name: p.read_text() for p in args.dir.glob("*.json")} if args.dir.is_dir() else {}
    doc = render_doc()
    if args.check:
        stale = sorted(n for n in set(wanted) | set(existing) if wanted.get(n) != existing.get(n))
        if not RPC_DOC.exists() or RPC_DOC.read_text() != doc:
            stale.append(str(RPC_DOC.relative_to(RPC_DOC.parents[1])))
        if stale:
            print("rpc_schema is stale (run python -m vhostd.rpc.schema): %s" % ", ".join(stale))
            return 1
        return 0
    args.dir.mkdir(exist_ok=True)
    for name in set(existing) - set(wanted):
        (args.dir / name).unlink()
    for name, text in wanted.items():
        (args.dir / name).write_text(text)
    RPC_DOC.write_text(doc)
    print("wrote %d schemas to %s and %s" % (len(wanted), args.dir, RPC_DOC))
    return 0


if __name__ == "__main__":
    sys.exit(main())
