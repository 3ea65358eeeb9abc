"""The shim on two nodes: ContinuousCheckpointer with two gloo ranks, each on its own mount.

Saves become durable cluster-wide, retention on rank 0 removes every node's files of the steps it
drops, and a fresh third mount restores the newest checkpoint from the bucket.
"""

from __future__ import annotations

import re

import torch

from mount import ContinuousCheckpointer
from tests._cluster_ranks import run_ranks
from tests.test_cluster_commit import cluster_options
from tests.test_faults import wait_until


def steps_in_bucket(mount) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for key in mount.keys():
        m = re.match(r"run1/step_(\d+)/(.+)$", key)
        if m:
            out.setdefault(int(m.group(1)), set()).add(m.group(2))
    return out


def test_two_ranks_torch_format_save_retain_restore(make_mount, tmp_path):
    a = make_mount("a", options=cluster_options("a", "--log-file", str(tmp_path / "a.log")))
    b = make_mount("b", options=cluster_options("b", "--log-file", str(tmp_path / "b.log")))
    r0, r1 = run_ranks("shim-torch", [a.path / "run1", b.path / "run1"], tmp_path)
    assert r0["saved"] == r1["saved"] == [1, 2, 3, 4]
    assert r0["restored_step"] == r1["restored_step"] == 4
    assert (r0["restored_rank"], r1["restored_rank"]) == (0, 1) and r0["restored_ok"] and r1["restored_ok"]
    files = {"COMMIT", "rank_00000.pt", "rank_00001.pt"}
    wait_until(lambda: steps_in_bucket(a) == {3: files, 4: files}, 20,
             "retention on rank 0 to delete both nodes' files of steps 1 and 2")
    wait_until(lambda: sorted(p.name for p in (b.path / "run1").iterdir()) == ["step_3", "step_4"], 15,
             "node b to drop the deleted steps")


def test_two_ranks_dcp_format_restore_on_a_fresh_node(make_mount, tmp_path):
    a = make_mount("a", options=cluster_options("a", "--log-file", str(tmp_path / "a.log")))
    b = make_mount("b", options=cluster_options("b", "--log-file", str(tmp_path / "b.log")))
    run_ranks("shim-dcp", [a.path / "run1", b.path / "run1"], tmp_path)
    wait_until(lambda: sorted(steps_in_bucket(a)) == [3, 4], 20, "retention to leave steps 3 and 4")
    assert {"COMMIT", ".metadata", "__0_0.distcp", "__1_0.distcp"} <= steps_in_bucket(a)[4]
    c = make_mount("c", options=cluster_options("c"))  # a fresh node: empty cache dir
    step, state = ContinuousCheckpointer(c.path / "run1", format="dcp").restore()
    assert step == 4
    assert torch.equal(state["x0"], torch.full((50_000,), 4.0))
    assert torch.equal(state["x1"], torch.full((50_000,), 5.0))
