"""A vfio-user endpoint: a listening Unix socket that serves one client of one device at a time.

QEMU's vfio-user-pci connects when the device is realized, so the socket must exist first.  One
client at a time: a second one waits a moment for the first to leave (a QEMU restarted after a
kill, whose EOF may not have been read yet) and is closed if it does not; the next client is
served with the device state as it was.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

from .connection import Connection, ServedDevice
from .transport import Transport

log = logging.getLogger(__name__)


class Endpoint:
    """Listens on ``path`` for clients of ``device``."""

    def __init__(self, path: str | Path, device: ServedDevice, mode: int = 0o600,
                 takeover_wait_s: float = 5.0) -> None:
        self.path = Path(path)
        self.takeover_wait_s = takeover_wait_s
        self.device = device
        self.mode = mode
        self.connection: Connection | None = None
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._serving: asyncio.Task | None = None
        self.clients_served = 0

    async def start(self) -> None:
        """Create the socket (replacing a stale one) and start accepting."""
        if self.path.is_socket():
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(str(self.path))
        os.chmod(self.path, self.mode)
        sock.listen(4)
        sock.setblocking(False)
        self._sock = sock
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            client, _ = await loop.sock_accept(self._sock)
            if self._serving is not None and not self._serving.done():
                done, _ = await asyncio.wait({self._serving}, timeout=self.takeover_wait_s)
                if not done:
                    log.warning("%s: a second vfio-user client refused (one is served)",
                                self.device.name)
                    client.close()
                    continue
            self.connection = Connection(Transport(client), self.device)
            self.clients_served += 1
            self._serving = loop.create_task(self.connection.run())

    async def stop(self) -> None:
        """Stop accepting, drop the client, remove the socket."""
        for task in (self._accepting, self._serving):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
