"""t6 frameworks on a real ckptfs mount over moto: the checkpointer, DCP and Orbax through FUSE.

Durability here is the gateway's `user.ckptfs.state` xattr, not a fake probe.
"""

import os
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests._ranks import run_ranks
from mount import ContinuousCheckpointer, LatestN, read_commit
from mount.demo import state_digest


def make_state(step):
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(512, 1024, generator=g), "b": torch.full((7,), float(step))},
            "optim": {"step": step, "moments": [torch.randn(1000, generator=g)]}}


def no_tmp_keys(keys):
    return not [k for k in keys if k.endswith(".tmp") or ".tmp/" in k]


def test_checkpointer_durable_in_bucket_and_restored_bit_for_bit_from_a_fresh_cache(make_mount, tmp_path):
    m1 = make_mount("m1")
    root = m1.path / "run1"
    digests = {}
    with ContinuousCheckpointer(root, keep=LatestN(2)) as ckpt:
        for step in range(1, 30):
            state = make_state(step)
            if ckpt.maybe_save(step, state, metrics={"loss": 1.0 / step}):
                digests[step] = state_digest(state)
            time.sleep(0.01)
        last = ckpt.wait_local()
        assert ckpt.wait_durable(last, timeout=60) == last
        assert os.getxattr(ckpt.step_dir(last), "user.ckptfs.state") == b"durable"
        ckpt.retain()  # retention ran at each commit, when older steps were the newest durable
        kept = ckpt.steps()
    assert len(digests) >= 2 and kept[-1] == last and len(kept) == 2
    m1.wait(timeout=60)  # retention's deletes reach the bucket too
    keys = m1.keys()
    assert no_tmp_keys(keys)
    assert {k.split("/")[1] for k in keys} == {f"step_{s}" for s in kept}
    assert f"run1/step_{last}/COMMIT" in keys and f"run1/step_{last}/state.pt" in keys
    m1.unmount()

    m2 = make_mount("m2", cache_dir=tmp_path / "fresh-cache")  # nothing local: reads come from the bucket
    step, state = ContinuousCheckpointer(m2.path / "run1").restore()
    assert step == last and state_digest(state) == digests[last]


def test_retention_waits_for_the_gateway_to_report_durable(make_mount):
    mnt = make_mount(options=("--drain-delay", "5"))  # nothing is durable for the first seconds
    with ContinuousCheckpointer(mnt.path / "r", keep=LatestN(1)) as ckpt:
        for step in range(1, 5):
            ckpt.save(step, make_state(step))
        assert ckpt.steps() == [1, 2, 3, 4]  # no durable checkpoint yet: nothing may go
        assert not ckpt.is_durable(1)
        ckpt.wait_durable(4, timeout=60)
        ckpt.save(5, make_state(5))
        ckpt.wait_local()  # save() returns at the commit; retention follows it
        assert ckpt.steps() == [4, 5]  # 4 is the newest durable one, 5 still drains


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_on_the_mount(ckptfs_mount):
    direct = ckptfs_mount.path / "direct"
    state = {"w": torch.randn(256, 256), "nested": {"b": torch.arange(10)}}
    dcp.save(state, checkpoint_id=str(direct), no_dist=True)
    target = {"w": torch.zeros(256, 256), "nested": {"b": torch.zeros(10, dtype=torch.long)}}
    dcp.load(target, checkpoint_id=str(direct), no_dist=True)
    assert torch.equal(target["w"], state["w"])

    with ContinuousCheckpointer(ckptfs_mount.path / "run", format="dcp") as ckpt:
        ckpt.save(3, state)
        ckpt.wait_durable(3, timeout=60)
    ckptfs_mount.wait(timeout=60)
    keys = ckptfs_mount.keys()
    assert no_tmp_keys(keys)
    assert {"direct/.metadata", "run/step_3/.metadata", "run/step_3/__0_0.distcp",
            "run/step_3/COMMIT"} <= set(keys)
    _, loaded = ContinuousCheckpointer(ckptfs_mount.path / "run").restore()
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["nested"]["b"], state["nested"]["b"])


def test_two_rank_dcp_on_the_mount(ckptfs_mount, tmp_path):
    root = ckptfs_mount.path / "ranks"
    r0, r1 = run_ranks("dcp", root, tmp_path)
    assert r0["shard_ok"] and r1["shard_ok"] and r0["saved"] == r1["saved"]
    ckpt = ContinuousCheckpointer(root)
    last = ckpt.latest_step()
    assert ckpt.wait_durable(last, timeout=60) == last
    owners = {f["name"]: f["rank"] for f in read_commit(ckpt.step_dir(last))["files"]}
    assert owners == {"__0_0.distcp": 0, "__1_0.distcp": 1, ".metadata": 0}
    ckpt.close()


def test_orbax_manager_on_the_mount(ckptfs_mount):
    ocp = pytest.importorskip("orbax.checkpoint")
    import jax.numpy as jnp

    from mount.orbax_shim import continuous_checkpoint_manager

    root = ckptfs_mount.path / "jax"
    mngr = continuous_checkpoint_manager(root, max_to_keep=1)
    saved = []
    for step in range(20):
        tree = {"w": jnp.arange(4096.0) + step, "b": {"x": jnp.ones((8, 8)) * step}}
        if mngr.save(step, args=ocp.args.StandardSave(tree)):
            saved.append(step)
        time.sleep(0.02)
    mngr.wait_until_finished()
    preserve = mngr._options.preservation_policy
    deadline = time.monotonic() + 60
    while not preserve.is_durable(saved[-1]):
        assert time.monotonic() < deadline, "last Orbax step never became durable"
        time.sleep(0.1)
    # one more save: now the newest durable step is the last one, older ones may go
    tree = {"w": jnp.arange(4096.0) + 100, "b": {"x": jnp.ones((8, 8)) * 100}}
    assert mngr.save(100, args=ocp.args.StandardSave(tree))
    mngr.wait_until_finished()
    assert mngr.all_steps() == [saved[-1], 100]
    restored = mngr.restore(100, args=ocp.args.StandardRestore(tree))
    assert jnp.array_equal(restored["w"], tree["w"])
    mngr.close(durable_timeout=60)  # 100 durable, then the last pass: exactly what LatestN(1) keeps
    assert mngr.all_steps() == [100]
    ckptfs_mount.wait(timeout=60)
    keys = ckptfs_mount.keys()
    assert {k.split("/")[1] for k in keys if k.startswith("jax/") and k.count("/") > 1} == {"100"}
    assert no_tmp_keys(keys)


def test_demo_on_the_mount_everything_durable_and_restored_from_a_fresh_cache(make_mount, tmp_path):
    from mount.demo import run_demo

    m1 = make_mount("m1")
    summary = run_demo(str(m1.path / "demo"), seconds=3, state_mb=8, live=False, sync_probes=1,
                       wait_durable_s=60)
    assert summary["all_durable"] is True and summary["checkpoints_saved"] >= 2
    assert summary["last_durable_step"] == summary["final_step"]
    m1.unmount()
    m2 = make_mount("m2", cache_dir=tmp_path / "fresh-cache")
    step, state = ContinuousCheckpointer(m2.path / "demo").restore(step=summary["final_step"])
    assert state_digest(state) == summary["final_state_digest"]
