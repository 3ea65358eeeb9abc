"""Orbax multi-host through per-node mounts: two JAX processes (jax.distributed on the CPU), each on
its own ckptfs mount. The primary creates the temporary directory, every host writes its files
into it after a barrier, the primary reads every host's array metadata there (node b's files are
staged, docs/CLUSTER.md "Staging") and renames it into place; the bucket ends with one checkpoint
holding both hosts' files under the final name, never shows a temporary name as a checkpoint key,
and keeps no staged object."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bucket_watch import BucketWatcher
from tests.support.s3server import free_port
from tests.test_cluster_commit import cluster_options
from tests.test_faults import wait_until

pytest.importorskip("orbax.checkpoint")
SCRIPT = Path(__file__).with_name("_cluster_orbax.py")


@pytest.mark.slow
def test_orbax_multihost_save_on_two_mounts(make_mount, tmp_path):
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
