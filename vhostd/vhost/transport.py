"""Moves vhost-user bytes and file descriptors between a Unix socket and the codec, on asyncio.

A message is read as QEMU sends it: the 12-byte header with room for its fds (SCM_RIGHTS), then
exactly the payload, so fds always belong to the message whose header carried them.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket

from . import protocol as p

# Room for the fds of one vhost-user message (the initiator's channel reads with it too).
_FD_SPACE = socket.CMSG_SPACE(p.MAX_FDS * array.array("i").itemsize)


class ConnectionClosed(Exception):
    """The peer closed the connection."""


class Transport:
    """One connected vhost-user socket; ``receive()`` yields messages, ``send()`` writes them.
    Another protocol with the same framing rules (vfio-user) overrides the class attributes and
    ``make_reader``."""

    max_fds = p.MAX_FDS
    protocol_error: type[Exception] = p.ProtocolError

    def __init__(self, sock: socket.socket, expect_reply: bool = False) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.reader = self.make_reader(expect_reply)
        self._fd_space = socket.CMSG_SPACE(self.max_fds * array.array("i").itemsize)
        self._loop = asyncio.get_running_loop()

    def make_reader(self, expect_reply: bool):
        """The codec's message reader for this socket."""
        return p.MessageReader(expect_reply=expect_reply)

    async def _readable(self) -> None:
        fut = self._loop.create_future()
        fd = self.sock.fileno()
        self._loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            self._loop.remove_reader(fd)

    async def receive(self) -> p.Message:
        """The next complete message.  Raises ConnectionClosed at EOF, ProtocolError on garbage."""
        while True:
            msg = self.reader.next_message()
            if msg is not None:
                return msg
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(self.reader.bytes_needed(), self._fd_space)
            except (BlockingIOError, InterruptedError):
                await self._readable()
                continue
            except ConnectionResetError:
                raise ConnectionClosed() from None
            fds = _fds_from(ancdata)
            if flags & socket.MSG_CTRUNC:
                _close_all(fds)
                raise self.protocol_error("more than %d fds attached to one message" % self.max_fds)
            if not data:
                _close_all(fds)
                raise ConnectionClosed()
            self.reader.feed(data, fds)

    async def send(self, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
        """Write one message (header + payload) with its fds."""
        view = memoryview(data)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while view:
            try:
                sent = self.sock.sendmsg([view], ancillary)
            except (BlockingIOError, InterruptedError):
                fut = self._loop.create_future()
                fd = self.sock.fileno()
                self._loop.add_writer(fd, lambda: fut.done() or fut.set_result(None))
                try:
                    await fut
                finally:
                    self._loop.remove_writer(fd)
                continue
            except (BrokenPipeError, ConnectionResetError):
                raise ConnectionClosed() from None
            ancillary = []
            view = view[sent:]

    def close(self) -> None:
        self.reader.close()
        try:
            self.sock.close()
        except OSError:
            pass


def _fds_from(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - (len(payload) % arr.itemsize)])
            fds.extend(arr)
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
