"""The JSON-RPC server on a Unix socket, with SPDK's socket rules: a lock file so one daemon owns a
path, the socket created mode 0600, at most 64 connections, replies in completion order, and a
connection closed after a parse error."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import stat

from .dispatch import PARSE_ERROR, Dispatcher, error_reply
from .framing import FramingError, JsonStreamDecoder, encode_response

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64


class SocketInUse(Exception):
    """Another daemon holds the RPC socket's lock."""


class RpcServer:
    def __init__(self, path: str, dispatcher: Dispatcher) -> None:
        self.path = path
        self.dispatcher = dispatcher
        self._lock_fd: int | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()

    def lock(self) -> None:
        """Take ``<path>.lock`` (as SPDK does), or raise SocketInUse."""
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SocketInUse("RPC Unix domain socket path %s in use. Specify another." % self.path) from None
        self._lock_fd = fd

    async def start(self) -> None:
        if self._lock_fd is None:
            self.lock()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)          # stale socket of a dead daemon (we hold the lock)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        log.info("JSON-RPC listening on %s", self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= MAX_CONNECTIONS:
            writer.close()
            return
        task = asyncio.current_task()
        self._connections.add(task)
        decoder = JsonStreamDecoder()
        pending: set[asyncio.Task] = set()
        write_lock = asyncio.Lock()

        async def answer(value):
            reply = await self.dispatcher.handle_value(value)
            if reply is not None:
                async with write_lock:
                    writer.write(encode_response(reply))
                    await writer.drain()

        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                decoder.feed(data)
                while True:
                    try:
                        complete, value = decoder.next_value()
                    except FramingError as exc:
                        log.info("RPC connection: parse error, closing: %s", exc)
                        writer.write(encode_response(error_reply(*PARSE_ERROR)))
                        return
                    if not complete:
                        break
                    t = asyncio.get_running_loop().create_task(answer(value))
                    pending.add(t)
                    t.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            for t in pending:
                t.cancel()
            self._connections.discard(task)
            try:
                writer.close()
            except Exception:
                pass

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.unlock()

    def unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.unlink(self.path + ".lock")
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

