"""Hypothesis strategies for JSON-RPC requests, generated from the checked-in ``rpc_schema/*.json``.

``valid_params(schema)`` draws params the method's schema accepts; ``mutated_params(schema)`` draws
params that break it in one of the ways a confused or hostile client would: a wrong JSON type, an
unknown key, a missing required key, a huge string, a name with '/', NUL or control characters, a
number out of range.  Nothing here knows vhostd's models: only the JSON Schema.
"""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import strategies as st

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "rpc_schema"

# Methods whose valid form would end the daemon under test or hang the caller by design, or create
# a socket in whatever host directory it names (a listener's traddr); their mutated (refused) forms
# are still sent.
NEVER_VALID = {"spdk_kill_instance", "nvmf_subsystem_add_listener"}

# Bounds on valid values where the schema's own range asks the daemon to wait or allocate for a
# very long time: a bdev_get_bdevs timeout is milliseconds to wait for the bdev to appear.
VALID_OVERRIDES = {
    ("bdev_get_bdevs", "timeout"): st.integers(0, 50),
}

# Short names from a small alphabet so that create/delete/get calls hit the same objects.
NAMES = st.sampled_from(["Malloc0", "Null0", "fz0", "fz1", "vhost.0", "x"])

HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", ".", "..", "../../no/such/dir/f", "a/b", "/", "a\x00b", "\x00", "\n", "\x7f",
                     "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
                     "é" * 200, "x" * 300]),
    st.text(alphabet=st.characters(max_codepoint=0x1F), min_size=1, max_size=8),
    st.builds(lambda n: "n" * n, st.sampled_from([107, 108, 4096, 70000])),
)

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
ANY_JSON = st.recursive(JSON_SCALARS,
                        lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)


def load_schemas(directory: Path = SCHEMA_DIR) -> dict[str, dict]:
    """method name → its schema file (params, aliases, states, decode_error)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def _resolve(node: dict, root: dict) -> dict:
    ref = node.get("$ref")
    if ref is None:
        return node
    target = root
    for part in ref.lstrip("#/").split("/"):
        target = target[part]
    return target


def value_strategy(node: dict, root: dict, method: str = "", key: str = "") -> st.SearchStrategy:
    """Values the schema node accepts."""
    override = VALID_OVERRIDES.get((method, key))
    if override is not None:
        return override
    node = _resolve(node, root)
    if "anyOf" in node:
        return st.one_of(*(value_strategy(n, root, method, key) for n in node["anyOf"]))
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if "const" in node:
        return st.just(node["const"])
    kind = node.get("type")
    if kind == "integer":
        low, high = node.get("minimum"), node.get("maximum")
        return st.one_of(st.integers(low, high),
                         st.sampled_from([v for v in (low, high, 0, 1, 512, 4096) if v is not None
                                          and (low is None or v >= low) and (high is None or v <= high)]))
    if kind == "string":
        return st.one_of(NAMES, st.text(max_size=24)) if key in ("name", "ctrlr", "dev_name", "bdev_name") \
            else st.text(max_size=24)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(value_strategy(node.get("items", {}), root, method, key),
                        max_size=min(node.get("maxItems", 8), 8))
    if kind == "object":
        return object_strategy(node, root, method)
    return ANY_JSON


def object_strategy(node: dict, root: dict, method: str = "") -> st.SearchStrategy:
    props = node.get("properties", {})
    required = set(node.get("required", ()))

    @st.composite
    def build(draw):
        out = {}
        for key, sub in props.items():
            if key in required or draw(st.booleans()):
                out[key] = draw(value_strategy(sub, root, method, key))
        return out

    return build()


def valid_params(method: str, schema: dict) -> st.SearchStrategy:
    """Params (or None) that the method's schema accepts."""
    params = schema["params"]
    if params.get("type") == "null":
        return st.none()
    return object_strategy(params, params, method)


def _wrong_type(node: dict, root: dict) -> st.SearchStrategy:
    node = _resolve(node, root)
    kinds = {n.get("type") for n in node.get("anyOf", [node])}
    candidates = {
        "integer": st.one_of(st.integers(1 << 64, 1 << 80), st.integers(-(1 << 80), -(1 << 64)),
                             st.floats(allow_nan=False, allow_infinity=False)),
        "string": st.text(max_size=4),
        "boolean": st.booleans(),
        "null": st.none(),
        "array": st.lists(JSON_SCALARS, max_size=3),
        "object": st.dictionaries(st.text(max_size=4), JSON_SCALARS, max_size=3),
    }
    wrong = [s for k, s in candidates.items() if k not in kinds]
    if "integer" in kinds:
        low, high = node.get("minimum"), node.get("maximum")
        if low is not None:
            wrong.append(st.just(low - 1))
        if high is not None:
            wrong.append(st.just(high + 1))
        wrong.append(st.just(True))           # a JSON bool is not an integer
        wrong.append(st.just(1.5))
    if "enum" in node:
        wrong.append(st.text(max_size=8).filter(lambda v: v not in node["enum"]))
    return st.one_of(*wrong)


def mutated_params(method: str, schema: dict) -> st.SearchStrategy:
    """(params, surely_invalid): params that break the method's schema in one way, or that are
    merely hostile (and may still fit it)."""
    params = schema["params"]
    if params.get("type") == "null":
        return st.tuples(st.one_of(st.dictionaries(st.text(max_size=8), JSON_SCALARS, max_size=3),
                                   st.lists(JSON_SCALARS, max_size=3),
                                   JSON_SCALARS.filter(lambda v: v is not None)), st.just(True))
    props = params.get("properties", {})
    required = list(params.get("required", ()))
    base = valid_params(method, schema)
    modes = ["wrong_type", "extra_key", "missing", "hostile_text", "not_object", "anything"]
    if method in NEVER_VALID:
        # Only changes that can never turn into a valid call (this one would end the daemon).
        modes = [m for m in ("wrong_type", "extra_key", "missing", "not_object")
                 if m != "missing" or required]

    @st.composite
    def one(draw):
        """(params, surely_invalid): the second is False for changes that may still be valid
        (a hostile but well-typed name, a random object that happens to fit)."""
        out = dict(draw(base))
        how = draw(st.sampled_from(modes))
        if how == "wrong_type" and props:
            key = draw(st.sampled_from(sorted(props)))
            out[key] = draw(_wrong_type(props[key], params))
            return out, True
        if how in ("extra_key", "wrong_type"):
            out[draw(st.text(max_size=12).filter(lambda k: k not in props))] = draw(ANY_JSON)
            return out, params.get("additionalProperties", True) is False
        if how == "missing" and required:
            out.pop(draw(st.sampled_from(required)))
            return out, True
        if how == "not_object":
            return draw(st.one_of(st.lists(ANY_JSON, max_size=3),
                                  JSON_SCALARS.filter(lambda v: v is not None))), True
        if how == "hostile_text":
            text_keys = sorted(k for k, v in props.items()
                               if "string" in {n.get("type") for n in _resolve(v, params).get("anyOf", [v])})
            if text_keys:
                out[draw(st.sampled_from(text_keys))] = draw(HOSTILE_TEXT)
                return out, False
        return draw(st.dictionaries(st.sampled_from(sorted(props) or ["x"]) | st.text(max_size=6),
                                    ANY_JSON, max_size=5)), False

    return one()


def request_strategy(schemas: dict[str, dict], valid: bool) -> st.SearchStrategy:
    """(method, params, surely_invalid): schema-valid params (surely_invalid False), or mutated
    ones."""
    options = []
    for method, schema in schemas.items():
        if valid and method in NEVER_VALID:
            continue
        names = [method] + list(schema.get("aliases", ()))
        if valid:
            params = st.tuples(valid_params(method, schema), st.just(False))
        else:
            params = mutated_params(method, schema)
        options.append(st.builds(lambda name, pv: (name, *pv), st.sampled_from(names), params))
    return st.one_of(*options)
