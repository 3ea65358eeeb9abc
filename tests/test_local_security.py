"""Local security: the cache dir is 0700, its journal (with WAL) and log 0600; a cache dir other
users can write is refused; only the mounting user can ask the mount for its status."""

from __future__ import annotations

import os
import stat
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import Mount, ckptfs_cli

NOBODY = 65534


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def write_file(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())


def test_cache_dir_journal_and_log_are_private(make_mount):
    m = make_mount()
    write_file(m.path / "f", b"x" * 5000)
    m.wait()
    assert mode_of(m.cache_dir) == 0o700
    assert mode_of(m.cache_dir / "data") == 0o700
    for name in ("journal.db", "journal.db-wal", "ckptfs.log", "lock"):
        assert mode_of(m.cache_dir / name) == 0o600, name
    assert not (m.cache_dir / "journal.db-shm").exists(), "the journal is locked exclusively: no shared memory"
    assert mode_of(m.cache_dir / "data" / "spare") == 0o700
    data_files = [os.path.join(d, f) for d, _, fs in os.walk(m.cache_dir / "data") for f in fs]
    assert data_files and all(mode_of(p) == 0o600 for p in data_files)


def test_cache_dir_readable_by_others_is_tightened_with_a_warning(make_mount):
    m = make_mount(start=False)
    m.cache_dir.mkdir(mode=0o755)
    os.chmod(m.cache_dir, 0o755)
    (m.cache_dir / "ckptfs.log").write_text("from an older version\n")
    os.chmod(m.cache_dir / "ckptfs.log", 0o644)
    result = ckptfs_cli("mount", m.url, str(m.path), "--cache-dir", str(m.cache_dir),
                       "--endpoint-url", m.endpoint_url)
    m.pid = m.status()["pid"]
    assert "warning: cache dir" in result.stderr and "tightened to 0700" in result.stderr
    assert mode_of(m.cache_dir) == 0o700 and mode_of(m.cache_dir / "ckptfs.log") == 0o600


@pytest.mark.parametrize("unsafe_mode", [0o777, 0o770, 0o702])
def test_cache_dir_writable_by_others_is_refused(make_mount, unsafe_mode):
    m = make_mount(start=False)
    m.cache_dir.mkdir()
    os.chmod(m.cache_dir, unsafe_mode)
    result = ckptfs_cli("mount", m.url, str(m.path), "--cache-dir", str(m.cache_dir),
                        "--endpoint-url", m.endpoint_url, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "writable by other users" in result.stderr
    assert not os.path.ismount(m.path)
    assert mode_of(m.cache_dir) == unsafe_mode, "a refused cache dir is left as it was"


def test_status_through_the_mount_is_for_the_mounting_user_only(s3_server, bucket, tmp_path):
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if os.geteuid() != 0 or system_python is None:
        pytest.skip("needs root and a system python3 to run a command as another user")
    where = Path(tempfile.mkdtemp(prefix="ckptfs-perm-", dir="/tmp"))  # tmp_path is 0700: others cannot reach it
    os.chmod(where, 0o755)
    m = Mount(s3_server, bucket, "run", where / "m", tmp_path / "cache")
    try:
        m.start()
        probe = ("import os, sys\n"
                 "os.stat(os.path.dirname(sys.argv[1]))  # the way to the mount is open to this user\n"
                 "try:\n    os.getxattr(sys.argv[1], 'user.ckptfs.status')\nexcept OSError as e:\n"
                 "    print(e.errno)\nelse:\n    print('readable')\n")
        mine = subprocess.run([system_python, "-c", probe, str(m.path)], capture_output=True, text=True)
        assert mine.stdout.strip() == "readable", mine.stderr
        other = subprocess.run([system_python, "-c", probe, str(m.path)], capture_output=True, text=True,
                               user=NOBODY, group=NOBODY, cwd="/")
        assert other.stdout.strip() == "13", f"another user read the status: {other.stdout}{other.stderr}"
    finally:
        m.cleanup()
        shutil.rmtree(where, ignore_errors=True)
