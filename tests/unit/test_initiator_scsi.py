"""The virtio-scsi device layer of the initiator: request/response framing on each queue, checked
against a device played in Python on the rings (no back-end)."""

import struct
import threading

import pytest

from vhostd.initiator import scsi
from vhostd.initiator.scsi import ScsiEvent, ScsiResult, VirtioScsi
from tests.helpers.ringdevice import Device

BLOCK = 512
BLOCKS = 64


def test_lun_encoding_follows_linux():
    assert scsi.lun_bytes(3, 0) == bytes([1, 3, 0x40, 0, 0, 0, 0, 0])
    assert scsi.lun_bytes(0, 0x1234) == bytes([1, 0, 0x52, 0x34, 0, 0, 0, 0])
    with pytest.raises(ValueError):
        scsi.lun_bytes(256)


def test_command_request_is_51_bytes_with_cdb_at_19():
    req = scsi.encode_command(scsi.lun_bytes(1), 7, b"\x12\x00\x00\x00\x60\x00", 1)
    assert len(req) == 51 and req[19] == 0x12 and req[16] == 1
    assert struct.unpack_from("<Q", req, 8)[0] == 7


def test_response_parsing_extracts_sense():
    sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0]) + bytes(4)
    resp = struct.pack("<IIHBB", len(sense), 4, 0, 2, 0) + sense.ljust(96, b"\0")
    result = ScsiResult.parse(resp, b"", 108)
    assert not result.ok and result.sense_key_asc_ascq == (5, 0x24, 0) and result.resid == 4


def test_event_parsing_flags_missed_events():
    event = ScsiEvent.parse(struct.pack("<I8sI", 0x80000001, scsi.lun_bytes(0), 1))
    assert event.missed and event.kind == scsi.EVT_TRANSPORT_RESET and event.reason == 1


class FakeScsiDevice:
    """A one-LUN disk answering on the rings of a VirtioScsi that is not connected anywhere."""

    def __init__(self, dev):
        self.dev = dev
        self.disk = bytearray(BLOCK * BLOCKS)
        self.queues = {vq.queue.index: (Device(vq.queue), vq.call_fd) for vq in dev.frontend.vqs}
        self.stop = False
        self.tmfs = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            for index, (device, call) in self.queues.items():
                if index == scsi.EVENT_QUEUE or not device.has_request():
                    continue
                head, chain = device.pop()
                request = device.read_chain(chain)
                reply = self.control(request) if index == scsi.CONTROL_QUEUE else self.command(request)
                device.push(head, device.write_chain(chain, reply))
                device.notify(call)

    def control(self, request):
        kind = struct.unpack_from("<I", request)[0]
        if kind == scsi.T_TMF:
            self.tmfs.append(struct.unpack_from("<I", request, 4)[0])
            return bytes([scsi.S_FUNCTION_SUCCEEDED])
        return struct.pack("<IB", 0, scsi.S_OK)

    def command(self, request):
        lun, cdb = request[:8], request[19:51]
        data_out = request[51:]
        if lun[1] != 0:
            return self.response(response=scsi.S_BAD_TARGET)
        op = cdb[0]
        if op == 0x9E:
            return self.response() + struct.pack(">QI", BLOCKS - 1, BLOCK).ljust(32, b"\0")
        if op in (0x88, 0x8A):
            lba, count = struct.unpack_from(">QI", cdb, 2)
            if op == 0x8A:
                self.disk[lba * BLOCK:(lba + count) * BLOCK] = data_out
                return self.response()
            return self.response() + bytes(self.disk[lba * BLOCK:(lba + count) * BLOCK])
        if op in (0x00, 0x35):
            return self.response()
        sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0])
        return self.response(status=scsi.CHECK_CONDITION, sense=sense)

    @staticmethod
    def response(status=0, response=0, sense=b""):
        return struct.pack("<IIHBB", len(sense), 0, 0, status, response) + sense.ljust(96, b"\0")

    def post_event(self, event, target, reason):
        device, call = self.queues[scsi.EVENT_QUEUE]
        head, chain = device.pop()
        device.push(head, device.write_chain(chain, struct.pack("<I8sI", event, scsi.lun_bytes(target), reason)))
        device.notify(call)

    def close(self):
        self.stop = True
        self.thread.join(2)


@pytest.fixture
def rig(tmp_path):
    dev = VirtioScsi(str(tmp_path / "none.sock"), num_queues=2, memory_bytes=16 << 20,
                     bounce_bytes=4096)
    dev.post_event_buffers(2)
    fake = FakeScsiDevice(dev)
    yield dev, fake
    fake.close()
    dev.close()


def test_commands_move_data_both_ways(rig):
    dev, _ = rig
    assert dev.read_capacity() == (BLOCKS, BLOCK)
    dev.write(0, 4, b"\x11" * 1024, BLOCK)
    assert dev.read(0, 4, 2, BLOCK) == b"\x11" * 1024
    assert dev.command(0, bytes([0x88, 0]) + struct.pack(">QI", 4, 1) + b"\0\0",
                       data_in_len=BLOCK, queue=1).data == b"\x11" * BLOCK


def test_check_condition_carries_sense(rig):
    dev, _ = rig
    result = dev.command(0, bytes([0xFF]) + bytes(5))
    assert result.status == scsi.CHECK_CONDITION and result.sense_key_asc_ascq == (5, 0x20, 0)
    with pytest.raises(scsi.ScsiError):
        dev.checked("bad opcode", result)


def test_unknown_target_reports_bad_target(rig):
    dev, _ = rig
    assert dev.test_unit_ready(target=5).response == scsi.S_BAD_TARGET


def test_task_management_and_async_notification_use_the_control_queue(rig):
    dev, fake = rig
    assert dev.tmf(scsi.TMF_LOGICAL_UNIT_RESET, 0) == scsi.S_FUNCTION_SUCCEEDED
    assert fake.tmfs == [scsi.TMF_LOGICAL_UNIT_RESET]
    assert dev.async_notification(0, 16) == (scsi.S_OK, 0)


def test_events_arrive_in_posted_buffers_which_are_posted_again(rig):
    dev, fake = rig
    assert dev.events() == []
    fake.post_event(scsi.EVT_TRANSPORT_RESET, 2, 1)
    (event,) = dev.events(timeout_s=2)
    assert event.kind == scsi.EVT_TRANSPORT_RESET and event.lun[1] == 2 and event.reason == 1
    assert dev.frontend.queues[scsi.EVENT_QUEUE].inflight == 2


def test_prepare_load_points_the_c_path_at_the_lun(rig):
    dev, _ = rig
    assert dev.prepare_load() == BLOCKS * BLOCK
    q = dev.request_queues[1]
    q.run_io("write", 2 * BLOCK, b"\x22" * BLOCK)
    q.run_io("flush", 0)
    assert q.run_io("read", BLOCK, length=2 * BLOCK) == bytes(BLOCK) + b"\x22" * BLOCK
    with pytest.raises(OSError):
        q.run_io("read", 0, length=100)         # not a whole number of blocks
