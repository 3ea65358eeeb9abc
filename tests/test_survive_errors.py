"""A mount survives its own errors: a full cache disk during a fetch, a journal that cannot be
written (failsafe: read-only, reads go on, status and log say so), a service that raises.

The cache dir is on a real 16 MiB tmpfs, filled for real (needs root, as `make test` runs).
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import time

import pytest
import trio

from gateway.daemon import BackgroundErrors, supervised
from tests.conftest import ckptfs_cli

MiB = 1024 * 1024


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB tmpfs (requested before make_mount, so it is unmounted after the ckptfs mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "smallfs"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def fill(fs) -> None:
    """Write zeros until the filesystem is full (tmpfs allocates every page written)."""
    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (b"\0" * MiB, b"\0" * 4096, b"\0"):
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def write_file(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_disk_full_during_fetch_is_eio_and_the_mount_stays(small_fs, make_mount):
    m = make_mount(cache_dir=small_fs / "cache", start=False)
    big = random.randbytes(24 * MiB)  # larger than the whole cache disk
    m.s3.boto3_client().put_object(Bucket=m.bucket, Key=f"{m.prefix}/big.bin", Body=big)
    m.start()
    with pytest.raises(OSError) as caught:
        (m.path / "big.bin").read_bytes()
    assert caught.value.errno == errno.EIO
    status = m.status()
    assert status["fetch_errors_total"] >= 1 and status["failsafe"] is None  # each read may start one
    small = random.randbytes(64 * 1024)  # the partial bytes were dropped: the disk has room again
    write_file(m.path / "small.bin", small)
    assert (m.path / "small.bin").read_bytes() == small
    m.wait("small.bin", timeout=60)
    assert "read of big.bin failed" in (m.cache_dir / "ckptfs.log").read_text()


def test_journal_that_cannot_be_written_makes_the_mount_read_only(small_fs, make_mount):
    m = make_mount(cache_dir=small_fs / "cache", options=("--drain-delay", "0", "--metadata-ttl", "0.3"))
    keep = random.randbytes(256 * 1024)
    write_file(m.path / "keep.bin", keep)
    m.wait("keep.bin", timeout=60)
    fill(small_fs)
    # another node's file: the next listing must add it to the journal, which the full disk refuses
    m.s3.boto3_client().put_object(Bucket=m.bucket, Key=f"{m.prefix}/other.bin", Body=b"x" * 100)
    wait_until(lambda: m.status()["failsafe"], 30, "the listing's journal write to fail")
    status = m.status()
    assert "full" in status["failsafe"]
    assert status["background_errors_total"] >= 1 and "bucket listing" in status["last_background_error"]
    assert (m.path / "keep.bin").read_bytes() == keep, "reads must go on in failsafe"
    assert sorted(os.listdir(m.path)) == ["keep.bin"]
    for mutate in (lambda: os.mkdir(m.path / "d"), lambda: open(m.path / "keep.bin", "ab").close(),
                   lambda: os.rename(m.path / "keep.bin", m.path / "k2"), lambda: os.unlink(m.path / "keep.bin")):
        with pytest.raises(OSError) as caught:
            mutate()
        assert caught.value.errno == errno.EROFS
    human = ckptfs_cli("status", str(m.path)).stdout
    assert "FAILSAFE" in human and "read-only" in human
    assert "read-only (failsafe)" in (m.cache_dir / "ckptfs.log").read_text()
    os.unlink(small_fs / "filler")
    m.unmount()
    m.start()  # space freed and mounted again: writable, and the other node's file is listed
    assert m.status()["failsafe"] is None
    write_file(m.path / "after.bin", b"ok")
    assert sorted(os.listdir(m.path)) == ["after.bin", "keep.bin", "other.bin"]


def test_an_open_whose_truncation_fails_leaves_no_writer_behind(make_mount):
    """open(O_TRUNC) that fails after its handle was made (here the data file refuses the
    truncation: append-only) must not count a writer that no release will ever end, or the file's
    next close would not queue it and it would never drain."""
    m = make_mount(options=("--drain-delay", "0"))
    f = m.path / "f"
    write_file(f, b"old content")
    m.wait("f", timeout=30)
    data = m.data_file("f")
    reader = os.open(f, os.O_RDONLY)  # keeps the daemon's descriptor of the data file open
    subprocess.run(["chattr", "+a", str(data)], check=True)
    try:
        with pytest.raises(OSError) as caught:
            os.open(f, os.O_WRONLY | os.O_TRUNC)
        assert caught.value.errno == errno.EPERM
    finally:
        subprocess.run(["chattr", "-a", str(data)], check=True)
        os.close(reader)
    assert f.read_bytes() == b"old content", "a failed open truncates nothing"
    write_file(f, b"new")
    m.wait("f", timeout=30)
    body = m.s3.boto3_client().get_object(Bucket=m.bucket, Key=f"{m.prefix}/f")["Body"].read()
    assert body == b"new"


@pytest.mark.trio
async def test_a_service_that_raises_is_restarted_not_fatal(autojump_clock):
    runs = []

    async def flaky_service(*, task_status=trio.TASK_STATUS_IGNORED):
        runs.append(trio.current_time())
        task_status.started()
        if len(runs) < 3:
            raise RuntimeError(f"bug in pass {len(runs)}")
        await trio.sleep_forever()

    errors = BackgroundErrors()
    async with trio.open_nursery() as nursery:
        await nursery.start(supervised, "drain", flaky_service, errors)
        await trio.sleep(10)
        assert len(runs) == 3 and errors.count == 2
        assert errors.last == "drain: RuntimeError('bug in pass 2')"
        nursery.cancel_scope.cancel()  # unmount: the supervisor ends with its service
