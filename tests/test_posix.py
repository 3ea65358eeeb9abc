"""POSIX semantics of a real ckptfs mount: one test per operation and errno (docs/SEMANTICS.md)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Mount, ckptfs_cli

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


@pytest.fixture(scope="module")
def mount(tmp_path_factory, s3_server):
    base = tmp_path_factory.mktemp("posix")
    bucket = s3_server.make_bucket(f"posix-{os.getpid()}")
    m = Mount(s3_server, bucket, "p", base / "mnt", base / "cache", options=("--drain-delay", "0.2"))
    m.start()
    yield m
    m.cleanup()


@pytest.fixture
def d(mount, request) -> Path:
    """A fresh directory in the shared mount for each test."""
    path = mount.path / request.node.name.replace("[", "_").replace("]", "")
    path.mkdir()
    return path


def expect_errno(code: int, fn, *args):
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value}"


def renameat2(old: Path, new: Path, flags: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD = -100
    if libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_create_write_read(d):
    p = d / "f"
    p.write_bytes(b"hello world")
    assert p.read_bytes() == b"hello world"
    st = p.stat()
    assert stat.S_ISREG(st.st_mode) and st.st_size == 11


def test_large_write_roundtrip(d):
    data = os.urandom(9 * 1024 * 1024 + 17)
    (d / "big").write_bytes(data)
    assert (d / "big").read_bytes() == data


def test_lookup_missing_is_enoent(d):
    expect_errno(errno.ENOENT, os.stat, d / "nope")
    expect_errno(errno.ENOENT, open, d / "nope")


def test_lookup_through_file_is_enotdir(d):
    (d / "f").write_bytes(b"x")
    expect_errno(errno.ENOTDIR, os.stat, d / "f" / "x")


def test_open_excl_existing_is_eexist(d):
    (d / "f").write_bytes(b"x")
    expect_errno(errno.EEXIST, os.open, d / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY)


def test_open_trunc(d):
    (d / "f").write_bytes(b"0123456789")
    fd = os.open(d / "f", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"ab")
    os.close(fd)
    assert (d / "f").read_bytes() == b"ab"


def test_open_append(d):
    (d / "f").write_bytes(b"abc")
    with open(d / "f", "ab") as f:
        f.write(b"def")
    assert (d / "f").read_bytes() == b"abcdef"


def test_open_directory_for_write_is_eisdir(d):
    expect_errno(errno.EISDIR, os.open, d, os.O_WRONLY)


def test_truncate_and_ftruncate(d):
    p = d / "f"
    p.write_bytes(b"0123456789")
    os.truncate(p, 4)
    assert p.read_bytes() == b"0123"
    with open(p, "r+b") as f:
        f.truncate(8)
    assert p.read_bytes() == b"0123\0\0\0\0"


def test_sparse_write(d):
    p = d / "f"
    with open(p, "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    data = p.read_bytes()
    assert len(data) == (1 << 20) + 3 and data[:10] == b"\0" * 10 and data[-3:] == b"end"


def test_chmod_and_utimens(d):
    p = d / "f"
    p.write_bytes(b"x")
    os.chmod(p, 0o600)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    os.utime(p, ns=(1_000_000_000, 2_000_000_000))
    assert p.stat().st_mtime_ns == 2_000_000_000


def test_mkdir_existing_is_eexist(d):
    (d / "sub").mkdir()
    expect_errno(errno.EEXIST, os.mkdir, d / "sub")


def test_rmdir_nonempty_is_enotempty(d):
    (d / "sub").mkdir()
    (d / "sub" / "f").write_bytes(b"x")
    expect_errno(errno.ENOTEMPTY, os.rmdir, d / "sub")
    os.unlink(d / "sub" / "f")
    os.rmdir(d / "sub")
    assert not (d / "sub").exists()


def test_rmdir_file_is_enotdir_and_unlink_dir_is_eisdir(d):
    (d / "f").write_bytes(b"x")
    (d / "sub").mkdir()
    expect_errno(errno.ENOTDIR, os.rmdir, d / "f")
    expect_errno(errno.EISDIR, os.unlink, d / "sub")


def test_unlink_open_file_stays_usable(d):
    p = d / "f"
    with open(p, "w+b") as f:
        f.write(b"before")
        f.flush()
        os.unlink(p)
        assert not p.exists()
        f.write(b"-after")
        f.flush()
        f.seek(0)
        assert f.read() == b"before-after"
    assert not p.exists()


def test_rename_file_replaces_target(d):
    (d / "a").write_bytes(b"new")
    (d / "b").write_bytes(b"old")
    os.rename(d / "a", d / "b")
    assert (d / "b").read_bytes() == b"new" and not (d / "a").exists()


def test_rename_directory_with_contents(d):
    (d / "x.orbax-checkpoint-tmp-1" / "state").mkdir(parents=True)
    (d / "x.orbax-checkpoint-tmp-1" / "state" / "w").write_bytes(b"weights")
    os.rename(d / "x.orbax-checkpoint-tmp-1", d / "x")
    assert (d / "x" / "state" / "w").read_bytes() == b"weights"
    assert sorted(os.listdir(d)) == ["x"]


def test_rename_dir_into_own_subtree_is_einval(d):
    (d / "a" / "b").mkdir(parents=True)
    expect_errno(errno.EINVAL, os.rename, d / "a", d / "a" / "b" / "c")


def test_rename_dir_over_nonempty_dir_is_enotempty(d):
    (d / "a").mkdir()
    (d / "b").mkdir()
    (d / "b" / "f").write_bytes(b"x")
    expect_errno(errno.ENOTEMPTY, os.rename, d / "a", d / "b")


def test_rename_dir_over_file_is_enotdir_and_back_eisdir(d):
    (d / "dir").mkdir()
    (d / "file").write_bytes(b"x")
    expect_errno(errno.ENOTDIR, os.rename, d / "dir", d / "file")
    expect_errno(errno.EISDIR, os.rename, d / "file", d / "dir")


def test_rename_noreplace(d):
    (d / "a").write_bytes(b"a")
    (d / "b").write_bytes(b"b")
    expect_errno(errno.EEXIST, renameat2, d / "a", d / "b", RENAME_NOREPLACE)
    renameat2(d / "a", d / "c", RENAME_NOREPLACE)
    assert (d / "c").read_bytes() == b"a"


def test_rename_exchange(d):
    (d / "a").write_bytes(b"A")
    (d / "sub").mkdir()
    (d / "sub" / "b").write_bytes(b"B")
    renameat2(d / "a", d / "sub" / "b", RENAME_EXCHANGE)
    assert (d / "a").read_bytes() == b"B" and (d / "sub" / "b").read_bytes() == b"A"


def test_rename_missing_source_is_enoent(d):
    expect_errno(errno.ENOENT, os.rename, d / "missing", d / "x")


def test_name_too_long(d):
    expect_errno(errno.ENAMETOOLONG, open, d / ("x" * 256), "wb")
    (d / ("y" * 255)).write_bytes(b"ok")
    assert (d / ("y" * 255)).read_bytes() == b"ok"


def test_readdir_lists_entries(d):
    names = {f"f{i:03d}" for i in range(700)}
    for n in names:
        (d / n).write_bytes(b"")
    assert set(os.listdir(d)) == names


def test_readdir_stable_while_entries_change(d):
    for i in range(300):
        (d / f"f{i:03d}").write_bytes(b"")
    seen = []
    with os.scandir(d) as it:
        for i, entry in enumerate(it):
            seen.append(entry.name)
            if i == 10:
                (d / "zz-new").write_bytes(b"")
                os.unlink(d / "f299")
    # every entry that existed throughout is listed exactly once
    stable = {f"f{i:03d}" for i in range(299)}
    assert stable <= set(seen) and len(seen) == len(set(seen))


def test_symlink_and_readlink(d):
    (d / "target").write_bytes(b"x")
    os.symlink("target", d / "link")
    assert os.readlink(d / "link") == "target"
    assert (d / "link").read_bytes() == b"x"
    assert stat.S_ISLNK(os.lstat(d / "link").st_mode)
    expect_errno(errno.EINVAL, os.readlink, d / "target")


def test_hard_links_share_one_inode(d):
    (d / "f").write_bytes(b"x")
    os.link(d / "f", d / "g")
    f, g = os.stat(d / "f"), os.stat(d / "g")
    assert f.st_ino == g.st_ino and f.st_nlink == g.st_nlink == 2
    with open(d / "g", "ab") as out:
        out.write(b"y")
    assert (d / "f").read_bytes() == b"xy"  # one content under both names
    expect_errno(errno.EEXIST, os.link, d / "f", d / "g")
    expect_errno(errno.EPERM, os.link, d, d / "dirlink")
    os.rename(d / "f", d / "g")  # onto a hard link of itself: nothing happens
    assert sorted(os.listdir(d)) == ["f", "g"]
    os.unlink(d / "f")
    assert os.stat(d / "g").st_nlink == 1 and (d / "g").read_bytes() == b"xy"


def bucket_keys_below(mount: Mount, d: Path, expected: set[str], timeout: float = 30) -> set[str]:
    """The keys under `d` once they equal `expected`, or when `timeout` runs out (stale deletes follow wait)."""
    rel = d.relative_to(mount.path).as_posix() + "/"
    deadline = time.monotonic() + timeout
    while True:
        listed = mount.keys()
        keys = {k[len(rel):] for k in listed if k.startswith(rel)}
        if keys == expected or time.monotonic() > deadline:
            return keys
        time.sleep(0.1)


def test_every_hard_link_is_an_object(mount, d):
    (d / "f").write_bytes(b"linked")
    os.link(d / "f", d / "g")
    mount.wait(timeout=60)
    assert bucket_keys_below(mount, d, {"f", "g"}) == {"f", "g"}
    assert object_bytes(mount, d / "g") == b"linked"
    (d / "g").write_bytes(b"rewritten through the second name")  # both names hold the new content
    mount.wait(timeout=60)
    assert object_bytes(mount, d / "f") == object_bytes(mount, d / "g") == b"rewritten through the second name"
    os.unlink(d / "f")
    mount.wait(timeout=60)
    assert bucket_keys_below(mount, d, {"g"}) == {"g"}


def test_a_hard_link_under_a_temporary_name_is_not_an_object(mount, d):
    (d / "f").write_bytes(b"x")
    os.link(d / "f", d / "f.tmp")
    mount.wait(timeout=60)
    assert bucket_keys_below(mount, d, {"f"}, timeout=5) == {"f"}


def test_a_final_hard_link_of_a_held_file_is_published(mount, d):
    (d / "f.tmp").write_bytes(b"x")
    os.link(d / "f.tmp", d / "f")
    mount.wait(timeout=20)
    assert bucket_keys_below(mount, d, {"f"}, timeout=5) == {"f"}


def object_bytes(mount: Mount, path: Path) -> bytes:
    key = f"{mount.prefix}/{path.relative_to(mount.path).as_posix()}"
    return mount.s3.boto3_client().get_object(Bucket=mount.bucket, Key=key)["Body"].read()


def test_unlinking_the_published_name_of_an_uncached_linked_file_keeps_its_content(make_mount, tmp_path):
    data = os.urandom(300_000)
    a = make_mount("a")
    (a.path / "f").write_bytes(data)
    a.wait(timeout=60)
    a.unmount()
    b = make_mount("b", cache_dir=tmp_path / "fresh-cache")  # f is known from the listing, not cached
    os.link(b.path / "f", b.path / "g")
    os.unlink(b.path / "f")  # the object f is the only copy: it is copied to g before it goes
    b.wait(timeout=60)
    deadline = time.monotonic() + 30
    while set(b.keys()) != {"g"} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(b.keys()) == {"g"}
    assert object_bytes(b, b.path / "g") == data and (b.path / "g").read_bytes() == data


def test_fifos_sockets_and_devices_are_never_uploaded(mount, d):
    (d / "f").write_bytes(b"x")
    os.mkfifo(d / "fifo")
    os.mknod(d / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mkdir(d / "only-fifo")
    os.mkfifo(d / "only-fifo" / "p")
    os.mkdir(d / "empty")
    mount.wait(timeout=60)
    # A directory holding only local nodes is not empty: no marker, so it is not in the bucket.
    assert bucket_keys_below(mount, d, {"f", "empty/"}) == {"f", "empty/"}
    assert mount.status()["pending_files"] == 0


def test_directory_link_count_counts_subdirectories(d):
    os.mkdir(d / "a")
    os.mkdir(d / "a" / "x")
    os.mkdir(d / "a" / "y")
    assert os.stat(d / "a").st_nlink == 4
    os.rename(d / "a" / "x", d / "x")
    assert os.stat(d / "a").st_nlink == 3 and os.stat(d).st_nlink == 4
    os.rmdir(d / "a" / "y")
    assert os.stat(d / "a").st_nlink == 2


def test_statfs_reports_cache_disk(mount):
    ours = os.statvfs(mount.path)
    disk = os.statvfs(mount.cache_dir)
    assert ours.f_namemax == 255
    assert ours.f_blocks * ours.f_frsize == disk.f_blocks * disk.f_frsize


def test_user_xattrs(d):
    p = d / "f"
    p.write_bytes(b"x")
    os.setxattr(p, "user.test", b"value")
    assert os.getxattr(p, "user.test") == b"value"
    assert "user.test" in os.listxattr(p)
    os.removexattr(p, "user.test")
    expect_errno(errno.ENODATA, os.getxattr, p, "user.test")
    expect_errno(errno.ENODATA, os.removexattr, p, "user.test")
    expect_errno(errno.EOPNOTSUPP, os.setxattr, p, "trusted.x", b"v")
    expect_errno(errno.EPERM, os.setxattr, p, "user.ckptfs.state", b"durable")


def test_fsync_and_fsyncdir(d):
    fd = os.open(d / "f", os.O_CREAT | os.O_WRONLY)
    os.write(fd, b"data")
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    dfd = os.open(d, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    assert (d / "f").read_bytes() == b"data"


def test_posix_byte_range_locks(d):
    """TensorStore's file driver takes fcntl locks; they must exclude another process on one node."""
    p = d / "lockfile"
    p.write_bytes(b"\0" * 100)
    fd = os.open(p, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
    code = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
            "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)\n    print('got')\n"
            "except OSError:\n    print('busy')\n")
    other = subprocess.run(["python3", "-c", code, str(p)], capture_output=True, text=True, timeout=30)
    assert other.stdout.strip() == "busy"
    fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
    other = subprocess.run(["python3", "-c", code, str(p)], capture_output=True, text=True, timeout=30)
    assert other.stdout.strip() == "got"
    os.close(fd)


def test_permissions_enforced_for_other_users(d):
    """default_permissions: the kernel checks the stored modes (EACCES for a non-owner)."""
    p = d / "private"
    p.write_bytes(b"secret")
    os.chmod(p, 0o600)
    os.chmod(d, 0o755)
    code = "import os, sys\nos.setuid(65534)\ntry:\n    open(sys.argv[1]).read()\n    print('read')\nexcept PermissionError:\n    print('EACCES')\n"
    # the mount is not allow_other: another user may not even enter it
    result = subprocess.run(["python3", "-c", code, str(p)], capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "EACCES"


def test_mknod_regular_file(d):
    os.mknod(d / "node", stat.S_IFREG | 0o644)
    assert (d / "node").stat().st_size == 0


def test_a_fifo_made_at_a_published_name_removes_its_object(mount, d):
    """A published file unlinked (or replaced by a rename, then unlinked) and a FIFO made at its
    name: the FIFO is never uploaded, so the file's object must go, not wait to be overwritten."""
    (d / "f").write_bytes(b"published")
    (d / "g").write_bytes(b"published too")
    mount.wait(timeout=60)
    assert bucket_keys_below(mount, d, {"f", "g"}) == {"f", "g"}
    os.unlink(d / "f")
    os.mkfifo(d / "f")
    (d / "g.tmp").write_bytes(b"new content")
    os.rename(d / "g.tmp", d / "g")
    os.unlink(d / "g")
    os.mkfifo(d / "g")
    mount.wait(timeout=60)
    assert bucket_keys_below(mount, d, set()) == set(), "the bucket still shows files the namespace replaced"
    assert stat.S_ISFIFO((d / "f").stat().st_mode) and stat.S_ISFIFO((d / "g").stat().st_mode)


def test_fifo_socket_and_device_nodes_work_locally(mount, d):
    os.mkfifo(d / "fifo", 0o600)
    assert stat.S_ISFIFO(os.lstat(d / "fifo").st_mode)
    rfd = os.open(d / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    wfd = os.open(d / "fifo", os.O_WRONLY)
    os.write(wfd, b"through the pipe")
    assert os.read(rfd, 100) == b"through the pipe"
    os.close(wfd)
    os.close(rfd)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server, contextlib.chdir(d):
        server.bind("sock")  # relative: a socket path is limited to 107 bytes
        server.listen(1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect("sock")
            conn, _ = server.accept()
            client.sendall(b"hi")
            assert conn.recv(2) == b"hi"
            conn.close()
    assert stat.S_ISSOCK(os.lstat(d / "sock").st_mode)
    os.mknod(d / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    st = os.lstat(d / "null")
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    for name in ("fifo", "sock", "null"):  # never uploaded: nothing to wait for
        ckptfs_cli("wait", str(mount.path), str(d / name), "--timeout", "10")


def test_concurrent_writers_distinct_files(d):
    def writer(i):
        (d / f"w{i}").write_bytes(bytes([i]) * 300_000)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert (d / f"w{i}").read_bytes() == bytes([i]) * 300_000


def test_mtime_advances_on_write(d):
    p = d / "f"
    p.write_bytes(b"a")
    before = p.stat().st_mtime_ns
    time.sleep(0.01)
    with open(p, "ab") as f:
        f.write(b"b")
    assert p.stat().st_mtime_ns > before
