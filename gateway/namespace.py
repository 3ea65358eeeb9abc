"""Inodes, directory entries and per-file drain state, kept in the journal.

Every method is synchronous and commits before it returns, so a namespace change that was answered
survives kill -9 of the daemon (the WAL is in the page cache). Errors are `FsError(errno)`.
Lookup counts and open handles are in memory: the kernel forgets them when the daemon dies.
A file's state (gateway/file_state.py) changes only in `_move_to`, which checks the transition.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import stat
import time
from collections.abc import Callable

import xxhash

from gateway.errors import FsError
from gateway.file_state import (
    DIRTY, DURABLE, LOCAL_ONLY_TYPES, PENDING_SQL, QUEUED, UPLOADING, FileState, check, is_local_only,
)
from gateway.journal import Journal

log = logging.getLogger(__name__)

ROOT_INODE = 1
# Every inode below the directory given as the parameter (not the directory itself).
SUBTREE_CTE = ("WITH RECURSIVE sub(i) AS (SELECT inode FROM dentries WHERE parent=? "
               "UNION ALL SELECT d.inode FROM dentries d JOIN sub ON d.parent = sub.i) ")
NAME_MAX = 255
# File types that live only in this mount: never uploaded, always durable (docs/SEMANTICS.md).
LOCAL_ONLY_SQL = f"(mode & 61440) IN ({', '.join(str(t) for t in LOCAL_ONLY_TYPES)})"
INODE_COLUMNS = (
    "id, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, rdev, target, nlink, "
    "content_dirty, state, ready_seq, changed_gen, changed_at, digest, cached"
)


@dataclasses.dataclass(slots=True)
class Attr:
    """One inode row. `size` and `mtime_ns` include writes not yet recorded in the journal."""

    id: int
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int
    target: bytes | None
    nlink: int
    content_dirty: int
    state: FileState
    ready_seq: int | None
    changed_gen: int
    changed_at: float
    digest: str | None
    cached: int

    def __post_init__(self) -> None:
        self.state = FileState(self.state)

    @property
    def durable(self) -> bool:
        return self.state is DURABLE

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_local_only(self) -> bool:
        return is_local_only(self.mode)


@dataclasses.dataclass(slots=True)
class OpenState:
    """In-memory state of a file with open handles; writes update it without touching SQL."""

    handles: int = 0
    writers: int = 0
    version: int = 0          # bumped on every content change; the drain compares it around an upload
    size: int | None = None   # current size while writes are pending in memory
    mtime_ns: int | None = None
    ctime_ns: int | None = None  # set by a times-only setattr of a file being written
    written: bool = False     # written since the journal last recorded size and mtime
    recorded: bool = False    # the journal holds `size` and the times (flushed, nothing since)
    hasher: xxhash.xxh3_128 | None = None  # xxh3-128 of the content, while it is written strictly sequentially from 0
    hashed: int = 0           # bytes fed to `hasher`


def now_ns() -> int:
    return time.time_ns()


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if b"/" in name or b"\0" in name or name in (b"", b".", b".."):
        raise FsError(errno.EINVAL)


class Namespace:
    """The file tree. `on_change` is called (synchronously) after any change the drain must see;
    `on_change(delayed=False)` after a rename whose files keep the time of their last change (they
    may be due at once, not a drain delay from now)."""

    def __init__(self, journal: Journal, *, uid: int, gid: int, on_purge: Callable[[int], None]):
        self.journal = journal
        self.on_purge = on_purge
        self.on_change: Callable[..., None] = lambda delayed=True: None
        self.on_removed: Callable[[int], None] = lambda ino: None  # a name was removed: cancel its uploads
        # Whether a path is a temporary name (the drain's hold rule). A rename into one restarts the
        # hold limit and the drain delay; a rename to a final name keeps the time of the last change
        # of content, so that a file renamed into place is uploaded without waiting the delay again.
        self.is_temporary: Callable[[str], bool] = lambda path: True
        # Directory changes other nodes must see (op, path, new path): gateway/remote_ns.py in cluster mode.
        self.on_event: Callable[[str, str, str | None], None] | None = None
        self.lookups: dict[int, int] = {}
        self.open: dict[int, OpenState] = {}
        # inode -> its names (parent, name), oldest first; the first is the canonical one (path_of),
        # also kept in entry_of: inode -> canonical (parent, name)
        self.names_of: dict[int, list[tuple[int, bytes]]] = {}
        self.renames = 0  # bumped whenever an existing inode's names change (rename, link, unlink)
        self.entry_of: dict[int, tuple[int, bytes]] = {}
        self.written_digests: dict[int, tuple[str, int]] = {}  # inode -> (xxh3, size) hashed while written
        self.purge_listeners: list[Callable[[int], None]] = []  # per-inode state elsewhere, dropped on purge
        # Directories another node's change emptied here: their marker waits for a look at the
        # namespace log (gateway/drain.py, _sync_directory). In memory only.
        self.emptied_elsewhere: set[int] = set()
        self.follower_markers: set[str] = set()  # markers published for such directories (see _hand_over_object)
        self.owner = (uid, gid)
        self._ensure_root(uid, gid)
        self._count_subdirs()
        self._load_tree()
        self.gen = int(journal.one("SELECT coalesce(max(changed_gen), 0) FROM inodes")[0])
        self.seq = int(journal.one("SELECT coalesce(max(ready_seq), 0) FROM inodes")[0])

    # ---- loading -------------------------------------------------------------------------

    def _ensure_root(self, uid: int, gid: int) -> None:
        if self.journal.one("SELECT id FROM inodes WHERE id=?", (ROOT_INODE,)) is None:
            t = now_ns()
            self.journal.execute(
                "INSERT INTO inodes (id, mode, uid, gid, atime_ns, mtime_ns, ctime_ns, nlink, "
                "content_dirty, state) VALUES (?, ?, ?, ?, ?, ?, ?, 2, 0, 'durable')",
                (ROOT_INODE, stat.S_IFDIR | 0o755, uid, gid, t, t, t),
            )

    def _count_subdirs(self) -> None:
        """Directory link counts (2 + subdirectories), also for journals written before they were kept."""
        self.journal.execute(
            "UPDATE inodes SET nlink = 2 + (SELECT count(*) FROM dentries d JOIN inodes c ON c.id = d.inode "
            "WHERE d.parent = inodes.id AND (c.mode & 61440) = 16384) WHERE (mode & 61440) = 16384 AND nlink > 0")

    def _load_tree(self) -> None:
        for parent, name, inode in self.journal.all("SELECT parent, name, inode FROM dentries ORDER BY id"):
            self.names_of.setdefault(inode, []).append((parent, bytes(name)))
        for inode in self.names_of:
            self._names_changed(inode)

    # ---- reading -------------------------------------------------------------------------

    def getattr(self, ino: int) -> Attr:
        row = self.journal.one(f"SELECT {INODE_COLUMNS} FROM inodes WHERE id=?", (ino,))
        if row is None:
            raise FsError(errno.ENOENT)
        attr = Attr(*row)
        state = self.open.get(ino)
        if state is not None:
            if state.size is not None:
                attr.size = state.size
            if state.mtime_ns is not None:
                attr.mtime_ns = state.mtime_ns
            if state.ctime_ns is not None:
                attr.ctime_ns = state.ctime_ns
        return attr

    def lookup(self, parent: int, name: bytes) -> Attr:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if name == b".":
            return self.getattr(parent)
        if name == b"..":
            return self.getattr(self.parent_of(parent))
        row = self.journal.one("SELECT inode FROM dentries WHERE parent=? AND name=?", (parent, name))
        if row is None:
            if not self.getattr(parent).is_dir:
                raise FsError(errno.ENOTDIR)
            raise FsError(errno.ENOENT)
        return self.getattr(row[0])

    def child_id(self, parent: int, name: bytes) -> int | None:
        row = self.journal.one("SELECT inode FROM dentries WHERE parent=? AND name=?", (parent, name))
        return None if row is None else row[0]

    def readdir(self, ino: int, start_id: int, limit: int = 512) -> list[tuple[int, bytes, int]]:
        """Entries after offset `start_id` as (next_offset, name, inode)."""
        return self.journal.all(
            "SELECT id, name, inode FROM dentries WHERE parent=? AND id>? ORDER BY id LIMIT ?",
            (ino, start_id, limit),
        )

    def has_children(self, ino: int) -> bool:
        return self.journal.one("SELECT 1 FROM dentries WHERE parent=? LIMIT 1", (ino,)) is not None

    def has_published_children(self, ino: int) -> bool:
        """Whether directory `ino` holds an entry that becomes an object (not only FIFOs, sockets, devices)."""
        return self.journal.one(
            "SELECT 1 FROM dentries d JOIN inodes i ON i.id = d.inode "
            f"WHERE d.parent=? AND NOT {LOCAL_ONLY_SQL.replace('mode', 'i.mode')} LIMIT 1", (ino,)) is not None

    def parent_of(self, ino: int) -> int:
        """The directory holding `ino`'s canonical name (the root for the root or an unlinked inode)."""
        names = self.names_of.get(ino)
        return names[0][0] if names else ROOT_INODE

    def path_of(self, ino: int) -> str | None:
        """The canonical path relative to the mount root ('' for the root), or None if unlinked.

        A file with several hard links has one path per name (`paths_of`); this is the oldest name.
        """
        parts: list[bytes] = []
        while ino != ROOT_INODE:
            names = self.names_of.get(ino)
            if not names:
                return None
            ino, name = names[0]
            parts.append(name)
        return "/".join(p.decode("utf-8", "surrogateescape") for p in reversed(parts))

    def paths_of(self, ino: int) -> list[str]:
        """Every path of `ino` (one per hard link), oldest name first; [] if unlinked, [''] for the root."""
        if ino == ROOT_INODE:
            return [""]
        paths = (self.path_of_name(parent, name) for parent, name in self.names_of.get(ino, ()))
        return [p for p in paths if p is not None]

    def path_of_name(self, parent: int, name: bytes) -> str | None:
        """The path of entry `name` in directory `parent`, or None if the directory is unlinked."""
        base = self.path_of(parent)
        if base is None:
            return None
        text = name.decode("utf-8", "surrogateescape")
        return f"{base}/{text}" if base else text

    def resolve(self, path: str, memo: dict[str, int | None] | None = None) -> int | None:
        """The inode at `path` (relative to the root), or None. `memo` (directory path -> inode)
        lets a caller resolving many keys of one tree in one go look each directory up once."""
        if memo is None or "/" not in path:
            return self._resolve(path)
        head, _, name = path.rpartition("/")
        if head not in memo:
            memo[head] = self._resolve(head)
        parent = memo[head]
        return None if parent is None or not name else self.child_id(parent, name.encode("utf-8", "surrogateescape"))

    def _resolve(self, path: str) -> int | None:
        ino = ROOT_INODE
        for part in filter(None, path.split("/")):
            child = self.child_id(ino, part.encode("utf-8", "surrogateescape"))
            if child is None:
                return None
            ino = child
        return ino

    def descendants(self, ino: int) -> list[int]:
        """All inodes below directory `ino` (not `ino` itself)."""
        return [r[0] for r in self.journal.all(SUBTREE_CTE + "SELECT i FROM sub", (ino,))]

    def subtree_has_pending(self, ino: int) -> bool:
        """Whether any inode below directory `ino` is not durable."""
        row = self.journal.one(
            SUBTREE_CTE + f"SELECT 1 FROM sub JOIN inodes ON inodes.id = sub.i WHERE inodes.{PENDING_SQL} LIMIT 1",
            (ino,))
        return row is not None

    # ---- creating and removing ----------------------------------------------------------

    def create(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int, *, target: bytes | None = None,
        rdev: int = 0,
    ) -> Attr:
        self._check_new_entry(parent, name)
        t = now_ns()
        gen = self._next_gen()
        is_dir = stat.S_ISDIR(mode)
        local_only = is_local_only(mode)
        # A new file is not ready until its creator closes it; directories and symlinks are ready now.
        # FIFOs, sockets and devices are never published: durable from the start, never pending.
        ready = None if stat.S_ISREG(mode) or local_only else self._next_seq()
        state = DURABLE if local_only else DIRTY if ready is None else QUEUED
        with self.journal.transaction():
            cur = self.journal.execute(
                "INSERT INTO inodes (mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, rdev, target, "
                "nlink, content_dirty, state, ready_seq, changed_gen, changed_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (mode, uid, gid, len(target or b""), t, t, t, rdev, target, 2 if is_dir else 1,
                 int(not local_only), state, ready, gen, time.time()),
            )
            ino = cur.lastrowid
            assert ino is not None  # set by the INSERT above
            self.journal.execute(
                "INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)", (parent, name, ino)
            )
            if is_dir:
                self._add_subdirs(parent, 1)
            self._touch_dir(parent, t, gen)
        self.names_of[ino] = [(parent, name)]
        self._names_changed(ino)
        self.on_change()
        if is_dir and self.on_event is not None:
            self.on_event("mkdir", self.path_of(ino) or "", None)
        return self.getattr(ino)

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        """A hard link: one more name for a file. Each name is published as its own object."""
        attr = self.getattr(ino)
        if attr.is_dir:
            raise FsError(errno.EPERM)
        if attr.nlink == 0:
            raise FsError(errno.ENOENT)
        self._check_new_entry(new_parent, new_name)
        t = now_ns()
        gen = self._next_gen()
        with self.journal.transaction():
            self.journal.execute(
                "INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)", (new_parent, new_name, ino))
            self.journal.execute("UPDATE inodes SET nlink=nlink+1, ctime_ns=? WHERE id=?", (t, ino))
            self._touch_dir(new_parent, t, gen)
            self._mark_moved(ino, gen)  # the new name needs its object
        self.names_of.setdefault(ino, []).append((new_parent, new_name))
        self._names_changed(ino)
        self.on_change()
        return self.getattr(ino)

    def _check_new_entry(self, parent: int, name: bytes) -> None:
        """`name` can be added to `parent`: a valid name, a live directory, not taken."""
        check_name(name)
        parent_attr = self.getattr(parent)
        if not parent_attr.is_dir:
            raise FsError(errno.ENOTDIR)
        if parent_attr.nlink == 0:
            raise FsError(errno.ENOENT)
        if self.child_id(parent, name) is not None:
            raise FsError(errno.EEXIST)

    def unlink(self, parent: int, name: bytes) -> int:
        ino = self._existing_child(parent, name)
        if self.getattr(ino).is_dir:
            raise FsError(errno.EISDIR)
        self._remove_entry(parent, name, ino)
        return ino

    def rmdir(self, parent: int, name: bytes) -> int:
        ino = self._existing_child(parent, name)
        if not self.getattr(ino).is_dir:
            raise FsError(errno.ENOTDIR)
        if self.has_children(ino):
            raise FsError(errno.ENOTEMPTY)
        path = self.path_of(ino) if self.on_event is not None else None
        self._remove_entry(parent, name, ino)
        if path is not None and self.on_event is not None:
            self.on_event("rmdir", path, None)
        return ino

    def remove_tree(self, ino: int) -> int:
        """Drop a directory and everything below it (another node deleted it); returns names removed."""
        removed = 0
        for _, name, child in self.readdir(ino, 0, limit=1 << 30):
            if self.getattr(child).is_dir:
                removed += self.remove_tree(child)
            else:
                self._remove_entry(ino, bytes(name), child, follow=True)
                removed += 1
        entry = self.entry_of.get(ino)
        if entry is not None and ino != ROOT_INODE:
            self._remove_entry(entry[0], entry[1], ino, follow=True)
            removed += 1
        return removed

    def _existing_child(self, parent: int, name: bytes) -> int:
        if name in (b".", b".."):
            raise FsError(errno.EINVAL if name == b"." else errno.ENOTEMPTY)
        ino = self.child_id(parent, name)
        if ino is None:
            self.getattr(parent)
            raise FsError(errno.ENOENT)
        return ino

    def _remove_entry(self, parent: int, name: bytes, ino: int, *, follow: bool = False,
                      marker_if_emptied: bool = True) -> None:
        """Drop the name; its object becomes stale (deleted by the drain); data goes with the last name,
        when the kernel forgets the inode. `follow`: the name went on another node, whose change
        it is. The parent gets a new mtime; if that emptied it, it needs its marker, which the
        drain publishes only after a look at the namespace log (`emptied_elsewhere`: a marker
        published from here while a removal of the directory is on its way would land after
        that node's sweep and bring the directory back). The object at the name is that node's
        to delete: its sweep removes what predates its record, and a delete from here could
        remove what it wrote there since (gateway/remote_ns.py)."""
        t = now_ns()
        gen = self._next_gen()
        attr = self.getattr(ino)
        with self.journal.transaction():
            if follow and (attr.is_dir or attr.nlink <= 1):  # a hard link's object may be its content's only copy
                self._hand_over_object(parent, name, attr)
            self._drop_name(parent, name, attr, t, gen)
            emptied_here = marker_if_emptied and parent != ROOT_INODE and not self.has_children(parent)
            if not follow:
                self._touch_dir(parent, t, gen)
            elif emptied_here:
                self._touch_dir(parent, t, gen)
                self.emptied_elsewhere.add(parent)
            else:
                self.journal.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE id=?", (t, t, parent))
        self._forget_name(ino, parent, name)
        self.on_change()

    def _drop_name(self, parent: int, name: bytes, attr: Attr, t: int, gen: int) -> None:
        """Inside a transaction: delete the entry `name` of `attr`. Only that name's object goes stale;
        an inode with other names (hard links) keeps them and their objects."""
        self.journal.execute("DELETE FROM dentries WHERE parent=? AND name=?", (parent, name))
        if attr.is_dir or attr.nlink <= 1:
            self._move_to(attr.id, DURABLE, "nlink=0, ctime_ns=?, ready_seq=NULL", (t,))  # nothing to publish
            self.journal.execute("UPDATE objects SET inode=NULL, stale_gen=? WHERE inode=?", (gen, attr.id))
            if attr.is_dir:
                self._add_subdirs(parent, -1)
            return
        self.journal.execute("UPDATE inodes SET nlink=nlink-1, ctime_ns=? WHERE id=?", (t, attr.id))
        key = self.path_of_name(parent, name)
        only_copy = not attr.cached and not self._published_elsewhere(attr.id, key)
        if not only_copy:
            self.journal.execute("UPDATE objects SET inode=NULL, stale_gen=? WHERE key=? AND inode=?",
                                 (gen, key, attr.id))
        # else the object is the only copy of content the cache does not hold: it stays the inode's, the
        # source the drain copies to the other names before it orphans it.
        if only_copy or (parent, name) == self.names_of.get(attr.id, [None])[0]:
            self._mark_moved(attr.id, gen)  # the drain looks at the other names again

    def _hand_over_object(self, parent: int, name: bytes, attr: Attr) -> None:
        """Inside a transaction: forget the published object at this name without deleting it. A
        marker published because another node emptied the directory is this node's own to
        delete: it may have landed after the remover's sweep."""
        path = self.path_of_name(parent, name)
        if path is not None:
            key = path + "/" if attr.is_dir else path
            if key in self.follower_markers:
                self.follower_markers.discard(key)
                return
            self.journal.execute("DELETE FROM objects WHERE key=? AND inode=?", (key, attr.id))

    def _published_elsewhere(self, ino: int, key: str | None) -> bool:
        """Whether an object other than `key` holds `ino`'s content."""
        return self.journal.one("SELECT 1 FROM objects WHERE inode=? AND key IS NOT ? AND key NOT LIKE '%/' LIMIT 1",
                                (ino, key)) is not None

    def _forget_name(self, ino: int, parent: int, name: bytes) -> None:
        """After the commit: `ino` no longer has the name; if that was its last one, its uploads stop and
        it is purged once closed and forgotten."""
        names = self.names_of.get(ino, [])
        if (parent, name) in names:
            names.remove((parent, name))
        self._names_changed(ino)
        if not names:
            self.on_removed(ino)
            self._maybe_purge(ino)

    def _names_changed(self, ino: int) -> None:
        """Keep `entry_of` (the canonical name of each inode) in step with `names_of`."""
        if ino in self.entry_of:
            self.renames += 1  # an existing inode's names changed: paths below it may have too
        names = self.names_of.get(ino)
        if names:
            self.entry_of[ino] = names[0]
        else:
            self.names_of.pop(ino, None)
            self.entry_of.pop(ino, None)

    def _add_subdirs(self, ino: int, delta: int) -> None:
        """A directory's link count is 2 plus its subdirectories."""
        self.journal.execute("UPDATE inodes SET nlink=nlink+? WHERE id=? AND nlink>0", (delta, ino))

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int) -> int | None:
        """Atomic rename. Returns the inode that lost its name (replaced target), if any."""
        check_name(new_name)
        ino = self._existing_child(old_parent, old_name)
        if not self.getattr(new_parent).is_dir:
            raise FsError(errno.ENOTDIR)
        target = self.child_id(new_parent, new_name)
        moving = self.getattr(ino)
        if moving.is_dir and (new_parent == ino or new_parent in self.descendants(ino)):
            raise FsError(errno.EINVAL)
        exchange = bool(flags & RENAME_EXCHANGE)
        if flags & RENAME_NOREPLACE and target is not None:
            raise FsError(errno.EEXIST)
        if exchange:
            if target is None:
                raise FsError(errno.ENOENT)
            self._exchange(old_parent, old_name, ino, new_parent, new_name, target)
            return None
        if target == ino:
            return None
        target_attr = None if target is None else self.getattr(target)
        if target_attr is not None:
            self._check_replace(moving, target_attr)
        old_path = self.path_of(ino) if moving.is_dir and self.on_event is not None else None
        t = now_ns()
        gen = self._next_gen()
        with self.journal.transaction():
            if target_attr is not None:
                self._drop_name(new_parent, new_name, target_attr, t, gen)
            self.journal.execute(
                "UPDATE dentries SET parent=?, name=? WHERE parent=? AND name=?",
                (new_parent, new_name, old_parent, old_name),
            )
            self.journal.execute("UPDATE inodes SET ctime_ns=? WHERE id=?", (t, ino))
            if moving.is_dir and old_parent != new_parent:
                self._add_subdirs(old_parent, -1)
                self._add_subdirs(new_parent, 1)
            self._touch_dir(old_parent, t, gen)
            self._touch_dir(new_parent, t, gen)
            restarted = self._restarts_delay(moving, new_parent, new_name)
            self._mark_moved(ino, gen, changed=restarted)
            self.journal.execute("INSERT OR REPLACE INTO scopes VALUES (?, ?)", (ino, self._next_seq()))
        self._rename_name(ino, (old_parent, old_name), (new_parent, new_name))  # in memory once journaled
        if target is not None:
            self._forget_name(target, new_parent, new_name)
        self.on_change(delayed=restarted)
        if old_path is not None and self.on_event is not None:
            self.on_event("rename", old_path, self.path_of(ino) or "")
        return target

    def _rename_name(self, ino: int, old: tuple[int, bytes], new: tuple[int, bytes]) -> None:
        """In memory: the name `old` of `ino` is now `new` (in place: a canonical name stays canonical)."""
        names = self.names_of.setdefault(ino, [])
        if old in names:
            names[names.index(old)] = new
        else:
            names.append(new)
        self._names_changed(ino)

    def _check_replace(self, moving: Attr, target: Attr) -> None:
        if moving.is_dir and not target.is_dir:
            raise FsError(errno.ENOTDIR)
        if not moving.is_dir and target.is_dir:
            raise FsError(errno.EISDIR)
        if target.is_dir and self.has_children(target.id):
            raise FsError(errno.ENOTEMPTY)

    def _exchange(self, p1: int, n1: bytes, i1: int, p2: int, n2: bytes, i2: int) -> None:
        if i1 == i2:
            return  # two hard links of one file: nothing changes
        a1, a2 = self.getattr(i1), self.getattr(i2)
        if (a1.is_dir and (p2 == i1 or p2 in self.descendants(i1))) or (
            a2.is_dir and (p1 == i2 or p1 in self.descendants(i2))
        ):
            raise FsError(errno.EINVAL)
        t = now_ns()
        gen = self._next_gen()
        with self.journal.transaction():
            self.journal.execute("UPDATE dentries SET inode=? WHERE parent=? AND name=?", (i2, p1, n1))
            self.journal.execute("UPDATE dentries SET inode=? WHERE parent=? AND name=?", (i1, p2, n2))
            self.journal.execute("UPDATE inodes SET ctime_ns=? WHERE id IN (?, ?)", (t, i1, i2))
            if p1 != p2 and a1.is_dir != a2.is_dir:
                moved = 1 if a1.is_dir else -1  # subdirectories p1 gives to p2
                self._add_subdirs(p1, -moved)
                self._add_subdirs(p2, moved)
            self._touch_dir(p1, t, gen)
            self._touch_dir(p2, t, gen)
            restarted = [self._restarts_delay(a1, p2, n2), self._restarts_delay(a2, p1, n1)]
            self._mark_moved(i1, gen, changed=restarted[0])
            self._mark_moved(i2, gen, changed=restarted[1])
        self._rename_name(i1, (p1, n1), (p2, n2))  # in memory once journaled
        self._rename_name(i2, (p2, n2), (p1, n1))
        self.on_change(delayed=all(restarted))
        return None

    # ---- attributes and content changes ----------------------------------------------

    def setattr(self, ino: int, *, mode=None, uid=None, gid=None, size=None, atime_ns=None, mtime_ns=None) -> Attr:
        only_mtime = mtime_ns is not None and all(v is None for v in (mode, uid, gid, size, atime_ns))
        if only_mtime and self._times_in_memory(ino, mtime_ns):
            return self.getattr(ino)
        attr = self.getattr(ino)
        t = now_ns()
        sets, params = ["ctime_ns=?"], [t]
        for column, value in (("uid", uid), ("gid", gid), ("atime_ns", atime_ns), ("mtime_ns", mtime_ns)):
            if value is not None:
                sets.append(f"{column}=?")
                params.append(value)
        if mode is not None:
            sets.append("mode=?")
            params.append(stat.S_IFMT(attr.mode) | stat.S_IMODE(mode))
        if size is not None:
            sets.append("size=?")
            params.append(size)
        self.journal.execute(f"UPDATE inodes SET {', '.join(sets)} WHERE id=?", (*params, ino))
        state = self.open.get(ino)
        if state is not None:  # the UPDATE above wrote what it changes: `recorded` stays true
            if size is not None:
                state.size = size
                state.hasher = None if size else xxhash.xxh3_128()  # truncated to 0: hash anew
                state.hashed = 0
            if mtime_ns is not None:
                state.mtime_ns = mtime_ns
        if size is not None:
            self.content_changed(ino)
            if state is None or state.writers == 0:
                self.mark_ready(ino)
        return self.getattr(ino)

    def _times_in_memory(self, ino: int, mtime_ns: int) -> bool:
        """The kernel sets mtime as it writes a file back (writeback cache): while the file is being
        written and its change is recorded already, the new times go with its size at close."""
        state = self.open.get(ino)
        if state is None or state.writers == 0 or not state.written:
            return False
        state.mtime_ns, state.ctime_ns, state.recorded = mtime_ns, now_ns(), False
        return True

    def content_changed(self, ino: int) -> bool:
        """The content differs from what was published: not durable, not ready, old objects stale.

        Returns whether the journal had the content as clean until now (see gateway/content.py)."""
        self.written_digests.pop(ino, None)
        state = self.open.get(ino)
        if state is not None:
            state.version += 1
            if state.written and state.writers > 0:
                return False  # already recorded since it was opened for writing; the drain skips it meanwhile
        gen = self._next_gen()
        with self.journal.transaction():
            row = self.journal.one("SELECT content_dirty FROM inodes WHERE id=?", (ino,))
            self._move_to(ino, DIRTY, "content_dirty=1, ready_seq=NULL, changed_gen=?, changed_at=?",
                          (gen, time.time()))
        if state is not None:
            state.written = True
        self.on_change()
        return row is not None and row[0] == 0

    def note_write(self, ino: int, offset: int, data: bytes) -> None:
        """A write reached the cache file (after `content_changed`): track size and mtime in memory."""
        state = self.open.setdefault(ino, OpenState())
        current = state.size if state.size is not None else self.getattr(ino).size
        self._hash_write(state, current, offset, data)
        state.size = max(current, offset + len(data))
        state.mtime_ns = now_ns()
        state.recorded = False

    @staticmethod
    def _hash_write(state: OpenState, size_before: int, offset: int, data: bytes) -> None:
        """Checkpoints are written front to back: hash them on the way, so the drain need not
        re-read the file for its digest. Any other pattern drops the running hash."""
        if state.hasher is None and size_before == 0 and offset == 0:
            state.hasher, state.hashed = xxhash.xxh3_128(), 0
        if state.hasher is None:
            return
        if offset != state.hashed or size_before != state.hashed:
            state.hasher = None
            return
        state.hasher.update(data)
        state.hashed += len(data)

    def record_size(self, ino: int) -> None:
        """Write the in-memory size and mtime of an open file to the journal (flush, fsync, close)."""
        state = self.open.get(ino)
        if state is None or state.recorded or (state.size is None and state.mtime_ns is None):
            return
        self.journal.execute(
            "UPDATE inodes SET size=coalesce(?, size), mtime_ns=coalesce(?, mtime_ns), ctime_ns=coalesce(?, ctime_ns), "
            "changed_at=? WHERE id=?",
            (state.size, state.mtime_ns, state.ctime_ns, time.time(), ino),
        )
        state.recorded = True

    def mark_ready(self, ino: int) -> None:
        """The file was closed after a change: queued, with its place in the commit order."""
        self._move_to(ino, QUEUED, "ready_seq=?, changed_at=?", (self._next_seq(), time.time()),
                      only_if=f"{PENDING_SQL} AND nlink>0")
        self.on_change()

    def requeue(self, ino: int) -> None:
        """A durable file or directory must be published again (its object is missing from the bucket)."""
        self._move_to(ino, QUEUED, "ready_seq=?, changed_at=?", (self._next_seq(), time.time()), only_if="nlink>0")
        self.on_change()

    # ---- the drain's transitions ------------------------------------------------------

    def start_upload(self, ino: int) -> None:
        """A drain job starts publishing the queued `ino`."""
        self._move_to(ino, UPLOADING)

    def upload_ended(self, ino: int) -> None:
        """A job ended without publishing (failed, superseded, cancelled): queued again, in its place.
        A file written or renamed meanwhile is already in its new state."""
        self._move_to(ino, QUEUED, only_if="state = 'uploading'")

    def mark_durable(self, ino: int, gen: int) -> bool:
        """The job published `ino`; it is durable unless it changed (generation `gen`) or was removed."""
        return self._move_to(ino, DURABLE, only_if="state = 'uploading' AND changed_gen=? AND nlink>0",
                             only_if_params=(gen,)) is not None

    def nothing_to_publish(self, ino: int) -> None:
        """A pending inode without a name to publish under (the root, or under a removed directory)."""
        self._move_to(ino, DURABLE)

    def published_elsewhere(self, ino: int) -> bool:
        """An entry adopted from another node's object (unchanged here): that node publishes it."""
        return self._move_to(ino, DURABLE, only_if="content_dirty=0") is not None

    def requeue_interrupted_uploads(self) -> list[int]:
        """At start: uploads the dead daemon had in flight are queued again (their jobs died with it)."""
        ids = [r[0] for r in self.journal.all("SELECT id FROM inodes WHERE state = 'uploading'")]
        for ino in ids:
            self.upload_ended(ino)
        return ids

    def _move_to(self, ino: int, new: FileState, sets: str = "", params: tuple = (), *, only_if: str = "",
                 only_if_params: tuple = ()) -> FileState | None:
        """The one place a file's state changes: the transition is checked, then written with the
        other `sets`. With `only_if` (SQL on the row) nothing changes unless it holds. Returns the
        old state, or None if nothing changed."""
        where = f" AND {only_if}" if only_if else ""
        row = self.journal.one(f"SELECT state FROM inodes WHERE id=?{where}", (ino, *only_if_params))
        if row is None:
            return None
        old = FileState(row[0])
        check(ino, old, new)
        self.journal.execute(f"UPDATE inodes SET state=?{', ' if sets else ''}{sets} WHERE id=?",
                             (new.value, *params, ino))
        return old

    def _restarts_delay(self, moving: Attr, new_parent: int, new_name: bytes) -> bool:
        """Whether a rename to `new_name` restarts the drain delay and the hold limit of what it
        moves: into a temporary name, or a file with several names (which one it is published
        under may change with the rename)."""
        path = self.path_of_name(new_parent, new_name)
        return path is None or self.is_temporary(path) or (not moving.is_dir and moving.nlink > 1)

    def _mark_moved(self, ino: int, gen: int, *, changed: bool = True) -> None:
        """`ino` (and its subtree) has a new name: republish under it, in the old relative order.
        `changed`: the move counts as a change (drain delay, hold limit); else the time of the
        last change stays."""
        ids = [ino] + (self.descendants(ino) if self.getattr(ino).is_dir else [])
        rows = self.journal.all(
            f"SELECT id, ready_seq, state FROM inodes WHERE id IN ({','.join('?' * len(ids))}) "
            f"AND NOT {LOCAL_ONLY_SQL}", tuple(ids)
        )
        writing = {i for i, _, state in rows if state == DIRTY and self.open.get(i, OpenState()).writers > 0}
        now = time.time() if changed else None  # None: the time of the last change stays
        for i, _, _ in sorted(rows, key=lambda r: (r[1] is None, r[1] or 0, r[0])):
            seq = None if i in writing else self._next_seq()
            self._move_to(i, DIRTY if seq is None else QUEUED,
                          "ready_seq=?, changed_gen=?, changed_at=coalesce(?, changed_at)", (seq, gen, now))

    def _touch_dir(self, ino: int, t: int, gen: int) -> None:
        """A directory's entries changed: new mtime, and its empty-marker object needs a look."""
        self._move_to(ino, QUEUED, "mtime_ns=?, ctime_ns=?, ready_seq=coalesce(ready_seq, ?), changed_gen=?",
                      (t, t, self._next_seq(), gen))

    def _next_gen(self) -> int:
        self.gen += 1
        return self.gen

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    # ---- handles and lookup counts -------------------------------------------------------

    def remember(self, ino: int) -> None:
        self.lookups[ino] = self.lookups.get(ino, 0) + 1

    def forget(self, ino: int, count: int) -> None:
        left = self.lookups.get(ino, 0) - count
        if left > 0:
            self.lookups[ino] = left
        else:
            self.lookups.pop(ino, None)
            self._maybe_purge(ino)

    def opened(self, ino: int, writable: bool, *, created: bool = False) -> None:
        """A handle was opened; `created`: by the create that made the inode, whose new row already
        says what a first write would record (dirty, new content, a new generation)."""
        state = self.open.setdefault(ino, OpenState())
        state.handles += 1
        state.writers += int(writable)
        if created and writable:
            state.written = True

    def closed(self, ino: int, writable: bool) -> None:
        """The last close of a written file records its size and makes it ready for the drain."""
        state = self.open[ino]
        state.handles -= 1
        if writable:
            state.writers -= 1
            if state.writers == 0 and state.written:
                with self.journal.transaction():  # one commit for both
                    self.record_size(ino)
                    state.written = False
                    if state.hasher is not None and state.hashed == state.size:
                        self.written_digests[ino] = (state.hasher.hexdigest(), state.hashed)
                    state.hasher = None
                    self.mark_ready(ino)
            elif state.writers == 0 and self.getattr(ino).state is DIRTY:
                self.mark_ready(ino)
        if state.handles == 0:
            self.open.pop(ino)
            self._maybe_purge(ino)

    def writers(self, ino: int) -> int:
        state = self.open.get(ino)
        return 0 if state is None else state.writers

    def written_digest(self, ino: int, size: int) -> str | None:
        """The xxh3-128 of the content, if it was hashed while written and has not changed since."""
        entry = self.written_digests.get(ino)
        return entry[0] if entry is not None and entry[1] == size else None

    def version(self, ino: int) -> int:
        state = self.open.get(ino)
        return 0 if state is None else state.version

    def _maybe_purge(self, ino: int) -> None:
        if ino == ROOT_INODE or self.lookups.get(ino) or ino in self.open:
            return
        row = self.journal.one("SELECT nlink FROM inodes WHERE id=?", (ino,))
        if row is None or row[0] > 0:
            return
        with self.journal.transaction():
            self.journal.execute("DELETE FROM inodes WHERE id=?", (ino,))
            self.journal.execute("DELETE FROM xattrs WHERE inode=?", (ino,))
            self.journal.execute("DELETE FROM scopes WHERE root=?", (ino,))
        self.written_digests.pop(ino, None)
        self.emptied_elsewhere.discard(ino)
        self.on_purge(ino)
        for forget in self.purge_listeners:
            forget(ino)

    def purge_unlinked(self) -> list[int]:
        """At start: inodes unlinked while open before a crash are gone for good."""
        ids = [r[0] for r in self.journal.all("SELECT id FROM inodes WHERE nlink=0")]
        for ino in ids:
            self._maybe_purge(ino)
        return ids

    # ---- entries known from the bucket -------------------------------------------------

    def adopt_remote(self, parent: int, name: bytes, *, is_dir: bool, size: int = 0, mtime_ns: int = 0,
                     key: str = "", etag: str = "") -> int:
        """Add an entry that exists only in the bucket (another node wrote it, or a fresh cache).

        It is durable and not cached: reads fetch it. Local names always win over remote ones.
        """
        existing = self.child_id(parent, name)
        if existing is not None:
            return existing
        t = mtime_ns or now_ns()
        mode = (stat.S_IFDIR | 0o755) if is_dir else (stat.S_IFREG | 0o644)
        with self.journal.transaction():
            cur = self.journal.execute(
                "INSERT INTO inodes (mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, nlink, content_dirty, "
                "state, cached) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 'durable', ?)",
                (mode, self.owner[0], self.owner[1], size, t, t, t, 2 if is_dir else 1, 1 if is_dir else 0),
            )
            ino = cur.lastrowid
            assert ino is not None  # set by the INSERT above
            self.journal.execute("INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)", (parent, name, ino))
            if is_dir:
                self._add_subdirs(parent, 1)
            else:
                self.journal.execute(
                    "INSERT OR REPLACE INTO objects (key, inode, size, digest, etag) VALUES (?, ?, ?, NULL, ?)",
                    (key, ino, size, etag))
        self.names_of[ino] = [(parent, name)]
        self._names_changed(ino)
        self._drop_own_marker(parent)
        return ino

    def _drop_own_marker(self, parent: int) -> None:
        """Another node put something into a directory whose empty-marker object this node
        published (or may be publishing: the directory is pending): it is no longer empty, so the
        drain takes the marker back (a marker upload in flight no longer matches and is redone)."""
        row = self.journal.one("SELECT state = 'durable' FROM inodes WHERE id=?", (parent,))
        if row is not None and (not row[0] or self.journal.one(
                "SELECT 1 FROM objects WHERE inode=? AND key LIKE '%/' LIMIT 1", (parent,))):
            t = now_ns()
            self._touch_dir(parent, t, self._next_gen())
            self.on_change()

    def forget_remote(self, ino: int, key: str) -> None:
        """The object of a clean file vanished from the bucket (another node deleted it): drop the
        name here without deleting anything in the bucket."""
        entry = self.entry_of.get(ino)
        if entry is None:
            return
        self._remove_entry(entry[0], entry[1], ino, follow=True)
        self.journal.execute("DELETE FROM objects WHERE key=? AND inode IS NULL", (key,))

    def empty_unpublished_dirs(self) -> list[int]:
        """Durable, empty directories (not the root) that no object of this node stands for."""
        return [r[0] for r in self.journal.all(
            "SELECT i.id FROM inodes i WHERE (i.mode & 61440) = 16384 AND i.nlink > 0 AND i.state = 'durable' "
            "AND i.id <> ? AND NOT EXISTS (SELECT 1 FROM dentries d WHERE d.parent = i.id) "
            "AND NOT EXISTS (SELECT 1 FROM objects o WHERE o.inode = i.id)", (ROOT_INODE,))]

    def forget_remote_dir(self, ino: int) -> None:
        """Drop an empty directory that only the bucket stood for, and the bucket no longer shows
        (its objects were swept): nothing to publish, here or for its parent."""
        entry = self.entry_of.get(ino)
        if entry is not None:
            self._remove_entry(entry[0], entry[1], ino, follow=True, marker_if_emptied=False)

    def set_cached(self, ino: int, cached: bool, *, size: int | None = None) -> None:
        self.journal.execute("UPDATE inodes SET cached=?, size=coalesce(?, size) WHERE id=?",
                             (int(cached), size, ino))

    def remote_key(self, ino: int) -> str | None:
        """The key of an object that holds this inode's current content, if one is published."""
        row = self.journal.one("SELECT key FROM objects WHERE inode=? AND key NOT LIKE '%/' LIMIT 1", (ino,))
        return None if row is None else row[0]

    # ---- extended attributes -------------------------------------------------------------

    def get_xattr(self, ino: int, name: bytes) -> bytes:
        row = self.journal.one("SELECT value FROM xattrs WHERE inode=? AND name=?", (ino, name))
        if row is None:
            self.getattr(ino)
            raise FsError(errno.ENODATA)
        return bytes(row[0])

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self.getattr(ino)
        self.journal.execute("INSERT OR REPLACE INTO xattrs VALUES (?, ?, ?)", (ino, name, value))

    def list_xattrs(self, ino: int) -> list[bytes]:
        self.getattr(ino)
        return [bytes(r[0]) for r in self.journal.all("SELECT name FROM xattrs WHERE inode=?", (ino,))]

    def remove_xattr(self, ino: int, name: bytes) -> None:
        cur = self.journal.execute("DELETE FROM xattrs WHERE inode=? AND name=?", (ino, name))
        if cur.rowcount == 0:
            self.getattr(ino)
            raise FsError(errno.ENODATA)


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
