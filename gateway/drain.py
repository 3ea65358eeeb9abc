"""The drain: makes the bucket equal the namespace, checkpoint by checkpoint, and survives crashes.

Each pass reads the journal's pending inodes (not durable, gateway/file_state.py) into `scheduler.Row`s,
asks the scheduler (a pure function, gateway/scheduler.py) what to start, and starts one job per inode
(it is `uploading` until the job ends):
- a regular file or symlink is uploaded, or server-side copied if only its name changed
  (gateway/publisher.py); a commit marker is started only once its scope is durable;
- a directory gets a `dir/` marker while it is empty;
- a stale object (gateway/objects.py) is deleted unless a live name maps to it, markers first.
A name removed while its job runs cancels the job (queued requests dropped, multipart aborted).
The journal records each result; an interrupted upload is replayed after restart. Failures retry
with exponential backoff and jitter, forever: nothing pending is ever dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import stat
import time
from typing import Protocol

import trio

from gateway import digest as digests
from gateway import scheduler
from gateway.cache import CacheFiles
from gateway.config import Config
from gateway.drain_status import DrainCounters, PendingView, pending_view
from gateway.errors import JournalError, NoSuchKey, StoreError
from gateway.file_state import HELD, PENDING_SQL, QUEUED, UPLOADING
from gateway.journal import Journal
from gateway.namespace import ROOT_INODE, Attr, Namespace
from gateway.objects import ObjectBook
from gateway.publisher import Publisher, Superseded
from gateway.retry import backoff_s
from gateway.scopes import ScopeRules
from gateway.staging import Staging
from gateway.store import METADATA_DIGEST, METADATA_MODE, METADATA_MTIME, METADATA_SIZE, METADATA_TYPE, Store

log = logging.getLogger(__name__)

SCAN_LIMIT = 4096
RATE_WINDOW_S = 10.0
COALESCE_S = 0.02
PASS_SHARE = 0.2          # a pass may take at most this share of the loop's time
TICK_S = 0.5              # the longest wait between passes (retries, anything time-based not tracked)
STARTUP_CLEANUP_S = 30.0
VIEW_MAX_AGE_S = 0.1
WAIT_RECHECK_S = 0.1  # a durability waiter rereads the pending rows at most this often while jobs run
OLD_SCOPE_GRACE_S = 3.0   # an older checkpoint retention keeps this long is uploaded, too
LAST: scheduler.Priority = (3, 0, 0)
KEEP_XATTR = b"user.ckptfs.keep"
LINEAGE_CACHE_MAX = 100_000


class CommitGate(Protocol):
    """Decides whether a marker may publish once this node's files of its scope are durable.

    gateway/cluster.py implements it across nodes; a single node's gate is always open.
    """

    def may_publish(self, scope: str, marker: str) -> bool: ...

    def scope_state(self, scope: str) -> dict: ...

    def note_durable(self) -> None:
        """A file of this node just became durable (sync, no I/O): answers may be due."""

    async def read_removals(self) -> None:
        """Apply the directory removals other nodes have recorded by now (StoreError if the bucket
        cannot tell)."""


class OpenGate:
    wake = staticmethod(lambda: None)

    def may_publish(self, scope: str, marker: str) -> bool:
        return True

    async def read_removals(self) -> None:
        pass

    def note_durable(self) -> None:
        pass

    def scope_state(self, scope: str) -> dict:
        return {}


@dataclasses.dataclass
class Selection:
    """The scheduler's state carried between passes (gateway/scheduler.py, rule 2)."""

    selected: int | None = None
    started: bool = False        # a job of the selected scope was started: it keeps its rank
    prefer_old: bool = False
    newest_durable_seq: int | None = None
    superseded_since: dict[int, float] = dataclasses.field(default_factory=dict)
    last_plan: scheduler.Plan | None = None


class Drain:
    """A trio service: `await nursery.start(drain.run)`, `drain.stop()`, `await drain.wait_idle()`."""

    def __init__(self, ns: Namespace, cache: CacheFiles, store: Store, journal: Journal, config: Config,
                 gate: CommitGate | None = None):
        self.ns = ns
        self.cache = cache
        self.store = store
        self.journal = journal
        self.config = config
        self.rules = ScopeRules(config.marker_patterns, config.pointer_patterns, config.hold_patterns)
        self.book = ObjectBook(journal, ns)
        self.counters = DrainCounters()
        self.publisher = Publisher(store, journal, self.book, config, self._count_retry, self._count_rate)
        self.gate: CommitGate = gate or OpenGate()
        self.staging: Staging | None = None  # several nodes: files under another node's temporary directory
        self.gate.wake = self.wake  # type: ignore[attr-defined]
        self.max_jobs = config.put_concurrency + 2 * config.upload_concurrency
        self.jobs: dict[int, trio.CancelScope] = {}   # inode -> its running job
        self.busy_keys: set[str] = set()              # keys a running job writes, copies from or deletes
        self.claims: dict[int, set[str]] = {}         # inode -> the keys its job claimed
        self.deletes = trio.CapacityLimiter(config.put_concurrency)
        self.not_before: dict[object, float] = {}     # backoff per inode or stale key
        self.failures: dict[object, int] = {}
        self.selection = Selection()
        self.priority: dict[int, scheduler.Priority] = {}
        self._view: PendingView | None = None
        self._view_at = 0.0
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
        self._wake = trio.Event()
        self._sleep = trio.CancelScope()  # the wait between passes; a namespace change may shorten it
        self._due_wall = math.inf         # wall time the earliest pending row becomes startable
        self._changed_due = math.inf      # trio time a change made after this pass read its rows is due
        self._progress = trio.Event()     # set, and replaced, when durability may have advanced
        self._durable_waiters = 0
        self._stopping = False
        self._synced_changes = -1
        self._lineages: dict[tuple[int, int], tuple[str, tuple[int, ...], bool] | None] = {}
        self._lineages_at = -1
        self.started_at = time.time()
        ns.on_change = self.note_change
        ns.is_temporary = self.rules.is_held  # a rename into place does not restart the drain delay
        ns.on_removed = self.cancel

    # ---- service ------------------------------------------------------------------------

    def wake(self) -> None:
        """Pass now (coalesced): a job ended, an inode lost its name, a gate opened, a wait began."""
        self._wake.set()

    def note_change(self, delayed: bool = True) -> None:
        """A namespace change. What it makes startable waits out the drain delay from now, so the
        next pass need not come before that: a burst of creates costs one pass per drain delay,
        not one per file (each pass reads every pending row). `delayed=False` (a rename into
        place, which keeps the files' time of their last change): pass now."""
        try:
            due = trio.current_time() + (self.config.drain_delay_s if delayed else 0.0)
        except RuntimeError:  # outside the trio run (start-up, tests): just pass soon
            self.wake()
            return
        self._changed_due = min(self._changed_due, due)
        if due < self._sleep.deadline:
            self._sleep.deadline = due
        self._note_progress()  # an unlink or a rename may leave nothing pending

    def _note_progress(self) -> None:
        """Wake the durability waiters, if any (a namespace change calls this: nothing to do then)."""
        if self._durable_waiters:
            self._progress.set()
            self._progress = trio.Event()

    async def wait_durable(self, gen: int, timeout_s: float) -> int:
        """Wait until every change up to namespace generation `gen` is in the bucket, or for
        `timeout_s`; return the generation durable then. A waiter rereads the pending rows when a
        job, a delete or a namespace change ends: at once when no job is left running (the end of
        a drain), otherwise at most every WAIT_RECHECK_S (each reread scans every pending row)."""
        view = self.refresh_view()
        self._durable_waiters += 1
        try:
            with trio.move_on_after(timeout_s):
                while view.durable_through_gen < gen:
                    await self._progress.wait()
                    if self.jobs:
                        await trio.sleep(max(0.0, self._view_at + WAIT_RECHECK_S - time.monotonic()))
                    view = self.refresh_view()
        finally:
            self._durable_waiters -= 1
        return view.durable_through_gen

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def cancel(self, ino: int) -> None:
        """The inode lost its name: its upload is of no use any more (retention, rmtree)."""
        scope = self.jobs.get(ino)
        if scope is not None:
            scope.cancel()
        self.failures.pop(ino, None)
        self.not_before.pop(ino, None)
        self.wake()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()  # the mount is ready; the clean-up below never holds it up
            with trio.move_on_after(STARTUP_CLEANUP_S):
                await self._abort_interrupted_multiparts()  # before any upload of ours exists
            while not self._stopping:
                self._wake = trio.Event()
                began = time.monotonic()
                if self.journal.failed is None:  # failsafe: nothing more is sent (the mount is read-only)
                    self._schedule(nursery)
                    await self._schedule_deletes(nursery)
                else:
                    self._due_wall = math.inf  # nothing is due: look again at the tick
                spent = time.monotonic() - began
                self.counters.scheduler_passes += 1
                self.counters.scheduler_pass_s += spent
                deadline = min(trio.current_time() + self._wait_s(), self._changed_due)
                with trio.CancelScope(deadline=deadline) as self._sleep:
                    await self._wake.wait()
                # one pass serves a burst of changes; a costly pass leaves the loop room for FUSE
                await trio.sleep(max(COALESCE_S, spent * (1 - PASS_SHARE) / PASS_SHARE))
            nursery.cancel_scope.cancel()

    def _wait_s(self) -> float:
        """Until the next pass: when the earliest row the last pass skipped becomes startable (drain
        delay, hold limit, retry backoff, an old checkpoint's grace), at most TICK_S."""
        now = time.time()
        later = [*self.not_before.values(),  # stale keys' deletes retry too
                 *(t + OLD_SCOPE_GRACE_S for t in self.selection.superseded_since.values())]
        return max(0.0, min(TICK_S, self._due_wall - now, *[t - now for t in later if t > now]))

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing drainable is pending; False on timeout."""
        with trio.move_on_after(timeout_s):
            while True:
                self.wake()
                v = self.refresh_view()
                if v.dirty_files + v.queued_files + v.uploading_files + v.stale_objects == 0 and not self.jobs:
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
            if not self.book.owned(key):
                continue  # not ours: another node may be uploading it
            if self.journal.one("SELECT 1 FROM multipart WHERE upload_id=?", (upload["UploadId"],)):
                continue  # begun by this daemon (some servers report no useful Initiated time)
            try:
                await self.store.abort_multipart(key, upload["UploadId"])
                log.info("aborted an unjournaled multipart upload of %s left by a crash", key)
            except StoreError as exc:
                log.info("could not abort an old upload of %s: %s", key, exc)

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
        """One pass: the scheduler's plan, then its jobs and the stale objects' deletes."""
        now = time.time()
        rows = self._rows(now)
        sel = self.selection
        plan = scheduler.plan(
            rows, self._rename_scopes(), self.rules, selected=sel.selected, started=sel.started,
            prefer_old=sel.prefer_old,
            newest_durable_seq=sel.newest_durable_seq, old_ok=self._old_ok(now), pinned=self._pinned(),
            room=max(0, self.max_jobs - len(self.jobs)), gate=self.gate.may_publish,
            gate_renames=not isinstance(self.gate, OpenGate))
        self._remember(plan, now)
        for ino in plan.start:
            self._start(nursery, ino)
        sel.started = sel.started or any(plan.priority[ino][0] == 0 for ino in plan.start)
        self.publisher.reprioritize()

    def _rows(self, now: float) -> list[scheduler.Row]:
        self._changed_due = math.inf  # the rows read below show every change made until now
        rows = []
        quiet_since = now - self.config.drain_delay_s
        due = math.inf
        for ino, mode, nlink, state, ready_seq, changed_at, changed_gen, published in self.journal.all(
                "SELECT id, mode, nlink, state, ready_seq, changed_at, changed_gen, "
                f"EXISTS (SELECT 1 FROM objects o WHERE o.inode = inodes.id) FROM inodes WHERE {PENDING_SQL} "
                "AND nlink>0"):
            lineage = self._cached_lineage(ino, mode, nlink)
            if ino == ROOT_INODE or lineage is None:
                self.ns.nothing_to_publish(ino)
                continue
            path, ancestors, temporary = lineage
            held = temporary and now - changed_at < self.config.hold_limit_s
            staged = held and self._staged(path)  # uploaded to a staged key: never a marker or a scope
            if held and published and not staged:
                self._release_old_names(ino, mode, changed_gen)
            free = state == QUEUED and ino not in self.jobs and self.ns.writers(ino) == 0  # waits on time only
            startable = (free and (staged or not held) and changed_at <= quiet_since
                         and self.not_before.get(ino, 0) <= now)
            if free and not startable:
                due = min(due, self._startable_at(ino, changed_at, held and not staged, now))
            rows.append(scheduler.Row(ino, path, ancestors, ready_seq, stat.S_ISDIR(mode), held, startable,
                                      running=ino in self.jobs))
        self._due_wall = due
        return rows

    def _startable_at(self, ino: int, changed_at: float, held: bool, now: float) -> float:
        """When a queued row that waits only on time becomes startable (inf: it waits on more)."""
        waits = [t for t in (changed_at + self.config.drain_delay_s,
                             changed_at + self.config.hold_limit_s if held else 0.0,
                             self.not_before.get(ino, 0.0)) if t > now]
        return max(waits) if waits else math.inf

    def _cached_lineage(self, ino: int, mode: int, nlink: int) -> tuple[str, tuple[int, ...], bool] | None:
        """Path, ancestors and whether the name is temporary, computed once per inode until names
        change (a pass over thousands of pending files must not walk every path again)."""
        if self._lineages_at != self.ns.renames or len(self._lineages) > LINEAGE_CACHE_MAX:
            self._lineages.clear()
            self._lineages_at = self.ns.renames
        key = (ino, nlink)
        if key not in self._lineages:
            lineage = self._lineage(ino) if nlink == 1 or stat.S_ISDIR(mode) else self._link_lineage(ino)
            self._lineages[key] = None if lineage is None else (*lineage, self.rules.is_held(lineage[0]))
        return self._lineages[key]

    def _lineage(self, ino: int) -> tuple[str, tuple[int, ...]] | None:
        """The inode's path and its directories from the parent up to the root; None if unlinked."""
        names: list[bytes] = []
        ancestors: list[int] = []
        while ino != ROOT_INODE:
            entry = self.ns.entry_of.get(ino)
            if entry is None:
                return None
            ino, name = entry
            names.append(name)
            ancestors.append(ino)
        return "/".join(n.decode("utf-8", "surrogateescape") for n in reversed(names)), tuple(ancestors)

    def _link_lineage(self, ino: int) -> tuple[str, tuple[int, ...]] | None:
        """For a file with several names: the lineage of the name it is published under."""
        path = self.publish_name(ino)
        if path is None:
            return None
        parent = self.ns.resolve(path.rpartition("/")[0])
        above = None if parent is None else self._lineage(parent)
        if parent is None or above is None:
            return None
        return path, (parent, *above[1])

    def publish_name(self, ino: int) -> str | None:
        """The name a file is published under first: its oldest name that is not a temporary one
        (hard links: `link f.tmp f` publishes `f`); the oldest name if all are temporary."""
        paths = self.ns.paths_of(ino)
        if not paths:
            return None
        return next((p for p in paths if not self.rules.is_held(p)), paths[0])

    def _rename_scopes(self) -> dict[int, int]:
        return dict(self.journal.all("SELECT root, committed_seq FROM scopes"))

    def _pinned(self) -> set[int]:
        """Checkpoint directories (or files) pinned with the user.ckptfs.keep attribute."""
        return {r[0] for r in self.journal.all("SELECT inode FROM xattrs WHERE name=?", (KEEP_XATTR,))}

    def _old_ok(self, now: float) -> set[int]:
        since = self.selection.superseded_since
        return {root for root, t in since.items() if now - t >= OLD_SCOPE_GRACE_S}

    def _remember(self, plan: scheduler.Plan, now: float) -> None:
        """Carry the selection to the next pass; note scopes that became durable."""
        sel = self.selection
        before = sel.last_plan.scopes if sel.last_plan is not None else {}
        for root, scope in before.items():
            if root in plan.scopes:
                continue
            if not scope.by_marker:
                self.journal.execute("DELETE FROM scopes WHERE root=?", (root,))  # done: nothing pending
            if self._finished_in_place(scope):
                sel.newest_durable_seq = max(sel.newest_durable_seq or 0, scope.committed_seq)
                self.counters.newest_durable_scope_at = now
                log.log(logging.INFO if scope.by_marker else logging.DEBUG, "checkpoint %s is durable",
                        scope.path or "/")
        if plan.selected != sel.selected:
            sel.started = False
        sel.selected, sel.prefer_old, sel.last_plan = plan.selected, plan.prefer_old, plan
        floor = sel.newest_durable_seq if sel.newest_durable_seq is not None else -1
        sel.superseded_since = {root: sel.superseded_since.get(root, now) for root, scope in plan.scopes.items()
                                if scope.committed_seq < floor}
        self.priority = plan.priority

    def _finished_in_place(self, scope: scheduler.Scope) -> bool:
        """Whether a scope with nothing pending any more became durable, rather than deleted: a
        marker scope keeps its marker (retention unlinks COMMIT first, so a checkpoint being deleted
        loses its scope while its directory is still there), a rename scope its root."""
        ino = scope.marker if scope.by_marker and scope.marker is not None else scope.root
        return self.ns.path_of(ino) is not None

    def _release_old_names(self, ino: int, mode: int, gen: int) -> None:
        """A published file or directory renamed to a temporary name: its objects under the old
        name go (the name no longer exists). A file's content is re-uploaded from the cache when it
        gets a final name again, so a file known only from the bucket keeps its object meanwhile."""
        if stat.S_ISDIR(mode) or self.journal.one("SELECT cached FROM inodes WHERE id=?", (ino,))[0]:
            self.book.orphan(ino, gen)

    def held(self, path: str, changed_at: float, now: float) -> bool:
        """Whether the drain holds this path back now: a temporary name within the hold limit."""
        return self.rules.is_held(path) and now - changed_at < self.config.hold_limit_s and not self._staged(path)

    def is_held(self, path: str) -> bool:
        return self.rules.is_held(path)

    def _staged(self, path: str) -> bool:
        """Under a temporary directory another node made: uploaded to a staged key (gateway/staging.py)."""
        return self.staging is not None and self.staging.stages(path)

    def _key_of(self, path: str, is_dir: bool) -> str:
        if is_dir:
            return path + "/"
        staged = self.staging.key_for(path) if self.staging is not None else None
        return staged or path

    def _start(self, nursery: trio.Nursery, ino: int) -> None:
        """Start the inode's job if it can claim its key and every key it may copy from."""
        is_dir = self.ns.getattr(ino).is_dir
        path = self.ns.path_of(ino) if is_dir else self.publish_name(ino)
        if path is None:
            return
        key = self._key_of(path, is_dir)
        claim = {key, *self.book.keys_of(ino), *([] if is_dir else self.ns.paths_of(ino))}
        if claim & self.busy_keys:
            return
        self.ns.start_upload(ino)
        self.jobs[ino] = trio.CancelScope()
        self.busy_keys |= claim
        self.claims[ino] = claim
        nursery.start_soon(self._sync_inode, key, ino)

    # ---- what is pending, for status and `wait` -----------------------------------------

    @property
    def view(self) -> PendingView:
        if self._view is None or time.monotonic() - self._view_at > VIEW_MAX_AGE_S:
            return self.refresh_view()
        return self._view

    def refresh_view(self) -> PendingView:
        self._view, self._view_at = pending_view(self), time.monotonic()
        return self._view

    def state_of(self, attr: Attr) -> str:
        """The file's state as users see it: its journal state, `held` for a queued file whose
        temporary name the drain holds back. The name comes from the lineage cache: status and
        `ckptfs wait` ask several times a second, over every pending file."""
        if attr.state is QUEUED:
            lineage = self.lineage_of(attr)
            if lineage is not None and lineage[2] and self.held(lineage[0], attr.changed_at, time.time()):
                return HELD
        return attr.state.value

    def lineage_of(self, attr: Attr) -> tuple[str, tuple[int, ...], bool] | None:
        """The name it is published under, its directories and whether that name is temporary."""
        return self._cached_lineage(attr.id, attr.mode, attr.nlink)

    def commit_waits(self) -> list[dict]:
        """Markers waiting for their scope: on local files, or (gate) on other nodes."""
        plan = self.selection.last_plan
        if plan is None:
            return []
        out: list[dict] = []
        for ino, deps in plan.waiting.items():
            if self.rules.is_marker(self.ns.path_of(ino) or ""):
                out.append({"marker": self.ns.path_of(ino), "waiting_for_local_files": len(deps),
                            "example": self.ns.path_of(deps[0])})
        for ino, scope in plan.gated.items():
            out.append({"marker": self.ns.path_of(ino), "waiting_for_nodes": self.gate.scope_state(scope)})
        return out

    # ---- one inode ----------------------------------------------------------------------

    async def _sync_inode(self, key: str, ino: int) -> None:
        try:
            with self.jobs[ino]:
                attr = self._recheck(ino, key)  # the scheduler's row may be older than this task
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
        except ExceptionGroup as group:
            # parts that saw the change while their job was being cancelled (the cancel scope took the
            # Cancelled leaves and left these)
            _, rest = group.split(Superseded)
            if rest is not None:
                log.error("drain: unexpected errors syncing %s", key, exc_info=rest)
                self._record_failure(ino, f"{key}: internal error: {rest!r}")
        except (OSError, EOFError) as exc:
            self._record_failure(ino, f"{key}: reading the cache file failed: {exc}")
        except Exception as exc:  # a bug must not end the drain (and with it the mount)
            log.exception("drain: unexpected error syncing %s", key)
            self._record_failure(ino, f"{key}: internal error: {exc!r}")
        finally:
            self.jobs.pop(ino, None)
            self.busy_keys -= self.claims.pop(ino, set())
            self.wake()
            try:
                self.ns.upload_ended(ino)
            except JournalError:
                pass  # failsafe (logged once); the next start queues it again
            self._note_progress()

    def _recheck(self, ino: int, key: str) -> Attr:
        fresh = self.ns.getattr(ino)
        path = self.ns.path_of(ino) if fresh.is_dir else self.publish_name(ino)
        if (fresh.state is not UPLOADING or fresh.nlink == 0 or self.ns.writers(ino) > 0
                or path is None or self._key_of(path, fresh.is_dir) != key):
            raise Superseded("changed before its upload started")
        return fresh

    def _record_failure(self, what: object, message: str) -> None:
        count = self.failures.get(what, 0) + 1
        self.failures[what] = count
        delay = backoff_s(count)
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

    def _check_token(self, ino: int, token: tuple[int, int]) -> None:
        if self._token(ino) != token:
            raise Superseded("changed during upload")

    def _priority_of(self, ino: int):
        return lambda: self.priority.get(ino, LAST)

    async def _sync_directory(self, attr: Attr, key: str) -> None:
        token = self._token(attr.id)
        have = self.book.keys_of(attr.id)
        want_marker = self._wants_marker(attr.id, key)
        emptied_elsewhere = want_marker and key not in have and attr.id in self.ns.emptied_elsewhere
        if emptied_elsewhere:
            await self.gate.read_removals()  # another node emptied it: is a removal of it on its way?
            self.ns.emptied_elsewhere.discard(attr.id)
            want_marker = self.ns.path_of(attr.id) is not None and self._wants_marker(attr.id, key)
        if want_marker and key not in have:
            self.book.intend(key, token[0])
            etag = await self.publisher.put(key, lambda: (b"", None, None), self._metadata(attr, "", "dir"),
                                            self._priority_of(attr.id), lambda: None)
            self.book.record(key, attr.id, 0, "", etag, token[0])
            if emptied_elsewhere:
                self.ns.follower_markers.add(key)
        self.book.orphan(attr.id, token[0], keep=(key,) if want_marker else ())
        self._finish(attr.id, token, None)

    def _wants_marker(self, ino: int, key: str) -> bool:
        """An empty directory not under a temporary name has its `dir/` marker."""
        return not self.ns.has_children(ino) and not self.is_held(key[:-1])

    async def _sync_file(self, attr: Attr, key: str) -> None:
        """Publish the content at the canonical name, then at every other hard link's name."""
        token = self._token(attr.id)
        have = self.book.keys_of(attr.id)
        if attr.content_dirty or key not in have:
            self.book.intend(key, token[0])
            await self.publisher.rescue_displaced(key, attr.id, token[0], self._priority_of(attr.id),
                                                  lambda k: self._claim(attr.id, k))
            if not attr.content_dirty and have:
                await self._copy_or_upload(attr, have[0], key, token)
            elif stat.S_ISLNK(attr.mode):
                await self._put_bytes(attr, key, token, attr.target or b"", "symlink")
            else:
                await self._upload(attr, key, token)
        links = [p for p in self.ns.paths_of(attr.id) if p != key and not self.rules.is_held(p)]
        for link in links:
            if attr.content_dirty or link not in have:
                self.book.intend(link, token[0])
                await self.publisher.rescue_displaced(link, attr.id, token[0], self._priority_of(attr.id),
                                                      lambda k: self._claim(attr.id, k))
                await self._copy(attr, key, link, token)
        with self.journal.transaction():
            self.book.orphan(attr.id, token[0], keep=(key, *links))
            self._finish(attr.id, token, attr)

    def _claim(self, ino: int, key: str) -> None:
        self.busy_keys.add(key)
        self.claims.setdefault(ino, set()).add(key)

    async def _copy_or_upload(self, attr: Attr, source: str, key: str, token: tuple[int, int]) -> None:
        """A server-side copy of the published content; if that object is gone (deleted behind our
        back) and the cache holds the content, upload it instead."""
        try:
            await self._copy(attr, source, key, token)
        except NoSuchKey:
            if not attr.cached:
                raise
            log.warning("%s: the object to copy from (%s) is gone; uploading from the cache", key, source)
            self.book.orphan(attr.id, token[0], keep=(key,))
            await self._upload(attr, key, token)

    async def _copy(self, attr: Attr, source: str, key: str, token: tuple[int, int]) -> None:
        check = lambda: self._check_token(attr.id, token)  # noqa: E731
        digest = self.ns.getattr(attr.id).digest or ""  # just uploaded, for a hard link's copy
        etag = await self.publisher.copy(source, key, attr.size, self._metadata(attr, digest, "file"),
                                         self._priority_of(attr.id), check)
        self.book.record(key, attr.id, attr.size, digest, etag, token[0])
        self.counters.copied_files += 1

    async def _upload(self, attr: Attr, key: str, token: tuple[int, int]) -> None:
        path = str(self.cache.path(attr.id))
        size = attr.size
        digest = self.ns.written_digest(attr.id, size)  # hashed while it was written
        if digest is None:
            digest = await trio.to_thread.run_sync(digests.file_digest, path, size)
            self.counters.digest_passes += 1
        self._check_token(attr.id, token)
        metadata = self._metadata(attr, digest, "file")
        check = lambda: self._check_token(attr.id, token)  # noqa: E731
        if size <= self.config.part_size_bytes:
            etag = await self.publisher.put_file(key, path, size, metadata, self._priority_of(attr.id), check)
        else:
            etag = await self.publisher.upload_multipart(key, path, size, metadata, self._priority_of(attr.id), check)
        with self.journal.transaction():  # one commit per upload's results
            self.book.record(key, attr.id, size, digest, etag, token[0])
            self._set_digest(attr.id, token, digest)
        self._count_upload(size)

    async def _put_bytes(self, attr: Attr, key: str, token: tuple[int, int], body: bytes, kind: str) -> None:
        digest = digests.bytes_digest(body)
        check = lambda: self._check_token(attr.id, token)  # noqa: E731
        check()
        etag = await self.publisher.put(key, lambda: (body, None, None), self._metadata(attr, digest, kind),
                                        self._priority_of(attr.id), check)
        self.book.record(key, attr.id, len(body), digest, etag, token[0])
        self._set_digest(attr.id, token, digest)
        self._count_upload(len(body))

    def _metadata(self, attr: Attr, digest: str, kind: str) -> dict[str, str]:
        return {
            METADATA_DIGEST: digest,
            METADATA_SIZE: str(attr.size),
            METADATA_MTIME: str(attr.mtime_ns),
            METADATA_MODE: oct(stat.S_IMODE(attr.mode)),
            METADATA_TYPE: kind,
        }

    # ---- journal updates ------------------------------------------------------------

    def _set_digest(self, ino: int, token, digest: str) -> None:
        if self._token(ino) == token:
            self.journal.execute("UPDATE inodes SET digest=?, content_dirty=0 WHERE id=?", (digest, ino))

    def _finish(self, ino: int, token: tuple[int, int], attr: Attr | None) -> None:
        """Mark durable unless the inode changed meanwhile (then it stays pending)."""
        if self.ns.version(ino) != token[1]:
            return
        durable = self.ns.mark_durable(ino, token[0])
        if durable:
            self.gate.note_durable()
        if durable and attr is not None:
            self.counters.newest_durable_change_at = max(
                self.counters.newest_durable_change_at or 0, attr.changed_at)

    def _count_upload(self, size: int) -> None:
        self.counters.uploaded_bytes += size
        self.counters.uploaded_files += 1

    def _count_retry(self, exc: StoreError, attempt: int, delay_s: float) -> None:
        self.counters.retries += 1

    def _count_rate(self, size: int) -> None:
        now = time.monotonic()
        self._rate.append((now, size))
        while self._rate and self._rate[0][0] < now - RATE_WINDOW_S:
            self._rate.popleft()

    def drain_rate_bps(self) -> float:
        now = time.monotonic()
        return sum(n for t, n in self._rate if t >= now - RATE_WINDOW_S) / RATE_WINDOW_S

    # ---- stale objects ---------------------------------------------------------------

    async def _schedule_deletes(self, nursery: trio.Nursery) -> None:
        """Delete stale objects, markers first. The journal is fsynced before: a delete is never
        sent for a removal that a power loss could still undo (the object would be gone for good)."""
        due = self._due_deletes(time.time())
        if not due:
            return
        await self._sync_journal()
        for key in self._due_deletes(time.time()):  # again: the namespace may have moved meanwhile
            self.busy_keys.add(key)
            nursery.start_soon(self._delete_stale, key)

    def _due_deletes(self, now: float) -> list[str]:
        candidates = [key for key, _ in self.book.stale(SCAN_LIMIT)
                      if key not in self.busy_keys and self.not_before.get(key, 0) <= now and not self.book.wanted(key)]
        if self.staging is not None:  # another node's staged object is that node's to delete
            for key in [k for k in candidates if self.staging.is_foreign(k)]:
                self.book.deleted(key)
                candidates.remove(key)
        return scheduler.plan_deletes(candidates, self.rules)

    async def _sync_journal(self) -> None:
        changes = self.journal.conn.total_changes
        if changes != self._synced_changes:
            await trio.to_thread.run_sync(self.journal.sync_wal)
            self._synced_changes = changes

    async def _delete_stale(self, key: str) -> None:
        """Delete a stale object if it still holds what this gateway published there: an object
        another writer (another node) put at the key since is left alone."""
        try:
            async with self.deletes:
                await self.store.delete_object(key, if_match=self.book.etag_of(key))
            self.counters.deleted_objects += 1
            self._forget_stale(key)
        except NoSuchKey:
            self._forget_stale(key)
        except StoreError as exc:
            if exc.code == "PreconditionFailed":
                log.info("drain: %s was rewritten since this gateway published it (another writer): left alone", key)
                self._forget_stale(key)
            else:
                self._record_failure(key, f"delete {key}: {exc}")
        except Exception as exc:  # never end the drain
            log.exception("drain: unexpected error deleting %s", key)
            self._record_failure(key, f"delete {key}: internal error: {exc!r}")
        finally:
            self.busy_keys.discard(key)
            self._note_progress()
            self.wake()

    def _forget_stale(self, key: str) -> None:
        self.book.deleted(key)
        self.failures.pop(key, None)
        self.not_before.pop(key, None)
