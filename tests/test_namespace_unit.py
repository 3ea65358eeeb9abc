"""Unit tier for the namespace: a real Journal in tmp_path and a Namespace on it, no FUSE, no bucket.

Names, link counts, errnos, timestamps and what the drain is asked to publish (docs/SEMANTICS.md).
"""

from __future__ import annotations

import errno
import itertools
import stat

import pytest

from gateway import namespace as namespace_module
from gateway.errors import FsError
from gateway.file_state import DIRTY, DURABLE, QUEUED, UPLOADING, IllegalTransition
from gateway.journal import Journal
from gateway.namespace import RENAME_EXCHANGE, ROOT_INODE, Namespace

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755
FIFO = stat.S_IFIFO | 0o644
# The drain's query for what it must publish (gateway/drain.py, Drain._schedule).
PENDING_SQL = "SELECT id FROM inodes WHERE state IN ('queued', 'uploading') AND nlink>0"


@pytest.fixture(autouse=True)
def ticking_clock(monkeypatch):
    """Every namespace change sees a later time than the one before (nanosecond clocks can tie)."""
    ticks = itertools.count(1_000_000_000)
    monkeypatch.setattr(namespace_module, "now_ns", lambda: next(ticks))


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "journal.db")
    yield j
    j.conn.close()


@pytest.fixture
def purged() -> list[int]:
    return []


@pytest.fixture
def ns(journal, purged) -> Namespace:
    return Namespace(journal, uid=0, gid=0, on_purge=purged.append)


def new_file(ns: Namespace, parent: int, name: bytes) -> int:
    """A regular file as a creator leaves it: created, then closed (ready for the drain)."""
    ino = ns.create(parent, name, FILE, 0, 0).id
    ns.mark_ready(ino)
    return ino


def publish(ns: Namespace, ino: int, *keys: str) -> None:
    """What the drain records once `ino` is in the bucket under `keys`."""
    for key in keys:
        ns.journal.execute("INSERT OR REPLACE INTO objects (key, inode, size) VALUES (?, ?, 0)", (key, ino))
    ns.journal.execute("UPDATE inodes SET state='durable', content_dirty=0 WHERE id=?", (ino,))


def pending(ns: Namespace) -> set[int]:
    return {r[0] for r in ns.journal.all(PENDING_SQL)}


def object_owner(ns: Namespace, key: str) -> int | None:
    return ns.journal.one("SELECT inode FROM objects WHERE key=?", (key,))[0]


def errno_of(fn, *args) -> int:
    with pytest.raises(FsError) as info:
        fn(*args)
    return info.value.errno


# ---- create, unlink, rmdir ------------------------------------------------------------------

def test_create_journals_the_entry_and_touches_the_parent(ns):
    before = ns.getattr(ROOT_INODE)
    attr = ns.create(ROOT_INODE, b"f", FILE, 7, 8)
    assert (attr.nlink, attr.uid, attr.gid, attr.durable, attr.ready_seq) == (1, 7, 8, 0, None)
    assert ns.lookup(ROOT_INODE, b"f").id == attr.id and ns.path_of(attr.id) == "f"
    root = ns.getattr(ROOT_INODE)
    assert root.mtime_ns > before.mtime_ns and root.ctime_ns > before.ctime_ns


def test_create_errnos(ns):
    f = new_file(ns, ROOT_INODE, b"f")
    assert errno_of(ns.create, ROOT_INODE, b"f", FILE, 0, 0) == errno.EEXIST
    assert errno_of(ns.create, f, b"x", FILE, 0, 0) == errno.ENOTDIR
    assert errno_of(ns.create, ROOT_INODE, b"n" * 256, FILE, 0, 0) == errno.ENAMETOOLONG
    assert errno_of(ns.create, ROOT_INODE, b"a/b", FILE, 0, 0) == errno.EINVAL
    d = ns.create(ROOT_INODE, b"d", DIR, 0, 0).id
    ns.rmdir(ROOT_INODE, b"d")
    assert errno_of(ns.create, d, b"x", FILE, 0, 0) == errno.ENOENT  # created in a removed directory


def test_unlink_and_rmdir_errnos(ns):
    d = ns.create(ROOT_INODE, b"d", DIR, 0, 0).id
    new_file(ns, d, b"f")
    assert errno_of(ns.unlink, ROOT_INODE, b"d") == errno.EISDIR
    assert errno_of(ns.rmdir, d, b"f") == errno.ENOTDIR
    assert errno_of(ns.rmdir, ROOT_INODE, b"d") == errno.ENOTEMPTY
    assert errno_of(ns.unlink, ROOT_INODE, b"missing") == errno.ENOENT
    assert errno_of(ns.rmdir, d, b".") == errno.EINVAL


def test_unlinked_open_file_is_purged_at_its_last_close(ns, purged):
    ino = new_file(ns, ROOT_INODE, b"f")
    ns.opened(ino, writable=False)
    ns.unlink(ROOT_INODE, b"f")
    assert ns.getattr(ino).nlink == 0 and purged == []
    ns.closed(ino, writable=False)
    assert purged == [ino]
    assert errno_of(ns.getattr, ino) == errno.ENOENT


def test_directory_link_count_is_two_plus_subdirectories(ns):
    a = ns.create(ROOT_INODE, b"a", DIR, 0, 0).id
    b = ns.create(ROOT_INODE, b"b", DIR, 0, 0).id
    ns.create(a, b"x", DIR, 0, 0)
    new_file(ns, a, b"f")  # files do not count
    assert ns.getattr(a).nlink == 3 and ns.getattr(ROOT_INODE).nlink == 4
    ns.rename(a, b"x", b, b"x", 0)
    assert (ns.getattr(a).nlink, ns.getattr(b).nlink) == (2, 3)
    ns.create(a, b"y", DIR, 0, 0)
    ns.rename(b, b"x", a, b"y", 0)  # replaces the empty directory a/y
    assert (ns.getattr(a).nlink, ns.getattr(b).nlink) == (3, 2)
    ns.rmdir(a, b"y")
    assert ns.getattr(a).nlink == 2


def test_exchange_of_a_directory_and_a_file_moves_the_subdirectory_count(ns):
    a = ns.create(ROOT_INODE, b"a", DIR, 0, 0).id
    b = ns.create(ROOT_INODE, b"b", DIR, 0, 0).id
    ns.create(a, b"sub", DIR, 0, 0)
    new_file(ns, b, b"file")
    ns.rename(a, b"sub", b, b"file", RENAME_EXCHANGE)
    assert (ns.getattr(a).nlink, ns.getattr(b).nlink) == (2, 3)
    assert ns.getattr(ns.child_id(b, b"file")).is_dir


def test_directory_link_counts_are_recomputed_at_start(journal):
    ns = Namespace(journal, uid=0, gid=0, on_purge=lambda ino: None)
    a = ns.create(ROOT_INODE, b"a", DIR, 0, 0).id
    ns.create(a, b"x", DIR, 0, 0)
    journal.execute("UPDATE inodes SET nlink=2 WHERE id=?", (a,))  # as a journal from before link counts
    again = Namespace(journal, uid=0, gid=0, on_purge=lambda ino: None)
    assert again.getattr(a).nlink == 3


# ---- FIFOs, sockets and devices: local-only ------------------------------------------------

@pytest.mark.parametrize("mode", [FIFO, stat.S_IFSOCK | 0o755, stat.S_IFCHR | 0o600, stat.S_IFBLK | 0o600])
def test_special_nodes_are_never_pending(ns, mode):
    node = ns.create(ROOT_INODE, b"node", mode, 0, 0, rdev=0x0103)
    assert (node.durable, node.content_dirty, node.ready_seq, node.rdev) == (1, 0, None, 0x0103)
    assert node.is_local_only and stat.S_IFMT(node.mode) == stat.S_IFMT(mode)
    assert node.id not in pending(ns)
    d = ns.create(ROOT_INODE, b"d", DIR, 0, 0).id
    ns.rename(ROOT_INODE, b"node", d, b"moved", 0)
    ns.link(node.id, ROOT_INODE, b"second")
    ns.rename(ROOT_INODE, b"d", ROOT_INODE, b"d2", 0)  # a directory rename republishes its subtree
    assert node.id not in pending(ns) and ns.getattr(node.id).durable == 1
    assert sorted(ns.paths_of(node.id)) == ["d2/moved", "second"]


def test_a_directory_holding_only_a_fifo_has_no_published_children(ns):
    d = ns.create(ROOT_INODE, b"d", DIR, 0, 0).id
    ns.create(d, b"fifo", FIFO, 0, 0)
    assert ns.has_children(d) and not ns.has_published_children(d)
    assert errno_of(ns.rmdir, ROOT_INODE, b"d") == errno.ENOTEMPTY  # not empty for POSIX
    new_file(ns, d, b"f")
    assert ns.has_published_children(d)


# ---- hard links ---------------------------------------------------------------------------------

def test_link_adds_a_name_to_the_same_inode(ns):
    ino = new_file(ns, ROOT_INODE, b"f")
    d = ns.create(ROOT_INODE, b"d", DIR, 0, 0).id
    publish(ns, ino, "f")
    before, dir_before = ns.getattr(ino), ns.getattr(d)
    attr = ns.link(ino, d, b"g")
    assert attr.id == ino and attr.nlink == 2 and attr.ctime_ns > before.ctime_ns
    assert ns.getattr(d).mtime_ns > dir_before.mtime_ns
    assert ns.lookup(d, b"g").id == ino
    assert ns.path_of(ino) == "f" and ns.paths_of(ino) == ["f", "d/g"]
    assert ino in pending(ns)  # the new name needs its object


def test_link_errnos(ns):
    ino = new_file(ns, ROOT_INODE, b"f")
    d = ns.create(ROOT_INODE, b"d", DIR, 0, 0).id
    assert errno_of(ns.link, ino, ROOT_INODE, b"f") == errno.EEXIST
    assert errno_of(ns.link, d, ROOT_INODE, b"dirlink") == errno.EPERM
    assert errno_of(ns.link, ino, ino, b"x") == errno.ENOTDIR
    assert errno_of(ns.link, ino, ROOT_INODE, b"n" * 256) == errno.ENAMETOOLONG
    ns.opened(ino, writable=False)
    ns.unlink(ROOT_INODE, b"f")
    assert errno_of(ns.link, ino, ROOT_INODE, b"again") == errno.ENOENT


def test_unlink_of_one_name_keeps_the_others_and_their_objects(ns):
    ino = new_file(ns, ROOT_INODE, b"f")
    ns.link(ino, ROOT_INODE, b"g")
    ns.link(ino, ROOT_INODE, b"h")
    publish(ns, ino, "f", "g", "h")
    ctime = ns.getattr(ino).ctime_ns
    ns.unlink(ROOT_INODE, b"g")
    attr = ns.getattr(ino)
    assert attr.nlink == 2 and attr.ctime_ns > ctime
    assert ns.paths_of(ino) == ["f", "h"]
    assert (object_owner(ns, "f"), object_owner(ns, "g"), object_owner(ns, "h")) == (ino, None, ino)
    assert ino not in pending(ns)  # the other names are published already


def test_unlink_of_the_canonical_name_moves_it_to_the_next_oldest(ns):
    ino = new_file(ns, ROOT_INODE, b"f")
    ns.link(ino, ROOT_INODE, b"g")
    publish(ns, ino, "f", "g")
    ns.unlink(ROOT_INODE, b"f")
    assert ns.path_of(ino) == "g" and ns.paths_of(ino) == ["g"]
    assert object_owner(ns, "f") is None and object_owner(ns, "g") == ino
    assert ino in pending(ns)  # the drain looks again: its canonical key changed


def test_the_only_copy_of_an_evicted_file_stays_until_another_name_has_it(ns):
    ino = new_file(ns, ROOT_INODE, b"f")
    publish(ns, ino, "f")
    ns.set_cached(ino, False)  # evicted: the object is the only copy
    ns.link(ino, ROOT_INODE, b"g")
    ns.unlink(ROOT_INODE, b"f")
    assert object_owner(ns, "f") == ino and ns.remote_key(ino) == "f"  # a source to copy or fetch from
    assert ino in pending(ns)
    publish(ns, ino, "g")  # once the drain has copied it to g, the unlink of a name stales its key
    ns.link(ino, ROOT_INODE, b"h")
    publish(ns, ino, "h")
    ns.unlink(ROOT_INODE, b"h")
    assert object_owner(ns, "h") is None


def test_unlink_of_the_last_name_makes_every_object_stale(ns, purged):
    ino = new_file(ns, ROOT_INODE, b"f")
    ns.link(ino, ROOT_INODE, b"g")
    publish(ns, ino, "f", "g")
    ns.unlink(ROOT_INODE, b"f")
    ns.unlink(ROOT_INODE, b"g")
    assert ns.journal.all("SELECT key FROM objects WHERE inode IS NOT NULL") == []
    assert purged == [ino] and ns.paths_of(ino) == []


def test_rename_onto_a_hard_link_of_itself_does_nothing(ns):
    ino = new_file(ns, ROOT_INODE, b"f")
    ns.link(ino, ROOT_INODE, b"g")
    assert ns.rename(ROOT_INODE, b"f", ROOT_INODE, b"g", 0) is None
    assert ns.rename(ROOT_INODE, b"f", ROOT_INODE, b"g", RENAME_EXCHANGE) is None
    assert ns.paths_of(ino) == ["f", "g"] and ns.getattr(ino).nlink == 2


def test_rename_over_one_name_of_a_linked_file_keeps_its_other_name(ns, purged):
    old = new_file(ns, ROOT_INODE, b"target")
    ns.link(old, ROOT_INODE, b"other")
    publish(ns, old, "target", "other")
    new = new_file(ns, ROOT_INODE, b"new")
    replaced = ns.rename(ROOT_INODE, b"new", ROOT_INODE, b"target", 0)
    assert replaced == old and purged == []
    assert ns.getattr(old).nlink == 1 and ns.paths_of(old) == ["other"]
    assert ns.lookup(ROOT_INODE, b"target").id == new
    assert object_owner(ns, "target") is None and object_owner(ns, "other") == old


def test_rename_of_one_name_keeps_its_place_among_the_names(ns):
    ino = new_file(ns, ROOT_INODE, b"f")
    ns.link(ino, ROOT_INODE, b"g")
    ns.rename(ROOT_INODE, b"f", ROOT_INODE, b"f2", 0)
    assert ns.paths_of(ino) == ["f2", "g"] and ns.path_of(ino) == "f2"
    assert ns.child_id(ROOT_INODE, b"f") is None


def test_directory_rename_changes_the_paths_of_links_inside(ns):
    d = ns.create(ROOT_INODE, b"d", DIR, 0, 0).id
    ino = new_file(ns, d, b"f")
    ns.link(ino, ROOT_INODE, b"outside")
    ns.rename(ROOT_INODE, b"d", ROOT_INODE, b"e", 0)
    assert ns.paths_of(ino) == ["e/f", "outside"]


def test_names_and_their_order_survive_a_restart(journal):
    ns = Namespace(journal, uid=0, gid=0, on_purge=lambda ino: None)
    ino = new_file(ns, ROOT_INODE, b"z-first")
    ns.link(ino, ROOT_INODE, b"a-second")
    again = Namespace(journal, uid=0, gid=0, on_purge=lambda ino: None)
    assert again.paths_of(ino) == ["z-first", "a-second"] and again.path_of(ino) == "z-first"
    assert again.getattr(ino).nlink == 2


# ---- timestamps --------------------------------------------------------------------------------

def test_setattr_changes_ctime_and_keeps_given_times(ns):
    ino = new_file(ns, ROOT_INODE, b"f")
    ctime = ns.getattr(ino).ctime_ns
    attr = ns.setattr(ino, mode=0o600)
    assert stat.S_IMODE(attr.mode) == 0o600 and stat.S_ISREG(attr.mode) and attr.ctime_ns > ctime
    attr = ns.setattr(ino, atime_ns=5, mtime_ns=6)
    assert (attr.atime_ns, attr.mtime_ns) == (5, 6)


def test_rename_changes_ctime_of_the_file_and_both_directories(ns):
    a = ns.create(ROOT_INODE, b"a", DIR, 0, 0).id
    b = ns.create(ROOT_INODE, b"b", DIR, 0, 0).id
    ino = new_file(ns, a, b"f")
    before = {i: ns.getattr(i) for i in (a, b, ino)}
    ns.rename(a, b"f", b, b"f", 0)
    assert ns.getattr(ino).ctime_ns > before[ino].ctime_ns
    for d in (a, b):
        assert ns.getattr(d).mtime_ns > before[d].mtime_ns and ns.getattr(d).ctime_ns > before[d].ctime_ns


def test_local_nodes_and_links_survive_a_restart_and_recovery(journal, tmp_path):
    from gateway.cache import CacheFiles
    from gateway.daemon import recover

    ns = Namespace(journal, uid=0, gid=0, on_purge=lambda ino: None)
    fifo = ns.create(ROOT_INODE, b"fifo", FIFO, 5, 6, rdev=0).id
    dev = ns.create(ROOT_INODE, b"dev", stat.S_IFCHR | 0o600, 0, 0, rdev=0x0103).id
    ino = ns.create(ROOT_INODE, b"f", FILE, 0, 0).id
    ns.opened(ino, writable=True)  # still open for writing when the daemon dies
    ns.link(ino, ROOT_INODE, b"g")
    assert ns.getattr(ino).ready_seq is None  # a link does not make a file being written ready
    again = Namespace(journal, uid=0, gid=0, on_purge=lambda ino: None)
    summary = recover(again, CacheFiles(tmp_path / "cache"), journal)
    assert summary["made_ready"] == 1 and pending(again) - {ROOT_INODE} == {ino}  # not the local nodes
    assert (again.getattr(fifo).mode, again.getattr(fifo).uid) == (FIFO, 5)
    assert again.getattr(dev).rdev == 0x0103 and again.paths_of(ino) == ["f", "g"]


# ---- following other nodes (--cluster) --------------------------------------------------------

def test_a_directory_another_node_emptied_waits_for_the_log_before_its_marker(ns):
    """Its marker is this node's to publish too (another node may have emptied it only in part),
    but only after a look at the namespace log (`emptied_elsewhere`): published while a removal
    of the directory is on its way, it would land after that node's sweep and bring it back."""
    d = ns.create(ROOT_INODE, b"step", DIR, 0, 0).id
    sub = ns.create(d, b"sub", DIR, 0, 0).id
    f = new_file(ns, sub, b"shard")
    g = new_file(ns, sub, b"other")
    for ino in (ROOT_INODE, d, sub):
        publish(ns, ino)  # durable; directories with children have no marker of their own
    publish(ns, f, "step/sub/shard")
    publish(ns, g, "step/sub/other")
    before = ns.getattr(sub).mtime_ns
    ns.forget_remote(f, "step/sub/shard")  # the listing: the object vanished; sub is not empty
    assert pending(ns) == set() and ns.getattr(sub).mtime_ns > before and not ns.emptied_elsewhere
    ns.forget_remote(g, "step/sub/other")
    assert pending(ns) == {sub} and ns.emptied_elsewhere == {sub}
    ns.remove_tree(d)  # the rmdir record of another node: nothing is left to publish
    assert pending(ns) == set()


def test_names_another_node_removed_hand_their_objects_to_it_and_local_removals_stale_them(ns):
    """After another node's rmdir record, the objects this node published there are that node's to
    sweep: deleting them from here could delete what it wrote at those keys since."""
    def stale() -> set[str]:
        return {r[0] for r in ns.journal.all("SELECT key FROM objects WHERE inode IS NULL")}
    d = ns.create(ROOT_INODE, b"step", DIR, 0, 0).id
    f = new_file(ns, d, b"shard")
    empty = ns.create(ROOT_INODE, b"empty", DIR, 0, 0).id
    g = new_file(ns, ROOT_INODE, b"g")
    publish(ns, f, "step/shard")
    publish(ns, empty, "empty/")
    publish(ns, g, "g")
    ns.remove_tree(d)  # the rmdir record of another node
    ns.remove_tree(empty)
    assert ns.resolve("step") is None and ns.resolve("empty") is None
    assert stale() == set() and ns.journal.one("SELECT count(*) FROM objects WHERE key<>'g'")[0] == 0
    ns.unlink(ROOT_INODE, b"g")  # this node's own removal: its drain deletes the object
    assert stale() == {"g"}


def test_an_entry_from_another_node_takes_back_the_marker_of_a_directory_published_empty(ns):
    d = ns.create(ROOT_INODE, b"step", DIR, 0, 0).id
    publish(ns, ROOT_INODE)
    publish(ns, d, "step/")  # this node published step/ while it was empty
    ns.adopt_remote(d, b"shard", is_dir=False, size=3, key="step/shard", etag="e")
    assert pending(ns) == {d}  # the drain looks again: it has a child now, so the marker goes
    other = ns.create(ROOT_INODE, b"other", DIR, 0, 0).id
    publish(ns, ROOT_INODE)
    publish(ns, other)  # durable, no marker of ours
    ns.adopt_remote(other, b"shard", is_dir=False, size=3, key="other/shard", etag="e")
    assert other not in pending(ns)


# ---- the file state (gateway/file_state.py) ------------------------------------------------

def test_a_file_goes_dirty_queued_uploading_durable_and_back(ns):
    ino = ns.create(ROOT_INODE, b"f", FILE, 0, 0).id
    ns.opened(ino, writable=True)
    ns.content_changed(ino)
    assert (ns.getattr(ino).state, ns.getattr(ino).ready_seq) == (DIRTY, None)
    ns.closed(ino, writable=True)
    queued = ns.getattr(ino)
    assert queued.state is QUEUED and queued.ready_seq is not None
    ns.start_upload(ino)
    assert ns.getattr(ino).state is UPLOADING
    assert ns.mark_durable(ino, queued.changed_gen)
    assert ns.getattr(ino).state is DURABLE and ino not in pending(ns)
    ns.content_changed(ino)  # rewritten in place
    assert (ns.getattr(ino).state, ns.getattr(ino).ready_seq) == (DIRTY, None)
    ns.mark_ready(ino)
    ns.rename(ROOT_INODE, b"f", ROOT_INODE, b"g", 0)
    assert ns.getattr(ino).state is QUEUED and ns.getattr(ino).ready_seq > queued.ready_seq
    ns.remember(ino)  # the kernel still knows it: kept, unlinked, with nothing to publish
    ns.unlink(ROOT_INODE, b"g")
    assert (ns.getattr(ino).nlink, ns.getattr(ino).state) == (0, DURABLE)


def test_a_write_during_an_upload_makes_it_dirty_and_the_upload_ends_without_durability(ns):
    ino = new_file(ns, ROOT_INODE, b"f")
    ns.start_upload(ino)
    gen = ns.getattr(ino).changed_gen
    ns.opened(ino, writable=True)
    ns.content_changed(ino)
    assert ns.getattr(ino).state is DIRTY
    assert not ns.mark_durable(ino, gen), "an upload of old content must not make the new content durable"
    ns.upload_ended(ino)
    assert ns.getattr(ino).state is DIRTY, "the end of the old upload must not queue a file being written"


def test_a_rename_during_an_upload_queues_it_again_under_the_new_name(ns):
    ino = new_file(ns, ROOT_INODE, b"f.tmp")
    ns.start_upload(ino)
    gen = ns.getattr(ino).changed_gen
    ns.rename(ROOT_INODE, b"f.tmp", ROOT_INODE, b"f", 0)
    assert ns.getattr(ino).state is QUEUED
    assert not ns.mark_durable(ino, gen)
    ns.upload_ended(ino)
    ns.start_upload(ino)  # the next job for the new name
    assert ns.mark_durable(ino, ns.getattr(ino).changed_gen)


def test_an_upload_that_fails_leaves_the_file_queued_in_its_place(ns):
    ino = new_file(ns, ROOT_INODE, b"f")
    seq = ns.getattr(ino).ready_seq
    ns.start_upload(ino)
    ns.upload_ended(ino)
    assert (ns.getattr(ino).state, ns.getattr(ino).ready_seq) == (QUEUED, seq)


@pytest.mark.parametrize("setup", ["dirty", "uploading", "durable"])
def test_an_illegal_transition_raises_and_changes_nothing(ns, setup):
    ino = ns.create(ROOT_INODE, b"f", FILE, 0, 0).id  # dirty
    if setup != "dirty":
        ns.mark_ready(ino)
        ns.start_upload(ino)
    if setup == "durable":
        assert ns.mark_durable(ino, ns.getattr(ino).changed_gen)
    before = ns.getattr(ino)
    with pytest.raises(IllegalTransition, match=f"{setup} -> uploading"):
        ns.start_upload(ino)  # a file being written, a second job, or nothing to publish
    assert ns.getattr(ino) == before


def test_a_directory_is_queued_when_its_entries_change_and_never_dirty(ns):
    d = ns.create(ROOT_INODE, b"d", DIR, 0, 0).id
    assert ns.getattr(d).state is QUEUED
    ns.start_upload(d)
    ns.create(d, b"f", FILE, 0, 0)  # its marker job is superseded: the directory has a child now
    assert ns.getattr(d).state is QUEUED
    ns.rename(ROOT_INODE, b"d", ROOT_INODE, b"e", 0)
    assert ns.getattr(d).state is QUEUED


# ---- the per-file cost of small files (issue 13) -------------------------------------------

def test_first_write_of_a_file_its_create_opened_writes_no_journal_row(ns):
    """create(2) leaves the row dirty with new content: the first write has nothing to record."""
    ino = ns.create(ROOT_INODE, b"f", FILE, 0, 0).id
    ns.opened(ino, writable=True, created=True)
    changes = ns.journal.conn.total_changes
    ns.content_changed(ino)
    ns.note_write(ino, 0, b"abc")
    assert ns.journal.conn.total_changes == changes
    row = ns.getattr(ino)
    assert (row.state, row.content_dirty, row.size) == (DIRTY, True, 3)
    ns.closed(ino, writable=True)
    closed = ns.getattr(ino)
    assert (closed.state, closed.size) == (QUEUED, 3)
    assert ns.journal.one("SELECT size FROM inodes WHERE id=?", (ino,))[0] == 3


def test_an_existing_file_opened_for_writing_still_records_its_first_write(ns):
    ino = new_file(ns, ROOT_INODE, b"f")
    publish(ns, ino, "f")
    ns.opened(ino, writable=True)
    assert ns.content_changed(ino), "the journal had it clean: the caller must make the intent durable"
    assert ns.getattr(ino).state is DIRTY


def test_mtime_set_while_a_file_is_written_is_kept_in_memory_and_recorded_at_close(ns):
    ino = ns.create(ROOT_INODE, b"f", FILE, 0, 0).id
    ns.opened(ino, writable=True, created=True)
    ns.note_write(ino, 0, b"data")
    changes = ns.journal.conn.total_changes
    shown = ns.setattr(ino, mtime_ns=123_000)
    assert ns.journal.conn.total_changes == changes, "the kernel's mtime at write-back costs no commit"
    assert shown.mtime_ns == 123_000 and ns.getattr(ino).mtime_ns == 123_000
    ns.closed(ino, writable=True)
    mtime, ctime = ns.journal.one("SELECT mtime_ns, ctime_ns FROM inodes WHERE id=?", (ino,))
    assert mtime == 123_000 and ctime == shown.ctime_ns


def test_mtime_of_a_file_not_being_written_goes_to_the_journal_at_once(ns):
    ino = new_file(ns, ROOT_INODE, b"f")
    ns.setattr(ino, mtime_ns=456_000)
    assert ns.journal.one("SELECT mtime_ns FROM inodes WHERE id=?", (ino,))[0] == 456_000
    ns.opened(ino, writable=True)  # opened, but not written: utimensat(2) is recorded at once too
    ns.setattr(ino, mtime_ns=789_000)
    assert ns.journal.one("SELECT mtime_ns FROM inodes WHERE id=?", (ino,))[0] == 789_000
