"""Unit tier (no mount): the journal's crash rules, inode numbering and start-up repair."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest
import trio

from gateway import content
from gateway.cache import CacheFiles
from gateway.daemon import recover
from gateway.errors import JournalError
from gateway.file_state import DIRTY, DURABLE, QUEUED, UPLOADING
from gateway.journal import SCHEMA_VERSION, Journal
from gateway.namespace import ROOT_INODE, Namespace

FILE = stat.S_IFREG | 0o644


@pytest.fixture
def parts(tmp_path):
    journal = Journal(tmp_path / "journal.db")
    cache = CacheFiles(tmp_path)
    ns = Namespace(journal, uid=os.getuid(), gid=os.getgid(), on_purge=cache.remove)
    yield journal, ns, cache
    journal.close()


def test_failed_commit_is_rolled_back(parts):
    journal, _, _ = parts
    journal.execute("PRAGMA foreign_keys=ON")
    journal.execute("CREATE TABLE parent_t (id INTEGER PRIMARY KEY)")
    journal.execute("CREATE TABLE child_t (p INTEGER REFERENCES parent_t(id) DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(sqlite3.IntegrityError):
        with journal.transaction():
            journal.execute("INSERT INTO child_t VALUES (42)")  # checked only at COMMIT
    assert not journal.conn.in_transaction, "a failed COMMIT left the transaction open"
    with journal.transaction():  # the next transaction starts cleanly and commits alone
        journal.execute("INSERT INTO parent_t VALUES (1)")
    assert journal.all("SELECT p FROM child_t") == []
    assert journal.all("SELECT id FROM parent_t") == [(1,)]


def test_rename_that_fails_in_the_journal_keeps_the_old_path(parts):
    journal, ns, _ = parts
    d = ns.create(ROOT_INODE, b"d", stat.S_IFDIR | 0o755, 0, 0)
    f = ns.create(d.id, b"a", FILE, 0, 0)
    # the last statement of the rename fails, as a full disk would make it
    journal.execute(f"CREATE TEMP TRIGGER no_move BEFORE UPDATE OF changed_gen ON inodes WHEN NEW.id = {f.id} "
                    "BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
    with pytest.raises(sqlite3.IntegrityError):
        ns.rename(d.id, b"a", ROOT_INODE, b"b", 0)
    assert ns.path_of(f.id) == "d/a", "in-memory paths changed although the journal rolled back"
    assert ns.child_id(d.id, b"a") == f.id and ns.child_id(ROOT_INODE, b"b") is None


def test_exchange_that_fails_in_the_journal_keeps_both_paths(parts):
    journal, ns, _ = parts
    a = ns.create(ROOT_INODE, b"a", FILE, 0, 0)
    b = ns.create(ROOT_INODE, b"b", FILE, 0, 0)
    journal.execute(f"CREATE TEMP TRIGGER no_move BEFORE UPDATE OF changed_gen ON inodes WHEN NEW.id = {b.id} "
                    "BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
    with pytest.raises(sqlite3.IntegrityError):
        ns.rename(ROOT_INODE, b"a", ROOT_INODE, b"b", 2)  # RENAME_EXCHANGE
    assert (ns.path_of(a.id), ns.path_of(b.id)) == ("a", "b")


def test_inode_numbers_are_never_reused(parts):
    _, ns, _ = parts
    first = ns.create(ROOT_INODE, b"x", FILE, 0, 0).id
    ns.unlink(ROOT_INODE, b"x")  # no lookups or handles: purged at once
    assert ns.journal.one("SELECT 1 FROM inodes WHERE id=?", (first,)) is None
    second = ns.create(ROOT_INODE, b"y", FILE, 0, 0).id
    assert second > first, f"inode {first} was given out again"


def test_purge_drops_per_inode_state(parts):
    _, ns, _ = parts
    ino = ns.create(ROOT_INODE, b"x", FILE, 0, 0).id
    forgotten = []
    ns.purge_listeners.append(forgotten.append)
    ns.written_digests[ino] = ("00", 0)
    ns.unlink(ROOT_INODE, b"x")
    assert forgotten == [ino] and ino not in ns.written_digests


V1_INODES = """CREATE TABLE inodes (
    id INTEGER PRIMARY KEY, mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0, atime_ns INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL, rdev INTEGER NOT NULL DEFAULT 0, target BLOB, nlink INTEGER NOT NULL,
    content_dirty INTEGER NOT NULL DEFAULT 1, durable INTEGER NOT NULL DEFAULT 0, ready_seq INTEGER,
    changed_gen INTEGER NOT NULL DEFAULT 0, changed_at REAL NOT NULL DEFAULT 0, digest TEXT,
    cached INTEGER NOT NULL DEFAULT 1)"""


def test_schema_1_cache_dir_is_migrated(tmp_path):
    path = tmp_path / "journal.db"
    conn = sqlite3.connect(path)
    conn.execute(V1_INODES)
    conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value)")
    conn.execute("INSERT INTO meta VALUES ('schema_version', 1)")
    conn.execute("INSERT INTO inodes (id, mode, uid, gid, atime_ns, mtime_ns, ctime_ns, nlink) "
                 "VALUES (1, ?, 0, 0, 1, 1, 1, 2), (7, ?, 0, 0, 1, 1, 1, 1)", (stat.S_IFDIR | 0o755, FILE))
    conn.commit()
    conn.close()
    os.chmod(path, 0o644)
    journal = Journal(path)
    assert int(journal.get_meta("schema_version")) == SCHEMA_VERSION
    assert [r[0] for r in journal.all("SELECT id FROM inodes ORDER BY id")] == [1, 7]
    assert "AUTOINCREMENT" in journal.one("SELECT sql FROM sqlite_master WHERE name='inodes'")[0]
    cur = journal.execute("INSERT INTO inodes (mode, uid, gid, atime_ns, mtime_ns, ctime_ns, nlink) "
                          "VALUES (?, 0, 0, 1, 1, 1, 1)", (FILE,))
    assert cur.lastrowid == 8
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    journal.close()


def test_journal_write_failure_is_reported_once_as_journal_error(parts):
    journal, ns, _ = parts
    journal.execute("PRAGMA max_page_count=" + str(journal.one("PRAGMA page_count")[0]))
    with pytest.raises(JournalError):
        for i in range(10000):
            ns.create(ROOT_INODE, b"n%05d" % i + b"x" * 200, FILE, 0, 0)
    assert journal.failed and "full" in journal.failed
    assert not journal.conn.in_transaction
    assert ns.getattr(ROOT_INODE).is_dir  # reads go on


def test_start_repairs_rows_that_disagree_with_their_data_file(parts):
    journal, ns, cache = parts
    in_bucket = ns.create(ROOT_INODE, b"in_bucket", FILE, 0, 0).id
    local_only = ns.create(ROOT_INODE, b"local_only", FILE, 0, 0).id
    emptied = ns.create(ROOT_INODE, b"emptied", FILE, 0, 0).id
    for ino in (in_bucket, local_only):
        cache.truncate(ino, 1000)
        journal.execute("UPDATE inodes SET size=1000, content_dirty=0, state='durable', ready_seq=1 WHERE id=?", (ino,))
    journal.execute("INSERT INTO objects (key, inode, size) VALUES ('in_bucket', ?, 1000)", (in_bucket,))
    cache.remove(in_bucket)              # e.g. evicted by an old daemon before the journal knew
    cache.truncate(local_only, 10)       # e.g. truncated before the journal knew
    journal.execute("UPDATE inodes SET size=500, cached=0, content_dirty=1 WHERE id=?", (emptied,))
    cache.remove(emptied)                # open(O_TRUNC) journaled, data file not yet made
    summary = content.check_data_files(ns, cache)
    assert summary == {"sizes_repaired": 1, "made_uncached": 1, "republished": 1}
    a = ns.getattr(in_bucket)
    assert not a.cached and a.size == 1000 and a.durable, "a file the bucket holds must be fetched, not served short"
    b = ns.getattr(local_only)
    assert b.cached and b.size == 10 and b.content_dirty and not b.durable
    c = ns.getattr(emptied)
    assert c.cached and c.size == 0 and cache.size_of(emptied) == 0


def test_rewrite_of_a_clean_file_makes_its_intent_durable_before_the_data(parts):
    journal, ns, cache = parts
    ino = ns.create(ROOT_INODE, b"f", FILE, 0, 0).id
    cache.acquire(ino)
    syncs = []
    journal.sync_wal = lambda: syncs.append((cache.read(ino, 0, 3), ns.getattr(ino).content_dirty))
    ns.opened(ino, True)
    trio.run(content.write, ns, cache, ino, 0, b"old")
    ns.closed(ino, True)
    assert syncs == [], "a new file's first write needs no extra fsync"
    journal.execute("UPDATE inodes SET content_dirty=0, state='durable' WHERE id=?", (ino,))  # published
    ns.opened(ino, True)
    trio.run(content.write, ns, cache, ino, 0, b"new")
    trio.run(content.write, ns, cache, ino, 3, b"more")
    ns.closed(ino, True)
    assert syncs == [(b"old", 1)], "the dirty mark must be durable before the first new byte, and only once"
    assert cache.read(ino, 0, 7) == b"newmore"
    cache.release(ino)


# ---- the file state column (schema 3) -------------------------------------------------------

SCHEMA_2_DUMP = Path(__file__).parent / "fixtures" / "journal_schema2.sql"


def load_dump(path: Path, dump: Path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(dump.read_text())
    conn.close()


def test_schema_2_journal_is_migrated_to_one_state_column(tmp_path):
    """A journal the previous ckptfs wrote (tests/fixtures/journal_schema2.sql, dumped from it):
    each file's flags become its state, and inode numbers purged before stay used."""
    path = tmp_path / "journal.db"
    load_dump(path, SCHEMA_2_DUMP)
    journal = Journal(path)
    assert int(journal.get_meta("schema_version")) == SCHEMA_VERSION == 3
    columns = {r[1] for r in journal.all("PRAGMA table_info(inodes)")}
    assert "state" in columns and "durable" not in columns
    ns = Namespace(journal, uid=0, gid=0, on_purge=lambda ino: None)
    state = {path: ns.getattr(ns.resolve(path)).state for path in
             ("", "ckpt", "ckpt/durable", "ckpt/queued", "renamed", "dirty", "fifo", "remote")}
    assert state == {"": QUEUED, "ckpt": QUEUED, "ckpt/durable": DURABLE, "ckpt/queued": QUEUED,
                     "renamed": QUEUED, "dirty": DIRTY, "fifo": DURABLE, "remote": DURABLE}
    renamed = ns.getattr(ns.resolve("renamed"))
    assert not renamed.content_dirty and renamed.ready_seq is not None, "a renamed file is copied, in its place"
    assert not ns.getattr(ns.resolve("remote")).cached
    assert ns.create(ROOT_INODE, b"new", FILE, 0, 0).id == 10, "inode 9 (purged) was given out again"
    summary = recover(ns, CacheFiles(tmp_path / "cache"), journal)
    assert summary["made_ready"] == 2  # `dirty`, and `new` (created, never closed)
    assert ns.getattr(ns.resolve("dirty")).state is QUEUED
    journal.close()


def test_recover_replays_each_state_after_a_crash(tmp_path):
    """Rows in every state, the daemon killed (no clean close), the journal opened again: what was
    uploading or being written is queued, in the commit order it had or gets now."""
    journal = Journal(tmp_path / "journal.db")
    cache = CacheFiles(tmp_path / "cache")
    ns = Namespace(journal, uid=0, gid=0, on_purge=cache.remove)
    ino = {}
    for name in ("dirty", "queued", "uploading", "durable"):
        ino[name] = ns.create(ROOT_INODE, name.encode(), FILE, 0, 0).id
        cache.truncate(ino[name], 0)
    for name in ("queued", "uploading", "durable"):
        ns.mark_ready(ino[name])
    for name in ("uploading", "durable"):
        ns.start_upload(ino[name])
    assert ns.mark_durable(ino["durable"], ns.getattr(ino["durable"]).changed_gen)
    ns.opened(ino["dirty"], writable=True)  # its writer dies with the daemon
    seq_of_uploading = ns.getattr(ino["uploading"]).ready_seq
    journal.conn.close()  # as kill -9 leaves it: committed, not checkpointed

    journal = Journal(tmp_path / "journal.db")
    again = Namespace(journal, uid=0, gid=0, on_purge=cache.remove)
    before = {name: again.getattr(i).state for name, i in ino.items()}
    assert before == {"dirty": DIRTY, "queued": QUEUED, "uploading": UPLOADING, "durable": DURABLE}
    summary = recover(again, cache, journal)
    assert (summary["requeued"], summary["made_ready"]) == (1, 1)
    after = {name: again.getattr(i).state for name, i in ino.items()}
    assert after == {"dirty": QUEUED, "queued": QUEUED, "uploading": QUEUED, "durable": DURABLE}
    assert again.getattr(ino["uploading"]).ready_seq == seq_of_uploading, "an interrupted upload keeps its place"
    assert again.getattr(ino["dirty"]).ready_seq > seq_of_uploading
    journal.close()


def test_the_journal_refuses_a_state_that_contradicts_the_commit_order(parts):
    journal, ns, _ = parts
    ino = ns.create(ROOT_INODE, b"f", FILE, 0, 0).id
    with pytest.raises(sqlite3.IntegrityError):
        journal.execute("UPDATE inodes SET state='queued' WHERE id=?", (ino,))  # queued without a place
    with pytest.raises(sqlite3.IntegrityError):
        journal.execute("UPDATE inodes SET state='resting' WHERE id=?", (ino,))
    ns.mark_ready(ino)
    with pytest.raises(sqlite3.IntegrityError):
        journal.execute("UPDATE inodes SET state='dirty' WHERE id=?", (ino,))  # dirty with a place
    assert ns.getattr(ino).state is QUEUED
