"""vhostd-bench's RBD targets: where the image comes from and QSD's rbd node (no cluster needed)."""

import pytest

from vhostd.initiator.bench import build_parser
from vhostd.initiator.targets import QsdTarget, RbdSource, TargetError, VhostdTarget, make_target


def test_rbd_source_from_arguments_or_environment(monkeypatch):
    monkeypatch.delenv("VHOSTD_BENCH_RBD", raising=False)
    monkeypatch.delenv("CEPH_CONF", raising=False)
    assert RbdSource.parse("rbd/bench", "/c/ceph.conf") == RbdSource("rbd", "bench", "/c/ceph.conf")
    with pytest.raises(TargetError, match="POOL/IMAGE"):
        RbdSource.parse()
    with pytest.raises(TargetError, match="CEPH_CONF"):
        RbdSource.parse("rbd/bench")
    monkeypatch.setenv("VHOSTD_BENCH_RBD", "pool1/img")
    monkeypatch.setenv("CEPH_CONF", "/e/ceph.conf")
    assert RbdSource.parse() == RbdSource("pool1", "img", "/e/ceph.conf")
    assert make_target("vhostd-rbd").rbd == RbdSource("pool1", "img", "/e/ceph.conf")


def test_qsd_rbd_node_and_vhostd_rbd_target(tmp_path):
    source = RbdSource("rbd", "a,b", "/c/ceph.conf")
    qsd = make_target("qsd-rbd", rbd=source, workdir=str(tmp_path))
    assert isinstance(qsd, QsdTarget) and qsd.label == "qsd-rbd"
    node = qsd.command_line()[qsd.command_line().index("--blockdev") + 1]
    assert node == ("driver=rbd,node-name=disk0,pool=rbd,image=a,,b,conf=/c/ceph.conf,user=admin,"
                    "cache.direct=on")
    target = make_target("vhostd-rbd", rbd=source, workdir=str(tmp_path))
    assert isinstance(target, VhostdTarget) and (target.label, target.kind) == ("vhostd-blk-rbd", "blk")
    with pytest.raises(ValueError):
        VhostdTarget("rbd")


def test_bench_parser_takes_the_image_and_config():
    args = build_parser().parse_args(["--targets", "vhostd-rbd,qsd-rbd", "--rbd", "rbd/bench",
                                      "--ceph-conf", "/c/ceph.conf"])
    assert (args.rbd, args.ceph_conf) == ("rbd/bench", "/c/ceph.conf")
