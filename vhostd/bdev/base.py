"""Block devices as the control plane sees them: name, uuid (also an alias), geometry, supported I/O
types, claims and users, QoS limits, SPDK's reporting shape.  The per-I/O work is the data plane's
(``Disk`` in ext/bdev.pxi); a Bdev owns one Disk.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from typing import Any, ClassVar

from .. import _dataplane as dp
from ..errors import Busy, InvalidArgument

log = logging.getLogger(__name__)

MAX_NAME_BYTES = 255
IO_TYPES = ("read", "write", "unmap", "flush", "reset", "nvme_admin", "nvme_io", "nvme_io_md",
            "write_zeroes", "zcopy", "get_zone_info", "zone_management", "zone_append", "compare",
            "compare_and_write", "abort", "seek_hole", "seek_data", "copy", "nvme_iov_md",
            "nvme_nssr", "write_uncorrectable")
QOS_KEYS = ("rw_ios_per_sec", "rw_mbytes_per_sec", "r_mbytes_per_sec", "w_mbytes_per_sec")


def check_name(name: str) -> None:
    """Bdev names end up in configs, metrics labels and logs: printable, no '/', ≤ 255 bytes."""
    raw = name.encode("utf-8", "surrogateescape")
    if not name or len(raw) > MAX_NAME_BYTES:
        raise InvalidArgument("bdev name must be 1 to %d bytes" % MAX_NAME_BYTES)
    if "/" in name or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise InvalidArgument("bdev name %r contains '/' or control characters" % name)


def parse_uuid(text: str | None) -> uuidlib.UUID:
    if text is None:
        return uuidlib.uuid4()
    try:
        return uuidlib.UUID(text)
    except ValueError:
        raise InvalidArgument("%r is not a UUID" % text) from None


class Bdev:
    """One block device.  Kinds set ``module`` (the SPDK module name used by delete/rescan
    RPCs), ``product_name`` and the supported I/O types, and write their own config entry."""

    module: ClassVar[str] = ""
    product_name: ClassVar[str] = ""
    io_types: ClassVar[frozenset[str]] = frozenset({"read", "write", "write_zeroes", "flush", "reset"})

    def __init__(self, name: str, uuid: uuidlib.UUID, disk: dp.Disk) -> None:
        self.name = name
        self.uuid = uuid
        self.disk = disk
        self.claimed_by: Any = None           # exclusive claim (a SCSI target)
        self.users: list[Any] = []            # openers that do not claim (blk controllers)
        self.qos = {key: 0 for key in QOS_KEYS}

    # -- identity -----------------------------------------------------------------------------
    @property
    def alias(self) -> str:
        return str(self.uuid)

    def answers_to(self, name: str) -> bool:
        return name == self.name or name == self.alias

    @property
    def block_size(self) -> int:
        return self.disk.block_size

    @property
    def num_blocks(self) -> int:
        return self.disk.num_blocks

    # -- claims and users ---------------------------------------------------------------------
    def claim(self, holder: Any) -> None:
        """Exclusive use (SPDK's exclusive_write claim): nobody else may claim or delete it."""
        if self.claimed_by is not None:
            raise Busy("bdev %s is already claimed" % self.name)
        self.claimed_by = holder

    def release(self, holder: Any) -> None:
        if self.claimed_by is holder:
            self.claimed_by = None

    def add_user(self, user: Any) -> None:
        self.users.append(user)

    def remove_user(self, user: Any) -> None:
        if user in self.users:
            self.users.remove(user)

    def hot_remove(self) -> None:
        """The bdev is being deleted: its users see I/O fail from now on and are told."""
        self.disk.remove()
        for user in list(self.users):
            notify = getattr(user, "bdev_removed", None)
            if notify is not None:
                notify()
        self.users.clear()

    def close(self) -> None:
        """Release the disk unless the data plane still holds channels on it (then the blk
        controller serving it closes it when its last queue detaches)."""
        if self.disk.in_use == 0:
            self.disk.close()

    # -- QoS ----------------------------------------------------------------------------------
    def set_qos(self, limits: dict[str, int | None]) -> None:
        """Change the given limits (None: unchanged; 0: unlimited).  IOPS round up to 1000s."""
        for key, value in limits.items():
            if value is None:
                continue
            if key == "rw_ios_per_sec" and value % 1000:
                value = (value // 1000 + 1) * 1000
            self.qos[key] = value
        self.disk.set_qos(**self.qos)

    # -- SPDK shapes --------------------------------------------------------------------------
    def driver_specific(self) -> dict:
        return {}

    def extra_info(self) -> dict:
        """Kind-specific top-level keys of bdev_get_bdevs."""
        return {"preferred_write_alignment": 0, "preferred_write_granularity": 0,
                "optimal_write_size": 0, "preferred_unmap_alignment": 0,
                "preferred_unmap_granularity": 0}

    def info(self) -> dict:
        """This bdev as bdev_get_bdevs reports it."""
        result: dict[str, Any] = {
            "name": self.name,
            "aliases": [self.alias],
            "product_name": self.product_name,
            "block_size": self.block_size,
            "num_blocks": self.num_blocks,
        }
        result.update(self.extra_info())
        result["uuid"] = self.alias
        result["numa_id"] = -1
        result["assigned_rate_limits"] = dict(self.qos)
        result["claimed"] = self.claimed_by is not None
        if self.claimed_by is not None:
            result["claim_type"] = "exclusive_write"
        result["zoned"] = False
        result["supported_io_types"] = {t: t in self.io_types for t in IO_TYPES}
        result["driver_specific"] = self.driver_specific()
        return result

    def config_entry(self) -> dict:
        """The RPC that recreates this bdev (save_config)."""
        raise NotImplementedError

    def qos_config_entry(self) -> dict | None:
        limits = {k: v for k, v in self.qos.items() if v}
        if not limits:
            return None
        return {"method": "bdev_set_qos_limit", "params": {"name": self.name, **limits}}


class MallocBdev(Bdev):
    module = "malloc"
    product_name = "Malloc disk"
    io_types = frozenset({"read", "write", "unmap", "flush", "reset", "write_zeroes", "zcopy",
                          "compare", "abort", "copy"})

    def __init__(self, name, uuid, disk, optimal_io_boundary: int = 0, physical_block_size: int = 0):
        super().__init__(name, uuid, disk)
        self.optimal_io_boundary = optimal_io_boundary
        self.physical_block_size = physical_block_size or disk.block_size

    def config_entry(self) -> dict:
        return {"method": "bdev_malloc_create", "params": {
            "name": self.name, "num_blocks": self.num_blocks, "block_size": self.block_size,
            "physical_block_size": self.physical_block_size, "uuid": self.alias,
            "optimal_io_boundary": self.optimal_io_boundary, "md_size": 0, "dif_type": 0,
            "dif_is_head_of_md": False, "dif_pi_format": 0, "numa_id": -1}}


class NullBdev(Bdev):
    module = "null"
    product_name = "Null disk"
    io_types = frozenset({"read", "write", "write_zeroes", "reset", "abort"})

    def __init__(self, name, uuid, disk, physical_block_size: int = 0, **preferred: int):
        super().__init__(name, uuid, disk)
        self.physical_block_size = physical_block_size or disk.block_size
        self.preferred = {key: preferred.get(key) or 0 for key in (
            "preferred_write_alignment", "preferred_write_granularity", "optimal_write_size",
            "preferred_unmap_alignment", "preferred_unmap_granularity")}

    def extra_info(self) -> dict:
        return dict(self.preferred)

    def config_entry(self) -> dict:
        return {"method": "bdev_null_create", "params": {
            "name": self.name, "num_blocks": self.num_blocks, "block_size": self.block_size,
            "physical_block_size": self.physical_block_size, "uuid": self.alias, "md_size": 0,
            "dif_type": 0, "dif_is_head_of_md": False, "dif_pi_format": 0, **self.preferred}}


class AioBdev(Bdev):
    """bdev_aio_create: a file or block device (served through io_uring, like uring bdevs)."""

    module = "aio"
    product_name = "AIO disk"

    def __init__(self, name, uuid, disk, filename: str, block_size_override: bool,
                 readonly: bool = False, fallocate: bool = False):
        super().__init__(name, uuid, disk)
        self.filename = filename
        self.block_size_override = block_size_override
        self.readonly = readonly
        self.fallocate = fallocate
        if fallocate:
            self.io_types = self.io_types | {"unmap"}

    def driver_specific(self) -> dict:
        return {"aio": {"filename": self.filename, "block_size_override": self.block_size_override,
                        "readonly": self.readonly, "fallocate": self.fallocate, "nowait": False}}

    def config_entry(self) -> dict:
        params: dict[str, Any] = {"name": self.name}
        if self.block_size_override:
            params["block_size"] = self.block_size
        params.update(filename=self.filename, readonly=self.readonly, fallocate=self.fallocate,
                      uuid=self.alias, nowait=False)
        return {"method": "bdev_aio_create", "params": params}


class UringBdev(Bdev):
    module = "uring"
    product_name = "URING bdev"
    io_types = frozenset({"read", "write", "unmap", "flush", "reset", "write_zeroes"})

    def __init__(self, name, uuid, disk, filename: str):
        super().__init__(name, uuid, disk)
        self.filename = filename

    def driver_specific(self) -> dict:
        return {"uring": {"filename": self.filename}}

    def config_entry(self) -> dict:
        return {"method": "bdev_uring_create", "params": {
            "name": self.name, "block_size": self.block_size, "filename": self.filename,
            "uuid": self.alias}}


class VirtioBlkBdev(Bdev):
    """A bdev served by another vhost-user-blk target (bdev_virtio_attach_controller)."""

    module = "virtio"
    product_name = "VirtioBlk Disk"
    io_types = frozenset({"read", "write", "unmap", "flush", "reset", "write_zeroes"})

    def __init__(self, name, uuid, disk, device, socket: str, vq_count: int, vq_size: int):
        super().__init__(name, uuid, disk)
        self.device = device
        self.socket = socket
        self.vq_count = vq_count
        self.vq_size = vq_size

    def driver_specific(self) -> dict:
        return {"virtio_blk": {"vq_count": self.vq_count, "vq_size": self.vq_size, "type": "user",
                               "socket": self.socket}}

    def config_entry(self) -> dict:
        return {"method": "bdev_virtio_attach_controller", "params": {
            "name": self.name, "trtype": "user", "traddr": self.socket, "dev_type": "blk",
            "vq_count": self.vq_count, "vq_size": self.vq_size}}
