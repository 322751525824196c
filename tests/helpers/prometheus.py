"""A real Prometheus server (Debian's prometheus) for tests: started on a free loopback port with a
config the test writes, queried over its HTTP API."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from tests.helpers.ports import free_tcp_port
from tests.helpers.waiting import wait_for


class Prometheus:
    def __init__(self, workdir: Path, config: dict) -> None:
        self.workdir = workdir
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.port = free_tcp_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> Prometheus:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["prometheus", "--config.file=%s" % self.config_path,
                 "--storage.tsdb.path=%s" % (self.workdir / "data"),
                 "--web.listen-address=127.0.0.1:%d" % self.port, "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("prometheus exited %d:\n%s" % (self.proc.returncode, self.log()))
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("prometheus not ready:\n" + self.log())
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self, path: str, **params) -> dict:
        url = self.url + "/api/v1/" + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=20) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query's vector: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        params = {"query": expr}
        if at is not None:
            params["time"] = "%.3f" % at
        data = self.api("query", **params)
        assert data["resultType"] == "vector", data
        return data["result"]

    def wait_for(self, expr: str, what: str, timeout_s: float = 60.0) -> list[dict]:
        """The query's vector once it has series."""
        result: list[dict] = []

        def has_series() -> bool:
            result[:] = self.query(expr)
            return bool(result)

        try:
            wait_for(has_series, timeout=timeout_s, interval=0.5)
        except TimeoutError:
            raise AssertionError("%s: %s gave no series within %.0f s\n%s"
                                 % (what, expr, timeout_s, self.log())) from None
        return result

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
