"""ContinuousCheckpointer: save as often as the local disk allows, stall only for the snapshot.

Layout under the checkpoint directory::

    step_<N>/state.pt            (format "torch"; rank_<r>.pt per rank with several ranks)
    step_<N>/__<r>_0.distcp ...  (format "dcp", plus DCP's .metadata)
    step_<N>/COMMIT              JSON: step, time, metrics, format, world size, files with
                                 sizes and xxh3-128 digests; written last (temp + fsync + rename)

A step directory without a readable COMMIT is not a checkpoint. `maybe_save`
copies the state to host memory and hands it to one background thread, which
writes the files, then COMMIT (the save is then *locally committed*), then runs
retention. Durability in the bucket is what the gateway reports for the step
directory (`durability.is_durable`); without a gateway, locally committed is
durable.

Retention (`policies.plan_retention`, rank 0) deletes what the keep policy drops,
except the newest durable checkpoint and anything newer; a dropped checkpoint older
than the newest durable one goes even if it is not durable yet, so the gateway never
uploads it. It runs after every local commit, when the newest durable checkpoint
advances (a second thread polls the pending steps every `durability_poll_s`), and at
`close()`.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import queue
import re
import shutil
import statistics as stats_lib
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from . import durability
from .files import FileRecord, digest_file, fsync_dir, write_atomic
from .formats import Format, RankContext, get_format
from .policies import (CheckpointInfo, Continuous, KeepAll, KeepFn, KeepPolicy, RetentionPlan,
                       SavePolicy, pins_of, plan_retention)
from .snapshot import Snapshotter

log = logging.getLogger(__name__)

STEP_PREFIX = "step_"
COMMIT_NAME = "COMMIT"
COMMIT_VERSION = 1
_STEP_RE = re.compile(re.escape(STEP_PREFIX) + r"(\d+)$")


class CheckpointError(RuntimeError):
    """A background save failed; raised on the next call into the checkpointer."""


class NoCheckpointError(LookupError):
    """There is no complete checkpoint to restore (or to wait for) at that step."""


@dataclasses.dataclass(frozen=True)
class Statistics:
    """A snapshot of the checkpointer's counters (see `ContinuousCheckpointer.statistics`)."""

    saves_started: int
    saves_committed: int
    saves_failed: int
    in_flight_step: int | None
    last_local_step: int | None
    last_stall_s: float | None
    mean_stall_s: float | None
    last_write_s: float | None
    snapshot_bytes: int
    deleted: int = 0  # checkpoints retention deleted
    superseded: int = 0  # of those, deleted before they were durable (never uploaded)
    last_durable_step: int | None = None  # the newest durable step retention has seen


@dataclasses.dataclass
class _Job:
    step: int
    state: Any
    metrics: dict[str, Any]
    time: float


class ContinuousCheckpointer:
    """Continuous (or fixed-interval) checkpointing of a training loop into a ckptfs mount.

    `save` decides when `maybe_save` saves (`Continuous()`, `FixedInterval(...)`),
    `keep` which committed checkpoints retention keeps (`LatestN(3) | EveryNSeconds(3600)`,
    any callable), `format` how they are written ("torch" or "dcp"). `probe`
    tells whether a path is durable in the bucket (default: the gateway's xattr);
    while a committed checkpoint is not durable yet it is asked every
    `durability_poll_s` seconds, so retention follows the drain.
    With torch.distributed initialized, every rank must create the checkpointer
    and call `maybe_save` at the same steps; each rank writes its own shard and
    rank 0 writes COMMIT and runs retention.
    """

    def __init__(self, directory: str | os.PathLike, *, save: SavePolicy | None = None,
                 keep: KeepPolicy | KeepFn | None = None, format: str | Format = "torch",
                 probe: durability.DurabilityProbe | None = None, pin_memory: bool | None = None,
                 weights_only: bool = True, durability_poll_s: float = 0.5):
        self.directory = os.path.abspath(directory)
        self._save_policy = save if save is not None else Continuous()
        self._keep = keep if keep is not None else KeepAll()
        self._format = get_format(format)
        self._probe = probe or durability.is_durable
        self._weights_only = weights_only
        self._snapshotter = Snapshotter(pin_memory=pin_memory)
        self._rank, self._world, self._decide_group, self._work_group = _process_groups()
        os.makedirs(self.directory, exist_ok=True)

        self._cond = threading.Condition()
        self._job: _Job | None = None  # the save in flight, until its retention pass is done
        self._error: tuple[str, BaseException] | None = None
        self._committed_here: set[int] = set()
        self._infos: dict[int, CheckpointInfo] = {}  # parsed COMMIT markers, by step
        self._infos_lock = threading.Lock()
        self._retain_lock = threading.Lock()  # one retention pass at a time
        self._durable_seen: set[int] = set()  # durable stays durable: asked once per step
        self._pinned: set[int] = set()  # steps marked user.ckptfs.keep
        self._newest_durable: int | None = None
        self._n_deleted = self._n_superseded = 0
        self._poll_s = durability_poll_s
        self._stopping = threading.Event()
        self._stalls: list[float] = []
        self._n_started = self._n_committed = self._n_failed = 0
        self._last_write_s: float | None = None
        self._closed = False

        infos = self._scan()[0]
        self._last_step = infos[-1].step if infos else None
        self._last_time = infos[-1].time if infos else None

        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="ckptfs-save", daemon=True)
        self._thread.start()
        self._watcher = threading.Thread(target=self._watch_durability, name="ckptfs-retain",
                                         daemon=True)
        if self._rank == 0:
            self._watcher.start()
        ref = weakref.ref(self)

        def close_at_exit() -> None:
            if (c := ref()) is not None:
                c._close_quietly()
        self._atexit = close_at_exit
        atexit.register(self._atexit)

    # ------------------------------------------------------------ saving

    def maybe_save(self, step: int, state: Any, metrics: Mapping[str, Any] | None = None) -> bool:
        """Save `state` at `step` if the save policy says so; True if a save started.

        Returns at once when a save is still being written; otherwise blocks only
        for the host snapshot. Raises `CheckpointError` if an earlier save failed.
        """
        if self._world == 1:
            self._raise_pending()
        now = time.time()
        with self._cond:
            busy = self._job is not None
            failed = self._error is not None
        want = not busy and not failed and (self._last_step is None or step > self._last_step) \
            and self._save_policy.should_save(step, now, self._last_step, self._last_time, busy) \
            and not self._upload_backlog_full()
        if self._world > 1:
            want, any_failed = _all_agree(want, failed, self._decide_group)
            if any_failed:  # every rank raises, so that none waits in a collective for the others
                self._raise_pending()
                raise CheckpointError(f"step {step}: a checkpoint save failed on another rank")
        if want:
            self._start(step, state, metrics, now)
        return want

    def save(self, step: int, state: Any, metrics: Mapping[str, Any] | None = None) -> None:
        """Save now, whatever the policy: wait for the save in flight, snapshot, wait for the commit."""
        self.wait_local()
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step {step} is not newer than the last saved step {self._last_step}")
        self._start(step, state, metrics, time.time())
        self.wait_local(step)

    def _start(self, step: int, state: Any, metrics: Mapping[str, Any] | None, now: float) -> None:
        if self._closed:
            raise RuntimeError(f"{self.directory}: the checkpointer is closed")
        metrics = _plain_metrics(metrics)
        t0 = time.perf_counter()
        snap = self._snapshotter.snapshot(state)
        stall = time.perf_counter() - t0
        job = _Job(step, snap, metrics, now)
        with self._cond:
            self._job = job
            self._n_started += 1
            self._stalls.append(stall)
        self._last_step, self._last_time = step, now
        self._queue.put(job)
        log.debug("step %d: snapshot of %d bytes took %.3fs", step, self._snapshotter.last_bytes, stall)

    # ------------------------------------------------------- the worker

    def _run(self) -> None:
        """The background thread: write each job, then run retention; record any error."""
        while (job := self._queue.get()) is not None:
            try:
                t0 = time.perf_counter()
                self._write(job)
                write_s = time.perf_counter() - t0
                with self._cond:
                    self._committed_here.add(job.step)
                    self._n_committed += 1
                    self._last_write_s = write_s
                    self._cond.notify_all()
                log.info("step %d committed locally in %.2fs", job.step, write_s)
                if self._rank == 0:
                    self._retain()
            except BaseException as exc:  # delivered to the training loop, never dropped
                log.error("saving step %d failed: %r", job.step, exc)
                with self._cond:
                    self._error = (f"saving step {job.step}", exc)
                    self._n_failed += 1
            finally:
                job.state = None
                with self._cond:
                    self._job = None
                    self._cond.notify_all()

    def _write(self, job: _Job) -> None:
        """Write one checkpoint: every rank its files, then rank 0 the commit marker.

        With several ranks every failure is caught and exchanged, so that all
        ranks reach the same collectives and fail together instead of hanging.
        """
        step_dir = self.step_dir(job.step)
        records, err = [], None
        try:
            if self._rank == 0:
                self._prepare(step_dir)
            if self._world > 1:
                dist.barrier(group=self._work_group)
                # Each rank may have its own gateway (one per node): make the directory there too.
                os.makedirs(step_dir, exist_ok=True)
            ctx = RankContext(self._rank, self._world, self._work_group)
            records = self._format.write(step_dir, job.state, ctx)
        except Exception as exc:
            if self._world == 1:
                raise
            err = exc
        if self._world > 1:
            records = self._gather_records(records, err, job.step)
        err = None
        if self._rank == 0:
            try:
                self._write_commit(step_dir, job, records)
            except Exception as exc:
                if self._world == 1:
                    raise
                err = exc
        if self._world > 1:
            self._broadcast_commit(job.step, err)

    def _prepare(self, step_dir: str) -> None:
        """Create the step directory, removing what a crashed earlier run left there."""
        if os.path.lexists(step_dir):
            log.warning("removing incomplete %s left by an earlier run", step_dir)
            shutil.rmtree(step_dir)
        os.makedirs(step_dir)
        fsync_dir(self.directory)

    def _gather_records(self, records: list[FileRecord], err: Exception | None,
                        step: int) -> list[FileRecord]:
        """All ranks' file records (rank 0 needs them); raises on every rank if any rank failed."""
        gathered: list = [None] * self._world
        dist.all_gather_object(gathered, (records, None if err is None else repr(err)),
                               group=self._work_group)
        failed = {r: e for r, (_, e) in enumerate(gathered) if e is not None}
        if failed:
            raise CheckpointError(f"step {step}: ranks failed to write their shards: {failed}") from err
        return [rec for recs, _ in gathered for rec in recs]

    def _broadcast_commit(self, step: int, err: Exception | None) -> None:
        """Tell the other ranks whether rank 0 committed, so that they fail together."""
        msg = [None if err is None else repr(err)]
        dist.broadcast_object_list(msg, src=0, group=self._work_group)
        if msg[0] is not None:
            raise CheckpointError(f"step {step}: rank 0 could not commit: {msg[0]}") from err

    def _write_commit(self, step_dir: str, job: _Job, records: list[FileRecord]) -> None:
        marker = {
            "version": COMMIT_VERSION,
            "step": job.step,
            "time": job.time,
            "metrics": job.metrics,
            "format": self._format.name,
            "world_size": self._world,
            "files": [r.to_json() for r in records],
        }
        data = json.dumps(marker, indent=1).encode()
        write_atomic(os.path.join(step_dir, COMMIT_NAME), lambda f: f.write(data))
        with self._infos_lock:
            self._infos[job.step] = CheckpointInfo(job.step, job.time, job.metrics)

    # -------------------------------------------------------- retention

    def retain(self) -> None:
        """Run a retention pass now (one also runs after every commit, on durability advance and at close).

        Waits for the save in flight first (call it from the thread that saves); only rank 0 deletes.
        """
        self.wait_local()
        if self._rank == 0:
            self._retain()

    def _retain(self) -> RetentionPlan:
        """Delete what the keep policy drops, never the newest durable checkpoint or anything newer.

        A dropped checkpoint older than the newest durable one goes even if it is not durable yet
        (superseded: the gateway cancels its upload). Step directories without COMMIT that are
        older than the newest durable checkpoint are leftovers of failed saves and go too.
        """
        with self._retain_lock:
            infos, partial = self._scan()
            plan = plan_retention(infos, self._keep, self._durable_step, partial)
            for step in plan.delete:
                self._delete(step, superseded=step in plan.superseded)
            for step in plan.incomplete:
                log.info("removing incomplete checkpoint %s", self.step_dir(step))
                shutil.rmtree(self.step_dir(step))
            self._pin(set(plan.owed) & pins_of(self._keep, infos))
            with self._cond:
                self._newest_durable = plan.newest_durable
                self._n_deleted += len(plan.delete)
                self._n_superseded += len(plan.superseded)
            return plan

    def _pin(self, steps: set[int]) -> None:
        """Tell the gateway which pending checkpoints the keep policy keeps for good, so it uploads them
        even while newer ones keep coming (docs/SEMANTICS.md, "Commit scopes")."""
        for step in steps - self._pinned:
            try:
                os.setxattr(self.step_dir(step), durability.KEEP_XATTR, b"1")
            except OSError:
                pass  # not a ckptfs mount (or an older one): nothing to tell
            self._pinned.add(step)

    def _durable_step(self, step: int) -> bool:
        if step in self._durable_seen:
            return True
        durable = self._probe(self.step_dir(step))
        if durable:
            self._durable_seen.add(step)
        return durable

    def _delete(self, step: int, superseded: bool = False) -> None:
        """Unlink COMMIT first, so a half-deleted directory is never taken for a checkpoint.

        The gateway deletes the bucket's objects in the order of the unlinks: the marker first there too.
        """
        step_dir = self.step_dir(step)
        log.info("retention: deleting checkpoint step %d%s", step,
                 " (superseded before it was durable)" if superseded else "")
        os.unlink(os.path.join(step_dir, COMMIT_NAME))
        fsync_dir(step_dir)
        shutil.rmtree(step_dir)
        with self._infos_lock:
            self._infos.pop(step, None)
        self._durable_seen.discard(step)

    # ------------------------------------------------- durability watch

    def _watch_durability(self) -> None:
        """The retention thread (rank 0): a retention pass whenever the newest durable step advances.

        Asks the probe every `durability_poll_s` only while a checkpoint committed by this
        checkpointer is not durable, and only for the steps newer than the newest durable one.
        An error is delivered to the training loop like a failed save.
        """
        while not self._stopping.wait(self._poll_s):
            try:
                if self._durability_advanced():
                    self._retain()
            except Exception as exc:
                log.error("retention after a durability change failed: %r", exc)
                with self._cond:
                    if self._error is None:
                        self._error = ("retention", exc)

    def _durability_advanced(self) -> bool:
        """Whether a committed step newer than the newest durable one known is durable now."""
        with self._cond:
            if not self._committed_here:
                return False  # a checkpointer that only restores never deletes
            newest = self._newest_durable
        with self._infos_lock:
            steps = sorted(self._infos, reverse=True)
        for step in steps:
            if newest is not None and step <= newest:
                return False
            if os.path.isdir(self.step_dir(step)) and self._durable_step(step):
                return True
        return False

    def _settle(self, timeout: float) -> None:
        """At close: wait up to `timeout` s for the newest checkpoint to be durable, retaining as it advances."""
        deadline = time.monotonic() + timeout
        while True:
            plan = self._retain()
            latest = self.latest_step()
            if latest is None or plan.newest_durable == latest:
                return
            if time.monotonic() >= deadline:
                if timeout > 0:
                    log.warning("step %d was not durable %.0f s after close; the bucket keeps step %s "
                                "until a later retention pass", latest, timeout, plan.newest_durable)
                return
            while time.monotonic() < deadline and not self._durability_advanced():
                time.sleep(max(0.0, min(self._poll_s, deadline - time.monotonic())))

    def _scan(self) -> tuple[list[CheckpointInfo], list[int]]:
        """(committed checkpoints oldest first, steps of directories without a readable COMMIT)."""
        with self._infos_lock:
            return self._scan_locked()

    def _scan_locked(self) -> tuple[list[CheckpointInfo], list[int]]:
        committed, partial = [], []
        steps = set()
        for name in os.listdir(self.directory):
            m = _STEP_RE.match(name)
            if not m:
                continue
            step = int(m.group(1))
            steps.add(step)
            try:
                info = self._infos.get(step) or self._read_info(step)
            except OSError as exc:  # EIO: on another node, the marker of a step rank 0's retention is
                # deleting, inside the gateway's propagation window. Neither a checkpoint nor a
                # leftover this time, so never deleted for it.
                log.info("step %d: commit marker not readable now (%s); skipped in this scan", step, exc)
                continue
            (committed.append(info) if info else partial.append(step))
        for gone in self._infos.keys() - steps:
            self._infos.pop(gone, None)
        committed.sort(key=lambda i: i.step)
        return committed, sorted(partial)

    def _read_info(self, step: int) -> CheckpointInfo | None:
        """The step's CheckpointInfo; None without a commit marker (or an invalid one). Other read
        errors (OSError) propagate to the scan."""
        try:
            marker = read_commit(self.step_dir(step))
        except FileNotFoundError:
            return None
        except ValueError as exc:
            log.warning("step %d: unreadable commit marker: %s", step, exc)
            return None
        info = CheckpointInfo(step, float(marker.get("time", 0.0)), marker.get("metrics") or {})
        self._infos[step] = info
        return info

    # ---------------------------------------------------------- waiting

    def wait_local(self, step: int | None = None, timeout: float | None = None) -> int | None:
        """Block until `step` is locally committed (default: until no save is in flight).

        Returns the step (or the newest committed one). Raises `NoCheckpointError`
        if `step` is neither committed nor being saved, `TimeoutError` after
        `timeout` seconds, and `CheckpointError` if a background save failed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._raise_pending_locked()
                job = self._job
                if step is None and job is None:
                    return self.latest_step()
                if step is not None and step in self._committed_here:
                    return step
                if step is not None and (job is None or job.step != step):
                    if os.path.exists(os.path.join(self.step_dir(step), COMMIT_NAME)):
                        return step
                    raise NoCheckpointError(f"step {step} was not saved (and is not being saved)")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"step {step} not committed locally within {timeout}s")
                self._cond.wait(left)

    def wait_durable(self, step: int | None = None, timeout: float | None = None) -> int | None:
        """Block until `step` (default: the newest committed one) is durable in the bucket.

        Raises `TimeoutError` after `timeout` seconds; see `wait_local` for the rest.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        step = self.wait_local(step, timeout)
        if step is None:
            raise NoCheckpointError(f"no checkpoint in {self.directory}")
        delay = 0.01
        while not self.is_durable(step):
            self._raise_pending()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"step {step} not durable within {timeout}s")
            time.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, 1.0)
        return step

    def is_durable(self, step: int) -> bool:
        """True when `step` is committed and the gateway reports it durable in the bucket."""
        step_dir = self.step_dir(step)
        return os.path.exists(os.path.join(step_dir, COMMIT_NAME)) and self._probe(step_dir)

    # -------------------------------------------------------- queries

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, f"{STEP_PREFIX}{step}")

    def steps(self) -> list[int]:
        """The steps with a commit marker, oldest first (digests not checked)."""
        return [i.step for i in self._scan()[0]]

    def latest_step(self) -> int | None:
        """The newest step with a commit marker."""
        steps = self.steps()
        return steps[-1] if steps else None

    def _upload_backlog_full(self) -> bool:
        """Whether the save policy's `max_not_durable` committed checkpoints are still uploading."""
        limit = getattr(self._save_policy, "max_not_durable", None)
        if limit is None:
            return False
        try:
            steps = self.steps()
        except OSError:
            return False  # let the save itself fail and report why
        for behind, step in enumerate(reversed(steps), start=1):
            if self._durable_step(step):
                break
            if behind > limit:
                return True
        return False

    def latest_durable_step(self) -> int | None:
        """The newest committed step that is durable in the bucket."""
        for step in reversed(self.steps()):
            if self._durable_step(step):
                return step
        return None

    def statistics(self) -> Statistics:
        with self._cond:
            return Statistics(
                saves_started=self._n_started, saves_committed=self._n_committed,
                saves_failed=self._n_failed,
                in_flight_step=self._job.step if self._job else None,
                last_local_step=max(self._committed_here, default=None),
                last_stall_s=self._stalls[-1] if self._stalls else None,
                mean_stall_s=stats_lib.fmean(self._stalls) if self._stalls else None,
                last_write_s=self._last_write_s,
                snapshot_bytes=self._snapshotter.last_bytes,
                deleted=self._n_deleted, superseded=self._n_superseded,
                last_durable_step=self._newest_durable)

    # ------------------------------------------------------- restoring

    def restore(self, step: int | None = None, *, template: Any = None,
                map_location: Any = "cpu", verify: bool = True) -> tuple[int, Any]:
        """Load the newest complete checkpoint (or `step`); returns (step, state).

        A checkpoint is complete when its COMMIT is readable and every file it
        lists has the recorded size and digest (`verify=False` checks sizes only).
        Incomplete ones are skipped with a warning; with `step=` given, an
        incomplete or missing checkpoint raises `NoCheckpointError`. `template`
        is the state dict DCP loads into in place (format "dcp").
        """
        self.wait_local()
        candidates = [step] if step is not None else sorted(self._all_step_dirs(), reverse=True)
        for s in candidates:
            problem = self._check(s, verify)
            if self._world > 1:
                problem = _first_problem(problem, self._decide_group)
            if problem is not None:
                if step is not None:
                    raise NoCheckpointError(f"checkpoint step {s} in {self.directory}: {problem}")
                log.warning("skipping checkpoint step %d: %s", s, problem)
                continue
            marker = read_commit(self.step_dir(s))
            fmt = get_format(marker.get("format", "torch"))
            ctx = RankContext(self._rank, self._world, self._decide_group)
            state = fmt.read(self.step_dir(s), marker, ctx, template=template,
                             map_location=map_location, weights_only=self._weights_only)
            log.info("restored step %d from %s", s, self.step_dir(s))
            return s, state
        raise NoCheckpointError(f"no complete checkpoint in {self.directory}")

    def _all_step_dirs(self) -> list[int]:
        return [int(m.group(1)) for n in os.listdir(self.directory) if (m := _STEP_RE.match(n))]

    def _check(self, step: int, verify: bool) -> str | None:
        """Why `step` cannot be restored by this rank, or None if it can."""
        step_dir = self.step_dir(step)
        if not os.path.isdir(step_dir):
            return "no such checkpoint"
        try:
            marker = read_commit(step_dir)
        except FileNotFoundError:
            return "no commit marker (the save did not finish)"
        except ValueError as exc:
            return f"unreadable commit marker ({exc})"
        for rec in marker.get("files", []):
            if self._world > 1 and rec.get("rank", 0) != self._rank:
                continue
            problem = _check_file(os.path.join(step_dir, rec["name"]), rec, verify)
            if problem:
                return problem
        return None

    # ---------------------------------------------------------- closing

    def close(self, durable_timeout: float = 0.0) -> None:
        """Wait for the save in flight, stop the worker, run a last retention pass; raise any error.

        With `durable_timeout` > 0, first wait up to that many seconds for the newest checkpoint
        to become durable (retention follows as durability advances): the bucket then ends with
        exactly what the keep policy keeps once the drain settles. Without the wait, the newest
        durable checkpoint the keep policy drops stays until a later run's retention. A failed
        last pass is logged, not raised (it loses nothing).
        """
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
            self._stopping.set()
            if self._watcher.is_alive():
                self._watcher.join()
            atexit.unregister(self._atexit)
            if self._rank == 0 and self._committed_here and self._error is None:
                try:
                    self._settle(durable_timeout)
                except Exception as exc:  # nothing is lost: the next run's retention deletes it
                    log.error("retention at close failed: %r", exc)
        self._raise_pending()

    def _close_quietly(self) -> None:
        try:
            self.close()
        except Exception:
            log.exception("the last checkpoint save failed")

    def __enter__(self) -> ContinuousCheckpointer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # do not hide the training loop's exception behind a save error
            self._close_quietly()

    # ----------------------------------------------------------- errors

    def _raise_pending(self) -> None:
        with self._cond:
            self._raise_pending_locked()

    def _raise_pending_locked(self) -> None:
        if self._error is not None:
            what, exc = self._error
            self._error = None
            raise CheckpointError(f"{what} failed: {exc!r}") from exc


# ------------------------------------------------------------------ helpers


def read_commit(step_dir: str) -> dict:
    """The parsed COMMIT marker of a step directory (FileNotFoundError, ValueError)."""
    with open(os.path.join(step_dir, COMMIT_NAME), "rb") as f:
        marker = json.loads(f.read())
    if not isinstance(marker, dict) or "files" not in marker:
        raise ValueError("not a ckptfs commit marker")
    return marker


def _check_file(path: str, rec: dict, verify: bool) -> str | None:
    name = rec["name"]
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return f"{name} is missing"
    if size != rec["size"]:
        return f"{name} has {size} bytes, COMMIT says {rec['size']}"
    if verify:
        _, digest = digest_file(path)
        if digest != rec["xxh3_128"]:
            return f"{name} digest mismatch (corrupt)"
    return None


def _plain_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics as JSON values (tensor and numpy scalars become Python numbers)."""
    out = {str(k): (v.item() if hasattr(v, "item") else v) for k, v in (metrics or {}).items()}
    json.dumps(out)  # fail here, in the training loop, rather than in the worker
    return out


def _process_groups() -> tuple[int, int, Any, Any]:
    """(rank, world size, group for the loop's decisions, group for the worker's writes).

    Two gloo groups, because the training thread (save decisions, restore) and
    the worker thread (DCP, barriers) issue collectives concurrently and each
    group must see its collectives in one order.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0, 1, None, None
    return (dist.get_rank(), dist.get_world_size(),
            dist.new_group(backend="gloo"), dist.new_group(backend="gloo"))


def _all_agree(want: bool, failed: bool, group: Any) -> tuple[bool, bool]:
    """(every rank wants to save, some rank has a failed save): one small all_reduce.

    The ranks must save the same steps, and a failure must stop all of them.
    """
    t = torch.tensor([int(not want), int(failed)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return not t[0].item(), bool(t[1].item())


def _first_problem(problem: str | None, group: Any) -> str | None:
    """Combine every rank's restore check: a problem anywhere is a problem everywhere."""
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, problem, group=group)
    bad = [f"rank {r}: {p}" for r, p in enumerate(gathered) if p is not None]
    return "; ".join(bad) or None
