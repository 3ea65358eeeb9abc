"""FUSE operations: translate each request into namespace/cache calls and errors into errno.

No policy and no network here (DESIGN.md invariant 4). Every handler funnels its errors through
`fuse_errors`, the one place where domain errors become `FUSEError`; an unexpected exception is
logged with its traceback and answered EIO instead of ending the mount.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import stat
from collections.abc import Awaitable, Callable

import pyfuse3
import trio

from gateway import content
from gateway.cache import THREADED_WRITE_BYTES, CacheFiles, is_disk_full
from gateway.control import DURABLE_AFTER_XATTR
from gateway.errors import FsError, JournalError
from gateway.foreground import Foreground
from gateway.file_state import is_local_only
from gateway.namespace import Attr, Namespace
from gateway.page_cache import KEEP_CACHED_BELOW

log = logging.getLogger(__name__)

# The kernel may cache names and attributes this long; the daemon is the only writer of its tree,
# so only other nodes' files (visible after --metadata-ttl) are affected by it.
ATTR_TIMEOUT_S = 5.0
# Requests that change the tree or a file. When the journal cannot be written (failsafe) they answer
# EROFS at once, like a filesystem remounted read-only after an error; reads go on.
MUTATING = frozenset({"setattr", "mkdir", "rmdir", "unlink", "rename", "symlink", "link", "mknod", "create",
                      "write", "setxattr", "removexattr"})
# Requests an application waits on while it saves or restores: while they flow, the drain yields
# (gateway/foreground.py). Status polls (getxattr) and listings do not count.
FOREGROUND = MUTATING | {"open", "read", "flush", "fsync"}
XATTR_PREFIX = b"user."
CONTROL_XATTR_PREFIX = b"user.ckptfs."
KEEP_XATTR = b"user.ckptfs.keep"  # set by a user or the checkpointer: pin a checkpoint (SEMANTICS.md)


def fuse_errors(handler: Callable) -> Callable:
    """Turn FsError and OSError into FUSEError; log and answer EIO for anything unexpected."""

    @functools.wraps(handler)
    async def wrapper(self, *args):
        self.op_counts[handler.__name__] = self.op_counts.get(handler.__name__, 0) + 1
        if handler.__name__ in FOREGROUND:
            self.foreground.note_request()
        try:
            if handler.__name__ in MUTATING:
                self.check_writable()
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except JournalError:  # logged once by the journal; from now on the mount is failsafe
            raise pyfuse3.FUSEError(errno.EROFS) from None
        except OSError as exc:
            if is_disk_full(exc):
                log.error("%s: cache disk full (%s); the write was not acknowledged", handler.__name__, exc)
            else:
                log.error("%s failed: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s%r failed unexpectedly", handler.__name__, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class Handle:
    __slots__ = ("append", "ino", "writable")

    def __init__(self, ino: int, writable: bool, append: bool):
        self.ino = ino
        self.writable = writable
        self.append = append


class Operations(pyfuse3.Operations):
    """The request handlers. `control` answers the virtual user.ckptfs.* attributes."""

    enable_writeback_cache = True
    supports_dot_lookup = True

    def __init__(self, namespace: Namespace, cache: CacheFiles, control, reader=None, space=None):
        super().__init__()
        self.ns = namespace
        self.cache = cache
        self.control = control
        self.reader = reader  # fills data files of evicted or remote-only files (gateway/reader.py)
        self.space = space    # cache size: eviction and writer backpressure (gateway/space.py)
        self.handles: dict[int, Handle] = {}
        # With --cluster: async (parent, name) -> bool, one bounded look at the bucket after a miss
        # (the one network wait a FUSE request may make: another node may have made the name).
        self.remote_lookup = None
        self.before_readdir = None  # several nodes: other nodes stage files in our temporary directories
        # The daemon's gateway.page_cache.drop_kernel_pages; None where no kernel serves us (unit tests).
        self.drop_kernel_pages: Callable[[int], Awaitable[None]] | None = None
        self._fh_counter = itertools.count(1)
        self.op_counts: dict[str, int] = {}
        self._write_locks: dict[int, trio.Lock] = {}  # inodes with a write in a worker thread
        self.foreground = Foreground()  # the daemon passes the drain's: it yields while requests flow

    def check_writable(self) -> None:
        if self.ns.journal.failed:
            raise FsError(errno.EROFS)

    # ---- attributes ----------------------------------------------------------------------

    def entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.id
        e.generation = 0
        e.entry_timeout = ATTR_TIMEOUT_S
        e.attr_timeout = ATTR_TIMEOUT_S
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = attr.rdev
        e.st_size = attr.size
        e.st_blksize = 128 * 1024
        e.st_blocks = (attr.size + 511) // 512
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        return e

    def _entry_remembered(self, attr: Attr) -> pyfuse3.EntryAttributes:
        self.ns.remember(attr.id)
        return self.entry(attr)

    @fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            return self._entry_remembered(self.ns.lookup(parent_inode, name))
        except FsError as exc:
            if exc.errno != errno.ENOENT or self.remote_lookup is None or name in (b".", b".."):
                raise
            if not await self.remote_lookup(parent_inode, name):
                raise
        return self._entry_remembered(self.ns.lookup(parent_inode, name))

    async def forget(self, inode_list):
        for ino, count in inode_list:
            try:
                self.ns.forget(ino, count)
            except JournalError:
                pass  # failsafe: the unlinked inode is purged at the next start
            except Exception:
                log.exception("forget(%d) failed", ino)

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        return self.entry(self.ns.getattr(inode))

    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        size = attr.st_size if fields.update_size else None
        if size is not None:
            if self.ns.getattr(inode).is_dir:
                raise FsError(errno.EISDIR)
            with self._pinned(inode):
                await self._ensure_local(inode, whole=True)
                content.truncate(self.ns, self.cache, inode, size)
        result = self.ns.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=size,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self.entry(result)

    @fuse_errors
    async def statfs(self, ctx):
        vfs = os.statvfs(self.cache.root)
        data = pyfuse3.StatvfsData()
        data.f_bsize = vfs.f_bsize
        data.f_frsize = vfs.f_frsize
        data.f_blocks = vfs.f_blocks
        data.f_bfree = vfs.f_bfree
        data.f_bavail = vfs.f_bavail
        data.f_files = vfs.f_files
        data.f_ffree = vfs.f_ffree
        data.f_favail = vfs.f_favail
        data.f_namemax = 255
        return data

    # ---- directories ------------------------------------------------------------------------

    @fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        attr = self.ns.create(parent_inode, name, stat.S_IFDIR | (mode & ~ctx.umask & 0o7777), ctx.uid, ctx.gid)
        return self._entry_remembered(attr)

    @fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        self.ns.rmdir(parent_inode, name)

    @fuse_errors
    async def opendir(self, inode, ctx):
        if not self.ns.getattr(inode).is_dir:
            raise FsError(errno.ENOTDIR)
        if self.before_readdir is not None:
            await self.before_readdir(inode)
        return inode

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        while True:
            rows = self.ns.readdir(fh, start_id)
            if not rows:
                return
            for offset, name, ino in rows:
                attr = self.ns.getattr(ino)
                if not pyfuse3.readdir_reply(token, bytes(name), self.entry(attr), offset):
                    return
                self.ns.remember(ino)
                start_id = offset

    async def releasedir(self, fh):
        pass

    @fuse_errors
    async def fsyncdir(self, fh, datasync):
        await self.control.commit_durable()

    # ---- names --------------------------------------------------------------------------

    @fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        self.ns.unlink(parent_inode, name)

    @fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self.ns.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        attr = self.ns.create(parent_inode, name, stat.S_IFLNK | 0o777, ctx.uid, ctx.gid, target=target)
        return self._entry_remembered(attr)

    @fuse_errors
    async def readlink(self, inode, ctx):
        attr = self.ns.getattr(inode)
        if not stat.S_ISLNK(attr.mode):
            raise FsError(errno.EINVAL)
        return attr.target

    @fuse_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        # Each name is its own object with the same content (docs/SEMANTICS.md, "Hard links").
        return self._entry_remembered(self.ns.link(inode, new_parent_inode, new_name))

    @fuse_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        if is_local_only(mode):  # FIFO, socket, device: kept here, never uploaded
            attr = self.ns.create(parent_inode, name, mode & ~ctx.umask, ctx.uid, ctx.gid, rdev=rdev)
            return self._entry_remembered(attr)
        if not stat.S_ISREG(mode):
            raise FsError(errno.EINVAL)
        attr = self.ns.create(parent_inode, name, mode & ~ctx.umask, ctx.uid, ctx.gid)
        self.cache.create_empty(attr.id)
        self.ns.mark_ready(attr.id)
        return self._entry_remembered(attr)

    # ---- files ----------------------------------------------------------------------------

    def _open_handle(self, ino: int, flags: int, *, created: bool = False) -> pyfuse3.FileInfo:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        self.cache.acquire(ino)
        self.ns.opened(ino, writable, created=created)
        fh = next(self._fh_counter)
        self.handles[fh] = Handle(ino, writable, bool(flags & os.O_APPEND))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        attr = self.ns.create(parent_inode, name, stat.S_IFREG | (mode & ~ctx.umask & 0o7777), ctx.uid, ctx.gid)
        self.cache.create_empty(attr.id)  # a stale data file (crash) would otherwise show through
        info = self._open_handle(attr.id, flags, created=True)
        return info, self._entry_remembered(attr)

    @fuse_errors
    async def open(self, inode, flags, ctx):
        attr = self.ns.getattr(inode)
        if attr.is_dir:
            raise FsError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable:
            self.check_writable()
        truncating = writable and bool(flags & os.O_TRUNC)
        with self._pinned(inode):  # not evicted between its fetch and the handle
            if truncating and not attr.cached and self.reader and inode not in self.reader.fetches:
                content.discard(self.ns, self.cache, inode)  # the old content is not fetched
            else:
                await self._ensure_local(inode, whole=writable)
            info = self._open_handle(inode, flags)
        if truncating and self.ns.getattr(inode).size:
            try:
                content.truncate(self.ns, self.cache, inode, 0)
                self.ns.setattr(inode, size=0)
            except BaseException:
                self._close_handle(info.fh)  # the kernel gets no handle, so no release would come
                raise
        return info

    def _pinned(self, ino: int):
        """While a handler awaits a fetch, the file is not evicted under it."""
        return self.space.pinned(ino) if self.space is not None else contextlib.nullcontext()

    async def _ensure_local(self, ino: int, whole: bool) -> None:
        """Files evicted from the cache or known only from the bucket are fetched (all of it to write)."""
        if self.reader is not None:
            await self.reader.ensure_local(ino, whole=whole)

    @fuse_errors
    async def read(self, fh, off, size):
        handle = self.handles[fh]
        if self.reader is not None:
            return await self.reader.read(handle.ino, off, size)
        return self.cache.read(handle.ino, off, size)

    @fuse_errors
    async def write(self, fh, off, buf):
        ino = self.handles[fh].ino
        lock = self._write_locks.get(ino)
        if lock is None and len(buf) < THREADED_WRITE_BYTES and not self._must_wait_for_room(len(buf)):
            return await self._write_in_order(ino, off, buf)  # no await inside: already in order
        if lock is None:
            lock = self._write_locks[ino] = trio.Lock()
        try:
            async with lock:  # FIFO: one file's writes land (and are hashed) in the order they came
                return await self._write_in_order(ino, off, buf)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._write_locks.pop(ino, None)

    def _must_wait_for_room(self, nbytes: int) -> bool:
        return self.space is not None and not self.space.fits(nbytes)

    async def _write_in_order(self, ino: int, off: int, buf: bytes) -> int:
        """Room in the cache, then the intent, the data file, and size and digest (gateway/content.py)."""
        if self.space is not None:
            await self.space.reserve(len(buf))
        return await content.write(self.ns, self.cache, ino, off, buf)

    @fuse_errors
    async def flush(self, fh):
        self.ns.record_size(self.handles[fh].ino)

    @fuse_errors
    async def fsync(self, fh, datasync):
        ino = self.handles[fh].ino
        await self.cache.fsync(ino)
        self.ns.record_size(ino)
        await self.control.commit_durable()

    async def release(self, fh):
        handle = self._close_handle(fh)
        if self.drop_kernel_pages is not None and self._holds_written_pages(handle):
            await self.drop_kernel_pages(handle.ino)  # the data file holds them now: one copy, not two

    def _close_handle(self, fh: int) -> Handle:
        """Forget the handle: the namespace's open count (a writer's close queues the file) and the
        data file's descriptor."""
        handle = self.handles.pop(fh)
        try:
            self.ns.closed(handle.ino, handle.writable)
        except JournalError:
            pass  # failsafe (logged once); the next start takes the data file's size
        except Exception:
            log.exception("release of inode %d failed", handle.ino)
        finally:
            self.cache.release(handle.ino)
        return handle

    def _holds_written_pages(self, handle: Handle) -> bool:
        """After the last writer of a large file closes, the kernel's pages of it are a second copy."""
        if not handle.writable or self.cache.is_open(handle.ino):
            return False
        size = self.cache.size_of(handle.ino)  # a stat, not a journal query: every close passes here
        return size is not None and size >= KEEP_CACHED_BELOW  # None: removed at its last close

    # ---- extended attributes ------------------------------------------------------------

    @fuse_errors
    async def getxattr(self, inode, name, ctx):
        if name.startswith(DURABLE_AFTER_XATTR):
            return await self.control.durable_after(name)
        if name.startswith(CONTROL_XATTR_PREFIX) and name != KEEP_XATTR:
            return self.control.get_xattr(inode, name)
        if not name.startswith(XATTR_PREFIX):
            raise FsError(errno.ENODATA)
        return self.ns.get_xattr(inode, name)

    @fuse_errors
    async def setxattr(self, inode, name, value, ctx):
        if name.startswith(CONTROL_XATTR_PREFIX) and name != KEEP_XATTR:
            raise FsError(errno.EPERM)  # read-only status attributes
        if not name.startswith(XATTR_PREFIX):
            raise FsError(errno.ENOTSUP)
        self.ns.set_xattr(inode, name, value)

    @fuse_errors
    async def listxattr(self, inode, ctx):
        return self.ns.list_xattrs(inode)

    @fuse_errors
    async def removexattr(self, inode, name, ctx):
        if name.startswith(CONTROL_XATTR_PREFIX) and name != KEEP_XATTR:
            raise FsError(errno.EPERM)
        self.ns.remove_xattr(inode, name)
