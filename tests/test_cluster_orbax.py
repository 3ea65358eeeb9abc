"""Orbax multi-host through per-node mounts: two JAX processes (jax.distributed on the CPU), each on
its own ckptfs mount. The primary creates the temporary directory, every host writes its files
into it after a barrier, the primary reads every host's array metadata there (node b's files are
staged, docs/CLUSTER.md "Staging") and renames it into place; the bucket ends with one checkpoint
holding both hosts' files under the final name, never shows a temporary name as a checkpoint key,
and keeps no staged object."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bucket_watch import BucketWatcher
from tests.support.faultproxy import FaultProxy
from tests.support.s3server import free_port
from tests.test_cluster_commit import cluster_options
from tests.test_faults import wait_until

SCRIPT = Path(__file__).with_name("_cluster_orbax.py")


@pytest.fixture
def throttled(s3_server):
    with FaultProxy(s3_server.endpoint_url) as proxy:
        yield proxy


def test_primary_lists_and_reads_other_hosts_files_in_its_temporary_directory(make_mount, throttled):
    """Orbax's file operations without JAX: node b writes into a's temporary directory (through a
    slow endpoint); right after b's close a lists and reads b's files there (a fence waits for b
    to stage them), then renames the directory; b's files end under the final name, copied from
    their staged keys, and nothing staged or temporary is left."""
    tmp = "run1/1.orbax-checkpoint-tmp-7"
    a = make_mount("a", options=cluster_options("a"))
    throttled.set_bandwidth(1 << 20)  # b's 1 MiB manifest takes ~1 s to stage
    b = make_mount("b", options=cluster_options("b"), endpoint_url=throttled.endpoint_url)
    with BucketWatcher(a.s3.boto3_client(), a.bucket, a.prefix, interval_s=0.05) as watch:
        (a.path / tmp / "array_metadatas").mkdir(parents=True)
        (a.path / tmp / "array_metadatas/process_0").write_text("meta 0")
        on_b = wait_until(lambda: (p := b.path / tmp / "array_metadatas").is_dir() and p.parent, 10,
                          "a's temporary directory on b")
        (on_b / "ocdbt.process_1").mkdir()
        manifest = os.urandom(1 << 20)
        (on_b / "ocdbt.process_1/manifest.ocdbt").write_bytes(manifest)
        (on_b / "array_metadatas/process_1").write_text("meta 1")
        # the barrier; then the primary globs and reads every host's files
        assert sorted(os.listdir(a.path / tmp / "array_metadatas")) == ["process_0", "process_1"]
        assert (a.path / tmp / "array_metadatas/process_1").read_text() == "meta 1"
        assert (a.path / tmp / "ocdbt.process_1/manifest.ocdbt").read_bytes() == manifest
        os.rename(a.path / tmp, a.path / "run1/1")
        (a.path / "run1/1/commit_success.txt").write_text("ok")
        a.wait("run1/1", timeout=60)
        b.wait("run1/1", timeout=60)
        time.sleep(0.2)
    keys = a.keys()
    final = {"run1/1/array_metadatas/process_0", "run1/1/array_metadatas/process_1",
             "run1/1/ocdbt.process_1/manifest.ocdbt"}
    assert final <= set(keys) and keys["run1/1/ocdbt.process_1/manifest.ocdbt"] == len(manifest)
    assert watch.marker_violations("run1/1/commit_success.txt", final) == []
    seen = watch.ever_seen()
    assert [k for k in seen if k.startswith(".ckptfs/staged/") and "/b@" in k]  # b's went through staging
    assert not [k for k in seen if "orbax-checkpoint-tmp" in k and not k.startswith(".ckptfs/")]
    assert not [k for k in keys if k.startswith((".ckptfs/staged/", ".ckptfs/pending/"))]
    assert (b.path / "run1/1/array_metadatas/process_0").read_text() == "meta 0"




@pytest.mark.slow
def test_orbax_multihost_save_on_two_mounts(make_mount, tmp_path):
    pytest.importorskip("orbax.checkpoint")
    a = make_mount("a", options=cluster_options("a"))
    b = make_mount("b", options=cluster_options("b"))
    roots = json.dumps([str(a.path / "run1"), str(b.path / "run1")])
    port = free_port()
    with BucketWatcher(a.s3.boto3_client(), a.bucket, a.prefix, interval_s=0.05) as watch:
        procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(i), str(port), roots, str(tmp_path / f"o{i}.json")],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
        try:
            logs = [p.communicate(timeout=150)[0] for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            logs = [p.communicate()[0] for p in procs]
            raise AssertionError("timed out:\n" + "\n----\n".join(l[-3000:] for l in logs))
        for i, p in enumerate(procs):
            assert p.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"
        results = [json.loads((tmp_path / f"o{i}.json").read_text()) for i in range(2)]
        assert all(r["restored_ok"] for r in results)
        a.wait("run1", timeout=60)
        b.wait("run1", timeout=60)
        keys = wait_until(lambda: (k := [k for k in a.keys() if k.startswith("run1/1/")])
                        and any("process_1" in x for x in k) and k, 30, "both hosts' files under run1/1/")
    assert any("process_0" in k for k in keys) and any("process_1" in k for k in keys), keys
    seen = watch.ever_seen()
    # the temporary name never became a checkpoint key; b's files went through staged keys, now gone
    assert not [k for k in seen if "orbax-checkpoint-tmp" in k and not k.startswith(".ckptfs/")]
    assert [k for k in seen if k.startswith(".ckptfs/staged/") and "/b@" in k and "process_1" in k]
    assert not [k for k in a.keys() if k.startswith((".ckptfs/staged/", ".ckptfs/pending/"))]
    assert sorted(p.name for p in (b.path / "run1").iterdir()) == ["1"]  # b's copy followed the rename
