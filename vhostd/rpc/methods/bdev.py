"""bdev methods: create/delete/resize/rescan of each kind, listing, iostat, QoS, virtio attach."""

from __future__ import annotations

import os

from ... import _dataplane as dp
from ...errors import InvalidArgument, NotFound, NotSupported, VhostdError
from .. import params as P
from ..registry import RpcError, rpc_method


def _no_metadata(p: P.MetadataParams) -> None:
    """vhostd has no metadata or protection information: say so rather than ignore it."""
    if p.md_size or p.md_interleave or p.dif_type or p.dif_is_head_of_md or p.dif_pi_format:
        raise NotSupported("metadata/DIF (md_size %d, dif_type %d) is not supported by vhostd"
                           % (p.md_size, p.dif_type))


@rpc_method("bdev_malloc_create", result=str, params=P.BdevMallocCreate, aliases=("construct_malloc_bdev",))
def bdev_malloc_create(app, p: P.BdevMallocCreate):
    """A RAM disk; returns its name."""
    _no_metadata(p)
    if p.numa_id != -1:
        raise NotSupported("numa_id %d: vhostd does not place memory by NUMA node" % p.numa_id)
    return app.bdevs.create_malloc(p.num_blocks, p.block_size, p.name, p.uuid, p.optimal_io_boundary,
                                   p.physical_block_size).name


@rpc_method("bdev_malloc_delete", result=bool, params=P.NameOnly, aliases=("delete_malloc_bdev",))
def bdev_malloc_delete(app, p: P.NameOnly):
    app.bdevs.delete(p.name, "malloc")
    return True


@rpc_method("bdev_null_create", result=str, params=P.BdevNullCreate, aliases=("construct_null_bdev",))
def bdev_null_create(app, p: P.BdevNullCreate):
    """A disk that discards writes and whose reads move no data (SPDK: "undefined data"); returns
    its name."""
    _no_metadata(p)
    preferred = p.model_dump(include={"preferred_write_granularity", "preferred_write_alignment",
                                      "optimal_write_size", "preferred_unmap_granularity",
                                      "preferred_unmap_alignment"})
    return app.bdevs.create_null(p.name, p.num_blocks, p.block_size, p.uuid, p.physical_block_size,
                                 **preferred).name


@rpc_method("bdev_null_delete", result=bool, params=P.NameOnly, aliases=("delete_null_bdev",))
def bdev_null_delete(app, p: P.NameOnly):
    app.bdevs.delete(p.name, "null")
    return True


@rpc_method("bdev_null_resize", result=bool, params=P.BdevResize)
async def bdev_null_resize(app, p: P.BdevResize):
    """Grow a null bdev to new_size MiB; guests see the new size (blk: config-change message to
    the front-end, scsi: UNIT ATTENTION 2A/09 on its next command)."""
    bdev = app.bdevs.find(p.name)
    if bdev.module != "null":
        raise InvalidArgument("%s is not a null bdev" % p.name)
    num_blocks = p.new_size * 1024 * 1024 // bdev.block_size
    if num_blocks < bdev.num_blocks:
        raise InvalidArgument("null bdevs cannot shrink")
    try:
        bdev.disk.resize(num_blocks)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    await app.bdev_resized(bdev)
    return True


@rpc_method("bdev_aio_create", result=str, params=P.BdevAioCreate, aliases=("construct_aio_bdev",))
def bdev_aio_create(app, p: P.BdevAioCreate):
    """A file or block device (served through io_uring); returns its name."""
    if p.nowait:
        raise NotSupported("nowait (RWF_NOWAIT) is not supported by vhostd")
    return app.bdevs.create_file("aio", p.name, p.filename, p.block_size, p.uuid, p.readonly,
                                 p.fallocate).name


@rpc_method("bdev_aio_delete", result=bool, params=P.NameOnly, aliases=("delete_aio_bdev",))
def bdev_aio_delete(app, p: P.NameOnly):
    app.bdevs.delete(p.name, "aio")
    return True


async def _rescan(app, name: str, module: str) -> bool:
    bdev = app.bdevs.find(name)
    if bdev.module != module:
        raise NotFound("%s is not a %s bdev" % (name, module))
    try:
        bdev.disk.rescan()
    except (OSError, ValueError) as exc:
        raise InvalidArgument(str(exc)) from None
    await app.bdev_resized(bdev)
    return True


@rpc_method("bdev_aio_rescan", result=bool, params=P.NameOnly)
async def bdev_aio_rescan(app, p: P.NameOnly):
    """Re-read the size of the file (it may have grown)."""
    return await _rescan(app, p.name, "aio")


def _uring_error(exc: VhostdError) -> RpcError:
    return RpcError(-32603, "Unable to create URING bdev.")


@rpc_method("bdev_uring_create", result=str, params=P.BdevUringCreate, map_error=_uring_error)
def bdev_uring_create(app, p: P.BdevUringCreate):
    """A file or block device through io_uring; returns its name."""
    return app.bdevs.create_file("uring", p.name, p.filename, p.block_size, p.uuid).name


@rpc_method("bdev_uring_delete", result=bool, params=P.NameOnly)
def bdev_uring_delete(app, p: P.NameOnly):
    app.bdevs.delete(p.name, "uring")
    return True


@rpc_method("bdev_uring_rescan", result=bool, params=P.NameOnly)
async def bdev_uring_rescan(app, p: P.NameOnly):
    return await _rescan(app, p.name, "uring")


_KIND_CREATE = {
    "malloc": (P.BdevMallocCreate, bdev_malloc_create),
    "null": (P.BdevNullCreate, bdev_null_create),
    "aio": (P.BdevAioCreate, bdev_aio_create),
    "uring": (P.BdevUringCreate, bdev_uring_create),
}


@rpc_method("create_bdev", result=str, params=P.CreateBdev)
def create_bdev(app, p: P.CreateBdev):
    """One generic create: ``type`` (malloc|null|aio|uring) and that kind's params."""
    model, handler = _KIND_CREATE[p.type]
    rest = {k: v for k, v in (p.model_extra or {}).items()}
    try:
        kind_params = model.model_validate(rest, strict=True)
    except Exception:
        raise RpcError(-32603, "spdk_json_decode_object failed") from None
    return handler(app, kind_params)


@rpc_method("bdev_get_bdevs", result=list[dict], params=P.BdevGetBdevs, aliases=("get_bdevs",))
async def bdev_get_bdevs(app, p: P.BdevGetBdevs):
    """Every bdev (or one, by name or uuid alias, waiting up to timeout ms for it to appear)."""
    if p.name is None:
        return [b.info() for b in app.bdevs]
    try:
        bdev = await app.bdevs.wait_for(p.name, p.timeout)
    except TimeoutError:
        raise RpcError(-110, "Connection timed out") from None
    return [bdev.info()]


@rpc_method("bdev_get_iostat", result=dict, params=P.BdevGetIostat, aliases=("get_bdevs_iostat",))
def bdev_get_iostat(app, p: P.BdevGetIostat):
    """I/O counters (SPDK's keys), summed over every queue using each bdev."""
    names = list(p.names or [])
    if p.name is not None:
        names.append(p.name)
    bdevs = [app.bdevs.find(n) for n in names] if names else list(app.bdevs)
    if p.per_channel and len(bdevs) != 1:
        raise InvalidArgument("per_channel needs exactly one bdev")
    entries = []
    for bdev in bdevs:
        stat = bdev.disk.iostat()
        stat.pop("num_flush_ops", None)
        entry = {"name": bdev.name, **stat}
        entry.update(bytes_copied=0, num_copy_ops=0, copy_latency_ticks=0,
                     max_copy_latency_ticks=0, min_copy_latency_ticks=0)
        entry["io_error"] = entry.pop("io_error")
        entries.append(entry)
        if p.reset_mode != "none":
            bdev.disk.reset_iostat(p.reset_mode)
    result = {"tick_rate": app.tick_rate, "ticks": dp.ticks()}
    if p.per_channel:
        result.update(name=bdevs[0].name,
                      channels=[{"thread_id": 1, **{k: v for k, v in entries[0].items() if k != "name"}}])
        return result
    result["bdevs"] = entries
    return result


@rpc_method("bdev_set_qos_limit", result=bool, params=P.BdevSetQosLimit, aliases=("set_bdev_qos_limit",))
def bdev_set_qos_limit(app, p: P.BdevSetQosLimit):
    """Rate limits, enforced by the data plane (0 = unlimited, absent = unchanged)."""
    limits = p.model_dump(exclude={"name"})
    bdev = app.bdevs.find(p.name)
    if all(v is None for v in limits.values()):
        raise RpcError(-22, "No rate limits specified")
    bdev.set_qos(limits)
    return True


def _virtio_error(exc: VhostdError) -> RpcError:
    if isinstance(exc, NotFound):
        return RpcError(-19, "No such device")
    return RpcError(-32602, os.strerror(exc.errno))


@rpc_method("bdev_virtio_attach_controller", result=list[str], params=P.BdevVirtioAttachController,
            aliases=("construct_virtio_dev",), map_error=_virtio_error)
async def bdev_virtio_attach_controller(app, p: P.BdevVirtioAttachController):
    """Consume another vhost-user target (trtype user) as bdevs; returns their names."""
    if p.trtype != "user":
        if p.vq_count is not None or p.vq_size is not None:
            raise RpcError(-22, "vq_count and vq_size apply to trtype user only")
        raise NotSupported("trtype %s is not supported by vhostd (only user)" % p.trtype)
    if p.dev_type != "blk":
        raise NotSupported("virtio-scsi controllers cannot be attached yet (only blk)")
    return [await app.attach_virtio_blk(p.name, p.traddr, p.vq_count or 1, p.vq_size or 512)]


@rpc_method("bdev_virtio_detach_controller", result=bool, params=P.NameOnly, aliases=("remove_virtio_bdev",))
async def bdev_virtio_detach_controller(app, p: P.NameOnly):
    """Detach a virtio controller and delete its bdevs."""
    await app.detach_virtio(p.name)
    return True

