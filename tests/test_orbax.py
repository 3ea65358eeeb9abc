"""t6 frameworks: Orbax CheckpointManager from mount.orbax_shim, with a real jax pytree."""

import os
import time

import pytest

jax = pytest.importorskip("jax")
ocp = pytest.importorskip("orbax.checkpoint")
import jax.numpy as jnp  # noqa: E402
from orbax.checkpoint import checkpoint_managers as ocm  # noqa: E402

from mount.orbax_shim import PreserveNewestDurable, continuous_checkpoint_manager  # noqa: E402


def tree(step):
    return {"params": {"w": jnp.arange(256.0) + step, "b": jnp.ones((4, 4)) * step},
            "step": jnp.asarray(step)}


def steps_on_disk(path):
    return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def test_continuous_manager_saves_and_restores_a_pytree(tmp_path):
    mngr = continuous_checkpoint_manager(tmp_path, max_to_keep=2)
    assert isinstance(mngr, ocp.CheckpointManager)
    saved = []
    for step in range(25):
        time.sleep(0.01)
        if mngr.save(step, args=ocp.args.StandardSave(tree(step))):
            saved.append(step)
    mngr.wait_until_finished()
    assert saved[0] == 0 and len(saved) >= 3
    assert steps_on_disk(tmp_path) == saved[-2:]
    latest = mngr.latest_step()
    restored = mngr.restore(latest, args=ocp.args.StandardRestore(tree(0)))
    assert latest == saved[-1]
    assert jnp.array_equal(restored["params"]["w"], tree(latest)["params"]["w"])
    assert int(restored["step"]) == latest
    mngr.close()


def test_continuous_policy_skips_while_a_save_is_in_progress(tmp_path):
    big = {"w": jnp.ones((64 << 20) // 4)}  # 64 MiB: the write outlasts the next call
    mngr = continuous_checkpoint_manager(tmp_path)
    assert mngr.save(0, args=ocp.args.StandardSave(big))
    assert mngr.is_saving_in_progress()
    assert not mngr.save(1, args=ocp.args.StandardSave(big))  # no second save on top
    mngr.wait_until_finished()
    assert mngr.save(2, args=ocp.args.StandardSave(big))
    mngr.wait_until_finished()
    assert mngr.all_steps() == [0, 2]
    mngr.close()


def test_preservation_never_removes_the_newest_durable_step(tmp_path):
    durable = {0, 1, 2, 3}
    probe = lambda path: int(os.path.basename(path)) in durable  # noqa: E731
    mngr = continuous_checkpoint_manager(tmp_path, max_to_keep=1, probe=probe)
    for step in range(8):
        assert mngr.save(step, args=ocp.args.StandardSave(tree(step)))
        mngr.wait_until_finished()
    assert steps_on_disk(tmp_path) == [3, 4, 5, 6, 7]  # 3 is the newest durable step
    durable.update(range(9))  # the drain caught up
    assert mngr.save(8, args=ocp.args.StandardSave(tree(8)))
    mngr.wait_until_finished()
    assert steps_on_disk(tmp_path) == [7, 8]  # 8 was in flight at the decision: 7 is protected
    mngr.close()


def test_wrapper_preserves_everything_without_a_durable_step(tmp_path):
    class Info:
        def __init__(self, step):
            self.step, self.metrics, self.time = step, None, None

    policy = PreserveNewestDurable(ocm.LatestN(n=1), str(tmp_path), str, lambda p: False)
    ckpts = [Info(s) for s in (1, 2, 3)]
    assert policy.should_preserve(ckpts, context=None) == [True, True, True]


def test_maxtext_knobs(tmp_path):
    mngr = continuous_checkpoint_manager(tmp_path / "a", max_num_checkpoints_to_keep=3)
    policy = mngr._options.preservation_policy
    assert isinstance(policy, PreserveNewestDurable) and policy.inner.n == 3
    assert isinstance(mngr._options.save_decision_policy, ocm.ContinuousCheckpointingPolicy)
    mngr.close()

    mngr = continuous_checkpoint_manager(tmp_path / "b", enable_continuous_checkpointing=False,
                                         checkpoint_period=5)
    assert [s for s in range(12) if mngr.should_save(s)] == [0, 5, 10]
    mngr.close()

    keep = ocm.EveryNSteps(interval_steps=10)
    mngr = continuous_checkpoint_manager(tmp_path / "c", keep_policy=keep, min_interval_s=30)
    assert mngr._options.preservation_policy.inner is keep
    assert mngr._options.save_decision_policy.minimum_interval_secs == 30
    mngr.close()

    with pytest.raises(ValueError):
        continuous_checkpoint_manager(tmp_path / "d", max_to_keep=2, max_num_checkpoints_to_keep=3)
    with pytest.raises(ValueError):
        continuous_checkpoint_manager(tmp_path / "e", max_to_keep=2, keep_policy=keep)


def test_retention_follows_durability_between_saves_and_at_close(tmp_path):
    durable: set[int] = set()
    probe = lambda path: int(os.path.basename(path)) in durable  # noqa: E731
    mngr = continuous_checkpoint_manager(tmp_path, max_to_keep=2, probe=probe, durability_poll_s=0)
    for step in range(5):
        assert mngr.save(step, args=ocp.args.StandardSave(tree(step)))
        mngr.wait_until_finished()
    assert steps_on_disk(tmp_path) == [0, 1, 2, 3, 4]  # nothing durable: all kept
    durable.add(4)  # the drain went for the newest first
    assert mngr.save(5, args=ocp.args.StandardSave(tree(5)))  # first a pass: 4 is durable now
    mngr.wait_until_finished()
    assert steps_on_disk(tmp_path) == [4, 5]  # 0-2 superseded (never durable), 3 dropped by Orbax's pass
    assert mngr.save(6, args=ocp.args.StandardSave(tree(6)))
    mngr.wait_until_finished()
    assert steps_on_disk(tmp_path) == [4, 5, 6]  # 4 is still the newest durable one
    durable.update({5, 6})
    mngr.close()  # the last pass leaves exactly what LatestN(2) keeps
    assert steps_on_disk(tmp_path) == [5, 6]


def test_the_commit_marker_is_unlinked_before_the_step_is_deleted(tmp_path):
    from mount.orbax_shim import MarkerFirstDeleter

    seen = []

    class Inner:
        def delete(self, step):
            seen.append((step, (tmp_path / str(step) / "commit_success.txt").exists()))

        def delete_steps(self, steps):
            for step in steps:
                self.delete(step)

    for step in (1, 2):
        (tmp_path / str(step)).mkdir()
        (tmp_path / str(step) / "commit_success.txt").write_text("ok")
    deleter = MarkerFirstDeleter(Inner(), str(tmp_path), str)
    deleter.delete(1)
    deleter.delete_steps([2])
    assert seen == [(1, False), (2, False)]
