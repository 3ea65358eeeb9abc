"""Directory changes that other nodes must see early: the namespace log under PREFIX/.ckptfs/log/.

A directory made, removed or renamed on this node becomes one small record (its whole content
is in the key, so a reader needs only LIST). Other nodes apply the records of every node but
their own, in key order, at each cluster poll (0.5 s while active) and before a lookup that
missed. A removal also sweeps the bucket: every object under the directory that is older than
the record goes, whoever wrote it; incomplete multipart uploads are never aborted (they may be a
live node's; the lifecycle rule ends abandoned ones). See docs/CLUSTER.md, "Namespace records".
"""

from __future__ import annotations

import logging
import threading
import time

import pyfuse3
import trio

from gateway import cluster_records as rec
from gateway.errors import FsError, NoSuchKey, StoreError
from gateway.namespace import ROOT_INODE, Namespace
from gateway.staging import STAGED, Staging
from gateway.store import Store

log = logging.getLogger(__name__)

LOG_SKEW_S = 30.0          # records are listed from this long before the newest one seen (clock skew)
LOG_RETENTION_S = 3600.0   # a node deletes its own records after this long
COALESCE_S = 0.05


class RemoteNamespace:
    """Writes this node's directory records and applies everyone else's."""

    def __init__(self, ns: Namespace, store: Store, node: str):
        self.ns = ns
        self.store = store
        self.node = node
        self.outbox: list[tuple[str, str, str | None]] = []
        self.written: list[tuple[float, str]] = []
        self.seen: dict[str, float] = {}
        self.seen_until = time.time() - LOG_SKEW_S
        self.applied = 0
        self.applying = False
        self.unwritten = 0         # records queued or being written (a commit waits for its rename's)
        self.removing: dict[str, int] = {}  # directory -> its removals not swept yet (see being_removed)
        self.staging: Staging | None = None
        self._n = 0
        self._wake = trio.Event()
        ns.on_event = self.note_event

    def note_event(self, op: str, path: str, to: str | None) -> None:
        """A local directory change (sync, from the namespace): queue its record."""
        if self.applying or not path or path.split("/")[0] == rec.PRIVATE_DIR:
            return
        if op == "rename" and to and self.staging is not None:
            self.staging.settle_foreign(to)  # other nodes' staged files are theirs to copy
        self.outbox.append((op, path, to))
        self.unwritten += 1
        if op == "rmdir":
            self.removing[path] = self.removing.get(path, 0) + 1
        self._wake.set()

    def being_removed(self, key: str) -> bool:
        """Whether `key` is under a directory this node removed and has not swept yet: what the
        bucket still holds there is going, and must not come back as entries here."""
        return any(key.startswith(path + "/") for path in self.removing)

    async def run(self) -> None:
        """Write queued records in order (retrying forever); sweep removed directories."""
        while True:
            await self._wake.wait()
            if any(op == "rmdir" for op, _, _ in self.outbox):
                await trio.sleep(COALESCE_S)  # rm -r: the rest of the tree follows at once
            self._wake = trio.Event()
            queued, self.outbox = self.outbox, []
            for op, path, to in coalesce(queued):
                await self._write_with_retry(op, path, to)
            self.unwritten -= len(queued)
            for path in [path for op, path, _ in queued if op == "rmdir"]:
                self.removing[path] -= 1
                if not self.removing[path]:
                    del self.removing[path]
            await self._expire_own()

    async def _write_with_retry(self, op: str, path: str, to: str | None) -> None:
        delay = 0.2
        while True:
            try:
                key = await self._write(op, path, to)
                if op == "rmdir":
                    await self._sweep(path, key)
                return
            except StoreError as exc:
                log.info("namespace record %s %s: %s; retrying in %.1fs", op, path, exc, delay)
                await trio.sleep(delay)
                delay = min(10.0, delay * 2)

    async def _write(self, op: str, path: str, to: str | None) -> str:
        self._n += 1
        now = time.time()
        key = rec.log_key(now, self.node, self._n, op, path, to)
        await self.store.put_record(key, b"")
        self.written.append((now, key))
        self.seen[key] = now
        return key

    async def _sweep(self, path: str, record_key: str) -> None:
        """Delete every object under a removed directory that predates its record (other nodes'
        objects too), and the commit records of scopes below it."""
        head = await self.store.head_object(record_key)
        cutoff = head["LastModified"].timestamp()
        doomed = []
        async for item in self.store.list_objects(path + "/"):
            key = self.store.relative_key(item["Key"])
            if item["LastModified"].timestamp() <= cutoff and not self._kept_by_sweep(key):
                doomed.append(key)
        quoted = rec.quote_path(path)
        for prefix in [*rec.scope_records_prefixes(path), f"{STAGED}{quoted}/", f"{STAGED}{quoted}%2F"]:
            async for item in self.store.list_objects(prefix):
                doomed.append(self.store.relative_key(item["Key"]))
        for key in doomed:
            try:
                await self.store.delete_object(key)
            except NoSuchKey:
                pass
        if doomed:
            log.info("removed %s: deleted %d objects under it in the bucket", path, len(doomed))

    def _kept_by_sweep(self, key: str) -> bool:
        """Whether this node made the name again since its removal (`rm -r d; mkdir d`) and wants the
        object: a file of that name (its upload may be the object already), or a directory marker
        this node published itself (another node's marker goes: if the directory is empty here,
        this node's drain publishes its own)."""
        if key.endswith("/"):
            return self.ns.journal.one("SELECT 1 FROM objects WHERE key=? AND inode IS NOT NULL", (key,)) is not None
        return self.ns.resolve(key) is not None

    async def _expire_own(self) -> None:
        while self.written and self.written[0][0] < time.time() - LOG_RETENTION_S:
            _, key = self.written.pop(0)
            try:
                await self.store.delete_object(key)
            except StoreError:
                pass

    # ---- applying other nodes' records -----------------------------------------------------

    async def poll_log(self) -> int:
        """List records since the newest seen (minus the skew window) and apply new ones."""
        start = rec.log_start_after(self.seen_until - LOG_SKEW_S)
        fresh = []
        async for item in self.store.list_objects(rec.LOG, start_after=start):
            key = self.store.relative_key(item["Key"])
            if key in self.seen:
                continue
            record = rec.parse_log_key(key)
            self.seen[key] = record.at if record else time.time()
            if record is not None and record.node != self.node:
                fresh.append(record)
        for record in fresh:
            self.seen_until = max(self.seen_until, record.at)
            self.apply(record)
        horizon = self.seen_until - 3 * LOG_SKEW_S
        for key in [k for k, at in self.seen.items() if at < horizon]:
            del self.seen[key]
        return len(fresh)

    def apply(self, record: rec.LogRecord) -> None:
        self.applying = True
        try:
            if record.op == "mkdir":
                fresh_root = self.staging.new_root(record.path) if self.staging is not None else None
                self.ensure_dirs(record.path)
                if fresh_root is not None and self.staging is not None:
                    self.staging.note_made_elsewhere(fresh_root)
            elif record.op == "rmdir":
                self._remove(record.path)
            elif record.op == "rename":
                self._rename(record.path, record.to or "")
            self.applied += 1
        except FsError as exc:
            log.info("namespace record %s %s from %s not applied here: %s", record.op, record.path, record.node, exc)
        finally:
            self.applying = False

    def ensure_dirs(self, path: str) -> int | None:
        """The directory at `path`, made (as known from another node) where missing; None if a file
        of one of those names exists here (local names win)."""
        ino = ROOT_INODE
        for part in filter(None, path.split("/")):
            name = part.encode("utf-8", "surrogateescape")
            child = self.ns.child_id(ino, name)
            if child is None:
                child = self.ns.adopt_remote(ino, name, is_dir=True)
                if self.staging is not None:
                    self.staging.remote_dirs.add(child)
            elif not self.ns.getattr(child).is_dir:
                return None
            ino = child
        return ino

    def _remove(self, path: str) -> None:
        ino = self.ns.resolve(path)
        if ino is None or ino == ROOT_INODE or not self.ns.getattr(ino).is_dir:
            return
        parent, name = self.ns.entry_of[ino]
        removed = self.ns.remove_tree(ino)
        forget_kernel_entry(parent, name)
        log.info("%s was removed on another node: dropped %d entries here", path, removed)

    def _rename(self, path: str, to: str) -> None:
        ino = self.ns.resolve(path)
        if ino is None or not self.ns.getattr(ino).is_dir:
            self.ensure_dirs(to)
            return
        parent_path, _, name = to.rpartition("/")
        new_parent = self.ensure_dirs(parent_path)
        if new_parent is None:
            return
        old_parent, old_name = self.ns.entry_of[ino]
        new_name = name.encode("utf-8", "surrogateescape")
        target = self.ns.child_id(new_parent, new_name)
        if target is None:
            self.ns.rename(old_parent, old_name, new_parent, new_name, 0)
            # the node that renamed it commits the scope (and gates it); here its files just follow
            self.ns.journal.execute("DELETE FROM scopes WHERE root=?", (ino,))
        elif self.ns.getattr(target).is_dir:
            self._merge(ino, target)
        if self.staging is not None:
            self.staging.forget(path)
        forget_kernel_entry(old_parent, old_name)
        log.info("%s was renamed to %s on another node: renamed here too", path, to)

    def _merge(self, source: int, target: int) -> None:
        """Move this node's entries of `source` into the existing directory `target`."""
        for _, name, child in self.ns.readdir(source, 0, limit=1 << 30):
            name = bytes(name)
            existing = self.ns.child_id(target, name)
            if existing is None:
                self.ns.rename(source, name, target, name, 0)
                self.ns.journal.execute("DELETE FROM scopes WHERE root=?", (child,))
            elif self.ns.getattr(existing).is_dir and self.ns.getattr(child).is_dir:
                self._merge(child, existing)
        if not self.ns.has_children(source):
            parent, name = self.ns.entry_of[source]
            self.ns.rmdir(parent, name)


def coalesce(batch: list[tuple[str, str, str | None]]) -> list[tuple[str, str, str | None]]:
    """Drop removals of directories whose ancestor is removed later in the same batch (rmtree
    removes bottom-up: one record for the top suffices), and makes of directories removed later."""
    out = []
    for i, (op, path, to) in enumerate(batch):
        later = [p for o, p, _ in batch[i + 1:] if o == "rmdir"]
        if op in ("rmdir", "mkdir") and any(path.startswith(p + "/") for p in later):
            continue
        if op == "mkdir" and path in later:
            continue
        out.append((op, path, to))
    return out


def forget_kernel_entry(parent: int, name: bytes) -> None:
    """Tell the kernel to forget a cached name, in a thread (the call may block; the kernel may not
    know the name: ENOENT). Best effort: the entry timeout bounds the staleness anyway."""
    def call() -> None:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except Exception:  # no mount (unit tests), or the kernel never looked the name up
            pass
    threading.Thread(target=call, name="invalidate-entry", daemon=True).start()
