"""Local data files on the cache disk: one file per inode, with space accounting.

A data file is always exactly as long as the file it holds (truncate applies to it too), so after a
crash its size is the truth for files that were being written.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from pathlib import Path

import trio

from gateway.cache_dir import PRIVATE_DIR_MODE
from gateway.spare_files import SpareFiles

log = logging.getLogger(__name__)

DATA_DIR = "data"  # under the cache dir: one data file per inode, in 256 subdirectories
# Writes at least this large go to a worker thread; smaller ones cost less than the thread hop.
THREADED_WRITE_BYTES = 64 * 1024

@dataclasses.dataclass(frozen=True)
class CacheStatistics:
    used_bytes: int
    open_files: int


def data_file_path(cache_dir: str | Path, ino: int) -> Path:
    """Where the data file of inode `ino` lives under a cache dir."""
    return Path(cache_dir) / DATA_DIR / f"{ino % 256:02x}" / str(ino)


class CacheFiles:
    """Data files under `<cache_dir>/data/`. Descriptors are shared per inode and reference counted."""

    def __init__(self, cache_dir: Path):
        self.root = Path(cache_dir) / DATA_DIR
        self.root.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(self.root, PRIVATE_DIR_MODE)
        self._fds: dict[int, list[int]] = {}  # inode -> [fd, references]
        for sub in range(256):  # made once here, not checked on every open
            (self.root / f"{sub:02x}").mkdir(exist_ok=True)
        self.used_bytes = self._scan_used()
        self.spares = SpareFiles(self.root / "spare")  # filled by the daemon (`spares.run`)

    def path(self, ino: int) -> Path:
        return data_file_path(self.root.parent, ino)

    def _scan_used(self) -> int:
        total = 0
        for sub in self.root.iterdir():
            for entry in os.scandir(sub):
                total += entry.stat().st_blocks * 512
        return total

    def exists(self, ino: int) -> bool:
        return self.path(ino).exists()

    def acquire(self, ino: int) -> int:
        """An open descriptor for the inode's data file (created empty if missing)."""
        slot = self._fds.get(ino)
        if slot is None:
            slot = self._fds[ino] = [os.open(self.path(ino), os.O_RDWR | os.O_CREAT, 0o600), 0]
        slot[1] += 1
        return slot[0]

    def create_empty(self, ino: int) -> None:
        """The new inode's data file, empty: a spare file renamed into place (it replaces a stale
        one a crash left), or made here if the pool is dry."""
        spare = self.spares.take()
        if spare is not None:
            path = self.path(ino)
            try:
                self.used_bytes -= path.lstat().st_blocks * 512
            except FileNotFoundError:
                pass
            try:
                os.rename(spare, path)
                return
            except FileNotFoundError:
                pass  # removed by hand: make one below
        self.truncate(ino, 0)

    def release(self, ino: int) -> None:
        slot = self._fds[ino]
        slot[1] -= 1
        if slot[1] == 0:
            os.close(slot[0])
            del self._fds[ino]

    def is_open(self, ino: int) -> bool:
        return ino in self._fds

    def fd(self, ino: int) -> int:
        return self._fds[ino][0]

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        """pwrite to the data file. Large writes run in a worker thread, so the FUSE thread reads the
        next request meanwhile (the copy into the page cache is most of a write's cost)."""
        fd = self.fd(ino)
        if len(data) < THREADED_WRITE_BYTES:
            written, grown = _pwrite(fd, data, offset)
        else:
            written, grown = await trio.to_thread.run_sync(_pwrite, fd, data, offset)
        self.used_bytes += grown
        return written

    def read(self, ino: int, offset: int, size: int) -> bytes:
        return os.pread(self.fd(ino), size, offset)

    def truncate(self, ino: int, size: int) -> None:
        fd = self.acquire(ino)
        try:
            before = os.fstat(fd)
            if before.st_size != size:
                os.ftruncate(fd, size)
                self.used_bytes += (os.fstat(fd).st_blocks - before.st_blocks) * 512
        finally:
            self.release(ino)

    def size_of(self, ino: int) -> int | None:
        try:
            return self.path(ino).stat().st_size
        except FileNotFoundError:
            return None

    async def fsync(self, ino: int) -> None:
        """fsync the data file; runs in a thread so other requests go on meanwhile."""
        fd = self.acquire(ino)
        try:
            await trio.to_thread.run_sync(os.fsync, fd)
        finally:
            self.release(ino)

    def remove(self, ino: int) -> None:
        path = self.path(ino)
        try:
            self.used_bytes -= path.stat().st_blocks * 512
            path.unlink()
        except FileNotFoundError:
            pass

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(used_bytes=self.used_bytes, open_files=len(self._fds))


def _pwrite(fd: int, data: bytes, offset: int) -> tuple[int, int]:
    """(bytes written, bytes of disk the file grew by)."""
    before = os.fstat(fd).st_blocks
    written = os.pwrite(fd, data, offset)
    return written, (os.fstat(fd).st_blocks - before) * 512


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
