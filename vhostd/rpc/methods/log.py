"""Log levels: SPDK's names (ERROR, WARNING, NOTICE, INFO, DEBUG) on Python logging."""

from __future__ import annotations

from .. import params as P
from ..registry import State, rpc_method


@rpc_method("log_set_level", result=bool, params=P.LogSetLevel, states=State.BOTH, aliases=("set_log_level",))
def log_set_level(app, p: P.LogSetLevel):
    """Level of messages logged."""
    app.logs.set_level(p.level)
    return True


@rpc_method("log_get_level", result=str, states=State.BOTH, aliases=("get_log_level",),
            decode_error=(-32602, "log_get_level requires no parameters"))
def log_get_level(app, p):
    return app.logs.level


@rpc_method("log_set_print_level", result=bool, params=P.LogSetLevel, states=State.BOTH, aliases=("set_log_print_level",))
def log_set_print_level(app, p: P.LogSetLevel):
    """Level of messages printed to stderr."""
    app.logs.set_print_level(p.level)
    return True


@rpc_method("log_get_print_level", result=str, states=State.BOTH, aliases=("get_log_print_level",),
            decode_error=(-32602, "log_get_print_level requires no parameters"))
def log_get_print_level(app, p):
    return app.logs.print_level
