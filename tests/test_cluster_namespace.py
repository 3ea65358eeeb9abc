"""One namespace over two gateways: directories made, deleted and renamed on one node, files
overwritten and deleted on one node, are reflected on the other within seconds (docs/SEMANTICS.md,
"Several nodes")."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.test_cluster_commit import cluster_options
from tests.test_faults import wait_until

BOUND_S = 12  # metadata TTL 1 s + kernel attribute/entry timeout 5 s + polls, with room on 2 busy cores


@pytest.fixture
def nodes(make_mount, tmp_path):
    a = make_mount("a", options=cluster_options("a", "--metadata-ttl", "1", "--log-file", str(tmp_path / "a.log")))
    b = make_mount("b", options=cluster_options("b", "--metadata-ttl", "1", "--log-file", str(tmp_path / "b.log")))
    return a, b


def test_directory_made_on_one_node_is_usable_on_the_other(nodes):
    a, b = nodes
    (a.path / "run1" / "step_2").mkdir(parents=True)
    time.sleep(0.3)  # the training barrier
    (b.path / "run1" / "step_2" / "rank1.bin").write_bytes(b"one" * 1000)
    b.wait("run1/step_2/rank1.bin", timeout=30)
    assert a.keys()["run1/step_2/rank1.bin"] == 3000
    assert (a.path / "run1" / "step_2" / "rank1.bin").read_bytes() == b"one" * 1000  # a lookup miss on a


def test_delete_on_one_node_removes_every_nodes_objects_and_entries(nodes):
    a, b = nodes
    (a.path / "run1" / "step_1").mkdir(parents=True)
    (a.path / "run1" / "step_1" / "a.bin").write_bytes(b"a" * 5000)
    (b.path / "run1" / "step_1").mkdir(parents=True, exist_ok=True)  # every rank does (DCP, the shim)
    (b.path / "run1" / "step_1" / "b.bin").write_bytes(b"b" * 7000)
    (b.path / "run1" / "step_1" / "sub").mkdir()
    (b.path / "run1" / "step_1" / "sub" / "c.bin").write_bytes(b"c" * 10)
    a.wait("run1", timeout=30)
    b.wait("run1", timeout=30)
    assert {"run1/step_1/a.bin", "run1/step_1/b.bin", "run1/step_1/sub/c.bin"} <= set(a.keys())
    shutil.rmtree(a.path / "run1" / "step_1")  # as retention does, on one node
    wait_until(lambda: not [k for k in a.keys() if k.startswith("run1/step_1")], BOUND_S,
             "every node's objects under step_1 to be deleted")
    wait_until(lambda: not (b.path / "run1" / "step_1").exists(), BOUND_S, "b to drop step_1")
    assert os.listdir(b.path / "run1") == []
    time.sleep(1.5)  # b's drain must not re-upload what it dropped
    assert not [k for k in a.keys() if k.startswith("run1/step_1")]


def test_a_directory_removed_and_made_again_on_one_node_keeps_the_new_files_on_every_node(nodes):
    """The node that applies the removal must not delete what the removing node wrote there since
    (its own old objects are the remover's to sweep), whether the new file's bytes differ or not."""
    a, b = nodes
    step_a, step_b = a.path / "run1" / "step", b.path / "run1" / "step"
    step_a.mkdir(parents=True)
    (step_a / "f").write_bytes(b"a" * 100)
    (step_a / "empty").write_bytes(b"")
    a.wait("run1", timeout=30)
    wait_until(lambda: (step_b / "f").exists() and (step_b / "empty").exists(), BOUND_S, "b to see a's files")
    shutil.rmtree(step_b)
    step_b.mkdir()
    with open(step_b / "f.tmp", "wb") as out:  # as torch.save does
        out.write(b"b" * 200)
        os.fsync(out.fileno())
    os.rename(step_b / "f.tmp", step_b / "f")
    (step_b / "empty").write_bytes(b"")  # the same bytes, so the same ETag, as a's object had
    b.wait("run1", timeout=30)
    wait_until(lambda: "was removed on another node" in (a.path.parent / "a.log").read_text(), BOUND_S,
               "a to apply b's removal")
    a.wait(timeout=30)  # a's drain has done whatever it does about the removal
    want = {"run1/step/f": 200, "run1/step/empty": 0}
    wait_until(lambda: all((m.path / k).exists() for m in (a, b) for k in want), BOUND_S, "both nodes to show the files")
    time.sleep(1.5)  # listings on both nodes (TTL 1 s) must not drop them either
    assert {k: v for k, v in a.keys().items() if k.startswith("run1/step/")} == want
    for m in (a, b):
        assert (m.path / "run1" / "step" / "f").read_bytes() == b"b" * 200
        assert (m.path / "run1" / "step" / "empty").read_bytes() == b""


def test_a_directory_two_nodes_empty_at_once_keeps_its_marker_in_the_bucket(make_mount, tmp_path):
    """Node a moves the directory's last file out while node b removes its last subdirectory: each
    drain looks at once (no drain delay) and sees the other's entry still there, so the marker is a
    follower's to publish."""
    a, b = (make_mount(n, options=cluster_options(n, "--metadata-ttl", "1", "--drain-delay", "0",
                                                  "--log-file", str(tmp_path / f"{n}.log"))) for n in "ab")
    (a.path / "run1" / "d").mkdir(parents=True)
    (a.path / "run1" / "keep").mkdir()
    (a.path / "run1" / "d" / "f").write_bytes(b"f" * 10)
    (a.path / "run1" / "d" / "t").mkdir()
    (a.path / "run1" / "d" / "t" / "g").write_bytes(b"g" * 10)
    a.wait("run1", timeout=30)
    wait_until(lambda: sorted(os.listdir(b.path / "run1" / "d")) == ["f", "t"]
               and (b.path / "run1" / "keep").exists(), BOUND_S, "b to see a's tree")
    os.rename(a.path / "run1" / "d" / "f", a.path / "run1" / "keep" / "f")
    shutil.rmtree(b.path / "run1" / "d" / "t")
    a.wait("run1", timeout=30)
    b.wait("run1", timeout=30)
    want = {"run1/d/": 0, "run1/keep/f": 10}
    wait_until(lambda: {k: v for k, v in a.keys().items() if not k.startswith(".ckptfs/")} == want, BOUND_S,
               f"the bucket to hold {want}")
    for m in (a, b):
        wait_until(lambda m=m: os.listdir(m.path / "run1" / "d") == [], BOUND_S, f"{m.path.name} to show d empty")


def test_overwrite_and_delete_of_a_file_are_seen_on_the_other_node(nodes):
    a, b = nodes
    (b.path / "run1").mkdir()
    (b.path / "run1" / "latest").write_bytes(b"1")
    b.wait("run1/latest", timeout=30)
    assert (a.path / "run1" / "latest").read_bytes() == b"1"
    tmp = b.path / "run1" / "latest.tmp"
    tmp.write_bytes(b"22")
    os.rename(tmp, b.path / "run1" / "latest")  # an overwrite, the way checkpoint code does it
    b.wait("run1/latest", timeout=30)
    wait_until(lambda: (a.path / "run1" / "latest").read_bytes() == b"22", BOUND_S, "a to see the overwrite",
             interval=0.5)
    assert os.stat(a.path / "run1" / "latest").st_size == 2
    os.unlink(b.path / "run1" / "latest")
    wait_until(lambda: "run1/latest" not in a.keys(), 10, "the object to be deleted")
    wait_until(lambda: not (a.path / "run1" / "latest").exists(), BOUND_S, "a to drop the deleted file")


def test_lookup_with_the_endpoint_down_answers_enoent_within_the_timeout(make_mount, s3_server):
    from tests.support.faultproxy import FaultProxy

    with FaultProxy(s3_server.endpoint_url) as proxy:
        a = make_mount("a", options=cluster_options("a", "--remote-lookup-timeout", "0.5"),
                       endpoint_url=proxy.endpoint_url)
        proxy.set_faults(delay_rate=1.0, delay_s=20)  # every request hangs
        started = time.monotonic()
        assert not (a.path / "nothing-here").exists()
        assert time.monotonic() - started < 3
        (a.path / "local.bin").write_bytes(b"x")  # creating a file still works
        assert (a.path / "local.bin").read_bytes() == b"x"
        proxy.clear_faults()
        a.wait("local.bin", timeout=60)
