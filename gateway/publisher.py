"""The publisher: the requests that make one file's object visible, each with one clean-up path.

- `put`: one PutObject (symlinks, directory markers, small records);
- `put_file`: one PutObject of a file up to a part's size;
- `upload_multipart`: parts in parallel, then CompleteMultipartUpload; an upload that does not
  complete is aborted in its `finally` (shielded, so a cancelled job aborts too);
- `copy`: CopyObject for a rename of published content, or UploadPartCopy parts above a part's size
  (CopyObject stops at 5 GiB).
The scheduler decides *when* (a marker only starts once its scope is durable); the publisher only
decides *how*. Parts and PUTs take slots from priority limiters, so the scheduler's ranking holds.
`check` raises `Superseded` whenever the file changed, moved or vanished since its job began.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Callable

import trio

from gateway import digest as digests
from gateway.config import Config
from gateway.errors import StoreError
from gateway.journal import Journal
from gateway.keys import PRIVATE_DIR
from gateway.objects import ObjectBook
from gateway.foreground import Foreground
from gateway.priority import PriorityFn, PriorityLimiter
from gateway.retry import OnRetry, retrying
from gateway.store import Store

log = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 10.0
INLINE_BODY_MAX = 64 * 1024  # bodies up to this are read and summed on the loop: cheaper than a thread hop
POOLED_BODY_MIN = 1 << 20  # file bodies from this size on are read into a part buffer and count as a part


class Superseded(Exception):
    """The file changed, moved or vanished while it was being uploaded; try again later."""


def multipart_etag(parts: list[dict]) -> str:
    """The ETag S3 gives a completed multipart object: md5 of the parts' md5s, dash, part count."""
    digest = hashlib.md5(b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in parts))
    return f'"{digest.hexdigest()}-{len(parts)}"'


@contextlib.asynccontextmanager
async def open_task_group():
    """A nursery for the parts of one upload: the first part's error is raised as itself.

    trio wraps child errors in an ExceptionGroup; the callers handle StoreError/Superseded.
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except ExceptionGroup as group:  # not BaseExceptionGroup: a cancellation stays a cancellation
        leaves = _leaves(group)
        for kind in (Superseded, StoreError, OSError, EOFError):
            for leaf in leaves:
                if isinstance(leaf, kind):
                    raise leaf from None
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


class Publisher:
    def __init__(self, store: Store, journal: Journal, book: ObjectBook, config: Config,
                 on_retry: OnRetry, on_bytes: Callable[[int], None]):
        self.store = store
        self.journal = journal
        self.book = book
        self.part_size = config.part_size_bytes
        self.parts = PriorityLimiter(config.upload_concurrency)   # multipart parts
        self.requests = PriorityLimiter(config.put_concurrency)   # PUTs, copies, markers
        self._on_retry = on_retry
        self._on_bytes = on_bytes
        self._lost_creates: set[str] = set()  # keys whose CreateMultipartUpload answer may be lost
        # parts (and file bodies of POOLED_BODY_MIN or more) are read into reused buffers (no fresh
        # allocation per part); the idle ones are dropped once no upload uses them, so an idle
        # daemon does not keep them
        self.buffers = digests.PartBuffers(config.part_size_bytes, keep=config.upload_concurrency)
        self._uploads_running = 0
        self.foreground = Foreground()  # the daemon shares the FUSE layer's, which it tells of requests

    def reprioritize(self) -> None:
        self.parts.reprioritize()
        self.requests.reprioritize()

    async def _retrying(self, what: str, call):
        return await retrying(what, call, on_retry=self._on_retry)

    # ---- single requests ----------------------------------------------------------------

    async def put(self, key: str, read: Callable[[], tuple[bytes, str | None, str | None]],
                  metadata: dict[str, str], priority: PriorityFn, check: Callable[[], None], size: int = 0) -> str:
        """One PutObject of the body `read()` returns (body, crc32, sha256): in a worker thread, or
        on the loop for a body of `size` <= INLINE_BODY_MAX (a 16 KiB read and its sums take ~30 us,
        a thread hop several times that, and a checkpoint of 1,000 small files pays it per file)."""
        async with self.requests.slot(priority):
            await self.foreground.turn()
            if size <= INLINE_BODY_MAX:
                body, crc, sha = read()
            else:
                body, crc, sha = await trio.to_thread.run_sync(read)
            check()
            etag = await self._retrying(f"PUT {key}", lambda: self.store.put_object(key, body, metadata, crc, sha))
        self._on_bytes(len(body))
        return etag

    async def put_file(self, key: str, path: str, size: int, metadata: dict[str, str], priority: PriorityFn,
                       check: Callable[[], None]) -> str:
        """One PutObject of the first `size` (at most a part) bytes of the cache file `path`.

        A body of POOLED_BODY_MIN or more is read into a reused part buffer and takes a part slot
        instead of a request slot: a fresh 4 MiB `bytes` per file cost page faults and an mmap
        (bench_part_read: 0.86 against 0.48 s of CPU per GiB), and bytes in flight stay within
        upload_concurrency x part_size whatever the file sizes (32 PUTs of 16 MiB were 512 MiB).
        """
        sign = self.store.signs_payload
        if size < POOLED_BODY_MIN:
            return await self.put(key, lambda: digests.read_range_sums(path, 0, size, sign), metadata, priority,
                                  check, size)
        async with self.parts.slot(lambda: (*priority(), 0)), self._using_buffers():
            await self.foreground.turn()
            async with self._read_into_buffer(path, 0, size, check) as (view, crc, sha):
                etag = await self._retrying(f"PUT {key}",
                                            lambda: self.store.put_object(key, view, metadata, crc, sha))
        self._on_bytes(size)
        return etag

    @contextlib.asynccontextmanager
    async def _read_into_buffer(self, path: str, offset: int, length: int, check: Callable[[], None]):
        """A leased part buffer holding `length` bytes at `offset` of `path`, with their CRC32 and
        SHA-256 (read and summed in a worker thread); `check` runs after the read."""
        with self.buffers.lease(length) as view:
            crc, sha = await trio.to_thread.run_sync(digests.read_into_sums, path, offset, view,
                                                      self.store.signs_payload)
            check()
            yield view, crc, sha

    @contextlib.asynccontextmanager
    async def _using_buffers(self):
        """While an upload reads into part buffers; the idle buffers go when the last one ends."""
        self._uploads_running += 1
        try:
            yield
        finally:
            self._uploads_running -= 1
            if self._uploads_running == 0:
                self.buffers.clear()

    async def copy(self, source: str, key: str, size: int, metadata: dict[str, str], priority: PriorityFn,
                   check: Callable[[], None]) -> str:
        """A server-side copy: CopyObject, or UploadPartCopy parts above one part's size."""
        if size <= self.part_size:
            async with self.requests.slot(priority):
                check()
                return await self._retrying(f"copy {source} -> {key}", lambda: self.store.copy_object(source, key))
        return await self._multipart(key, size, priority, check,
                                     create=lambda: self.store.create_multipart_copy(key, metadata),
                                     part=lambda upload_id, n, start, end: self.store.upload_part_copy(
                                         source, key, upload_id, n, start, end))

    async def rescue_displaced(self, key: str, ino: int, gen: int, priority: PriorityFn,
                               claim: Callable[[str], None]) -> None:
        """Before `key` is overwritten: if it holds the published content of another live file
        (names were swapped), copy that to a private stash key, which that file's job copies from.
        `claim` keeps the stash key from the stale-object deleter while this job runs."""
        displaced = self.book.displaced(key, ino)
        if displaced is None:
            return
        other, size, digest = displaced
        stash = f"{PRIVATE_DIR}/stash/{other}-{uuid.uuid4().hex[:12]}"
        claim(stash)
        self.book.intend(stash, gen)
        async with self.requests.slot(priority):
            await self._retrying(f"stash {key}", lambda: self.store.copy_object(key, stash))
        self.book.stash(key, stash, other, size, digest, gen)
        log.info("%s held the content of another file (names swapped); kept it at %s", key, stash)

    # ---- multipart ----------------------------------------------------------------------

    async def upload_multipart(self, key: str, path: str, size: int, metadata: dict[str, str],
                               priority: PriorityFn, check: Callable[[], None]) -> str:
        async def part(upload_id: str, number: int, start: int, end: int) -> dict:
            async with self._read_into_buffer(path, start, end - start, check) as (view, crc, sha):
                result = await self.store.upload_part(key, upload_id, number, view, crc, sha)
            self._on_bytes(end - start)
            return result

        async with self._using_buffers():
            return await self._multipart(key, size, priority, check,
                                         create=lambda: self.store.create_multipart(key, metadata), part=part)

    async def _multipart(self, key: str, size: int, priority: PriorityFn, check: Callable[[], None], *,
                         create, part) -> str:
        started = time.monotonic()
        upload_id = await self._create(key, create)
        self.journal.execute("INSERT OR REPLACE INTO multipart VALUES (?, ?)", (upload_id, key))
        completed = False
        try:
            count = (size + self.part_size - 1) // self.part_size
            parts: list[dict] = [{}] * count
            async with open_task_group() as nursery:
                for number in range(1, count + 1):
                    nursery.start_soon(self._part, key, upload_id, number, size, parts, priority, check, part)
            parts_done = time.monotonic()
            check()
            async with self.requests.slot(priority):
                etag = await self._complete(key, upload_id, parts)
            completed = True
            log.info("uploaded %s: %d bytes in %d parts; parts %.2fs, complete %.2fs", key, size, count,
                     parts_done - started, time.monotonic() - parts_done)
            return etag
        finally:
            await self._after_multipart(key, upload_id, completed)

    async def _part(self, key, upload_id, number, size, parts, priority, check, part) -> None:
        start = (number - 1) * self.part_size
        end = min(size, start + self.part_size)
        numbered = lambda: (*priority(), number)  # noqa: E731 - earlier parts of a file first
        async with self.parts.slot(numbered):
            check()
            parts[number - 1] = await self._retrying(f"part {number} of {key}",
                                                     lambda: part(upload_id, number, start, end))

    async def _create(self, key: str, create) -> str:
        def lost(exc: StoreError, attempt: int, delay_s: float) -> None:
            self._lost_creates.add(key)
            self._on_retry(exc, attempt, delay_s)

        try:
            return await retrying(f"create multipart {key}", create, on_retry=lost)
        except StoreError:
            self._lost_creates.add(key)  # an answer lost on the way may have left an upload behind
            raise

    async def _after_multipart(self, key: str, upload_id: str, completed: bool) -> None:
        """The one clean-up: abort what did not complete; sweep uploads whose create answer was lost."""
        with trio.CancelScope(shield=True), trio.move_on_after(ABORT_TIMEOUT_S):
            if not completed:
                try:
                    await self.store.abort_multipart(key, upload_id)
                except StoreError as exc:
                    log.warning("abort of %s failed (%s); retried at next start", key, exc)
                    return  # the journal row stays: the next start aborts it
            elif key in self._lost_creates:
                await self._abort_strays(key, upload_id)
            self.journal.execute("DELETE FROM multipart WHERE upload_id=?", (upload_id,))

    async def _complete(self, key: str, upload_id: str, parts: list) -> str:
        """CompleteMultipartUpload; if an earlier attempt's answer was lost and the server now says
        NoSuchUpload, the object's multipart ETag tells whether that attempt did complete."""
        try:
            return await self._retrying(f"complete {key}", lambda: self.store.complete_multipart(key, upload_id, parts))
        except StoreError as exc:
            if exc.code != "NoSuchUpload":
                raise
            expected = multipart_etag(parts)
            try:
                head = await self.store.head_object(key)
            except StoreError:
                raise exc from None
            if head.get("ETag") != expected:
                raise
            return expected

    async def _abort_strays(self, key: str, keep: str) -> None:
        """Abort other incomplete uploads of `key` (a CreateMultipartUpload whose answer was lost).
        Best effort; the start-up sweep and the lifecycle rule are the backstops."""
        try:
            for upload_id in await self.store.list_multipart_uploads(key):
                if upload_id != keep:
                    await self.store.abort_multipart(key, upload_id)
                    self.journal.execute("DELETE FROM multipart WHERE upload_id=?", (upload_id,))
            self._lost_creates.discard(key)
        except StoreError as exc:
            log.info("could not clean up stray uploads of %s: %s", key, exc)
