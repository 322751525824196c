"""virtio-scsi over the front-end (vhost_user.md §5): command requests (LUN + CDB → response,
status, sense, data), control-queue task management and asynchronous-notification requests, and
event-queue buffers with the events the device puts in them.

Queues: 0 control, 1 event, 2… requests.  The config space of a vhost-user-scsi device comes from
QEMU, not the back-end, so the usual values are assumed (sense 96 bytes, CDB 32 bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import _dataplane as dp
from ..vhost.features import ScsiFeature, mask
from .frontend import Frontend, Writable

CONTROL_QUEUE, EVENT_QUEUE, FIRST_REQUEST_QUEUE = 0, 1, 2
CDB_SIZE, SENSE_SIZE = 32, 96
CMD_REQ = struct.Struct("<8sQBBB32s")          # lun, tag, task_attr, prio, crn, cdb: 51 bytes
CMD_RESP = struct.Struct("<IIHBB96s")          # sense_len, resid, status_qualifier, status, response, sense
TMF_REQ = struct.Struct("<II8sQ")              # type 0, subtype, lun, tag
AN_REQ = struct.Struct("<I8sI")                # type 1/2, lun, event_requested
AN_RESP = struct.Struct("<IB")                 # event_actual, response
EVENT = struct.Struct("<I8sI")                 # event, lun, reason
EVENTS_MISSED = 0x80000000

T_TMF, T_AN_QUERY, T_AN_SUBSCRIBE = 0, 1, 2
TMF_ABORT_TASK, TMF_ABORT_TASK_SET, TMF_CLEAR_ACA, TMF_CLEAR_TASK_SET = 0, 1, 2, 3
TMF_I_T_NEXUS_RESET, TMF_LOGICAL_UNIT_RESET, TMF_QUERY_TASK, TMF_QUERY_TASK_SET = 4, 5, 6, 7
S_OK, S_OVERRUN, S_ABORTED, S_BAD_TARGET, S_RESET, S_BUSY = 0, 1, 2, 3, 4, 5
S_TRANSPORT_FAILURE, S_TARGET_FAILURE, S_NEXUS_FAILURE, S_FAILURE = 6, 7, 8, 9
S_FUNCTION_SUCCEEDED, S_FUNCTION_REJECTED, S_INCORRECT_LUN = 10, 11, 12
EVT_NO_EVENT, EVT_TRANSPORT_RESET, EVT_ASYNC_NOTIFY, EVT_PARAM_CHANGE = 0, 1, 2, 3
GOOD, CHECK_CONDITION = 0x00, 0x02

DRIVER_FEATURES = mask(ScsiFeature.HOTPLUG, ScsiFeature.CHANGE)
REPORT_LUNS_WLUN = bytes([0xC1, 0x01, 0, 0, 0, 0, 0, 0])


class ScsiError(OSError):
    """A command did not complete with response OK and status GOOD."""

    def __init__(self, what: str, result: ScsiResult) -> None:
        sense = result.sense_key_asc_ascq
        super().__init__("%s failed: response %d, status %#x%s" % (
            what, result.response, result.status,
            "" if sense is None else ", sense %02x/%02x/%02x" % sense))
        self.result = result


def lun_bytes(target: int, lun: int = 0) -> bytes:
    """The 8-byte virtio-scsi LUN of (target, lun) as Linux builds it."""
    if not 0 <= target <= 255 or not 0 <= lun <= 0x3FFF:
        raise ValueError("target 0-255, lun 0-16383")
    return bytes([1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0])


def encode_command(lun: bytes, tag: int, cdb: bytes, task_attr: int = 0) -> bytes:
    if len(cdb) > CDB_SIZE:
        raise ValueError("CDB longer than %d bytes" % CDB_SIZE)
    return CMD_REQ.pack(lun, tag, task_attr, 0, 0, cdb.ljust(CDB_SIZE, b"\0"))


@dataclass(frozen=True)
class ScsiResult:
    response: int
    status: int
    sense: bytes
    resid: int
    status_qualifier: int
    data: bytes
    used_len: int

    @classmethod
    def parse(cls, resp: bytes, data: bytes, used_len: int) -> ScsiResult:
        sense_len, resid, qualifier, status, response, sense = CMD_RESP.unpack(resp)
        return cls(response, status, sense[:min(sense_len, SENSE_SIZE)], resid, qualifier, data, used_len)

    @property
    def ok(self) -> bool:
        return self.response == S_OK and self.status == GOOD

    @property
    def sense_key_asc_ascq(self) -> tuple[int, int, int] | None:
        """(key, ASC, ASCQ) of fixed (0x70/0x71) or descriptor (0x72/0x73) sense, else None."""
        s = self.sense
        if len(s) >= 14 and s[0] & 0x7F in (0x70, 0x71):
            return (s[2] & 0x0F, s[12], s[13])
        if len(s) >= 4 and s[0] & 0x7F in (0x72, 0x73):
            return (s[1] & 0x0F, s[2], s[3])
        return None


@dataclass(frozen=True)
class ScsiEvent:
    event: int
    lun: bytes
    reason: int

    @property
    def missed(self) -> bool:
        return bool(self.event & EVENTS_MISSED)

    @property
    def kind(self) -> int:
        return self.event & ~EVENTS_MISSED

    @classmethod
    def parse(cls, raw: bytes) -> ScsiEvent:
        return cls(*EVENT.unpack(raw[:EVENT.size]))


class VirtioScsi:
    """A vhost-user-scsi device driven by this process.  num_queues request queues (plus
    control and event); Frontend options pass through."""

    def __init__(self, path: str, *, num_queues: int = 1, features: int = DRIVER_FEATURES,
                 event_buffers: int = 4, **frontend_options) -> None:
        self.frontend = Frontend(path, num_queues=FIRST_REQUEST_QUEUE + num_queues,
                                 device=dp.DEVICE_SCSI, device_features=features, **frontend_options)
        self.event_buffers = event_buffers
        self._events: dict[int, int] = {}     # head → gpa of a posted event buffer
        self._tag = 0

    def open(self) -> VirtioScsi:
        self.frontend.connect()
        self.frontend.start()
        self.post_event_buffers(self.event_buffers)
        return self

    @property
    def memory(self) -> dp.DriverMemory:
        return self.frontend.memory

    @property
    def request_queues(self) -> list[dp.DriverQueue]:
        return self.frontend.queues[FIRST_REQUEST_QUEUE:]

    # -- commands --------------------------------------------------------------------------
    def command(self, target: int, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0, *,
                lun: int = 0, lun_raw: bytes | None = None, tag: int | None = None,
                task_attr: int = 0, queue: int = 0, timeout_s: float = 5.0) -> ScsiResult:
        """One command on request queue `queue` (0 = the first request queue)."""
        if tag is None:
            self._tag += 1
            tag = self._tag
        req = encode_command(lun_raw if lun_raw is not None else lun_bytes(target, lun), tag, cdb, task_attr)
        used_len, (resp, data_in) = self.frontend.transact(
            FIRST_REQUEST_QUEUE + queue, [req, data_out, Writable(CMD_RESP.size), Writable(data_in_len)],
            timeout_s=timeout_s)
        return ScsiResult.parse(resp, data_in, used_len)

    def checked(self, what: str, result: ScsiResult) -> ScsiResult:
        if not result.ok:
            raise ScsiError(what, result)
        return result

    def test_unit_ready(self, target: int = 0, lun: int = 0) -> ScsiResult:
        return self.command(target, bytes(6), lun=lun)

    def inquiry(self, target: int = 0, lun: int = 0, page: int | None = None, alloc: int = 96) -> bytes:
        cdb = bytes([0x12, 1 if page is not None else 0, page or 0]) + struct.pack(">H", alloc) + b"\0"
        return self.checked("INQUIRY", self.command(target, cdb, data_in_len=alloc, lun=lun)).data

    def read_capacity(self, target: int = 0, lun: int = 0) -> tuple[int, int]:
        """(number of blocks, block size) from READ CAPACITY(16)."""
        cdb = bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + b"\0\0"
        data = self.checked("READ CAPACITY(16)", self.command(target, cdb, data_in_len=32, lun=lun)).data
        last_lba, block_size = struct.unpack(">QI", data[:12])
        return last_lba + 1, block_size

    def read(self, target: int, lba: int, blocks: int, block_size: int, lun: int = 0) -> bytes:
        cdb = bytes([0x88, 0]) + struct.pack(">QI", lba, blocks) + b"\0\0"
        return self.checked("READ(16)", self.command(target, cdb, data_in_len=blocks * block_size, lun=lun)).data

    def write(self, target: int, lba: int, data: bytes, block_size: int, lun: int = 0) -> None:
        cdb = bytes([0x8A, 0]) + struct.pack(">QI", lba, len(data) // block_size) + b"\0\0"
        self.checked("WRITE(16)", self.command(target, cdb, data_out=data, lun=lun))

    def synchronize_cache(self, target: int = 0, lun: int = 0) -> None:
        self.checked("SYNCHRONIZE CACHE", self.command(target, bytes([0x35]) + bytes(9), lun=lun))

    def report_luns(self, target: int = 0, alloc: int = 256) -> list[int]:
        cdb = bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", alloc) + b"\0\0"
        data = self.checked("REPORT LUNS", self.command(target, cdb, data_in_len=alloc)).data
        (length,) = struct.unpack(">I", data[:4])
        return [((data[i] & 0x3F) << 8) | data[i + 1] for i in range(8, min(8 + length, len(data)), 8)]

    # -- control queue ---------------------------------------------------------------------
    def tmf(self, subtype: int, target: int, lun: int = 0, tag: int = 0, timeout_s: float = 5.0) -> int:
        """A task-management function; returns the response byte."""
        req = TMF_REQ.pack(T_TMF, subtype, lun_bytes(target, lun), tag)
        _, (resp,) = self.frontend.transact(CONTROL_QUEUE, [req, Writable(1)], timeout_s=timeout_s)
        return resp[0]

    def async_notification(self, target: int, events: int, subscribe: bool = False, lun: int = 0,
                           timeout_s: float = 5.0) -> tuple[int, int]:
        """AN query (or subscribe): (response, event_actual)."""
        req = AN_REQ.pack(T_AN_SUBSCRIBE if subscribe else T_AN_QUERY, lun_bytes(target, lun), events)
        _, (resp,) = self.frontend.transact(CONTROL_QUEUE, [req, Writable(AN_RESP.size)], timeout_s=timeout_s)
        event_actual, response = AN_RESP.unpack(resp)
        return response, event_actual

    # -- event queue -----------------------------------------------------------------------
    def post_event_buffers(self, count: int) -> None:
        """Give the device count more 16-byte buffers for events."""
        q = self.frontend.queues[EVENT_QUEUE]
        for _ in range(count):
            gpa = self.memory.alloc(EVENT.size, 16)
            self.memory.fill(gpa, EVENT.size, 0)
            self._events[q.add_chain([(gpa, EVENT.size, True)])] = gpa
        q.flush()

    def events(self, timeout_s: float = 0.0) -> list[ScsiEvent]:
        """Events the device delivered (waiting up to timeout_s for the first); each buffer is
        posted again."""
        q = self.frontend.queues[EVENT_QUEUE]
        try:
            used = q.wait(timeout_s) if timeout_s > 0 else q.poll()
        except TimeoutError:
            used = []
        out = []
        for head, _ in used:
            gpa = self._events.pop(head)
            out.append(ScsiEvent.parse(self.memory.read(gpa, EVENT.size)))
            self.memory.free(gpa)
        if used:
            self.post_event_buffers(len(used))
        return out

    # -- load ------------------------------------------------------------------------------
    def prepare_load(self, target: int = 0, lun: int = 0) -> int:
        """Point the request queues' C path (vdrv_submit) at (target, lun); returns its size in
        bytes."""
        self.test_unit_ready(target, lun)          # clears a power-on unit attention
        blocks, block_size = self.read_capacity(target, lun)
        for q in self.request_queues:
            q.set_scsi_target(lun_bytes(target, lun), block_size)
        return blocks * block_size

    def close(self) -> None:
        self.frontend.close()

    def __enter__(self) -> VirtioScsi:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
