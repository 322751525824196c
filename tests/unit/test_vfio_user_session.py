"""The vfio-user server session, driven with encoded messages (no sockets, no device emulation)."""

import errno
import json
import os
import struct

import pytest

from vhostd.vfio_user import protocol as p
from vhostd.vfio_user import session as s
from vhostd.vfio_user.protocol import Command, IrqSetFlag, PciIrq, PciRegion, ProtocolError

QEMU_CAPS = {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535,
             "max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456,
                                                          "pgsize": 4096}, "write_multiple": True}
MB = 1 << 20


class FakeDevice:
    """BAR0 16 KiB with its doorbell page mappable, 4 KiB config space, INTx and 32 MSI-X vectors."""

    name = "test"

    def __init__(self):
        self.bar0_fd = os.memfd_create("bar0")
        os.ftruncate(self.bar0_fd, 0x2000)
        self.memory = {PciRegion.BAR0: bytearray(0x4000), PciRegion.CONFIG: bytearray(4096)}
        self.memory[PciRegion.CONFIG][0:4] = b"\x58\x4e\x01\x00"
        self.writes = []

    def region(self, index):
        if index == PciRegion.BAR0:
            return s.RegionDescription(0x4000, p.RegionFlag.READ | p.RegionFlag.WRITE, self.bar0_fd,
                                       0, (p.SparseArea(0x1000, 0x1000),))
        if index == PciRegion.CONFIG:
            return s.RegionDescription(4096, p.RegionFlag.READ | p.RegionFlag.WRITE)
        return s.RegionDescription()

    def irq_count(self, index):
        return {PciIrq.INTX: 1, PciIrq.MSIX: 32}.get(index, 0)

    def region_read(self, index, offset, count):
        return bytes(self.memory[index][offset:offset + count])

    def region_write(self, index, offset, data):
        self.memory[index][offset:offset + len(data)] = data
        self.writes.append((index, offset, data))
        return ["device-effect"] if (index, offset) == (PciRegion.BAR0, 0x14) else []


def message(msg_id, command, payload=b"", fds=(), no_reply=False):
    """Bytes on the wire → a Message, as the transport hands it over."""
    reader = p.MessageReader()
    reader.feed(p.encode(msg_id, command, payload, p.FLAG_NO_REPLY if no_reply else 0), list(fds))
    return reader.next_message()


def version_payload(caps=QEMU_CAPS, major=0, minor=0):
    return struct.pack("<HH", major, minor) + json.dumps({"capabilities": caps}).encode() + b"\0"


def memfd(size):
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    return fd


def is_closed(fd):
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


@pytest.fixture
def device():
    dev = FakeDevice()
    yield dev
    os.close(dev.bar0_fd)


@pytest.fixture
def session(device):
    sess = s.Session(device)
    sess.receive(message(1, Command.VERSION, version_payload()))
    return sess


def only_reply(effects):
    (reply,) = effects
    assert isinstance(reply, s.Reply)
    return reply


def error_of(effects):
    reply = only_reply(effects)
    assert reply.payload == b""
    return reply.errno


# -- VERSION -----------------------------------------------------------------------------------
def test_version_answers_qemu_with_a_subset_of_capabilities(device):
    sess = s.Session(device)
    reply = only_reply(sess.receive(message(5, Command.VERSION, version_payload())))
    assert (reply.msg_id, reply.command, reply.errno) == (5, Command.VERSION, 0)
    answer = p.Version.decode(reply.payload)
    assert (answer.major, answer.minor) == (0, 0)
    assert answer.capabilities == {"max_msg_fds": 8, "max_data_xfer_size": 1048576,
                                   "pgsizes": 4096, "max_dma_maps": 1024}
    assert sess.state is s.SessionState.READY
    assert sess.client_capabilities["max_dma_maps"] == 65535
    header = struct.unpack_from("<HHIII", reply.encode())
    assert header == (5, 1, 16 + len(reply.payload), 1, 0)


def test_a_newer_minor_version_is_answered_with_ours(device):
    reply = only_reply(s.Session(device).receive(message(1, Command.VERSION, version_payload(minor=3))))
    assert p.Version.decode(reply.payload).minor == 0


@pytest.mark.parametrize("payload", [version_payload(major=1), version_payload({"pgsizes": 8192}),
                                     struct.pack("<HH", 0, 0) + b"{broken"],
                         ids=["major-1", "no-4k-pages", "bad-json"])
def test_an_unacceptable_version_breaks_the_session(device, payload):
    sess = s.Session(device)
    with pytest.raises(ProtocolError):
        sess.receive(message(1, Command.VERSION, payload))
    assert sess.broken


def test_commands_before_version_break_the_session_and_close_their_fds(device):
    sess = s.Session(device)
    fd = memfd(MB)
    with pytest.raises(ProtocolError):
        sess.receive(message(1, Command.DMA_MAP, p.DmaMap(3, 0, 0, MB).encode(), [fd]))
    assert sess.broken and is_closed(fd)
    with pytest.raises(ProtocolError):
        sess.receive(message(2, Command.VERSION, version_payload()))


def test_a_second_version_breaks_the_session(session):
    with pytest.raises(ProtocolError):
        session.receive(message(2, Command.VERSION, version_payload()))
    assert session.broken


def test_unknown_and_unsupported_commands_get_enosys(session):
    for command in (14, 99, Command.DEVICE_FEATURE, Command.REGION_WRITE_MULTI,
                    Command.DEVICE_GET_REGION_IO_FDS, Command.DMA_READ):
        assert error_of(session.receive(message(3, command, b"\0" * 8))) == errno.ENOSYS
    assert not session.broken


# -- DMA ---------------------------------------------------------------------------------------
def test_dma_map_with_fd_becomes_a_map_effect_then_a_reply(session):
    fd = memfd(512 * MB)
    effects = session.receive(message(4, Command.DMA_MAP,
                                      p.DmaMap(3, 0x100000, 0x100000, 0x1ff00000).encode(), [fd]))
    window = s.DmaWindow(0x100000, 0x1ff00000, 0x100000, 3, True)
    assert effects == [s.MapDma(window, fd), s.Reply(4, Command.DMA_MAP)]
    assert not is_closed(fd)          # the connection's to mmap and close
    assert session.find_window(0x200000, 4096) == window
    assert session.find_window(0x1ffff000, 0x2000) is None
    os.close(fd)


def test_dma_map_without_fd_is_recorded_but_not_mapped(session):
    effects = session.receive(message(4, Command.DMA_MAP, p.DmaMap(1, 0, 0xc0000, 0x20000).encode()))
    assert effects == [s.Reply(4, Command.DMA_MAP)]
    assert session.dma_windows[0xc0000] == s.DmaWindow(0xc0000, 0x20000, 0, 1, False)


@pytest.mark.parametrize("dma_map, fd_size, expected", [
    (p.DmaMap(3, 0, 0, MB, argsz=16), MB, errno.EINVAL),          # argsz too small
    (p.DmaMap(7, 0, 0, MB), MB, errno.EINVAL),                    # unknown flag
    (p.DmaMap(2, 0, 0, MB), MB, errno.EINVAL),                    # write-only
    (p.DmaMap(3, 0, 0, 0), MB, errno.EINVAL),                     # empty
    (p.DmaMap(3, 0, 0x1001, 4096), MB, errno.EINVAL),             # unaligned address
    (p.DmaMap(3, 0, (1 << 64) - 4096, 8192), MB, errno.EINVAL),   # wraps
    (p.DmaMap(3, 0x800, 0, 4096), MB, errno.EINVAL),              # unaligned fd offset
    (p.DmaMap(3, 0, 0, 2 * MB), MB, errno.EINVAL),                # beyond the fd
    (p.DmaMap(3, MB, 0, 4096), MB, errno.EINVAL),                 # offset at the fd's end
], ids=["argsz", "flags", "write-only", "empty", "unaligned", "wraps", "offset", "beyond-fd",
        "offset-end"])
def test_bad_dma_maps_are_refused_and_their_fd_closed(session, dma_map, fd_size, expected):
    fd = memfd(fd_size)
    assert error_of(session.receive(message(4, Command.DMA_MAP, dma_map.encode(), [fd]))) == expected
    assert is_closed(fd) and not session.dma_windows and not session.broken


def test_dma_map_with_two_fds_is_refused(session):
    fds = [memfd(MB), memfd(MB)]
    assert error_of(session.receive(message(4, Command.DMA_MAP, p.DmaMap(3, 0, 0, MB).encode(),
                                            fds))) == errno.EINVAL
    assert all(is_closed(fd) for fd in fds)


def test_dma_map_with_a_non_file_fd_is_refused_not_crashed(session):
    r, w = os.pipe()
    assert error_of(session.receive(message(4, Command.DMA_MAP, p.DmaMap(3, 0, 0, MB).encode(),
                                            [r]))) == errno.EINVAL
    os.close(w)


def test_overlapping_dma_maps_get_eexist(session):
    session.receive(message(1, Command.DMA_MAP, p.DmaMap(3, 0, 0x100000, 0x100000).encode()))
    for addr, size in ((0x100000, 4096), (0xff000, 0x2000), (0x1ff000, 0x1000), (0, 0x400000)):
        reply = session.receive(message(2, Command.DMA_MAP, p.DmaMap(3, 0, addr, size).encode()))
        assert error_of(reply) == errno.EEXIST
    adjacent = session.receive(message(3, Command.DMA_MAP, p.DmaMap(3, 0, 0x200000, 4096).encode()))
    assert adjacent == [s.Reply(3, Command.DMA_MAP)]


def test_dma_maps_beyond_the_limit_get_enospc(device):
    sess = s.Session(device, max_dma_maps=2)
    sess.receive(message(1, Command.VERSION, version_payload()))
    for i in range(2):
        sess.receive(message(2, Command.DMA_MAP, p.DmaMap(1, 0, i * 4096, 4096).encode()))
    assert error_of(sess.receive(message(3, Command.DMA_MAP,
                                         p.DmaMap(1, 0, 0x10000, 4096).encode()))) == errno.ENOSPC


def test_dma_unmap_unmaps_before_replying_with_the_request(session):
    fd = memfd(MB)
    session.receive(message(1, Command.DMA_MAP, p.DmaMap(3, 0, 0, MB).encode(), [fd]))
    unmap = p.DmaUnmap(0, 0, MB)
    effects = session.receive(message(2, Command.DMA_UNMAP, unmap.encode()))
    assert effects == [s.UnmapDma(s.DmaWindow(0, MB, 0, 3, True)),
                       s.Reply(2, Command.DMA_UNMAP, unmap.encode())]
    assert not session.dma_windows
    os.close(fd)


def test_dma_unmap_must_name_a_window_exactly(session):
    session.receive(message(1, Command.DMA_MAP, p.DmaMap(3, 0, 0, 2 * 4096).encode()))
    for addr, size in ((0, 4096), (4096, 4096), (0x10000, 4096)):
        reply = session.receive(message(2, Command.DMA_UNMAP, p.DmaUnmap(0, addr, size).encode()))
        assert error_of(reply) == errno.ENOENT
    assert error_of(session.receive(message(3, Command.DMA_UNMAP,
                                            p.DmaUnmap(1, 0, 8192).encode()))) == errno.EINVAL
    assert session.receive(message(4, Command.DMA_UNMAP, p.DmaUnmap(0, 0, 8192).encode()))[-1].errno == 0


# -- device and regions ------------------------------------------------------------------------
def test_device_info_is_a_pci_device_with_reset_9_regions_5_irqs(session):
    reply = only_reply(session.receive(message(5, Command.DEVICE_GET_INFO, p.DeviceInfo(0, 0, 0).encode())))
    assert p.DeviceInfo.decode(reply.payload) == p.DeviceInfo(3, 9, 5)
    short = p.DeviceInfo(0, 0, 0, argsz=8).encode()
    assert error_of(session.receive(message(6, Command.DEVICE_GET_INFO, short))) == errno.EINVAL


def region_info(session, index, argsz=32):
    reply = only_reply(session.receive(message(6, Command.DEVICE_GET_REGION_INFO,
                                               p.RegionInfo(index, 0, 0, 0, argsz=argsz).encode())))
    return reply, p.RegionInfo.decode(reply.payload)


def test_bar0_region_info_asks_for_room_then_gives_the_sparse_mmap_chain_and_fd(session, device):
    reply, info = region_info(session, PciRegion.BAR0)
    assert (info.argsz, info.size, info.flags, info.caps, reply.fds) == (64, 0x4000, 3, b"", ())
    reply, info = region_info(session, PciRegion.BAR0, argsz=64)
    assert info.flags == 0xf and info.cap_offset == 32 and info.argsz == 64
    assert p.decode_sparse_mmap_cap(info.caps) == (p.SparseArea(0x1000, 0x1000),)
    assert reply.fds == (device.bar0_fd,)


def test_config_and_absent_regions(session):
    _, config = region_info(session, PciRegion.CONFIG)
    assert (config.size, config.flags, config.argsz) == (4096, 3, 32)
    _, rom = region_info(session, PciRegion.ROM)
    assert (rom.size, rom.flags) == (0, 0)


def test_region_info_of_a_region_beyond_the_device_gets_einval(session):
    reply = session.receive(message(6, Command.DEVICE_GET_REGION_INFO, p.RegionInfo(9, 0, 0, 0).encode()))
    assert error_of(reply) == errno.EINVAL


def test_region_read_returns_the_device_bytes(session):
    access = p.RegionAccess(0, PciRegion.CONFIG, 4)
    reply = only_reply(session.receive(message(7, Command.REGION_READ, access.encode())))
    assert p.RegionAccess.decode(reply.payload) == p.RegionAccess(0, 7, 4, b"\x58\x4e\x01\x00")
    whole = only_reply(session.receive(message(8, Command.REGION_READ,
                                               p.RegionAccess(0, PciRegion.CONFIG, 4096).encode())))
    assert len(whole.payload) == 16 + 4096


def test_region_write_reaches_the_device_its_effects_come_before_the_reply(session, device):
    access = p.RegionAccess(0x14, PciRegion.BAR0, 4, struct.pack("<I", 0x460001))
    effects = session.receive(message(9, Command.REGION_WRITE, access.encode()))
    assert effects == ["device-effect", s.Reply(9, Command.REGION_WRITE, access.encode_head())]
    assert device.writes == [(PciRegion.BAR0, 0x14, struct.pack("<I", 0x460001))]


def test_posted_writes_get_no_reply_even_when_refused(session, device):
    access = p.RegionAccess(0x1000, PciRegion.BAR0, 4, b"\1\0\0\0")
    assert session.receive(message(9, Command.REGION_WRITE, access.encode(), no_reply=True)) == []
    assert device.writes
    bad = p.RegionAccess(0x4000, PciRegion.BAR0, 4, b"\1\0\0\0")
    assert session.receive(message(9, Command.REGION_WRITE, bad.encode(), no_reply=True)) == []


@pytest.mark.parametrize("command, access", [
    (Command.REGION_READ, p.RegionAccess(0x3ffe, PciRegion.BAR0, 4)),          # crosses the end
    (Command.REGION_READ, p.RegionAccess((1 << 64) - 2, PciRegion.BAR0, 4)),   # huge offset
    (Command.REGION_READ, p.RegionAccess(0, PciRegion.BAR0, 0)),               # empty
    (Command.REGION_READ, p.RegionAccess(0, PciRegion.ROM, 4)),                # absent region
    (Command.REGION_READ, p.RegionAccess(0, 40, 4)),                           # no such region
    (Command.REGION_READ, p.RegionAccess(0, PciRegion.CONFIG, 4, b"xx")),      # data on a read
    (Command.REGION_WRITE, p.RegionAccess(0, PciRegion.CONFIG, 4, b"xx")),     # short data
    (Command.REGION_WRITE, p.RegionAccess(0, PciRegion.CONFIG, 2, b"xxxx")),   # long data
], ids=["crosses-end", "huge-offset", "empty", "absent", "no-region", "read-data", "short-write",
        "long-write"])
def test_bad_region_accesses_get_einval_and_never_reach_the_device(session, device, command, access):
    assert error_of(session.receive(message(10, command, access.encode()))) == errno.EINVAL
    assert device.writes == []


def test_device_refusals_become_error_replies(session, device):
    def refuse(index, offset, data):
        raise p.CommandError(errno.EPERM, "read-only register")
    device.region_write = refuse
    access = p.RegionAccess(0, PciRegion.CONFIG, 2, b"\0\0")
    assert error_of(session.receive(message(10, Command.REGION_WRITE, access.encode()))) == errno.EPERM


def test_device_reset_is_an_effect_then_a_reply(session):
    assert session.receive(message(11, Command.DEVICE_RESET)) == [s.ResetDevice(),
                                                                  s.Reply(11, Command.DEVICE_RESET)]


# -- interrupts --------------------------------------------------------------------------------
def irq_info(session, index):
    reply = only_reply(session.receive(message(12, Command.DEVICE_GET_IRQ_INFO, p.IrqInfo(index).encode())))
    return p.IrqInfo.decode(reply.payload)


def test_irq_info_reports_intx_one_msix_table_size_others_zero(session):
    assert irq_info(session, PciIrq.INTX) == p.IrqInfo(0, 1, 1)
    assert irq_info(session, PciIrq.MSI).count == 0
    assert irq_info(session, PciIrq.MSIX) == p.IrqInfo(2, 1, 32)
    assert irq_info(session, PciIrq.ERR).count == 0
    reply = session.receive(message(12, Command.DEVICE_GET_IRQ_INFO, p.IrqInfo(5).encode()))
    assert error_of(reply) == errno.EINVAL


EVENTFD_TRIGGER = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER
NONE_TRIGGER = IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER


def set_irqs(session, flags, index, start, count, fds=(), data=b""):
    return session.receive(message(13, Command.DEVICE_SET_IRQS,
                                   p.IrqSet(flags, index, start, count, data).encode(), fds))


def test_msix_vectors_are_bound_to_eventfds_as_qemu_enables_them(session):
    # QEMU turns MSI-X on with one fd-less vector, then binds each vector on first use.
    assert set_irqs(session, EVENTFD_TRIGGER, PciIrq.MSIX, 0, 1) == [s.Reply(13, Command.DEVICE_SET_IRQS)]
    first, second = os.eventfd(0), os.eventfd(0)
    effects = set_irqs(session, EVENTFD_TRIGGER, PciIrq.MSIX, 0, 1, [first])
    assert effects == [s.UpdateIrqs(PciIrq.MSIX, ()), s.Reply(13, Command.DEVICE_SET_IRQS)]
    set_irqs(session, EVENTFD_TRIGGER, PciIrq.MSIX, 3, 1, [second])
    assert session.irq_fds[PciIrq.MSIX][:4] == [first, None, None, second]
    # A new fd for vector 0 replaces the old one, which the connection closes after switching.
    third = os.eventfd(0)
    assert set_irqs(session, EVENTFD_TRIGGER, PciIrq.MSIX, 0, 1, [third])[0] == \
        s.UpdateIrqs(PciIrq.MSIX, (first,))
    assert not is_closed(first)
    # Disabling the index hands back every fd.
    effects = set_irqs(session, NONE_TRIGGER, PciIrq.MSIX, 0, 0)
    assert effects[0] == s.UpdateIrqs(PciIrq.MSIX, (third, second))
    assert session.owned_fds() == []
    for fd in (first, second, third):
        os.close(fd)


def test_eventfd_trigger_without_fds_unbinds_the_vectors(session):
    fds = [os.eventfd(0), os.eventfd(0)]
    set_irqs(session, EVENTFD_TRIGGER, PciIrq.MSIX, 4, 2, fds)
    assert set_irqs(session, EVENTFD_TRIGGER, PciIrq.MSIX, 4, 2)[0] == s.UpdateIrqs(PciIrq.MSIX, tuple(fds))
    assert session.irq_fds[PciIrq.MSIX][4:6] == [None, None]
    for fd in fds:
        os.close(fd)


def test_intx_unmask_after_eoi_is_an_effect(session):
    fd = os.eventfd(0)
    set_irqs(session, EVENTFD_TRIGGER, PciIrq.INTX, 0, 1, [fd])
    effects = set_irqs(session, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK, PciIrq.INTX, 0, 1)
    assert effects == [s.UnmaskIrq(PciIrq.INTX, (0,)), s.Reply(13, Command.DEVICE_SET_IRQS)]
    set_irqs(session, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_MASK, PciIrq.INTX, 0, 1)
    assert session.irq_masked[PciIrq.INTX] == [True]
    os.close(fd)


def test_bool_trigger_signals_the_chosen_vectors(session):
    effects = set_irqs(session, IrqSetFlag.DATA_BOOL | IrqSetFlag.ACTION_TRIGGER, PciIrq.MSIX, 2, 3,
                       data=b"\1\0\1")
    assert effects[0] == s.TriggerIrq(PciIrq.MSIX, (2, 4))


@pytest.mark.parametrize("flags, index, start, count, nfds, data", [
    (EVENTFD_TRIGGER, 5, 0, 1, 1, b""),                                   # no such index
    (EVENTFD_TRIGGER, PciIrq.MSIX, 31, 2, 2, b""),                        # beyond the vectors
    (EVENTFD_TRIGGER, PciIrq.MSI, 0, 1, 1, b""),                          # MSI has none
    (EVENTFD_TRIGGER, PciIrq.MSIX, 0, 2, 1, b""),                         # fds ≠ count
    (IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_UNMASK, PciIrq.INTX, 0, 1, 1, b""),
    (IrqSetFlag.DATA_NONE | IrqSetFlag.DATA_BOOL | IrqSetFlag.ACTION_TRIGGER, PciIrq.MSIX, 0, 1, 0, b""),
    (IrqSetFlag.DATA_NONE, PciIrq.MSIX, 0, 1, 0, b""),                    # no action
    (EVENTFD_TRIGGER | 0x40, PciIrq.MSIX, 0, 1, 1, b""),                  # unknown flag
    (IrqSetFlag.DATA_BOOL | IrqSetFlag.ACTION_TRIGGER, PciIrq.MSIX, 0, 2, 0, b"\1"),  # short bools
    (NONE_TRIGGER, PciIrq.MSIX, 0, 1, 1, b""),                            # fds without EVENTFD
    (EVENTFD_TRIGGER, PciIrq.MSIX, 0, 0, 0, b""),                         # count 0 not NONE
    (NONE_TRIGGER, PciIrq.MSIX, 3, 0, 0, b""),                            # count 0 with a start
], ids=["index", "range", "msi", "fd-count", "eventfd-unmask", "two-data", "no-action",
        "unknown-flag", "short-bools", "stray-fds", "count0-eventfd", "count0-start"])
def test_bad_set_irqs_are_refused_and_their_fds_closed(session, flags, index, start, count, nfds, data):
    fds = [os.eventfd(0) for _ in range(nfds)]
    assert error_of(set_irqs(session, flags, index, start, count, fds, data)) == errno.EINVAL
    assert all(is_closed(fd) for fd in fds)
    assert session.owned_fds() == []


# -- disconnect ---------------------------------------------------------------------------------
def test_close_unmaps_every_fd_window_and_hands_back_every_irq_fd(session):
    fd = memfd(MB)
    session.receive(message(1, Command.DMA_MAP, p.DmaMap(3, 0, 0, MB).encode(), [fd]))
    session.receive(message(2, Command.DMA_MAP, p.DmaMap(1, 0, 0xfffc0000, 0x40000).encode()))
    vector = os.eventfd(0)
    set_irqs(session, EVENTFD_TRIGGER, PciIrq.MSIX, 1, 1, [vector])
    effects = session.close()
    assert effects == [s.UnmapDma(s.DmaWindow(0, MB, 0, 3, True)), s.UpdateIrqs(PciIrq.MSIX, (vector,))]
    assert not session.dma_windows and session.owned_fds() == []
    os.close(fd)
    os.close(vector)


def test_hostile_payloads_never_raise_anything_but_protocol_errors(session):
    # Every command with payloads of every short length and some junk: a reply or ProtocolError.
    for command in range(0, 20):
        if command == Command.VERSION:
            continue
        for payload in [b"", b"\xff", b"\xff" * 15, b"\xff" * 24, b"\xff" * 40, os.urandom(64)]:
            effects = session.receive(message(1, command, payload))
            assert all(isinstance(e, (s.Reply, s.UpdateIrqs, s.TriggerIrq, s.UnmaskIrq,
                                      s.ResetDevice, str)) for e in effects)
    assert not session.broken
