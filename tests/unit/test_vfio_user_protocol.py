"""The vfio-user codec: headers and payloads to and from bytes (no sockets)."""

import os
import struct

import pytest

from vhostd.vfio_user import protocol as p
from vhostd.vfio_user.protocol import Command, ProtocolError

# The capabilities QEMU 11.1 offers (observed on the wire).
QEMU_VERSION_JSON = (b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
                     b'"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, '
                     b'"pgsize": 4096}, "write_multiple": true}}')


def read_all(data, fds=()):
    reader = p.MessageReader()
    reader.feed(data, list(fds))
    messages = []
    while (msg := reader.next_message()) is not None:
        messages.append(msg)
    return reader, messages


def test_header_is_16_bytes_id_command_size_flags_error():
    data = p.encode(7, Command.DEVICE_GET_INFO, b"\x10\0\0\0" + bytes(12))
    assert len(data) == 32
    assert struct.unpack_from("<HHIII", data) == (7, 4, 32, 0, 0)


def test_reply_and_error_reply_echo_id_and_command():
    assert struct.unpack("<HHIII", p.encode_reply(9, Command.DMA_MAP)) == (9, 2, 16, 1, 0)
    assert struct.unpack("<HHIII", p.encode_error(9, Command.DMA_MAP, 22)) == (9, 2, 16, 0x21, 22)


def test_reader_reassembles_messages_fed_byte_by_byte_and_keeps_fds_with_their_message():
    first = p.encode(1, Command.DEVICE_RESET)
    second = p.encode(2, Command.REGION_READ, p.RegionAccess(0, 7, 4).encode())
    fd = os.eventfd(0)
    reader = p.MessageReader()
    out = []
    for i, byte in enumerate(first + second):
        reader.feed(bytes([byte]), [fd] if i == len(first) else [])
        if (msg := reader.next_message()) is not None:
            out.append(msg)
    assert [(m.msg_id, m.command, m.fds) for m in out] == [(1, 13, []), (2, 9, [fd])]
    assert p.RegionAccess.decode(out[1].payload) == p.RegionAccess(0, 7, 4)
    os.close(fd)


def test_bytes_needed_asks_for_the_header_then_exactly_the_rest():
    reader = p.MessageReader()
    assert reader.bytes_needed() == 16
    data = p.encode(1, Command.REGION_WRITE, p.RegionAccess(0x14, 0, 4, b"\1\0\0\0").encode())
    reader.feed(data[:16])
    assert reader.bytes_needed() == len(data) - 16


@pytest.mark.parametrize("header", [
    struct.pack("<HHIII", 1, 1, 8, 0, 0),                        # size below the header
    struct.pack("<HHIII", 1, 10, p.MAX_MESSAGE_SIZE + 1, 0, 0),  # size above the limit
    struct.pack("<HHIII", 1, 1, 16, 0x40, 0),                    # unknown flag
    struct.pack("<HHIII", 1, 1, 16, 2, 0),                       # type neither command nor reply
    struct.pack("<HHIII", 1, 1, 16, 1, 0),                       # a reply where commands come
], ids=["short-size", "huge-size", "unknown-flag", "bad-type", "reply"])
def test_bad_headers_are_protocol_errors(header):
    with pytest.raises(ProtocolError):
        read_all(header)


def test_too_many_fds_for_one_message_is_a_protocol_error_and_close_releases_them():
    fds = [os.eventfd(0) for _ in range(p.MAX_MSG_FDS + 1)]
    reader = p.MessageReader()
    with pytest.raises(ProtocolError):
        reader.feed(b"\0", fds)
    reader.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_version_decodes_qemu_11_1_offer():
    version = p.Version.decode(struct.pack("<HH", 0, 0) + QEMU_VERSION_JSON + b"\0")
    assert (version.major, version.minor) == (0, 0)
    assert version.capabilities["max_data_xfer_size"] == 1048576
    assert version.capabilities["write_multiple"] is True


def test_version_round_trips_and_ends_with_nul():
    version = p.Version(0, 0, {"max_msg_fds": 8, "pgsizes": 4096})
    data = version.encode()
    assert data.endswith(b"}\0")
    assert p.Version.decode(data) == version


@pytest.mark.parametrize("payload", [b"\0", struct.pack("<HH", 0, 0) + b"{not json",
                                     struct.pack("<HH", 0, 0) + b"[1]",
                                     struct.pack("<HH", 0, 0) + b'{"capabilities": 3}',
                                     struct.pack("<HH", 0, 0) + b"\xff\xfe"])
def test_malformed_version_payloads_are_protocol_errors(payload):
    with pytest.raises(ProtocolError):
        p.Version.decode(payload)


def test_payload_structs_have_the_wire_sizes_and_round_trip():
    dma_map = p.DmaMap(3, 0x100000, 0x100000, 0x1ff00000)
    assert len(dma_map.encode()) == 32 and p.DmaMap.decode(dma_map.encode()) == dma_map
    dma_unmap = p.DmaUnmap(0, 0xc0000, 0x20000)
    assert len(dma_unmap.encode()) == 24 and p.DmaUnmap.decode(dma_unmap.encode()) == dma_unmap
    assert len(p.DeviceInfo(3, 9, 5).encode()) == 16
    assert len(p.IrqInfo(2, 1, 32).encode()) == 16
    irq_set = p.IrqSet(0x24, 2, 1, 1)
    assert len(irq_set.encode()) == 20 and p.IrqSet.decode(irq_set.encode()) == irq_set
    info = p.RegionInfo(0, 0xf, 0x4000, 0, 32, 64, p.encode_sparse_mmap_cap((p.SparseArea(0x1000, 0x1000),)))
    assert len(info.encode()) == 64 and p.RegionInfo.decode(info.encode()) == info


def test_sparse_mmap_capability_layout():
    cap = p.encode_sparse_mmap_cap((p.SparseArea(0x1000, 0x1000),))
    assert cap == struct.pack("<HHIIIQQ", 1, 1, 0, 1, 0, 0x1000, 0x1000)
    assert p.decode_sparse_mmap_cap(cap) == (p.SparseArea(0x1000, 0x1000),)


@pytest.mark.parametrize("decoder", [p.DmaMap.decode, p.DmaUnmap.decode, p.DeviceInfo.decode,
                                     p.RegionInfo.decode, p.IrqInfo.decode, p.IrqSet.decode,
                                     p.RegionAccess.decode])
def test_short_payloads_are_refused_with_einval(decoder):
    with pytest.raises(p.CommandError) as info:
        decoder(b"\0" * 3)
    assert info.value.errno == 22
