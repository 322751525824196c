"""SCSI disk emulation and virtio-scsi framing through the C data plane: CDB bytes in, response,
sense and data bytes out.  A reactor polls a control, an event and a request queue of a
ScsiDevice; a test driver builds the chains in shared memory (no vhost-user socket)."""

import os
import struct
import uuid

import pytest

from vhostd import _dataplane as dp
from tests.helpers.scsi_fuzzing import RESP
from tests.helpers.ringdriver import DISK_KINDS, make_disk, GuestRam, SplitRing
from tests.helpers.waiting import wait_for

OK, BAD_TARGET, FAILURE, FUNCTION_REJECTED, INCORRECT_LUN = 0, 3, 9, 11, 12
GOOD, CHECK = 0, 2
UUID = uuid.UUID("12345678-9abc-4def-8123-456789abcdef")


class Result:
    def __init__(self, raw, data, used_len):
        self.sense_len, self.resid, _, self.status, self.response, sense = RESP.unpack(raw)
        self.sense = sense[:self.sense_len]
        self.data = data
        self.used_len = used_len

    @property
    def key_asc_ascq(self):
        if self.status != CHECK:
            return None
        assert self.sense[0] == 0x70 and self.sense_len == 18
        return (self.sense[2], self.sense[12], self.sense[13])


class ScsiRig:
    """Queues 0 (control), 1 (event), 2 (requests) of one ScsiDevice on one reactor."""

    def __init__(self, disks, readonly=False):
        self.ram = GuestRam(64 << 20)
        self.memory = self.ram.memory()
        self.device = dp.ScsiDevice()
        for num, disk in disks.items():
            self.device.set_target(num, disk, b"serial-%d" % num, b"Malloc disk", UUID.bytes, readonly)
        self.device.set_events_enabled(True)
        self.reactor = dp.Reactor(0, 200.0)
        self.reactor.start()
        self.rings, self.queues, self.fds = [], [], []
        for index in range(3):
            ring = SplitRing(self.ram, 128)
            queue = ring.queue(index, self.memory)
            fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
            queue.set_fds(*fds)
            self.device.attach(queue)
            msg = self.reactor.post_add_queue(queue)
            wait_for(lambda: msg.done)
            self.rings.append(ring)
            self.queues.append(queue)
            self.fds.append(fds)

    def kick(self, index):
        os.eventfd_write(self.fds[index][0], 1)

    def wait_used(self, index, count=1):
        got = []

        def more():
            got.extend(self.rings[index].pop_used())
            return len(got) >= count
        wait_for(more)
        return got

    def command(self, cdb, target=0, data_out=b"", data_in_len=0, lun=None, resp_len=RESP.size):
        resp, din = self.post_command(cdb, target, data_out, data_in_len, lun, resp_len)
        self.kick(2)
        (_, used_len), = self.wait_used(2)
        data = self.ram.read(din, data_in_len) if din is not None else b""
        return Result(self.ram.read(resp, RESP.size), data, used_len)

    def post_command(self, cdb, target=0, data_out=b"", data_in_len=0, lun=None, resp_len=RESP.size):
        """Put a command on the request queue without kicking; returns (response gpa, data-in
        gpa or None)."""
        lun = lun if lun is not None else bytes([1, target, 0x40, 0, 0, 0, 0, 0])
        req = self.ram.alloc(51)
        self.ram.write(req, lun + struct.pack("<QBBB", 7, 0, 0, 0) + cdb.ljust(32, b"\0"))
        segments = [(req, 51, False)]
        if data_out:
            out = self.ram.alloc(len(data_out), 512)
            self.ram.write(out, data_out)
            segments.append((out, len(data_out), False))
        resp = self.ram.alloc(resp_len)
        self.ram.write(resp, b"\xee" * resp_len)
        segments.append((resp, resp_len, True))
        din = None
        if data_in_len:
            din = self.ram.alloc(data_in_len, 512)
            segments.append((din, data_in_len, True))
        self.rings[2].add_chain(segments)
        return resp, din

    def control(self, request, resp_len):
        req = self.ram.alloc(len(request))
        self.ram.write(req, request)
        resp = self.ram.alloc(resp_len)
        self.rings[0].add_chain([(req, len(request), False), (resp, resp_len, True)])
        self.kick(0)
        return self

    def control_reply(self, resp_len):
        (head, used_len), = self.wait_used(0)
        return used_len

    def post_event(self, event, reason, target):
        msg = self.device.post_event(self.reactor, event, reason, target)
        wait_for(lambda: msg.done)
        return msg.result

    def close(self):
        for queue in self.queues:
            msg = self.reactor.post_remove_queue(queue)
            wait_for(lambda: msg.done)
            self.device.detach(queue)
        self.reactor.post_stop()
        self.reactor.join(5)
        for fds in self.fds:
            for fd in fds:
                os.close(fd)
        self.memory.close()


@pytest.fixture(params=DISK_KINDS)
def rig(request, tmp_path):
    """A ScsiRig maker; by default target 0 is a 4 MiB disk of 512-byte blocks, once in memory
    (completes inside the submit) and once a file (completes later, from the io_uring ring)."""
    rigs = []

    def make(disks=None, **kw):
        r = ScsiRig(disks if disks is not None else {0: make_disk(request.param, tmp_path, 512, 8192)}, **kw)
        rigs.append(r)
        return r
    yield make
    for r in rigs:
        r.close()


def cdb_rw16(opcode, lba, blocks):
    return bytes([opcode, 0]) + struct.pack(">QI", lba, blocks) + b"\0\0"


def check(result, key, asc, ascq=0):
    assert result.response == OK
    assert result.key_asc_ascq == (key, asc, ascq)


# -- simple commands --------------------------------------------------------------------------
def test_test_unit_ready_and_start_stop_unit_are_good(rig):
    r = rig()
    for cdb in (bytes(6), bytes([0x1B, 0, 0, 0, 1, 0])):
        res = r.command(cdb)
        assert (res.response, res.status, res.sense_len, res.used_len) == (OK, GOOD, 0, RESP.size)


def test_unknown_opcodes_are_invalid_command_operation_code(rig):
    r = rig()
    for opcode in (0x4C, 0x5F, 0xA3, 0x89, 0x16):
        check(r.command(bytes([opcode]) + bytes(15)), 5, 0x20)


def test_request_sense_reports_no_sense_and_refuses_descriptor_format(rig):
    r = rig()
    res = r.command(bytes([0x03, 0, 0, 0, 252, 0]), data_in_len=252)
    assert res.status == GOOD and res.data[:18] == bytes([0x70, 0, 0, 0, 0, 0, 0, 10]) + bytes(10)
    assert res.resid == 252 - 18 and res.used_len == RESP.size + 18
    check(r.command(bytes([0x03, 1, 0, 0, 252, 0]), data_in_len=252), 5, 0x24)


# -- INQUIRY ----------------------------------------------------------------------------------
def test_standard_inquiry_names_the_disk_and_truncates_to_allocation_length(rig):
    r = rig()
    res = r.command(bytes([0x12, 0, 0, 0, 96, 0]), data_in_len=96)
    d = res.data
    assert d[0] == 0 and d[2] == 6 and d[3] == 0x12 and d[4] == 91 and d[7] & 0x02
    assert d[8:16] == b"VHOSTD  " and d[16:32] == b"Malloc disk     " and d[32:36] == b"0001"
    short = r.command(bytes([0x12, 0, 0, 0, 36, 0]), data_in_len=64)
    assert short.data[:36] == d[:36] and short.resid == 64 - 36
    check(r.command(bytes([0x12, 0, 0x80, 0, 96, 0]), data_in_len=96), 5, 0x24)   # page without EVPD


def vpd(r, page, alloc=255):
    res = r.command(bytes([0x12, 1, page]) + struct.pack(">H", alloc) + b"\0", data_in_len=alloc)
    assert res.status == GOOD, res.key_asc_ascq
    assert res.data[1] == page
    return res.data[:4 + struct.unpack(">H", res.data[2:4])[0]]


def test_vpd_pages_derive_identity_and_limits_from_the_bdev(rig):
    r = rig()
    assert list(vpd(r, 0x00)[4:]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    assert vpd(r, 0x80)[4:] == b"serial-0"
    ids = vpd(r, 0x83)
    naa = ids[4:16]
    assert naa[:4] == bytes([0x01, 0x03, 0, 8])
    assert naa[4] >> 4 == 3 and naa[5:12] == UUID.bytes[1:8]
    t10 = ids[16:]
    assert t10[:4] == bytes([0x02, 0x01, 0, 40]) and t10[4:44] == b"VHOSTD  " + UUID.hex.encode()
    limits = vpd(r, 0xB0)
    assert len(limits) == 0x40 and limits[4] & 1                         # WSNZ
    assert struct.unpack(">I", limits[8:12])[0] == 4 * 1024 * 1024 // 512  # max transfer
    assert struct.unpack(">II", limits[20:28]) == (1 << 30 >> 9, 32)       # unmap limits
    assert struct.unpack(">H", vpd(r, 0xB1)[4:6])[0] == 1                 # non-rotating
    assert vpd(r, 0xB2)[5] & 0xE0 == 0xE0                                  # LBPU LBPWS LBPWS10
    check(r.command(bytes([0x12, 1, 0x99, 0, 255, 0]), data_in_len=255), 5, 0x24)


# -- capacity -----------------------------------------------------------------------------------
def test_read_capacity_10_and_16(rig):
    r = rig({0: dp.Disk.malloc(4096, 1000), 1: dp.Disk.null(512, 1 << 33)})
    res = r.command(bytes([0x25]) + bytes(9), data_in_len=8)
    assert struct.unpack(">II", res.data) == (999, 4096)
    res = r.command(bytes([0x25]) + bytes(9), target=1, data_in_len=8)
    assert struct.unpack(">II", res.data) == (0xFFFFFFFF, 512)             # use READ CAPACITY(16)
    res = r.command(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + b"\0\0", target=1, data_in_len=32)
    assert struct.unpack(">QI", res.data[:12]) == ((1 << 33) - 1, 512) and res.data[14] & 0x80
    check(r.command(bytes([0x9E, 0x11]) + bytes(14), data_in_len=32), 5, 0x24)


# -- capacity changes: unit attention -------------------------------------------------------------
READ_CAPACITY_10 = bytes([0x25]) + bytes(9)
UNIT_ATTENTION, CAPACITY_DATA_HAS_CHANGED = 6, (0x2A, 0x09)


def grown_rig(rig):
    """Target 0 a null disk of 1000 blocks grown to 3000 and reported; target 1 untouched."""
    disk = dp.Disk.null(512, 1000)
    r = rig({0: disk, 1: dp.Disk.null(512, 1000)})
    disk.resize(3000)
    r.device.report_capacity_changed(0)
    return r


def test_a_capacity_change_is_reported_once_to_the_next_command_then_read_capacity_has_it(rig):
    r = grown_rig(rig)
    check(r.command(bytes(6)), UNIT_ATTENTION, *CAPACITY_DATA_HAS_CHANGED)
    assert r.command(bytes(6)).status == GOOD
    res = r.command(READ_CAPACITY_10, data_in_len=8)
    assert res.status == GOOD and struct.unpack(">II", res.data) == (2999, 512)


def test_the_unit_attention_is_only_for_the_resized_target(rig):
    r = grown_rig(rig)
    assert r.command(bytes(6), target=1).status == GOOD
    check(r.command(READ_CAPACITY_10, data_in_len=8), UNIT_ATTENTION, *CAPACITY_DATA_HAS_CHANGED)


def test_a_read_gets_the_unit_attention_and_moves_no_data(rig):
    r = grown_rig(rig)
    res = r.command(cdb_rw16(0x88, 0, 1), data_in_len=512)
    check(res, UNIT_ATTENTION, *CAPACITY_DATA_HAS_CHANGED)
    assert res.resid == 512
    assert r.command(cdb_rw16(0x88, 2000, 1), data_in_len=512).status == GOOD   # past the old end


def test_inquiry_and_report_luns_leave_the_unit_attention_pending(rig):
    r = grown_rig(rig)
    assert r.command(bytes([0x12, 0, 0, 0, 36, 0]), data_in_len=36).status == GOOD
    assert r.command(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0]), data_in_len=16).status == GOOD
    check(r.command(bytes(6)), UNIT_ATTENTION, *CAPACITY_DATA_HAS_CHANGED)


def test_request_sense_returns_the_unit_attention_as_its_data_and_clears_it(rig):
    r = grown_rig(rig)
    res = r.command(bytes([0x03, 0, 0, 0, 18, 0]), data_in_len=18)
    assert res.status == GOOD
    assert (res.data[0], res.data[2], res.data[12], res.data[13]) == (0x70, UNIT_ATTENTION, 0x2A, 0x09)
    res = r.command(bytes([0x03, 0, 0, 0, 18, 0]), data_in_len=18)
    assert res.status == GOOD and res.data[2] == 0 and res.data[12] == 0
    assert r.command(bytes(6)).status == GOOD


def test_a_new_target_in_the_slot_starts_without_the_old_unit_attention(rig):
    r = grown_rig(rig)
    r.device.begin_remove(0)
    r.device.finish_remove(0)
    r.device.set_target(0, dp.Disk.malloc(512, 16), b"again", b"Malloc disk", UUID.bytes)
    assert r.command(bytes(6)).status == GOOD


# -- READ / WRITE -------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [6, 10, 12, 16])
def test_read_write_every_cdb_size_round_trips(rig, size):
    r = rig()
    data = os.urandom(8 * 512)
    lba = 100
    if size == 6:
        wr, rd = bytes([0x0A, 0, 0, lba, 8, 0]), bytes([0x08, 0, 0, lba, 8, 0])
    elif size == 10:
        wr = bytes([0x2A, 0]) + struct.pack(">IBHB", lba, 0, 8, 0)
        rd = bytes([0x28, 0]) + struct.pack(">IBHB", lba, 0, 8, 0)
    elif size == 12:
        wr = bytes([0xAA, 0]) + struct.pack(">II", lba, 8) + b"\0\0"
        rd = bytes([0xA8, 0]) + struct.pack(">II", lba, 8) + b"\0\0"
    else:
        wr, rd = cdb_rw16(0x8A, lba, 8), cdb_rw16(0x88, lba, 8)
    res = r.command(wr, data_out=data)
    assert (res.status, res.resid, res.used_len) == (GOOD, 0, RESP.size)
    res = r.command(rd, data_in_len=len(data))
    assert (res.status, res.data, res.used_len) == (GOOD, data, RESP.size + len(data))


def test_read_6_with_length_zero_means_256_blocks(rig):
    r = rig()
    res = r.command(bytes([0x08, 0, 0, 0, 0, 0]), data_in_len=256 * 512)
    assert res.status == GOOD and res.resid == 0 and len(res.data) == 256 * 512


def test_transfer_length_zero_is_good_without_data(rig):
    r = rig()
    res = r.command(cdb_rw16(0x88, 0, 0), data_in_len=512)
    assert res.status == GOOD and res.resid == 512 and res.used_len == RESP.size


def test_lba_range_errors_and_oversized_transfers(rig):
    r = rig()
    check(r.command(cdb_rw16(0x88, 8190, 4), data_in_len=2048), 5, 0x21)
    check(r.command(cdb_rw16(0x88, (1 << 64) - 1, 2), data_in_len=1024), 5, 0x21)
    check(r.command(cdb_rw16(0x8A, 8192, 1), data_out=bytes(512)), 5, 0x21)
    big = dp.Disk.null(512, 1 << 20)
    r2 = rig({0: big})
    check(r2.command(cdb_rw16(0x88, 0, 8193), data_in_len=8193 * 512), 5, 0x24)   # > 4 MiB


def test_buffers_that_disagree_with_the_cdb(rig):
    r = rig()
    r.command(cdb_rw16(0x8A, 0, 1), data_out=b"\x5a" * 512)
    res = r.command(cdb_rw16(0x88, 0, 1), data_in_len=1024)        # longer: residual
    assert res.status == GOOD and res.resid == 512 and res.data[:512] == b"\x5a" * 512
    res = r.command(cdb_rw16(0x88, 0, 2), data_in_len=512)         # shorter: refused
    check(res, 5, 0x24)
    assert res.resid == 512
    check(r.command(cdb_rw16(0x88, 0, 1), data_out=bytes(512)), 5, 0x24)  # wrong direction


def test_readonly_target_refuses_writes_with_data_protect(rig):
    r = rig(readonly=True)
    check(r.command(cdb_rw16(0x8A, 0, 1), data_out=bytes(512)), 7, 0x27)
    assert r.command(cdb_rw16(0x88, 0, 1), data_in_len=512).status == GOOD
    res = r.command(bytes([0x1A, 0, 0x08, 0, 64, 0]), data_in_len=64)
    assert res.data[2] & 0x80                                         # WP in MODE SENSE


# -- VERIFY, SYNCHRONIZE CACHE ------------------------------------------------------------------
def test_verify_without_byte_check_and_range(rig):
    r = rig()
    assert r.command(bytes([0x2F, 0]) + struct.pack(">IBHB", 0, 0, 8, 0)).status == GOOD
    assert r.command(bytes([0x8F, 0]) + struct.pack(">QI", 8000, 192) + b"\0\0").status == GOOD
    check(r.command(bytes([0x2F, 0x02]) + struct.pack(">IBHB", 0, 0, 8, 0)), 5, 0x24)
    check(r.command(bytes([0x8F, 0]) + struct.pack(">QI", 8000, 193) + b"\0\0"), 5, 0x21)


def test_synchronize_cache_flushes_a_file_bdev(rig, tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    r = rig({0: dp.Disk.file(str(path), 512)})
    data = os.urandom(4096)
    assert r.command(cdb_rw16(0x8A, 16, 8), data_out=data).status == GOOD
    assert r.command(bytes([0x35]) + bytes(9)).status == GOOD
    assert r.command(bytes([0x91]) + bytes(15)).status == GOOD
    with open(path, "rb") as f:
        f.seek(16 * 512)
        assert f.read(4096) == data
    check(r.command(bytes([0x35, 0]) + struct.pack(">IBHB", 2047, 0, 2, 0)), 5, 0x21)


# -- WRITE SAME, UNMAP --------------------------------------------------------------------------
def read_blocks(r, lba, blocks, target=0):
    res = r.command(cdb_rw16(0x88, lba, blocks), target=target, data_in_len=blocks * 512)
    assert res.status == GOOD
    return res.data


def test_write_same_repeats_a_pattern_over_many_chunks(rig):
    # On the file disk each chunk completes later, from the ring, and must wait for the one before.
    r = rig()
    pattern = bytes(range(256)) * 2
    res = r.command(bytes([0x93, 0]) + struct.pack(">QI", 10, 300) + b"\0\0", data_out=pattern)
    assert res.status == GOOD
    assert read_blocks(r, 10, 300) == pattern * 300
    assert read_blocks(r, 310, 1) == bytes(512)
    res = r.command(bytes([0x41, 0]) + struct.pack(">IBHB", 400, 0, 3, 0), data_out=b"\x11" * 512)
    assert res.status == GOOD and read_blocks(r, 400, 3) == b"\x11" * 1536


def test_write_same_of_zeros_with_and_without_unmap_and_ndob(rig):
    r = rig()
    for lba in (0, 50, 100):
        r.command(cdb_rw16(0x8A, lba, 8), data_out=b"\xff" * 4096)
    assert r.command(bytes([0x93, 0x08]) + struct.pack(">QI", 0, 8) + b"\0\0", data_out=bytes(512)).status == GOOD
    assert r.command(bytes([0x93, 0x00]) + struct.pack(">QI", 50, 8) + b"\0\0", data_out=bytes(512)).status == GOOD
    assert r.command(bytes([0x93, 0x09]) + struct.pack(">QI", 100, 8) + b"\0\0").status == GOOD      # NDOB
    for lba in (0, 50, 100):
        assert read_blocks(r, lba, 8) == bytes(4096)


def test_write_same_refusals(rig):
    r = rig()
    check(r.command(bytes([0x93, 0]) + struct.pack(">QI", 0, 0) + b"\0\0", data_out=bytes(512)), 5, 0x24)
    check(r.command(bytes([0x93, 0x10]) + struct.pack(">QI", 0, 1) + b"\0\0", data_out=bytes(512)), 5, 0x24)
    check(r.command(bytes([0x93, 0]) + struct.pack(">QI", 8190, 4) + b"\0\0", data_out=bytes(512)), 5, 0x21)
    check(r.command(bytes([0x93, 0]) + struct.pack(">QI", 0, 1) + b"\0\0", data_out=bytes(100)), 5, 0x1A)


def unmap_params(ranges):
    descs = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(descs), len(descs)) + descs


def test_unmap_zeroes_every_descriptor_range(rig):
    r = rig()
    r.command(cdb_rw16(0x8A, 0, 64), data_out=b"\xab" * (64 * 512))
    params = unmap_params([(0, 4), (10, 2), (20, 0)])
    res = r.command(bytes([0x42, 0, 0, 0, 0, 0, 0]) + struct.pack(">HB", len(params), 0), data_out=params)
    assert res.status == GOOD
    data = read_blocks(r, 0, 64)
    assert data[:4 * 512] == bytes(4 * 512) and data[4 * 512:10 * 512] == b"\xab" * (6 * 512)
    assert data[10 * 512:12 * 512] == bytes(1024) and data[12 * 512:] == b"\xab" * (52 * 512)


def test_unmap_refusals(rig):
    r = rig()
    params = unmap_params([(8190, 4)])
    check(r.command(bytes([0x42] + [0] * 6) + struct.pack(">HB", len(params), 0), data_out=params), 5, 0x21)
    check(r.command(bytes([0x42] + [0] * 6) + struct.pack(">HB", 4, 0), data_out=params), 5, 0x1A)
    many = unmap_params([(i, 1) for i in range(33)])
    check(r.command(bytes([0x42] + [0] * 6) + struct.pack(">HB", len(many), 0), data_out=many), 5, 0x26)
    assert r.command(bytes([0x42] + [0] * 9)).status == GOOD                     # empty list


# -- MODE SENSE / MODE SELECT -------------------------------------------------------------------
def test_mode_sense_6_caching_page_and_block_descriptor(rig):
    r = rig()
    res = r.command(bytes([0x1A, 0, 0x08, 0, 255, 0]), data_in_len=255)
    d = res.data
    assert d[0] == 3 + 8 + 20 and d[3] == 8
    assert struct.unpack(">I", d[4:8])[0] == 8192 and d[9:12] == bytes([0, 2, 0])
    assert d[12] == 0x08 and d[13] == 0x12 and d[14] & 0x04                     # WCE
    res = r.command(bytes([0x1A, 0x08, 0x3F, 0, 255, 0]), data_in_len=255)     # DBD, all pages
    d = res.data
    assert d[3] == 0 and d[0] == 3 + 20 + 12 + 12
    assert [d[4], d[24], d[36]] == [0x08, 0x0A, 0x1C]
    changeable = r.command(bytes([0x1A, 0x08, 0x48, 0, 255, 0]), data_in_len=255).data
    assert changeable[6] == 0                                                   # nothing changeable


def test_mode_sense_10_long_lba_and_refusals(rig):
    r = rig()
    res = r.command(bytes([0x5A, 0x10, 0x0A, 0, 0, 0, 0]) + struct.pack(">HB", 255, 0), data_in_len=255)
    d = res.data
    assert struct.unpack(">H", d[0:2])[0] == 6 + 16 + 12 and d[4] & 1 and struct.unpack(">H", d[6:8])[0] == 16
    assert struct.unpack(">Q", d[8:16])[0] == 8192 and d[24] == 0x0A
    check(r.command(bytes([0x1A, 0, 0xC8, 0, 255, 0]), data_in_len=255), 5, 0x39)   # saved values
    check(r.command(bytes([0x1A, 0, 0x19, 0, 255, 0]), data_in_len=255), 5, 0x24)   # no such page


def caching_page(wce):
    return bytes([0x08, 0x12, 0x04 if wce else 0]) + bytes(17)


def test_mode_select_accepts_what_we_have_and_refuses_changes(rig):
    r = rig()
    params = bytes([0, 0, 0, 8]) + struct.pack(">I", 0) + bytes([0]) + (512).to_bytes(3, "big") + caching_page(True)
    sel = lambda flags, p: r.command(bytes([0x15, flags, 0, 0, len(p), 0]), data_out=p)
    assert sel(0x10, params).status == GOOD
    control = bytes([0, 0, 0, 0, 0x0A, 0x0A]) + bytes(10)
    assert sel(0x10, control).status == GOOD
    check(sel(0x10, bytes([0, 0, 0, 0]) + caching_page(False)), 5, 0x26)        # write-through
    bad_bs = bytes([0, 0, 0, 8]) + bytes(5) + (4096).to_bytes(3, "big")
    check(sel(0x10, bad_bs), 5, 0x26)                                          # block size
    check(sel(0x10, bytes([0, 0, 0, 0, 0x19, 2, 0, 0])), 5, 0x26)             # unknown page
    check(sel(0x00, params), 5, 0x24)                                          # PF=0
    check(sel(0x11, params), 5, 0x39)                                          # SP=1
    check(sel(0x10, bytes([0, 0, 0, 0, 0x08, 0x12, 4])), 5, 0x1A)             # truncated page
    p10 = bytes(8) + caching_page(True)
    assert r.command(bytes([0x55, 0x10, 0, 0, 0, 0, 0]) + struct.pack(">HB", len(p10), 0),
                     data_out=p10).status == GOOD


# -- REPORT LUNS, PERSISTENT RESERVE IN, missing LUNs and targets ------------------------------
def test_report_luns_lists_lun_0(rig):
    r = rig()
    res = r.command(bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", 64) + b"\0\0", data_in_len=64)
    assert res.data[:16] == struct.pack(">I", 8) + bytes(12) and res.resid == 48
    check(r.command(bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", 8) + b"\0\0", data_in_len=8), 5, 0x24)


def test_persistent_reserve_in_reports_no_keys_or_reservation(rig):
    r = rig()
    for action in (0, 1):
        res = r.command(bytes([0x5E, action]) + bytes(5) + struct.pack(">H", 64) + b"\0", data_in_len=64)
        assert res.status == GOOD and res.data[:8] == bytes(8)
    check(r.command(bytes([0x5E, 9]) + bytes(5) + struct.pack(">H", 64) + b"\0", data_in_len=64), 5, 0x24)


def test_missing_lun_and_missing_target(rig):
    r = rig()
    lun1 = bytes([1, 0, 0x40, 1, 0, 0, 0, 0])
    res = r.command(bytes([0x12, 0, 0, 0, 36, 0]), data_in_len=36, lun=lun1)
    assert res.status == GOOD and res.data[0] == 0x7F
    check(r.command(bytes(6), lun=lun1), 5, 0x25)
    for lun in (bytes([1, 5, 0x40, 0, 0, 0, 0, 0]), bytes([1, 200, 0x40, 0, 0, 0, 0, 0]), bytes([2, 0, 0x40, 0] + [0] * 4)):
        res = r.command(bytes([0x12, 0, 0, 0, 36, 0]), data_in_len=36, lun=lun)
        assert res.response == BAD_TARGET and res.used_len == RESP.size and res.resid == 36


def test_bidirectional_and_short_requests_fail_at_the_transport(rig):
    r = rig()
    res = r.command(cdb_rw16(0x88, 0, 1), data_out=bytes(512), data_in_len=512)
    assert res.response == FAILURE
    res = r.command(bytes(6), resp_len=50)              # response area too small: nothing written
    assert res.used_len == 0


# -- control queue ------------------------------------------------------------------------------
def tmf(r, subtype, lun):
    resp = r.ram.alloc(1)
    req = r.ram.alloc(24)
    r.ram.write(req, struct.pack("<II8sQ", 0, subtype, lun, 1))
    r.rings[0].add_chain([(req, 24, False), (resp, 1, True)])
    r.kick(0)
    (_, used_len), = r.wait_used(0)
    assert used_len == 1
    return r.ram.read(resp, 1)[0]


def test_task_management_functions(rig):
    r = rig()
    lun0 = bytes([1, 0, 0x40, 0, 0, 0, 0, 0])
    for subtype in (0, 1, 3, 4, 5, 6, 7):
        assert tmf(r, subtype, lun0) == OK
    assert tmf(r, 2, lun0) == FUNCTION_REJECTED              # CLEAR ACA: no ACA
    assert tmf(r, 99, lun0) == FUNCTION_REJECTED
    assert tmf(r, 5, bytes([1, 3, 0x40, 0, 0, 0, 0, 0])) == BAD_TARGET
    assert tmf(r, 5, bytes([1, 0, 0x40, 2, 0, 0, 0, 0])) == INCORRECT_LUN


def test_task_management_answers_after_the_lun_has_nothing_in_flight(rig):
    # A 1 MiB/s limit keeps four 64 KiB reads in flight for about 0.25 s: a LOGICAL UNIT RESET
    # sent meanwhile is answered only after all four completed, and one on another target at once.
    slow = dp.Disk.malloc(512, 8192)
    slow.set_qos(rw_mbytes_per_sec=1)
    r = rig({0: slow, 1: dp.Disk.malloc(512, 64)})
    reads = [r.post_command(cdb_rw16(0x88, 128 * k, 128), data_in_len=65536)[0] for k in range(4)]
    r.kick(2)
    assert tmf(r, 5, bytes([1, 1, 0x40, 0, 0, 0, 0, 0])) == OK       # target 1 is idle
    done_before = r.rings[2].pop_used()
    assert len(done_before) < 4                 # 256 KiB at 1 MiB/s: still reading
    assert tmf(r, 5, bytes([1, 0, 0x40, 0, 0, 0, 0, 0])) == OK
    completed = done_before + r.rings[2].pop_used()     # taken right after the TMF's answer
    assert len(completed) == 4, completed                  # all four were done before it
    assert all(RESP.unpack(r.ram.read(a, RESP.size))[3:5] == (0, 0) for a in reads)


def test_asynchronous_notification_query_supports_no_events(rig):
    r = rig()
    resp = r.ram.alloc(5)
    req = r.ram.alloc(16)
    r.ram.write(req, struct.pack("<I8sI", 1, bytes([1, 0, 0x40, 0, 0, 0, 0, 0]), 0x10))
    r.rings[0].add_chain([(req, 16, False), (resp, 5, True)])
    r.kick(0)
    (_, used_len), = r.wait_used(0)
    assert used_len == 5 and r.ram.read(resp, 5) == bytes(5)


# -- event queue --------------------------------------------------------------------------------
def post_event_buffers(r, count):
    bufs = []
    for _ in range(count):
        b = r.ram.alloc(16)
        r.rings[1].add_chain([(b, 16, True)])
        bufs.append(b)
    r.kick(1)
    return bufs


def test_events_wait_for_buffers_and_overflow_sets_events_missed(rig):
    r = rig()
    assert r.post_event(1, 1, 3) == 0              # no buffer posted yet: kept
    bufs = post_event_buffers(r, 1)
    r.wait_used(1)
    assert struct.unpack("<I8sI", r.ram.read(bufs[0], 16)) == (1, bytes([1, 3, 0, 0, 0, 0, 0, 0]), 1)
    results = [r.post_event(1, 2, i % 8) for i in range(17)]
    assert results[:16] == [0] * 16 and results[16] < 0
    bufs = post_event_buffers(r, 16)
    r.wait_used(1, 16)
    first = struct.unpack("<I8sI", r.ram.read(bufs[0], 16))
    assert first[0] == 1 | 0x80000000 and first[2] == 2           # EVENTS_MISSED
    assert struct.unpack("<I", r.ram.read(bufs[1], 4))[0] == 1


def test_removed_target_gets_bad_target_and_its_slot_can_be_reused(rig):
    r = rig()
    r.device.begin_remove(0)
    assert r.device.target_inflight(0) == 0
    r.device.finish_remove(0)
    assert r.command(bytes(6)).response == BAD_TARGET
    r.device.set_target(0, dp.Disk.malloc(4096, 16), b"again", b"Malloc disk", UUID.bytes)
    res = r.command(bytes([0x25]) + bytes(9), data_in_len=8)
    assert struct.unpack(">II", res.data) == (15, 4096)
