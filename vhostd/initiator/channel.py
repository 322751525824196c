"""The front-end's end of a vhost-user socket: send a request (with SCM_RIGHTS fds), read its reply
and check it as strictly as QEMU does (flags exactly VERSION|REPLY, the same request, the exact
payload size).  Blocking, with a timeout per reply; nothing here knows what a request means.
"""

from __future__ import annotations

import array
import socket
import time

from ..vhost import protocol as p
from ..vhost.protocol import ProtocolError, Request
from ..vhost.transport import _FD_SPACE, _close_all as close_all, _fds_from as fds_from_ancillary

REPLY_FLAGS = p.VERSION | p.FLAG_REPLY


class BackendClosed(ConnectionError):
    """The back-end closed the connection (or it was never open)."""


class BadReply(ProtocolError):
    """The back-end's reply is not what QEMU would accept; the connection is unusable."""


class RequestFailed(Exception):
    """The back-end refused a request (a non-zero REPLY_ACK)."""

    def __init__(self, request: int, code: int) -> None:
        super().__init__("%s refused by the back-end (ack %#x)" % (_name(request), code))
        self.request = request
        self.code = code


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return "request %d" % request


def check_reply(msg: p.Message, request: int, size: int | None) -> None:
    """Raise BadReply unless msg answers request with flags exactly VERSION|REPLY and a payload
    of exactly size bytes (None: any size)."""
    if msg.flags != REPLY_FLAGS:
        raise BadReply("reply to %s has flags %#x, expected %#x" % (_name(request), msg.flags, REPLY_FLAGS))
    if msg.request != request:
        raise BadReply("expected a reply to %s, got one to %s" % (_name(request), _name(msg.request)))
    if size is not None and len(msg.payload) != size:
        raise BadReply("reply to %s carries %d bytes, expected %d"
                       % (_name(request), len(msg.payload), size))


class Channel:
    """One connected vhost-user socket, used by one thread."""

    def __init__(self, path: str, timeout_s: float = 5.0, connect_timeout_s: float = 5.0) -> None:
        self.path = str(path)
        self.timeout_s = timeout_s
        self.sock = self._connect(connect_timeout_s)
        self.reader = p.MessageReader(expect_reply=True)

    def _connect(self, timeout_s: float) -> socket.socket:
        # A back-end that is (re)starting may not listen yet: retry until the deadline.
        deadline = time.monotonic() + timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.path)
                sock.settimeout(self.timeout_s)
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() >= deadline:
                    raise BackendClosed("no vhost-user back-end listens on %s" % self.path) from None
                time.sleep(0.02)

    @property
    def closed(self) -> bool:
        return self.sock is None

    def send(self, request: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
             need_reply: bool = False) -> None:
        """Write one request with its fds in a single sendmsg, as QEMU does."""
        if self.sock is None:
            raise BackendClosed("channel to %s is closed" % self.path)
        flags = p.VERSION | (p.FLAG_NEED_REPLY if need_reply else 0)
        data = p.encode(request, payload, flags)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            sent = self.sock.sendmsg([data], ancillary)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BackendClosed("%s: %s" % (self.path, exc)) from None

    def receive(self) -> p.Message:
        """The next reply; BackendClosed at EOF, TimeoutError if none within timeout_s."""
        if self.sock is None:
            raise BackendClosed("channel to %s is closed" % self.path)
        while True:
            msg = self.reader.next_message()
            if msg is not None:
                return msg
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(self.reader.bytes_needed(), _FD_SPACE)
            except socket.timeout:
                raise TimeoutError("no reply from %s within %.1f s" % (self.path, self.timeout_s)) from None
            except ConnectionResetError:
                raise BackendClosed("%s reset the connection" % self.path) from None
            fds = fds_from_ancillary(ancdata)
            if not data:
                close_all(fds)
                raise BackendClosed("%s closed the connection" % self.path)
            self.reader.feed(data, fds)

    def call(self, request: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
             reply_size: int | None = 8) -> p.Message:
        """Send a request that has its own reply and return the checked reply."""
        self.send(request, payload, fds)
        msg = self.receive()
        try:
            check_reply(msg, request, reply_size)
        except BadReply:
            msg.close_fds()
            raise
        return msg

    def call_u64(self, request: int, payload: bytes = b"") -> int:
        return p.decode_u64(self.call(request, payload).payload)

    def request(self, request: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
                ack: bool = False) -> None:
        """Send a request without a reply of its own; with ack (REPLY_ACK negotiated) set
        NEED_REPLY and wait for the u64 ack, raising RequestFailed if it is not 0."""
        self.send(request, payload, fds, need_reply=ack)
        if ack:
            msg = self.receive()
            msg.close_fds()
            check_reply(msg, request, 8)
            code = p.decode_u64(msg.payload)
            if code != 0:
                raise RequestFailed(request, code)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.reader.close()
