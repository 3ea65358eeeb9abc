"""The drain: makes the bucket equal the namespace, in commit order, and survives crashes.

Each scheduler pass reads the journal's pending inodes (durable=0) and stale objects (inode NULL):
- a regular file or symlink is uploaded (or server-side copied, if only its name changed) once it is
  ready (closed), has no writer, has been quiet for the drain delay and is not held by a temporary
  name. Uploads run in parallel; the request that makes an object visible (PUT, Complete, Copy) waits
  for its turn: every pending file earlier in the commit order (`ready_seq`) must be visible first.
- an empty directory gets a `dir/` marker; a stale object is deleted unless a live name maps to it.
The journal records each result; an interrupted upload is replayed after restart. Failures retry
with exponential backoff and jitter, forever: nothing pending is ever dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import logging
import random
import stat
import time

import trio

from gateway import digest as digests
from gateway.cache import CacheFiles
from gateway.config import Config
from gateway.errors import NoSuchKey, StoreError
from gateway.journal import Journal
from gateway.namespace import ROOT_INODE, Attr, Namespace
from gateway.store import (
    METADATA_DIGEST, METADATA_MODE, METADATA_MTIME, METADATA_SIZE, METADATA_TYPE, Store,
)

log = logging.getLogger(__name__)

PART_ATTEMPTS = 8
BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 30.0
SCAN_LIMIT = 4096
RATE_WINDOW_S = 10.0


class Superseded(Exception):
    """The file changed, moved or vanished while it was being uploaded; try again later."""


@dataclasses.dataclass
class DrainCounters:
    uploaded_bytes: int = 0
    uploaded_files: int = 0
    copied_files: int = 0
    deleted_objects: int = 0
    retries: int = 0
    errors: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    last_published_at: float | None = None
    newest_durable_change_at: float | None = None


@dataclasses.dataclass
class PendingView:
    """What the last scheduler pass saw, for status and `wait`."""

    dirty_files: int = 0
    dirty_bytes: int = 0
    queued_files: int = 0
    uploading_files: int = 0
    held_files: int = 0
    stale_objects: int = 0
    oldest_pending_at: float | None = None
    durable_through_gen: int = 0


class Drain:
    """A trio service: `await nursery.start(drain.run)`, `drain.stop()`, `await drain.wait_idle()`."""

    def __init__(self, ns: Namespace, cache: CacheFiles, store: Store, journal: Journal, config: Config):
        self.ns = ns
        self.cache = cache
        self.store = store
        self.journal = journal
        self.config = config
        self.part_limiter = trio.CapacityLimiter(config.upload_concurrency)
        self.busy_inodes: dict[int, str] = {}   # inode -> "uploading" | "copying" | "marker"
        self.busy_keys: set[str] = set()
        self.not_before: dict[object, float] = {}  # backoff per inode or stale key
        self.failures: dict[object, int] = {}
        self.counters = DrainCounters()
        self.view = PendingView()
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
        self._pending_seqs: set[int] = set()
        self._min_pending: int | None = None
        self._turn_changed = trio.Event()
        self._wake = trio.Event()
        self._stopping = False
        self._idle = trio.Event()
        ns.on_change = self.wake

    # ---- service ------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self._abort_interrupted_multiparts()
        async with trio.open_nursery() as nursery:
            task_status.started()
            while not self._stopping:
                self._wake = trio.Event()
                self._schedule(nursery)
                with trio.move_on_after(self._tick_s()):
                    await self._wake.wait()
            nursery.cancel_scope.cancel()

    def _tick_s(self) -> float:
        return max(0.05, min(0.5, self.config.drain_delay_s / 2))

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing drainable is pending; False on timeout."""
        with trio.move_on_after(timeout_s):
            while True:
                self._schedule_now()
                v = self.view
                if v.dirty_files + v.queued_files + v.uploading_files + v.stale_objects == 0 and not self.busy_inodes:
                    return True
                await trio.sleep(0.1)
        return False

    def _schedule_now(self) -> None:
        self.wake()

    async def _abort_interrupted_multiparts(self) -> None:
        """Multipart uploads begun before a crash are aborted; their files are still pending."""
        for upload_id, key in self.journal.all("SELECT upload_id, key FROM multipart"):
            try:
                await self.store.abort_multipart(key, upload_id)
            except StoreError as exc:
                log.warning("could not abort interrupted upload of %s (%s); will retry at next start", key, exc)
                continue
            self.journal.execute("DELETE FROM multipart WHERE upload_id=?", (upload_id,))
            log.info("aborted multipart upload of %s interrupted by a restart", key)

    # ---- scheduling ---------------------------------------------------------------------

    def _schedule(self, nursery: trio.Nursery) -> None:
        now = time.time()
        view = PendingView(durable_through_gen=self.ns.gen)
        candidates: list[tuple[Attr, str]] = []
        pending_seqs: set[int] = set()
        rows = list(self.journal.all(
            "SELECT id FROM inodes WHERE durable=0 AND nlink>0 "
            "ORDER BY ready_seq IS NULL, ready_seq LIMIT ?", (SCAN_LIMIT,)))
        for (ino,) in rows:
            try:
                attr = self.ns.getattr(ino)
            except Exception:
                continue
            path = self.ns.path_of(ino)
            if ino == ROOT_INODE or path is None:
                self._mark_durable(attr)
                continue
            kind = self._classify(attr, path, now)
            self._count(view, attr, kind, now)
            if kind in ("queued", "waiting", "uploading") and not attr.is_dir:
                pending_seqs.add(attr.ready_seq)
            if kind == "queued":
                candidates.append((attr, path))
        view.stale_objects = self._schedule_deletes(nursery, now)
        self.view = view
        self._set_pending(pending_seqs | {s for s in self._active_seqs()})
        for attr, path in candidates:
            self._start(nursery, attr, path, now)

    def _classify(self, attr: Attr, path: str, now: float) -> str:
        if attr.id in self.busy_inodes:
            return "uploading"
        if attr.ready_seq is None or self.ns.writers(attr.id) > 0:
            return "dirty"
        if self.is_held(path) and now - attr.changed_at < self.config.hold_limit_s:
            return "held"
        if now - attr.changed_at < self.config.drain_delay_s:
            return "waiting"
        return "queued"

    def _count(self, view: PendingView, attr: Attr, kind: str, now: float) -> None:
        if kind == "held":
            view.held_files += int(not attr.is_dir)
            return
        view.durable_through_gen = min(view.durable_through_gen, attr.changed_gen - 1)
        if attr.is_dir:
            return
        if kind == "dirty":
            view.dirty_files += 1
            view.dirty_bytes += attr.size
        elif kind == "uploading":
            view.uploading_files += 1
            view.dirty_bytes += attr.size
        else:
            view.queued_files += 1
            view.dirty_bytes += attr.size
        if view.oldest_pending_at is None or attr.changed_at < view.oldest_pending_at:
            view.oldest_pending_at = attr.changed_at

    def is_held(self, path: str) -> bool:
        """Whether any component of `path` is a temporary name (config.hold_patterns)."""
        return any(fnmatch.fnmatchcase(part, pattern)
                   for part in path.split("/") for pattern in self.config.hold_patterns)

    def _start(self, nursery: trio.Nursery, attr: Attr, path: str, now: float) -> None:
        key = path + "/" if attr.is_dir else path
        if self.not_before.get(attr.id, 0) > now or key in self.busy_keys:
            return
        self.busy_inodes[attr.id] = "uploading"
        self.busy_keys.add(key)
        nursery.start_soon(self._sync_inode, attr, key, attr.id)

    def _active_seqs(self) -> set[int]:
        seqs = set()
        for ino in self.busy_inodes:
            row = self.journal.one("SELECT ready_seq FROM inodes WHERE id=?", (ino,))
            if row and row[0] is not None and not stat.S_ISDIR(self.ns.getattr(ino).mode):
                seqs.add(row[0])
        return seqs

    def _set_pending(self, seqs: set[int]) -> None:
        self._pending_seqs = seqs
        self._min_pending = min(seqs, default=None)
        self._turn_changed.set()
        self._turn_changed = trio.Event()

    async def _wait_turn(self, seq: int | None) -> None:
        """Block until every pending file before `seq` in the commit order is visible."""
        if seq is None:
            return
        while self._min_pending is not None and self._min_pending < seq:
            await self._turn_changed.wait()

    def _done_with_seq(self, seq: int | None) -> None:
        if seq is not None and seq in self._pending_seqs:
            self._set_pending(self._pending_seqs - {seq})

    # ---- one inode ----------------------------------------------------------------------

    async def _sync_inode(self, attr: Attr, key: str, ino: int) -> None:
        try:
            if attr.is_dir:
                await self._sync_directory(attr, key)
            else:
                await self._sync_file(attr, key)
            self.failures.pop(ino, None)
            self.not_before.pop(ino, None)
        except Superseded as exc:
            log.debug("%s: %s; will retry", key, exc)
        except StoreError as exc:
            self._record_failure(ino, f"{key}: {exc}")
        except (OSError, EOFError) as exc:
            self._record_failure(ino, f"{key}: reading the cache file failed: {exc}")
        finally:
            self.busy_inodes.pop(ino, None)
            self.busy_keys.discard(key)
            self.wake()

    def _record_failure(self, what: object, message: str) -> None:
        count = self.failures.get(what, 0) + 1
        self.failures[what] = count
        delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** count) * random.uniform(0.5, 1.0)
        self.not_before[what] = time.time() + delay
        self.counters.errors += 1
        self.counters.last_error = message
        self.counters.last_error_at = time.time()
        log.warning("drain: %s (attempt %d, retrying in %.1fs)", message, count, delay)

    def _token(self, ino: int) -> tuple[int, int]:
        """Changes whenever the inode's content or name changes."""
        row = self.journal.one("SELECT changed_gen FROM inodes WHERE id=?", (ino,))
        if row is None:
            raise Superseded("removed")
        return row[0], self.ns.version(ino)

    def _objects_of(self, ino: int) -> list[str]:
        return [r[0] for r in self.journal.all("SELECT key FROM objects WHERE inode=?", (ino,))]

    async def _sync_directory(self, attr: Attr, key: str) -> None:
        token = self._token(attr.id)
        have = self._objects_of(attr.id)
        want_marker = not self.ns.has_children(attr.id) and not self.is_held(key[:-1])
        if want_marker and key not in have:
            await self.store.put_object(key, b"", self._metadata(attr, "", "dir"))
            self._record_object(key, attr.id, 0, "", "")
        with self.journal.transaction():
            keep = (key,) if want_marker else ()
            for old in have:
                if old not in keep:
                    self.journal.execute("UPDATE objects SET inode=NULL WHERE key=?", (old,))
        self._finish(attr.id, token, None)

    async def _sync_file(self, attr: Attr, key: str) -> None:
        token = self._token(attr.id)
        have = self._objects_of(attr.id)
        seq = attr.ready_seq
        try:
            await self._publish_file(attr, key, token, have)
        except Superseded:
            self._done_with_seq(seq)  # it has a new place in the order, or none while written
            raise
        self._orphan_other_keys(attr.id, key)
        self._finish(attr.id, token, attr)
        self._done_with_seq(seq)

    async def _publish_file(self, attr: Attr, key: str, token, have: list[str]) -> None:
        seq = attr.ready_seq
        if not attr.content_dirty and key in have:
            return
        elif not attr.content_dirty and have:
            await self._wait_turn(seq)
            self._check_token(attr.id, token)
            await self._retrying(f"copy {have[0]} -> {key}", lambda: self.store.copy_object(have[0], key))
            self._record_object(key, attr.id, attr.size, attr.digest or "", "")
            self.counters.copied_files += 1
        elif stat.S_ISLNK(attr.mode):
            await self._upload_small(attr, key, token, attr.target or b"", "symlink")
        else:
            await self._upload_file(attr, key, token)

    def _check_token(self, ino: int, token: tuple[int, int]) -> None:
        if self._token(ino) != token:
            raise Superseded("changed during upload")

    async def _upload_file(self, attr: Attr, key: str, token: tuple[int, int]) -> None:
        path = str(self.cache.path(attr.id))
        size = attr.size
        digest = await trio.to_thread.run_sync(digests.file_digest, path, size)
        self._check_token(attr.id, token)
        metadata = self._metadata(attr, digest, "file")
        if size <= self.config.part_size_bytes:
            # Wait for the turn before taking a slot: a slot held while waiting could starve the
            # parts of an earlier multipart upload (deadlock).
            await self._wait_turn(attr.ready_seq)
            async with self.part_limiter:
                body = await trio.to_thread.run_sync(digests.read_range, path, 0, size)
                self._check_token(attr.id, token)
                etag = await self._retrying(f"PUT {key}", lambda: self.store.put_object(key, body, metadata))
        else:
            etag = await self._upload_multipart(attr, key, token, path, size, metadata)
        self._record_object(key, attr.id, size, digest, etag)
        self._set_digest(attr.id, token, digest)
        self._count_upload(size)

    async def _upload_small(self, attr: Attr, key: str, token, body: bytes, kind: str) -> None:
        digest = digests.bytes_digest(body)
        await self._wait_turn(attr.ready_seq)
        self._check_token(attr.id, token)
        etag = await self.store.put_object(key, body, self._metadata(attr, digest, kind))
        self._record_object(key, attr.id, len(body), digest, etag)
        self._set_digest(attr.id, token, digest)
        self._count_upload(len(body))

    async def _upload_multipart(self, attr: Attr, key: str, token, path: str, size: int, metadata) -> str:
        upload_id = await self.store.create_multipart(key, metadata)
        self.journal.execute("INSERT OR REPLACE INTO multipart VALUES (?, ?)", (upload_id, key))
        completed = False
        try:
            part_size = self.config.part_size_bytes
            count = (size + part_size - 1) // part_size
            parts: list[dict | None] = [None] * count
            async with trio.open_nursery() as nursery:
                for number in range(1, count + 1):
                    offset = (number - 1) * part_size
                    nursery.start_soon(self._upload_part, attr.id, token, key, upload_id, path, number, offset,
                                       min(part_size, size - offset), parts)
            self._check_token(attr.id, token)
            await self._wait_turn(attr.ready_seq)
            self._check_token(attr.id, token)
            etag = await self._retrying(f"complete {key}",
                                        lambda: self.store.complete_multipart(key, upload_id, parts))
            completed = True
            await self._abort_strays(key, upload_id)
            return etag
        finally:
            if not completed:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(10):
                        try:
                            await self.store.abort_multipart(key, upload_id)
                        except StoreError as exc:
                            log.warning("abort of %s failed (%s); retried at next start", key, exc)
                            completed = None
            if completed is not None:
                self.journal.execute("DELETE FROM multipart WHERE upload_id=?", (upload_id,))

    async def _abort_strays(self, key: str, keep: str) -> None:
        """Abort other incomplete uploads of `key`: ones whose CreateMultipartUpload answer was lost
        to a reset, or whose abort failed. Best effort; the lifecycle rule is the backstop."""
        try:
            for upload_id in await self.store.list_multipart_uploads(key):
                if upload_id != keep:
                    await self.store.abort_multipart(key, upload_id)
                    self.journal.execute("DELETE FROM multipart WHERE upload_id=?", (upload_id,))
        except StoreError as exc:
            log.info("could not clean up stray uploads of %s: %s", key, exc)

    async def _upload_part(self, ino, token, key, upload_id, path, number, offset, length, parts) -> None:
        async with self.part_limiter:
            self._check_token(ino, token)
            body = await trio.to_thread.run_sync(digests.read_range, path, offset, length)
            parts[number - 1] = await self._retrying(
                f"part {number} of {key}", lambda: self.store.upload_part(key, upload_id, number, body))
            self._count_rate(length)

    async def _retrying(self, what: str, call):
        """Retry one request on transient errors (parts are retried individually)."""
        for attempt in range(1, PART_ATTEMPTS + 1):
            try:
                return await call()
            except StoreError as exc:
                if not exc.transient or attempt == PART_ATTEMPTS:
                    raise
                self.counters.retries += 1
                delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** attempt) * random.uniform(0.5, 1.0)
                log.info("%s failed (%s); retry %d in %.1fs", what, exc, attempt, delay)
                await trio.sleep(delay)

    def _metadata(self, attr: Attr, digest: str, kind: str) -> dict[str, str]:
        return {
            METADATA_DIGEST: digest,
            METADATA_SIZE: str(attr.size),
            METADATA_MTIME: str(attr.mtime_ns),
            METADATA_MODE: oct(stat.S_IMODE(attr.mode)),
            METADATA_TYPE: kind,
        }

    # ---- journal updates ------------------------------------------------------------

    def _record_object(self, key: str, ino: int, size: int, digest: str, etag: str) -> None:
        """The bucket now holds `key`; it belongs to `ino` only if `ino` still lives under that key."""
        live = self.ns.path_of(ino) is not None
        self.journal.execute(
            "INSERT OR REPLACE INTO objects (key, inode, size, digest, etag) VALUES (?, ?, ?, ?, ?)",
            (key, ino if live else None, size, digest, etag),
        )
        self.counters.last_published_at = time.time()

    def _orphan_other_keys(self, ino: int, key: str) -> None:
        self.journal.execute("UPDATE objects SET inode=NULL WHERE inode=? AND key<>?", (ino, key))

    def _set_digest(self, ino: int, token, digest: str) -> None:
        if self._token(ino) == token:
            self.journal.execute("UPDATE inodes SET digest=?, content_dirty=0 WHERE id=?", (digest, ino))

    def _finish(self, ino: int, token: tuple[int, int], attr: Attr | None) -> None:
        """Mark durable unless the inode changed meanwhile (then it stays pending)."""
        cur = self.journal.execute(
            "UPDATE inodes SET durable=1 WHERE id=? AND changed_gen=? AND nlink>0", (ino, token[0]))
        if cur.rowcount and self.ns.version(ino) == token[1]:
            if attr is not None:
                self.counters.newest_durable_change_at = max(
                    self.counters.newest_durable_change_at or 0, attr.changed_at)
        elif cur.rowcount:
            self.journal.execute("UPDATE inodes SET durable=0 WHERE id=?", (ino,))

    def _mark_durable(self, attr: Attr) -> None:
        self.journal.execute("UPDATE inodes SET durable=1 WHERE id=?", (attr.id,))

    def _count_upload(self, size: int) -> None:
        self.counters.uploaded_bytes += size
        self.counters.uploaded_files += 1

    def _count_rate(self, size: int) -> None:
        now = time.monotonic()
        self._rate.append((now, size))
        while self._rate and self._rate[0][0] < now - RATE_WINDOW_S:
            self._rate.popleft()

    def drain_rate_bps(self) -> float:
        now = time.monotonic()
        return sum(n for t, n in self._rate if t >= now - RATE_WINDOW_S) / RATE_WINDOW_S

    # ---- stale objects ---------------------------------------------------------------

    def _schedule_deletes(self, nursery: trio.Nursery, now: float) -> int:
        stale = self.journal.all("SELECT key FROM objects WHERE inode IS NULL LIMIT ?", (SCAN_LIMIT,))
        waiting = 0
        for (key,) in stale:
            if self._key_wanted(key):
                continue  # a live file will overwrite it; until then it shows the previous content
            waiting += 1
            if key in self.busy_keys or self.not_before.get(key, 0) > now:
                continue
            self.busy_keys.add(key)
            nursery.start_soon(self._delete_stale, key)
        return waiting

    def _key_wanted(self, key: str) -> bool:
        ino = self.ns.resolve(key.rstrip("/"))
        if ino is None:
            return False
        attr = self.ns.getattr(ino)
        if key.endswith("/"):
            return attr.is_dir and not self.ns.has_children(ino)
        return not attr.is_dir

    async def _delete_stale(self, key: str) -> None:
        try:
            await self.store.delete_object(key)
            self.journal.execute("DELETE FROM objects WHERE key=? AND inode IS NULL", (key,))
            self.counters.deleted_objects += 1
            self.failures.pop(key, None)
        except NoSuchKey:
            self.journal.execute("DELETE FROM objects WHERE key=? AND inode IS NULL", (key,))
        except StoreError as exc:
            self._record_failure(key, f"delete {key}: {exc}")
        finally:
            self.busy_keys.discard(key)
            self.wake()
