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
import contextlib
import dataclasses
import fnmatch
import hashlib
import logging
import random
import re
import stat
import time
import uuid

import trio

from gateway import digest as digests
from gateway.cache import CacheFiles
from gateway.cluster import SingleNodeGate, marker_scope
from gateway.config import Config
from gateway.errors import NoSuchKey, StoreError
from gateway.journal import Journal
from gateway.namespace import INODE_COLUMNS, ROOT_INODE, Attr, Namespace
from gateway.priority import PriorityLimiter
from gateway.store import (
    PRIVATE_DIR, METADATA_DIGEST, METADATA_MODE, METADATA_MTIME, METADATA_SIZE, METADATA_TYPE, Store,
)

log = logging.getLogger(__name__)

PART_ATTEMPTS = 8
BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 30.0
SCAN_LIMIT = 4096
RATE_WINDOW_S = 10.0
COALESCE_S = 0.02
STARTUP_CLEANUP_S = 30.0
VIEW_MAX_AGE_S = 0.1


def multipart_etag(parts: list[dict]) -> str:
    """The ETag S3 gives a completed multipart object: md5 of the parts' md5s, dash, part count."""
    digest = hashlib.md5(b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in parts))
    return f'"{digest.hexdigest()}-{len(parts)}"'


class Superseded(Exception):
    """The file changed, moved or vanished while it was being uploaded; try again later."""


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


@dataclasses.dataclass
class DrainCounters:
    uploaded_bytes: int = 0
    uploaded_files: int = 0
    copied_files: int = 0
    digest_passes: int = 0    # uploads whose digest needed a re-read of the file
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
        self.part_limiter = PriorityLimiter(config.upload_concurrency)  # earliest commit position first
        self.busy_inodes: dict[int, str] = {}   # inode -> "file" | "dir" while its job runs
        self.max_files_in_flight = max(2, config.upload_concurrency)
        self.busy_keys: set[str] = set()       # keys a running job writes, copies from or deletes
        self.claims: dict[int, set[str]] = {}  # inode -> the keys its job claimed
        self.not_before: dict[object, float] = {}  # backoff per inode or stale key
        self.failures: dict[object, int] = {}
        self.counters = DrainCounters()
        self._view: PendingView | None = None
        self._view_at = 0.0
        self._hold_re = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in config.hold_patterns) or "(?!)")
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
        self._min_pending: int | None = None
        self._turn_changed = trio.Event()
        self._wake = trio.Event()
        self._stopping = False
        self.started_at = time.time()
        self.gate = SingleNodeGate()  # gateway.cluster.CommitGate: may a commit marker publish?
        ns.on_change = self.wake

    # ---- service ------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()  # the mount is ready; the clean-up below never holds it up
            with trio.move_on_after(STARTUP_CLEANUP_S):
                await self._abort_interrupted_multiparts()  # before any upload of ours exists
            while not self._stopping:
                self._wake = trio.Event()
                self._schedule(nursery)
                with trio.move_on_after(self._tick_s()):
                    await self._wake.wait()
                await trio.sleep(COALESCE_S)  # one pass serves a burst of changes (creates, closes)
            nursery.cancel_scope.cancel()

    def _tick_s(self) -> float:
        return max(0.05, min(0.5, self.config.drain_delay_s / 2))

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing drainable is pending; False on timeout."""
        with trio.move_on_after(timeout_s):
            while True:
                self.wake()
                v = self.refresh_view()
                if v.dirty_files + v.queued_files + v.uploading_files + v.stale_objects == 0 and not self.busy_inodes:
                    return True
                await trio.sleep(0.1)
        return False

    async def _abort_interrupted_multiparts(self) -> None:
        """Multipart uploads begun before a crash are aborted; their files are still pending.

        Those whose ids reached the journal are aborted by id. An upload the dead daemon began
        but had not journaled yet (killed between the answer and the insert) is found by listing:
        uploads of keys this gateway owns that were initiated before this start.
        """
        await self._abort_journaled_uploads()
        await self._abort_unjournaled_uploads()

    async def _abort_unjournaled_uploads(self) -> None:
        try:
            uploads = await self.store.incomplete_uploads()
        except StoreError as exc:
            log.info("could not list incomplete uploads (%s); the lifecycle rule cleans them up", exc)
            return
        for upload in uploads:
            key = self.store.relative_key(upload["Key"])
            initiated = upload.get("Initiated")
            if initiated is not None and initiated.timestamp() > self.started_at:
                continue  # begun by this daemon (or another node) after we started
            if not self._owned_key(key):
                continue  # not ours: another node may be uploading it
            if self.journal.one("SELECT 1 FROM multipart WHERE upload_id=?", (upload["UploadId"],)):
                continue  # begun by this daemon (some servers report no useful Initiated time)
            try:
                await self.store.abort_multipart(key, upload["UploadId"])
                log.info("aborted an unjournaled multipart upload of %s left by a crash", key)
            except StoreError as exc:
                log.info("could not abort an old upload of %s: %s", key, exc)

    def _owned_key(self, key: str) -> bool:
        ino = self.ns.resolve(key)
        if ino is not None and not self.ns.getattr(ino).is_dir:
            return True
        return self.journal.one("SELECT 1 FROM objects WHERE key=?", (key,)) is not None

    async def _abort_journaled_uploads(self) -> None:
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
        """Start every due inode: ready, closed, quiet for the drain delay, not held, not backing off.

        One query returns only what is due, in commit order, so a pass costs what it starts, not
        what is pending (a burst of thousands of new files stays cheap).
        """
        now = time.time()
        self._update_gate()
        rows = self.journal.all(
            f"SELECT {INODE_COLUMNS} FROM inodes WHERE durable=0 AND nlink>0 AND ready_seq IS NOT NULL "
            "AND changed_at <= ? ORDER BY ready_seq LIMIT ?", (now - self.config.drain_delay_s, SCAN_LIMIT))
        files_active = sum(1 for kind in self.busy_inodes.values() if kind == "file")
        for row in rows:
            attr = Attr(*row)
            if attr.id in self.busy_inodes or self.ns.writers(attr.id) > 0:
                continue
            path = self.ns.path_of(attr.id)
            if attr.id == ROOT_INODE or path is None:
                self._mark_durable(attr)
                continue
            if self.held(path, attr.changed_at, now):
                self._release_old_names(attr)
                continue
            # A bounded window of files in flight, earliest first; the file whose turn it is always
            # starts, so a full window of later files can never wait on it forever.
            if not attr.is_dir and files_active >= self.max_files_in_flight and attr.ready_seq != self._min_pending:
                continue
            if self._start(nursery, attr, path, now) and not attr.is_dir:
                files_active += 1
        self._schedule_deletes(nursery, now)

    def _release_old_names(self, attr: Attr) -> None:
        """A published file or directory renamed to a temporary name: its objects under the old
        name go (the name no longer exists). A file's content is re-uploaded from the cache when it
        gets a final name again, so a file known only from the bucket keeps its object meanwhile."""
        if attr.is_dir or attr.cached:
            self.journal.execute("UPDATE objects SET inode=NULL WHERE inode=?", (attr.id,))

    def held(self, path: str, changed_at: float, now: float) -> bool:
        """Whether the drain holds this path back now: a temporary name within the hold limit."""
        return self.is_held(path) and now - changed_at < self.config.hold_limit_s

    def is_held(self, path: str) -> bool:
        """Whether any component of `path` is a temporary name (config.hold_patterns)."""
        return any(self._hold_re.match(part) for part in path.split("/"))

    def _start(self, nursery: trio.Nursery, attr: Attr, path: str, now: float) -> bool:
        """Start the inode's job if it can claim its key and every key it may copy from."""
        key = path + "/" if attr.is_dir else path
        claim = {key, *self._objects_of(attr.id)}
        if self.not_before.get(attr.id, 0) > now or claim & self.busy_keys:
            return False
        self.busy_inodes[attr.id] = "dir" if attr.is_dir else "file"
        self.busy_keys |= claim
        self.claims[attr.id] = claim
        nursery.start_soon(self._sync_inode, attr, key, attr.id)
        return True

    # ---- commit order -------------------------------------------------------------------

    def _update_gate(self) -> None:
        """The earliest place in the commit order that is still pending (the turn), and wake waiters.

        Pending: a ready file (not a directory) that is not durable, has no writer and is not held.
        """
        now = time.time()
        earliest = None
        cursor = self.journal.execute(
            "SELECT id, ready_seq, mode, changed_at FROM inodes WHERE durable=0 AND nlink>0 "
            "AND ready_seq IS NOT NULL ORDER BY ready_seq")
        for ino, seq, mode, changed_at in cursor:
            if stat.S_ISDIR(mode) or self.ns.writers(ino) > 0:
                continue
            path = self.ns.path_of(ino)
            if path is None or self.held(path, changed_at, now):
                continue
            earliest = seq
            break
        cursor.close()
        if earliest != self._min_pending:
            self._min_pending = earliest
            self._turn_changed.set()
            self._turn_changed = trio.Event()

    async def _wait_publish(self, seq: int | None, key: str) -> None:
        """The turn (commit order), then, for a commit marker, the gate (every node's files durable)."""
        await self._wait_turn(seq)
        scope = marker_scope(key)
        while scope is not None and not self.gate.may_publish(scope, key):
            await trio.sleep(0.05)

    async def _wait_turn(self, seq: int | None) -> None:
        """Block until every pending file before `seq` in the commit order is visible."""
        if seq is None:
            return
        while self._min_pending is not None and self._min_pending < seq:
            await self._turn_changed.wait()

    # ---- what is pending, for status and `wait` -----------------------------------------

    @property
    def view(self) -> PendingView:
        if self._view is None or time.monotonic() - self._view_at > VIEW_MAX_AGE_S:
            return self.refresh_view()
        return self._view

    def refresh_view(self) -> PendingView:
        now = time.time()
        view = PendingView(durable_through_gen=self.ns.gen)
        for row in self.journal.all(f"SELECT {INODE_COLUMNS} FROM inodes WHERE durable=0 AND nlink>0"):
            attr = Attr(*row)
            path = self.ns.path_of(attr.id)
            if attr.id == ROOT_INODE or path is None:
                continue
            self._count(view, attr, self._classify(attr, path, now))
        view.stale_objects = sum(1 for (key,) in self.journal.all("SELECT key FROM objects WHERE inode IS NULL")
                                 if not self._key_wanted(key))
        self._view, self._view_at = view, time.monotonic()
        return view

    def _classify(self, attr: Attr, path: str, now: float) -> str:
        if attr.id in self.busy_inodes:
            return "uploading"
        if attr.ready_seq is None or self.ns.writers(attr.id) > 0:
            return "dirty"
        if self.held(path, attr.changed_at, now):
            return "held"
        return "queued"

    def _count(self, view: PendingView, attr: Attr, kind: str) -> None:
        if kind == "held":
            view.held_files += int(not attr.is_dir)
            return
        view.durable_through_gen = min(view.durable_through_gen, attr.changed_gen - 1)
        if attr.is_dir:
            return
        size = self.ns.getattr(attr.id).size if kind == "dirty" else attr.size
        view.dirty_bytes += size
        if kind == "dirty":
            view.dirty_files += 1
        elif kind == "uploading":
            view.uploading_files += 1
        else:
            view.queued_files += 1
        if view.oldest_pending_at is None or attr.changed_at < view.oldest_pending_at:
            view.oldest_pending_at = attr.changed_at

    # ---- one inode ----------------------------------------------------------------------

    async def _sync_inode(self, attr: Attr, key: str, ino: int) -> None:
        try:
            attr = self._recheck(attr, key)  # the scheduler's row may be older than this task
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
        except Exception as exc:  # a bug must not end the drain (and with it the mount)
            log.exception("drain: unexpected error syncing %s", key)
            self._record_failure(ino, f"{key}: internal error: {exc!r}")
        finally:
            self.busy_inodes.pop(ino, None)
            self.busy_keys -= self.claims.pop(ino, set())
            self._update_gate()  # durable now, or moved/changed: the turn may pass to later files
            self.wake()

    def _recheck(self, attr: Attr, key: str) -> Attr:
        fresh = self.ns.getattr(attr.id)
        path = self.ns.path_of(attr.id)
        if (fresh.durable or fresh.nlink == 0 or fresh.ready_seq is None or self.ns.writers(attr.id) > 0
                or path is None or (path + "/" if fresh.is_dir else path) != key):
            raise Superseded("changed before its upload started")
        return fresh

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
        await self._publish_file(attr, key, token, have)
        self._orphan_other_keys(attr.id, key)
        self._finish(attr.id, token, attr)

    async def _publish_file(self, attr: Attr, key: str, token, have: list[str]) -> None:
        seq = attr.ready_seq
        if not attr.content_dirty and key in have:
            return
        elif not attr.content_dirty and have:
            await self._wait_publish(seq, key)
            self._check_token(attr.id, token)
            await self._rescue_displaced(key, attr.id)
            await self._retrying(f"copy {have[0]} -> {key}", lambda: self.store.copy_object(have[0], key))
            self._record_object(key, attr.id, attr.size, attr.digest or "", "")
            self.counters.copied_files += 1
        elif stat.S_ISLNK(attr.mode):
            await self._upload_small(attr, key, token, attr.target or b"", "symlink")
        else:
            await self._upload_file(attr, key, token)

    async def _rescue_displaced(self, key: str, ino: int) -> None:
        """Before `key` is overwritten: if it holds the published content of another live file
        (names were swapped), copy that to a private stash key, which that file's job copies from."""
        row = self.journal.one(
            "SELECT o.inode, o.size, o.digest FROM objects o JOIN inodes i ON i.id = o.inode "
            "WHERE o.key=? AND o.inode<>? AND i.nlink>0 AND i.content_dirty=0", (key, ino))
        if row is None or self.ns.path_of(row[0]) is None:
            return
        other, size, digest = row
        stash = f"{PRIVATE_DIR}/stash/{other}-{uuid.uuid4().hex[:12]}"
        await self._retrying(f"stash {key}", lambda: self.store.copy_object(key, stash))
        with self.journal.transaction():
            self.journal.execute("INSERT OR REPLACE INTO objects (key, inode, size, digest, etag) "
                                 "VALUES (?, ?, ?, ?, '')", (stash, other, size, digest))
            self.journal.execute("UPDATE objects SET inode=NULL WHERE key=?", (key,))
        log.info("%s held the content of another file (names swapped); kept it at %s", key, stash)

    def _check_token(self, ino: int, token: tuple[int, int]) -> None:
        if self._token(ino) != token:
            raise Superseded("changed during upload")

    async def _upload_file(self, attr: Attr, key: str, token: tuple[int, int]) -> None:
        path = str(self.cache.path(attr.id))
        size = attr.size
        digest = self.ns.written_digest(attr.id, size)  # hashed while it was written
        if digest is None:
            digest = await trio.to_thread.run_sync(digests.file_digest, path, size)
            self.counters.digest_passes += 1
        self._check_token(attr.id, token)
        metadata = self._metadata(attr, digest, "file")
        if size <= self.config.part_size_bytes:
            # Wait for the turn before taking a slot: a slot held while waiting could starve the
            # parts of an earlier multipart upload (deadlock).
            await self._wait_publish(attr.ready_seq, key)
            await self._rescue_displaced(key, attr.id)
            async with self.part_limiter.slot((attr.ready_seq or 0, 0)):
                body, crc, sha = await trio.to_thread.run_sync(digests.read_range_sums, path, 0, size)
                self._check_token(attr.id, token)
                etag = await self._retrying(f"PUT {key}",
                                            lambda: self.store.put_object(key, body, metadata, crc, sha))
        else:
            etag = await self._upload_multipart(attr, key, token, path, size, metadata)
        self._record_object(key, attr.id, size, digest, etag)
        self._set_digest(attr.id, token, digest)
        self._count_upload(size)

    async def _upload_small(self, attr: Attr, key: str, token, body: bytes, kind: str) -> None:
        digest = digests.bytes_digest(body)
        await self._wait_publish(attr.ready_seq, key)
        self._check_token(attr.id, token)
        await self._rescue_displaced(key, attr.id)
        etag = await self.store.put_object(key, body, self._metadata(attr, digest, kind))
        self._record_object(key, attr.id, len(body), digest, etag)
        self._set_digest(attr.id, token, digest)
        self._count_upload(len(body))

    async def _upload_multipart(self, attr: Attr, key: str, token, path: str, size: int, metadata) -> str:
        started = time.monotonic()
        upload_id = await self.store.create_multipart(key, metadata)
        self.journal.execute("INSERT OR REPLACE INTO multipart VALUES (?, ?)", (upload_id, key))
        completed = False
        try:
            part_size = self.config.part_size_bytes
            count = (size + part_size - 1) // part_size
            parts: list[dict | None] = [None] * count
            async with open_task_group() as nursery:
                for number in range(1, count + 1):
                    offset = (number - 1) * part_size
                    nursery.start_soon(self._upload_part, attr.id, attr.ready_seq, token, key, upload_id, path,
                                       number, offset,
                                       min(part_size, size - offset), parts)
            parts_done = time.monotonic()
            self._check_token(attr.id, token)
            await self._wait_publish(attr.ready_seq, key)
            self._check_token(attr.id, token)
            await self._rescue_displaced(key, attr.id)
            turn = time.monotonic()
            etag = await self._complete(key, upload_id, parts)
            completed = True
            log.info("uploaded %s: %d bytes in %d parts; parts %.2fs, turn %.2fs, complete %.2fs", key, size,
                     count, parts_done - started, turn - parts_done, time.monotonic() - turn)
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
        """Abort other incomplete uploads of `key`: ones whose CreateMultipartUpload answer was lost
        to a reset, or whose abort failed. Best effort; the lifecycle rule is the backstop."""
        try:
            for upload_id in await self.store.list_multipart_uploads(key):
                if upload_id != keep:
                    await self.store.abort_multipart(key, upload_id)
                    self.journal.execute("DELETE FROM multipart WHERE upload_id=?", (upload_id,))
        except StoreError as exc:
            log.info("could not clean up stray uploads of %s: %s", key, exc)

    async def _upload_part(self, ino, seq, token, key, upload_id, path, number, offset, length, parts) -> None:
        async with self.part_limiter.slot((seq or 0, number)):
            self._check_token(ino, token)
            body, crc, sha = await trio.to_thread.run_sync(digests.read_range_sums, path, offset, length)
            parts[number - 1] = await self._retrying(
                f"part {number} of {key}", lambda: self.store.upload_part(key, upload_id, number, body, crc, sha))
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
        if self.ns.version(ino) != token[1]:
            return
        cur = self.journal.execute(
            "UPDATE inodes SET durable=1 WHERE id=? AND changed_gen=? AND nlink>0", (ino, token[0]))
        if cur.rowcount and attr is not None:
            self.counters.newest_durable_change_at = max(
                self.counters.newest_durable_change_at or 0, attr.changed_at)

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

    def _schedule_deletes(self, nursery: trio.Nursery, now: float) -> None:
        stale = self.journal.all("SELECT key FROM objects WHERE inode IS NULL LIMIT ?", (SCAN_LIMIT,))
        for (key,) in stale:
            if key in self.busy_keys or self.not_before.get(key, 0) > now:
                continue
            if self._key_wanted(key):
                continue  # a live file will overwrite it; until then it shows the previous content
            self.busy_keys.add(key)
            nursery.start_soon(self._delete_stale, key)

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
        except Exception as exc:  # never end the drain
            log.exception("drain: unexpected error deleting %s", key)
            self._record_failure(key, f"delete {key}: internal error: {exc!r}")
        finally:
            self.busy_keys.discard(key)
            self.wake()
