"""The daemon: builds every part, runs until told to stop, tears everything down in order.

Start: reactors on the cpumask's cores, the RPC servers, then (unless --wait-for-rpc) the
framework initialization with the --json config applied as SPDK's loader does: STARTUP-state
methods, framework_start_init, RUNTIME methods.  Stop (SIGINT/SIGTERM, spdk_kill_instance):
controllers drained and their sockets removed, bdevs closed, reactors stopped, RPC sockets and the
lock removed.
"""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import signal
from dataclasses import dataclass, field

from . import _dataplane as dp
from .bdev import BdevRegistry, VirtioBlkBdev
from .bdev.base import parse_uuid
from .bdev.rbd import RbdManager
from .dataplane import ReactorSet
from .errors import AlreadyExists, NotFound
from .logs import Logs
from .metrics import Metrics
from .nvme.target import NvmfTarget
from .rpc import methods as _methods  # noqa: F401  (registers every method)
from .rpc.dispatch import Dispatcher
from .rpc.http import HttpServer, load_credentials
from .rpc.registry import REGISTRY, State
from .rpc.server import RpcServer
from .service_notify import ServiceNotifier
from .vhost.manager import VhostManager

log = logging.getLogger("vhostd.app")


class StartupError(Exception):
    """The daemon cannot start as configured (message for the operator)."""


@dataclass
class Options:
    socket_dir: str = "."
    rpc_socket: str = "/var/tmp/spdk.sock"
    cores: list[int] = field(default_factory=lambda: [0])
    config: str | None = None
    wait_for_rpc: bool = False
    http: tuple[str, int] | None = None
    http_auth: str | None = None
    log_level: str = "NOTICE"
    print_level: str = "INFO"
    log_format: str = "text"
    socket_mode: int = 0o600
    socket_group: str | None = None
    idle_sleep_us: float = 200.0


class App:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.logs = Logs(options.log_level, options.print_level, options.log_format)
        self.notifier = ServiceNotifier()
        self.state = State.STARTUP
        self.tick_rate = dp.tick_rate()
        self.reactors = ReactorSet(options.cores, options.idle_sleep_us)
        self.bdevs = BdevRegistry()
        self.rbd = RbdManager(self.bdevs)
        gid = None
        if options.socket_group is not None:
            try:
                gid = grp.getgrnam(options.socket_group).gr_gid
            except KeyError:
                raise StartupError("no group %r for --socket-group" % options.socket_group) from None
        self.vhost = VhostManager(options.socket_dir, self.reactors, self.bdevs.find,
                                  options.socket_mode, gid)
        self.nvmf = NvmfTarget(options.socket_mode, self.bdevs.find, self.reactors)
        self.metrics = Metrics(self)
        self.dispatcher = Dispatcher(self, REGISTRY, self.metrics.observe_rpc)
        self.rpc = RpcServer(options.rpc_socket, self.dispatcher)
        self.http: HttpServer | None = None
        self._initialized = asyncio.Event()
        self._stop = asyncio.Event()
        self._aliases_used: set[str] = set()
        self._thread_ids: dict[str, int] = {}

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until a stop signal; always tears down what was built."""
        loop = asyncio.get_running_loop()
        self.rpc.lock()            # before anything else: a second daemon stops here
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_stop)
            if not os.path.isdir(self.options.socket_dir):
                raise StartupError("socket directory %s does not exist" % self.options.socket_dir)
            self.reactors.start(loop)
            await self.rpc.start()
            if self.options.http is not None:
                creds = None
                if self.options.http_auth is not None:
                    try:
                        creds = load_credentials(self.options.http_auth)
                    except (OSError, ValueError) as exc:
                        raise StartupError("--http-auth: %s" % exc) from None
                self.http = HttpServer(self.dispatcher, self.metrics, *self.options.http, creds)
                await self.http.start()
            config = self._read_config()
            await self._apply(config, State.STARTUP)
            if self.options.wait_for_rpc:
                log.log(25, "waiting for framework_start_init (--wait-for-rpc)")
                self.notifier.status("waiting for framework_start_init on %s" % self.options.rpc_socket)
            else:
                await self.start_init()
            if await self._stopped_before(self._initialized):
                return
            await self._apply(config, State.RUNTIME)
            log.log(25, "vhostd ready: RPC %s, cores %s, sockets in %s", self.options.rpc_socket,
                    self.reactors.cores, os.path.abspath(self.options.socket_dir))
            self.notifier.ready("serving %d controllers on cores %s; RPC %s" % (
                len(self.vhost.controllers), self.reactors.cores, self.options.rpc_socket))
            await self._stop.wait()
        finally:
            await self.shutdown()

    async def _stopped_before(self, event: asyncio.Event) -> bool:
        """Wait for event; True if a stop was requested first."""
        waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._stop.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        return not event.is_set()

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.log(25, "stopping")
            self.notifier.stopping()
        self._stop.set()

    async def shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if self.http is not None:
            await self.http.stop()
        await self.rpc.stop()
        await self.vhost.shutdown()
        await self.nvmf.shutdown()
        for bdev in list(self.bdevs):
            if isinstance(bdev, VirtioBlkBdev):
                await self._release_virtio(bdev)
        if self.reactors.started:
            await self.reactors.stop()
        await self.rbd.close_all()
        self.bdevs.close_all()
        self.logs.close()

    async def start_init(self) -> None:
        """framework_start_init: the framework enters RUNTIME."""
        self.state = State.RUNTIME
        self._initialized.set()

    async def wait_init(self) -> None:
        await self._initialized.wait()

    def send_signal_soon(self, sig: int) -> None:
        """Signal ourselves once the current reply has been written."""
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), sig)

    # -- configuration ------------------------------------------------------------------------
    def _read_config(self) -> list[dict]:
        if self.options.config is None:
            return []
        try:
            with open(self.options.config, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise StartupError("cannot read config %s: %s" % (self.options.config, exc)) from None
        entries: list[dict] = []
        for sub in data.get("subsystems") or []:
            for item in sub.get("config") or []:
                entries.extend(item if isinstance(item, list) else [item])
        for entry in entries:
            if not isinstance(entry, dict) or REGISTRY.lookup(entry.get("method", "")) is None:
                raise StartupError("config %s: unknown method %r" % (self.options.config, entry))
        return entries

    async def _apply(self, entries: list[dict], phase: State) -> None:
        """Run the config entries callable in phase (STARTUP ones first, then RUNTIME ones)."""
        for number, entry in enumerate(entries):
            spec = REGISTRY.lookup(entry["method"])
            if phase is State.STARTUP:
                runs_now = bool(spec.states & State.STARTUP)
            else:
                runs_now = spec.states == State.RUNTIME
            if not runs_now:
                continue
            request = {"method": entry["method"], "id": number}
            if entry.get("params") is not None:
                request["params"] = entry["params"]
            reply = await self.dispatcher.handle(request)
            if "error" in reply:
                raise StartupError("config %s: %s failed: %s" % (self.options.config, entry["method"],
                                                                reply["error"]["message"]))

    # -- services for RPC handlers ------------------------------------------------------------
    def note_alias_use(self, alias: str, target: str) -> None:
        if alias not in self._aliases_used:
            self._aliases_used.add(alias)
            log.warning("RPC method %s is deprecated.  Use %s instead.", alias, target)

    def thread_id(self, name: str) -> int:
        """Stable ids for controller threads (app_thread is 1)."""
        return self._thread_ids.setdefault(name, len(self._thread_ids) + 2)

    async def bdev_resized(self, bdev) -> None:
        """A bdev's block count changed: its controllers tell their front-ends."""
        log.info("bdev %s now has %d blocks", bdev.name, bdev.num_blocks)
        await self.vhost.bdev_resized(bdev)

    async def attach_virtio_blk(self, name: str, socket_path: str, vq_count: int, vq_size: int) -> str:
        """bdev_virtio_attach_controller for a vhost-user-blk target: one bdev named name."""
        from .initiator.virtio_bdev import attach_blk
        for bdev in self.bdevs:
            if bdev.answers_to(name):
                raise AlreadyExists("bdev %s exists" % name)
        loop = asyncio.get_running_loop()
        device, disk = await loop.run_in_executor(None, attach_blk, socket_path, vq_count, vq_size)
        ident = parse_uuid(None)
        return self.bdevs.add(VirtioBlkBdev(name, ident, disk, device, socket_path, vq_count, vq_size)).name

    async def detach_virtio(self, name: str) -> None:
        bdev = self.bdevs.find(name)
        if not isinstance(bdev, VirtioBlkBdev):
            raise NotFound("%s is not a virtio bdev" % name)
        self.bdevs.delete(name, "virtio")
        await self._release_virtio(bdev)

    async def _release_virtio(self, bdev: VirtioBlkBdev) -> None:
        """Wait until no reactor drives the bdev's queues (they let go once idle), then close the
        front-end connection."""
        bdev.disk.remove()
        for _ in range(500):
            if bdev.disk.virtio_released:
                break
            for r in self.reactors.reactors:       # wake sleeping reactors so they notice
                if r.running:
                    await self.reactors.wait(r, r.post_barrier())
            await asyncio.sleep(0.01)
        if bdev.disk.virtio_released:
            bdev.disk.close()
            await asyncio.get_running_loop().run_in_executor(None, bdev.device.close)
        else:
            log.error("virtio bdev %s: queues still in use; connection kept open", bdev.name)

