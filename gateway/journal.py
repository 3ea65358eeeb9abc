"""The SQLite journal on the cache disk: schema, connection settings and durable commits.

The journal is the one record of the namespace and of pending work (DESIGN.md invariant 5).
It is synchronous on purpose: no method awaits, so under trio the SQL between two awaits is atomic.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS inodes (
    id INTEGER PRIMARY KEY,            -- the FUSE inode number; 1 is the root
    mode INTEGER NOT NULL,             -- st_mode: file type and permission bits
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,   -- while a file is open for writing the cache file's size wins
    atime_ns INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    rdev INTEGER NOT NULL DEFAULT 0,
    target BLOB,                       -- symlink target; NULL for other types
    nlink INTEGER NOT NULL,            -- 0: unlinked, kept until forgotten by the kernel and closed
    content_dirty INTEGER NOT NULL DEFAULT 1,  -- 1: local content differs from every object published
    durable INTEGER NOT NULL DEFAULT 0,        -- 1: the bucket holds this content at this inode's key
    ready_seq INTEGER,                 -- commit-order position (closed or renamed into place); NULL while written
    changed_gen INTEGER NOT NULL DEFAULT 0,    -- generation of the last change, for `ckptfs wait`
    changed_at REAL NOT NULL DEFAULT 0,        -- wall time of the last change: drain delay, hold limit
    digest TEXT,                       -- xxh3-128 hex digest of the content last published
    cached INTEGER NOT NULL DEFAULT 1  -- 1: the cache data file holds the whole content
);
CREATE INDEX IF NOT EXISTS inodes_pending ON inodes(durable) WHERE durable = 0;

CREATE TABLE IF NOT EXISTS dentries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- readdir offset: stable while the directory changes
    parent INTEGER NOT NULL,
    name BLOB NOT NULL,
    inode INTEGER NOT NULL,
    UNIQUE (parent, name)
);
CREATE INDEX IF NOT EXISTS dentries_inode ON dentries(inode);

CREATE TABLE IF NOT EXISTS xattrs (
    inode INTEGER NOT NULL,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (inode, name)
);

-- What this gateway believes the bucket holds under its prefix.
CREATE TABLE IF NOT EXISTS objects (
    key TEXT PRIMARY KEY,      -- path relative to the prefix; directory markers end with '/'
    inode INTEGER,             -- inode whose content it holds; NULL: stale, deleted unless a live name maps here
    size INTEGER NOT NULL DEFAULT 0,
    digest TEXT,
    etag TEXT,
    stale_gen INTEGER          -- while inode IS NULL: the namespace generation that made it stale
);
CREATE INDEX IF NOT EXISTS objects_inode ON objects(inode);

-- Multipart uploads begun and not yet completed or aborted: aborted on start after a crash.
CREATE TABLE IF NOT EXISTS multipart (
    upload_id TEXT PRIMARY KEY,
    key TEXT NOT NULL
);

-- Commit scopes made by a rename into place (docs/SEMANTICS.md, "Commit scopes"); scopes made by a
-- commit marker need no row: the pending marker itself says so.
CREATE TABLE IF NOT EXISTS scopes (
    root INTEGER PRIMARY KEY,      -- inode of the directory or file renamed into place
    committed_seq INTEGER NOT NULL -- its place in the commit order at the rename
);

CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value
);
"""


class Journal:
    """One SQLite connection in WAL mode with explicit durable commits.

    synchronous=NORMAL: a commit survives kill -9 of the daemon (it is in the WAL, in the page
    cache) but may be lost on power failure. `commit_durable()` additionally fsyncs the WAL, which is
    what fsync/fsyncdir promise (DESIGN.md invariant 1).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA foreign_keys=OFF")
        self._add_columns_of_older_schemas()
        self.conn.executescript(SCHEMA)
        self._wal_path = str(self.path) + "-wal"
        self._check_version()

    def _add_columns_of_older_schemas(self) -> None:
        """Journals written before a column existed get it (NULL), before the schema's indexes."""
        columns = {row[1] for row in self.conn.execute("PRAGMA table_info(objects)")}
        if columns and "stale_gen" not in columns:
            self.conn.execute("ALTER TABLE objects ADD COLUMN stale_gen INTEGER")

    def _check_version(self) -> None:
        row = self.conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        if row is None:
            self.conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        elif int(row[0]) != SCHEMA_VERSION:
            raise RuntimeError(f"journal {self.path} has schema {row[0]}, this ckptfs reads {SCHEMA_VERSION}")

    def execute(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def one(self, sql: str, params: tuple = ()):
        return self.conn.execute(sql, params).fetchone()

    def all(self, sql: str, params: tuple = ()) -> list:
        return self.conn.execute(sql, params).fetchall()

    def transaction(self) -> "_Transaction":
        return _Transaction(self.conn)

    def get_meta(self, name: str, default=None):
        row = self.one("SELECT value FROM meta WHERE name=?", (name,))
        return default if row is None else row[0]

    def set_meta(self, name: str, value) -> None:
        self.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def sync_wal(self) -> None:
        """fsync the WAL so every commit so far survives power loss. Blocking: call from a thread."""
        try:
            fd = os.open(self._wal_path, os.O_RDONLY)
        except FileNotFoundError:
            return  # checkpointed away: the commits are in the synced main file
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self.conn.close()


class _Transaction:
    """`with journal.transaction():` groups statements into one atomic commit."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb):
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
