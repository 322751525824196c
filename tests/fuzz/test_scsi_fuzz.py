"""Guest-side fuzzing of vhost-scsi through a live daemon: random CDBs, LUN fields, buffer sizes and
layouts (request headers cut short, buffers split into many descriptors, indirect tables), task
management and raw control requests, pushed by the project's front-end over the controller socket.

Oracles: every request completes with a virtio-scsi response that is well formed for the buffers
it had (tests.helpers.scsi_fuzzing); used.len never exceeds the writable bytes; the reactor keeps
serving a blk controller of the same daemon; the file target's blocks are intact where no command
could write; the daemon's fds and guest mappings return to their baseline afterwards.
VHOSTD_FUZZ_SOAK=1 runs many more."""

from __future__ import annotations

import collections
import os
import random
import shutil
import struct
import time

import pytest

from tests.fuzz.conftest import SOAK
from tests.fuzz.vhost_peer import resources, wait_back_to
from tests.helpers.asan import asan_runtime, build_asan_tree, run_under_asan
from tests.helpers.daemon import REPO_ROOT, Daemon
from tests.helpers.scsi_fuzzing import RESP, check_command_response, random_cdb
from vhostd.initiator import scsi as vs
from vhostd.initiator.blk import VirtioBlk
from vhostd.initiator.frontend import Writable

ITERATIONS = 500_000 if SOAK else 10_000
DEADLINE_S = 1800 if SOAK else 25
BLOCKS = 4096
# LBAs at and past this one are never written by the fuzzer (random CDBs are kept below it).
SENTINEL_LBA = 3072
SENTINEL = bytes(range(256)) * 2
TMF_RESPONSES = (vs.S_OK, vs.S_BAD_TARGET, vs.S_FAILURE, vs.S_FUNCTION_SUCCEEDED, vs.S_FUNCTION_REJECTED,
                 vs.S_INCORRECT_LUN)


@pytest.fixture
def scsi_daemon(tmp_path):
    image = tmp_path / "scsi-file.img"
    image.write_bytes(bytes(BLOCKS * 512))
    d = Daemon()
    d.start()
    try:
        d.rpc("bdev_malloc_create", name="Sm0", num_blocks=BLOCKS, block_size=512)
        d.rpc("bdev_aio_create", filename=str(image), name="Sf0", block_size=512)
        d.rpc("bdev_null_create", name="Sn0", num_blocks=1024, block_size=4096)
        d.rpc("bdev_malloc_create", name="Good0", num_blocks=2048, block_size=512)
        d.rpc("vhost_create_scsi_controller", ctrlr="fuzz.scsi")
        for num, bdev in enumerate(("Sm0", "Sf0", "Sn0")):
            d.rpc("vhost_scsi_controller_add_target", ctrlr="fuzz.scsi", scsi_target_num=num, bdev_name=bdev)
        d.rpc("vhost_create_blk_controller", ctrlr="good.0", dev_name="Good0")
        yield d, image
    finally:
        d.stop()
        d.cleanup()


def keep_below_sentinel(cdb: bytes) -> bytes:
    """Writes stay below SENTINEL_LBA: the LBAs of WRITE and WRITE SAME CDBs below 8 and WRITE
    SAME to at most 255 blocks (a WRITE moves no more blocks than its data-out of at most 9000
    bytes holds; UNMAP's ranges come from unmap_list)."""
    b = bytearray(cdb)
    if b[0] in (0x2A, 0x41, 0xAA):                  # WRITE(10), WRITE SAME(10), WRITE(12)
        b[2] = b[3] = b[4] = 0
        b[5] &= 0x07
        if b[0] == 0x41:
            b[7] = 0                                # at most 255 blocks of the same pattern
    elif b[0] in (0x8A, 0x93):                      # WRITE(16), WRITE SAME(16)
        b[2:9] = bytes(7)
        b[9] &= 0x07
        if b[0] == 0x93:
            b[10:13] = bytes(3)
    elif b[0] == 0x0A:                              # WRITE(6)
        b[1] = b[2] = 0
        b[3] &= 0x07
    return bytes(b)


class ScsiFuzzer:
    def __init__(self, dev: vs.VirtioScsi, rng: random.Random) -> None:
        self.dev = dev
        self.rng = rng
        self.outcomes: collections.Counter[str] = collections.Counter()

    def command(self, i: int) -> None:
        rng = self.rng
        target = rng.choice([0, 1, 2, 0, 1, 2, 5, 9])
        lun = vs.lun_bytes(target) if target < 8 else bytes([1, target, 0x40, 0]) + bytes(4)
        if rng.random() < 0.08:
            lun = rng.choice([rng.randbytes(8), bytes([1, target, 0x40, 1]) + bytes(4), bytes([2, target]) + bytes(6)])
        cdb = keep_below_sentinel(random_cdb(rng))
        out_len = rng.choice([0, 0, 0, 8, 24, 512, 4096, rng.randrange(1, 9000)])
        data_out = self.unmap_list(rng, out_len) if cdb[0] == 0x42 else rng.randbytes(out_len)
        in_len = 0 if out_len and rng.random() < 0.9 else rng.choice([0, 8, 36, 255, 512, 4096, 8192])
        resp_len = rng.choice([RESP.size] * 8 + [RESP.size + 7, 60, 0])
        req = vs.encode_command(lun, i & 0xFFFFFFFF, cdb, rng.choice([0, 0, 0, 1, 2, 3, 7]))
        short = rng.random() < 0.04 and not out_len      # else data-out continues the header
        if short:
            req = req[:rng.randrange(len(req))]
        segment_bytes = rng.choice([0, 0, 0, 100, 512])
        parts = (len(req), out_len, resp_len, in_len)
        if sum(-(-n // segment_bytes) if segment_bytes and n >= 512 else 1 for n in parts if n) > 128:
            segment_bytes = 512                         # the front-end's chains hold at most 130 buffers
        indirect = rng.choice([None, None, True, False])
        queue = rng.randrange(2)
        used_len, (resp, data_in) = self.dev.frontend.transact(
            vs.FIRST_REQUEST_QUEUE + queue, [req, data_out, Writable(resp_len, 0xEE), Writable(in_len, 0xEE)],
            segment_bytes=segment_bytes, indirect=indirect, timeout_s=10.0)
        writable = resp_len + in_len
        what = (i, cdb.hex(), lun.hex(), len(req), out_len, resp_len, in_len)
        assert used_len <= writable, what
        if writable < RESP.size:
            assert used_len == 0, what                  # nowhere to put a response
            self.outcomes["no room for a response"] += 1
            return
        raw = (resp + data_in)[:RESP.size]
        if short:
            assert raw[11] == vs.S_FAILURE and used_len == RESP.size, what
            self.outcomes["short header: FAILURE"] += 1
            return
        data_in_len = writable - RESP.size
        check_command_response(raw, used_len, out_len, data_in_len, what)
        self.outcomes["response %d status %d" % (raw[11], raw[10])] += 1

    @staticmethod
    def unmap_list(rng: random.Random, length: int) -> bytes:
        """An UNMAP parameter list of random block descriptors below SENTINEL_LBA."""
        descs = b"".join(struct.pack(">QI4x", rng.randrange(SENTINEL_LBA - 64), rng.randrange(1, 64))
                         for _ in range(max(0, (length - 8) // 16)))
        body = struct.pack(">HH4x", 6 + len(descs), len(descs)) + descs
        return (body + rng.randbytes(max(0, length - len(body))))[:length]

    def tmf(self) -> None:
        rng = self.rng
        subtype = rng.randrange(10)
        target = rng.choice([0, 1, 2, 5, 9])
        response = self.dev.tmf(subtype, target, lun=rng.choice([0, 0, 1]), tag=rng.randrange(1 << 64))
        assert response in TMF_RESPONSES, (subtype, target, response)
        self.outcomes["tmf response %d" % response] += 1

    def raw_control(self) -> None:
        """A control request of random type and size: answered within its writable buffer."""
        rng = self.rng
        body = struct.pack("<I", rng.choice([0, 1, 2, 3, 0xFFFFFFFF])) + rng.randbytes(rng.randrange(0, 60))
        writable = rng.choice([0, 1, 4, 16, 64])
        used_len, _ = self.dev.frontend.transact(vs.CONTROL_QUEUE, [body, Writable(writable, 0xEE)], timeout_s=10.0)
        assert used_len <= writable, (body.hex(), writable, used_len)
        self.outcomes["raw control"] += 1


def test_random_commands_through_the_daemon_get_well_formed_responses(scsi_daemon):
    d, image = scsi_daemon
    pid = d.proc.pid
    baseline = resources(pid)
    rng = random.Random(77)
    good = VirtioBlk(str(d.socket_dir / "good.0"), queue_size=64, memory_bytes=8 << 20).open()
    dev = vs.VirtioScsi(str(d.socket_dir / "fuzz.scsi"), num_queues=2, memory_bytes=64 << 20).open()
    fuzzer = ScsiFuzzer(dev, rng)
    try:
        dev.write(1, SENTINEL_LBA, SENTINEL * 8, 512)
        dev.synchronize_cache(1)
        start, done = time.monotonic(), 0
        for i in range(ITERATIONS):
            if time.monotonic() - start > DEADLINE_S:
                break
            roll = rng.random()
            if roll < 0.03:
                fuzzer.tmf()
            elif roll < 0.05:
                fuzzer.raw_control()
            else:
                fuzzer.command(i)
            done += 1
            if i % 500 == 0:
                data = os.urandom(4096)
                good.write(8, data)
                assert good.read(8, 4096) == data         # the other controller keeps serving
        print("scsi fuzz: %d requests, outcomes %s" % (done, sorted(fuzzer.outcomes.items())))
        assert done >= 500
        assert fuzzer.outcomes.get("short header: FAILURE") and fuzzer.outcomes.get("response 0 status 2")
        assert fuzzer.outcomes.get("response 0 status 0") and fuzzer.outcomes.get("response 3 status 0")
        # Still serving, and what no command could write is intact on the file's disk and in the file.
        pattern = os.urandom(4096)
        dev.write(0, 16, pattern, 512)
        assert dev.read(0, 16, 8, 512) == pattern
        assert dev.read(1, SENTINEL_LBA, 8, 512) == SENTINEL * 8
    finally:
        dev.close()
        good.close()
    with open(image, "rb") as f:
        f.seek(SENTINEL_LBA * 512)
        assert f.read(4096) == SENTINEL * 8
    assert d.proc.poll() is None and "Traceback" not in d.log()
    wait_back_to(pid, baseline)


def test_scsi_emulation_tests_and_cdb_fuzzer_under_address_sanitizer():
    """The SCSI unit tests and the in-process random-CDB fuzzer (its canaries see writes next to
    buffers; ASAN sees any read or write outside the data plane's own memory) on the ASAN build."""
    libasan = asan_runtime()
    if libasan is None:
        pytest.skip("no libasan.so for the compiler that builds the extension")
    root = build_asan_tree()
    shutil.copytree(REPO_ROOT / "tests", root / "tests", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    result = run_under_asan(root, libasan, ["-m", "pytest", "-q", "-p", "no:cacheprovider",
                                            "tests/unit/test_scsi_cdb.py", "tests/unit/test_scsi_cdb_fuzz.py"],
                            timeout_s=1800)
    output = result.stdout + result.stderr
    print(output[-3000:])
    assert "AddressSanitizer" not in output, output[-8000:]
    assert result.returncode == 0, output[-5000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
