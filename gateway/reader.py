"""The read path for files whose data is not in the cache (evicted, or known only from the bucket).

Opening such a file starts one fetch: parallel ranged GETs of `CHUNK` bytes, written into the cache
file, in order of offset. A read waits only for the chunks it covers, so a sequential reader runs
behind the fetch at the endpoint's bandwidth. The whole-file xxh3 digest is checked against the
object's `ckptfs-xxh3` metadata; reads of the last chunk wait for that check, so any whole-file read
of a corrupted object ends in EIO (and a log line), never in silently wrong bytes.
"""

from __future__ import annotations

import errno
import logging
import os

import trio
import xxhash

from gateway.cache import CacheFiles
from gateway.errors import FsError, JournalError, NoSuchKey, StoreError
from gateway.namespace import Namespace
from gateway.retry import retrying
from gateway.staging import parse_staged_key, staged_key
from gateway.store import METADATA_DIGEST, Store

log = logging.getLogger(__name__)

CHUNK = 8 * 1024 * 1024
FETCH_CONCURRENCY = 8
CHUNK_ATTEMPTS = 6


class Fetch:
    """One whole-file download in progress."""

    def __init__(self, ino: int, size: int):
        self.ino = ino
        self.size = size
        self.count = max(1, (size + CHUNK - 1) // CHUNK)
        self.chunk_done = [trio.Event() for _ in range(self.count)]
        self.finished = trio.Event()
        self.error: str | None = None


class Reader:
    """Fetches uncached files on demand; `nursery` runs the fetches."""

    def __init__(self, ns: Namespace, cache: CacheFiles, store: Store, nursery: trio.Nursery, space=None):
        self.ns = ns
        self.cache = cache
        self.store = store
        self.nursery = nursery
        self.space = space
        self.fetches: dict[int, Fetch] = {}
        self.corrupt: set[int] = set()
        self.limiter = trio.CapacityLimiter(FETCH_CONCURRENCY)
        self.fetched_bytes = 0
        self.digest_failures = 0
        self.retries = 0
        self.errors = 0

    def _count_retry(self, exc: StoreError, attempt: int, delay_s: float) -> None:
        self.retries += 1

    def forget(self, ino: int) -> None:
        """The inode was purged: drop what is known about it here."""
        self.corrupt.discard(ino)

    async def ensure_local(self, ino: int, *, whole: bool = False) -> None:
        """Start fetching an uncached file; with `whole`, wait until all of it is local."""
        attr = self.ns.getattr(ino)
        if attr.cached or attr.is_dir:
            return
        fetch = self._start(ino, attr.size)
        if whole:
            await fetch.finished.wait()
            self._raise_if_failed(fetch)

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        fetch = self.fetches.get(ino)
        if fetch is None and not self.ns.getattr(ino).cached:
            fetch = self._start(ino, self.ns.getattr(ino).size)
        if fetch is not None:
            await self._wait_range(fetch, offset, size)
        if self.space is not None:
            self.space.touch(ino)
        return self.cache.read(ino, offset, size)

    async def _wait_range(self, fetch: Fetch, offset: int, size: int) -> None:
        end = min(fetch.size, offset + size)
        if offset >= fetch.size:
            return
        last = (end - 1) // CHUNK
        if last == fetch.count - 1:
            await fetch.finished.wait()  # the last chunk is served only after the digest check
        else:
            for index in range(offset // CHUNK, last + 1):
                await fetch.chunk_done[index].wait()
                if fetch.error:
                    break
        self._raise_if_failed(fetch)

    def _raise_if_failed(self, fetch: Fetch) -> None:
        if fetch.error:
            raise FsError(errno.EIO, fetch.error)

    def _start(self, ino: int, size: int) -> Fetch:
        if ino in self.corrupt:
            raise FsError(errno.EIO, "digest mismatch")
        fetch = self.fetches.get(ino)
        if fetch is None:
            fetch = self.fetches[ino] = Fetch(ino, size)
            self.nursery.start_soon(self._fetch, fetch)
        return fetch

    async def _fetch(self, fetch: Fetch) -> None:
        key = self.ns.remote_key(fetch.ino)
        path = str(self.cache.path(fetch.ino))
        try:
            if key is None:
                raise StoreError("no object holds this file's content", transient=False)
            key, head = await self._head(fetch.ino, key)
            expected = head.get("Metadata", {}).get(METADATA_DIGEST)
            if int(head["ContentLength"]) != fetch.size:
                raise StoreError(f"object {key} has {head['ContentLength']} bytes, expected {fetch.size}",
                                 transient=False)
            if self.space is not None:
                await self.space.reserve(fetch.size)
            self.cache.path(fetch.ino).parent.mkdir(exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, fetch.size)
                digest = await self._fetch_chunks(fetch, key, fd)
                await trio.to_thread.run_sync(os.fsync, fd)  # on disk before the journal says cached
            finally:
                os.close(fd)
            if expected and digest != expected:
                self.digest_failures += 1
                self.corrupt.add(fetch.ino)
                raise StoreError(f"object {key}: xxh3 digest {digest} does not match the recorded {expected}",
                                 transient=False)
            self.ns.set_cached(fetch.ino, True)
            self.cache.used_bytes += fetch.size
        except (StoreError, OSError, ExceptionGroup, FsError, JournalError) as exc:  # a group: a chunk task failed
            self._failed(fetch, path, f"read of {key} failed: {exc}")
        except Exception as exc:  # a bug must not end the fetch nursery (and with it the mount)
            log.exception("read of %s: unexpected error", key)
            self._failed(fetch, path, f"read of {key} failed: internal error: {exc!r}")
        finally:
            for event in fetch.chunk_done:
                event.set()
            fetch.finished.set()
            self.fetches.pop(fetch.ino, None)

    async def _head(self, ino: int, key: str) -> tuple[str, dict]:
        """HEAD of the object holding the content. A staged object (another node's file under a
        temporary name, gateway/staging.py) that is gone was moved by its writer: staged again
        under the file's new name below the same temporary directory, or copied to its final key."""
        try:
            return key, await retrying(f"HEAD {key}", lambda: self.store.head_object(key), on_retry=self._count_retry)
        except NoSuchKey:
            parsed, path = parse_staged_key(key), self.ns.path_of(ino)
            if parsed is None or path is None:
                raise
            root, member, _ = parsed
            moved = staged_key(root, member, path[len(root) + 1:]) if path.startswith(root + "/") else path
            return moved, await retrying(f"HEAD {moved}", lambda: self.store.head_object(moved),
                                         on_retry=self._count_retry)

    def _failed(self, fetch: Fetch, path: str, message: str) -> None:
        """Readers waiting on the fetch get EIO; its partial bytes go (they would fill the disk,
        and a corrupt object's bytes are never kept)."""
        fetch.error = message
        self.errors += 1
        log.error("%s", message)
        self._drop_bytes(path)

    @staticmethod
    def _drop_bytes(path: str) -> None:
        try:
            os.truncate(path, 0)
        except OSError:
            pass

    async def _fetch_chunks(self, fetch: Fetch, key: str, fd: int) -> str:
        """Download every chunk in parallel; hash them in order as they arrive."""
        hasher = xxhash.xxh3_128()
        async with trio.open_nursery() as nursery:
            for index in range(fetch.count):
                nursery.start_soon(self._fetch_chunk, fetch, key, fd, index)
            for index in range(fetch.count):
                await fetch.chunk_done[index].wait()
                if fetch.error:
                    raise StoreError(fetch.error, transient=False)
                start = index * CHUNK
                length = min(CHUNK, fetch.size - start)
                data = await trio.to_thread.run_sync(os.pread, fd, length, start)
                await trio.to_thread.run_sync(hasher.update, data)
        return hasher.hexdigest()

    async def _fetch_chunk(self, fetch: Fetch, key: str, fd: int, index: int) -> None:
        start = index * CHUNK
        end = min(fetch.size, start + CHUNK)
        async with self.limiter:
            try:
                data = await retrying(f"GET {key} at {start}", lambda: self.store.get_range(key, start, end),
                                      attempts=CHUNK_ATTEMPTS, on_retry=self._count_retry) if end > start else b""
            except StoreError as exc:
                fetch.error = str(exc)
                fetch.chunk_done[index].set()
                return
            if len(data) != end - start:
                fetch.error = f"short read of {key} at {start}: {len(data)} bytes"
            else:
                await trio.to_thread.run_sync(os.pwrite, fd, data, start)
                self.fetched_bytes += len(data)
        fetch.chunk_done[index].set()
