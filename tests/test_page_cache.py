"""A checkpoint is cached once while it drains and not at all once it is uploaded (gateway/page_cache.py).

The unit tier reads plain files the way the drain does; the mount tier writes through a real mount
and asks mincore(2) what the kernel kept of the FUSE file and of its data file in the cache dir.
"""

from __future__ import annotations

import mmap
import os
import shutil
import time

import pytest

from gateway import digest
from gateway.page_cache import KEEP_CACHED_BELOW
from tests.support.pagecache import resident_bytes

MiB = 1 << 20
FUSE = pytest.mark.skipif(not (os.path.exists("/dev/fuse") and shutil.which("fusermount3")),
                          reason="FUSE is not available")


def written(path, size: int) -> bytes:
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data


def test_a_range_read_to_upload_leaves_the_page_cache_unless_the_file_is_small(tmp_path):
    big, small = tmp_path / "big", tmp_path / "small"
    big_data, small_data = written(big, 4 * MiB), written(small, 64 * 1024)
    assert resident_bytes(big) == 4 * MiB and resident_bytes(small) == 64 * 1024

    assert digest.read_range(str(big), 0, 4 * MiB) == big_data
    assert resident_bytes(big) == 0
    assert digest.read_range(str(small), 0, 64 * 1024) == small_data
    assert resident_bytes(small) == 64 * 1024  # under KEEP_CACHED_BELOW: kept

    open(big, "rb").read()  # cached again; a multipart upload reads it part by part
    part = memoryview(bytearray(3 * MiB))
    digest.read_into(str(big), 0, part)
    assert bytes(part) == big_data[:3 * MiB] and resident_bytes(big) == 1 * MiB
    last = memoryview(bytearray(1 * MiB))  # the last part may be small: it goes too
    digest.read_into(str(big), 3 * MiB, last)
    assert bytes(last) == big_data[3 * MiB:] and resident_bytes(big) == 0


def eventually(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@FUSE
@pytest.mark.timeout(120)
def test_a_large_file_is_cached_once_after_close_and_not_at_all_once_uploaded(ckptfs_mount):
    mount = ckptfs_mount
    big, small, mapped = mount.path / "big.bin", mount.path / "small.bin", mount.path / "mapped.bin"
    big_data = os.urandom(4 * MiB)
    big.write_bytes(big_data)
    small_data = os.urandom(KEEP_CACHED_BELOW // 16)
    small.write_bytes(small_data)
    mapped_data = os.urandom(4 * MiB)
    fd = os.open(mapped, os.O_RDWR | os.O_CREAT, 0o644)  # written through a shared mapping, left dirty
    os.ftruncate(fd, len(mapped_data))
    with mmap.mmap(fd, len(mapped_data)) as m:
        os.close(fd)
        m[:] = mapped_data

    # the kernel's copy of a large file goes when its last writer is released; the small file keeps its pages
    assert eventually(lambda: resident_bytes(big) == 0 and resident_bytes(mapped) == 0), \
        (resident_bytes(big), resident_bytes(mapped))
    assert resident_bytes(small) == len(small_data)

    mount.wait("big.bin", "small.bin", "mapped.bin")
    assert resident_bytes(mount.data_file("big.bin")) == 0  # uploaded: read from disk
    assert resident_bytes(mount.data_file("mapped.bin")) == 0
    assert resident_bytes(mount.data_file("small.bin")) == len(small_data)
    assert big.read_bytes() == big_data and mapped.read_bytes() == mapped_data and small.read_bytes() == small_data
    keys = mount.keys()
    assert keys["big.bin"] == len(big_data) and keys["mapped.bin"] == len(mapped_data)
