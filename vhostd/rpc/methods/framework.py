"""Framework, app and thread methods: rpc_get_methods, versions, init, reactors, subsystems,
configs, kill, thread stats."""

from __future__ import annotations

import os
import signal

from ... import __version__
from .. import params as P
from ..registry import REGISTRY, RpcError, State, rpc_method

SPDK_COMPAT_VERSION = "26.09"     # the SPDK release whose RPC contract vhostd follows


@rpc_method("rpc_get_methods", result=list[str], params=P.RpcGetMethods, states=State.BOTH, aliases=("get_rpc_methods",),
            decode_error=(-32602, "Invalid parameters"))
def rpc_get_methods(app, p: P.RpcGetMethods):
    """Names of the methods (callable now with current), newest registration first."""
    names = []
    for spec in reversed(list(REGISTRY.methods.values())):
        if p.current and not (spec.states & app.state):
            continue
        names.append(spec.name)
        if p.include_aliases:
            names.extend(spec.aliases)
    return names


@rpc_method("spdk_get_version", result=dict, states=State.BOTH, aliases=("get_spdk_version",),
            decode_error=(-32602, "spdk_get_version method requires no parameters"))
def spdk_get_version(app, p):
    """The version of the SPDK RPC contract served, and vhostd's own."""
    major, minor = (int(x) for x in SPDK_COMPAT_VERSION.split("."))
    return {"version": "SPDK v%s (vhostd %s)" % (SPDK_COMPAT_VERSION, __version__),
            "fields": {"major": major, "minor": minor, "patch": 0, "suffix": "",
                       "vhostd": __version__}}


@rpc_method("framework_start_init", result=bool, states=State.STARTUP, aliases=("start_subsystem_init",),
            decode_error=(-32602, "framework_start_init method requires no parameters"))
async def framework_start_init(app, p):
    """Leave the STARTUP state: initialize the subsystems."""
    try:
        await app.start_init()
    except Exception:
        raise RpcError(-32603, "framework_initialization failed") from None
    return True


@rpc_method("framework_wait_init", result=bool, states=State.BOTH, aliases=("wait_subsystem_init",),
            decode_error=(-32602, "framework_wait_init method requires no parameters"))
async def framework_wait_init(app, p):
    """Reply once the framework is initialized."""
    await app.wait_init()
    return True


def _task_times(tid) -> tuple[int, int]:
    """(usr, sys) clock ticks of one thread of this process."""
    try:
        with open("/proc/self/task/%d/stat" % tid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]), int(fields[12])
    except (OSError, TypeError, ValueError, IndexError):
        return 0, 0


@rpc_method("framework_get_reactors", result=dict, decode_error=(-32602, "`framework_get_reactors` requires no arguments"))
def framework_get_reactors(app, p):
    """One entry per reactor: core, thread id, busy/idle ticks and the threads it runs."""
    reactors = []
    for r in app.reactors.reactors:
        stats = r.stats()
        usr, sys_ = _task_times(r.tid)
        threads = [{"name": c.name, "id": app.thread_id(c.name), "cpumask": "%x" % (1 << r.lcore),
                    "elapsed": stats["busy_ticks"] + stats["idle_ticks"]}
                   for c in app.vhost.controllers.values() if r.lcore in c.cores]
        if r.lcore == app.reactors.cores[0]:
            threads.insert(0, {"name": "app_thread", "id": 1, "cpumask": "%x" % (1 << r.lcore),
                               "elapsed": stats["busy_ticks"] + stats["idle_ticks"]})
        reactors.append({"lcore": r.lcore, "numa_id": 0, "tid": r.tid, "busy": stats["busy_ticks"],
                         "idle": stats["idle_ticks"], "in_interrupt": False, "irq": 0, "sys": sys_,
                         "usr": usr, "lw_threads": threads})
    return {"tick_rate": app.tick_rate, "pid": os.getpid(), "reactors": reactors}


@rpc_method("thread_get_stats", result=dict, decode_error=(-32602, "'thread_get_stats' requires no arguments"))
def thread_get_stats(app, p):
    """app_thread, and one thread per vhost controller (busy/idle of the reactors it runs on)."""
    by_core = {r.lcore: r.stats() for r in app.reactors.reactors}
    first = app.reactors.cores[0]
    threads = [{"name": "app_thread", "id": 1, "cpumask": "%x" % (1 << first),
                "busy": by_core[first]["busy_ticks"], "idle": by_core[first]["idle_ticks"],
                "active_pollers_count": 1, "timed_pollers_count": 0, "paused_pollers_count": 0}]
    for name in sorted(app.vhost.controllers):
        c = app.vhost.controllers[name]
        threads.append({"name": name, "id": app.thread_id(name),
                        "cpumask": c.cpumask()[2:],
                        "busy": sum(by_core[core]["busy_ticks"] for core in c.cores),
                        "idle": sum(by_core[core]["idle_ticks"] for core in c.cores),
                        "active_pollers_count": len(c.queue_stats()), "timed_pollers_count": 0,
                        "paused_pollers_count": 0})
    return {"tick_rate": app.tick_rate, "threads": threads}


@rpc_method("framework_get_subsystems", result=list[dict], aliases=("get_subsystems",),
            decode_error=(-32602, "framework_get_subsystems method requires no parameters"))
def framework_get_subsystems(app, p):
    """Subsystems in initialization order with their dependencies."""
    return [{"subsystem": s.name, "depends_on": list(s.depends_on)} for s in REGISTRY.ordered_subsystems()]


@rpc_method("framework_get_config", result=list | None, params=P.FrameworkGetConfig, aliases=("get_subsystem_config",),
            decode_error=(-32602, "Invalid arguments"))
def framework_get_config(app, p: P.FrameworkGetConfig):
    """The RPCs that recreate a subsystem's state (save_config), or null if it has none."""
    for sub in REGISTRY.subsystems:
        if sub.name == p.name:
            return sub.config_writer(app) if sub.config_writer is not None else None
    raise RpcError(-32602, "Subsystem '%s' not found" % p.name)


_SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGQUIT": signal.SIGQUIT,
            "SIGHUP": signal.SIGHUP, "SIGKILL": signal.SIGKILL, "SIGUSR1": signal.SIGUSR1}


@rpc_method("spdk_kill_instance", result=bool, params=P.SpdkKillInstance, aliases=("kill_instance",),
            decode_error=(-32602, "Invalid parameters"))
def spdk_kill_instance(app, p: P.SpdkKillInstance):
    """Send a signal to the daemon (after this reply is on its way)."""
    app.send_signal_soon(_SIGNALS[p.sig_name])
    return True


@rpc_method("bdev_set_options", result=bool, params=P.BdevSetOptions, states=State.STARTUP)
def bdev_set_options(app, p: P.BdevSetOptions):
    """Options of the bdev subsystem (kept and saved; vhostd's bdev layer has no pools to size)."""
    for key, value in p.model_dump(exclude_none=True).items():
        app.bdevs.options[key] = value
    return True


@rpc_method("bdev_wait_for_examine", result=bool, decode_error=(-32602, "bdev_wait_for_examine requires no parameters"))
def bdev_wait_for_examine(app, p):
    """Examination of new bdevs is synchronous in vhostd: always done."""
    return True


REGISTRY.subsystem("bdev", config_writer=lambda app: app.bdevs.config_entries(app.rbd.config_entries()))
