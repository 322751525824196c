"""qemu-storage-daemon as a reference vhost-user-blk back-end for e2e tests (no pytest inside)."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

from guest import ProcessHarness, check_unix_path, die_with_parent, qemu_opt_value, tail_text, terminate


class StorageDaemonError(Exception):
    """qemu-storage-daemon did not start as expected."""


class StorageDaemon(ProcessHarness):
    """A qemu-storage-daemon exporting one image file as vhost-user-blk on a unix socket.

    A context manager: on exit the daemon is terminated and its socket and pid file are removed.
    """

    def __init__(
        self,
        image: str | os.PathLike[str],
        socket_path: str | os.PathLike[str],
        *,
        num_queues: int = 1,
        writable: bool = True,
        binary: str = "qemu-storage-daemon",
    ) -> None:
        check_unix_path(socket_path)
        self.socket_path = Path(socket_path)
        self.pid_path = self.socket_path.with_name(self.socket_path.name + ".pid")
        self.log_path = self.socket_path.with_name(self.socket_path.name + ".log")
        self.command_line = [
            binary,
            "--blockdev", f"driver=file,node-name=file0,filename={qemu_opt_value(image)},cache.direct=off",
            "--export",
            "type=vhost-user-blk,id=export0,node-name=file0,addr.type=unix,"
            f"addr.path={qemu_opt_value(self.socket_path)},writable={qemu_opt_value(writable)},"
            f"num-queues={num_queues}",
            # QSD writes the pid file once the export listens: the sign that QEMU may connect.
            "--pidfile", str(self.pid_path),
        ]
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the daemon and wait until its socket accepts connections."""
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                self.command_line, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )
        deadline = time.monotonic() + timeout_s
        while not (self.pid_path.exists() and self.socket_path.exists()):
            if self._proc.poll() is not None:
                raise self._error(f"exited with status {self._proc.returncode}")
            if time.monotonic() > deadline:
                raise self._error(f"not ready within {timeout_s:.0f} s")
            time.sleep(0.02)

    def close(self) -> None:
        """Terminate the daemon if it runs and remove its socket and pid file."""
        if self._proc is not None:
            terminate(self._proc)
        for path in (self.socket_path, self.pid_path):
            path.unlink(missing_ok=True)

    def _error(self, what: str) -> StorageDaemonError:
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        command = shlex.join(self.command_line)
        return StorageDaemonError(f"qemu-storage-daemon {what}\ncommand: {command}\n--- log ---\n{tail_text(log)}")
