"""A hostile vhost-user front-end for the fuzz tests: it sends exactly the bytes and fds it is given,
in the pieces it is given, and reports what the back-end did (replies, or closing).

Also: the daemon's resource counters the tests compare against a baseline (open fds, memory
mappings) and the kinds of fds a front-end could attach.
"""

from __future__ import annotations

import array
import os
import socket
import time

from vhostd.vhost import protocol as p


class HostilePeer:
    def __init__(self, path: str, timeout_s: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(path)
        self.closed_by_backend = False

    def send(self, data: bytes, fds=()) -> bool:
        """Send bytes with fds attached (our copies are closed).  False if the back-end has
        already closed the connection."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self.sock.sendmsg([data], anc)
            return True
        except (BrokenPipeError, ConnectionResetError):
            self.closed_by_backend = True
            return False
        finally:
            for fd in fds:
                os.close(fd)

    def request(self, request: int, payload: bytes = b"", fds=(), flags: int = p.VERSION) -> bool:
        return self.send(p.encode(request, payload, flags), fds)

    def reply(self, timeout_s: float = 5.0):
        """(request, flags, payload, fds) of the next message, or None if the back-end closed
        (or said nothing within the timeout)."""
        head, fds = self._read(p.HEADER_SIZE, timeout_s, want_fds=True)
        if head is None:
            return None
        request, flags, size = p.HEADER.unpack(head)
        payload, _ = self._read(size, timeout_s) if size else (b"", [])
        return request, flags, payload or b"", fds

    def ack(self, timeout_s: float = 5.0) -> int | None:
        msg = self.reply(timeout_s)
        if msg is None:
            return None
        for fd in msg[3]:
            os.close(fd)
        return p.decode_u64(msg[2]) if len(msg[2]) == 8 else None

    def _read(self, n: int, timeout_s: float, want_fds: bool = False):
        self.sock.settimeout(timeout_s)
        data, fds = b"", []
        while len(data) < n:
            try:
                chunk, anc, _, _ = self.sock.recvmsg(n - len(data), socket.CMSG_SPACE(8 * 4))
            except (ConnectionResetError, socket.timeout, OSError):
                self._close_fds(fds)
                return None, []
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(raw[: len(raw) - len(raw) % arr.itemsize])
                    fds.extend(arr)
            if not chunk:
                self.closed_by_backend = True
                self._close_fds(fds)
                return None, []
            data += chunk
        if not want_fds:
            self._close_fds(fds)
            fds = []
        return data, fds

    @staticmethod
    def _close_fds(fds) -> None:
        for fd in fds:
            os.close(fd)

    def drain(self, timeout_s: float = 0.2) -> bool:
        """Read and drop whatever the back-end sends until it closes (True) or goes quiet."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(8 * 4))
            except socket.timeout:
                return False
            except (ConnectionResetError, OSError):
                return True
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(raw[: len(raw) - len(raw) % arr.itemsize])
                    self._close_fds(arr)
            if not chunk:
                self.closed_by_backend = True
                return True
        return False

    def close(self) -> None:
        self.sock.close()


# -- fds a front-end may attach -----------------------------------------------------------------
def memfd(size: int, name: str = "fuzz-guest", sealable: bool = False) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0))
    os.ftruncate(fd, size)
    return fd


def any_fd(kind: str, size: int = 1 << 20) -> int:
    """A fresh fd of a kind: memfd, eventfd, pipe, devnull, socket, dir."""
    if kind == "memfd":
        return memfd(size)
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    if kind == "devnull":
        return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    if kind == "socket":
        a, b = socket.socketpair()
        b.close()
        return a.detach()
    if kind == "dir":
        return os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    raise ValueError(kind)


FD_KINDS = ("memfd", "eventfd", "pipe", "devnull", "socket", "dir")


# -- the daemon's resources -------------------------------------------------------------------
def fd_count(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


def maps(pid: int) -> list[str]:
    with open("/proc/%d/maps" % pid) as f:
        return f.read().splitlines()


def guest_mappings(pid: int) -> int:
    """Mappings of memfds (guest memory and inflight regions) in the daemon."""
    return sum(1 for line in maps(pid) if "/memfd:" in line)


def resources(pid: int) -> tuple[int, int]:
    """(open fds, guest mappings) of the daemon."""
    return fd_count(pid), guest_mappings(pid)


def wait_back_to(pid: int, baseline: tuple[int, int], timeout_s: float = 10.0) -> None:
    """Wait until the daemon holds at most the baseline's fds and guest mappings (the baseline may
    include an RPC connection the daemon was still closing); AssertionError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while any(now > then for now, then in zip(resources(pid), baseline)):
        assert time.monotonic() < deadline, "fds/mappings %r, baseline %r" % (resources(pid), baseline)
        time.sleep(0.01)
