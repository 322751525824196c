"""nvmf methods: the VFIOUSER transport, subsystems and their listeners (NVMe controllers for
guests over vfio-user).  Errors are -32602 with what was wrong, as SPDK's nvmf_rpc.c answers
"Invalid parameters" for most of them."""

from __future__ import annotations

from ...errors import VhostdError
from ...nvme.target import DISCOVERY_NQN
from .. import params as P
from ..registry import REGISTRY, RpcError, rpc_method


def nvmf_error(exc: VhostdError) -> RpcError:
    return RpcError(-32602, "Invalid parameters: %s" % exc)


@rpc_method("nvmf_create_transport", result=bool, params=P.NvmfCreateTransport, map_error=nvmf_error)
def nvmf_create_transport(app, p: P.NvmfCreateTransport):
    """Create the VFIOUSER transport (trtype case-insensitive, stored upper-case)."""
    options = p.model_dump(exclude={"trtype", "tgt_name"}, exclude_none=True)
    app.nvmf.create_transport(p.trtype, options)
    return True


@rpc_method("nvmf_get_transports", result=list, params=P.NvmfGetTransports, map_error=nvmf_error)
def nvmf_get_transports(app, p: P.NvmfGetTransports):
    """The transports, with SPDK's defaults where none was given."""
    out = []
    for transport in app.nvmf.transports.values():
        if p.trtype is not None and p.trtype.upper() != transport.trtype:
            continue
        o = transport.options
        out.append({
            "trtype": transport.trtype,
            "max_queue_depth": o.get("max_queue_depth", 256),
            "max_io_qpairs_per_ctrlr": o.get("max_io_qpairs_per_ctrlr", 127),
            "in_capsule_data_size": o.get("in_capsule_data_size", 0),
            "max_io_size": o.get("max_io_size", 131072),
            "max_aq_depth": o.get("max_aq_depth", 32),
            "dif_insert_or_strip": o.get("dif_insert_or_strip", False),
            "zcopy": o.get("zcopy", False),
            "abort_timeout_sec": o.get("abort_timeout_sec", 1),
            "disable_command_passthru": o.get("disable_command_passthru", False),
            "disable_mappable_bar0": o.get("disable_mappable_bar0", False),
            "disable_adaptive_irq": o.get("disable_adaptive_irq", False),
            "disable_shadow_doorbells": o.get("disable_shadow_doorbells", False),
        })
    return out


@rpc_method("nvmf_create_subsystem", result=bool, params=P.NvmfCreateSubsystem, map_error=nvmf_error)
def nvmf_create_subsystem(app, p: P.NvmfCreateSubsystem):
    """A subsystem: the serial and model its controllers report."""
    app.nvmf.create_subsystem(p.nqn, p.serial_number, p.model_number, p.allow_any_host,
                              p.max_namespaces, p.min_cntlid, p.max_cntlid)
    return True


@rpc_method("nvmf_delete_subsystem", result=bool, params=P.NvmfSubsystemOnly, map_error=nvmf_error)
async def nvmf_delete_subsystem(app, p: P.NvmfSubsystemOnly):
    """Delete a subsystem; its listeners close and a connected guest loses its controller."""
    await app.nvmf.delete_subsystem(p.nqn)
    return True


@rpc_method("nvmf_subsystem_add_listener", result=bool, params=P.NvmfSubsystemListener,
            map_error=nvmf_error)
async def nvmf_subsystem_add_listener(app, p: P.NvmfSubsystemListener):
    """Listen for QEMU's vfio-user-pci at <traddr>/cntrl (traddr an existing directory)."""
    await app.nvmf.add_listener(p.nqn, p.listen_address.trtype, p.listen_address.traddr)
    return True


@rpc_method("nvmf_subsystem_remove_listener", result=bool, params=P.NvmfSubsystemListener,
            map_error=nvmf_error)
async def nvmf_subsystem_remove_listener(app, p: P.NvmfSubsystemListener):
    """Stop listening at <traddr>/cntrl; a connected client is dropped."""
    await app.nvmf.remove_listener(p.nqn, p.listen_address.trtype, p.listen_address.traddr)
    return True


@rpc_method("nvmf_subsystem_add_ns", result=int, params=P.NvmfSubsystemAddNs, map_error=nvmf_error)
def nvmf_subsystem_add_ns(app, p: P.NvmfSubsystemAddNs):
    """Attach a bdev as a namespace; returns its NSID."""
    ns = p.namespace
    if ns.no_auto_visible:
        raise RpcError(-32602, "Invalid parameters: no_auto_visible namespaces are not supported")
    return app.nvmf.add_namespace(p.nqn, ns.bdev_name, ns.nsid, ns.uuid, ns.nguid, ns.eui64).nsid


@rpc_method("nvmf_subsystem_remove_ns", result=bool, params=P.NvmfSubsystemRemoveNs,
            map_error=nvmf_error)
def nvmf_subsystem_remove_ns(app, p: P.NvmfSubsystemRemoveNs):
    """Detach a namespace; its bdev is released."""
    app.nvmf.remove_namespace(p.nqn, p.nsid)
    return True


def _namespace(ns) -> dict:
    out = {"nsid": ns.nsid, "bdev_name": ns.bdev.name, "name": ns.bdev.name,
           "nguid": ns.nguid.hex().upper(), "uuid": str(ns.uuid)}
    if any(ns.eui64):
        out["eui64"] = ns.eui64.hex().upper()
    return out


def _address(listener) -> dict:
    return {"trtype": listener.trtype, "adrfam": "", "traddr": listener.traddr, "trsvcid": ""}


@rpc_method("nvmf_subsystem_get_listeners", result=list, params=P.NvmfSubsystemOnly,
            map_error=nvmf_error)
def nvmf_subsystem_get_listeners(app, p: P.NvmfSubsystemOnly):
    """The listeners of one subsystem (SPDK's SMA reads them)."""
    subsystem = app.nvmf.subsystem(p.nqn)
    return [{"address": _address(listener), "ana_state": "optimized"}
            for listener in subsystem.listeners]


@rpc_method("nvmf_get_subsystems", result=list, params=P.NvmfGetSubsystems, map_error=nvmf_error)
def nvmf_get_subsystems(app, p: P.NvmfGetSubsystems):
    """Every subsystem, the discovery subsystem first (or the one named)."""
    out = [{"nqn": DISCOVERY_NQN, "subtype": "Discovery", "listen_addresses": [], "allow_any_host": True,
            "hosts": []}]
    for s in app.nvmf.subsystems.values():
        out.append({
            "nqn": s.nqn, "subtype": "NVMe",
            "listen_addresses": [_address(listener) for listener in s.listeners],
            "allow_any_host": s.allow_any_host, "hosts": [],
            "serial_number": s.serial_number, "model_number": s.model_number,
            "max_namespaces": s.max_namespaces, "passthrough": False,
            "min_cntlid": s.min_cntlid, "max_cntlid": s.max_cntlid,
            "namespaces": [_namespace(ns) for _, ns in sorted(s.namespaces.items())],
        })
    if p.nqn is not None:
        out = [s for s in out if s["nqn"] == p.nqn]
        if not out:
            app.nvmf.subsystem(p.nqn)              # raises NotFound
    return out


def _config(app) -> list:
    entries = [{"method": "nvmf_create_transport", "params": {"trtype": t.trtype, **t.options}}
               for t in app.nvmf.transports.values()]
    for s in app.nvmf.subsystems.values():
        entries.append({"method": "nvmf_create_subsystem", "params": {
            "nqn": s.nqn, "serial_number": s.serial_number, "model_number": s.model_number,
            "allow_any_host": s.allow_any_host, "max_namespaces": s.max_namespaces,
            "min_cntlid": s.min_cntlid, "max_cntlid": s.max_cntlid}})
        for _, ns in sorted(s.namespaces.items()):
            namespace = {k: v for k, v in _namespace(ns).items() if k != "name"}
            entries.append({"method": "nvmf_subsystem_add_ns", "params": {
                "nqn": s.nqn, "namespace": namespace}})
        for listener in s.listeners:
            entries.append({"method": "nvmf_subsystem_add_listener", "params": {
                "nqn": s.nqn, "listen_address": {"trtype": listener.trtype, "traddr": listener.traddr}}})
    return entries


REGISTRY.subsystem("nvmf", depends_on=("bdev",), config_writer=_config)
