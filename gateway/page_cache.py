"""What a checkpoint leaves in the node's page cache: one copy at most, and none once it is uploaded.

A file written through the mount sits in the page cache twice: the kernel's pages of the FUSE file
(the writeback cache) and the pages of its data file in the cache dir. A checkpoint is written
once and read rarely, and the node's memory belongs to the training job, so ckptfs drops both
copies of large files when it no longer needs them:

- the FUSE file's pages when the last handle that could write it is released (its data is then in
  the data file; a later read goes through the daemon, which reads the data file);
- the data file's pages of each range the drain has read to upload: written back first if the
  application did not fsync them (sync_file_range), then dropped (POSIX_FADV_DONTNEED, which skips
  dirty pages). A later read, e.g. a restore from the local cache, reads the disk.

Files under KEEP_CACHED_BELOW keep their pages: they cost little memory, and a small file's
create-write-close must not pay a page-cache round trip.

Measured on this project's VM (docs/PERFORMANCE.md, round 6): a boto3 upload of 1 GiB to moto
took 35-46 s beside a mount that held a 1 GiB file written through it, against 13.5-15.4 s when both
copies were dropped and 17.5-19.4 s with no mount; moto's page faults cost 35-37 µs instead of 8-14.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os

import pyfuse3
import trio

log = logging.getLogger(__name__)

KEEP_CACHED_BELOW = 1 << 20  # bytes: smaller files keep their pages

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_FILE_RANGE_WRITE_AND_WAIT = 2 | 4  # SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER


def drop_uploaded_range(fd: int, offset: int, length: int) -> None:
    """The data file's pages of a range the drain has read (blocking; a worker thread's call).
    Ranges of a large file only: every part of a multipart upload, a single PUT of 1 MiB or more."""
    if length < KEEP_CACHED_BELOW and offset == 0:
        return
    if _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE_AND_WAIT) != 0:
        return  # e.g. EIO: keep the pages; the upload goes on from what was read
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


async def drop_kernel_pages(ino: int) -> None:
    """Drop the kernel's cached pages (and attributes) of a FUSE inode.

    In a worker thread: with the writeback cache the kernel writes dirty pages back first, and
    those WRITE requests are served by the FUSE loop, which must not be the caller."""
    try:
        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOSYS, errno.EBADF):  # the kernel forgot it, or unmounting
            log.warning("dropping the kernel's pages of inode %d: %s", ino, exc)
