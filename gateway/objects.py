"""What this gateway believes the bucket holds: the journal's `objects` table.

A row with an inode holds that inode's published content. A row without one is *stale*: the drain
deletes it unless a live name maps to its key (then the next upload overwrites it). A row is
written stale before any request that may create its key (`intend`), so an object whose answer a
crash lost is still known, and deleted if nothing wants it (a file unlinked during its upload never
comes back from the listing).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from gateway.journal import Journal
from gateway.namespace import Namespace
from gateway.staging import staged_path


class ObjectBook:
    def __init__(self, journal: Journal, ns: Namespace):
        self.journal = journal
        self.ns = ns
        self.last_published_at: float | None = None

    def keys_of(self, ino: int) -> list[str]:
        return [r[0] for r in self.journal.all("SELECT key FROM objects WHERE inode=?", (ino,))]

    def intend(self, key: str, gen: int) -> None:
        """A request may create or replace `key`: known from now on, stale until `record`. What the
        key holds is unknown until then, so its ETag is forgotten: a request cancelled after the
        server stored it (an unlink during the upload) leaves an object that a delete If-Match on
        the old ETag would wrongly take for another writer's, and keep for good."""
        self.journal.execute("INSERT INTO objects (key, inode, size, stale_gen) VALUES (?, NULL, 0, ?) "
                             "ON CONFLICT (key) DO UPDATE SET etag=NULL", (key, gen))

    def record(self, key: str, ino: int, size: int, digest: str, etag: str, gen: int) -> None:
        """The bucket now holds `key`; it belongs to `ino` only if `ino` still has that name."""
        paths = self.ns.paths_of(ino)
        live = key.rstrip("/") in paths or staged_path(key) in paths  # a staged key: gateway/staging.py
        self.journal.execute(
            "INSERT OR REPLACE INTO objects (key, inode, size, digest, etag, stale_gen) VALUES (?, ?, ?, ?, ?, ?)",
            (key, ino if live else None, size, digest, etag, None if live else gen))
        self.last_published_at = time.time()

    def orphan(self, ino: int, gen: int, *, keep: Iterable[str] = ()) -> None:
        """Every object of `ino` (but those in `keep`) is stale from generation `gen` on."""
        keep = tuple(keep)
        self.journal.execute(f"UPDATE objects SET inode=NULL, stale_gen=? WHERE inode=? "
                             f"AND key NOT IN ({','.join('?' * len(keep))})", (gen, ino, *keep))

    def stash(self, key: str, stash_key: str, ino: int, size: int, digest: str, gen: int) -> None:
        """`key`'s content, which belongs to `ino`, now lives at `stash_key`; `key` is stale."""
        with self.journal.transaction():
            self.journal.execute("INSERT OR REPLACE INTO objects (key, inode, size, digest, etag) "
                                 "VALUES (?, ?, ?, ?, '')", (stash_key, ino, size, digest))
            self.journal.execute("UPDATE objects SET inode=NULL, stale_gen=? WHERE key=?", (gen, key))

    def displaced(self, key: str, ino: int) -> tuple[int, int, str] | None:
        """(inode, size, digest) if `key` holds the published content of another live file."""
        row = self.journal.one(
            "SELECT o.inode, o.size, o.digest FROM objects o JOIN inodes i ON i.id = o.inode "
            "WHERE o.key=? AND o.inode<>? AND i.nlink>0 AND i.content_dirty=0", (key, ino))
        if row is None or self.ns.path_of(row[0]) is None:
            return None
        return row[0], row[1], row[2]

    def stale(self, limit: int) -> list[tuple[str, int]]:
        """Stale keys and the generation that made each stale (oldest first)."""
        return self.journal.all("SELECT key, coalesce(stale_gen, 0) FROM objects WHERE inode IS NULL "
                                "ORDER BY stale_gen LIMIT ?", (limit,))

    def etag_of(self, key: str) -> str | None:
        """The ETag this gateway published at `key`, if it knows one (an interrupted request's is unknown)."""
        row = self.journal.one("SELECT etag FROM objects WHERE key=?", (key,))
        return row[0] if row and row[0] else None

    def deleted(self, key: str) -> None:
        self.journal.execute("DELETE FROM objects WHERE key=? AND inode IS NULL", (key,))
        self.ns.follower_markers.discard(key)

    def wanted(self, key: str, memo: dict[str, int | None] | None = None) -> bool:
        """Whether a live name maps to `key` (then a stale object there is overwritten, not deleted).
        A FIFO, socket or device at the name never overwrites it: the stale object goes.
        `memo`: see Namespace.resolve (one check of many keys, with no change in between)."""
        ino = self.ns.resolve(key.rstrip("/"), memo)
        if ino is None:
            return False
        attr = self.ns.getattr(ino)
        if key.endswith("/"):
            return attr.is_dir and not self.ns.has_children(ino)
        return not attr.is_dir and not attr.is_local_only

    def owned(self, key: str) -> bool:
        """Whether an interrupted upload of `key` may be this gateway's (start-up clean-up): a key it
        intended or published (a stale row, or one with the digest this gateway records), or a file
        it has yet to publish there. A key known only from the bucket (adopted: no digest), or a
        name that holds a directory, FIFO, socket or device here, is another writer's."""
        row = self.journal.one("SELECT inode IS NULL OR digest IS NOT NULL FROM objects WHERE key=?", (key,))
        if row is not None and row[0]:
            return True
        ino = self.ns.resolve(key)
        if ino is None:
            return False
        attr = self.ns.getattr(ino)
        return not attr.is_dir and not attr.is_local_only and not attr.durable
