"""Background writers in a test guest: several vhd-pattern processes writing one slice each of a
disk (O_DIRECT, fsync at the end), so that requests are in flight when a test breaks something."""

from __future__ import annotations

from dataclasses import dataclass

from guest import GuestShell, pattern_command
from tests.helpers.waiting import wait_for


@dataclass(frozen=True)
class BackgroundWriters:
    """``count`` writers of ``slice_bytes`` each, writer i at offset i * slice_bytes of ``device``;
    each leaves its exit status in /tmp/rc<i> and its output in /tmp/w<i>.log."""

    seed: int
    count: int
    slice_bytes: int
    request_bytes: int
    device: str = "/dev/vda"

    @property
    def total_bytes(self) -> int:
        return self.count * self.slice_bytes

    def start(self, guest: GuestShell) -> None:
        jobs = "".join(
            f"({pattern_command('write', self.seed, self.device, i * self.slice_bytes, self.slice_bytes, direct=True, sync=True, chunk_bytes=self.request_bytes)};"
            f" echo $? > /tmp/rc{i}) > /tmp/w{i}.log 2>&1 & "
            for i in range(self.count))
        guest.check("rm -f /tmp/rc*; " + jobs + "true")

    @staticmethod
    def exit_codes(guest: GuestShell) -> list[int]:
        """The statuses of the writers that have finished so far."""
        return [int(c) for c in guest.check("cat /tmp/rc* 2>/dev/null; true").split()]

    def wait(self, guest: GuestShell, timeout_s: float = 240) -> list[int]:
        """Every writer's exit status once all have finished (``timeout_s`` nominal, scaled)."""
        try:
            wait_for(lambda: len(self.exit_codes(guest)) == self.count,
                     timeout=guest.scaled(timeout_s), interval=0.5)
        except TimeoutError:
            raise guest.failure("the guest's writers did not finish: "
                                + guest.check("cat /tmp/w*.log; dmesg | tail")) from None
        return self.exit_codes(guest)

    @staticmethod
    def logs(guest: GuestShell) -> str:
        return guest.check("cat /tmp/w*.log")


def io_errors_in_dmesg(guest: GuestShell) -> str:
    """The guest kernel's I/O error lines (empty if none)."""
    return guest.run("dmesg | grep -iE 'I/O error|blk_update_request|critical'")[1]
