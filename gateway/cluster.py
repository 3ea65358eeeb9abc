"""Several gateways on one s3://BUCKET/PREFIX: node identity, leases and the cluster commit gate.

The bucket is the only coordination engine (docs/CLUSTER.md): each node renews a lease record,
and a node about to publish a commit marker announces a pending commit; every node that held a
live lease when the marker was closed answers with its manifest for the scope once its own files
of it are durable; the marker is published when every one of them has answered. A node lost
before answering blocks the commit for good: the marker never shows over a missing shard.

A directory renamed into place is gated the same way through its closing file (its newest file,
gateway/scheduler.py). Before this node lists (or misses a name in) a temporary directory it
made, a *fence* asks every other live node to stage its files there (gateway/staging.py) and
adopts them; fences reuse the pending/answer records and are never committed.

`Cluster` is the drain's `CommitGate` (gateway/drain.py; without --cluster the drain's gate is
always open). It announces a commit as soon as a marker is closed, not only when the drain first
asks, so other nodes answer while this node's own files are still uploading. Everything here runs
in the daemon's trio loop; `may_publish`, `scope_state` and `status` are synchronous, do no I/O
and never raise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from gateway import cluster_records as rec
from gateway.errors import NoSuchKey, StoreError
from gateway.file_state import PENDING_SQL
from gateway.journal import Journal
from gateway.namespace import SUBTREE_CTE, Namespace
from gateway.scopes import ScopeRules
from gateway.staging import Staging, held_root, parse_staged_key, staged_path, staged_prefix
from gateway.store import Store

if TYPE_CHECKING:  # annotations only
    from gateway.remote_ns import RemoteNamespace

log = logging.getLogger(__name__)

ACTIVE_WINDOW_S = 60.0      # poll fast this long after the last local change
WAITING_FILES_SHOWN = 20    # pending paths a node reports per scope in its lease
LOCAL_CHECK_S = 0.05        # a burst of local changes is looked at once, this long after the first
FAST_POLL_S = 0.025         # the shortest wait between two looks at a commit someone waits for
POLL_SHARE = 0.05           # ... otherwise a twentieth of the time waited so far (at most cluster_poll_s):
                            # learning late costs at most 5% of the commit's own time
OUTCOME_GETS_PER_S = 1000   # all nodes' GETs of one commit record stay under this (N nodes poll it)
WATCH_WINDOW_S = 2.0        # a commit is watched this long after a wait looked at its scope
FORGET_AFTER_S = 600.0      # finished commits are forgotten this long after they finished
FENCE_TIMEOUT_S = 10.0      # how long a readdir or lookup in a temporary directory waits for other nodes
FENCE_CHECK_S = 0.05        # how often a fence lists the answers to it
RETRY_BASE_S = 0.25
RETRY_MAX_S = 10.0


def load_identity(journal: Journal, configured: str | None) -> tuple[str, str]:
    """(node id, incarnation), kept in the journal. A fresh journal (a node back on an empty disk)
    always gets a new incarnation, so its answers never count for commits announced before."""
    node = journal.get_meta("cluster_node")
    incarnation = journal.get_meta("cluster_incarnation")
    if configured and configured != node:
        node, incarnation = configured, None
    if not node:
        host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())[:40] or "node"
        node = f"{host}-{rec.new_incarnation()[:6]}"
    if not incarnation:
        incarnation = rec.new_incarnation()
        journal.set_meta("cluster_node", node)
        journal.set_meta("cluster_incarnation", incarnation)
    return node, incarnation


@dataclasses.dataclass
class HeldCommit:
    """A commit whose marker this node holds."""

    scope: str
    markers: list[str]
    started_at: float = dataclasses.field(default_factory=time.time)
    commit_id: str | None = None
    required: list[str] = dataclasses.field(default_factory=list)
    answered: set[str] = dataclasses.field(default_factory=set)
    state: str = "announcing"  # announcing | waiting | granted | committed | conflict | abandoned
    wake: trio.Event = dataclasses.field(default_factory=trio.Event)  # look at the answers now
    retired_checked_at: float = 0.0  # when retired/ may be listed again
    local_durable: bool = False  # the drain has asked: this node's files of the scope are durable
    etag: str | None = None
    alone: bool = False
    error: str | None = None
    waiting_info: dict[str, dict] = dataclasses.field(default_factory=dict)
    marker_objects: list[dict] = dataclasses.field(default_factory=list)
    finished_at: float | None = None

    @property
    def granted(self) -> bool:
        return self.state in ("granted", "committed")


@dataclasses.dataclass
class Answer:
    """A commit of another node that this node has seen."""

    scope: str
    commit_id: str
    answered: bool = False
    committed: bool = False
    fresh: bool = True  # not answered before the namespace log was read after it was seen (renames)
    seen_at: float = dataclasses.field(default_factory=time.time)
    members: int = 0  # how many nodes must answer (from the commit record, once read)


@dataclasses.dataclass
class Fence:
    """A request to every other node: stage what you closed under this temporary directory."""

    root: str
    put_at: float | None = None
    done: trio.Event = dataclasses.field(default_factory=trio.Event)


class Cluster:
    """The cluster service of one gateway: `await cluster.register()` before mounting,
    `await nursery.start(cluster.run)`, `await cluster.retire()` after a complete drain."""

    def __init__(self, ns: Namespace, store: Store, journal: Journal, config, *, listing=None):
        self.ns = ns
        self.store = store
        self.journal = journal
        self.config = config
        self.listing = listing  # gateway.listing.BucketListing: adopts keys found by lookups
        self.node, self.incarnation = load_identity(journal, config.node_id)
        self.member = f"{self.node}@{self.incarnation}"
        self.interval_s = config.lease_interval_s
        self.ttl_s = config.lease_interval_s * 3
        self.wake: Callable[[], None] = lambda: None
        self.held: dict[str, HeldCommit] = {}
        self.answers: dict[str, Answer] = {}       # commit id -> what we know of it
        self.committed_scopes: dict[str, float] = {}  # scope -> when this node learned it committed
        self.waiting: dict[str, dict] = {}         # scope -> our pending files, shown in our lease
        self.renewed_local: float | None = None    # local time the last successful renewal was sent
        self.lease_errors = 0
        self.namespace: RemoteNamespace | None = None  # set by the daemon
        self.rules = ScopeRules(config.marker_patterns, config.pointer_patterns, config.hold_patterns)
        self.staging = Staging(ns, journal, self.rules, self.member)
        self._fences: dict[str, Fence] = {}
        self.fence_ids: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._lease_wake = trio.Event()
        self._poll_wake = trio.Event()
        self._last_gen = ns.gen
        self._last_change = time.time()
        self._poll_lock = trio.Lock()
        self._local_wake = trio.Event()
        self._durable_wake = trio.Event()      # set (and replaced) when a local file becomes durable
        self._outcome_wake = trio.Event()      # an answer was sent, or a wait began looking
        self._watched_until = 0.0              # someone waits for a commit this node answered
        self._had_pending = False
        self._ns_changed = False

    # ---- the gate ---------------------------------------------------------------------------

    def may_publish(self, scope: str, marker: str) -> bool:
        try:
            commit = self._commit_for(scope, marker)
            if commit is not None and not commit.local_durable:
                commit.local_durable = True  # the drain asks once our files of the scope are durable:
                commit.wake.set()            # look at the answers now
            return commit is not None and commit.granted
        except Exception:  # never raise into the drain
            log.exception("cluster gate failed for %s", scope)
            return False

    def _commit_for(self, scope: str, marker: str) -> HeldCommit | None:
        """The commit round of `scope` that covers `marker`; starts one (in the background) if none does."""
        commit = self.held.get(scope)
        if commit is None or commit.state == "abandoned" or (
                commit.state == "committed" and marker not in commit.markers):
            if self._nursery is None:
                return None
            commit = HeldCommit(scope, [marker])
            self.held[scope] = commit
            self._nursery.start_soon(self._hold_commit, commit)
        elif marker not in commit.markers:
            commit.markers.append(marker)  # a later marker of the same round shares its answers
        return commit

    def keeps_dir(self, ino: int, path: str) -> bool:
        """A directory this node keeps although the bucket does not show it: made by another node's
        record (its marker may not be out yet), or under a temporary name (never published)."""
        return ino in self.staging.remote_dirs or held_root(path, self.rules) is not None

    async def read_removals(self) -> None:
        """One poll of the namespace log: removal records written before a sweep are seen once
        the sweep's deletes are (LIST is strongly consistent)."""
        if self.namespace is not None:
            async with self._poll_lock:
                await self.namespace.poll_log()

    def note_durable(self) -> None:
        """The drain made a local file durable: answer, or look for the marker, without polling."""
        self._durable_wake.set()
        self._durable_wake = trio.Event()
        self._local_wake.set()

    def _poll_interval(self, waited_s: float, members: int = 0) -> float:
        """How long until the next look at a commit that has been waited for `waited_s`: fast at
        first, then a twentieth of the time waited (at most cluster_poll_s); never so fast that
        `members` nodes polling one record together exceed OUTCOME_GETS_PER_S."""
        return min(self.config.cluster_poll_s,
                   max(FAST_POLL_S, POLL_SHARE * waited_s, members / OUTCOME_GETS_PER_S))

    def _announce_closed_markers(self) -> None:
        """Start the round of every closed, unpublished marker now (the drain asks only once this
        node's own files of the scope are durable; the other nodes can answer meanwhile)."""
        rows = self.journal.all("SELECT id FROM inodes WHERE state IN ('queued', 'uploading') AND nlink>0 "
                                "AND (mode & 61440) = 32768 LIMIT 4096")
        for (ino,) in rows:
            path = self.ns.path_of(ino)
            if path and self.rules.is_marker(path) and not self.rules.is_held(path) and self.ns.writers(ino) == 0:
                self._commit_for(path.rpartition("/")[0], path)

    def scope_state(self, scope: str) -> dict:
        commit = self.held.get(scope)
        if commit is None:
            seen = [a for a in self.answers.values() if a.scope == scope]
            if seen:
                a = seen[-1]
                return {"scope": scope, "holder": False, "commit_id": a.commit_id,
                        "state": "committed" if a.committed else ("answered" if a.answered else "answering"),
                        "my_pending_files": self.waiting.get(scope, {}).get("pending_files", [])}
            return {"scope": scope, "state": "unknown"}
        waiting_for = []
        for member in rec.missing_members(commit.required, commit.answered):
            info = commit.waiting_info.get(member, {})
            waiting_for.append({"node": member, "lease_age_s": info.get("lease_age_s"),
                                "lost": info.get("lost", False), "pending_files": info.get("pending_files", []),
                                "pending_count": info.get("pending_count")})
        return {"scope": scope, "holder": True, "markers": list(commit.markers), "commit_id": commit.commit_id,
                "state": commit.state, "required": len(commit.required), "answered": len(commit.answered),
                "waiting_for": waiting_for if commit.state == "waiting" else [], "error": commit.error,
                "age_s": round(time.time() - commit.started_at, 3)}

    def blocks_durable(self, path: str) -> bool:
        """Whether a commit this node knows of, for `path` or a scope below it, is not complete:
        then the directory is not durable cluster-wide, whatever this node's own files say."""
        inside = path + "/"
        for commit in self.held.values():
            if commit.state not in ("committed", "abandoned") and (
                    commit.scope == path or commit.scope.startswith(inside) or not path):
                return True
        for answer in self.answers.values():
            if not answer.committed and not answer.commit_id.startswith(rec.FENCE) and (
                    answer.scope == path or answer.scope.startswith(inside) or not path):
                self._watch()
                return True
        return False

    def _watch(self) -> None:
        """Someone (ckptfs wait, the shim's wait_durable) waits for a commit of another node."""
        if time.time() >= self._watched_until:
            self._outcome_wake.set()
        self._watched_until = time.time() + WATCH_WINDOW_S

    def status(self) -> dict:
        now = time.time()
        lease_age = None if self.renewed_local is None else round(now - self.renewed_local, 3)
        return {
            "node": self.node,
            "incarnation": self.incarnation,
            "lease_age_s": lease_age,
            "lease_lapsed": lease_age is None or lease_age > self.ttl_s,
            "lease_errors_total": self.lease_errors,
            "commits": [self.scope_state(s) for s in sorted(self.held) if self.held[s].state != "committed"][:50],
            "answering": sorted({a.scope for a in self.answers.values() if not a.committed})[:50],
            "committed_scopes_seen": len(self.committed_scopes),
        }

    # ---- service ----------------------------------------------------------------------------

    async def register(self) -> None:
        """Write this node's lease before the mount serves a request (its writes must be seen)."""
        await self._renew()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._lease_loop)
            nursery.start_soon(self._poll_loop)
            nursery.start_soon(self._local_loop)
            nursery.start_soon(self._outcome_loop)
            if self.namespace is not None:
                nursery.start_soon(self.namespace.run)
            task_status.started()

    async def retire(self) -> None:
        """Clean unmount with nothing pending: answer what is pending, then leave a retired record
        (it counts as an answer to every commit: all our files are durable) and drop the lease."""
        try:
            with trio.move_on_after(10):
                await self.poll_once()
                await self.store.put_record(rec.retired_key(self.node, self.incarnation), b"")
                await self.store.delete_object(rec.lease_key(self.node, self.incarnation))
                log.info("cluster: node %s retired (lease removed)", self.member)
        except StoreError as exc:
            log.warning("cluster: could not remove the lease of %s (%s); it expires in %.0fs",
                        self.member, exc, self.ttl_s)

    async def _lease_loop(self) -> None:
        while True:
            with trio.move_on_after(self.interval_s):
                await self._lease_wake.wait()
            self._lease_wake = trio.Event()
            try:
                await self._renew()
            except StoreError as exc:
                self.lease_errors += 1
                log.warning("cluster: lease renewal failed (%s)", exc)

    async def _renew(self) -> None:
        sent = time.time()
        body = json.dumps({"node": self.node, "incarnation": self.incarnation, "host": socket.gethostname(),
                           "mountpoint": self.config.mountpoint, "interval_s": self.interval_s,
                           "renewed_at": sent, "waiting": self.waiting}, sort_keys=True).encode()
        await self.store.put_record(rec.lease_key(self.node, self.incarnation), body)
        self.renewed_local = sent

    def _active(self) -> bool:
        if self.ns.gen != self._last_gen:
            self._last_gen, self._last_change = self.ns.gen, time.time()
        if time.time() - self._last_change < ACTIVE_WINDOW_S:
            return True
        if any(not a.committed for a in self.answers.values()):
            return True
        return self._has_pending_files()

    def _has_pending_files(self) -> bool:
        """Whether any file of this node is not durable yet (one index lookup)."""
        return self.journal.one(f"SELECT 1 FROM inodes WHERE {PENDING_SQL} AND nlink>0 LIMIT 1") is not None

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self.poll_once()
            except StoreError as exc:
                log.info("cluster: poll failed (%s)", exc)
            except Exception:
                log.exception("cluster: poll failed unexpectedly")
            with trio.move_on_after(self.config.cluster_poll_s if self._active() else self.interval_s):
                await self._poll_wake.wait()
            self._poll_wake = trio.Event()

    def poke(self) -> None:
        """The namespace changed (a marker may have been closed): look locally soon."""
        self._ns_changed = True
        self._local_wake.set()

    async def _local_loop(self) -> None:
        """Without any request: announce markers as soon as they are closed, and answer a commit we
        know of as soon as our files of it are durable (the PUT of the answer is the only I/O)."""
        while True:
            woken = False
            with trio.move_on_after(self.config.cluster_poll_s):
                await self._local_wake.wait()
                woken = True
            # a burst of changes is looked at once; a file made durable is answered sooner
            await trio.sleep(LOCAL_CHECK_S / 2 if self._ns_changed else LOCAL_CHECK_S / 10)
            self._local_wake = trio.Event()
            try:
                if self._ns_changed or not woken:
                    self._ns_changed = False
                    self._announce_closed_markers()
                for answer in [a for a in self.answers.values() if not a.answered and not a.fresh]:
                    await self._try_answer(answer)
                self._poll_when_drained()
            except StoreError as exc:
                log.info("cluster: answer failed (%s); retried at the next poll", exc)
            except Exception:
                log.exception("cluster: local check failed unexpectedly")

    def _poll_when_drained(self) -> None:
        """All our files just became durable: look for commits at once (one LIST), not at the next
        poll, so an announcement we have not seen yet is answered now."""
        pending = self._has_pending_files()
        if self._had_pending and not pending:
            self._poll_wake.set()
        self._had_pending = pending

    async def _outcome_loop(self) -> None:
        """While someone here waits for a commit this node answered, read its record (one GET)
        at `_poll_interval` instead of waiting for the pending index to drop it at the next poll."""
        while True:
            due = [a for a in self.answers.values()  # a fence has no outcome to read
                   if a.answered and not a.committed and not a.commit_id.startswith(rec.FENCE)]
            if not due or time.time() >= self._watched_until:
                with trio.move_on_after(self.config.cluster_poll_s):
                    await self._outcome_wake.wait()
                self._outcome_wake = trio.Event()
                continue
            now = time.time()
            interval = min(self._poll_interval(now - a.seen_at, a.members) for a in due)
            if interval >= self.config.cluster_poll_s:  # no faster than the poll: leave it to the poll
                await trio.sleep(interval)
                continue
            for answer in due:
                try:
                    await self._learn_outcome(answer)
                except StoreError as exc:
                    log.info("cluster: reading the outcome of %s failed (%s)", answer.scope, exc)
            await trio.sleep(interval)

    async def poll_once(self) -> None:
        """One look at the bucket: answer pending commits of others, learn finished ones, and
        apply other nodes' namespace records (and announce markers closed here)."""
        self._announce_closed_markers()
        self._forget_finished()
        async with self._poll_lock:
            await self._poll_pending()
            if self.namespace is not None:
                await self.namespace.poll_log()
            for answer in [a for a in self.answers.values() if a.fresh]:
                answer.fresh = False  # a rename recorded before the announcement is applied by now
                await self._try_answer(answer)

    # ---- answering other nodes' commits ----------------------------------------------------

    def _forget_finished(self) -> None:
        """Drop commits that finished long ago (a long run makes one per checkpoint)."""
        horizon = time.time() - FORGET_AFTER_S
        for scope, commit in list(self.held.items()):
            if commit.state in ("committed", "abandoned") and commit.finished_at and commit.finished_at < horizon:
                del self.held[scope]
        for cid, answer in list(self.answers.items()):
            if answer.committed and self.committed_scopes.get(answer.scope, 0) < horizon:
                del self.answers[cid]
        for scope, at in list(self.committed_scopes.items()):
            if at < horizon:
                del self.committed_scopes[scope]

    async def _poll_pending(self) -> None:
        open_ids = set()
        async for item in self.store.list_objects(rec.PENDING):
            parsed = rec.parse_pending_key(self.store.relative_key(item["Key"]))
            if parsed is None:
                continue
            scope, commit_id = parsed
            open_ids.add(commit_id)
            if (scope in self.held and self.held[scope].commit_id == commit_id) or commit_id in self.fence_ids:
                continue
            answer = self.answers.setdefault(commit_id, Answer(scope, commit_id))
            if not answer.answered and not answer.fresh:
                await self._try_answer(answer)
        for answer in list(self.answers.values()):
            if answer.commit_id not in open_ids and answer.commit_id.startswith(rec.FENCE):
                del self.answers[answer.commit_id]  # a fence has no outcome: its node is done with it
            elif answer.commit_id not in open_ids and not answer.committed:
                await self._learn_outcome(answer)

    async def _try_answer(self, answer: Answer) -> None:
        if answer.answered:
            return
        files = self._durable_files_of(answer.scope)
        if files is None:
            return
        body = rec.manifest_record(answer.scope, answer.commit_id, self.member, files)
        try:
            await self.store.put_record(rec.manifest_key(answer.scope, answer.commit_id, self.member), body,
                                        if_none_match=True)
        except StoreError as exc:
            if exc.code != "PreconditionFailed":
                raise
        answer.answered = True
        self._outcome_wake.set()
        if self.waiting.pop(answer.scope, None) is not None:
            self._lease_wake.set()
        log.info("cluster: answered commit %s of %s with %d files", answer.commit_id, answer.scope, len(files))

    def _durable_files_of(self, scope: str) -> list[dict] | None:
        """This node's files of `scope` if all of them are durable (empty if it has none), else None
        (and the pending ones are reported in the lease, for the holder's status)."""
        ino = self.ns.resolve(scope)
        if ino is None or not self.ns.getattr(ino).is_dir:
            return []
        pending = self.journal.all(
            SUBTREE_CTE + f"SELECT sub.i FROM sub JOIN inodes ON inodes.id = sub.i WHERE inodes.{PENDING_SQL} "
            "AND inodes.nlink > 0 AND (inodes.mode & 61440) <> 16384", (ino,))
        pending_dirs = self.ns.subtree_has_pending(ino)
        if pending or pending_dirs or self.staging.has_stale_own():  # staged copies go before the answer
            paths = [self.ns.path_of(i) for (i,) in pending[:WAITING_FILES_SHOWN]]
            info = {"pending_files": [p for p in paths if p], "pending_count": len(pending)}
            if self.waiting.get(scope) != info:
                self.waiting[scope] = info
                self._lease_wake.set()
            return None
        rows = self.journal.all(
            SUBTREE_CTE + "SELECT o.key, o.size, o.digest, o.etag FROM sub JOIN objects o ON o.inode = sub.i "
            "ORDER BY o.key", (ino,))
        return [{"key": k, "size": s, "digest": d, "etag": e} for k, s, d, e in rows]

    async def _learn_outcome(self, answer: Answer) -> None:
        try:
            raw, _ = await self.store.get_record(rec.commit_key(answer.scope))
        except NoSuchKey:
            self.answers.pop(answer.commit_id, None)  # the scope was deleted
            return
        record = json.loads(raw)
        if record.get("commit_id") != answer.commit_id:
            self.answers.pop(answer.commit_id, None)  # replaced by a newer round
            return
        answer.members = len(record.get("required", []))
        if record.get("state") == "committed":
            answer.committed = True
            self.committed_scopes[answer.scope] = time.time()
            self._adopt_markers(record)
        elif record.get("state") == "abandoned":
            self.answers.pop(answer.commit_id, None)

    def _adopt_markers(self, record: dict) -> None:
        """Show the published markers here at once (a DCP load or a restore on this node finds them)."""
        if self.listing is None:
            return
        for marker in record.get("marker_objects", []):
            try:
                self.listing.adopt_key(marker["key"], {"Size": marker.get("size", 0), "ETag": marker.get("etag", "")})
            except Exception:
                log.exception("cluster: could not show marker %s", marker.get("key"))

    # ---- holding a marker -------------------------------------------------------------------

    async def _hold_commit(self, commit: HeldCommit) -> None:
        try:
            await self._retrying(commit, self._announce)
            while commit.state == "waiting":
                if self._a_marker_is_gone(commit):  # the scope was removed (or its marker): no answer comes
                    await self._give_up(commit)
                    return
                await self._retrying(commit, self._check_answers)
                if commit.state == "waiting":
                    with trio.move_on_after(self._poll_interval(time.time() - commit.started_at)):
                        await commit.wake.wait()
                    commit.wake = trio.Event()
            if commit.state != "granted":
                return
            self.wake()
            await self._wait_markers_durable(commit)
            if commit.state == "granted" and not commit.alone:
                await self._retrying(commit, self._finish)
                await self._retrying(commit, self._drop_pending)
            elif commit.alone:
                commit.state, commit.finished_at = "committed", time.time()
        except Exception as exc:  # a bug must not end the daemon; the marker stays unpublished
            log.exception("cluster: commit of %s failed", commit.scope)
            commit.error = f"internal error: {exc!r}"

    async def _retrying(self, commit: HeldCommit, step) -> None:
        attempt = 0
        while True:
            try:
                return await step(commit)
            except StoreError as exc:
                attempt += 1
                commit.error = str(exc)
                delay = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** attempt) * random.uniform(0.5, 1.0)
                log.info("cluster: %s of %s: %s; retrying in %.1fs", step.__name__, commit.scope, exc, delay)
                await trio.sleep(delay)

    async def _list_leases(self) -> tuple[list[rec.Lease], float]:
        """Every lease record, and the server's clock now (estimated from our own last renewal)."""
        leases = []
        async for item in self.store.list_objects(rec.NODES):
            parsed = rec.parse_lease_key(self.store.relative_key(item["Key"]))
            if parsed is not None and item.get("LastModified") is not None:
                leases.append(rec.Lease(parsed[0], parsed[1], item["LastModified"].timestamp()))
        own = next((lease for lease in leases if lease.member == self.member), None)
        if own is None or self.renewed_local is None:
            return leases, time.time()
        return leases, own.renewed_at + (time.time() - self.renewed_local)

    def _closed_at(self, marker: str) -> float:
        ino = self.ns.resolve(marker)
        if ino is None:
            return time.time()
        return self.ns.getattr(ino).changed_at or time.time()

    async def _announce(self, commit: HeldCommit) -> None:
        while self.namespace is not None and self.namespace.unwritten:
            await trio.sleep(0.02)  # a rename into place is recorded before its commit is announced
        leases, server_now = await self._list_leases()
        closed_ago = max(0.0, time.time() - min(self._closed_at(m) for m in commit.markers))
        required = rec.required_members(leases, self.member, server_now - closed_ago - self.ttl_s)
        commit.required = required
        if required == [self.member]:
            commit.alone, commit.state = True, "granted"
            log.info("cluster: %s: no other node may have written into it; marker may publish", commit.scope)
            return
        commit.commit_id = rec.new_commit_id()
        key = rec.commit_key(commit.scope)
        body = rec.commit_record(commit.scope, commit.markers[0], commit.commit_id, self.member, required,
                                 time.time() - closed_ago)
        try:
            commit.etag = await self.store.put_record(key, body, if_none_match=True)
        except StoreError as exc:
            if exc.code != "PreconditionFailed":
                raise
            live = {lease.member for lease in leases if lease.renewed_at >= server_now - self.ttl_s}
            if not await self._take_over(commit, key, body, live):
                return
        await self.store.put_record(rec.pending_key(commit.scope, commit.commit_id), b"")
        files = self._durable_files_of(commit.scope) or []
        try:
            await self.store.put_record(rec.manifest_key(commit.scope, commit.commit_id, self.member),
                                        rec.manifest_record(commit.scope, commit.commit_id, self.member, files),
                                        if_none_match=True)
        except StoreError as exc:
            if exc.code != "PreconditionFailed":
                raise
        commit.state, commit.error = "waiting", None
        log.info("cluster: announced commit %s of %s; waiting for %d nodes", commit.commit_id, commit.scope,
                 len(required) - 1)

    async def _take_over(self, commit: HeldCommit, key: str, body: bytes, live: set[str]) -> bool:
        """A commit record exists: resume ours, replace a finished or orphaned one, or give way."""
        raw, etag = await self.store.get_record(key)
        existing = json.loads(raw)
        decision = rec.may_take_over(existing, self.member, live)
        if decision == "resume" and existing.get("state") in ("pending", "granted"):
            commit.commit_id, commit.required, commit.etag = existing["commit_id"], existing["required"], etag
            return True
        if decision in ("resume", "replace"):
            commit.etag = await self.store.put_record(key, body, if_match=etag)  # 412: a racer won; retried
            return True
        commit.state = "conflict"
        commit.error = f"scope is being committed by {existing.get('owner')}; this marker is never published"
        log.error("cluster: %s: %s", commit.scope, commit.error)
        return False

    async def _check_answers(self, commit: HeldCommit) -> None:
        assert commit.commit_id is not None  # set when the commit was announced
        keys = [self.store.relative_key(item["Key"]) async for item in
                self.store.list_objects(rec.manifest_prefix(commit.scope, commit.commit_id))]
        answered = rec.answered_members(keys, commit.scope, commit.commit_id)
        if rec.missing_members(commit.required, answered) and time.time() >= commit.retired_checked_at:
            commit.retired_checked_at = time.time() + self.config.cluster_poll_s  # retirements are rare
            async for item in self.store.list_objects(rec.RETIRED):
                parsed = rec.parse_lease_key(self.store.relative_key(item["Key"]), rec.RETIRED)
                if parsed is not None:
                    answered.add(f"{parsed[0]}@{parsed[1]}")
        commit.answered = (commit.answered | answered) & set(commit.required)  # answers are never withdrawn
        missing = rec.missing_members(commit.required, commit.answered)
        if not missing:
            await self._grant(commit)
            return
        await self._refresh_waiting_info(commit, missing)

    async def _grant(self, commit: HeldCommit) -> None:
        """Every node answered: record "granted" with If-Match on our ETag. If another node replaced
        the record meanwhile (it took us for lost), we lost the scope and never publish."""
        assert commit.commit_id is not None  # set when the commit was announced
        body = json.loads(rec.commit_record(commit.scope, commit.markers[0], commit.commit_id, self.member,
                                            commit.required, commit.started_at))
        body.update(state="granted", granted_at=time.time())
        try:
            commit.etag = await self.store.put_record(rec.commit_key(commit.scope), json.dumps(body).encode(),
                                                      if_match=commit.etag)
        except StoreError as exc:
            if exc.code not in ("PreconditionFailed", "NoSuchKey"):
                raise
            if exc.code == "PreconditionFailed":  # perhaps our own earlier attempt, its answer lost
                raw, etag = await self.store.get_record(rec.commit_key(commit.scope))
                record = json.loads(raw)
                if record.get("commit_id") == commit.commit_id and record.get("state") == "granted":
                    commit.etag, commit.state, commit.error = etag, "granted", None
                    return
            commit.state = "conflict"
            commit.error = "the commit record was replaced by another node; this marker is never published"
            log.error("cluster: %s: %s", commit.scope, commit.error)
            return
        commit.state, commit.error = "granted", None
        log.info("cluster: every node answered commit %s of %s", commit.commit_id, commit.scope)

    async def _refresh_waiting_info(self, commit: HeldCommit, missing: list[str]) -> None:
        """Every lease interval: what the nodes we wait for report (lease age, their pending files)."""
        stamp = commit.waiting_info.get("", {}).get("at", 0)
        if time.time() - stamp < self.interval_s:
            return
        commit.waiting_info[""] = {"at": time.time()}
        for member in missing[:WAITING_FILES_SHOWN]:
            node, _, inc = member.partition("@")
            try:
                raw, _ = await self.store.get_record(rec.lease_key(node, inc))
                lease = json.loads(raw)
                age = time.time() - float(lease.get("renewed_at", 0))
                mine = lease.get("waiting", {}).get(commit.scope, {})
                commit.waiting_info[member] = {"lease_age_s": round(age, 1), "lost": age > self.ttl_s,
                                               "pending_files": mine.get("pending_files", []),
                                               "pending_count": mine.get("pending_count")}
            except NoSuchKey:
                commit.waiting_info[member] = {"lost": True, "lease_age_s": None}

    def _a_marker_is_gone(self, commit: HeldCommit) -> bool:
        return any(self.ns.resolve(m) is None for m in commit.markers)

    async def _give_up(self, commit: HeldCommit) -> None:
        """A marker of the round is gone here: the round is abandoned (nothing blocks on it)."""
        commit.state, commit.finished_at = "abandoned", time.time()
        log.info("cluster: a marker of %s is gone; its commit is abandoned", commit.scope)
        if not commit.alone:
            await self._retrying(commit, self._abandon)

    async def _wait_markers_durable(self, commit: HeldCommit) -> None:
        while True:
            states = [self._marker_object(m) for m in commit.markers]
            if any(s == "gone" for s in states):
                await self._give_up(commit)
                return
            if all(isinstance(s, dict) for s in states):
                commit.marker_objects = states
                return
            with trio.move_on_after(0.1):  # the drain's note_durable wakes us at once
                await self._durable_wake.wait()

    def _marker_object(self, marker: str):
        ino = self.ns.resolve(marker)
        if ino is None:
            return "gone"
        if not self.ns.getattr(ino).durable:
            return "pending"
        row = self.journal.one("SELECT key, size, digest, etag FROM objects WHERE inode=? AND key=?", (ino, marker))
        if row is None:
            return "pending"
        return {"key": row[0], "size": row[1], "digest": row[2], "etag": row[3]}

    async def _finish(self, commit: HeldCommit) -> None:
        assert commit.commit_id is not None  # set when the commit was announced
        body = json.loads(rec.commit_record(commit.scope, commit.markers[0], commit.commit_id, self.member,
                                            commit.required, commit.started_at))
        body.update(state="committed", committed_at=time.time(), markers=commit.markers,
                    marker_objects=commit.marker_objects)
        await self._replace_commit_record(commit, body)
        commit.state, commit.finished_at = "committed", time.time()  # durable here at once
        log.info("cluster: commit %s of %s is complete", commit.commit_id, commit.scope)

    async def _drop_pending(self, commit: HeldCommit) -> None:
        """After the commit record says committed: take the commit off the index others poll."""
        assert commit.commit_id is not None  # set when the commit was announced
        await self.store.delete_object(rec.pending_key(commit.scope, commit.commit_id))

    async def _abandon(self, commit: HeldCommit) -> None:
        body = json.loads(rec.commit_record(commit.scope, commit.markers[0], commit.commit_id or "", self.member,
                                            commit.required, commit.started_at))
        body["state"] = "abandoned"
        if commit.commit_id:
            await self._replace_commit_record(commit, body)
            await self.store.delete_object(rec.pending_key(commit.scope, commit.commit_id))

    async def _replace_commit_record(self, commit: HeldCommit, body: dict) -> None:
        try:
            commit.etag = await self.store.put_record(rec.commit_key(commit.scope), json.dumps(body).encode(),
                                                      if_match=commit.etag)
        except NoSuchKey:
            log.info("cluster: the commit record of %s is gone (the scope was deleted)", commit.scope)
        except StoreError as exc:
            if exc.code != "PreconditionFailed":
                raise
            raw, etag = await self.store.get_record(rec.commit_key(commit.scope))
            if json.loads(raw).get("commit_id") != commit.commit_id:
                log.warning("cluster: the commit record of %s was replaced by another round", commit.scope)
                return
            commit.etag = etag
            raise

    # ---- lookups that miss ------------------------------------------------------------------

    async def lookup_remote(self, parent: int, name: bytes) -> bool:
        """A lookup missed here: does another node have this name? One bounded look at the bucket
        (and at other nodes' namespace records); True if the name was added to the namespace."""
        parent_path = self.ns.path_of(parent)
        if parent_path is None:
            return False
        text = name.decode("utf-8", "surrogateescape")
        if not parent_path and text == rec.PRIVATE_DIR:
            return False
        path = f"{parent_path}/{text}" if parent_path else text
        root = self.staging.owned_root(parent_path) if parent_path else None
        if root is not None and parent in self.staging.remote_dirs:
            await self.fence(root)  # a directory another node made in ours: its files are staged
            if self.ns.child_id(parent, name) is not None:
                return True
        if any(not a.committed and path.startswith(a.scope + "/") for a in self.answers.values()):
            self._watch()  # e.g. a rank waiting for the marker of a commit to be shown here
        with trio.move_on_after(self.config.remote_lookup_timeout_s):
            if root is not None and await self._adopt_staged_listing(root) and self.ns.child_id(parent, name):
                return True
            if self.namespace is not None:
                async with self._poll_lock:
                    await self.namespace.poll_log()
                if self.ns.child_id(parent, name) is not None:
                    return True
            found = await self._head_or_prefix(path)
            if found is None or self.listing is None:
                return False
            key, item = found
            self.listing.adopt_key(key, item)
            return self.ns.child_id(parent, name) is not None
        log.info("cluster: lookup of %s in the bucket timed out after %.1fs; answering ENOENT", path,
                 self.config.remote_lookup_timeout_s)
        return False

    # ---- staged files under our temporary directories -------------------------------------

    async def before_readdir(self, ino: int) -> None:
        """A directory under a temporary directory this node made is listed: first every other node
        stages what it closed there (a fence), so the listing shows their files."""
        path = self.ns.path_of(ino)
        root = self.staging.owned_root(path) if path else None
        if root is not None:
            await self.fence(root)

    async def fence(self, root: str) -> None:
        """Ask every other live node to stage what it closed under `root`, wait for their answers
        (at most FENCE_TIMEOUT_S) and adopt their staged files. A request that arrives while a fence
        is being announced joins it; one that arrives later starts the next."""
        asked = time.time()
        current = self._fences.get(root)
        if current is not None and (current.put_at is None or current.put_at >= asked):
            with trio.move_on_after(FENCE_TIMEOUT_S + 2):
                await current.done.wait()
            return
        fence = self._fences[root] = Fence(root)
        try:
            with trio.move_on_after(FENCE_TIMEOUT_S + 2):
                await self._run_fence(fence)
        except StoreError as exc:
            log.info("cluster: fence of %s failed (%s); listing what this node has", root, exc)
        finally:
            fence.done.set()
            if self._fences.get(root) is fence:
                del self._fences[root]

    async def _run_fence(self, fence: Fence) -> None:
        leases, server_now = await self._list_leases()
        others = {lease.member for lease in leases
                  if lease.renewed_at >= server_now - self.ttl_s and lease.member != self.member}
        if not others:
            return
        fence_id = rec.FENCE + rec.new_commit_id()
        self.fence_ids.add(fence_id)
        fence.put_at = time.time()
        await self.store.put_record(rec.pending_key(fence.root, fence_id), b"")
        answered: set[str] = set()
        try:
            with trio.move_on_after(FENCE_TIMEOUT_S):
                while not others <= answered:
                    keys = [self.store.relative_key(item["Key"]) async for item in
                            self.store.list_objects(rec.manifest_prefix(fence.root, fence_id))]
                    answered = rec.answered_members(keys, fence.root, fence_id) & others
                    if not others <= answered:
                        await trio.sleep(FENCE_CHECK_S)
            if not others <= answered:
                log.warning("cluster: %s: %s did not stage their files within %.0fs; listing without them",
                            fence.root, ", ".join(sorted(others - answered)), FENCE_TIMEOUT_S)
            for member in sorted(answered):
                raw, _ = await self.store.get_record(rec.manifest_key(fence.root, fence_id, member))
                self._adopt_staged(fence.root, json.loads(raw).get("files", []))
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for key in [rec.pending_key(fence.root, fence_id),
                            *(rec.manifest_key(fence.root, fence_id, m) for m in answered)]:
                    try:
                        await self.store.delete_object(key)
                    except StoreError:
                        pass
            self.fence_ids.discard(fence_id)

    async def _adopt_staged_listing(self, root: str) -> bool:
        """Adopt what other nodes have staged under `root` by now (one LIST; no waiting for them)."""
        try:
            files = [{"key": self.store.relative_key(item["Key"]), "size": item.get("Size", 0),
                      "etag": item.get("ETag", "")} async for item in self.store.list_objects(staged_prefix(root))]
        except StoreError as exc:
            log.info("cluster: listing the staged files of %s: %s", root, exc)
            return False
        return self._adopt_staged(root, files) > 0

    def _adopt_staged(self, root: str, files: list[dict]) -> int:
        """Show other nodes' staged files of `root` here, under their temporary names (local names win)."""
        added = 0
        for item in files:
            key = item.get("key", "")
            parsed = parse_staged_key(key)
            path = staged_path(key)
            if parsed is None or path is None or parsed[0] != root or parsed[1] == self.member:
                continue
            parent_path, _, name = path.rpartition("/")
            parent = self.ns.resolve(parent_path)  # directories come from the namespace records
            if parent is None or not self.ns.getattr(parent).is_dir:
                continue  # renamed here since it was staged: its writer stages it again
            name_b = name.encode("utf-8", "surrogateescape")
            if self.ns.child_id(parent, name_b) is None:
                self.ns.adopt_remote(parent, name_b, is_dir=False, size=int(item.get("size") or 0), key=key,
                                     etag=item.get("etag") or "")
                added += 1
        return added

    async def _head_or_prefix(self, path: str) -> tuple[str, dict] | None:
        try:
            head = await self.store.head_object(path)
            return path, {"Size": head.get("ContentLength", 0), "ETag": head.get("ETag", ""),
                          "LastModified": head.get("LastModified")}
        except NoSuchKey:
            pass
        except StoreError as exc:
            log.info("cluster: lookup of %s: %s", path, exc)
            return None
        try:
            async for _ in self.store.list_objects(path + "/", max_keys=1):
                return path + "/", {}
        except StoreError as exc:
            log.info("cluster: lookup of %s/: %s", path, exc)
        return None
