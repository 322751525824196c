"""vhostd under a service manager: systemd's notify protocol on a real datagram socket, the unit
file as systemd-analyze sees it, JSON log lines, and the Kubernetes DaemonSet example (parsed, its
command line and probes checked against what vhostd accepts and serves)."""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from vhostd.cli import build_parser
from tests.helpers.ports import free_tcp_port

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "scripts" / "systemd" / "vhostd.service"
DAEMONSET = ROOT / "docker" / "kubernetes" / "vhostd-daemonset.yaml"
DEMO_CONFIG = ROOT / "scripts" / "demo-config.json"


def receive(sock: socket.socket, timeout_s: float = 20.0) -> dict[str, str]:
    sock.settimeout(timeout_s)
    data = sock.recv(4096).decode()
    assert data.endswith("\n"), data
    return dict(line.split("=", 1) for line in data.splitlines())


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path, monkeypatch):
    """A datagram socket like the one systemd passes; NOTIFY_SOCKET names it in the environment
    the daemon starts with."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify")
        sock.bind(address)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
    else:
        name = "vhostd-test-notify-%d" % os.getpid()
        sock.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield sock
    sock.close()


def test_ready_once_rpc_and_controllers_are_up_then_stopping_on_sigterm(daemon, notify_socket):
    d = daemon(config=str(DEMO_CONFIG), start=False)
    d.start(wait=False)
    ready = receive(notify_socket)
    assert ready["READY"] == "1" and ready["MAINPID"] == str(d.proc.pid)
    assert "serving 2 controllers" in ready["STATUS"]
    # Ready means usable: the RPC answers and the controllers' sockets are there.
    assert sorted(c["ctrlr"] for c in d.rpc("vhost_get_controllers")) == ["vhost.0", "vhost.1"]
    assert (d.socket_dir / "vhost.0").exists() and (d.socket_dir / "vhost.1").exists()
    d.proc.send_signal(15)
    stopping = receive(notify_socket)
    assert stopping["STOPPING"] == "1"
    assert d.proc.wait(20) == 0


def test_wait_for_rpc_reports_status_and_is_ready_only_after_init(daemon, notify_socket):
    d = daemon("--wait-for-rpc", start=False)
    d.start()
    assert "waiting for framework_start_init" in receive(notify_socket)["STATUS"]
    d.rpc("framework_start_init")
    assert receive(notify_socket)["READY"] == "1"


def test_without_notify_socket_nothing_is_sent_and_a_dead_socket_is_only_logged(daemon, tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    d = daemon()
    assert d.rpc("spdk_get_version")["version"]
    d.stop()
    assert "cannot notify the service manager" in d.log()


def _unit_exec_start() -> list[str]:
    text = UNIT.read_text().replace("\\\n", " ")
    (line,) = [l for l in text.splitlines() if l.startswith("ExecStart=")]
    return shlex.split(line[len("ExecStart="):])


def _verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                          env=dict(os.environ, SYSTEMD_LOG_COLOR="0"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None and not os.environ.get("CI"),
                    reason="systemd-analyze is not installed")
def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    vhostd = Path(sys.executable).with_name("vhostd")
    assert vhostd.exists()
    text = UNIT.read_text().replace("/usr/local/bin/vhostd", str(vhostd))
    unit = tmp_path / "vhostd.service"
    unit.write_text(text)
    result = _verify(unit)
    assert result.returncode == 0 and str(unit) not in result.stdout + result.stderr, result.stderr
    # The check can fail: a misspelt service type is reported.
    broken = tmp_path / "broken" / "vhostd.service"
    broken.parent.mkdir()
    broken.write_text(text.replace("Type=notify", "Type=notifyy"))
    assert "Failed to parse service type" in _verify(broken).stderr


def test_unit_file_runs_a_command_line_vhostd_accepts_under_run_vhostd():
    unit = UNIT.read_text()
    assert "Type=notify" in unit and "RuntimeDirectory=vhostd" in unit
    command = _unit_exec_start()
    assert command[0] == "/usr/local/bin/vhostd"
    args = build_parser().parse_args(command[1:])
    assert args.socket_dir == "/run/vhostd" and args.rpc_socket == "/run/vhostd/spdk.sock"
    assert args.log_format == "json"


def test_json_log_format_is_one_object_per_line(daemon):
    d = daemon("--log-format", "json", "-L", "INFO")
    d.spdk("bdev_malloc_create", "-b", "Malloc0", "8", "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "Malloc0")
    d.rpc("construct_vhost_blk_controller", ctrlr="vhost.1", dev_name="Malloc0")   # legacy alias: a WARNING
    d.stop()
    lines = [l for l in d.log().splitlines() if l.strip()]
    records = [json.loads(l) for l in lines]
    assert {"time", "level", "logger", "message", "pid"} <= set(records[0])
    assert all(r["time"].endswith("Z") and r["pid"] == d.proc.pid for r in records)
    messages = {(r["level"], r["message"].split(":")[0]) for r in records}
    assert ("NOTICE", "vhostd ready") in messages
    assert any(r["level"] == "WARNING" and "deprecated" in r["message"] for r in records)


def _daemonset() -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(DAEMONSET.read_text()))
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    return config_map, daemonset


def test_daemonset_runs_vhostd_with_host_sockets_probes_and_scrape_annotations():
    config_map, ds = _daemonset()
    assert ds["apiVersion"] == "apps/v1"
    template = ds["spec"]["template"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (container,) = template["spec"]["containers"]
    args = build_parser().parse_args(container["args"])
    assert container["command"] == ["vhostd"]
    (port,) = container["ports"]
    assert args.http == ("0.0.0.0", port["containerPort"])
    for probe in (container["livenessProbe"], container["readinessProbe"]):
        assert probe["httpGet"]["path"] == "/healthz" and probe["httpGet"]["port"] == port["name"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert set(mounts) == set(volumes)
    assert mounts["sockets"]["mountPath"] == args.socket_dir == volumes["sockets"]["hostPath"]["path"]
    assert os.path.dirname(args.rpc_socket) == args.socket_dir
    config_mount = mounts["config"]
    assert config_mount["mountPath"] == args.config and config_mount["subPath"] in config_map["data"]
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert os.path.dirname(args.http_auth) == mounts["http-auth"]["mountPath"]


def test_daemonset_config_starts_its_controller_and_healthz_answers_without_auth(daemon, tmp_path):
    config_map, ds = _daemonset()
    config = tmp_path / "config.json"
    config.write_text(config_map["data"]["config.json"])
    auth = tmp_path / "http-auth"
    auth.write_text("prometheus:secret\n")
    port = free_tcp_port()
    d = daemon("--http", "127.0.0.1:%d" % port, "--http-auth", str(auth), "--log-format", "json",
               config=str(config))
    assert [c["ctrlr"] for c in d.rpc("vhost_get_controllers")] == ["vhost.0"]
    with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % port, timeout=10) as reply:
        assert json.load(reply) == {"status": "ok", "state": "runtime"}
