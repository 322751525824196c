"""Namespaces from bdevs on the NVMe-oF target: NSID choice, identifiers (UUID from the bdev,
NGUID from the UUID), claims, and what Identify then reports at 512- and 4096-byte blocks."""

import struct
import uuid

import pytest

from vhostd.errors import AlreadyExists, Busy, InvalidArgument, NotFound
from vhostd.nvme import admin as a
from vhostd.nvme.command import Submission
from vhostd.nvme.function import NvmeFunction
from vhostd.nvme.target import NvmfTarget

NQN = "nqn.2016-06.io.spdk:ns"


class FakeBdev:
    def __init__(self, name, block_size, num_blocks):
        self.name, self.block_size, self.num_blocks = name, block_size, num_blocks
        self.uuid = uuid.uuid4()
        self.claimed_by = None

    def claim(self, holder):
        if self.claimed_by is not None:
            raise Busy("claimed")
        self.claimed_by = holder

    def release(self, holder):
        if self.claimed_by is holder:
            self.claimed_by = None


@pytest.fixture
def target():
    bdevs = {"A": FakeBdev("A", 512, 8192), "B": FakeBdev("B", 4096, 1000), "C": FakeBdev("C", 512, 1)}

    def find(name):
        try:
            return bdevs[name]
        except KeyError:
            raise NotFound(name) from None
    t = NvmfTarget(find_bdev=find)
    t.bdevs = bdevs
    t.create_subsystem(NQN, "SN", "MN", max_namespaces=4)
    return t


def identify(function, cns, nsid=0):
    sub = Submission(a.Opcode.IDENTIFY, 0, 1, nsid, 0, 0, 0, cns, 0, 0, 0)
    return function.admin.execute(Submission.decode(sub.encode())).data


def test_namespaces_get_the_lowest_free_nsid_and_the_bdevs_identifiers(target):
    a_ns = target.add_namespace(NQN, "A")
    b_ns = target.add_namespace(NQN, "B", nsid=3, eui64="0011223344556677")
    c_ns = target.add_namespace(NQN, "C")
    assert (a_ns.nsid, b_ns.nsid, c_ns.nsid) == (1, 3, 2)
    assert a_ns.uuid == target.bdevs["A"].uuid and a_ns.nguid == a_ns.uuid.bytes
    assert b_ns.eui64 == bytes.fromhex("0011223344556677")
    assert target.bdevs["A"].claimed_by is target.subsystem(NQN)


def test_namespace_errors(target):
    target.add_namespace(NQN, "A", nsid=2)
    with pytest.raises(Busy):
        target.add_namespace(NQN, "A")
    with pytest.raises(AlreadyExists):
        target.add_namespace(NQN, "B", nsid=2)
    with pytest.raises(InvalidArgument):
        target.add_namespace(NQN, "B", nsid=5)            # above max_namespaces
    with pytest.raises(InvalidArgument):
        target.add_namespace(NQN, "B", nguid="abcd")
    with pytest.raises(InvalidArgument):
        target.add_namespace(NQN, "B", uuid="not-a-uuid")
    with pytest.raises(AlreadyExists):
        target.add_namespace(NQN, "B", uuid=str(target.bdevs["A"].uuid))
    with pytest.raises(NotFound):
        target.add_namespace(NQN, "missing")
    with pytest.raises(NotFound):
        target.remove_namespace(NQN, 1)
    assert target.bdevs["B"].claimed_by is None           # no failed attempt kept a claim
    target.remove_namespace(NQN, 2)
    assert target.bdevs["A"].claimed_by is None


def test_identify_reports_the_namespaces_at_their_block_sizes(target):
    target.add_namespace(NQN, "A")
    target.add_namespace(NQN, "B", nsid=3)
    function = NvmeFunction("t")
    try:
        function.set_namespaces(target.subsystem(NQN).namespace_infos())
        assert struct.unpack_from("<3I", identify(function, 2)) == (1, 3, 0)
        for nsid, name, lbads in ((1, "A", 9), (3, "B", 12)):
            bdev = target.bdevs[name]
            data = identify(function, 0, nsid)
            assert struct.unpack_from("<QQQ", data) == (bdev.num_blocks,) * 3
            assert data[26] == 0 and (struct.unpack_from("<I", data, 128)[0] >> 16) & 0xFF == lbads
            assert data[104:120] == bdev.uuid.bytes
            descriptors = identify(function, 3, nsid)
            assert bdev.uuid.bytes in descriptors
        assert identify(function, 0, 2) == bytes(4096)    # inactive NSID
        target.remove_namespace(NQN, 1)
        function.set_namespaces(target.subsystem(NQN).namespace_infos())
        assert struct.unpack_from("<2I", identify(function, 2)) == (3, 0)
    finally:
        function.close()
