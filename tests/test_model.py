"""Model test: random operation sequences on the mount and on a plain local directory, side by side.

A Hypothesis `RuleBasedStateMachine` applies create/write/truncate/rename (files and directories,
over existing targets, RENAME_NOREPLACE/RENAME_EXCHANGE)/unlink/mkdir/rmdir/fsync/link/mkfifo, plus
writes through handles kept open across other operations, to both trees. Every operation must give
the same result or the same errno, and after every step both trees must hold the same names, types,
sizes, link counts and bytes. Every open is O_NONBLOCK, so that a FIFO never blocks the test. A `settle` step sometimes waits for the drain mid-sequence and checks that the
example's keys in the bucket hold exactly its files' bytes, so later steps rename, overwrite and
delete durable files too. One mount serves all examples (each in a fresh subdirectory); at the end
the bucket must equal the whole namespace, byte for byte (held temporary names excluded).

Shrinking is off (CKPTFS_MODEL_SHRINK=1 turns it on): it costs minutes on a mount.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import hashlib
import itertools
import json
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from tests.trees import local_tree

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
HOLD_PATTERNS = ("*.tmp", "*.tmp.*", "*.orbax-checkpoint-tmp*", "*.__lock", "*.partial")  # the defaults

# A small universe of names, so that operations collide often: replace, ENOTEMPTY, ENOTDIR, EISDIR...
NAMES = ("a", "b", "c.tmp", "d")
paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
datas = st.binary(max_size=3000)
offsets = st.integers(min_value=0, max_value=5000)
sizes = st.integers(min_value=0, max_value=6000)
OPEN_MODES = {  # O_NONBLOCK: no effect on files; a FIFO opens at once (or ENXIO: no reader)
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK,
    "r+": os.O_RDWR | os.O_NONBLOCK,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NONBLOCK,
    "rw": os.O_RDWR | os.O_CREAT | os.O_NONBLOCK,
}
# The drain publishes every name of a hard-linked file that is not a temporary name, so examples that
# made a hard link get the bucket checks too (set False to skip them while debugging the drain).
EVERY_NAME_PUBLISHED = True

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def outcome(fn, *args):
    """('ok', value) or ('err', errno name): what both sides must agree on."""
    try:
        return ("ok", fn(*args))
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno, exc.errno))


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry below root: relative path -> ('dir', nlink), ('fifo', nlink) or ('file', size, sha256, nlink)."""
    tree: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames:
            tree[os.path.normpath(os.path.join(rel, name))] = ("dir", os.lstat(os.path.join(dirpath, name)).st_nlink)
        for name in filenames:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            if stat.S_ISFIFO(st_.st_mode):
                tree[os.path.normpath(os.path.join(rel, name))] = ("fifo", st_.st_nlink)
                continue
            assert stat.S_ISREG(st_.st_mode), p
            with open(p, "rb") as f:
                data = f.read()
            assert len(data) == st_.st_size, f"{p}: stat says {st_.st_size} bytes, read gave {len(data)}"
            tree[os.path.normpath(os.path.join(rel, name))] = (
                "file", len(data), hashlib.sha256(data).hexdigest(), st_.st_nlink)
    return tree


class Context:
    """Set by the test function before the machine runs: where the two trees live, and the bucket."""

    mount_root: Path | None = None
    plain_root: Path | None = None
    counter = itertools.count()
    bucket_keys = None  # () -> {relative key: size}
    get_object = None   # (relative key) -> bytes
    linked_examples: ClassVar[set[str]] = set()  # example directories that made a hard link
    logs: ClassVar[dict[str, list[str]]] = {}  # example directory -> its operations, for failure messages


def wait_drained(mount_root: Path, timeout: float = 30) -> None:
    """What `ckptfs wait MOUNT` does, in-process: everything changed so far is durable."""
    target = json.loads(os.getxattr(mount_root, "user.ckptfs.status"))["generation"]
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads(os.getxattr(mount_root, "user.ckptfs.status"))
        if status["durable_through_generation"] >= target:
            return
        assert time.monotonic() < deadline, (f"drain did not settle in {timeout}s: {status}; "
                                             f"{pending_evidence(Path(status['cache_dir']))}")
        time.sleep(0.05)


def pending_rows(cache_dir: Path) -> list[tuple]:
    """The journal's pending inodes (id, mode, state, size, content_dirty, path), read beside the
    daemon: a failure's evidence."""
    with sqlite3.connect(f"file:{cache_dir / 'journal.db'}?mode=ro", uri=True, timeout=10) as conn:
        return conn.execute(
            "WITH RECURSIVE p(inode, path) AS (SELECT inode, CAST(name AS TEXT) FROM dentries WHERE parent=1 "
            "UNION ALL SELECT d.inode, p.path || '/' || CAST(d.name AS TEXT) FROM dentries d "
            "JOIN p ON d.parent = p.inode) "
            "SELECT i.id, i.mode, i.state, i.size, i.content_dirty, p.path FROM inodes i "
            "LEFT JOIN p ON p.inode = i.id WHERE i.state <> 'durable' ORDER BY i.id").fetchall()


def pending_evidence(cache_dir: Path) -> str:
    """The pending rows and the operations of every example that has a pending file not held."""
    rows = pending_rows(cache_dir)
    examples = sorted({path.split("/")[0] for *_, path in rows if path and not is_held(path)})
    return f"pending: {rows}; " + "; ".join(f"{ex}: {Context.logs.get(ex)}" for ex in examples)


class SideBySide(RuleBasedStateMachine):
    handles = Bundle("handles")

    def __init__(self):
        super().__init__()
        n = next(Context.counter)
        self.roots = (Context.mount_root / f"ex{n:03d}", Context.plain_root / f"ex{n:03d}")
        for r in self.roots:
            r.mkdir()
        self.open_fds: dict[int, tuple[int, int]] = {}  # handle id -> (mount fd, plain fd)
        self.linked = False  # made a hard link: see EVERY_NAME_PUBLISHED
        self.ids = itertools.count()
        self.log: list[str] = []

    # ---- choosing paths: mostly existing entries or new names in existing directories --------

    def pick(self, data, label: str, kinds=("existing", "existing", "new", "random")) -> str:
        existing = sorted(snapshot(self.roots[1]))
        dirs = [""] + [p for p in existing if os.path.isdir(self.roots[1] / p)]
        how = data.draw(st.sampled_from(kinds), label=f"{label} kind")
        if how == "existing" and existing:
            return data.draw(st.sampled_from(existing), label=label)
        if how == "new":
            parent = data.draw(st.sampled_from(dirs), label=f"{label} parent")
            name = data.draw(st.sampled_from(NAMES), label=f"{label} name")
            return f"{parent}/{name}" if parent else name
        return data.draw(paths, label=label)

    # ---- applying one operation to both trees ----------------------------------------------

    def both(self, what: str, fn) -> tuple:
        """Run fn(root) on the mount and on the plain dir; the outcomes must match."""
        results = [outcome(fn, root) for root in self.roots]
        self.log.append(f"{what} -> {results[1]}")
        assert results[0] == results[1], f"{what}: mount gave {results[0]}, plain dir gave {results[1]}"
        return results[1]

    @rule(draw=st.data(), data=datas, offset=offsets, mode=st.sampled_from(sorted(OPEN_MODES)), sync=st.booleans())
    def write(self, draw, data, offset, mode, sync):
        path = self.pick(draw, "path")

        def op(root):
            fd = os.open(root / path, OPEN_MODES[mode], 0o644)
            try:
                n = os.write(fd, data) if mode == "a" else os.pwrite(fd, data, offset)
                if sync:
                    os.fsync(fd)
                return n
            finally:
                os.close(fd)
        self.both(f"write({path!r}, {len(data)}B @{offset}, {mode}, fsync={sync})", op)

    @rule(draw=st.data(), size=sizes)
    def truncate(self, draw, size):
        path = self.pick(draw, "path")
        self.both(f"truncate({path!r}, {size})", lambda root: os.truncate(root / path, size))

    @rule(draw=st.data(), flags=st.sampled_from([0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, draw, flags):
        src = self.pick(draw, "src", ("existing", "existing", "existing", "random"))
        dst = self.pick(draw, "dst")
        self.both(f"rename({src!r}, {dst!r}, flags={flags})",
                  lambda root: renameat2(str(root / src), str(root / dst), flags))

    @rule(draw=st.data())
    def unlink(self, draw):
        path = self.pick(draw, "path")
        self.both(f"unlink({path!r})", lambda root: os.unlink(root / path))

    @rule(draw=st.data())
    def mkdir(self, draw):
        path = self.pick(draw, "path")
        self.both(f"mkdir({path!r})", lambda root: os.mkdir(root / path))

    @rule(draw=st.data())
    def rmdir(self, draw):
        path = self.pick(draw, "path")
        self.both(f"rmdir({path!r})", lambda root: os.rmdir(root / path))

    @rule(draw=st.data())
    def link(self, draw):
        src = self.pick(draw, "src", ("existing", "existing", "existing", "random"))
        dst = self.pick(draw, "dst", ("new", "new", "existing", "random"))
        if self.both(f"link({src!r}, {dst!r})", lambda root: os.link(root / src, root / dst))[0] == "ok":
            self.linked = True
            Context.linked_examples.add(self.roots[0].name)

    @rule(draw=st.data())
    def mkfifo(self, draw):
        path = self.pick(draw, "path")
        self.both(f"mkfifo({path!r})", lambda root: os.mkfifo(root / path, 0o644))

    @rule(draw=st.data())
    def fsync(self, draw):
        path = "." if draw.draw(st.booleans(), label="root") else self.pick(draw, "path")

        def op(root):
            fd = os.open(root / path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                os.fsync(fd)  # fsync of a file, fsyncdir of a directory
            finally:
                os.close(fd)
        self.both(f"fsync({path!r})", op)

    @rule(draw=st.data(), data=datas)
    def replace_like_torch(self, draw, data):
        """Write `path.tmp`, fsync, rename over `path`: the checkpoint pattern."""
        path = self.pick(draw, "path")

        def op(root):
            tmp = root / (path + ".tmp")
            fd = os.open(tmp, OPEN_MODES["w"], 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, root / path)
        self.both(f"replace_like_torch({path!r}, {len(data)}B)", op)

    # ---- handles kept open across other operations ----------------------------------------

    @rule(target=handles, draw=st.data(), mode=st.sampled_from(["rw", "r+", "a", "w"]))
    def open_handle(self, draw, mode):
        path = self.pick(draw, "path")
        fds = []
        results = []
        for root in self.roots:
            r = outcome(os.open, root / path, OPEN_MODES[mode], 0o644)
            results.append(r if r[0] == "err" else ("ok", None))
            if r[0] == "ok":
                fds.append(r[1])
        self.log.append(f"open({path!r}, {mode}) -> {results[1]}")
        if results[0] != results[1]:
            for fd in fds:
                os.close(fd)
            raise AssertionError(f"open({path!r}, {mode}): mount gave {results[0]}, plain dir gave {results[1]}")
        if len(fds) != 2:
            return multiple()
        hid = next(self.ids)
        self.open_fds[hid] = (fds[0], fds[1])
        return hid

    @rule(h=handles, data=datas, offset=offsets, sync=st.booleans())
    def write_handle(self, h, data, offset, sync):
        if h not in self.open_fds:
            return
        fds = iter(self.open_fds[h])

        def op(_root):
            fd = next(fds)
            n = os.pwrite(fd, data, offset)
            if sync:
                os.fsync(fd)
            return n
        self.both(f"pwrite(h{h}, {len(data)}B @{offset}, fsync={sync})", op)

    @rule(h=handles, size=sizes)
    def ftruncate_handle(self, h, size):
        if h not in self.open_fds:
            return
        fds = iter(self.open_fds[h])
        self.both(f"ftruncate(h{h}, {size})", lambda _root: os.ftruncate(next(fds), size))

    @rule(h=handles)
    def read_handle(self, h):
        if h not in self.open_fds:
            return
        fds = iter(self.open_fds[h])

        def op(_root):
            fd = next(fds)
            size = os.fstat(fd).st_size
            return size, hashlib.sha256(os.pread(fd, size + 10, 0)).hexdigest()
        self.both(f"read(h{h})", op)

    @rule(h=consumes(handles))
    def close_handle(self, h):
        fds = self.open_fds.pop(h, None)
        if fds is not None:
            self.log.append(f"close(h{h})")
            for fd in fds:
                os.close(fd)

    # ---- let the drain catch up, then the bucket must show exactly this tree -------------------

    @rule(really=st.integers(0, 2))
    def settle(self, really):
        """Sometimes wait for the drain mid-sequence, so that later renames, overwrites and deletes
        act on durable files (server-side copies, stale deletes), and check this example's keys."""
        if really or self.open_fds or (self.linked and not EVERY_NAME_PUBLISHED):
            return  # a file open for writing is dirty until closed: `wait` would (rightly) not return
        self.log.append("settle")
        wait_drained(Context.mount_root)
        prefix = self.roots[0].name + "/"
        expected = {prefix + k: v for k, v in expected_objects(self.roots[0]).items()}
        if not os.listdir(self.roots[0]):
            expected[prefix] = None  # the example's own directory, empty: a marker
        deadline = time.monotonic() + 15
        while True:
            keys = {k: v for k, v in Context.bucket_keys().items() if k.startswith(prefix)}
            if set(keys) == set(expected) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert set(keys) == set(expected), (
            f"after settle: missing {sorted(set(expected) - set(keys))}, extra {sorted(set(keys) - set(expected))}; "
            f"operations: {self.log}")
        for key, digest in expected.items():
            body = Context.get_object(key)
            assert (body == b"") if digest is None else hashlib.sha256(body).hexdigest() == digest, (
                f"after settle: {key} in the bucket differs from the file (log: {self.log[-8:]})")

    # ---- the trees must stay equal --------------------------------------------------------

    @invariant()
    def same_trees(self):
        mount_tree, plain_tree = snapshot(self.roots[0]), snapshot(self.roots[1])
        if mount_tree != plain_tree:
            diff = {k: (mount_tree.get(k), plain_tree.get(k)) for k in set(mount_tree) | set(plain_tree)
                    if mount_tree.get(k) != plain_tree.get(k)}
            raise AssertionError(f"trees differ after {self.log[-3:]}: {diff}")
        for rel, entry in plain_tree.items():
            if entry[0] == "dir":
                assert sorted(os.listdir(self.roots[0] / rel)) == sorted(os.listdir(self.roots[1] / rel)), rel

    def teardown(self):
        Context.logs[self.roots[0].name] = self.log
        for fds in self.open_fds.values():
            for fd in fds:
                os.close(fd)
        self.open_fds.clear()


# ---- the bucket after all examples -------------------------------------------------------------

def is_held(rel: str) -> bool:
    return any(fnmatch.fnmatchcase(part, p) for part in rel.split("/") for p in HOLD_PATTERNS)


def expected_objects(root: Path) -> dict[str, str | None]:
    """What the bucket must hold once drained: non-held files (sha256) and empty non-held dirs (None)."""
    return {key: digest for key, digest in local_tree(root).items() if not is_held(key)}


def checked_in_bucket(key: str) -> bool:
    """Whether the final comparison covers `key` (see EVERY_NAME_PUBLISHED)."""
    return EVERY_NAME_PUBLISHED or key.split("/")[0] not in Context.linked_examples


@pytest.mark.timeout(420)
def test_mount_behaves_like_a_local_directory(make_mount, tmp_path):
    # CKPTFS_MODEL_DRAIN_DELAY=0 starts every upload at once: it widens the drain's races
    m = make_mount(options=("--drain-delay", os.environ.get("CKPTFS_MODEL_DRAIN_DELAY", "0.2")))
    plain = tmp_path / "plain"
    plain.mkdir()
    Context.mount_root, Context.plain_root = m.path, plain
    Context.linked_examples = set()
    client = m.s3.boto3_client()
    Context.bucket_keys = m.keys
    Context.get_object = lambda key: client.get_object(Bucket=m.bucket, Key=f"{m.prefix}/{key}")["Body"].read()
    # Shrinking a failure runs hundreds of extra examples (minutes on a mount); it is off unless
    # CKPTFS_MODEL_SHRINK=1, and the unshrunk failing sequence is printed either way.
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if os.environ.get("CKPTFS_MODEL_SHRINK") == "1":
        phases.append(Phase.shrink)
    run_state_machine_as_test(SideBySide, settings=settings(
        max_examples=30, stateful_step_count=40, deadline=None, phases=phases,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    assert len(list(m.path.iterdir())) >= 30, "the machine must have run its examples in the mount"

    # Everything drained: the bucket equals the namespace (held temporary names excluded), byte for byte.
    try:
        m.wait(timeout=120)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; status: {m.status()}; {pending_evidence(m.cache_dir)}") from None
    expected = {k: v for k, v in expected_objects(m.path).items() if checked_in_bucket(k)}
    deadline = time.monotonic() + 60
    keys = {k: v for k, v in m.keys().items() if checked_in_bucket(k)}
    while set(keys) != set(expected) and time.monotonic() < deadline:  # stale deletes follow `wait`
        time.sleep(0.2)
        keys = {k: v for k, v in m.keys().items() if checked_in_bucket(k)}
    assert not [k for k in keys if is_held(k.rstrip("/"))], "a temporary name reached the bucket"
    differ = sorted(set(expected) ^ set(keys))
    assert not differ, (f"missing {sorted(set(expected) - set(keys))[:10]}, extra {sorted(set(keys) - set(expected))[:10]}; "
                        f"operations of {differ[0].split('/')[0]}: {Context.logs.get(differ[0].split('/')[0])}")
    for key, digest in expected.items():
        body = client.get_object(Bucket=m.bucket, Key=f"{m.prefix}/{key}")["Body"].read()
        if digest is None:
            assert body == b"", key
        else:
            assert hashlib.sha256(body).hexdigest() == digest, f"{key}: object bytes differ from the file"
