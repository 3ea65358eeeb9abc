"""A kill -9 between a data-file change and its journal record loses nothing and is noticed.

Each test makes the daemon die (test-only crash point, gateway/crashpoint.py) right after the data
file changed, restarts it, and checks that the file reads as either its old or its new content and
that the bucket ends up with exactly what the file reads (never a short file, zeros, or an old
object the gateway believes current).
"""

from __future__ import annotations

import os
import random

import pytest

MiB = 1024 * 1024


def crash_env(point: str) -> dict:
    return {**os.environ, "CKPTFS_TEST_CRASH_AT": point}


def write_file(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def bucket_bytes(mount, rel: str) -> bytes:
    client = mount.s3.boto3_client()
    return client.get_object(Bucket=mount.bucket, Key=f"{mount.prefix}/{rel}")["Body"].read()


def restart_crashing_at(mount, point: str) -> None:
    mount.unmount()
    mount.start(env=crash_env(point))


def recover(mount) -> None:
    """The daemon died at its crash point: clear the mount, start it again, let it drain."""
    mount.died()
    mount.start()
    mount.wait(timeout=60)


def assert_consistent(mount, rel: str, *allowed: bytes) -> None:
    local = (mount.path / rel).read_bytes()
    assert any(local == a for a in allowed), (
        f"{rel} reads {len(local)} bytes after the crash, neither its old nor its new content")
    assert bucket_bytes(mount, rel) == local, f"the bucket's {rel} differs from the file and nothing will fix it"


def test_crash_after_truncate_before_journal(make_mount):
    m = make_mount()
    data = random.randbytes(256 * 1024)
    write_file(m.path / "f", data)
    m.wait()
    restart_crashing_at(m, "truncate")
    with pytest.raises(OSError):
        os.truncate(m.path / "f", 1000)
    recover(m)
    assert_consistent(m, "f", data, data[:1000])


def test_crash_after_open_truncate_of_uncached_file(make_mount):
    m = make_mount(start=False)
    data = random.randbytes(300 * 1024)
    m.s3.boto3_client().put_object(Bucket=m.bucket, Key=f"{m.prefix}/r", Body=data)
    m.start(env=crash_env("open-trunc"))  # a fresh cache: `r` is known only from the bucket
    with pytest.raises(OSError):
        os.close(os.open(m.path / "r", os.O_WRONLY | os.O_TRUNC))
    recover(m)
    assert_consistent(m, "r", data, b"")


def test_crash_after_write_before_journal(make_mount):
    m = make_mount()
    data = random.randbytes(256 * 1024)
    write_file(m.path / "f", data)
    m.wait()
    restart_crashing_at(m, "write")
    patch = b"X" * 4096
    with pytest.raises(OSError):
        with open(m.path / "f", "r+b") as f:
            f.write(patch)
            f.flush()
            os.fsync(f.fileno())
    recover(m)
    assert_consistent(m, "f", data, patch + data[len(patch):])


def test_crash_during_eviction(make_mount):
    m = make_mount(options=("--drain-delay", "0.1", "--cache-size", "4MiB"))
    old = random.randbytes(3 * MiB)
    write_file(m.path / "old", old)
    m.wait()
    restart_crashing_at(m, "evict")
    with pytest.raises(OSError):
        write_file(m.path / "new", random.randbytes(2 * MiB))  # needs room: evicts `old`
    recover(m)
    assert (m.path / "old").read_bytes() == old, "an evicted file reads differently from its object"
    assert bucket_bytes(m, "old") == old
