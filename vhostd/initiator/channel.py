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


def receive_message(sock: socket.socket, reader: p.MessageReader, what: str, timeout_s: float) -> p.Message:
    """The next message on a blocking socket with a timeout; BackendClosed at EOF, TimeoutError
    if none within timeout_s (``what`` names it in errors)."""
    while True:
        msg = reader.next_message()
        if msg is not None:
            return msg
        try:
            data, ancdata, flags, _ = sock.recvmsg(reader.bytes_needed(), _FD_SPACE)
        except socket.timeout:
            raise TimeoutError("no %s within %.1f s" % (what, timeout_s)) from None
        except ConnectionResetError:
            raise BackendClosed("connection reset before the %s" % what) from None
        fds = fds_from_ancillary(ancdata)
        if not data:
            close_all(fds)
            raise BackendClosed("connection closed before the %s" % what)
        reader.feed(data, fds)


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
        return receive_message(self.sock, self.reader, "reply from %s" % self.path, self.timeout_s)

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


class BackendRequestChannel:
    """The front-end's end of the SET_BACKEND_REQ_FD socket: requests the back-end sends on its
    own (CONFIG_CHANGE_MSG …).  ``peer_fd`` is the end to send with SET_BACKEND_REQ_FD (the
    caller closes it once sent)."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.sock, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.peer = peer
        self.timeout_s = timeout_s
        self.reader = p.MessageReader(expect_reply=False)

    @property
    def peer_fd(self) -> int:
        return self.peer.fileno()

    def peer_sent(self) -> None:
        """The back-end has its own copy of the peer end now: ours is closed."""
        self.peer.close()

    def receive(self, timeout_s: float | None = None) -> p.Message:
        """The next back-end request; TimeoutError if none within timeout_s."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        self.sock.settimeout(limit)
        return receive_message(self.sock, self.reader, "back-end request", limit)

    def close(self) -> None:
        self.peer.close()
        self.sock.close()
        self.reader.close()
