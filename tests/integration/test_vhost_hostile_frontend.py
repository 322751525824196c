"""Malformed and hostile vhost-user front-ends against a live controller.

Each case is answered per spec or ends with the connection closed; afterwards the controller serves
a well-behaved front-end again, and the daemon holds no more fds and mappings than before.
"""

import array
import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostd import _dataplane as dp
from vhostd.initiator.blk import VirtioBlk
from vhostd.initiator.targets import InProcessVhostdTarget
from vhostd.vhost import protocol as p
from vhostd.vhost.features import ProtocolFeature, bit
from vhostd.vhost.protocol import Request


class RawPeer:
    """A front-end that sends exactly the bytes and fds it is told to."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)

    def send(self, data, fds=(), keep=()):
        """Send data with fds; our copies of the fds are closed afterwards unless in keep."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self.sock.sendmsg([data], anc)
        finally:
            for fd in fds:
                if fd not in keep:
                    os.close(fd)

    def request(self, req, payload=b"", fds=(), flags=p.VERSION, keep=()):
        self.send(p.encode(req, payload, flags), fds, keep)

    def reply(self):
        """(request, payload) of the next reply, or None if the back-end closed."""
        head = self._read(p.HEADER_SIZE)
        if head is None:
            return None
        req, flags, size = p.HEADER.unpack(head)
        assert flags == p.VERSION | p.FLAG_REPLY
        payload = self._read(size) if size else b""
        return req, payload

    def _read(self, n):
        data = b""
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except (ConnectionResetError, socket.timeout):
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def closed_by_peer(self, timeout=5.0):
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def map_count():
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hostile")
    with InProcessVhostdTarget("malloc", cpus=(0,), size_bytes=16 << 20, workdir=str(workdir)) as t:
        yield t


def wait_idle(target, timeout=5.0):
    time.sleep(0.02)          # let the controller accept a connection just made
    deadline = time.monotonic() + timeout
    while target.controller.busy:
        assert time.monotonic() < deadline, "controller still holds the connection"
        time.sleep(0.01)


def check_serves(target):
    """A well-behaved front-end works after the hostile one."""
    wait_idle(target)
    with VirtioBlk(target.socket_path, queue_size=64, memory_bytes=8 << 20).open() as dev:
        dev.write(0, b"\x5a" * 4096)
        assert dev.read(0, 4096) == b"\x5a" * 4096
    wait_idle(target)


def memfd(size):
    fd = os.memfd_create("hostile")
    os.ftruncate(fd, size)
    return fd


def negotiated(target):
    peer = RawPeer(target.socket_path)
    peer.request(Request.SET_PROTOCOL_FEATURES, p.encode_u64(bit(ProtocolFeature.REPLY_ACK)))
    peer.request(Request.SET_OWNER)
    return peer


def ack(peer):
    reply = peer.reply()
    assert reply is not None, "back-end closed instead of answering"
    return p.decode_u64(reply[1])


CLOSING_CASES = {
    "short header then EOF": lambda peer: (peer.send(b"\x01\x00\x00"), peer.sock.shutdown(socket.SHUT_WR)),
    "bad version flags": lambda peer: peer.send(p.HEADER.pack(Request.GET_FEATURES, 0x2, 0)),
    "reply flag from the front-end": lambda peer: peer.send(p.HEADER.pack(Request.GET_FEATURES, 0x5, 0)),
    "huge payload size": lambda peer: peer.send(p.HEADER.pack(Request.SET_FEATURES, 1, 1 << 30)),
    "SET_FEATURES with 4 bytes": lambda peer: peer.request(Request.SET_FEATURES, b"\0" * 4),
    "kick without its fd": lambda peer: peer.request(Request.SET_VRING_KICK, p.encode_u64(0)),
    "call with an extra fd": lambda peer: peer.request(Request.SET_VRING_CALL, p.encode_u64(0x100), [memfd(8)]),
    "memory table with fewer fds than regions": lambda peer: peer.request(
        Request.SET_MEM_TABLE, p.MemoryTable((p.MemoryRegion(0, 1 << 20, 0x10000000, 0),
                                               p.MemoryRegion(1 << 20, 1 << 20, 0x20000000, 0))).encode(),
        [memfd(1 << 20)]),
    "region beyond the end of its fd": lambda peer: peer.request(
        Request.SET_MEM_TABLE, p.MemoryTable((p.MemoryRegion(0, 8 << 20, 0x10000000, 0),)).encode(),
        [memfd(1 << 20)]),
    "overlapping regions": lambda peer: peer.request(
        Request.SET_MEM_TABLE, p.MemoryTable((p.MemoryRegion(0, 1 << 20, 0x10000000, 0),
                                               p.MemoryRegion(4096, 1 << 20, 0x20000000, 0))).encode(),
        [memfd(1 << 20), memfd(2 << 20)]),
    "GET_VRING_BASE of a queue that does not exist": lambda peer: peer.request(
        Request.GET_VRING_BASE, p.VringState(200, 0).encode()),
    "inflight fd without the feature": lambda peer: peer.request(
        Request.SET_INFLIGHT_FD, p.InflightInfo(4096, 0, 1, 64).encode(), [memfd(4096)]),
    "inflight fd the front-end could shrink": lambda peer: (
        peer.request(Request.SET_PROTOCOL_FEATURES, p.encode_u64(bit(ProtocolFeature.INFLIGHT_SHMFD))),
        peer.request(Request.SET_INFLIGHT_FD, p.InflightInfo(4096, 0, 1, 64).encode(), [memfd(4096)])),
    "back-end request fd that is not a socket": lambda peer: (
        peer.request(Request.SET_PROTOCOL_FEATURES, p.encode_u64(bit(ProtocolFeature.BACKEND_REQ))),
        peer.request(Request.SET_BACKEND_REQ_FD, fds=[memfd(8)])),
    "back-end request channel without its fd": lambda peer: (
        peer.request(Request.SET_PROTOCOL_FEATURES, p.encode_u64(bit(ProtocolFeature.BACKEND_REQ))),
        peer.request(Request.SET_BACKEND_REQ_FD)),
}


@pytest.mark.parametrize("case", sorted(CLOSING_CASES))
def test_malformed_messages_close_the_connection_and_leak_nothing(target, case):
    wait_idle(target)
    fds, maps = fd_count(), map_count()
    peer = negotiated(target)
    CLOSING_CASES[case](peer)
    assert peer.closed_by_peer(), "back-end kept the connection open"
    peer.close()
    wait_idle(target)
    assert fd_count() <= fds and map_count() <= maps
    check_serves(target)


def test_refused_requests_get_a_negative_ack_and_the_connection_survives(target):
    wait_idle(target)
    peer = negotiated(target)
    flags = p.VERSION | p.FLAG_NEED_REPLY
    peer.request(Request.SET_FEATURES, p.encode_u64(1 << 60), flags=flags)
    assert ack(peer) != 0
    peer.request(Request.SET_VRING_NUM, p.VringState(0, 1000).encode(), flags=flags)
    assert ack(peer) != 0
    peer.request(Request.SET_VRING_NUM, p.VringState(99, 128).encode(), flags=flags)
    assert ack(peer) != 0
    peer.request(250, b"", flags=flags)
    assert ack(peer) != 0
    peer.request(Request.GET_FEATURES)
    assert peer.reply()[0] == Request.GET_FEATURES
    peer.close()
    check_serves(target)


def test_back_end_request_channels_replaced_or_left_behind_are_closed(target):
    wait_idle(target)
    fds = fd_count()
    peer = negotiated(target)
    flags = p.VERSION | p.FLAG_NEED_REPLY
    peer.request(Request.SET_PROTOCOL_FEATURES,
                 p.encode_u64(bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.BACKEND_REQ)))
    ours = []
    for _ in range(5):
        mine, theirs = socket.socketpair()
        ours.append(mine)
        peer.request(Request.SET_BACKEND_REQ_FD, fds=[theirs.detach()], flags=flags)
        assert ack(peer) == 0
    for old in ours[:-1]:          # each replaced channel was closed by the back-end
        old.settimeout(5)
        assert old.recv(1) == b""
    peer.close()
    wait_idle(target)
    ours[-1].settimeout(5)
    assert ours[-1].recv(1) == b""     # and the last one with the connection
    for sock in ours:
        sock.close()
    assert fd_count() <= fds
    check_serves(target)


def test_fds_sent_with_requests_that_take_none_are_closed(target):
    wait_idle(target)
    fds = fd_count()
    peer = negotiated(target)
    for _ in range(10):
        peer.request(Request.SET_OWNER, fds=[memfd(8) for _ in range(4)])
        peer.request(Request.GET_QUEUE_NUM, fds=[memfd(8)])
        assert peer.reply()[0] == Request.GET_QUEUE_NUM
    # Only the two ends of the connection are open meanwhile, not the 50 fds it carried.
    assert fd_count() <= fds + 2
    peer.close()
    wait_idle(target)
    assert fd_count() <= fds
    check_serves(target)


def test_rings_outside_memory_never_start_and_signal_the_error_fd(target):
    wait_idle(target)
    fds, maps = fd_count(), map_count()
    peer = negotiated(target)
    flags = p.VERSION | p.FLAG_NEED_REPLY
    peer.request(Request.SET_FEATURES, p.encode_u64(1 << 32 | 1 << 30), flags=flags)
    assert ack(peer) == 0
    mem = memfd(1 << 20)
    peer.request(Request.SET_MEM_TABLE, p.MemoryTable((p.MemoryRegion(0, 1 << 20, 0x10000000, 0),)).encode(),
                 [mem], flags=flags)
    assert ack(peer) == 0
    err = os.eventfd(0, os.EFD_NONBLOCK)
    peer.request(Request.SET_VRING_ERR, p.encode_u64(0), [err], keep=[err])
    peer.request(Request.SET_VRING_NUM, p.VringState(0, 64).encode())
    # avail ring right at the end of the region: it does not fit.
    peer.request(Request.SET_VRING_ADDR, p.VringAddr(0, 0, 0x10000000, 0x10001000, 0x10000000 + (1 << 20) - 8).encode())
    peer.request(Request.SET_VRING_KICK, p.encode_u64(0), [os.eventfd(0)])
    peer.request(Request.SET_VRING_ENABLE, p.VringState(0, 1).encode())
    peer.request(Request.GET_VRING_BASE, p.VringState(0, 0).encode())
    req, payload = peer.reply()
    assert req == Request.GET_VRING_BASE
    assert os.eventfd_read(err) >= 1
    assert not target.controller.connection.queues
    peer.close()
    os.close(err)
    wait_idle(target)
    assert fd_count() <= fds and map_count() <= maps
    check_serves(target)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 45), st.integers(0, 15), st.binary(max_size=64)), max_size=6))
def test_random_messages_never_hurt_the_daemon(target, messages):
    wait_idle(target)
    peer = RawPeer(target.socket_path)
    try:
        for request, flags, payload in messages:
            peer.send(p.HEADER.pack(request, flags, len(payload)) + payload)
    except (BrokenPipeError, ConnectionResetError):
        pass
    peer.close()
    wait_idle(target)
    check_serves(target)
