"""NVMe completion status codes, in one place: status code type (SCT) and status code (SC), and the
16-bit status field of a completion (SC 7:0, SCT 10:8, CRD 12:11, More 13, DNR 14; bit 0 of the
field as the host sees it in DW3 is the phase tag, which the queue adds)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class StatusType(enum.IntEnum):
    GENERIC = 0
    COMMAND_SPECIFIC = 1
    MEDIA = 2


@dataclass(frozen=True)
class Status:
    """A completion status: ``sct``/``sc`` and whether a retry cannot help (DNR)."""

    sct: int
    sc: int
    dnr: bool = False

    @property
    def field(self) -> int:
        """The status field without the phase tag (DW3 bits 31:17)."""
        return self.sc | self.sct << 8 | int(self.dnr) << 14

    @property
    def ok(self) -> bool:
        return self.sct == 0 and self.sc == 0


def _generic(sc: int) -> Status:
    return Status(StatusType.GENERIC, sc, dnr=sc != 0)


def _specific(sc: int) -> Status:
    return Status(StatusType.COMMAND_SPECIFIC, sc, dnr=True)


SUCCESS = Status(StatusType.GENERIC, 0x00)
INVALID_OPCODE = _generic(0x01)
INVALID_FIELD = _generic(0x02)
CID_CONFLICT = _generic(0x03)
DATA_TRANSFER_ERROR = _generic(0x04)
INTERNAL_ERROR = _generic(0x06)
ABORTED_BY_REQUEST = Status(StatusType.GENERIC, 0x07)
ABORTED_SQ_DELETION = Status(StatusType.GENERIC, 0x08)
INVALID_NAMESPACE = _generic(0x0B)
INVALID_PRP_OFFSET = _generic(0x13)
LBA_OUT_OF_RANGE = _generic(0x80)

# Command specific (SCT 1)
COMPLETION_QUEUE_INVALID = _specific(0x00)
INVALID_QUEUE_IDENTIFIER = _specific(0x01)
INVALID_QUEUE_SIZE = _specific(0x02)
ASYNC_EVENT_LIMIT_EXCEEDED = _specific(0x05)
INVALID_INTERRUPT_VECTOR = _specific(0x08)
INVALID_LOG_PAGE = _specific(0x09)
INVALID_QUEUE_DELETION = _specific(0x0C)
FEATURE_NOT_SAVEABLE = _specific(0x0D)
