"""Moves vfio-user bytes and file descriptors between a Unix socket and the codec, on asyncio: the
vhost-user transport with vfio-user's reader (a header with its fds, then exactly the rest)."""

from __future__ import annotations

from ..vhost import transport as vhost_transport
from ..vhost.transport import ConnectionClosed
from . import protocol as p

__all__ = ["ConnectionClosed", "Transport"]


class Transport(vhost_transport.Transport):
    """One connected vfio-user socket; ``receive()`` yields messages, ``send()`` writes them."""

    max_fds = p.MAX_MSG_FDS
    protocol_error = p.ProtocolError

    def make_reader(self, expect_reply: bool) -> p.MessageReader:
        return p.MessageReader(expect_reply=expect_reply)
