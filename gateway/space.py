"""Cache size: eviction of durable files and backpressure on writers.

Above the high watermark, durable files that are not open are evicted least recently used first
until the low watermark (their names stay; reads fetch them again). If that is not enough and the
drain can still make room (closed files are waiting to be uploaded), the writer waits: counted,
logged, never an error. A writer gets ENOSPC only after `backpressure_timeout_s` without room (the
endpoint is down and nothing can be evicted), or when the cache disk itself is full. If the cache is
full only of files still open for writing, nothing could make room, so the limit is exceeded
(logged) rather than deadlocking the writer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from typing import TYPE_CHECKING

import trio

from gateway import content
from gateway.errors import FsError

if TYPE_CHECKING:  # annotations only
    from gateway.reader import Reader

log = logging.getLogger(__name__)

POLL_S = 0.05


class SpaceGuard:
    def __init__(self, ns, cache, drain, *, limit_bytes: int, high: float, low: float, timeout_s: float):
        self.ns = ns
        self.cache = cache
        self.drain = drain
        self.limit_bytes = limit_bytes
        self.high_bytes = int(limit_bytes * high)
        self.low_bytes = int(limit_bytes * low)
        self.timeout_s = timeout_s
        self.reader: Reader | None = None  # set by the daemon: files being fetched are not evicted
        self.last_used: dict[int, float] = {}
        self.pins: dict[int, int] = {}  # inode -> handlers awaiting its fetch: not evicted
        self.evictions = 0
        self.evicted_bytes = 0
        self.backpressure_s = 0.0
        self.backpressure_waits = 0
        self.waiting = 0  # writers waiting for room now
        self.overflows = 0

    def touch(self, ino: int) -> None:
        self.last_used[ino] = time.monotonic()

    def fits(self, nbytes: int) -> bool:
        """Whether `reserve(nbytes)` returns without waiting."""
        return self.cache.used_bytes + nbytes <= self.limit_bytes

    @contextlib.contextmanager
    def pinned(self, ino: int):
        """Keep `ino` from eviction across an await (a fetch before the handle is taken)."""
        self.pins[ino] = self.pins.get(ino, 0) + 1
        try:
            yield
        finally:
            left = self.pins.pop(ino) - 1
            if left:
                self.pins[ino] = left

    def forget(self, ino: int) -> None:
        """The inode was purged: its number is never used again, nor is its state here."""
        self.last_used.pop(ino, None)

    async def reserve(self, nbytes: int) -> None:
        """Return once `nbytes` more fit under the cache size (or nothing could make room)."""
        if self.cache.used_bytes + nbytes <= self.high_bytes:
            return
        self.evict(self.low_bytes - nbytes)
        if self.cache.used_bytes + nbytes <= self.limit_bytes:
            return
        await self._wait_for_room(nbytes)

    async def _wait_for_room(self, nbytes: int) -> None:
        started = time.monotonic()
        self.backpressure_waits += 1
        self.waiting += 1
        log.info("cache full (%d of %d bytes used): writer waits for the drain", self.cache.used_bytes,
                 self.limit_bytes)
        try:
            while self.cache.used_bytes + nbytes > self.limit_bytes:
                if not self._drain_can_make_room():
                    self.overflows += 1
                    log.warning("cache over its size: only files still being written are in it; continuing")
                    return
                if time.monotonic() - started > self.timeout_s:
                    log.error("cache full for %.0fs and the drain makes no room (endpoint down?): ENOSPC",
                              self.timeout_s)
                    raise FsError(errno.ENOSPC)
                await trio.sleep(POLL_S)
                self.evict(self.low_bytes - nbytes)
        finally:
            self.waiting -= 1
            self.backpressure_s += time.monotonic() - started

    def _drain_can_make_room(self) -> bool:
        view = self.drain.view
        return view.queued_files + view.uploading_files > 0 or bool(self.drain.jobs)

    def evictable(self) -> list[tuple[int, int]]:
        """(inode, size) of durable, cached, closed files, least recently used first."""
        rows = self.ns.journal.all(
            "SELECT id, size, atime_ns FROM inodes WHERE state='durable' AND cached=1 AND nlink>0 "
            "AND (mode & 61440) = 32768 AND content_dirty=0")
        busy = set(self.ns.open) | set(self.pins) | set(self.reader.fetches if self.reader else ())
        rows = [r for r in rows if r[0] not in busy]
        rows.sort(key=lambda r: self.last_used.get(r[0], 0.0))  # never read since start: oldest
        return [(r[0], r[1]) for r in rows]

    def evict(self, target_bytes: int) -> None:
        """Drop data files of evictable files until the cache uses at most `target_bytes`."""
        if self.cache.used_bytes <= target_bytes:
            return
        for ino, size in self.evictable():
            if self.cache.used_bytes <= target_bytes:
                break
            content.evict(self.ns, self.cache, ino)
            self.last_used.pop(ino, None)
            self.evictions += 1
            self.evicted_bytes += size

    def statistics(self) -> dict:
        return {
            "cache_size_bytes": self.limit_bytes,
            "evictable_bytes": sum(size for _, size in self.evictable()),
            "evictions_total": self.evictions,
            "evicted_bytes_total": self.evicted_bytes,
            "backpressure_seconds_total": round(self.backpressure_s, 3),
            "backpressure_waits_total": self.backpressure_waits,
            "backpressure_writers_waiting": self.waiting,
            "cache_overflows_total": self.overflows,
        }
