"""Admin command set, one handler per opcode: a submission in, a result out (status, DW0, the data
to copy to the host's buffer, effects for the data plane).  No guest memory is touched here: the
caller copies ``data`` through the command's PRPs, and a queue's memory is checked through the
injected ``memory_ok`` before the queue is accepted."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from . import identify as ident
from . import status as st
from .command import Submission
from .status import Status


class Opcode:
    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    KEEP_ALIVE = 0x18


class Feature:
    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIG = 0x09
    ASYNC_EVENT_CONFIG = 0x0B
    KEEP_ALIVE_TIMER = 0x0F


class LogPage:
    ERROR = 0x01
    SMART = 0x02
    FIRMWARE_SLOT = 0x03
    CHANGED_NAMESPACES = 0x04


# AER DW0: type 2 (notice), information 0 (namespace attribute changed), log page 04.
AER_NAMESPACE_ATTRIBUTE_CHANGED = 0x2 | 0x00 << 8 | LogPage.CHANGED_NAMESPACES << 16

LOG_SIZES = {LogPage.ERROR: 64, LogPage.SMART: 512, LogPage.FIRMWARE_SLOT: 512,
             LogPage.CHANGED_NAMESPACES: 4096}


@dataclass(frozen=True)
class QueueConfig:
    """An I/O queue as the host created it."""

    qid: int
    addr: int
    entries: int
    cqid: int = 0              # SQ: its completion queue
    vector: int = 0            # CQ: its interrupt vector
    interrupts: bool = False   # CQ: IEN


@dataclass(frozen=True)
class CreateQueue:
    """Effect: start serving the queue (``kind`` "sq" or "cq")."""

    kind: str
    config: QueueConfig


@dataclass(frozen=True)
class DeleteQueue:
    """Effect: stop the queue; an SQ's outstanding commands end "aborted – SQ deletion"."""

    kind: str
    qid: int


@dataclass
class AdminResult:
    status: Status = st.SUCCESS
    dw0: int = 0
    data: bytes | None = None                 # to the host buffer of PRP1/PRP2
    held: bool = False                        # an AER: completes when an event happens
    effects: list = field(default_factory=list)


def _fail(status: Status) -> AdminResult:
    return AdminResult(status)


class AdminCommands:
    """The admin queue's command handlers for one controller."""

    def __init__(self, info: ident.ControllerInfo, max_queue_entries: int, max_io_queues: int,
                 msix_vectors: int, memory_ok: Callable[[int, int, bool], bool]) -> None:
        self.info = info
        self.max_queue_entries = max_queue_entries
        self.max_io_queues = max_io_queues
        self.msix_vectors = msix_vectors
        self.memory_ok = memory_ok            # (addr, size, writable) lies in mapped guest memory
        self.namespaces: dict[int, ident.NamespaceInfo] = {}
        self.reset()
        self._handlers: dict[int, Callable[[Submission], AdminResult]] = {
            Opcode.IDENTIFY: self._identify,
            Opcode.SET_FEATURES: self._set_features,
            Opcode.GET_FEATURES: self._get_features,
            Opcode.CREATE_IO_CQ: self._create_cq,
            Opcode.CREATE_IO_SQ: self._create_sq,
            Opcode.DELETE_IO_CQ: self._delete_cq,
            Opcode.DELETE_IO_SQ: self._delete_sq,
            Opcode.GET_LOG_PAGE: self._get_log_page,
            Opcode.ASYNC_EVENT_REQUEST: self._async_event_request,
            Opcode.ABORT: self._abort,
            Opcode.KEEP_ALIVE: lambda sub: AdminResult(),
        }

    def reset(self) -> None:
        """Controller reset (CC.EN 1→0): queues, features and held AERs are gone."""
        self.cqs: dict[int, QueueConfig] = {}
        self.sqs: dict[int, QueueConfig] = {}
        self.features: dict[int, int] = {Feature.ARBITRATION: 0, Feature.POWER_MANAGEMENT: 0,
                                         Feature.VOLATILE_WRITE_CACHE: 1,
                                         Feature.INTERRUPT_COALESCING: 0,
                                         Feature.ASYNC_EVENT_CONFIG: 0,
                                         Feature.KEEP_ALIVE_TIMER: 0}
        granted = self.max_io_queues - 1
        self.features[Feature.NUMBER_OF_QUEUES] = granted | granted << 16
        self.held_aers: list[int] = []
        self.changed_nsids: set[int] = set()      # the Changed Namespace List log
        self.pending_events: list[int] = []       # AER DW0s waiting for a held request
        self._notice_masked = False               # a namespace notice is out until log 04 is read

    def namespaces_changed(self, nsids: set[int]) -> None:
        """Namespaces were attached or detached: record them for log 04 and, if the host asked for
        namespace attribute notices (feature 0B bit 8), queue one (masked until it reads the log)."""
        self.changed_nsids |= nsids
        if self.features[Feature.ASYNC_EVENT_CONFIG] & ident.OAES_NAMESPACE_ATTRIBUTE \
                and not self._notice_masked:
            self._notice_masked = True
            self.pending_events.append(AER_NAMESPACE_ATTRIBUTE_CHANGED)

    def take_event(self) -> tuple[int, int] | None:
        """(CID of a held AER, its DW0) for the next event, or None."""
        if self.pending_events and self.held_aers:
            return self.held_aers.pop(0), self.pending_events.pop(0)
        return None

    def reset_queue_effects(self, effects: list) -> None:
        """Undo the bookkeeping of queue creations the data plane could not carry out."""
        for effect in effects:
            if isinstance(effect, CreateQueue):
                table = self.cqs if effect.kind == "cq" else self.sqs
                table.pop(effect.config.qid, None)

    def execute(self, sub: Submission) -> AdminResult:
        handler = self._handlers.get(sub.opcode)
        if handler is None:
            return _fail(st.INVALID_OPCODE)
        if sub.fuse or sub.psdt:
            return _fail(st.INVALID_FIELD)            # no fused commands, no SGLs on admin
        return handler(sub)

    # -- identify -----------------------------------------------------------------------------
    def _identify(self, sub: Submission) -> AdminResult:
        cns = sub.cdw10 & 0xFF
        if cns == 0x01:
            return AdminResult(data=ident.identify_controller(self.info))
        if cns == 0x00:
            if sub.nsid == 0 or sub.nsid == 0xFFFFFFFF:
                return _fail(st.INVALID_NAMESPACE)
            return AdminResult(data=ident.identify_namespace(self.namespaces.get(sub.nsid)))
        if cns == 0x02:
            if sub.nsid >= 0xFFFFFFFE:
                return _fail(st.INVALID_NAMESPACE)
            return AdminResult(data=ident.active_namespace_list(list(self.namespaces), sub.nsid))
        if cns == 0x03:
            ns = self.namespaces.get(sub.nsid)
            if ns is None:
                return _fail(st.INVALID_NAMESPACE)
            return AdminResult(data=ident.namespace_descriptors(ns))
        return _fail(st.INVALID_FIELD)

    # -- features -----------------------------------------------------------------------------
    def _set_features(self, sub: Submission) -> AdminResult:
        fid = sub.cdw10 & 0xFF
        if sub.cdw10 >> 31:
            return _fail(st.FEATURE_NOT_SAVEABLE)
        value = sub.cdw11
        if fid == Feature.NUMBER_OF_QUEUES:
            nsq, ncq = value & 0xFFFF, value >> 16
            if nsq == 0xFFFF or ncq == 0xFFFF:
                return _fail(st.INVALID_FIELD)
            top = self.max_io_queues - 1
            granted = min(nsq, top) | min(ncq, top) << 16
            self.features[fid] = granted
            return AdminResult(dw0=granted)
        if fid == Feature.ASYNC_EVENT_CONFIG:
            value &= ident.OAES_NAMESPACE_ATTRIBUTE | 0xFF
        elif fid == Feature.VOLATILE_WRITE_CACHE:
            value &= 1
        elif fid == Feature.INTERRUPT_VECTOR_CONFIG:
            if value & 0xFFFF >= self.msix_vectors:
                return _fail(st.INVALID_FIELD)
            return AdminResult()
        elif fid not in self.features:
            return _fail(st.INVALID_FIELD)
        self.features[fid] = value
        return AdminResult()

    def _get_features(self, sub: Submission) -> AdminResult:
        fid = sub.cdw10 & 0xFF
        select = sub.cdw10 >> 8 & 0x7
        if select == 3:
            return AdminResult(dw0=0)                 # supported capabilities: none saveable
        if fid == Feature.INTERRUPT_VECTOR_CONFIG:
            vector = sub.cdw11 & 0xFFFF
            if vector >= self.msix_vectors:
                return _fail(st.INVALID_FIELD)
            return AdminResult(dw0=vector)
        if fid not in self.features:
            return _fail(st.INVALID_FIELD)
        return AdminResult(dw0=self.features[fid])

    # -- queues -------------------------------------------------------------------------------
    def _check_new_queue(self, sub: Submission, table: dict[int, QueueConfig],
                         entry_size: int, writable: bool) -> tuple[int, int] | AdminResult:
        qid, entries = sub.cdw10 & 0xFFFF, (sub.cdw10 >> 16) + 1
        if qid == 0 or qid > self.max_io_queues or qid in table:
            return _fail(st.INVALID_QUEUE_IDENTIFIER)
        if entries < 2 or entries > self.max_queue_entries:
            return _fail(st.INVALID_QUEUE_SIZE)
        if not sub.cdw11 & 1:
            return _fail(st.INVALID_FIELD)            # CAP.CQR: queues must be contiguous
        if sub.prp1 % 4096 or not sub.prp1:
            return _fail(st.INVALID_PRP_OFFSET)
        if not self.memory_ok(sub.prp1, entries * entry_size, writable):
            return _fail(st.DATA_TRANSFER_ERROR)
        return qid, entries

    def _create_cq(self, sub: Submission) -> AdminResult:
        checked = self._check_new_queue(sub, self.cqs, 16, writable=True)
        if isinstance(checked, AdminResult):
            return checked
        qid, entries = checked
        interrupts, vector = bool(sub.cdw11 & 2), sub.cdw11 >> 16
        if interrupts and vector >= self.msix_vectors:
            return _fail(st.INVALID_INTERRUPT_VECTOR)
        config = QueueConfig(qid, sub.prp1, entries, vector=vector, interrupts=interrupts)
        self.cqs[qid] = config
        return AdminResult(effects=[CreateQueue("cq", config)])

    def _create_sq(self, sub: Submission) -> AdminResult:
        checked = self._check_new_queue(sub, self.sqs, 64, writable=False)
        if isinstance(checked, AdminResult):
            return checked
        qid, entries = checked
        cqid = sub.cdw11 >> 16
        if cqid == 0 or cqid not in self.cqs:
            return _fail(st.COMPLETION_QUEUE_INVALID)
        config = QueueConfig(qid, sub.prp1, entries, cqid=cqid)
        self.sqs[qid] = config
        return AdminResult(effects=[CreateQueue("sq", config)])

    def _delete_cq(self, sub: Submission) -> AdminResult:
        qid = sub.cdw10 & 0xFFFF
        if qid == 0 or qid not in self.cqs:
            return _fail(st.INVALID_QUEUE_IDENTIFIER)
        if any(sq.cqid == qid for sq in self.sqs.values()):
            return _fail(st.INVALID_QUEUE_DELETION)
        del self.cqs[qid]
        return AdminResult(effects=[DeleteQueue("cq", qid)])

    def _delete_sq(self, sub: Submission) -> AdminResult:
        qid = sub.cdw10 & 0xFFFF
        if qid == 0 or qid not in self.sqs:
            return _fail(st.INVALID_QUEUE_IDENTIFIER)
        del self.sqs[qid]
        return AdminResult(effects=[DeleteQueue("sq", qid)])

    # -- logs, events, the rest ---------------------------------------------------------------
    def _get_log_page(self, sub: Submission) -> AdminResult:
        lid = sub.cdw10 & 0xFF
        dwords = ((sub.cdw10 >> 16) | (sub.cdw11 & 0xFFFF) << 16) + 1
        offset = sub.cdw12 | sub.cdw13 << 32
        if lid not in LOG_SIZES:
            return _fail(st.INVALID_LOG_PAGE)
        if offset % 4:
            return _fail(st.INVALID_FIELD)
        page = self._log_page(lid)
        if lid == LogPage.CHANGED_NAMESPACES and not sub.cdw10 & 1 << 15:    # RAE 0: read clears
            self.changed_nsids.clear()
            self._notice_masked = False
        return AdminResult(data=page[offset:offset + dwords * 4].ljust(dwords * 4, b"\0"))

    def _log_page(self, lid: int) -> bytes:
        if lid == LogPage.FIRMWARE_SLOT:
            page = bytearray(512)
            page[0] = 1                                           # slot 1 active
            page[8:16] = self.info.firmware.encode()[:8].ljust(8, b" ")
            return bytes(page)
        if lid == LogPage.SMART:
            page = bytearray(512)
            struct.pack_into("<H", page, 1, 300)                  # composite temperature, kelvin
            page[3] = 100                                         # available spare
            page[4] = 10                                          # spare threshold
            return bytes(page)
        if lid == LogPage.CHANGED_NAMESPACES:
            nsids = sorted(self.changed_nsids)
            if len(nsids) > 1024:
                nsids = [0xFFFFFFFF]                              # more than the list holds
            return struct.pack("<%dI" % len(nsids), *nsids).ljust(4096, b"\0")
        return bytes(LOG_SIZES[lid])

    def _async_event_request(self, sub: Submission) -> AdminResult:
        if len(self.held_aers) > self.info.aerl:
            return _fail(st.ASYNC_EVENT_LIMIT_EXCEEDED)
        self.held_aers.append(sub.cid)
        return AdminResult(held=True)

    def _abort(self, sub: Submission) -> AdminResult:
        return AdminResult(dw0=1)                                 # "not aborted": always legal
