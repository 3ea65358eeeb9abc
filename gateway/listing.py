"""Bring objects that exist only in the bucket into the namespace.

The whole prefix is listed once before the mount is ready (a fresh node sees every checkpoint),
then again every `metadata_ttl_s` in the background, so files written by other nodes appear
without any filesystem call waiting on the network. Keys that cannot be a POSIX path are skipped
with one warning each; keys under `.ckptfs/` are the gateway's own and stay hidden.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from gateway.errors import StoreError
from gateway.namespace import NAME_MAX, ROOT_INODE, Namespace
from gateway.store import PRIVATE_DIR, Store

log = logging.getLogger(__name__)


def key_components(key: str) -> list[str] | None:
    """The path components of a relative key, or None if the key cannot be a path in the mount."""
    if not key or key.startswith("/") or "\0" in key:
        return None
    parts = key.rstrip("/").split("/") if key.endswith("/") else key.split("/")
    if key.endswith("/") and key.rstrip("/") != key[:-1]:
        return None  # 'a//' : an empty component
    for part in parts:
        if part in ("", ".", "..") or len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            return None
    if parts[0] == PRIVATE_DIR:
        return None
    return parts


class BucketListing:
    """Merges listings of the prefix into the namespace (`sync_once`, `run`)."""

    def __init__(self, ns: Namespace, store: Store, ttl_s: float, *, follow_bucket: bool = False,
                 on_stale_entry: Callable[[int, bytes], None] = lambda parent, name: None):
        self.ns = ns
        self.store = store
        self.ttl_s = ttl_s
        # Several nodes (--cluster): files this node only knows from the bucket follow the bucket:
        # dropped when another node deleted the object, replaced when it overwrote it.
        self.follow_bucket = follow_bucket
        self.on_stale_entry = on_stale_entry  # the kernel must forget a cached name
        self.being_removed: Callable[[str], bool] = lambda key: False  # set in cluster mode (remote_ns)
        # cluster mode: directories this node keeps although the bucket does not show them (made by
        # another node's record, or under a temporary name): (inode, path) -> bool
        self.keeps_dir: Callable[[int, str], bool] = lambda ino, path: True
        self.dropped = 0
        self.refreshed = 0
        self.warned: set[str] = set()
        self.last_sync_at: float | None = None
        self.adopted = 0

    async def sync_once(self, *, reconcile: bool = False) -> int:
        """List the whole prefix and adopt unknown keys; returns how many entries were added.

        With `reconcile` (at mount, before the drain starts), objects the journal records but the
        bucket lacks are found too (see `_forget_missing`)."""
        known = dict(self.ns.journal.all("SELECT key, etag FROM objects"))
        listed: dict[str, dict] = {}
        added = 0
        async for item in self.store.list_objects(""):
            key = self.store.relative_key(item["Key"])
            listed[key] = item
            if key in known or self.being_removed(key):
                continue
            added += self._adopt(key, item)
        if reconcile:
            self._forget_missing(set(known) - set(listed))
        elif self.follow_bucket:
            self._follow(known, listed)
            self._drop_vanished_dirs(listed)
        self.last_sync_at = time.time()
        self.adopted += added
        if added:
            log.info("bucket listing: %d entries from the bucket added to the namespace", added)
        return added

    def adopt_key(self, key: str, item: dict) -> int:
        """Add one key found in the bucket (by a lookup or a cluster commit) unless it is known: a
        key this node holds stale is one it is deleting (a newer object there shows once that
        delete has found it rewritten, gateway/drain.py)."""
        if self.being_removed(key) or self.ns.journal.one("SELECT 1 FROM objects WHERE key=?", (key,)):
            return 0
        return self._adopt(key, item)

    def _follow(self, known: dict[str, str], listed: dict[str, dict]) -> None:
        """Clean files whose object vanished or changed in the bucket (another node deleted or
        overwrote it) follow the bucket. `known` was read before the listing started, so an upload
        that finished meanwhile is never mistaken for a deletion."""
        for key, etag in known.items():
            if key.endswith("/") or key.split("/", 1)[0] == PRIVATE_DIR:
                continue
            row = self.ns.journal.one("SELECT inode, etag FROM objects WHERE key=?", (key,))
            if row is None or row[0] is None or row[1] != etag or etag is None:
                continue  # stale, or changed by this node meanwhile
            ino = row[0]
            attr = self.ns.getattr(ino)
            if not attr.durable or attr.content_dirty or ino in self.ns.open or self.ns.path_of(ino) != key:
                continue
            item = listed.get(key)
            if item is not None and not etag:
                self.ns.journal.execute("UPDATE objects SET etag=? WHERE key=?", (item.get("ETag", ""), key))
                continue
            if item is not None and item.get("ETag") == etag:
                continue
            # Deleted, or overwritten: an overwrite shows as a new file under the name (a new
            # inode: with the writeback cache the kernel keeps its own size of a known inode).
            parent, name = self.ns.entry_of[ino]
            self.ns.forget_remote(ino, key)
            if item is None:
                self.dropped += 1
                log.info("%s was deleted from the bucket (by another node): dropped here", key)
            else:
                self._adopt(key, item)
                self.refreshed += 1
                log.info("%s was overwritten in the bucket (by another node): replaced here", key)
            self.on_stale_entry(parent, name)

    def _drop_vanished_dirs(self, listed: dict[str, dict]) -> None:
        """Empty directories known only from the bucket that it no longer shows (a listing or a
        lookup adopted them from objects another node's removal then swept) are dropped, deepest
        first. A directory of this node's own has its marker or a pending change, and is kept."""
        shown = {"/".join(parts[:i]) for key in listed for parts in [key.rstrip("/").split("/")]
                 for i in range(1, len(parts) + (1 if key.endswith("/") else 0))}
        dropped = True
        while dropped:
            dropped = False
            for ino in self.ns.empty_unpublished_dirs():
                path = self.ns.path_of(ino)
                if path is None or path in shown or self.keeps_dir(ino, path):
                    continue
                parent, name = self.ns.entry_of[ino]
                self.ns.forget_remote_dir(ino)
                self.on_stale_entry(parent, name)
                log.info("%s is no longer in the bucket (removed by another node): dropped here", path)
                dropped = True

    def _adopt(self, key: str, item: dict) -> int:
        parts = key_components(key)
        if parts is None:
            if key.split("/")[0] != PRIVATE_DIR and key not in self.warned:
                self.warned.add(key)
                log.warning("skipping object key %r: it cannot be a path inside the mount", key)
            return 0
        parent = ROOT_INODE
        added = 0
        dir_parts = parts if key.endswith("/") else parts[:-1]
        for part in dir_parts:
            child = self.ns.child_id(parent, part.encode("utf-8", "surrogateescape"))
            if child is None:
                child = self.ns.adopt_remote(parent, part.encode("utf-8", "surrogateescape"), is_dir=True)
                added += 1
            elif not self.ns.getattr(child).is_dir:
                self._warn_shadowed(key, "a file has the name of a directory component")
                return added
            parent = child
        if key.endswith("/"):
            return added
        name = parts[-1].encode("utf-8", "surrogateescape")
        existing = self.ns.child_id(parent, name)
        if existing is not None:
            if self.ns.getattr(existing).is_dir:
                self._warn_shadowed(key, "a directory of the same name shadows it")
            return added  # a local file of that name wins
        mtime_ns = int(item["LastModified"].timestamp() * 1e9) if item.get("LastModified") else 0
        self.ns.adopt_remote(parent, name, is_dir=False, size=int(item.get("Size", 0)), mtime_ns=mtime_ns,
                             key=key, etag=item.get("ETag", ""))
        return added + 1

    def _forget_missing(self, missing: set[str]) -> None:
        """The journal records these objects but the bucket does not hold them: the drain published
        a change (a delete, a rename) that a power loss then took out of the journal, or someone
        deleted them. A live file whose content is local is uploaded again; one whose content is
        not local cannot be read any more (logged); a directory gets its marker again."""
        for key in sorted(missing):
            row = self.ns.journal.one(
                "SELECT o.inode, i.cached, i.nlink FROM objects o JOIN inodes i ON i.id = o.inode WHERE o.key=?",
                (key,))
            self.ns.journal.execute("DELETE FROM objects WHERE key=?", (key,))
            if row is None or row[2] == 0 or self.ns.remote_key(row[0]) is not None:
                continue  # stale, or another object still holds the content
            ino, cached = row[0], row[1]
            if key.endswith("/"):
                self.ns.requeue(ino)
            elif cached:
                self.ns.content_changed(ino)
                self.ns.mark_ready(ino)
                log.warning("object %r is missing from the bucket: uploading the cached file again", key)
            else:
                log.error("object %r is missing from the bucket and its file is not cached: reading it fails", key)

    def _warn_shadowed(self, key: str, why: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning("skipping object key %r: %s", key, why)

    async def run(self) -> None:
        """Re-list every ttl; a failed listing is logged and retried next time."""
        while True:
            await trio.sleep(self.ttl_s)
            try:
                await self.sync_once()
            except StoreError as exc:
                log.warning("bucket listing failed (%s); retrying in %.0fs", exc, self.ttl_s)
