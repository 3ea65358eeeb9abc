"""Several gateways on one prefix: a commit marker waits for every node's files (docs/CLUSTER.md).

Two (or three) real mounts of one bucket prefix stand in for nodes; node b reaches the endpoint
through a throttling proxy, so its shard is still uploading when node a's marker is ready.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from tests._cluster_ranks import run_ranks
from tests.bucket_watch import BucketWatcher
from tests.support.faultproxy import FaultProxy
from tests.test_faults import wait_until

LEASE = ("--lease-interval", "1")


def cluster_options(node: str, *extra: str) -> tuple[str, ...]:
    return ("--drain-delay", "0.2", "--cluster", "--node-id", node, *LEASE, *extra)


@pytest.fixture
def throttled(s3_server):
    with FaultProxy(s3_server.endpoint_url) as proxy:
        yield proxy




def waiting_for(mount, scope: str) -> list[dict]:
    for commit in mount.status().get("cluster", {}).get("commits", []):
        if commit["scope"] == scope:
            return commit["waiting_for"]
    return []


def test_two_node_dcp_marker_never_before_either_shard(make_mount, throttled, tmp_path):
    a = make_mount("a", options=cluster_options("a"))
    throttled.set_bandwidth(1 << 20)  # node b's 6 MiB shard takes ~6 s
    b = make_mount("b", options=cluster_options("b"), endpoint_url=throttled.endpoint_url)
    client = a.s3.boto3_client()
    with BucketWatcher(client, a.bucket, a.prefix, interval_s=0.02) as watch:
        run_ranks("dcp", [a.path / "run1", b.path / "run1"], tmp_path)
        shard1 = "run1/step_1/__1_0.distcp"
        waits = wait_until(lambda: waiting_for(a, "run1/step_1"), 20, "a's status to name the node it waits for")
        assert waits[0]["node"].startswith("b@")
        a.wait("run1/step_1", timeout=60)
        b.wait("run1/step_1", timeout=60)  # cluster-wide on b too
        time.sleep(0.2)
    marker = "run1/step_1/.metadata"
    data = {"run1/step_1/__0_0.distcp", shard1}
    assert marker in watch.ever_seen()
    assert watch.marker_violations(marker, data) == []
    keys = a.keys()
    assert keys[shard1] == os.path.getsize(b.path / shard1) and keys[marker] > 0
    # both nodes see one checkpoint: b's mount shows a's marker, a's shows b's shard
    assert (b.path / marker).stat().st_size == keys[marker]
    assert (a.path / shard1).read_bytes() == (b.path / shard1).read_bytes()
    assert a.status()["cluster"]["commits"] == []  # done: nothing left waiting


def test_lost_node_marker_never_published_and_later_checkpoints_do_not_wait(make_mount, throttled, tmp_path):
    a = make_mount("a", options=cluster_options("a"))
    throttled.set_bandwidth(256 << 10)  # b's shard would need ~24 s
    b = make_mount("b", options=cluster_options("b"), endpoint_url=throttled.endpoint_url)
    client = a.s3.boto3_client()
    marker, shard1 = "run1/step_1/.metadata", "run1/step_1/__1_0.distcp"
    with BucketWatcher(client, a.bucket, a.prefix, interval_s=0.05) as watch:
        run_ranks("dcp", [a.path / "run1", b.path / "run1"], tmp_path)
        wait_until(lambda: waiting_for(a, "run1/step_1"), 20, "a to wait for b")
        b.kill9()
        shutil.rmtree(b.cache_dir)  # the node is gone, and its disk with it
        waits = wait_until(lambda: [w for w in waiting_for(a, "run1/step_1") if w["lost"]], 30,
                         "a to report b's lease as lost")
        assert waits[0]["node"].startswith("b@")
        # b comes back on an empty disk, with the same node id: a new incarnation, which does not count
        b2 = make_mount("b2", options=cluster_options("b"), endpoint_url=throttled.endpoint_url,
                        cache_dir=tmp_path / "b-cache-new")
        throttled.set_bandwidth(None)
        time.sleep(4)  # b2 polls and answers what it can: it must not count for the old member
        state = a.state("run1/step_1")
        status = a.status()
    assert marker not in watch.ever_seen() and marker not in a.keys()
    assert shard1 not in a.keys()
    assert state == "pending"
    [commit] = [c for c in status["cluster"]["commits"] if c["scope"] == "run1/step_1"]
    assert commit["state"] == "waiting" and [w["node"].split("@")[0] for w in commit["waiting_for"]] == ["b"]
    # the new incarnation answered (an empty manifest), but it is a different member: a still waits
    new_member = "b@" + json.loads(os.getxattr(b2.path, "user.ckptfs.status"))["cluster"]["incarnation"]
    assert any(k.startswith(".ckptfs/commits/run1%2Fstep_1/") and k.endswith(new_member) for k in a.keys())
    assert commit["waiting_for"][0]["node"] != new_member
    # the next checkpoint, saved on a alone, is uploaded and committed while step_1 still waits
    (a.path / "run1" / "step_2").mkdir()
    for name, body in (("__0_0.distcp", b"shard of step 2"), (".metadata", b"metadata of step 2")):
        with open(a.path / "run1" / "step_2" / name, "wb") as f:
            f.write(body)
    wait_until(lambda: "run1/step_2/.metadata" in a.keys(), 60, "step_2 to commit without the lost node")
    assert a.state("run1/step_1") == "pending" and marker not in a.keys()


def test_removing_a_checkpoint_whose_commit_waits_for_a_lost_node_leaves_nothing_pending(make_mount, throttled,
                                                                                          tmp_path):
    """The partial step a lost node left is deleted (by hand, or by retention): its commit round is
    abandoned, so the run directory is durable again and `ckptfs wait` on it returns."""
    a = make_mount("a", options=cluster_options("a"))
    throttled.set_bandwidth(256 << 10)
    b = make_mount("b", options=cluster_options("b"), endpoint_url=throttled.endpoint_url)
    run_ranks("dcp", [a.path / "run1", b.path / "run1"], tmp_path)
    wait_until(lambda: waiting_for(a, "run1/step_1"), 20, "a to wait for b")
    b.kill9()
    assert a.state("run1") == "pending"
    shutil.rmtree(a.path / "run1" / "step_1")
    a.wait("run1", timeout=30)
    assert a.state("run1") == "durable"
    [commit] = [c for c in a.status()["cluster"]["commits"] if c["scope"] == "run1/step_1"]
    assert commit["state"] == "abandoned" and commit["waiting_for"] == []
    wait_until(lambda: not [k for k in a.keys() if k.startswith("run1/step_1/")], 30, "the step's objects to go")
    assert not [k for k in a.keys() if k.startswith(".ckptfs/commits/run1%2Fstep_1/")]


def test_renamed_directory_commits_only_when_every_nodes_files_are_in(make_mount, throttled):
    """A checkpoint committed by renaming a temporary directory (`step_5.tmp/` -> `step_5/`) that
    both nodes wrote into: node b's shard is staged and then copied under the final name; node a's
    closing file (its newest file of the scope) is never in the bucket before every shard is."""
    a = make_mount("a", options=cluster_options("a"))
    throttled.set_bandwidth(1 << 20)  # b's 4 MiB shard takes ~4 s
    b = make_mount("b", options=cluster_options("b"), endpoint_url=throttled.endpoint_url)
    client = a.s3.boto3_client()
    with BucketWatcher(client, a.bucket, a.prefix, interval_s=0.02) as watch:
        (a.path / "run1" / "step_5.tmp").mkdir(parents=True)
        tmp_b = wait_until(lambda: (p := b.path / "run1" / "step_5.tmp").is_dir() and p, 10,
                           "a's temporary directory on b")
        (tmp_b / "shard_b").write_bytes(os.urandom(4 << 20))
        (a.path / "run1/step_5.tmp/shard_a").write_bytes(os.urandom(1 << 20))
        (a.path / "run1/step_5.tmp/meta.json").write_text('{"step": 5}')  # the closing file
        os.rename(a.path / "run1/step_5.tmp", a.path / "run1/step_5")  # after the "barrier"
        wait_until(lambda: [w for w in waiting_for(a, "run1/step_5") if w["node"].startswith("b@")], 20,
                   "a's status to name node b as the one it waits for")
        assert "run1/step_5/meta.json" not in a.keys()
        a.wait("run1/step_5", timeout=60)
        b.wait("run1/step_5", timeout=60)
        time.sleep(0.2)
    closing, shards = "run1/step_5/meta.json", {"run1/step_5/shard_a", "run1/step_5/shard_b"}
    assert closing in watch.ever_seen()
    assert watch.marker_violations(closing, shards) == []
    keys = a.keys()
    assert keys["run1/step_5/shard_b"] == 4 << 20
    assert not [k for k in watch.ever_seen() if ".tmp" in k and not k.startswith(".ckptfs/")]
    assert not [k for k in keys if k.startswith(".ckptfs/staged/")]
    record = json.loads(client.get_object(Bucket=a.bucket, Key=f"{a.prefix}/.ckptfs/commits/run1%2Fstep_5/commit.json"
                                          if a.prefix else ".ckptfs/commits/run1%2Fstep_5/commit.json")["Body"].read())
    assert record["state"] == "committed" and len(record["required"]) == 2
    assert (b.path / "run1/step_5/meta.json").read_text() == '{"step": 5}'  # one namespace on b
