"""The front-end's message sequences and reply checks, against a scripted back-end on a socket."""

import array
import os
import socket
import threading

import pytest

from vhostd.initiator.channel import BadReply, RequestFailed
from vhostd.initiator.frontend import Frontend, FrontendError
from vhostd.vhost import protocol as p
from vhostd.vhost.features import ProtocolFeature, VirtioFeature, bit, mask
from vhostd.vhost.protocol import Request as R

OFFERED = mask(VirtioFeature.VERSION_1, VirtioFeature.RING_EVENT_IDX,
               VirtioFeature.VHOST_USER_PROTOCOL_FEATURES, 9)          # 9: blk FLUSH
OFFERED_PROTOCOL = mask(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG,
                        ProtocolFeature.BACKEND_REQ, ProtocolFeature.INFLIGHT_SHMFD)


class ScriptedBackend:
    """Answers every request like a well-behaved back-end, except where ``overrides`` says how
    to reply (request → callable(msg) → raw bytes to send, or None for no reply)."""

    def __init__(self, path, overrides=None, queue_num=4):
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.overrides = overrides or {}
        self.queue_num = queue_num
        self.log = []               # (request name, flags, payload, number of fds)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.server.accept()
        reader = p.MessageReader()
        with conn:
            while True:
                data, anc, _, _ = conn.recvmsg(reader.bytes_needed(), socket.CMSG_SPACE(8 * 4))
                if not data:
                    return
                fds = []
                for _, _, raw in anc:
                    fds.extend(array.array("i", raw[:len(raw) - len(raw) % 4]))
                reader.feed(data, fds)
                while (msg := reader.next_message()) is not None:
                    self.log.append((R(msg.request).name, msg.flags, msg.payload, len(msg.fds)))
                    reply, reply_fds = self._reply(msg)
                    msg.close_fds()
                    if reply is not None:
                        anc_out = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", reply_fds))] if reply_fds else []
                        conn.sendmsg([reply], anc_out)
                    for fd in reply_fds:
                        os.close(fd)

    def _reply(self, msg):
        if msg.request in self.overrides:
            return self.overrides[msg.request](msg), []
        answers = {R.GET_FEATURES: OFFERED, R.GET_PROTOCOL_FEATURES: OFFERED_PROTOCOL,
                   R.GET_QUEUE_NUM: self.queue_num}
        if msg.request in answers:
            return p.encode_reply(msg.request, p.encode_u64(answers[msg.request])), []
        if msg.request == R.GET_CONFIG:
            cfg = p.ConfigSpace.decode(msg.payload)
            return p.encode_reply(msg.request, p.ConfigSpace(cfg.offset, cfg.size, 0, b"\x07" * cfg.size).encode()), []
        if msg.request == R.GET_VRING_BASE:
            index = p.VringState.decode(msg.payload).index
            return p.encode_reply(msg.request, p.VringState(index, 3).encode()), []
        if msg.request == R.GET_INFLIGHT_FD:
            info = p.InflightInfo.decode(msg.payload)
            fd = os.memfd_create("inflight")
            os.ftruncate(fd, 4096)
            return p.encode_reply(msg.request, p.InflightInfo(4096, 0, info.num_queues, info.queue_size).encode()), [fd]
        if msg.flags & p.FLAG_NEED_REPLY:
            return p.encode_reply(msg.request, p.encode_u64(0)), []
        return None, []

    def names(self):
        return [name for name, *_ in self.log]

    def close(self):
        self.server.close()


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "be.sock")


def run(sock_path, overrides=None, start=True, **options):
    backend = ScriptedBackend(sock_path, overrides)
    fe = Frontend(sock_path, num_queues=2, queue_size=16, device_features=bit(9),
                  memory_bytes=1 << 20, memory_regions=2, timeout_s=2.0, **options)
    try:
        fe.connect()
        if start:
            fe.start()
            fe.stop()
    finally:
        fe.close()
    backend.thread.join(2)
    backend.close()
    return fe, backend


def test_connect_and_start_send_qemu_7_2_sequence(sock_path):
    fe, backend = run(sock_path)
    per_vq = lambda *names: [n for _ in range(2) for n in names]
    assert backend.names() == (
        ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
         "SET_OWNER", "GET_FEATURES"]
        + per_vq("SET_VRING_CALL", "SET_VRING_ERR")
        + ["SET_FEATURES", "GET_INFLIGHT_FD", "SET_INFLIGHT_FD"]
        + ["SET_VRING_CALL"] * 2
        + ["SET_FEATURES", "SET_MEM_TABLE"]
        + per_vq("SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK")
        + ["SET_VRING_ENABLE"] * 2
        + ["SET_VRING_ENABLE"] * 2 + ["GET_VRING_BASE"] * 2)


def test_only_implemented_protocol_features_are_acknowledged(sock_path):
    fe, backend = run(sock_path)
    (payload,) = [pl for name, _, pl, _ in backend.log if name == "SET_PROTOCOL_FEATURES"]
    acked = p.decode_u64(payload)
    assert acked == OFFERED_PROTOCOL & ~bit(ProtocolFeature.BACKEND_REQ)


def test_set_features_carries_protocol_bit_and_acked_device_bits(sock_path):
    fe, backend = run(sock_path)
    values = {p.decode_u64(pl) for name, _, pl, _ in backend.log if name == "SET_FEATURES"}
    assert values == {OFFERED}


def test_memory_table_sends_one_fd_per_region_with_need_reply(sock_path):
    fe, backend = run(sock_path)
    (entry,) = [e for e in backend.log if e[0] == "SET_MEM_TABLE"]
    _, flags, payload, nfds = entry
    assert flags & p.FLAG_NEED_REPLY and nfds == 2
    table = p.MemoryTable.decode(payload)
    assert [r.guest_phys_addr for r in table.regions] == [0, table.regions[0].memory_size]
    assert [r.mmap_offset for r in table.regions] == [0, table.regions[0].memory_size]


def test_ring_base_after_stop_is_what_get_vring_base_said(sock_path):
    fe, backend = run(sock_path)
    assert [vq.base for vq in fe.vqs] == [3, 3]


def test_reply_with_extra_flags_is_rejected(sock_path):
    bad = lambda msg: p.encode(msg.request, p.encode_u64(OFFERED), p.VERSION | p.FLAG_REPLY | p.FLAG_NEED_REPLY)
    with pytest.raises(BadReply, match="flags"):
        run(sock_path, {R.GET_FEATURES: bad}, start=False)


def test_reply_to_another_request_is_rejected(sock_path):
    bad = lambda msg: p.encode_reply(R.GET_QUEUE_NUM, p.encode_u64(OFFERED))
    with pytest.raises(BadReply, match="GET_QUEUE_NUM"):
        run(sock_path, {R.GET_FEATURES: bad}, start=False)


def test_reply_of_the_wrong_size_is_rejected(sock_path):
    bad = lambda msg: p.encode_reply(msg.request, p.encode_u64(4) + b"\0")
    with pytest.raises(BadReply, match="9 bytes"):
        run(sock_path, {R.GET_QUEUE_NUM: bad}, start=False)


def test_config_reply_must_match_the_requested_size(sock_path):
    short = lambda msg: p.encode_reply(msg.request, p.ConfigSpace(0, 8, 0, bytes(8)).encode())
    backend = ScriptedBackend(sock_path, {R.GET_CONFIG: short})
    fe = Frontend(sock_path, memory_bytes=1 << 20, timeout_s=2.0)
    try:
        fe.connect()
        with pytest.raises(BadReply):
            fe.get_config(0, 57)
    finally:
        fe.close()
        backend.close()


def test_negative_ack_raises(sock_path):
    nack = lambda msg: p.encode_reply(msg.request, p.encode_u64(1))
    with pytest.raises(RequestFailed):
        run(sock_path, {R.SET_MEM_TABLE: nack})


def test_too_few_queues_for_blk_fails_like_qemu(sock_path):
    backend = ScriptedBackend(sock_path, queue_num=1)
    fe = Frontend(sock_path, num_queues=2, memory_bytes=1 << 20, timeout_s=2.0)
    try:
        with pytest.raises(FrontendError):
            fe.connect()
    finally:
        fe.close()
        backend.close()
