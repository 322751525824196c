"""Random CDBs against the SCSI emulation: every opcode with random fields, random buffer sizes and
directions.  Each command must complete with a well-formed response (virtio-scsi response code,
SCSI status, fixed sense of 18 bytes or none, used length within the writable buffers), and
nothing next to the guest's buffers may change.  VHOSTD_FUZZ_SOAK=1 runs many more."""

import os
import random
import struct

from tests.helpers.ringdriver import make_disk
from tests.unit.test_scsi_cdb import RESP, ScsiRig
from vhostd import _dataplane as dp

ITERATIONS = 200_000 if os.environ.get("VHOSTD_FUZZ_SOAK") else 3000
GUARD = 64
CANARY = b"\xc5" * GUARD
KNOWN_OPCODES = [0x00, 0x03, 0x08, 0x0A, 0x12, 0x15, 0x1A, 0x1B, 0x25, 0x28, 0x2A, 0x2F, 0x35, 0x41,
                 0x42, 0x55, 0x5A, 0x5E, 0x88, 0x8A, 0x8F, 0x91, 0x93, 0x9E, 0xA0, 0xA8, 0xAA]


def guarded(r, length, content=None):
    """A buffer with canaries on both sides: (gpa of the buffer, gpa of the first canary)."""
    base = r.ram.alloc(length + 2 * GUARD, 64)
    r.ram.write(base, CANARY + (content if content is not None else b"\xee" * length) + CANARY)
    return base + GUARD, base


def random_cdb(rng):
    opcode = rng.choice(KNOWN_OPCODES) if rng.random() < 0.85 else rng.randrange(256)
    cdb = bytearray(rng.randbytes(16))
    cdb[0] = opcode
    if rng.random() < 0.7:
        # Keep lengths and LBAs mostly small so commands reach their data paths.
        for i in range(2, 16):
            if rng.random() < 0.7:
                cdb[i] = 0
        cdb[rng.choice([4, 8, 9, 13])] = rng.randrange(1, 16)
    return bytes(cdb)


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
            sense_len, resid, _, status, response, sense = RESP.unpack(r.ram.read(resp, RESP.size))
            assert response in (0, 3, 9), (i, cdb.hex(), response)
            data_in = writable - RESP.size              # device-writable bytes after the response
            if response == 0:
                assert not (data_in and out_len)           # bidirectional: FAILURE
                assert status in (0, 2) and resid <= max(data_in, out_len)
                assert (sense_len, sense[0] if sense_len else 0x70) in ((0, 0x70), (18, 0x70)), (i, cdb.hex())
                assert used_len == RESP.size + ((data_in - resid) if data_in else 0), (i, cdb.hex(), used_len, resid)
        # Still serving after all that.
        res = r.command(bytes([0x88, 0]) + struct.pack(">QI", 0, 1) + b"\0\0", data_in_len=512)
        assert res.status == 0 and res.response == 0
    finally:
        r.close()
