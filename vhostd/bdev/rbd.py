"""Ceph RBD: registered clusters (shared librados connections) and RBD bdevs.

librbd is optional: it is loaded (``dp.rbd_load``) the first time an RBD method needs it, from
``$VHOSTD_LIBRBD`` or ``librbd.so.1``; without it the methods fail with ``RbdUnavailable`` and
everything else works.  Connect, open, resize and close block for seconds (on monitors, OSDs, the
image's lock): they run on a worker thread, never on the asyncio loop or a reactor, and each
answers within a bounded time (``OP_TIMEOUT_S``); a call that overruns it is cleaned up when it
finishes.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .. import _dataplane as dp
from .. import cpumask
from ..errors import AlreadyExists, BackendFailure, InvalidArgument, NotFound
from .base import Bdev, parse_uuid

log = logging.getLogger(__name__)

LIBRBD_ENV = "VHOSTD_LIBRBD"
DEFAULT_LIBRBD = "librbd.so.1"
# librados waits 300 s for an unreachable monitor by default; SPDK's users expect an answer.
DEFAULT_MOUNT_TIMEOUT_S = "10"
OP_TIMEOUT_S = 30.0
RELEASE_TIMEOUT_S = 10.0


class RbdUnavailable(BackendFailure):
    """librbd could not be loaded: RBD bdevs need Ceph's client libraries (Debian: librbd1)."""


class ImageInUse(BackendFailure):
    """The image is already open in this process: each open is its own exclusive-lock client, so
    a second one would take the lock from the first on every write."""

    errno = _errno.EBUSY


def load_librbd() -> None:
    soname = os.environ.get(LIBRBD_ENV) or DEFAULT_LIBRBD
    try:
        dp.rbd_load(soname)
    except dp.RbdUnavailable as exc:
        raise RbdUnavailable("RBD bdevs need librbd (Debian package librbd1): %s"
                             % exc.strerror) from None


def _check_readable(path: str, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise BackendFailure("%s %s: %s" % (what, path, exc.strerror)) from None


def connect(user_id: str | None, config: dict[str, str] | None, config_file: str | None,
            key_file: str | None, read_default_config: bool, cores: list[int] | None = None):
    """A connected dp.RadosCluster (blocking; call from a worker thread).

    Reads config_file, or Ceph's default config when read_default_config (then a missing file
    is fine), applies config's pairs, takes the key from key_file, and connects.  With cores, the
    cluster's threads are created on those CPUs (they inherit the creating thread's affinity).
    """
    load_librbd()
    if config_file is not None:
        _check_readable(config_file, "config_file")
    if key_file is not None:
        _check_readable(key_file, "key_file")
    saved = os.sched_getaffinity(0) if cores else None
    try:
        if cores:
            os.sched_setaffinity(0, cores)
        cluster = dp.RadosCluster(user_id)
    finally:
        if saved is not None:
            os.sched_setaffinity(0, saved)
    try:
        if config_file is not None:
            cluster.read_config_file(config_file)
        elif read_default_config:
            try:
                cluster.read_config_file(None)
            except OSError:
                pass        # SPDK too goes on without a default config file
        cluster.set("client_mount_timeout", DEFAULT_MOUNT_TIMEOUT_S)
        for key, value in (config or {}).items():
            cluster.set(key, value)
        if key_file is not None:
            cluster.set("keyring", key_file)
        cluster.connect()
    except OSError as exc:
        cluster.shutdown()
        raise BackendFailure(str(exc)) from None
    return cluster


@dataclass
class RbdCluster:
    """bdev_rbd_register_cluster: a named connection that RBD bdevs share."""

    name: str
    handle: Any                          # dp.RadosCluster
    user_id: str | None = None
    config_param: dict | None = None
    config_file: str | None = None
    key_file: str | None = None
    core_mask: str | None = None
    bdevs: list = field(default_factory=list)

    def settings(self) -> dict[str, Any]:
        """The options it was registered with, as SPDK lists them (only those set)."""
        out: dict[str, Any] = {}
        for key in ("user_id", "config_param", "config_file", "key_file"):
            value = getattr(self, key)
            if value is not None:
                out[key] = dict(value) if isinstance(value, dict) else value
        return out

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cluster_name": self.name, **self.settings()}
        if self.core_mask is not None:
            out["core_mask"] = self.core_mask
        return out

    def config_entry(self) -> dict:
        params: dict[str, Any] = {"name": self.name, **self.settings()}
        if self.core_mask is not None:
            params["core_mask"] = self.core_mask
        return {"method": "bdev_rbd_register_cluster", "params": params}


class RbdBdev(Bdev):
    module = "rbd"
    product_name = "Ceph Rbd Disk"
    io_types = frozenset({"read", "write", "unmap", "flush", "reset", "write_zeroes"})

    def __init__(self, name, uuid, disk, image, cluster: RbdCluster | None, private_handle,
                 user_id: str | None, config: dict | None, read_only: bool) -> None:
        super().__init__(name, uuid, disk)
        self.image = image
        self.cluster = cluster
        self.private_handle = private_handle     # the bdev's own connection (no cluster_name)
        self.user_id = user_id
        self.config = config
        self.read_only = read_only
        self.image_key: tuple[str, str, str] | None = None     # (fsid, pool, image): RbdManager's
        if read_only:
            self.io_types = self.io_types - {"write", "write_zeroes"}

    def driver_specific(self) -> dict:
        rbd: dict[str, Any] = {"pool_name": self.image.pool_name, "rbd_name": self.image.rbd_name}
        if self.cluster is not None:
            rbd.update(self.cluster.settings())
        else:
            if self.user_id is not None:
                rbd["user_id"] = self.user_id
            if self.config is not None:
                rbd["config"] = dict(self.config)
        return {"rbd": rbd}

    def config_entry(self) -> dict:
        params: dict[str, Any] = {"name": self.name, "pool_name": self.image.pool_name,
                                  "rbd_name": self.image.rbd_name, "block_size": self.block_size}
        if self.cluster is not None:
            params["cluster_name"] = self.cluster.name
        else:
            if self.user_id is not None:
                params["user_id"] = self.user_id
            if self.config is not None:
                params["config"] = dict(self.config)
        params["uuid"] = self.alias
        params["read_only"] = self.read_only
        return {"method": "bdev_rbd_create", "params": params}

    def close_backend(self) -> None:
        """Close the image and a private connection (blocking; no I/O may be in flight)."""
        self.image.close()
        if self.private_handle is not None:
            self.private_handle.shutdown()


class RbdManager:
    """The clusters registered and the RBD bdevs' lifecycle, on top of the bdev registry."""

    def __init__(self, bdevs) -> None:
        self.bdevs = bdevs
        self.clusters: dict[str, RbdCluster] = {}
        self._created = 0
        # (cluster fsid, pool, image) -> the bdev name holding (or opening) it: one open per image.
        self._open_images: dict[tuple[str, str, str], str] = {}
        self._deferred: set[asyncio.Task] = set()       # closes waiting for queues to detach
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rbd")

    async def _blocking(self, what: str, fn, *args, cleanup=None):
        """fn(*args) on a worker thread, answered within OP_TIMEOUT_S.  A call that overruns
        goes on; cleanup(result) runs on whatever it returns later."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, fn, *args)
        try:
            return await asyncio.wait_for(asyncio.shield(future), OP_TIMEOUT_S)
        except asyncio.TimeoutError:
            if cleanup is not None:
                future.add_done_callback(
                    lambda f: f.exception() is None and self._executor.submit(cleanup, f.result()))
            raise BackendFailure("%s did not finish within %.0f s" % (what, OP_TIMEOUT_S)) from None

    # -- clusters -----------------------------------------------------------------------------
    async def register_cluster(self, name: str, user_id: str | None, config_param: dict | None,
                               config_file: str | None, key_file: str | None,
                               core_mask: str | None) -> RbdCluster:
        if name in self.clusters:
            raise BackendFailure("cluster %s is already registered" % name)
        cores = None
        if core_mask is not None:
            try:
                cores = cpumask.parse(core_mask)
            except InvalidArgument as exc:
                raise BackendFailure(str(exc)) from None
            if not set(cores) <= os.sched_getaffinity(0):
                raise BackendFailure("core_mask %s names CPUs this process may not use" % core_mask)
        handle = await self._blocking("connecting to cluster %s" % name, connect, user_id,
                                      config_param, config_file, key_file, True, cores,
                                      cleanup=lambda h: h.shutdown())
        if name in self.clusters:           # registered meanwhile by another request
            await self._blocking("disconnecting", handle.shutdown)
            raise BackendFailure("cluster %s is already registered" % name)
        cluster = RbdCluster(name, handle, user_id, config_param, config_file, key_file, core_mask)
        self.clusters[name] = cluster
        log.info("rbd cluster %s registered", name)
        return cluster

    async def unregister_cluster(self, name: str) -> None:
        cluster = self.clusters.get(name)
        if cluster is None:
            raise BackendFailure("no cluster %s" % name)
        if cluster.bdevs:
            raise BackendFailure("cluster %s is used by bdev(s) %s"
                                 % (name, ", ".join(b.name for b in cluster.bdevs)))
        del self.clusters[name]
        await self._blocking("disconnecting cluster %s" % name, cluster.handle.shutdown)
        log.info("rbd cluster %s unregistered", name)

    def clusters_info(self, name: str | None):
        if name is None:
            if not self.clusters:
                raise NotFound("no cluster registered")
            return [c.info() for c in self.clusters.values()]
        cluster = self.clusters.get(name)
        if cluster is None:
            raise NotFound("no cluster %s" % name)
        return cluster.info()

    def config_entries(self) -> list[dict]:
        return [c.config_entry() for c in self.clusters.values()]

    # -- bdevs --------------------------------------------------------------------------------
    async def create(self, name: str | None, pool_name: str, rbd_name: str, block_size: int,
                     user_id: str | None = None, config: dict | None = None,
                     config_given: bool = False, cluster_name: str | None = None,
                     uuid: str | None = None, read_only: bool = False) -> RbdBdev:
        """bdev_rbd_create.  Without cluster_name the bdev gets its own connection: from config's
        pairs only when config was given (even empty), else from Ceph's default config file."""
        if block_size == 0:
            raise InvalidArgument("block_size must not be 0")
        if name is None:
            name = "Ceph%d" % self._created
        ident = parse_uuid(uuid)
        self.bdevs.check_new(name, ident)
        cluster = None
        private = None
        if cluster_name is not None:
            cluster = self.clusters.get(cluster_name)
            if cluster is None:
                raise BackendFailure("no cluster %s" % cluster_name)
            handle = cluster.handle
        else:
            private = await self._blocking(
                "connecting for bdev %s" % name, connect, user_id, config, None, None,
                not config_given, cleanup=lambda h: h.shutdown())
            handle = private
        key = (handle.fsid, pool_name, rbd_name)
        try:
            holder = self._open_images.get(key)
            if holder is not None:
                raise ImageInUse("image %s/%s is already open as bdev %s; vhostd opens an image "
                                 "once per process" % (pool_name, rbd_name, holder))
            self._open_images[key] = name
            try:
                image = await self._blocking("opening %s/%s" % (pool_name, rbd_name),
                                             _open_image, handle, pool_name, rbd_name, read_only,
                                             cleanup=lambda img: img.close())
                try:
                    disk = image.disk(block_size)
                except ValueError as exc:
                    await self._blocking("closing", image.close)
                    raise InvalidArgument(str(exc)) from None
            except BaseException:
                del self._open_images[key]
                raise
        except BaseException:
            if private is not None:
                await self._blocking("disconnecting", private.shutdown)
            raise
        bdev = RbdBdev(name, ident, disk, image, cluster, private,
                       None if cluster else user_id, None if cluster else config, read_only)
        bdev.image_key = key
        try:
            self.bdevs.check_new(name, ident)     # a bdev of that name may have appeared meanwhile
        except AlreadyExists:
            disk.close()
            await self._blocking("closing", bdev.close_backend)
            del self._open_images[key]
            raise
        self._created += 1
        if cluster is not None:
            cluster.bdevs.append(bdev)
        return self.bdevs.add(bdev)

    def find(self, name: str) -> RbdBdev:
        bdev = self.bdevs.find(name)
        if not isinstance(bdev, RbdBdev):
            raise NotFound("%s is not an rbd bdev" % name)
        return bdev

    async def delete(self, name: str) -> None:
        """bdev_rbd_delete: hot-remove under its users, then close the image once no queue
        uses the disk any more."""
        bdev = self.find(name)
        self.bdevs.delete(bdev.name, "rbd")
        await self._until_released(bdev)

    async def _until_released(self, bdev: RbdBdev) -> None:
        """Close the image once no queue uses the disk: at once if the controllers let go within
        RELEASE_TIMEOUT_S, else (a guest still connected to a controller whose bdev was removed)
        in the background when the last queue detaches."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RELEASE_TIMEOUT_S
        while bdev.disk.in_use and loop.time() < deadline:
            await asyncio.sleep(0.01)       # controllers detach their queues on their own
        if bdev.disk.in_use:
            log.warning("rbd bdev %s: still used by %d queue(s); its image is closed when they "
                        "detach", bdev.name, bdev.disk.in_use)
            task = asyncio.ensure_future(self._close_when_released(bdev))
            self._deferred.add(task)
            task.add_done_callback(self._deferred.discard)
            return
        await self._close(bdev)

    async def _close_when_released(self, bdev: RbdBdev) -> None:
        while bdev.disk.in_use:
            await asyncio.sleep(0.1)
        try:
            await self._close(bdev)
        except BackendFailure as exc:
            log.error("rbd bdev %s: %s", bdev.name, exc)

    async def _close(self, bdev: RbdBdev) -> None:
        """Close the disk and the image; the image counts as open (and its cluster as used) until
        rbd_close has returned, even when that outlasts OP_TIMEOUT_S."""
        bdev.disk.close()

        def closed(_future=None) -> None:
            self._open_images.pop(bdev.image_key, None)
            if bdev.cluster is not None and bdev in bdev.cluster.bdevs:
                bdev.cluster.bdevs.remove(bdev)

        future = asyncio.get_running_loop().run_in_executor(self._executor, bdev.close_backend)
        try:
            await asyncio.wait_for(asyncio.shield(future), OP_TIMEOUT_S)
        except asyncio.TimeoutError:
            future.add_done_callback(closed)         # on the loop, whenever rbd_close returns
            raise BackendFailure("closing %s did not finish within %.0f s"
                                 % (bdev.name, OP_TIMEOUT_S)) from None
        finally:
            if future.done():
                closed()

    async def resize(self, name: str, new_size_mib: int) -> RbdBdev:
        """bdev_rbd_resize: grow the image to new_size_mib MiB (equal is fine, smaller refused)."""
        try:
            bdev = self.find(name)
        except NotFound:
            if any(b.answers_to(name) for b in self.bdevs):
                raise InvalidArgument("%s is not an rbd bdev" % name) from None
            raise
        new_bytes = new_size_mib * 1024 * 1024
        current = bdev.num_blocks * bdev.block_size
        if new_bytes < current:
            raise InvalidArgument("rbd bdevs cannot shrink (%d < %d bytes)" % (new_bytes, current))
        try:
            await self._blocking("resizing %s" % name, bdev.image.resize, new_bytes)
        except OSError as exc:
            raise BackendFailure(str(exc)) from None
        bdev.disk.resize(new_bytes // bdev.block_size)
        return bdev

    async def close_all(self) -> None:
        """Shutdown, after the controllers: every RBD bdev's image, then the clusters (the registry
        drops the bdevs afterwards)."""
        for bdev in [b for b in self.bdevs if isinstance(b, RbdBdev)]:
            bdev.hot_remove()
            await self._until_released(bdev)
        if self._deferred:
            await asyncio.wait(list(self._deferred), timeout=OP_TIMEOUT_S)
        for cluster in list(self.clusters.values()):
            await self._blocking("disconnecting", cluster.handle.shutdown)
        self.clusters.clear()
        self._executor.shutdown(wait=False)


def _open_image(handle, pool_name: str, rbd_name: str, read_only: bool):
    try:
        return dp.RbdImage(handle, pool_name, rbd_name, read_only)
    except OSError as exc:
        raise BackendFailure(str(exc)) from None

