"""Run the real vhostd daemon in a subprocess and talk to it: SPDK's own client (spdk-rpc, from
the PyPI ``spdk`` package) and our JSON client.  Used by integration and e2e tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vhostd.rpc.client import RpcCallError, call_unix

REPO_ROOT = Path(__file__).resolve().parents[2]


class SpdkRpcError(Exception):
    def __init__(self, rc: int, stdout: str, stderr: str) -> None:
        super().__init__("spdk-rpc exited %d: %s%s" % (rc, stdout, stderr))
        self.rc, self.stdout, self.stderr = rc, stdout, stderr

    def error(self) -> dict:
        """The JSON-RPC error object spdk-rpc printed ({"code", "message"})."""
        text = self.stdout
        start = text.index("response:") + len("response:")
        return json.loads(text[start:])


class Daemon:
    """A vhostd process with its own RPC socket and socket directory (short /tmp paths)."""

    def __init__(self, *args: str, workdir: str | None = None, cores: str = "0x1",
                 config: str | None = None, env: dict[str, str] | None = None) -> None:
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="vhd-", dir="/tmp")
        self.dir = Path(workdir or self._tmp.name)
        self.socket_dir = self.dir / "sockets"
        self.socket_dir.mkdir(exist_ok=True)
        self.rpc_socket = str(self.dir / "spdk.sock")
        self.log_path = self.dir / "vhostd.log"
        self.args = ["-S", str(self.socket_dir), "-r", self.rpc_socket, "-m", cores, *args]
        if config:
            self.args += ["--json", config]
        self.proc: subprocess.Popen | None = None
        self.env = dict(env or {})

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "vhostd.cli", *self.args]

    def start(self, wait: bool = True, timeout: float = 20.0) -> Daemon:
        env = dict(os.environ, **self.env, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command, cwd=self.dir, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("vhostd exited with %d:\n%s" % (self.proc.returncode, self.log()))
            try:
                call_unix(self.rpc_socket, "rpc_get_methods", timeout=2)
                return
            except (OSError, RpcCallError):
                if time.monotonic() > deadline:
                    raise TimeoutError("vhostd did not answer on %s:\n%s" % (self.rpc_socket, self.log()))
                time.sleep(0.05)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def rpc(self, method: str, **params):
        """Our client: the result, or RpcCallError (code, message)."""
        return call_unix(self.rpc_socket, method, params or None)

    def spdk(self, *args: str, stdin: str | None = None, check: bool = True):
        """SPDK's rpc.py against this daemon: parsed JSON output (or text), SpdkRpcError on failure."""
        result = subprocess.run([sys.executable, "-m", "spdk.spdk_rpc", "-s", self.rpc_socket, *args],
                                input=stdin, capture_output=True, text=True, timeout=120)
        if result.returncode != 0 and check:
            raise SpdkRpcError(result.returncode, result.stdout, result.stderr)
        out = result.stdout.strip()
        try:
            return json.loads(out) if out else None
        except ValueError:
            return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
