"""NVMe queue entries: the 64-byte submission entry and the 16-byte completion entry (little
endian, as they sit in guest memory)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .status import SUCCESS, Status

SQE = struct.Struct("<BBHI8xQQQ6I")
CQE = struct.Struct("<IIHHHH")
SQE_SIZE = SQE.size
CQE_SIZE = CQE.size
PSDT_PRP = 0


@dataclass(frozen=True)
class Submission:
    """A decoded submission queue entry."""

    opcode: int
    flags: int          # FUSE 1:0, PSDT 7:6
    cid: int
    nsid: int
    mptr: int
    prp1: int
    prp2: int
    cdw10: int = 0
    cdw11: int = 0
    cdw12: int = 0
    cdw13: int = 0
    cdw14: int = 0
    cdw15: int = 0

    @property
    def psdt(self) -> int:
        return self.flags >> 6 & 0x3

    @property
    def fuse(self) -> int:
        return self.flags & 0x3

    @classmethod
    def decode(cls, entry: bytes) -> Submission:
        return cls(*SQE.unpack(entry))

    def encode(self) -> bytes:
        return SQE.pack(self.opcode, self.flags, self.cid, self.nsid, self.mptr, self.prp1,
                        self.prp2, self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14,
                        self.cdw15)


@dataclass(frozen=True)
class Completion:
    """A completion queue entry without its phase tag (the queue adds it when posting)."""

    cid: int
    status: Status = SUCCESS
    dw0: int = 0
    sq_head: int = 0
    sq_id: int = 0

    def encode(self, phase: int) -> bytes:
        return CQE.pack(self.dw0, 0, self.sq_head, self.sq_id, self.cid,
                        self.status.field << 1 | (phase & 1))

    @classmethod
    def decode(cls, entry: bytes) -> tuple[Completion, int]:
        """(completion, phase) of a posted entry (a host's view, for tests and the initiator)."""
        dw0, _, sq_head, sq_id, cid, status = CQE.unpack(entry)
        field = status >> 1
        return cls(cid, Status(field >> 8 & 0x7, field & 0xFF, bool(field >> 14 & 1)), dw0,
                   sq_head, sq_id), status & 1
