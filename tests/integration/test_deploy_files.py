"""The files a deployment starts from: the demo config `make run` and the image load, and the docker
files (the engine does not run here, so they are checked for what can be checked: they parse, their
command line is one vhostd accepts, and what they refer to exists)."""

import json
import re
from pathlib import Path

import yaml

from vhostd.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def test_demo_config_starts_a_blk_and_a_scsi_controller(daemon):
    d = daemon(config=str(ROOT / "scripts" / "demo-config.json"))
    infos = {c["ctrlr"]: c for c in d.spdk("vhost_get_controllers")}
    assert infos["vhost.0"]["backend_specific"]["block"]["bdev"] == "Malloc0"
    assert [t["luns"][0]["bdev_name"] for t in infos["vhost.1"]["backend_specific"]["scsi"]] == ["Malloc1", "Null0"]
    for name in infos:
        assert (d.socket_dir / name).exists()


def _dockerfile_command() -> list[str]:
    text = (ROOT / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.M)
    (entry,) = re.findall(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    assert json.loads(entry) == ["vhostd"]
    return json.loads(cmd)


def test_compose_file_parses_and_runs_vhostd_with_options_it_accepts():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    vhostd = compose["services"]["vhostd"]
    prometheus = compose["services"]["prometheus"]
    assert vhostd["build"]["dockerfile"] == "docker/Dockerfile"
    assert (ROOT / vhostd["build"]["context"].replace("..", ".") / vhostd["build"]["dockerfile"]).exists()
    for command in (vhostd["command"], _dockerfile_command()):
        args = build_parser().parse_args(command)
        assert args.http == ("0.0.0.0", 9250)
        assert args.config == "/etc/vhostd/config.json" and args.rpc_socket == "/var/run/vhostd/spdk.sock"
    assert "127.0.0.1:9250:9250" in vhostd["ports"]
    assert prometheus["depends_on"] == ["vhostd"]
    scrape = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["vhostd:9250"]
    assert "COPY scripts/demo-config.json /etc/vhostd/config.json" in (ROOT / "docker" / "Dockerfile").read_text()
