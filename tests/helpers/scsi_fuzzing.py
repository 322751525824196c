"""Random SCSI commands for the fuzzers (in-process over a ScsiRig, and through a live daemon's
socket): CDB bytes and the checks every virtio-scsi command response must pass."""

from __future__ import annotations

import random
import struct

# virtio-scsi command response: sense_len, resid, status_qualifier, status, response, sense[96].
RESP = struct.Struct("<IIHBB96s")
# The opcodes the emulation implements: most random CDBs start with one so they reach its decoders.
KNOWN_OPCODES = [0x00, 0x03, 0x08, 0x0A, 0x12, 0x15, 0x1A, 0x1B, 0x25, 0x28, 0x2A, 0x2F, 0x35, 0x41,
                 0x42, 0x55, 0x5A, 0x5E, 0x88, 0x8A, 0x8F, 0x91, 0x93, 0x9E, 0xA0, 0xA8, 0xAA]
# Command responses the device may give: OK, BAD_TARGET, FAILURE.
COMMAND_RESPONSES = (0, 3, 9)


def random_cdb(rng: random.Random) -> bytes:
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


def check_command_response(raw: bytes, used_len: int, data_out_len: int, data_in_len: int,
                           what: object) -> None:
    """The response of a command with a whole response buffer and data_in_len device-writable
    bytes after it: a virtio-scsi response code, a SCSI status with fixed sense of 18 bytes or
    none, a residual within the buffers and a used length that counts what was written."""
    sense_len, resid, _, status, response, sense = RESP.unpack(raw[:RESP.size])
    assert response in COMMAND_RESPONSES, (what, response)
    if response != 0:
        return
    assert not (data_in_len and data_out_len), what           # bidirectional: FAILURE
    assert status in (0, 2) and resid <= max(data_in_len, data_out_len), (what, status, resid)
    assert (sense_len, sense[0] if sense_len else 0x70) in ((0, 0x70), (18, 0x70)), (what, sense_len)
    assert used_len == RESP.size + ((data_in_len - resid) if data_in_len else 0), (what, used_len, resid)
