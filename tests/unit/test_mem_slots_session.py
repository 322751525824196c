"""Memory hot-plug in the session (CONFIGURE_MEM_SLOTS): GET_MAX_MEM_SLOTS, and ADD_MEM_REG /
REM_MEM_REG on running queues, which stop (their reactors drain them) before the memory table
changes and start again after, so no request ever runs on a table being changed."""

import os

from vhostd.vhost import blk, scsi
from vhostd.vhost import protocol as p
from vhostd.vhost import session as s
from vhostd.vhost.features import ProtocolFeature, bit
from vhostd.vhost.protocol import Request

from tests.unit.test_vhost_session import FakeDevice, map_memory, message, negotiate, setup_queue

DIMM = p.MemoryRegion(0x100000000, 1 << 20, 0x9000000, 0)


def running(session):
    negotiate(session)
    map_memory(session)
    setup_queue(session, 0)
    session.queue_started(0)


def dimm_fd():
    fd = os.memfd_create("dimm")
    os.ftruncate(fd, 1 << 20)
    return fd


def test_blk_and_scsi_offer_configure_mem_slots():
    for features in (blk.PROTOCOL_FEATURES, scsi.PROTOCOL_FEATURES):
        assert features & bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)


def test_get_max_mem_slots_answers_the_data_plane_limit():
    session = s.Session(FakeDevice())
    (reply,) = session.receive(message(Request.GET_MAX_MEM_SLOTS))
    assert reply == s.Reply(Request.GET_MAX_MEM_SLOTS, p.encode_u64(s.MAX_MEM_SLOTS))


def test_add_mem_reg_stops_running_queues_maps_then_restarts_them():
    session = s.Session(FakeDevice())
    running(session)
    fd = dimm_fd()
    effects = session.receive(message(Request.ADD_MEM_REG, p.SingleRegion(DIMM).encode(), [fd], need_reply=True))
    assert effects[:3] == [s.StopQueue(0), s.AddMemoryRegion(DIMM, fd),
                           s.Reply(Request.ADD_MEM_REG, p.encode_u64(0))]
    assert s.Reconcile(0) in effects[3:]
    session.queue_stopped(0, 5)
    assert session.reconcile(0) == [s.StartQueue(0)]
    os.close(fd)


def test_rem_mem_reg_stops_running_queues_before_the_unmap():
    session = s.Session(FakeDevice())
    running(session)
    fd = dimm_fd()
    session.receive(message(Request.ADD_MEM_REG, p.SingleRegion(DIMM).encode(), [fd]))
    os.close(fd)
    session.queue_stopped(0, 5)
    session.reconcile(0)
    session.queue_started(0)
    effects = session.receive(message(Request.REM_MEM_REG, p.SingleRegion(DIMM).encode(), need_reply=True))
    assert effects[:3] == [s.StopQueue(0), s.RemoveMemoryRegion(DIMM),
                           s.Reply(Request.REM_MEM_REG, p.encode_u64(0))]


def test_rem_mem_reg_of_an_unknown_region_is_refused():
    session = s.Session(FakeDevice())
    running(session)
    effects = session.receive(message(Request.REM_MEM_REG, p.SingleRegion(DIMM).encode(), need_reply=True))
    assert effects == [s.Reply(Request.REM_MEM_REG, p.encode_u64(1))]
