"""Status for users and tools: per-file state as xattrs and the daemon's status as JSON.

Read-only virtual attributes (never stored, never credentials):
  user.ckptfs.state   file: dirty | held | queued | uploading | durable;
                      directory: durable (it and everything below) | pending
  user.ckptfs.key     the object key the file is (or will be) stored under
  user.ckptfs.digest  xxh3-128 of the content last published
  user.ckptfs.status  (any inode, usually the mount root) the daemon status as one JSON object
  user.ckptfs.durable_after.G.MS  blocks until generation G is durable (or MS ms): see below

While the daemon drains after the unmount, the mount (and so its xattrs) is gone; it then writes
the same status object to DRAIN_STATUS_FILE in the cache dir, which `ckptfs unmount` shows.
"""

from __future__ import annotations

import errno
import json
import os
import time
from typing import TYPE_CHECKING

import trio

from gateway.errors import FsError
from gateway.namespace import ROOT_INODE

if TYPE_CHECKING:  # annotations only: gateway.daemon imports this module
    from gateway.cluster import Cluster
    from gateway.daemon import BackgroundErrors
    from gateway.fs import Operations
    from gateway.reader import Reader
    from gateway.space import SpaceGuard

DRAIN_STATUS_FILE = "drain-status.json"
# getxattr(mount, "user.ckptfs.durable_after.G.MS") answers once every change up to namespace
# generation G is in the bucket, or after MS milliseconds (at most WAIT_MAX_MS), with the
# generation durable then: `ckptfs wait` blocks on it instead of polling the status.
DURABLE_AFTER_XATTR = b"user.ckptfs.durable_after."
WAIT_MAX_MS = 1000


class Control:
    def __init__(self, ns, cache, drain, journal, config, started_at: float | None = None):
        self.ns = ns
        self.cache = cache
        self.drain = drain
        self.journal = journal
        self.config = config
        self.started_at = started_at or time.time()
        self.ops: Operations | None = None  # for op counters
        self.backpressure: SpaceGuard | None = None  # when a cache size is enforced
        self.reader: Reader | None = None  # bytes fetched from the bucket
        self.cluster: Cluster | None = None  # with --cluster
        self.background: BackgroundErrors | None = None  # errors that escaped a background task

    async def commit_durable(self) -> None:
        """Make every journal commit so far survive power loss (fsync, fsyncdir)."""
        await trio.to_thread.run_sync(self.journal.sync_wal)

    async def durable_after(self, name: bytes) -> bytes:
        """The answer to DURABLE_AFTER_XATTR; ENODATA for a malformed name."""
        try:
            gen, wait_ms = (int(part) for part in name[len(DURABLE_AFTER_XATTR):].split(b"."))
        except ValueError:
            raise FsError(errno.ENODATA) from None
        wait_s = min(max(wait_ms, 0), WAIT_MAX_MS) / 1000
        return str(await self.drain.wait_durable(gen, wait_s)).encode()

    def get_xattr(self, ino: int, name: bytes) -> bytes:
        if name == b"user.ckptfs.state":
            return self.state_of(ino).encode()
        if name == b"user.ckptfs.node_state":
            return self.node_state_of(ino).encode()
        if name == b"user.ckptfs.key":
            path = self.ns.path_of(ino)
            if path is None:
                raise FsError(errno.ENODATA)
            return self.full_key(path + ("/" if self.ns.getattr(ino).is_dir else "")).encode()
        if name == b"user.ckptfs.digest":
            digest = self.ns.getattr(ino).digest
            if not digest:
                raise FsError(errno.ENODATA)
            return digest.encode()
        if name == b"user.ckptfs.status":
            return json.dumps(self.status(), sort_keys=True).encode()
        raise FsError(errno.ENODATA)

    def full_key(self, path: str) -> str:
        return f"{self.config.prefix}/{path}" if self.config.prefix else path

    def state_of(self, ino: int) -> str:
        """Cluster-wide for a directory: not durable while a commit of it (or below) that this
        node knows of is incomplete, whatever this node's own files say."""
        state = self.node_state_of(ino)
        if state == "durable" and self.cluster is not None and self.ns.getattr(ino).is_dir:
            path = self.ns.path_of(ino)
            if path is not None and self.cluster.blocks_durable(path):
                return "pending"
        return state

    def node_state_of(self, ino: int) -> str:
        """This node's own view: its files and directories only."""
        attr = self.ns.getattr(ino)
        if attr.is_dir:
            return "pending" if self._subtree_pending(ino) else "durable"
        return self.drain.state_of(attr)

    def _subtree_pending(self, ino: int) -> bool:
        if ino != ROOT_INODE and not self.ns.getattr(ino).durable:
            return True
        return self.ns.subtree_has_pending(ino)

    def status(self) -> dict:
        """The status object shown by `ckptfs status --json` (and used by `ckptfs wait`)."""
        now = time.time()
        view = self.drain.view
        counters = self.drain.counters
        cache_stats = self.cache.statistics()
        status = {
            "mountpoint": self.config.mountpoint,
            "bucket": self.config.bucket,
            "prefix": self.config.prefix,
            "endpoint_url": self.config.endpoint_url,
            "cache_dir": self.config.cache_dir,
            "pid": os.getpid(),
            "uptime_s": round(now - self.started_at, 3),
            "drain_timeout_s": self.config.drain_timeout_s,
            "cache_used_bytes": cache_stats.used_bytes,
            "spare_data_files": len(self.cache.spares),
            "creates_without_spare_total": self.cache.spares.missed,
            "dirty_files": view.dirty_files,
            "queued_files": view.queued_files,
            "uploading_files": view.uploading_files,
            "held_files": view.held_files,
            "pending_files": view.dirty_files + view.queued_files + view.uploading_files,
            "dirty_bytes": view.dirty_bytes,
            "stale_objects": view.stale_objects,
            "durable_files": self._durable_files(),
            "oldest_pending_age_s": None if view.oldest_pending_at is None else round(now - view.oldest_pending_at, 3),
            "newest_durable_age_s": None if counters.newest_durable_change_at is None
            else round(now - counters.newest_durable_change_at, 3),
            "drain_rate_bps": round(self.drain.drain_rate_bps()),
            "uploaded_bytes_total": counters.uploaded_bytes,
            "uploaded_files_total": counters.uploaded_files,
            "copied_files_total": counters.copied_files,
            "digest_passes_total": counters.digest_passes,
            "scheduler_passes_total": counters.scheduler_passes,
            "drain_yielded_seconds_total": round(self.drain.publisher.foreground.yielded_s, 3),
            "part_buffers_allocated_total": self.drain.publisher.buffers.allocated,
            "part_buffer_collections_total": self.drain.publisher.buffers.collections,
            "scheduler_pass_seconds_total": round(counters.scheduler_pass_s, 3),
            "deleted_objects_total": counters.deleted_objects,
            "retries_total": counters.retries,
            "errors_total": counters.errors,
            "last_error": counters.last_error,
            "last_error_age_s": None if counters.last_error_at is None else round(now - counters.last_error_at, 3),
            "generation": self.ns.gen,
            "durable_through_generation": view.durable_through_gen,
            # since a commit scope (a checkpoint) last became durable; since the mount if none has
            "newest_durable_checkpoint_age_s": round(now - (counters.newest_durable_scope_at or self.started_at), 3),
            "commit_waits": self.drain.commit_waits(),
            "failsafe": self.journal.failed,  # why the journal cannot be written (the mount is read-only)
        }
        if self.background is not None:
            status["background_errors_total"] = self.background.count
            status["last_background_error"] = self.background.last
        if self.backpressure is not None:
            status.update(self.backpressure.statistics())
        if self.reader is not None:
            status["fetched_bytes_total"] = self.reader.fetched_bytes
            status["digest_failures_total"] = self.reader.digest_failures
            status["fetch_retries_total"] = self.reader.retries
            status["fetch_errors_total"] = self.reader.errors
        if self.ops is not None:
            status["fuse_ops_total"] = dict(self.ops.op_counts)
        if self.cluster is not None:
            status["cluster"] = self.cluster.status()
        return status

    async def publish_status(self, path: str, interval_s: float = 0.2) -> None:
        """Write status() to `path` (temp + rename) every `interval_s` until cancelled; then remove it."""
        tmp = path + ".tmp"
        try:
            while True:
                data = json.dumps(self.status(), sort_keys=True).encode()
                await trio.to_thread.run_sync(_replace_file, tmp, path, data)
                await trio.sleep(interval_s)
        finally:
            for name in (tmp, path):
                try:
                    os.unlink(name)
                except OSError:
                    pass

    def _durable_files(self) -> int:
        return self.journal.one(
            "SELECT count(*) FROM inodes WHERE state='durable' AND nlink>0 AND (mode & 61440) = 32768")[0]


def _replace_file(tmp: str, path: str, data: bytes) -> None:
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
