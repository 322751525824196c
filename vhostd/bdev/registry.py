"""Every bdev of the daemon, in registration order, found by name or uuid alias; creation and
deletion of each kind with SPDK's rules (nothing half-created stays behind after a failure)."""

from __future__ import annotations

import asyncio
import errno
import logging
import time
import uuid as uuidlib

from .. import _dataplane as dp
from ..errors import AlreadyExists, Busy, InvalidArgument, NotFound, VhostdError
from .base import (AioBdev, Bdev, MallocBdev, NullBdev, UringBdev, check_name, parse_uuid)

log = logging.getLogger(__name__)


class OSFailure(VhostdError):
    """An OS call failed: carries its errno (SPDK reports -errno)."""

    def __init__(self, err: int, text: str) -> None:
        super().__init__(text)
        self.errno = err


class BdevRegistry:
    def __init__(self) -> None:
        self._bdevs: dict[str, Bdev] = {}
        self._malloc_counter = 0
        self._changed = asyncio.Event()     # set (and replaced) whenever a bdev appears
        self.options = {"bdev_io_pool_size": 65535, "bdev_io_cache_size": 256,
                        "bdev_auto_examine": True, "iobuf_small_cache_size": 128,
                        "iobuf_large_cache_size": 16}

    # -- lookup -------------------------------------------------------------------------------
    def __iter__(self):
        return iter(list(self._bdevs.values()))

    def __len__(self) -> int:
        return len(self._bdevs)

    def find(self, name: str) -> Bdev:
        """By name or uuid alias; NotFound otherwise."""
        bdev = self._bdevs.get(name)
        if bdev is not None:
            return bdev
        for bdev in self._bdevs.values():
            if bdev.alias == name:
                return bdev
        raise NotFound("no bdev %r" % name)

    def check_new(self, name: str, uuid: uuidlib.UUID) -> None:
        check_name(name)
        for bdev in self._bdevs.values():
            if bdev.answers_to(name) or bdev.uuid == uuid or bdev.name == str(uuid):
                raise AlreadyExists("bdev name or uuid %s already in use" % name)

    def add(self, bdev: Bdev) -> Bdev:
        self._bdevs[bdev.name] = bdev
        self._notify()
        log.info("bdev %s created (%s, %d x %d bytes)", bdev.name, bdev.module, bdev.num_blocks,
                 bdev.block_size)
        return bdev

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, name: str, timeout_ms: int) -> Bdev:
        """bdev_get_bdevs with a timeout: the bdev once it exists; TimeoutError when it expires."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            try:
                return self.find(name)
            except NotFound:
                if timeout_ms == 0:
                    raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("bdev %r did not appear within %d ms" % (name, timeout_ms))
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    # -- creation -----------------------------------------------------------------------------
    def create_malloc(self, num_blocks: int, block_size: int, name: str | None = None,
                      uuid: str | None = None, optimal_io_boundary: int = 0,
                      physical_block_size: int = 0) -> Bdev:
        if name is None:
            name = "Malloc%d" % self._malloc_counter
            self._malloc_counter += 1
        ident = parse_uuid(uuid)
        self.check_new(name, ident)
        _check_physical(physical_block_size, block_size)
        try:
            disk = dp.Disk.malloc(block_size, num_blocks)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        except MemoryError:
            raise OSFailure(errno.ENOMEM, "cannot allocate a malloc disk") from None
        return self.add(MallocBdev(name, ident, disk, optimal_io_boundary, physical_block_size))

    def create_null(self, name: str, num_blocks: int, block_size: int, uuid: str | None = None,
                    physical_block_size: int = 0, **preferred: int) -> Bdev:
        ident = parse_uuid(uuid)
        self.check_new(name, ident)
        _check_physical(physical_block_size, block_size)
        try:
            disk = dp.Disk.null(block_size, num_blocks)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        return self.add(NullBdev(name, ident, disk, physical_block_size, **preferred))

    def create_file(self, module: str, name: str, filename: str, block_size: int = 0,
                    uuid: str | None = None, readonly: bool = False, fallocate: bool = False) -> Bdev:
        """aio or uring: a regular file or block device."""
        ident = parse_uuid(uuid)
        self.check_new(name, ident)
        try:
            disk = dp.Disk.file(filename, block_size, readonly)
        except OSError as exc:
            raise OSFailure(exc.errno or errno.EIO, "%s: %s" % (filename, exc.strerror)) from None
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if module == "aio":
            bdev = AioBdev(name, ident, disk, filename, block_size != 0, readonly, fallocate)
        else:
            bdev = UringBdev(name, ident, disk, filename)
        return self.add(bdev)

    # -- deletion -----------------------------------------------------------------------------
    def delete(self, name: str, module: str | None = None) -> None:
        """Delete a bdev (of the given module, else NotFound).  A claimed bdev is refused; a
        bdev with users (blk controllers) is hot-removed under them."""
        bdev = self.find(name)
        if module is not None and bdev.module != module:
            raise NotFound("bdev %s is not a %s bdev" % (name, module))
        if bdev.claimed_by is not None:
            raise Busy("bdev %s is claimed" % bdev.name)
        del self._bdevs[bdev.name]
        bdev.hot_remove()
        bdev.close()
        log.info("bdev %s deleted", bdev.name)

    def config_entries(self, setup: list[dict] = ()) -> list[dict]:
        """save_config's bdev entries; setup (RBD clusters) goes before the first bdev."""
        entries = [{"method": "bdev_set_options", "params": dict(self.options)}, *setup]
        for bdev in self._bdevs.values():
            entries.append(bdev.config_entry())
            qos = bdev.qos_config_entry()
            if qos is not None:
                entries.append(qos)
        entries.append({"method": "bdev_wait_for_examine"})
        return entries

    def close_all(self) -> None:
        for bdev in list(self._bdevs.values()):
            bdev.hot_remove()
            bdev.close()
        self._bdevs.clear()


def _check_physical(physical_block_size: int, block_size: int) -> None:
    if block_size == 0:
        return          # refused by the disk, with the rule for block sizes
    if physical_block_size and (physical_block_size < block_size or physical_block_size % block_size):
        raise InvalidArgument("physical_block_size %d must be a multiple of block_size %d"
                              % (physical_block_size, block_size))

