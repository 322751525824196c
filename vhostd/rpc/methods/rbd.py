"""bdev_rbd_* methods: Ceph clusters and RBD bdevs, with SPDK's params, results and error codes.

SPDK's rbd module answers most failures with a bare -1; vhostd keeps the code and says why after
strerror ("Operation not permitted: ..."), as it does for features it lacks.
"""

from __future__ import annotations

from ...errors import AlreadyExists, BackendFailure, InvalidArgument, NotFound, VhostdError
from .. import params as P
from ..registry import RpcError, errno_error, rpc_method, strerror


def _rbd_error(exc: VhostdError) -> RpcError:
    if isinstance(exc, BackendFailure):
        return RpcError(-exc.errno, "%s: %s" % (strerror(exc.errno), exc))
    return errno_error(exc)


def _clusters_error(exc: VhostdError) -> RpcError:
    if isinstance(exc, NotFound):
        return RpcError(-2, "No such file or directory")
    return _rbd_error(exc)


@rpc_method("bdev_rbd_register_cluster", result=str, params=P.BdevRbdRegisterCluster,
            map_error=_rbd_error)
async def bdev_rbd_register_cluster(app, p: P.BdevRbdRegisterCluster):
    """Connect to a Ceph cluster that RBD bdevs can share (cluster_name); returns its name."""
    cluster = await app.rbd.register_cluster(p.name, p.user_id, p.config_param, p.config_file,
                                             p.key_file, p.core_mask)
    return cluster.name


@rpc_method("bdev_rbd_unregister_cluster", result=bool, params=P.NameOnly, map_error=_rbd_error)
async def bdev_rbd_unregister_cluster(app, p: P.NameOnly):
    """Disconnect a registered cluster; refused while an RBD bdev uses it."""
    await app.rbd.unregister_cluster(p.name)
    return True


@rpc_method("bdev_rbd_get_clusters_info", result=dict | list, params=P.BdevRbdGetClustersInfo,
            map_error=_clusters_error)
def bdev_rbd_get_clusters_info(app, p: P.BdevRbdGetClustersInfo):
    """One registered cluster (by name) or all of them."""
    return app.rbd.clusters_info(p.name)


def _create_error(exc: VhostdError) -> RpcError:
    if isinstance(exc, (AlreadyExists, InvalidArgument)):
        return errno_error(exc)
    return _rbd_error(exc)


@rpc_method("bdev_rbd_create", result=str, params=P.BdevRbdCreate, map_error=_create_error)
async def bdev_rbd_create(app, p: P.BdevRbdCreate):
    """A bdev over an existing RBD image; returns its name."""
    bdev = await app.rbd.create(p.name, p.pool_name, p.rbd_name, p.block_size, p.user_id,
                                p.config, "config" in p.model_fields_set, p.cluster_name, p.uuid,
                                p.read_only)
    return bdev.name


@rpc_method("bdev_rbd_delete", result=bool, params=P.NameOnly)
async def bdev_rbd_delete(app, p: P.NameOnly):
    """Delete an RBD bdev (hot-removed under its controllers), closing its image."""
    await app.rbd.delete(p.name)
    return True


@rpc_method("bdev_rbd_resize", result=bool, params=P.BdevResize, map_error=_rbd_error)
async def bdev_rbd_resize(app, p: P.BdevResize):
    """Grow the image to new_size MiB; the bdev's block count follows and guests see it (blk:
    config-change message to the front-end, scsi: UNIT ATTENTION 2A/09 on the next command)."""
    bdev = await app.rbd.resize(p.name, p.new_size)
    await app.bdev_resized(bdev)
    return True
