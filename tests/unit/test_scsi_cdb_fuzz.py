"""Random CDBs against the SCSI emulation: every opcode with random fields, random buffer sizes and
directions.  Each command must complete with a well-formed response (virtio-scsi response code,
SCSI status, fixed sense of 18 bytes or none, used length within the writable buffers), and
nothing next to the guest's buffers may change.  VHOSTD_FUZZ_SOAK=1 runs many more."""

import os
import random
import struct

from tests.helpers.ringdriver import make_disk
from tests.helpers.scsi_fuzzing import RESP, check_command_response, random_cdb
from tests.unit.test_scsi_cdb import ScsiRig
from vhostd import _dataplane as dp

ITERATIONS = 200_000 if os.environ.get("VHOSTD_FUZZ_SOAK") else 3000
GUARD = 64
CANARY = b"\xc5" * GUARD


def guarded(r, length, content=None):
    """A buffer with canaries on both sides: (gpa of the buffer, gpa of the first canary)."""
    base = r.ram.alloc(length + 2 * GUARD, 64)
    r.ram.write(base, CANARY + (content if content is not None else b"\xee" * length) + CANARY)
    return base + GUARD, base


def test_random_cdbs_get_well_formed_responses_and_touch_only_their_buffers(tmp_path):
    rng = random.Random(1234)
    # Target 1 is a file: its commands complete later, from the io_uring ring.
    r = ScsiRig({0: dp.Disk.malloc(512, 4096), 1: make_disk("file", tmp_path, 512, 4096),
                 2: dp.Disk.null(4096, 1024)})
    try:
        for i in range(ITERATIONS):
            if r.ram.next_free > r.ram.size - (1 << 20):
                r.ram.next_free = 1 << 20          # reuse the buffer space (rings live below)
            target = rng.choice([0, 1, 2, 2, 0, 1, 5])
            cdb = random_cdb(rng)
            out_len = rng.choice([0, 0, 0, 8, 24, 512, 4096, rng.randrange(1, 9000)])
            in_len = 0 if out_len and rng.random() < 0.9 else rng.choice([0, 8, 36, 255, 512, 4096, 8192])
            resp_len = rng.choice([RESP.size] * 8 + [RESP.size + 7, 60])
            req, req_base = guarded(r, 51, bytes([1, target, 0x40, 0]) + bytes(4) + struct.pack("<QBBB", i, 0, 0, 0) + cdb.ljust(32, b"\0"))
            segments = [(req, 51, False)]
            if out_len:
                out, _ = guarded(r, out_len, rng.randbytes(out_len))
                segments.append((out, out_len, False))
            resp, resp_base = guarded(r, resp_len)
            segments.append((resp, resp_len, True))
            din = None
            if in_len:
                din, din_base = guarded(r, in_len)
                segments.append((din, in_len, True))
            r.rings[2].add_chain(segments)
            r.kick(2)
            (_, used_len), = r.wait_used(2)
            writable = resp_len + in_len
            assert used_len <= writable, (i, cdb.hex(), used_len)
            for base, length in ((resp_base, resp_len),) + (((din_base, in_len),) if din else ()):
                assert r.ram.read(base, GUARD) == CANARY and r.ram.read(base + GUARD + length, GUARD) == CANARY, \
                    (i, cdb.hex())
            if writable < RESP.size:
                assert used_len == 0                  # nowhere to put a response
                continue
            if resp_len < RESP.size:
                continue                              # the response spans into the next buffer
            # device-writable bytes after the response: data-in
            check_command_response(r.ram.read(resp, RESP.size), used_len, out_len, writable - RESP.size,
                                   (i, cdb.hex()))
        # Still serving after all that.
        res = r.command(bytes([0x88, 0]) + struct.pack(">QI", 0, 1) + b"\0\0", data_in_len=512)
        assert res.status == 0 and res.response == 0
    finally:
        r.close()
