"""Submission and completion queue positions: head, tail, phase, and the doorbell checks.

Pure bookkeeping over ring indexes: where the next entry to fetch or post is, whether a doorbell
value is possible (a tail beyond the queue, or a head past what was posted, is the host's error and
makes the controller fatal, never a loop or an access outside the ring)."""

from __future__ import annotations

from dataclasses import dataclass

from .command import CQE_SIZE, SQE_SIZE


class DoorbellError(Exception):
    """A doorbell write the queue cannot accept."""


@dataclass
class SubmissionQueue:
    qid: int
    addr: int
    entries: int
    cqid: int = 0
    head: int = 0
    tail: int = 0

    def ring(self, tail: int) -> None:
        if tail >= self.entries:
            raise DoorbellError("SQ %d tail %d beyond its %d entries" % (self.qid, tail, self.entries))
        self.tail = tail

    def pending(self) -> int:
        return (self.tail - self.head) % self.entries

    def pop(self) -> int:
        """The guest address of the next entry; the head moves past it."""
        address = self.addr + self.head * SQE_SIZE
        self.head = (self.head + 1) % self.entries
        return address


@dataclass
class CompletionQueue:
    qid: int
    addr: int
    entries: int
    vector: int = 0
    interrupts: bool = True
    head: int = 0
    tail: int = 0
    phase: int = 1

    def ring(self, head: int) -> None:
        """The host consumed entries up to ``head``: it may not pass what was posted."""
        if head >= self.entries or (head - self.head) % self.entries > self.posted():
            raise DoorbellError("CQ %d head %d outside posted entries %d…%d"
                                % (self.qid, head, self.head, self.tail))
        self.head = head

    def posted(self) -> int:
        return (self.tail - self.head) % self.entries

    def full(self) -> bool:
        return (self.tail + 1) % self.entries == self.head

    def push(self) -> tuple[int, int]:
        """(guest address, phase) of the slot for the next completion; the tail moves past it."""
        address, phase = self.addr + self.tail * CQE_SIZE, self.phase
        self.tail = (self.tail + 1) % self.entries
        if self.tail == 0:
            self.phase ^= 1
        return address, phase
