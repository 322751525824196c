"""vhost-user-scsi controllers: targets (a bdev as LUN 0 each), features, hot-plug events, and the
data-plane device behind them.

QEMU generates the virtio-scsi config space itself (vhost_user.md §5), so the device offers no
CONFIG protocol feature.  Queues: 0 control, 1 event, 2… requests.  Targets can be added and
removed while a guest runs: with VIRTIO_SCSI_F_HOTPLUG acked the guest gets a transport-reset
event (RESCAN / REMOVED) for the target's LUN.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import _dataplane as dp
from ..errors import AlreadyExists, Busy, InvalidArgument, NoSpace
from .controller import Controller
from .features import ProtocolFeature, ScsiFeature, VirtioFeature, bit, mask

if TYPE_CHECKING:
    from ..dataplane import ReactorSet

log = logging.getLogger(__name__)

MAX_TARGETS = 8
MAX_REQUEST_QUEUES = 32
CONTROL_QUEUE, EVENT_QUEUE = 0, 1
EVENT_TRANSPORT_RESET = 1
REASON_RESCAN, REASON_REMOVED = 1, 2
REMOVE_POLL_S = 0.001

# LOG_SHMFD and VHOST_LOG_ALL: live migration (the dirty log; responses and data-in are marked).
PROTOCOL_FEATURES = mask(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.INFLIGHT_SHMFD,
                         ProtocolFeature.CONFIGURE_MEM_SLOTS, ProtocolFeature.RESET_DEVICE,
                         ProtocolFeature.LOG_SHMFD)
# QEMU 7.2 passes CHANGE (param_change=on) and ANY_LAYOUT to the guest whatever we offer, so they are
# offered: we parse requests by byte offset (any layout) and simply never send PARAM_CHANGE events.
# RING_PACKED is offered always (SPDK's vhost-scsi has no packed rings and no RPC to ask for them):
# QEMU negotiates it only with packed=on on the device.
FEATURES = mask(VirtioFeature.VERSION_1, VirtioFeature.RING_INDIRECT_DESC, VirtioFeature.RING_EVENT_IDX,
                VirtioFeature.VHOST_USER_PROTOCOL_FEATURES, VirtioFeature.ANY_LAYOUT, ScsiFeature.HOTPLUG,
                ScsiFeature.CHANGE, VirtioFeature.RING_PACKED, VirtioFeature.VHOST_LOG_ALL)

_device_slots = iter(range(1 << 62))      # SPDK's global SCSI device index ("id")


@dataclass
class ScsiTarget:
    """A target of a controller: its slot, global device id and the bdev as LUN 0."""

    num: int
    device_id: int
    bdev: Any

    @property
    def name(self) -> str:
        return "Target %d" % self.num


class ScsiSessionDevice:
    """What a session sees of a scsi controller, and how its queues reach the data plane."""

    def __init__(self, controller: ScsiController) -> None:
        self.controller = controller
        self.name = controller.name

    @property
    def features(self) -> int:
        return FEATURES

    @property
    def protocol_features(self) -> int:
        return PROTOCOL_FEATURES

    @property
    def max_queues(self) -> int:
        return 2 + MAX_REQUEST_QUEUES

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(size)       # never asked: QEMU builds the virtio-scsi config itself

    def write_config(self, offset: int, data: bytes, flags: int) -> bool:
        return False

    def attach_queue(self, index: int, queue: dp.VirtQueue, acked_features: int = 0) -> dp.Reactor:
        c = self.controller
        reactor = c.reactor_for_queue(index)
        if index == EVENT_QUEUE:
            c.device.set_events_enabled(bool(acked_features & bit(ScsiFeature.HOTPLUG)))
            c.event_reactor = reactor
        c.device.attach(queue)
        queue.set_coalescing(c.delay_base_us, c.iops_threshold)
        return reactor

    def detach_queue(self, index: int, queue: dp.VirtQueue, reactor: dp.Reactor) -> None:
        c = self.controller
        if index == EVENT_QUEUE:
            c.event_reactor = None
            c.device.set_events_enabled(False)
        c.device.detach(queue)


class ScsiController(Controller):
    """A vhost-user-scsi controller with up to eight targets."""

    kind = "scsi"

    def __init__(self, name: str, socket_dir: str, reactors: ReactorSet, cores: list[int], **kw) -> None:
        super().__init__(name, socket_dir, reactors, cores, **kw)
        self.device = dp.ScsiDevice()
        self.targets: dict[int, ScsiTarget] = {}
        self.event_reactor: dp.Reactor | None = None
        self._changing: set[int] = set()

    def reactor_for_queue(self, index: int) -> dp.Reactor:
        """Control and event queues on the first core; request queues spread over all."""
        if index < 2:
            return self.reactors.by_core(self.cores[0])
        return self.reactors.by_core(self.cores[(index - 2) % len(self.cores)])

    def session_device(self) -> ScsiSessionDevice:
        return ScsiSessionDevice(self)

    @property
    def started(self) -> bool:
        return self.listener is not None

    # -- targets ------------------------------------------------------------------------------
    def _free_slot(self) -> int:
        for num in range(MAX_TARGETS):
            if num not in self.targets and num not in self._changing:
                return num
        raise NoSpace("controller %s has no free target slot" % self.name)

    async def add_target(self, num: int, bdev) -> int:
        """Put bdev as LUN 0 of target num (-1: the first free slot); returns the slot."""
        if num == -1:
            num = self._free_slot()
        if not 0 <= num < MAX_TARGETS:
            raise InvalidArgument("target number %d is not 0 to %d" % (num, MAX_TARGETS - 1))
        if num in self.targets or num in self._changing:
            raise AlreadyExists("target %d of %s is in use" % (num, self.name))
        bdev.claim(self)
        try:
            self.device.set_target(num, bdev.disk, bdev.name.encode()[:32],
                                   (bdev.product_name or "Disk").encode()[:16], bdev.uuid.bytes)
        except Exception:
            bdev.release(self)
            raise
        self.targets[num] = ScsiTarget(num, next(_device_slots), bdev)
        await self._announce(num, REASON_RESCAN)
        log.info("%s: target %d is bdev %s", self.name, num, bdev.name)
        return num

    async def remove_target(self, num: int) -> None:
        """Take target num away: new commands get BAD_TARGET at once, the ones in flight finish,
        then the bdev is released and the guest told.  Returns when all that is done."""
        if not 0 <= num < MAX_TARGETS:
            raise InvalidArgument("target number %d is not 0 to %d" % (num, MAX_TARGETS - 1))
        target = self.targets.get(num)
        if target is None or num in self._changing:
            raise Busy("target %d of %s is not there" % (num, self.name))
        self._changing.add(num)
        try:
            self.device.begin_remove(num)
            while self.device.target_inflight(num):
                await asyncio.sleep(REMOVE_POLL_S)
            self.device.finish_remove(num)
            del self.targets[num]
            target.bdev.release(self)
        finally:
            self._changing.discard(num)
        await self._announce(num, REASON_REMOVED)
        log.info("%s: target %d removed", self.name, num)

    async def _announce(self, num: int, reason: int) -> None:
        """Tell a running guest that took HOTPLUG about a target change."""
        reactor = self.event_reactor
        if reactor is None or not self.device.events_enabled:
            return
        msg = self.device.post_event(reactor, EVENT_TRANSPORT_RESET, reason, num)
        if await self.reactors.wait(reactor, msg) < 0:
            log.warning("%s: event queue full, guest will see EVENTS_MISSED", self.name)

    async def bdev_resized(self, bdev) -> None:
        """Every target of bdev reports UNIT ATTENTION, CAPACITY DATA HAS CHANGED to its next
        command; the guest re-reads the capacity on its own or at a rescan (virtio-scsi has no
        capacity event, and QEMU refuses CONFIG_CHANGE_MSG for scsi)."""
        for target in self.targets.values():
            if target.bdev is bdev and target.num not in self._changing:
                self.device.report_capacity_changed(target.num)

    async def remove_all_targets(self) -> None:
        for num in sorted(self.targets):
            await self.remove_target(num)

    # -- reporting ----------------------------------------------------------------------------
    def backend_specific(self) -> dict:
        return {"scsi": [{"scsi_dev_num": t.num, "id": t.device_id, "target_name": t.name,
                          "luns": [{"id": 0, "bdev_name": t.bdev.name}]}
                         for t in (self.targets[n] for n in sorted(self.targets))]}
