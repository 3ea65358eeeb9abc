"""File content: the data file on the cache disk and its journal row, changed in one order.

The rule (issue 14): the journal records the intent before the data file is touched.
  - write, truncate, open(O_TRUNC): the row is marked dirty (`content_dirty`, state DIRTY: old
    objects no longer current) first, then the data file changes;
  - eviction: the row is marked not cached first, then the data file goes;
  - fetch (gateway/reader.py): the data file is fsynced before the row says cached.
So whatever a kill -9 interrupts, either the row says "local content is the truth" (dirty: recovery
takes the data file's size and uploads it) or the data file is not needed (not cached: reads fetch
the object). `check_data_files` at start repairs what an older daemon (or a lost disk write) left.
FUSE handlers change content only through these functions.
"""

from __future__ import annotations

import logging

from gateway.cache import CacheFiles
from gateway.crashpoint import crash_point
from gateway.namespace import Namespace

log = logging.getLogger(__name__)

REGULAR = "(mode & 61440) = 32768"


def _intent(ns: Namespace, ino: int) -> None:
    """Journal that the content changes. When the journal had it clean (published, or known only
    from the bucket), the record is made durable first (fsync of the WAL): after a power loss the
    row must never say "clean" while the data file holds new bytes. New files and files already
    being written cost nothing more."""
    if ns.content_changed(ino):
        ns.journal.sync_wal()


async def write(ns: Namespace, cache: CacheFiles, ino: int, offset: int, data: bytes) -> int:
    """pwrite into the data file of an open file; returns the bytes written. Large writes run in a
    worker thread (CacheFiles.write): the caller keeps one file's writes in order (fs.write)."""
    _intent(ns, ino)
    written = await cache.write(ino, offset, data)
    crash_point("write")
    ns.note_write(ino, offset, data if written == len(data) else data[:written])
    return written


def truncate(ns: Namespace, cache: CacheFiles, ino: int, size: int) -> None:
    """Set the data file's length; the caller records the new size (Namespace.setattr)."""
    _intent(ns, ino)
    cache.truncate(ino, size)
    crash_point("truncate")


def discard(ns: Namespace, cache: CacheFiles, ino: int) -> None:
    """open(O_TRUNC) of a file whose data is not local: it becomes local and empty, unfetched."""
    _intent(ns, ino)
    ns.set_cached(ino, True, size=0)
    cache.truncate(ino, 0)
    crash_point("open-trunc")


def evict(ns: Namespace, cache: CacheFiles, ino: int) -> None:
    """Drop the data file of a durable file; reads fetch it again."""
    ns.set_cached(ino, False)
    cache.remove(ino)
    crash_point("evict")


def check_data_files(ns: Namespace, cache: CacheFiles) -> dict:
    """At start: make every row agree with its data file.

    A dirty file's data file is the truth: its size is taken (an empty one is made if it is
    missing). A clean cached file whose data file is missing or of another size is never served
    short or as zeros: if the bucket holds its content it becomes not cached (fetched on read),
    otherwise what is local is kept and uploaded again, with an error in the log.
    """
    journal = ns.journal
    sizes = uncached = republished = 0
    for ino, size in journal.all(f"SELECT id, size FROM inodes WHERE content_dirty=1 AND nlink>0 AND {REGULAR}"):
        actual = cache.size_of(ino)
        if actual is None:
            cache.truncate(ino, 0)  # created (or emptied by open(O_TRUNC)) just before the crash
            actual = 0
        if actual != size:
            sizes += 1
        journal.execute("UPDATE inodes SET size=?, cached=1 WHERE id=?", (actual, ino))
    for ino, size in journal.all(
            f"SELECT id, size FROM inodes WHERE content_dirty=0 AND cached=1 AND nlink>0 AND {REGULAR}"):
        actual = cache.size_of(ino)
        if actual == size:
            continue
        if ns.remote_key(ino) is not None:
            evict(ns, cache, ino)
            uncached += 1
            continue
        if actual is None:
            cache.truncate(ino, 0)
            actual = 0
        log.error("inode %d: data file has %d bytes, the journal %d, and no object holds its content; "
                  "keeping and uploading the local bytes", ino, actual, size)
        journal.execute("UPDATE inodes SET size=? WHERE id=?", (actual, ino))
        ns.content_changed(ino)  # dirty: made ready by recovery, then uploaded
        republished += 1
    return {"sizes_repaired": sizes, "made_uncached": uncached, "republished": republished}
