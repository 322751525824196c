"""The bdev C path (bdev_submit → completion) against every kind, through IoContext."""

import errno
import os

import pytest

from vhostd import _dataplane as dp


@pytest.fixture
def ctx():
    context = dp.IoContext()
    yield context
    context.close()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    return path


def make_disk(kind, image):
    if kind == "malloc":
        return dp.Disk.malloc(512, 8192)
    if kind == "null":
        return dp.Disk.null(512, 8192)
    return dp.Disk.file(image)


@pytest.mark.parametrize("kind", ["malloc", "file"])
def test_written_data_reads_back(ctx, image, kind):
    disk = make_disk(kind, image)
    pattern = bytes(range(256)) * 32
    ctx.write(disk, 8192, pattern)
    assert ctx.read(disk, 8192, len(pattern)) == pattern
    assert ctx.read(disk, 0, 512) == bytes(512)


def test_null_disk_discards_writes_and_its_reads_leave_the_buffer_unchanged(ctx, image):
    disk = make_disk("null", image)
    ctx.write(disk, 0, b"\xff" * 4096)
    assert ctx.read(disk, 0, 4096) == bytes(4096)        # read's fresh buffer is zeros; untouched


def test_file_disk_data_is_in_the_file_after_flush(ctx, image):
    disk = dp.Disk.file(image)
    ctx.write(disk, 512 * 3, b"\xab" * 1024)
    ctx.flush(disk)
    with open(image, "rb") as f:
        f.seek(512 * 3)
        assert f.read(1024) == b"\xab" * 1024


@pytest.mark.parametrize("kind", ["malloc", "file"])
@pytest.mark.parametrize("op", ["unmap", "write_zeroes"])
def test_deallocated_ranges_read_back_as_zeros(ctx, image, kind, op):
    disk = make_disk(kind, image)
    ctx.write(disk, 0, b"\x11" * 16384)
    getattr(ctx, op)(disk, 4096, 8192)
    data = ctx.read(disk, 0, 16384)
    assert data[:4096] == b"\x11" * 4096
    assert data[4096:12288] == bytes(8192)
    assert data[12288:] == b"\x11" * 4096


@pytest.mark.parametrize("kind", ["malloc", "null", "file"])
def test_io_past_the_end_fails_with_erange(ctx, image, kind):
    disk = make_disk(kind, image)
    size = disk.num_blocks * disk.block_size
    with pytest.raises(OSError) as exc:
        ctx.read(disk, size, 512)
    assert exc.value.errno == errno.ERANGE
    with pytest.raises(OSError):
        ctx.write(disk, size - 512, b"\0" * 1024)


def test_unaligned_io_fails_with_einval(ctx, image):
    disk = make_disk("malloc", image)
    with pytest.raises(OSError) as exc:
        ctx.read(disk, 100, 512)
    assert exc.value.errno == errno.EINVAL


def test_readonly_file_disk_refuses_writes(ctx, image):
    disk = dp.Disk.file(image, readonly=True)
    with pytest.raises(OSError) as exc:
        ctx.write(disk, 0, b"\0" * 512)
    assert exc.value.errno == errno.EROFS
    assert ctx.read(disk, 0, 512) == bytes(512)


def test_removed_disk_fails_io_with_enodev(ctx, image):
    disk = make_disk("malloc", image)
    disk.remove()
    with pytest.raises(OSError) as exc:
        ctx.read(disk, 0, 512)
    assert exc.value.errno == errno.ENODEV


def test_file_disk_geometry(tmp_path):
    path = tmp_path / "small.img"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="smaller than one block"):
        dp.Disk.file(path)
    with pytest.raises(FileNotFoundError):
        dp.Disk.file(tmp_path / "missing.img")
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(1 << 20)
    disk = dp.Disk.file(big, block_size=4096)
    assert (disk.block_size, disk.num_blocks) == (4096, 256)
    with open(big, "ab") as f:
        f.truncate(2 << 20)
    assert disk.rescan() == 512


@pytest.mark.parametrize("block_size", [0, 100, 513, 131072])
def test_bad_block_sizes_are_refused(block_size):
    with pytest.raises(ValueError):
        dp.Disk.malloc(block_size, 16)


def test_unaligned_buffers_on_a_direct_disk_use_the_buffered_path(ctx, image):
    disk = dp.Disk.file(image)
    # bytes objects are not 4096-aligned: these go through the buffered descriptor.
    ctx.write(disk, 512, b"\x5a" * 512)
    assert ctx.read(disk, 512, 512) == b"\x5a" * 512


def test_iostat_counts_ops_bytes_and_errors(ctx, image):
    disk = make_disk("malloc", image)
    ctx.write(disk, 0, b"\0" * 4096)
    ctx.read(disk, 0, 1024)
    ctx.read(disk, 0, 1024)
    ctx.unmap(disk, 0, 512)
    with pytest.raises(OSError):
        ctx.read(disk, disk.num_blocks * 512, 512)
    stat = disk.iostat()
    assert stat["num_read_ops"] == 2 and stat["bytes_read"] == 2048
    assert stat["num_write_ops"] == 1 and stat["bytes_written"] == 4096
    assert stat["num_unmap_ops"] == 1 and stat["bytes_unmapped"] == 512
    assert stat["io_error"] == {"failed": 1}
    assert stat["max_read_latency_ticks"] >= stat["min_read_latency_ticks"] > 0
    disk.reset_iostat("all")
    assert disk.iostat()["num_read_ops"] == 0


def test_qos_limited_disk_still_completes_io(ctx, image):
    disk = make_disk("malloc", image)
    disk.set_qos(rw_ios_per_sec=1000)
    for _ in range(5):
        ctx.read(disk, 0, 512)
    assert disk.iostat()["num_read_ops"] == 5
