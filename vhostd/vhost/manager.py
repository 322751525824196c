"""The vhost controllers of one daemon: create, find, delete, report.  Domain logic only: errors are
vhostd.errors types, results are domain values; the RPC layer shapes them for SPDK.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from ..dataplane import ReactorSet
from ..errors import AlreadyExists, InvalidArgument, NotFound, NotSupported
from .blk import BlkController
from .controller import Controller
from .scsi import ScsiController

log = logging.getLogger(__name__)

MAX_NAME_BYTES = 255
SOCKET_PATH_MAX = 107          # sun_path holds 108 bytes with the terminating NUL


def check_controller_name(name: str, socket_dir: str) -> None:
    """A controller name becomes a file name in the socket directory: it must stay there."""
    raw = name.encode("utf-8", "surrogateescape")
    if not name or len(raw) > MAX_NAME_BYTES:
        raise InvalidArgument("controller name must be 1 to %d bytes" % MAX_NAME_BYTES)
    if "/" in name or name in (".", "..") or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise InvalidArgument("controller name %r may not contain '/', control characters or be . or .."
                              % name)
    if len(os.fsencode(os.path.join(socket_dir, name))) > SOCKET_PATH_MAX:
        raise InvalidArgument("socket path for %r is longer than %d bytes" % (name, SOCKET_PATH_MAX))


class VhostManager:
    """Every controller of the daemon, keyed by name."""

    def __init__(self, socket_dir: str, reactors: ReactorSet, find_bdev: Callable[[str], Any],
                 socket_mode: int = 0o600, socket_group: int | None = None) -> None:
        self.socket_dir = os.path.abspath(socket_dir)
        self.reactors = reactors
        self.find_bdev = find_bdev
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.controllers: dict[str, Controller] = {}
        self._load: dict[int, int] = {}

    def _cores_for(self, cores: Iterable[int] | None) -> list[int]:
        """A controller's cores: its cpumask, or the least loaded reactor of the app mask."""
        app = set(self.reactors.cores)
        if cores is not None:
            chosen = sorted(set(cores))
            if not chosen or not set(chosen) <= app:
                raise InvalidArgument("cpumask %s is not within the application's cores %s"
                                      % (chosen, sorted(app)))
            return chosen
        core = min(sorted(app), key=lambda c: (self._load.get(c, 0), c))
        return [core]

    def _register(self, controller: Controller) -> None:
        self.controllers[controller.name] = controller
        for core in controller.cores:
            self._load[core] = self._load.get(core, 0) + 1

    def _unregister(self, controller: Controller) -> None:
        self.controllers.pop(controller.name, None)
        for core in controller.cores:
            self._load[core] -= 1

    def get(self, name: str) -> Controller:
        try:
            return self.controllers[name]
        except KeyError:
            raise NotFound("no controller %r" % name) from None

    async def create_blk(self, name: str, bdev_name: str, cores: Iterable[int] | None = None,
                         readonly: bool = False, packed_ring: bool = False,
                         transport: str | None = None) -> BlkController:
        """vhost_create_blk_controller."""
        check_controller_name(name, self.socket_dir)
        if name in self.controllers:
            raise AlreadyExists("controller %r exists" % name)
        transport = (transport or "vhost_user_blk").lower()
        if transport != "vhost_user_blk":
            raise InvalidArgument("unknown virtio-blk transport %r" % transport)
        bdev = self.find_bdev(bdev_name)
        controller = BlkController(name, self.socket_dir, self.reactors, self._cores_for(cores),
                                   bdev, readonly=readonly, transport=transport, packed_ring=packed_ring,
                                   socket_mode=self.socket_mode, socket_group=self.socket_group)
        await controller.start()
        self._register(controller)
        if hasattr(bdev, "add_user"):
            bdev.add_user(controller)
        log.info("created vhost-blk controller %s on %s (bdev %s)", name, controller.cpumask(), bdev.name)
        return controller

    async def create_scsi(self, name: str, cores: Iterable[int] | None = None,
                          delay: bool = False) -> ScsiController:
        """vhost_create_scsi_controller; with delay the socket appears at start_scsi()."""
        check_controller_name(name, self.socket_dir)
        if name in self.controllers:
            raise AlreadyExists("controller %r exists" % name)
        controller = ScsiController(name, self.socket_dir, self.reactors, self._cores_for(cores),
                                    socket_mode=self.socket_mode, socket_group=self.socket_group)
        if not delay:
            await controller.start()
        self._register(controller)
        log.info("created vhost-scsi controller %s on %s%s", name, controller.cpumask(),
                 " (socket at start)" if delay else "")
        return controller

    def get_scsi(self, name: str) -> ScsiController:
        controller = self.get(name)
        if not isinstance(controller, ScsiController):
            raise InvalidArgument("controller %s is not a scsi controller" % name)
        return controller

    async def start_scsi(self, name: str) -> None:
        """vhost_start_scsi_controller: listen (a no-op when already listening)."""
        await self.get_scsi(name).start()

    async def add_scsi_target(self, name: str, num: int, bdev_name: str) -> int:
        """vhost_scsi_controller_add_target: returns the slot used."""
        controller = self.get_scsi(name)
        try:
            bdev = self.find_bdev(bdev_name)
        except NotFound:
            raise InvalidArgument("no bdev %r" % bdev_name) from None
        return await controller.add_target(num, bdev)

    async def remove_scsi_target(self, name: str, num: int) -> None:
        """vhost_scsi_controller_remove_target: replies once the target is gone."""
        await self.get_scsi(name).remove_target(num)

    async def delete(self, name: str) -> None:
        """vhost_delete_controller: waits until no front-end is connected (as SPDK re-queues the
        request until the controller is idle), then removes it and its socket."""
        controller = self.get(name)
        while controller.busy:
            await controller.wait_idle()
            if self.controllers.get(name) is not controller:
                raise NotFound("no controller %r" % name)
        await controller.stop()
        if isinstance(controller, ScsiController):
            await controller.remove_all_targets()     # SPDK force-removes them
        self._unregister(controller)
        bdev = getattr(controller, "bdev", None)
        if bdev is not None and hasattr(bdev, "remove_user"):
            bdev.remove_user(controller)
        log.info("deleted vhost controller %s", name)

    def set_coalescing(self, name: str, delay_base_us: int, iops_threshold: int) -> None:
        """vhost_controller_set_coalescing."""
        controller = self.get(name)
        if iops_threshold < 100 or delay_base_us > 1_000_000:
            raise InvalidArgument("iops_threshold must be ≥ 100 and delay_base_us ≤ 1 s")
        controller.set_coalescing(delay_base_us, iops_threshold)

    def infos(self, name: str | None = None) -> list[dict]:
        """vhost_get_controllers entries, sorted by name."""
        if name is not None:
            return [self.get(name).info()]
        return [self.controllers[n].info() for n in sorted(self.controllers)]

    def of_kind(self, kind: str) -> list[Controller]:
        return [self.controllers[n] for n in sorted(self.controllers) if self.controllers[n].kind == kind]

    async def bdev_resized(self, bdev) -> None:
        """Every controller serving bdev announces its new size to its front-end."""
        for name in sorted(self.controllers):
            await self.controllers[name].bdev_resized(bdev)

    async def shutdown(self) -> None:
        """Stop every controller (daemon exit): connections drained, sockets removed."""
        await asyncio.gather(*(c.stop() for c in self.controllers.values()), return_exceptions=True)
        self.controllers.clear()
