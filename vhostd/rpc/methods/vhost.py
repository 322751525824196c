"""vhost methods: controllers (blk, scsi) and their targets, coalescing, listing.  Every error is
-32602 with strerror, as SPDK's vhost_rpc.c (vhost_get_controllers: -32603)."""

from __future__ import annotations

from ... import cpumask
from ...errors import VhostdError
from .. import params as P
from ..registry import REGISTRY, RpcError, rpc_method, vhost_error

VHOST_DECODE = (-32602, "Invalid argument")


def _cores(app, text: str | None) -> list[int] | None:
    if text is None:
        return None
    return cpumask.within(cpumask.parse(text), app.reactors.cores)


@rpc_method("vhost_create_blk_controller", result=bool, params=P.VhostCreateBlkController,
            aliases=("construct_vhost_blk_controller",), decode_error=VHOST_DECODE, map_error=vhost_error)
async def vhost_create_blk_controller(app, p: P.VhostCreateBlkController):
    """A vhost-user-blk controller at SOCKET_DIR/<ctrlr> serving bdev dev_name; packed_ring
    also offers packed virtqueues (VIRTIO_F_RING_PACKED; off by default, as SPDK)."""
    await app.vhost.create_blk(p.ctrlr, p.dev_name, _cores(app, p.cpumask), p.readonly, p.packed_ring,
                               p.transport)
    return True


@rpc_method("vhost_create_scsi_controller", result=bool, params=P.VhostCreateScsiController,
            aliases=("construct_vhost_scsi_controller",), decode_error=VHOST_DECODE, map_error=vhost_error)
async def vhost_create_scsi_controller(app, p: P.VhostCreateScsiController):
    """A vhost-user-scsi controller at SOCKET_DIR/<ctrlr>; with delay the socket is created by
    vhost_start_scsi_controller (after the targets are added)."""
    await app.vhost.create_scsi(p.ctrlr, _cores(app, p.cpumask), p.delay)
    return True


@rpc_method("vhost_start_scsi_controller", result=bool, params=P.CtrlrOnly, decode_error=VHOST_DECODE,
            map_error=vhost_error)
async def vhost_start_scsi_controller(app, p: P.CtrlrOnly):
    """Start listening on a controller created with delay (true also when already started)."""
    await app.vhost.start_scsi(p.ctrlr)
    return True


@rpc_method("vhost_scsi_controller_add_target", result=int, params=P.VhostScsiControllerAddTarget,
            aliases=("add_vhost_scsi_lun",), decode_error=VHOST_DECODE, map_error=vhost_error)
async def vhost_scsi_controller_add_target(app, p: P.VhostScsiControllerAddTarget):
    """A bdev as LUN 0 of target scsi_target_num (-1: the first free slot); returns the slot."""
    return await app.vhost.add_scsi_target(p.ctrlr, p.scsi_target_num, p.bdev_name)


@rpc_method("add_lun", result=int, params=P.AddLun, decode_error=VHOST_DECODE, map_error=vhost_error)
async def add_lun(app, p: P.AddLun):
    """The design card's short form of vhost_scsi_controller_add_target."""
    return await app.vhost.add_scsi_target(p.ctrlr, p.scsi_target_num, p.bdev_name)


@rpc_method("vhost_scsi_controller_remove_target", result=bool, params=P.VhostScsiControllerRemoveTarget,
            aliases=("remove_vhost_scsi_target",), decode_error=VHOST_DECODE, map_error=vhost_error)
async def vhost_scsi_controller_remove_target(app, p: P.VhostScsiControllerRemoveTarget):
    """Remove a target; the reply comes after in-flight commands finished and the bdev is free."""
    await app.vhost.remove_scsi_target(p.ctrlr, p.scsi_target_num)
    return True


@rpc_method("vhost_delete_controller", result=bool, params=P.CtrlrOnly, aliases=("remove_vhost_controller",),
            decode_error=VHOST_DECODE, map_error=vhost_error)
async def vhost_delete_controller(app, p: P.CtrlrOnly):
    """Delete a controller; with a front-end connected, the reply waits until it has left (as
    SPDK re-queues the request until the controller is idle)."""
    await app.vhost.delete(p.ctrlr)
    return True


@rpc_method("vhost_controller_set_coalescing", result=bool, params=P.VhostControllerSetCoalescing,
            aliases=("set_vhost_controller_coalescing",), decode_error=VHOST_DECODE, map_error=vhost_error)
def vhost_controller_set_coalescing(app, p: P.VhostControllerSetCoalescing):
    """Interrupt coalescing of a controller's queues."""
    app.vhost.set_coalescing(p.ctrlr, p.delay_base_us, p.iops_threshold)
    return True


def _get_error(exc: VhostdError) -> RpcError:
    return RpcError(-32603, "No such device") if exc.errno == 19 else RpcError(-32603, "Invalid argument")


@rpc_method("vhost_get_controllers", result=list[dict], params=P.VhostGetControllers, aliases=("get_vhost_controllers",),
            decode_error=(-32603, "Invalid argument"), map_error=_get_error)
def vhost_get_controllers(app, p: P.VhostGetControllers):
    """Controllers (or one), sorted by name, with sessions and backend details."""
    return app.vhost.infos(p.name)


@rpc_method("vhost_get_queue_stats", result=dict, params=P.VhostGetQueueStats,
            decode_error=(-32603, "Invalid argument"), map_error=_get_error)
def vhost_get_queue_stats(app, p: P.VhostGetQueueStats):
    """vhostd's own: the counters of every virtqueue of the controllers (or one) since its front-end
    connected: requests, ops and bytes by kind, errors, rejected chains, notifications, kicks, the
    latency sum and log2 histogram in ticks (bucket b counts latencies below 2^(b+1) ticks)."""
    names = [p.name] if p.name is not None else sorted(app.vhost.controllers)
    controllers = []
    for name in names:
        c = app.vhost.get(name)
        controllers.append({"ctrlr": c.name, "queues": c.queue_stats()})
    return {"tick_rate": app.tick_rate, "controllers": controllers}


def _blk_config(app) -> list:
    entries = []
    for c in app.vhost.of_kind("blk"):
        if c.bdev is None:
            continue             # its bdev was hot-removed: nothing to recreate it from (as SPDK)
        entries.append({"method": "vhost_create_blk_controller", "params": {
            "ctrlr": c.name, "dev_name": c.bdev.name,
            "cpumask": c.cpumask()[2:], "readonly": c.readonly, "transport": c.transport,
            **({"packed_ring": True} if c.packed_ring else {})}})
        entries.extend(_coalescing_entry(c))
    return entries


def _coalescing_entry(c) -> list:
    if not c.delay_base_us:
        return []
    return [{"method": "vhost_controller_set_coalescing", "params": {
        "ctrlr": c.name, "delay_base_us": c.delay_base_us, "iops_threshold": c.iops_threshold}}]


def _scsi_config(app) -> list:
    entries = []
    for c in app.vhost.of_kind("scsi"):
        entries.append({"method": "vhost_create_scsi_controller", "params": {
            "ctrlr": c.name, "cpumask": c.cpumask()[2:], "delay": True}})
        for num in sorted(c.targets):
            entries.append({"method": "vhost_scsi_controller_add_target", "params": {
                "ctrlr": c.name, "scsi_target_num": num, "bdev_name": c.targets[num].bdev.name}})
        entries.append({"method": "vhost_start_scsi_controller", "params": {"ctrlr": c.name}})
        entries.extend(_coalescing_entry(c))
    return entries


REGISTRY.subsystem("scsi", depends_on=("bdev",), config_writer=None)
REGISTRY.subsystem("vhost_scsi", depends_on=("scsi",), config_writer=_scsi_config)
REGISTRY.subsystem("vhost_blk", depends_on=("bdev",), config_writer=_blk_config)
