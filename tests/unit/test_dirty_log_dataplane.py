"""The dirty log in the C data plane: a blk queue on a reactor marks every guest page it writes
(read data, status byte, used ring) once logging is on, and nothing while it is off."""

import os
import struct

import pytest

from vhostd import _dataplane as dp
from tests.helpers.waiting import wait_for
from tests.unit.test_blk_dataplane import Rig, S_OK, T_IN, T_OUT
from tests.helpers.ringdriver import make_disk

PAGE = 4096


@pytest.fixture
def rig(tmp_path):
    r = Rig(make_disk("file", tmp_path, 512, 4096))
    log_fd = os.memfd_create("dirty-log")
    os.ftruncate(log_fd, r.ram.size // PAGE // 8)
    r.log = dp.DirtyLog(log_fd, r.ram.size // PAGE // 8, 0)
    os.close(log_fd)
    yield r
    r.close()
    r.log.close()


def set_log(r, log):
    r.queue.set_log(log, r.ring.used, True)
    msg = r.reactor.post_set_log(r.queue)
    wait_for(lambda: msg.done)


def page_aligned_read(r, data_pages=2):
    """Post a read into a buffer that starts on a page of its own; its gpa and the status gpa."""
    r.ram.next_free = (r.ram.next_free + PAGE - 1) // PAGE * PAGE + 8 * PAGE
    buf = r.ram.alloc(data_pages * PAGE, PAGE)
    hdr = r.ram.alloc(16)
    r.ram.write(hdr, struct.pack("<IIQ", T_IN, 0, 0))
    status = r.ram.alloc(1)
    r.ring.add_chain([(hdr, 16, False), (buf, data_pages * PAGE, True), (status, 1, True)])
    os.eventfd_write(r.kick, 1)
    r.wait_used()
    assert r.ram.read(status, 1)[0] == S_OK
    return buf, hdr, status


def test_nothing_is_marked_while_logging_is_off(rig):
    r = rig
    assert r.request(T_OUT, 0, data_out=b"\x55" * PAGE)[0] == S_OK
    page_aligned_read(r)
    assert r.log.dirty_pages() == [] and r.queue.log_marks == 0 and not r.queue.logging


def test_a_read_marks_its_data_status_and_used_ring_pages(rig, tmp_path):
    r = rig
    set_log(r, r.log)
    assert r.queue.logging
    used_pages = {r.ring.used // PAGE, (r.ring.used + 6 + 8 * r.ring.size - 1) // PAGE}
    # Turning logging on marks the whole used ring: entries pushed before may not be copied yet.
    assert set(r.log.dirty_pages()) == used_pages
    buf, hdr, status = page_aligned_read(r, data_pages=2)
    dirty = set(r.log.dirty_pages())
    assert {buf // PAGE, buf // PAGE + 1, status // PAGE} <= dirty
    # The header was only read by the device: its page is not marked unless it shares one.
    if hdr // PAGE not in used_pages | {status // PAGE}:
        assert hdr // PAGE not in dirty


def test_a_write_marks_only_its_status_and_the_used_ring(rig):
    r = rig
    set_log(r, r.log)
    before = set(r.log.dirty_pages())
    r.ram.next_free = (r.ram.next_free + PAGE - 1) // PAGE * PAGE + 8 * PAGE
    data = r.ram.alloc(PAGE, PAGE)
    r.ram.write(data, b"\x66" * PAGE)
    hdr = r.ram.alloc(16)
    r.ram.write(hdr, struct.pack("<IIQ", T_OUT, 0, 8))
    status = r.ram.alloc(1)
    r.ring.add_chain([(hdr, 16, False), (data, PAGE, False), (status, 1, True)])
    os.eventfd_write(r.kick, 1)
    r.wait_used()
    dirty = set(r.log.dirty_pages()) - before
    assert data // PAGE not in dirty and status // PAGE in dirty | before


def test_logging_off_again_stops_marking(rig, tmp_path):
    r = rig
    set_log(r, r.log)
    set_log(r, None)
    assert not r.queue.logging
    before = r.queue.log_marks
    page_aligned_read(r)
    assert r.queue.log_marks == before


def test_a_log_larger_than_its_fd_is_refused(tmp_path):
    fd = os.memfd_create("short-log")
    os.ftruncate(fd, 100)
    with pytest.raises(ValueError):
        dp.DirtyLog(fd, 4096, 0)
    with pytest.raises(ValueError):
        dp.DirtyLog(fd, 0, 0)
    os.close(fd)
