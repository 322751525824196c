"""The vhost-user session state machine, driven with encoded messages (no sockets, no reactors)."""

import os

import pytest

from vhostd.vhost import protocol as p
from vhostd.vhost import session as s
from vhostd.vhost.features import ProtocolFeature, VirtioFeature, bit, mask
from vhostd.vhost.protocol import Request


class FakeDevice:
    name = "test"
    features = mask(VirtioFeature.VERSION_1, VirtioFeature.RING_EVENT_IDX,
                    VirtioFeature.VHOST_USER_PROTOCOL_FEATURES)
    protocol_features = mask(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG,
                             ProtocolFeature.INFLIGHT_SHMFD, ProtocolFeature.CONFIGURE_MEM_SLOTS)
    max_queues = 2

    def __init__(self):
        self.config = bytes(range(60))

    def read_config(self, offset, size):
        window = self.config[offset:offset + size]
        return window + bytes(size - len(window))

    def write_config(self, offset, data, flags):
        return False


def message(request, body=b"", fds=(), need_reply=False):
    """Bytes on the wire → a decoded Message, as the transport hands it over."""
    flags = p.VERSION | (p.FLAG_NEED_REPLY if need_reply else 0)
    reader = p.MessageReader()
    reader.feed(p.encode(request, body, flags), list(fds))
    return reader.next_message()


def eventfd():
    return os.eventfd(0, os.EFD_NONBLOCK)


@pytest.fixture
def session():
    return s.Session(FakeDevice())


def negotiate(session, protocol=FakeDevice.protocol_features):
    session.receive(message(Request.SET_PROTOCOL_FEATURES, p.encode_u64(protocol)))
    session.receive(message(Request.SET_OWNER))
    session.receive(message(Request.SET_FEATURES, p.encode_u64(FakeDevice.features)))


def map_memory(session):
    fd = os.memfd_create("t")
    os.ftruncate(fd, 1 << 20)
    table = p.MemoryTable((p.MemoryRegion(0, 1 << 20, 0x7000000, 0),))
    return session.receive(message(Request.SET_MEM_TABLE, table.encode(), [fd]))


def setup_queue(session, index, enable=True):
    effects = []
    effects += session.receive(message(Request.SET_VRING_NUM, p.VringState(index, 128).encode()))
    effects += session.receive(message(Request.SET_VRING_BASE, p.VringState(index, 7).encode()))
    effects += session.receive(message(Request.SET_VRING_ADDR, p.VringAddr(index, 0, 0x7000000, 0x7002000, 0x7001000).encode()))
    effects += session.receive(message(Request.SET_VRING_KICK, p.VringFile(index, False).encode(), [eventfd()]))
    if enable:
        effects += session.receive(message(Request.SET_VRING_ENABLE, p.VringState(index, 1).encode()))
    return effects


def test_get_features_replies_with_the_device_features(session):
    (reply,) = session.receive(message(Request.GET_FEATURES))
    assert reply == s.Reply(Request.GET_FEATURES, p.encode_u64(FakeDevice.features))


def test_features_not_offered_are_refused_with_a_negative_ack(session):
    session.receive(message(Request.SET_PROTOCOL_FEATURES, p.encode_u64(bit(ProtocolFeature.REPLY_ACK))))
    effects = session.receive(message(Request.SET_FEATURES, p.encode_u64(1 << 5), need_reply=True))
    assert effects == [s.Reply(Request.SET_FEATURES, p.encode_u64(1))]
    assert session.acked_features == 0


def test_reply_ack_only_when_negotiated_and_asked(session):
    assert session.receive(message(Request.SET_OWNER, need_reply=True)) == []
    session.receive(message(Request.SET_PROTOCOL_FEATURES, p.encode_u64(bit(ProtocolFeature.REPLY_ACK))))
    assert session.receive(message(Request.SET_OWNER, need_reply=True)) == [
        s.Reply(Request.SET_OWNER, p.encode_u64(0))]


def test_queue_starts_when_addressed_kicked_and_enabled(session):
    negotiate(session)
    map_memory(session)
    effects = setup_queue(session, 0, enable=False)
    assert not any(isinstance(e, s.StartQueue) for e in effects)
    effects = session.receive(message(Request.SET_VRING_ENABLE, p.VringState(0, 1).encode()))
    assert effects == [s.StartQueue(0)]


def test_without_protocol_features_rings_start_enabled(session):
    session.receive(message(Request.SET_FEATURES, p.encode_u64(bit(VirtioFeature.VERSION_1))))
    map_memory(session)
    assert s.StartQueue(0) in setup_queue(session, 0, enable=False)


def test_get_vring_base_of_a_running_queue_stops_it_then_replies(session):
    negotiate(session)
    map_memory(session)
    setup_queue(session, 0)
    session.queue_started(0)
    effects = session.receive(message(Request.GET_VRING_BASE, p.VringState(0, 0).encode()))
    assert effects[0] == s.StopQueue(0)
    assert isinstance(effects[1], s.CloseFds)            # the kick fd, after the stop
    reply = session.queue_stopped(0, 42)
    assert reply == [s.Reply(Request.GET_VRING_BASE, p.VringState(0, 42).encode())]


def test_get_vring_base_of_a_stopped_queue_replies_with_its_base(session):
    negotiate(session)
    (reply,) = session.receive(message(Request.GET_VRING_BASE, p.VringState(1, 0).encode()))
    assert reply == s.Reply(Request.GET_VRING_BASE, p.VringState(1, 0).encode())


def test_disable_then_enable_resumes_where_the_queue_stopped(session):
    negotiate(session)
    map_memory(session)
    setup_queue(session, 0)
    session.queue_started(0)
    assert session.receive(message(Request.SET_VRING_ENABLE, p.VringState(0, 0).encode())) == [s.StopQueue(0)]
    session.queue_stopped(0, 99)
    assert session.receive(message(Request.SET_VRING_ENABLE, p.VringState(0, 1).encode())) == [s.StartQueue(0)]
    assert session.vrings[0].base == 99


def test_new_memory_table_stops_running_queues_then_restarts_them(session):
    negotiate(session)
    map_memory(session)
    setup_queue(session, 0)
    session.queue_started(0)
    effects = map_memory(session)
    assert effects[0] == s.StopQueue(0)
    assert isinstance(effects[1], s.MapMemory)
    assert s.Reconcile(0) in effects
    session.queue_stopped(0, 7)
    assert session.reconcile(0) == [s.StartQueue(0)]
    for effect in effects:
        if isinstance(effect, s.MapMemory):
            for _, fd in effect.regions:
                os.close(fd)


def test_call_fd_change_on_a_running_queue_goes_through_the_reactor(session):
    negotiate(session)
    map_memory(session)
    setup_queue(session, 0)
    first = eventfd()
    session.receive(message(Request.SET_VRING_CALL, p.VringFile(0, False).encode(), [first]))
    session.queue_started(0)
    effects = session.receive(message(Request.SET_VRING_CALL, p.VringFile(0, True).encode()))
    assert effects == [s.UpdateQueueFds(0, (first,))]
    assert session.vrings[0].call_fd is None


def test_get_config_returns_a_window_of_the_same_size(session):
    session.receive(message(Request.SET_PROTOCOL_FEATURES, p.encode_u64(bit(ProtocolFeature.CONFIG))))
    (reply,) = session.receive(message(Request.GET_CONFIG, p.ConfigSpace(0, 57, 0, bytes(57)).encode()))
    assert reply.payload == p.ConfigSpace(0, 57, 0, bytes(range(57))).encode()


def test_queue_index_out_of_range_is_refused(session):
    negotiate(session)
    effects = session.receive(message(Request.SET_VRING_NUM, p.VringState(5, 128).encode(), need_reply=True))
    assert effects == [s.Reply(Request.SET_VRING_NUM, p.encode_u64(1))]


@pytest.mark.parametrize("size", [0, 3, 2048])
def test_bad_queue_sizes_are_refused(session, size):
    negotiate(session)
    effects = session.receive(message(Request.SET_VRING_NUM, p.VringState(0, size).encode(), need_reply=True))
    assert effects == [s.Reply(Request.SET_VRING_NUM, p.encode_u64(1))]


def test_wrong_payload_size_breaks_the_session(session):
    with pytest.raises(p.ProtocolError):
        session.receive(message(Request.SET_FEATURES, b"\0" * 4))
    assert session.broken
    with pytest.raises(p.ProtocolError):
        session.receive(message(Request.GET_FEATURES))


def test_missing_fd_breaks_the_session(session):
    with pytest.raises(p.ProtocolError):
        session.receive(message(Request.SET_VRING_KICK, p.VringFile(0, False).encode()))
    assert session.broken


def test_extra_fds_are_closed_and_break_the_session(session):
    fd = eventfd()
    with pytest.raises(p.ProtocolError):
        session.receive(message(Request.SET_VRING_KICK, p.VringFile(0, True).encode(), [fd]))
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize("request_, body", [
    (Request.GET_FEATURES, b""),
    (Request.SET_OWNER, b""),
    (Request.SET_PROTOCOL_FEATURES, p.encode_u64(0)),
    (Request.SET_VRING_NUM, p.VringState(0, 64).encode()),
    (Request.SET_VRING_ENABLE, p.VringState(0, 1).encode()),
    (Request.GET_VRING_BASE, p.VringState(0, 0).encode()),
    (Request.GET_CONFIG, p.ConfigSpace(0, 8, 0, bytes(8)).encode()),
])
def test_fds_sent_with_a_request_that_takes_none_are_closed(session, request_, body):
    fds = [eventfd(), eventfd()]
    session.receive(message(request_, body, fds))
    assert not session.broken
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_reader_refuses_more_than_eight_fds_for_one_message():
    reader = p.MessageReader()
    data = p.encode(Request.SET_OWNER)
    fds = [eventfd() for _ in range(9)]
    reader.feed(data[:4], fds[:8])
    with pytest.raises(p.ProtocolError):
        reader.feed(data[4:8], fds[8:])
    reader.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_unknown_request_is_refused_without_breaking(session):
    session.receive(message(Request.SET_PROTOCOL_FEATURES, p.encode_u64(bit(ProtocolFeature.REPLY_ACK))))
    effects = session.receive(message(200, need_reply=True))
    assert effects == [s.Reply(200, p.encode_u64(1))]
    assert not session.broken


def test_inflight_fd_requires_the_feature(session):
    info = p.InflightInfo(0, 0, 1, 128)
    with pytest.raises(p.ProtocolError):
        session.receive(message(Request.GET_INFLIGHT_FD, info.encode()))


def test_get_inflight_fd_asks_the_connection_for_a_region(session):
    negotiate(session)
    effects = session.receive(message(Request.GET_INFLIGHT_FD, p.InflightInfo(0, 0, 2, 128).encode()))
    assert s.CreateInflight(2, 128) in effects
    reply = session.inflight_created(s.CreateInflight(2, 128), 99, 4352)
    assert reply == [s.Reply(Request.GET_INFLIGHT_FD, p.InflightInfo(4352, 0, 2, 128).encode(), (99,))]


def test_reader_rejects_bad_headers():
    reader = p.MessageReader()
    reader.feed(p.encode(1, b"", flags=0x2))
    with pytest.raises(p.ProtocolError):
        reader.next_message()
    reader = p.MessageReader()
    reader.feed(p.HEADER.pack(1, 1, 1 << 20))
    with pytest.raises(p.ProtocolError):
        reader.next_message()


def test_reader_reassembles_split_messages():
    reader = p.MessageReader()
    data = p.encode(Request.SET_FEATURES, p.encode_u64(5))
    reader.feed(data[:5])
    assert reader.next_message() is None
    assert reader.bytes_needed() == 7
    reader.feed(data[5:])
    msg = reader.next_message()
    assert (msg.request, p.decode_u64(msg.payload)) == (Request.SET_FEATURES, 5)


# -- back-end request channel and config changes ---------------------------------------------
BACKEND_PROTOCOL = FakeDevice.protocol_features | bit(ProtocolFeature.BACKEND_REQ)


def backend_session():
    device = FakeDevice()
    device.protocol_features = BACKEND_PROTOCOL
    return s.Session(device)


def test_set_backend_req_fd_hands_the_socket_to_the_connection_and_acks():
    session = backend_session()
    negotiate(session, BACKEND_PROTOCOL)
    fd = eventfd()
    effects = session.receive(message(Request.SET_BACKEND_REQ_FD, fds=[fd], need_reply=True))
    assert effects == [s.OpenBackendChannel(fd), s.Reply(Request.SET_BACKEND_REQ_FD, p.encode_u64(0))]
    assert session.backend_channel
    os.close(fd)


def test_config_change_goes_to_the_backend_channel_as_request_2_without_need_reply():
    session = backend_session()
    negotiate(session, BACKEND_PROTOCOL)
    fd = eventfd()
    session.receive(message(Request.SET_BACKEND_REQ_FD, fds=[fd]))
    os.close(fd)
    (effect,) = session.config_changed()
    assert effect == s.SendBackendRequest(p.BackendRequest.CONFIG_CHANGE_MSG)
    wire = p.encode_backend_request(effect.request, effect.payload)
    assert wire == b"\x02\x00\x00\x00" + b"\x01\x00\x00\x00" + b"\x00\x00\x00\x00"


def test_config_change_is_silent_without_a_channel_or_the_features():
    session = backend_session()
    negotiate(session, BACKEND_PROTOCOL)
    assert session.config_changed() == []            # no SET_BACKEND_REQ_FD yet
    without_config = backend_session()
    negotiate(without_config, bit(ProtocolFeature.BACKEND_REQ))
    fd = eventfd()
    without_config.receive(message(Request.SET_BACKEND_REQ_FD, fds=[fd]))
    os.close(fd)
    assert without_config.config_changed() == []     # CONFIG not negotiated: nothing to re-read


def test_set_backend_req_fd_without_the_feature_is_refused_and_its_fd_closed(session):
    negotiate(session)
    fd = eventfd()
    effects = session.receive(message(Request.SET_BACKEND_REQ_FD, fds=[fd], need_reply=True))
    assert effects == [s.Reply(Request.SET_BACKEND_REQ_FD, p.encode_u64(1))]
    assert not session.backend_channel
    with pytest.raises(OSError):
        os.fstat(fd)


def test_set_backend_req_fd_without_an_fd_breaks_the_session():
    session = backend_session()
    negotiate(session, BACKEND_PROTOCOL)
    with pytest.raises(p.ProtocolError):
        session.receive(message(Request.SET_BACKEND_REQ_FD))
    assert session.broken


class PackedDevice(FakeDevice):
    features = FakeDevice.features | bit(VirtioFeature.RING_PACKED)


def test_packed_ring_base_carries_both_positions_and_wrap_counters():
    """With RING_PACKED the base is 32 bits: avail position | wrap << 15, used ones above."""
    session = s.Session(PackedDevice())
    session.receive(message(Request.SET_PROTOCOL_FEATURES, p.encode_u64(bit(ProtocolFeature.REPLY_ACK))))
    session.receive(message(Request.SET_FEATURES, p.encode_u64(PackedDevice.features)))
    base = 0x0005 << 16 | 0x8009            # used: slot 5, wrap 0; avail: slot 9, wrap 1
    effects = session.receive(message(Request.SET_VRING_BASE, p.VringState(1, base).encode(), need_reply=True))
    assert effects == [s.Reply(Request.SET_VRING_BASE, p.encode_u64(0))]
    (reply,) = session.receive(message(Request.GET_VRING_BASE, p.VringState(1, 0).encode()))
    assert reply == s.Reply(Request.GET_VRING_BASE, p.VringState(1, base).encode())


def test_split_ring_base_above_16_bits_is_refused(session):
    session.receive(message(Request.SET_PROTOCOL_FEATURES, p.encode_u64(bit(ProtocolFeature.REPLY_ACK))))
    session.receive(message(Request.SET_FEATURES, p.encode_u64(FakeDevice.features)))
    effects = session.receive(message(Request.SET_VRING_BASE, p.VringState(0, 0x80008000).encode(),
                                      need_reply=True))
    assert effects == [s.Reply(Request.SET_VRING_BASE, p.encode_u64(1))]


def test_blk_offers_packed_rings_only_when_created_with_packed_ring_and_scsi_always():
    from types import SimpleNamespace
    from vhostd.vhost.blk import BlkSessionDevice
    from vhostd.vhost.scsi import ScsiSessionDevice
    packed = bit(VirtioFeature.RING_PACKED)
    for asked in (False, True):
        blk = BlkSessionDevice(SimpleNamespace(name="b", readonly=False, packed_ring=asked))
        assert bool(blk.features & packed) is asked
    assert ScsiSessionDevice(SimpleNamespace(name="s")).features & packed
