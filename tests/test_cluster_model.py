"""Model test over two nodes: random operations on two real gateways (`--cluster`, one moto prefix),
each applied on one of the two mounts, checked against a simple model of the namespace.

A seeded random walk runs mkdir -p, write + close (in place, or tmp + fsync + rename as torch
does), file renames (also over an existing file), rmtree, and commit markers (`.metadata` in a
directory: the cluster commit) on node a or node b; the model is a dict of paths. At each settle
point both nodes drain, and within the documented propagation bound (SEMANTICS.md, "Several
nodes": P + T + E, here with T = 1 s) both mounts must show exactly the model's tree, byte for
byte, the example's directory must be durable cluster-wide on both, and the bucket must hold
exactly its files and the markers of its empty directories.

Between two settle points an operation never touches what the other node changed since the last
one (no two nodes write one file, no delete racing another node's writes: SEMANTICS.md says a
cluster is not a shared POSIX filesystem), except that both may `mkdir -p` one directory and write
different files into it, as ranks do. A failure names its seed: CKPTFS_MODEL_SEED=N reruns it.
Directory renames are not in the walk (renames of published directories on several nodes are not
handled: CLUSTER.md, "What is not covered").
"""

from __future__ import annotations

import hashlib
import itertools
import random
import os
import shutil
import time
from pathlib import Path
from typing import ClassVar

import pytest

from tests.test_cluster_commit import cluster_options

NODES = ("a", "b")
DIRS = ("s1", "s2", "s1/t", "s2/t")
FILES = ("f", "g", "s1/f", "s1/g", "s2/f", "s1/t/f", "s2/t/g")
MARKER = ".metadata"
BOUND_S = 12  # P (0.5 s) + T (1 s) + E (5 s) + the drain, with room on 2 busy cores


def ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def related(p: str, q: str) -> bool:
    """One is the other or below it."""
    return p == q or p.startswith(q + "/") or q.startswith(p + "/")


def at_or_above(p: str, q: str) -> bool:
    return p == q or q.startswith(p + "/")


def view(root: Path) -> dict[str, tuple]:
    """What a mount shows below `root`: path -> ('dir',), ('file', sha256) or ('error', why): a read
    inside the propagation bound may fail (the other node overwrote the object); the bound is the check."""
    tree: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames:
            tree[os.path.normpath(os.path.join(rel, name))] = ("dir",)
        for name in filenames:
            try:
                entry = ("file", hashlib.sha256(Path(dirpath, name).read_bytes()).hexdigest())
            except OSError as exc:  # e.g. EIO: the object was overwritten and this node has not followed yet
                entry = ("error", exc.strerror)
            tree[os.path.normpath(os.path.join(rel, name))] = entry
    return tree


def wait_drained(mount, timeout: float = 60) -> None:
    """`ckptfs wait MOUNT` in-process: everything changed so far on this node is durable."""
    target = mount.status()["generation"]
    deadline = time.monotonic() + timeout
    while mount.status()["durable_through_generation"] < target:
        assert time.monotonic() < deadline, f"node {mount.path.name} did not drain in {timeout}s"
        time.sleep(0.05)


class Context:
    mounts: ClassVar[dict] = {}  # node -> Mount
    ops: ClassVar[dict] = {}     # node -> operations it ran
    counter = itertools.count()
    bucket_objects = None  # (prefix) -> {relative key: body}


class TwoNodes:
    def __init__(self):
        self.name = f"ex{next(Context.counter):03d}"
        self.model: dict[str, tuple] = {}      # path below the example -> ('dir',) / ('file', bytes)
        self.committed_ever: set[str] = set()  # scopes committed once (a scope is saved once per name)
        self.log: list[str] = []
        self.roots = {n: Context.mounts[n].path / self.name for n in NODES}
        self.roots["a"].mkdir()
        self._new_phase()
        self.fresh[""] = "a"  # the example's directory, made on a: b sees it after the first settle

    def _new_phase(self) -> None:
        self.touched = {n: (set(), set()) for n in NODES}  # node -> (changed paths, ensured dirs)
        self.fresh: dict[str, str] = {}  # path made in this phase -> the node that made it

    # ---- who may do what in this phase ------------------------------------------------------

    def free(self, node: str, change: set[str], ensure: set[str]) -> bool:
        """Nothing of this operation races what the other node did since the last settle: what it
        changes is not what the other node changed (nor above or below it) nor above a directory
        the other node made or wrote into; what it makes is not below what the other node changed."""
        other_change, other_ensure = self.touched[other(node)]
        return not (any(related(c, o) for c in change for o in other_change)
                    or any(at_or_above(c, e) for c in change for e in other_ensure)
                    or any(at_or_above(o, e) for e in ensure for o in other_change))

    def visible(self, node: str, path: str) -> bool:
        """The node sees `path` for sure: it existed at the last settle, or the node made it."""
        return (path in self.model or path == "") and self.fresh.get(path, node) == node

    def run(self, node: str, what: str, change: set[str], ensure: set[str], fn) -> str | None:
        """Apply `fn` on `node` (or on the other node if `node` may not); the node used, or None."""
        if not self.free(node, change, ensure):
            node = other(node)
            if not self.free(node, change, ensure):
                return None
        self.log.append(f"{node}: {what}")
        fn(self.roots[node])
        self.touched[node][0].update(change)
        self.touched[node][1].update(ensure)
        Context.ops[node] += 1
        return node

    def pick_node(self, node: str, needs: list[str], change: set[str]) -> str | None:
        """`node`, or else the other node, if it sees everything in `needs` and may change `change`."""
        for n in (node, other(node)):
            if all(self.visible(n, p) for p in needs) and self.free(n, change, set()):
                return n
        return None

    def file_parent_ok(self, path: str) -> bool:
        return not any(self.model.get(p, ("dir",))[0] == "file" for p in ancestors(path))

    # ---- operations -------------------------------------------------------------------------

    def mkdir(self, node, d):
        if self.model.get(d, ("dir",))[0] != "dir" or not self.file_parent_ok(d):
            return
        made = [p for p in [*ancestors(d), d] if p not in self.model]
        used = self.run(node, f"mkdir -p {d}", set(), {d, *ancestors(d)},
                        lambda root: os.makedirs(root / d, exist_ok=True))
        for p in made if used else ():
            self.model[p] = ("dir",)
            self.fresh[p] = used

    def write(self, node, f, data, like_torch):
        if self.model.get(f, ("file",))[0] != "file" or not self.file_parent_ok(f):
            return

        def op(root):
            (root / f).parent.mkdir(parents=True, exist_ok=True)  # every rank does
            if like_torch:
                tmp = root / (f + ".tmp")
                with open(tmp, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.rename(tmp, root / f)
            else:
                with open(root / f, "wb") as out:
                    out.write(data)
        made = [p for p in ancestors(f) if p not in self.model]
        used = self.run(node, f"write {f} ({len(data)} B, torch={like_torch})", {f}, set(ancestors(f)), op)
        if used:
            for p in made:
                self.model[p] = ("dir",)
                self.fresh[p] = used
            self.model[f] = ("file", data)
            self.fresh[f] = used

    def rename(self, node, src, dst):
        if src == dst or self.model.get(src, ("dir",))[0] != "file" or self.model.get(dst, ("file",))[0] != "file":
            return
        parent = "/".join(dst.split("/")[:-1])
        if parent and self.model.get(parent, ("file",))[0] != "dir":
            return
        n = self.pick_node(node, [src, parent], {src, dst})
        if n and self.run(n, f"rename {src} -> {dst}", {src, dst}, set(),
                          lambda root: os.rename(root / src, root / dst)):
            self.model[dst] = self.model.pop(src)
            self.fresh[dst] = n

    def rmtree(self, node, d):
        if self.model.get(d, ("file",))[0] != "dir":
            return
        n = self.pick_node(node, [d], {d})
        if n and self.run(n, f"rmtree {d}", {d}, set(), lambda root: shutil.rmtree(root / d)):
            for p in [p for p in self.model if at_or_above(d, p)]:
                del self.model[p]

    def commit(self, node, d, data):
        """A commit marker: published only once both nodes' files of `d` are durable."""
        marker = f"{d}/{MARKER}" if d else MARKER
        if (d and self.model.get(d, ("file",))[0] != "dir") or marker in self.model or marker in self.committed_ever:
            return
        n = self.pick_node(node, [d], {marker})
        if n is None:
            return

        def op(root):
            tmp = root / (marker + ".tmp")
            tmp.write_bytes(data)
            os.rename(tmp, root / marker)
        if self.run(n, f"commit {marker}", {marker}, set(), op):
            self.model[marker] = ("file", data)
            self.committed_ever.add(marker)
            self.fresh[marker] = n

    # ---- settle points ----------------------------------------------------------------------

    def settle(self):
        """Both nodes drained; within the bound, both views and the bucket equal the model."""
        self.log.append("settle")
        for n in NODES:
            wait_drained(Context.mounts[n])
        want_view = {p: ("dir",) if v[0] == "dir" else ("file", hashlib.sha256(v[1]).hexdigest())
                     for p, v in self.model.items()}
        want_bucket = self.expected_objects()
        deadline = time.monotonic() + BOUND_S
        while True:
            views = {n: view(self.roots[n]) if self.roots[n].is_dir() else None for n in NODES}
            states = {n: self.roots[n].is_dir() and os.getxattr(self.roots[n], "user.ckptfs.state").decode()
                      for n in NODES}
            bucket = Context.bucket_objects(self.name + "/")
            if (all(v == want_view for v in views.values()) and bucket == want_bucket
                    and all(s == "durable" for s in states.values())):
                break
            if time.monotonic() > deadline:
                problems = [f"node {n} shows {diff(views[n], want_view)}" for n in NODES if views[n] != want_view]
                problems += [f"node {n}: {self.name} is {s}" for n, s in states.items() if s != "durable"]
                if bucket != want_bucket:
                    problems.append(f"bucket has {diff(bucket, want_bucket)}")
                raise AssertionError(f"{self.name} after {BOUND_S}s: " + "; ".join(problems)
                                     + f"\noperations: {self.log}")
            time.sleep(0.2)
        self._new_phase()

    def expected_objects(self) -> dict[str, str | None]:
        """Files -> sha256 of their bytes, empty directories -> None (a `dir/` marker)."""
        out: dict[str, str | None] = {}
        for path, v in self.model.items():
            if v[0] == "file":
                out[path] = hashlib.sha256(v[1]).hexdigest()
            elif not any(p.startswith(path + "/") for p in self.model):
                out[path + "/"] = None
        if not self.model:
            out[""] = None  # the example's own directory, empty: its marker `exNNN/`
        return out

    def changed(self) -> bool:
        return any(c or e for c, e in self.touched.values())

    def finish(self) -> None:
        if self.changed():
            self.settle()


def other(node: str) -> str:
    return NODES[1 - NODES.index(node)]


def diff(got: dict | None, want: dict) -> str:
    if got is None:
        return "no example directory"
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    changed = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    return f"missing {missing}, extra {extra}, different {changed}"


def walk(model: TwoNodes, rng: random.Random, steps: int) -> None:
    """`steps` random operations on random nodes, a settle point after every few, and one at the end."""
    for _ in range(steps):
        node = rng.choice(NODES)
        op = rng.choices(list(OPS), weights=list(OPS.values()))[0]
        if op == "mkdir":
            model.mkdir(node, rng.choice(DIRS))
        elif op == "write":
            data = rng.randbytes(rng.choice((0, 1, 100, 2000)))
            model.write(node, rng.choice(FILES), data, rng.random() < 0.5)
        elif op == "rename":
            model.rename(node, rng.choice(FILES), rng.choice(FILES))
        elif op == "rmtree":
            model.rmtree(node, rng.choice(DIRS))
        elif op == "commit":
            model.commit(node, rng.choice(("", *DIRS)), rng.randbytes(rng.randint(1, 50)))
        elif model.changed():
            model.settle()
    model.finish()


OPS = {"mkdir": 2, "write": 5, "rename": 2, "rmtree": 2, "commit": 1, "settle": 2}  # operation -> weight


def run_model(make_mount, tmp_path, s3_server, seeds: list[int], steps: int) -> None:
    extra = ("--metadata-ttl", "1")
    Context.mounts = {n: make_mount(n, options=cluster_options(n, *extra, "--log-file", str(tmp_path / f"{n}.log")))
                      for n in NODES}
    a = Context.mounts["a"]
    client = s3_server.boto3_client()

    def bucket_objects(prefix: str) -> dict[str, str | None]:
        full = f"{a.prefix}/{prefix}"
        out: dict[str, str | None] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=a.bucket, Prefix=full):
            for item in page.get("Contents", []):
                rel = item["Key"][len(full):]
                try:
                    body = client.get_object(Bucket=a.bucket, Key=item["Key"])["Body"].read()
                except client.exceptions.NoSuchKey:  # deleted since the LIST: not there
                    continue
                out[rel] = None if rel == "" or rel.endswith("/") else hashlib.sha256(body).hexdigest()
        return out

    Context.bucket_objects = bucket_objects
    Context.ops = {n: 0 for n in NODES}
    for seed in seeds:
        model = TwoNodes()
        try:
            walk(model, random.Random(seed), steps)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed} (rerun: CKPTFS_MODEL_SEED={seed}): {exc}") from None
    assert all(Context.ops.values()), f"both nodes must have done operations: {Context.ops}"


def seeds(default: list[int]) -> list[int]:
    chosen = os.environ.get("CKPTFS_MODEL_SEED")
    return [int(x) for x in chosen.split(",")] if chosen else default


@pytest.mark.timeout(300)
def test_two_nodes_behave_like_one_namespace(make_mount, tmp_path, s3_server):
    run_model(make_mount, tmp_path, s3_server, seeds([1, 2]), steps=30)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_nodes_behave_like_one_namespace_long(make_mount, tmp_path, s3_server):
    run_model(make_mount, tmp_path, s3_server, seeds([random.randrange(1 << 30) for _ in range(12)]), steps=60)
