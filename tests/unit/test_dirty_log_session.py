"""The dirty-log part of the vhost-user session (live migration), driven with encoded messages:
SET_LOG_BASE, SET_LOG_FD, LOG_ALL toggled live by SET_FEATURES, used-ring logging by SET_VRING_ADDR."""

import os

import pytest

from vhostd.vhost import blk, scsi
from vhostd.vhost import protocol as p
from vhostd.vhost import session as s
from vhostd.vhost.features import ProtocolFeature, VirtioFeature, bit
from vhostd.vhost.protocol import Request

from tests.unit.test_vhost_session import FakeDevice, eventfd, map_memory, message, setup_queue

LOG_ALL = bit(VirtioFeature.VHOST_LOG_ALL)


class MigratableDevice(FakeDevice):
    features = FakeDevice.features | LOG_ALL
    protocol_features = FakeDevice.protocol_features | bit(ProtocolFeature.LOG_SHMFD)


def negotiated_session(protocol=MigratableDevice.protocol_features):
    session = s.Session(MigratableDevice())
    session.receive(message(Request.SET_PROTOCOL_FEATURES, p.encode_u64(protocol)))
    session.receive(message(Request.SET_OWNER))
    session.receive(message(Request.SET_FEATURES, p.encode_u64(FakeDevice.features)))
    return session


def running_session():
    session = negotiated_session()
    map_memory(session)
    setup_queue(session, 0)
    session.queue_started(0)
    return session


def log_fd():
    fd = os.memfd_create("log")
    os.ftruncate(fd, 4096)
    return fd


def fd_is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_set_log_base_maps_the_log_then_replies_with_a_u64():
    session = negotiated_session()
    fd = log_fd()
    effects = session.receive(message(Request.SET_LOG_BASE, p.LogBase(4096, 0).encode(), [fd]))
    assert effects == [s.MapLog(fd, 4096, 0), s.Reply(Request.SET_LOG_BASE, p.encode_u64(0))]
    assert session.log_mapped and not session.logging      # LOG_ALL not acked yet
    os.close(fd)


def test_set_log_base_without_log_shmfd_is_refused_and_its_fd_closed():
    session = negotiated_session(protocol=FakeDevice.protocol_features)
    fd = log_fd()
    effects = session.receive(message(Request.SET_LOG_BASE, p.LogBase(4096, 0).encode(), [fd],
                                      need_reply=True))
    assert effects == [s.Reply(Request.SET_LOG_BASE, p.encode_u64(1))]
    assert not fd_is_open(fd) and not session.log_mapped


def test_set_log_base_without_its_fd_breaks_the_session():
    session = negotiated_session()
    with pytest.raises(p.ProtocolError):
        session.receive(message(Request.SET_LOG_BASE, p.LogBase(4096, 0).encode()))
    assert session.broken


def test_set_log_base_of_zero_bytes_breaks_the_session_and_closes_the_fd():
    session = negotiated_session()
    fd = log_fd()
    with pytest.raises(p.ProtocolError):
        session.receive(message(Request.SET_LOG_BASE, p.LogBase(0, 0).encode(), [fd]))
    assert session.broken and not fd_is_open(fd)


def test_log_all_turns_logging_on_without_stopping_running_queues():
    session = running_session()
    fd = log_fd()
    session.receive(message(Request.SET_LOG_BASE, p.LogBase(4096, 0).encode(), [fd]))
    effects = session.receive(message(Request.SET_FEATURES, p.encode_u64(FakeDevice.features | LOG_ALL),
                                      need_reply=True))
    # The queues learn it before the front-end does (its reply is the last effect).
    assert effects == [s.UpdateLogging(), s.Reply(Request.SET_FEATURES, p.encode_u64(0))]
    assert session.logging and session.vrings[0].running
    effects = session.receive(message(Request.SET_FEATURES, p.encode_u64(FakeDevice.features)))
    assert effects == [s.UpdateLogging()] and not session.logging
    os.close(fd)


def test_other_feature_changes_still_restart_the_queues():
    session = running_session()
    effects = session.receive(message(Request.SET_FEATURES,
                                      p.encode_u64(bit(VirtioFeature.VERSION_1) | LOG_ALL)))
    assert effects[0] == s.StopQueue(0)


def test_log_flag_on_a_running_ring_updates_its_used_ring_logging():
    session = running_session()
    desc, used, avail = 0x7000000, 0x7002000, 0x7001000   # as setup_queue gives them
    addr = p.VringAddr(0, p.VRING_F_LOG, desc, used, avail, 0x1000)
    effects = session.receive(message(Request.SET_VRING_ADDR, addr.encode(), need_reply=True))
    assert effects == [s.UpdateLogging(), s.Reply(Request.SET_VRING_ADDR, p.encode_u64(0))]
    assert (session.vrings[0].log_used, session.vrings[0].log_gpa) == (True, 0x1000)
    # The same again changes nothing.
    assert session.receive(message(Request.SET_VRING_ADDR, addr.encode())) == []
    off = p.VringAddr(0, 0, desc, used, avail, 0x1000)
    assert session.receive(message(Request.SET_VRING_ADDR, off.encode())) == [s.UpdateLogging()]
    assert not session.vrings[0].log_used


def test_log_flag_on_a_stopped_ring_is_kept_for_its_start():
    session = negotiated_session()
    addr = p.VringAddr(1, p.VRING_F_LOG, 0x7000000, 0x7001000, 0x7002000, 0x5000)
    session.receive(message(Request.SET_VRING_ADDR, addr.encode()))
    assert (session.vrings[1].log_used, session.vrings[1].log_gpa) == (True, 0x5000)


def test_set_log_fd_keeps_the_last_fd_and_closes_the_one_before():
    session = negotiated_session()
    first, second = eventfd(), eventfd()
    session.receive(message(Request.SET_LOG_FD, fds=[first]))
    session.receive(message(Request.SET_LOG_FD, fds=[second]))
    assert not fd_is_open(first)
    assert second in session.owned_fds()
    os.close(second)


def test_set_log_fd_without_an_fd_breaks_the_session():
    session = negotiated_session()
    with pytest.raises(p.ProtocolError):
        session.receive(message(Request.SET_LOG_FD))


def test_blk_and_scsi_offer_the_dirty_log():
    for protocol in (blk.PROTOCOL_FEATURES, scsi.PROTOCOL_FEATURES):
        assert protocol & bit(ProtocolFeature.LOG_SHMFD)
    assert blk.RING_FEATURES & LOG_ALL and scsi.FEATURES & LOG_ALL
