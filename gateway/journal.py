"""The SQLite journal on the cache disk: schema, connection settings and durable commits.

The journal is the one record of the namespace and of pending work (DESIGN.md invariant 5).
It is synchronous on purpose: no method awaits, so under trio the SQL between two awaits is atomic.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

from gateway.errors import JournalError
from gateway.file_state import COLUMN_SQL, FROM_FLAGS_SQL, PENDING_SQL

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 2: inode numbers are never reused (AUTOINCREMENT); 3: one state column (gateway/file_state.py)
PRIVATE_MODE = 0o600  # journal.db, its WAL and shared-memory file: file names, sizes, bucket and prefix
# Errors that mean the journal cannot be written (disk full, I/O error, read-only): the mount goes failsafe.
WRITE_FAILURES = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN}

INODES_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the FUSE inode number, never reused; 1 is the root
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
    {state},  -- dirty | queued | uploading | durable (gateway/file_state.py)
    ready_seq INTEGER,                 -- commit-order position while queued or uploading; NULL while dirty
    changed_gen INTEGER NOT NULL DEFAULT 0,    -- generation of the last change, for `ckptfs wait`
    changed_at REAL NOT NULL DEFAULT 0,        -- wall time of the last change: drain delay, hold limit
    digest TEXT,                       -- xxh3-128 hex digest of the content last published
    cached INTEGER NOT NULL DEFAULT 1  -- 1: the cache data file holds the whole content
)"""
INODES_INDEX = f"CREATE INDEX IF NOT EXISTS inodes_pending ON inodes(state) WHERE {PENDING_SQL}"
# The columns schemas 1 and 2 share with this one (they had `durable` where this has `state`).
OLD_INODE_COLUMNS = ("id, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, rdev, target, nlink, content_dirty, "
                     "ready_seq, changed_gen, changed_at, digest, cached")


def inodes_table(name: str) -> str:
    return INODES_TABLE.format(name=name, state=COLUMN_SQL)


SCHEMA = inodes_table("inodes") + ";\n" + INODES_INDEX + """;

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
        self.failed: str | None = None  # why the journal could not be written: the mount is failsafe
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE))  # SQLite gives -wal/-shm its mode
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # One daemon owns the cache dir (its lock file): holding SQLite's lock for the life of the
        # connection saves the lock and unlock system calls of every transaction (and the -shm file).
        self.conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA foreign_keys=OFF")
        self._add_columns_of_older_schemas()
        self._migrate()  # before the schema's indexes, which name columns older journals lack
        self.conn.executescript(SCHEMA)
        self._wal_path = str(self.path) + "-wal"
        if self.get_meta("schema_version") is None:
            self.set_meta("schema_version", SCHEMA_VERSION)
        self._make_private()

    def _add_columns_of_older_schemas(self) -> None:
        """Journals written before a column existed get it (NULL), before the schema's indexes."""
        columns = {row[1] for row in self.conn.execute("PRAGMA table_info(objects)")}
        if columns and "stale_gen" not in columns:
            self.conn.execute("ALTER TABLE objects ADD COLUMN stale_gen INTEGER")

    def _version(self) -> int | None:
        if self.conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone() is None:
            return None  # a new journal
        row = self.conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        return None if row is None else int(row[0])

    def _migrate(self) -> None:
        """Schemas 1 and 2 are rebuilt into this one: schema 1 let SQLite reuse the highest inode
        number after a purge (AUTOINCREMENT now), and both kept a file's state in flags (`durable`,
        `ready_seq` NULL) where this keeps one `state` column, derived from them."""
        version = self._version()
        if version is None or version == SCHEMA_VERSION:
            return
        if version not in (1, 2):
            raise RuntimeError(f"journal {self.path} has schema {version}, this ckptfs reads {SCHEMA_VERSION}")
        with self.transaction():
            self._rebuild_inodes()
            self.set_meta("schema_version", SCHEMA_VERSION)
        log.info("journal %s: migrated from schema %d to %d", self.path, version, SCHEMA_VERSION)

    def _rebuild_inodes(self) -> None:
        """Inside a transaction: copy `inodes` into this schema's table, keeping the inode counter."""
        has_sequence = self.one("SELECT 1 FROM sqlite_master WHERE name='sqlite_sequence'") is not None
        counter = self.one("SELECT seq FROM sqlite_sequence WHERE name='inodes'") if has_sequence else None
        self.execute(inodes_table("inodes_new"))
        self.execute(f"INSERT INTO inodes_new ({OLD_INODE_COLUMNS}, state) "
                     f"SELECT {OLD_INODE_COLUMNS}, {FROM_FLAGS_SQL} FROM inodes")
        self.execute("DROP TABLE inodes")
        self.execute("ALTER TABLE inodes_new RENAME TO inodes")
        if counter is not None:  # numbers given out and purged since stay used
            self.execute("UPDATE sqlite_sequence SET seq=max(seq, ?) WHERE name='inodes'", (counter[0],))

    def _make_private(self) -> None:
        """Journals made by older versions were 0644: tighten them (and the WAL files) to 0600."""
        for suffix in ("", "-wal", "-shm"):
            try:
                os.chmod(str(self.path) + suffix, PRIVATE_MODE)
            except FileNotFoundError:
                pass

    def execute(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, params)
        except sqlite3.OperationalError as exc:
            self._raise_if_write_failure(exc)
            raise

    def one(self, sql: str, params: tuple = ()):
        return self.execute(sql, params).fetchone()

    def all(self, sql: str, params: tuple = ()) -> list:
        return self.execute(sql, params).fetchall()

    def _raise_if_write_failure(self, exc: sqlite3.OperationalError) -> None:
        if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) not in WRITE_FAILURES:
            return
        if self.failed is None:
            self.failed = f"{exc} ({exc.sqlite_errorname})"
            log.error("the journal %s cannot be written (%s): the mount is read-only (failsafe) until it is "
                      "unmounted, space is freed and it is mounted again; reads go on", self.path, self.failed)
        raise JournalError(self.failed) from exc

    def transaction(self) -> _Transaction:
        return _Transaction(self)

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
    """`with journal.transaction():` groups statements into one atomic commit.

    A failed statement or a failed COMMIT rolls the whole transaction back, so the connection is
    never left inside a transaction that later statements would silently join.
    """

    def __init__(self, journal: Journal):
        self.journal = journal

    def __enter__(self):
        self.journal.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.journal.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        else:
            self._rollback()
        return False

    def _rollback(self) -> None:
        conn = self.journal.conn
        if not conn.in_transaction:
            return  # SQLite already rolled back (e.g. after SQLITE_FULL)
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("rollback of a failed journal transaction failed: %s", exc)
