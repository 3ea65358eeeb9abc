"""The cluster protocol without a mount: record rules (pure) and two Cluster services on real moto.

Each "node" here is a journal + namespace in a temp dir and a Store on the shared moto server;
files are made durable by hand, standing in for the drain.
"""

from __future__ import annotations

import dataclasses
import stat

import pytest
import trio

from gateway import cluster_records as rec
from gateway.cluster import Cluster, load_identity
from gateway.config import Config
from gateway.errors import StoreError
from gateway.scopes import ScopeRules
from gateway.journal import Journal
from gateway.namespace import ROOT_INODE, Namespace
from gateway.remote_ns import RemoteNamespace, coalesce
from gateway.store import Store


# ---- pure rules ---------------------------------------------------------------------------

def test_required_members_include_self_live_and_recently_expired_nodes():
    leases = [rec.Lease("a", "1", 100.0), rec.Lease("b", "1", 95.0), rec.Lease("c", "1", 80.0)]
    assert rec.required_members(leases, "me@0", cutoff=90.0) == ["a@1", "b@1", "me@0"]
    assert rec.required_members([], "me@0", cutoff=0.0) == ["me@0"]


def test_take_over_rules():
    live = {"a@1", "b@1"}
    assert rec.may_take_over({"owner": "a@1", "state": "pending"}, "a@1", live) == "resume"
    assert rec.may_take_over({"owner": "b@1", "state": "pending"}, "a@1", live) == "conflict"
    assert rec.may_take_over({"owner": "b@1", "state": "committed"}, "a@1", live) == "conflict"
    assert rec.may_take_over({"owner": "z@9", "state": "committed"}, "a@1", live) == "replace"  # saved again
    assert rec.may_take_over({"owner": "b@1", "state": "abandoned"}, "a@1", live) == "replace"
    assert rec.may_take_over({"owner": "z@9", "state": "pending"}, "a@1", live) == "replace"
    # granted: its owner may have published the marker already; nobody else may ever take over
    assert rec.may_take_over({"owner": "z@9", "state": "granted"}, "a@1", live) == "conflict"
    assert rec.may_take_over({"owner": "a@1", "state": "granted"}, "a@1", live) == "resume"


@pytest.mark.parametrize("path", ["run1/step_1", "a b/c~d/e%f", "ünï/cødé", "x/.orbax-checkpoint-tmp-1"])
def test_keys_round_trip_odd_paths(path):
    record = rec.parse_log_key(rec.log_key(12.5, "node-1", 3, "rename", path, path + "x"))
    assert (record.node, record.op, record.path, record.to, record.at) == ("node-1", "rename", path, path + "x", 12.5)
    assert rec.parse_pending_key(rec.pending_key(path, "cid")) == (path, "cid")
    child_key = rec.commit_key(path + "/sub")
    assert any(child_key.startswith(p) for p in rec.scope_records_prefixes(path))
    assert not rec.commit_key(path + "x").startswith(rec.scope_records_prefixes(path)[1])


def test_malformed_keys_are_ignored():
    assert rec.parse_log_key(".ckptfs/log/garbage") is None
    assert rec.parse_log_key(".ckptfs/log/1-a-1~rename~x") is None  # a rename needs a target
    assert rec.parse_lease_key(".ckptfs/nodes/../x@1") is None
    assert rec.parse_pending_key(".ckptfs/pending/x") is None


def test_rmtree_bottom_up_becomes_one_record():
    batch = [("mkdir", "s/a", None), ("rmdir", "s/a/b", None), ("rmdir", "s/a", None), ("rmdir", "t", None)]
    assert coalesce(batch) == [("rmdir", "s/a", None), ("rmdir", "t", None)]


def test_identity_is_kept_and_a_fresh_journal_gets_a_new_incarnation(tmp_path):
    j1 = Journal(tmp_path / "j1.db")
    first = load_identity(j1, None)
    assert load_identity(j1, None) == first
    j2 = Journal(tmp_path / "j2.db")  # the same configured id on an empty disk
    assert load_identity(j2, first[0])[1] != first[1]
    assert load_identity(j1, "other")[0] == "other" and load_identity(j1, "other")[1] != first[1]


# ---- two services on moto -----------------------------------------------------------------

class Node:
    """A journal, a namespace and a cluster service; files are made durable by hand."""

    def __init__(self, tmp_path, name: str, store: Store, poll_s: float = 0.05):
        self.journal = Journal(tmp_path / f"{name}.db")
        self.ns = Namespace(self.journal, uid=0, gid=0, on_purge=lambda ino: None)
        config = dataclasses.replace(Config(), node_id=name, lease_interval_s=5.0, cluster_poll_s=poll_s,
                                     mountpoint=f"/{name}")
        self.cluster = Cluster(self.ns, store, self.journal, config)
        self.cluster.namespace = RemoteNamespace(self.ns, store, self.cluster.node)

    def write(self, path: str) -> int:
        parent = ROOT_INODE
        parts = path.split("/")
        for part in parts[:-1]:
            child = self.ns.child_id(parent, part.encode())
            parent = child if child is not None else self.ns.create(parent, part.encode(), stat.S_IFDIR | 0o755, 0, 0).id
        ino = self.ns.create(parent, parts[-1].encode(), stat.S_IFREG | 0o644, 0, 0).id
        self.ns.mark_ready(ino)
        return ino

    def make_durable(self, path: str) -> None:
        ino = self.ns.resolve(path)
        self.journal.execute("INSERT OR REPLACE INTO objects (key, inode, size, digest, etag) VALUES (?, ?, 1, 'd', 'e')",
                             (path, ino))
        self.journal.execute("UPDATE inodes SET state='durable'")


def run_with_store(s3_server, bucket, fn):
    async def main():
        async with Store(bucket, "p", endpoint_url=s3_server.endpoint_url) as store:
            await fn(store)
    trio.run(main)


def test_commit_waits_for_the_other_nodes_answer(s3_server, bucket, tmp_path):
    async def scenario(store):
        a, b = Node(tmp_path, "a", store), Node(tmp_path, "b", store)
        a.write("run/s1/__0_0.distcp")
        b.write("run/s1/__1_0.distcp")
        await a.cluster.register()
        await b.cluster.register()
        async with trio.open_nursery() as nursery:
            await nursery.start(a.cluster.run)
            a.make_durable("run/s1/__0_0.distcp")
            a.write("run/s1/.metadata")
            assert a.cluster.may_publish("run/s1", "run/s1/.metadata") is False
            with trio.fail_after(10):
                while a.cluster.scope_state("run/s1")["state"] != "waiting":
                    await trio.sleep(0.05)
            await b.cluster.poll_once()  # b's shard is not durable: no answer, its pending file in its lease
            assert b.cluster.waiting["run/s1"]["pending_files"] == ["run/s1/__1_0.distcp"]
            await trio.sleep(0.3)
            assert not a.cluster.may_publish("run/s1", "run/s1/.metadata")
            b.make_durable("run/s1/__1_0.distcp")
            await b.cluster.poll_once()
            with trio.fail_after(10):
                while not a.cluster.may_publish("run/s1", "run/s1/.metadata"):
                    await trio.sleep(0.05)
            assert b.cluster.blocks_durable("run/s1")  # b knows the commit is not complete yet
            a.make_durable("run/s1/.metadata")
            with trio.fail_after(10):
                while a.cluster.scope_state("run/s1")["state"] != "committed":
                    await trio.sleep(0.05)
            await b.cluster.poll_once()
            assert not b.cluster.blocks_durable("run/s1")
            nursery.cancel_scope.cancel()
    run_with_store(s3_server, bucket, scenario)


def test_answers_and_outcomes_follow_events_not_the_poll(s3_server, bucket, tmp_path):
    """With a 5 s poll: b answers when its drain makes its shard durable, the holder sees the answer
    and the marker at once, and b reads the outcome early only while someone waits for it there."""
    async def scenario(store):
        a, b = Node(tmp_path, "a", store, poll_s=5.0), Node(tmp_path, "b", store, poll_s=5.0)
        a.write("run/s1/__0_0.distcp")
        b.write("run/s1/__1_0.distcp")
        await a.cluster.register()
        await b.cluster.register()
        async with trio.open_nursery() as nursery:
            await nursery.start(a.cluster.run)
            await nursery.start(b.cluster.run)
            a.make_durable("run/s1/__0_0.distcp")
            a.write("run/s1/.metadata")
            assert not a.cluster.may_publish("run/s1", "run/s1/.metadata")
            with trio.fail_after(10):
                while a.cluster.scope_state("run/s1")["state"] != "waiting":
                    await trio.sleep(0.02)
            await b.cluster.poll_once()  # b sees the announcement; its shard is not durable yet
            b.make_durable("run/s1/__1_0.distcp")
            b.cluster.note_durable()  # what the drain calls
            with trio.fail_after(1.5):  # far less than the 5 s poll
                while not a.cluster.may_publish("run/s1", "run/s1/.metadata"):
                    await trio.sleep(0.02)
            a.make_durable("run/s1/.metadata")
            a.cluster.note_durable()
            with trio.fail_after(1.5):
                while a.cluster.scope_state("run/s1")["state"] != "committed":
                    await trio.sleep(0.02)
            await trio.sleep(0.5)
            assert b.cluster.scope_state("run/s1")["state"] == "answered"  # nobody waits on b: no GETs
            assert b.cluster.blocks_durable("run/s1")  # a wait looks (the xattr of the scope)
            with trio.fail_after(1.5):
                while b.cluster.blocks_durable("run/s1"):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    run_with_store(s3_server, bucket, scenario)


def test_two_markers_racing_only_one_commit_record_wins(s3_server, bucket):
    async def scenario(store):
        key = rec.commit_key("run/s1")
        results = []

        async def racer(i):
            try:
                results.append(("won", await store.put_record(key, f"{i}".encode(), if_none_match=True)))
            except StoreError as exc:
                results.append(("lost", exc.code))

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(racer, i)
        assert sorted(r[0] for r in results) == ["lost", "lost", "lost", "won"]
        # S3 answers 412, or 409 ConditionalRequestConflict to writes racing in flight (retried)
        assert {r[1] for r in results if r[0] == "lost"} <= {"PreconditionFailed", "ConditionalRequestConflict"}
        etag = next(r[1] for r in results if r[0] == "won")
        new = await store.put_record(key, b"x", if_match=etag)
        with pytest.raises(StoreError, match="PreconditionFailed|412"):
            await store.put_record(key, b"y", if_match=etag)  # stale: the other writer got there first
        assert new != etag
    run_with_store(s3_server, bucket, scenario)


def test_conflicting_holder_never_gets_to_publish(s3_server, bucket, tmp_path):
    async def scenario(store):
        a, b = Node(tmp_path, "a", store), Node(tmp_path, "b", store)
        for node in (a, b):
            node.write("run/s1/COMMIT")
            node.make_durable("run/s1/COMMIT")
            await node.cluster.register()
        async with trio.open_nursery() as nursery:
            await nursery.start(a.cluster.run)
            await nursery.start(b.cluster.run)
            a.cluster.may_publish("run/s1", "run/s1/COMMIT")
            with trio.fail_after(10):
                while a.cluster.scope_state("run/s1")["state"] != "waiting":
                    await trio.sleep(0.05)
            b.cluster.may_publish("run/s1", "run/s1/COMMIT")
            with trio.fail_after(10):
                while b.cluster.scope_state("run/s1")["state"] != "conflict":
                    await trio.sleep(0.05)
            await trio.sleep(0.5)
            assert not b.cluster.may_publish("run/s1", "run/s1/COMMIT")
            assert "being committed by a@" in b.cluster.scope_state("run/s1")["error"]
            nursery.cancel_scope.cancel()
    run_with_store(s3_server, bucket, scenario)


def test_namespace_records_apply_on_the_other_node(s3_server, bucket, tmp_path):
    async def scenario(store):
        a, b = Node(tmp_path, "a", store), Node(tmp_path, "b", store)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.cluster.namespace.run)
            a.write("run/step.orbax-checkpoint-tmp-7/x")
            with trio.fail_after(10):
                while b.ns.resolve("run/step.orbax-checkpoint-tmp-7") is None:
                    await b.cluster.namespace.poll_log()
                    await trio.sleep(0.05)
            assert b.ns.resolve("run/step.orbax-checkpoint-tmp-7") is not None
            b.write("run/step.orbax-checkpoint-tmp-7/b_file")
            tmp = a.ns.resolve("run/step.orbax-checkpoint-tmp-7")
            run = a.ns.resolve("run")
            a.ns.rename(run, b"step.orbax-checkpoint-tmp-7", run, b"step", 0)
            assert a.ns.getattr(tmp).is_dir
            with trio.fail_after(10):
                while b.ns.resolve("run/step/b_file") is None:
                    await b.cluster.namespace.poll_log()
                    await trio.sleep(0.05)
            assert b.ns.resolve("run/step.orbax-checkpoint-tmp-7") is None
            step = a.ns.resolve("run/step")
            a.ns.unlink(step, b"x")
            a.ns.rmdir(run, b"step")
            with trio.fail_after(10):
                while b.ns.resolve("run/step") is not None:
                    await b.cluster.namespace.poll_log()
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    run_with_store(s3_server, bucket, scenario)


def test_staged_keys_name_the_root_the_writer_and_the_path_and_never_a_checkpoint_name():
    from gateway.staging import held_root, parse_staged_key, staged_key, staged_path

    rules = ScopeRules()
    path = "run 1/5.orbax-checkpoint-tmp-9/default.orbax-checkpoint-tmp-9/array_metadatas/process_1"
    root = held_root(path, rules)
    assert root == "run 1/5.orbax-checkpoint-tmp-9" and held_root("run1/5/x", rules) is None
    key = staged_key(root, "b@inc1", path[len(root) + 1:])
    assert key.startswith(".ckptfs/staged/run%201%2F5.orbax-checkpoint-tmp-9/b@inc1/")
    assert parse_staged_key(key) == (root, "b@inc1", path[len(root) + 1:])
    assert staged_path(key) == path
    assert parse_staged_key("run1/5/x") is None and staged_path(".ckptfs/staged/x") is None


def test_fence_waits_for_the_other_nodes_staged_files_and_adopts_them(s3_server, bucket, tmp_path, monkeypatch):
    from gateway import cluster as cluster_mod
    from gateway.staging import staged_key

    root = "run/5.orbax-checkpoint-tmp-1"

    async def scenario(store):
        a, b = Node(tmp_path, "a", store), Node(tmp_path, "b", store)
        for n in (a, b):
            n.cluster.namespace.staging = n.cluster.staging
        await a.cluster.register()
        await b.cluster.register()
        async with trio.open_nursery() as nursery:
            await nursery.start(a.cluster.run)
            a.write(f"{root}/array_metadatas/process_0")
            with trio.fail_after(10):  # a's mkdir records reach b: the root was made elsewhere
                while b.ns.resolve(f"{root}/array_metadatas") is None:
                    await b.cluster.poll_once()
            assert b.cluster.staging.stages(f"{root}/array_metadatas/process_1")
            assert not a.cluster.staging.stages(f"{root}/array_metadatas/process_0")
            ino = b.write(f"{root}/array_metadatas/process_1")
            fenced = trio.Event()

            async def fence():
                await a.cluster.fence(root)
                fenced.set()
            nursery.start_soon(fence)
            await trio.sleep(0.3)
            await b.cluster.poll_once()  # b's file is not staged yet: no answer
            await trio.sleep(0.3)
            assert not fenced.is_set()
            key = staged_key(root, b.cluster.member, "array_metadatas/process_1")
            b.journal.execute("INSERT INTO objects (key, inode, size, digest, etag) VALUES (?, ?, 6, 'd', 'e')",
                              (key, ino))
            b.journal.execute("UPDATE inodes SET state='durable'")
            await b.cluster.poll_once()
            with trio.fail_after(5):
                await fenced.wait()
            adopted = a.ns.resolve(f"{root}/array_metadatas/process_1")
            assert adopted is not None and a.ns.remote_key(adopted) == key and a.ns.getattr(adopted).size == 6
            assert not b.cluster.blocks_durable("run")  # a fence never makes anything pending
            # a node that never answers: the fence gives up after its bound
            monkeypatch.setattr(cluster_mod, "FENCE_TIMEOUT_S", 0.5)
            with trio.fail_after(5):
                await a.cluster.fence(root)
            nursery.cancel_scope.cancel()
        keys = [store.relative_key(item["Key"]) async for item in store.list_objects(rec.PENDING)]
        assert keys == []  # the fences' records are gone
    run_with_store(s3_server, bucket, scenario)


def test_the_removers_sweep_keeps_only_what_it_made_again_and_published_itself(s3_server, bucket, tmp_path):
    """`rm -r d; mkdir d` on node a: its sweep deletes another node's marker of `d` even while
    a's `d` is empty (a's drain publishes a's own), keeps a marker a published itself, keeps an
    old object at the name of a file a made again (a's upload may be it), and deletes the rest."""
    async def scenario(store):
        a = Node(tmp_path, "a", store)
        for key in ("run/d/", "run/d/old", "run/e/", "run/e/f", "run/e/g"):
            await store.put_object(key, b"" if key.endswith("/") else b"theirs", {})
        a.write("run/d/keep_run")  # run/d made again, then emptied: empty at the sweep
        a.ns.unlink(a.ns.resolve("run/d"), b"keep_run")
        a.write("run/e/f")  # run/e made again, with f
        e = a.ns.resolve("run/e")
        a.journal.execute("INSERT INTO objects (key, inode, size, etag) VALUES ('run/e/', ?, 0, 'x')", (e,))
        rn = a.cluster.namespace
        for path in ("run/d", "run/e"):
            await rn._sweep(path, await rn._write("rmdir", path, None))
        left = [store.relative_key(item["Key"]) async for item in store.list_objects("run/")]
        assert sorted(left) == ["run/e/", "run/e/f"]
    run_with_store(s3_server, bucket, scenario)


def test_directories_known_only_from_the_bucket_go_once_it_no_longer_shows_them(tmp_path):
    """A listing or lookup may adopt a directory from objects another node's removal is sweeping;
    once the listing shows nothing of it, it is dropped (deepest first), unless this node keeps it."""
    from gateway.listing import BucketListing
    ns = Namespace(Journal(tmp_path / "j.db"), uid=0, gid=0, on_purge=lambda ino: None)
    for path in ("gone", "shown", "chain/inner", "kept"):
        parent = ROOT_INODE
        for part in path.split("/"):
            parent = ns.adopt_remote(parent, part.encode(), is_dir=True)
    own = ns.create(ROOT_INODE, b"own", stat.S_IFDIR | 0o755, 0, 0).id
    ns.journal.execute("INSERT INTO objects (key, inode, size, etag) VALUES ('own/', ?, 0, 'e')", (own,))
    ns.journal.execute("UPDATE inodes SET state='durable' WHERE id=?", (own,))
    kept = ns.resolve("kept")
    listing = BucketListing(ns, store=None, ttl_s=1, follow_bucket=True)  # type: ignore[arg-type]
    listing.keeps_dir = lambda ino, path: ino == kept
    listing._drop_vanished_dirs({"shown/": {}, "own/": {}})
    assert sorted(name for _, name, _ in ns.readdir(ROOT_INODE, 0)) == [b"kept", b"own", b"shown"]
