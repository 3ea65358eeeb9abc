"""The floor of the FUSE stack: a pyfuse3 + trio passthrough filesystem that does no more than the
kernel asks for, with ckptfs's mount options and kernel caching, and no journal, no drain, no digest.

    .venv/bin/python -m benchmarks.floor_fs BACKING_DIR MOUNTPOINT

`bench_metadata --variants floor` times it beside ckptfs and a plain directory: what any
filesystem on pyfuse3 + trio can reach on this machine for the same requests (lookup, create,
getxattr, write, getattr, flush, setattr, release per small file). It serves one flat directory of
regular files, which is all the benchmark needs, and runs until unmounted (`fusermount3 -u`).
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

from gateway.fs import ATTR_TIMEOUT_S


class FloorOperations(pyfuse3.Operations):
    """Inodes are the backing files' inode numbers; the root is the backing directory."""

    enable_writeback_cache = True  # as ckptfs (gateway/fs.py)

    def __init__(self, backing: str):
        super().__init__()
        self.names: dict[int, str] = {pyfuse3.ROOT_INODE: backing}

    def _path(self, inode: int) -> str:
        return self.names[inode]

    def _entry(self, path: str, inode: int) -> pyfuse3.EntryAttributes:
        st = os.lstat(path)
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        e.entry_timeout = e.attr_timeout = ATTR_TIMEOUT_S
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns", "st_mtime_ns",
                     "st_ctime_ns"):
            setattr(e, name, getattr(st, name))
        e.st_blksize, e.st_blocks = 128 * 1024, st.st_blocks
        return e

    async def lookup(self, parent_inode, name, ctx=None):
        path = os.path.join(self._path(parent_inode), os.fsdecode(name))
        try:
            inode = os.lstat(path).st_ino
        except FileNotFoundError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        self.names[inode] = path
        return self._entry(path, inode)

    async def getattr(self, inode, ctx=None):
        return self._entry(self._path(inode), inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._path(inode)
        if fields.update_size:
            os.truncate(path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_mtime or fields.update_atime:
            st = os.lstat(path)
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        return self._entry(path, inode)

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = os.path.join(self._path(parent_inode), os.fsdecode(name))
        os.mkdir(path, mode)
        inode = os.lstat(path).st_ino
        self.names[inode] = path
        return self._entry(path, inode)

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = os.path.join(self._path(parent_inode), os.fsdecode(name))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, stat.S_IMODE(mode))
        except FileExistsError:
            raise pyfuse3.FUSEError(errno.EEXIST) from None
        inode = os.fstat(fd).st_ino
        self.names[inode] = path
        return pyfuse3.FileInfo(fh=fd), self._entry(path, inode)  # the handle is the backing fd

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=os.open(self._path(inode), os.O_RDWR))

    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        os.close(fh)

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def forget(self, inode_list):
        pass


def main(argv: list[str]) -> None:
    backing, mountpoint = argv
    options = set(pyfuse3.default_options)  # default_permissions, as ckptfs (gateway/daemon.py)
    options.add("fsname=ckptfs-floor")
    pyfuse3.init(FloorOperations(os.path.abspath(backing)), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main(sys.argv[1:])
